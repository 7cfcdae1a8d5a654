"""gRPC server reflection (`grpc.reflection.v1` and `v1alpha`), so that grpcurl, grpcui
and Postman can list the services, describe their messages and call them without the .proto
files (Triton has none: its users have to find grpc_service.proto first).

The servicer is grpcio-reflection's asyncio one, run on Volley's own gRPC server; it answers
from a descriptor pool of its own holding exactly what this server serves: the inference
service (tritonclient's grpc_service.proto and the model_config.proto it imports) and the
health service (`server.protocol.grpc_health`).
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.reflection import aio
from tritonclient.grpc import service_pb2 as pb

from server.protocol import grpc_health

SERVICE = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
# grpc.reflection.v1 (which grpcurl tries first) has v1alpha's messages field for field: the
# same handler answers both paths.
PATHS = tuple(
    f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    for version in ("v1alpha", "v1")
)
SERVICES = ("inference.GRPCInferenceService", "grpc.health.v1.Health", SERVICE.full_name)


def _pool() -> descriptor_pool.DescriptorPool:
    """The files of the services above, each after the files it imports."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for file in (pb.DESCRIPTOR, grpc_health.HealthCheckRequest.DESCRIPTOR.file,
                 reflection_pb2.DESCRIPTOR):  # fmt: skip
        add(file)
    return pool


def reflection_servicer() -> aio.ReflectionServicer:
    """grpcio-reflection's servicer over this server's services."""
    return aio.ReflectionServicer(SERVICES, pool=_pool())
