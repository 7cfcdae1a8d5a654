"""gRPC server reflection: what grpcurl, grpcui and Postman do without .proto files (list the
services, fetch their descriptors, build requests from them and call), done here with
grpcio-reflection's client-side descriptor database against a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import onnx_models
import pytest
from conftest import VolleyProcess, serving
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICES = ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
            "inference.GRPCInferenceService"]  # fmt: skip
KEY = "reflection-test-key-0123456789"
TIMEOUT = 30


@pytest.fixture(scope="module")
def channel(shipped: VolleyProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(shipped.grpc) as channel:
        yield channel


def reflected_call(channel: grpc.Channel, pool: descriptor_pool.DescriptorPool, path: str):
    """A unary call whose messages come from the reflected descriptors, as grpcurl makes it."""
    service, method = path.strip("/").rsplit("/", 1)
    found = pool.FindServiceByName(service).methods_by_name[method]
    request = message_factory.GetMessageClass(found.input_type)
    response = message_factory.GetMessageClass(found.output_type)
    call = channel.unary_unary(path, request_serializer=request.SerializeToString,
                               response_deserializer=response.FromString)  # fmt: skip
    return lambda text: json_format.MessageToDict(
        call(json_format.Parse(text, request()), timeout=TIMEOUT)
    )


def test_services_are_listed_described_and_callable(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    assert sorted(database.get_services()) == SERVICES
    pool = descriptor_pool.DescriptorPool(database)
    inference = pool.FindServiceByName("inference.GRPCInferenceService")
    assert {"ModelInfer", "ModelStreamInfer", "RepositoryModelLoad"} <= set(
        inference.methods_by_name
    )
    config = pool.FindMessageTypeByName("inference.ModelConfig")  # model_config.proto, imported
    assert "dynamic_batching" in config.fields_by_name
    metadata = reflected_call(channel, pool, "/inference.GRPCInferenceService/ModelMetadata")
    got = metadata('{"name": "fraud"}')
    assert got["name"] == "fraud" and got["inputs"][0]["name"] == "features"
    health = reflected_call(channel, pool, "/grpc.health.v1.Health/Check")
    assert health("{}") == {"status": "SERVING"}


def test_an_unknown_symbol_or_file_is_not_found(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    asked = [
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Thing"),
        reflection_pb2.ServerReflectionRequest(file_by_filename="no/such.proto"),
        reflection_pb2.ServerReflectionRequest(list_services=""),
    ]
    answers = list(stub.ServerReflectionInfo(iter(asked), timeout=TIMEOUT))
    assert [a.WhichOneof("message_response") for a in answers] == [
        "error_response", "error_response", "list_services_response"
    ]  # fmt: skip
    assert answers[0].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_the_v1_service_name_answers_too(channel: grpc.Channel) -> None:
    """grpcurl asks grpc.reflection.v1 first (its messages are v1alpha's, field for field)."""
    info = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    asked = reflection_pb2.ServerReflectionRequest(list_services="")
    (answer,) = info(iter([asked]), timeout=TIMEOUT)
    names = {service.name for service in answer.list_services_response.service}
    assert "inference.GRPCInferenceService" in names


def test_a_malformed_request_ends_the_stream_with_invalid_argument(channel: grpc.Channel) -> None:
    info = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=lambda raw: raw,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    valid = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    answers = info(iter([valid, b"\x3a\x09short"]), timeout=TIMEOUT)  # a length past the end
    first = next(answers)
    assert first.WhichOneof("message_response") == "list_services_response"
    with pytest.raises(grpc.RpcError) as ended:
        next(answers)
    assert ended.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_with_api_keys_reflection_needs_an_infer_key(tmp_path: Path) -> None:
    onnx_models.mlp(tmp_path / "models" / "mlp" / "1" / "model.onnx", hidden=16)
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys:\n  - {{name: dev, key: {KEY}, scope: infer}}\n")
    flags = ("--api-keys", str(keys), "--workers", "1")
    with serving(tmp_path / "models", *flags) as proc, grpc.insecure_channel(proc.grpc) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        asked = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.ServerReflectionInfo(iter([asked]), timeout=TIMEOUT))
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", f"Bearer {KEY}"),)
        (answer,) = stub.ServerReflectionInfo(iter([asked]), metadata=metadata)
    names = sorted(s.name for s in answer.list_services_response.service)
    assert names == SERVICES
