"""gRPC's standard health checking protocol (`grpc.health.v1.Health/Check`), the one Kubernetes
gRPC probes, `grpc-health-probe` and gRPC load balancers call.

Its messages and service are built here from their descriptor with protobuf's own runtime, in a
private descriptor pool (no generated code, no extra package, no clash with a `grpc_health` a
client process may import): `HealthCheckRequest {string service = 1}`, `HealthCheckResponse
{ServingStatus status = 1}` and `Health.Check`, as grpc/src/proto/grpc/health/v1/health.proto
defines them (`Watch` is not served).
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "grpc.health.v1"
# The services a Check may name: "" (the whole server) and the inference service.
SERVICES = frozenset({"", "inference.GRPCInferenceService"})
SERVING, NOT_SERVING = 1, 2

_Field = descriptor_pb2.FieldDescriptorProto


def _message_classes() -> tuple[type, type]:
    proto = descriptor_pb2.FileDescriptorProto(
        name="grpc/health/v1/health.proto", package=PACKAGE, syntax="proto3"
    )
    request = proto.message_type.add(name="HealthCheckRequest")
    request.field.add(
        name="service", number=1, type=_Field.TYPE_STRING, label=_Field.LABEL_OPTIONAL
    )
    response = proto.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=_Field.TYPE_ENUM,
        type_name=f".{PACKAGE}.HealthCheckResponse.ServingStatus",
        label=_Field.LABEL_OPTIONAL,
    )
    service = proto.service.add(name="Health")  # described by server reflection
    service.method.add(
        name="Check",
        input_type=f".{PACKAGE}.HealthCheckRequest",
        output_type=f".{PACKAGE}.HealthCheckResponse",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return tuple(
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
        for name in ("HealthCheckRequest", "HealthCheckResponse")
    )


HealthCheckRequest, HealthCheckResponse = _message_classes()
