"""Hostile input over gRPC: undecodable and oversized messages, inconsistent requests, images.

One real server on the shipped models with `--max-request-bytes` at 2 MiB. Raw channels send
exactly the bytes a test builds. Each case must end in INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED or (shared memory) UNIMPLEMENTED with a message, or on ModelStreamInfer in
one answer per request (an answer or an `error_message`); never INTERNAL or UNKNOWN. After every
test the server must still be live and ready and give fraud's answer unchanged.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import VolleyProcess, copy_shipped_models, serving
from fuzzing import (
    DATATYPES,
    INPUT,
    ITEMSIZE,
    MODELS,
    TIMEOUT,
    VALID_IMAGES,
    assert_grpc_client_error,
    fraud_request_pb,
    fuzz_settings,
    hostile_images,
    impossible_shapes,
    watchdog_fixtures,
)
from hypothesis import assume, example, given, note
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from tritonclient.grpc import service_pb2 as pb

pytestmark = pytest.mark.timeout(300)

MAX_MESSAGE_BYTES = 2 * 1024 * 1024
SERVICE = "/inference.GRPCInferenceService/"
CONTENTS_FIELDS = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=16),
}
PARAMETER_KEYS = (
    "timeout", "score_threshold", "iou_threshold", "max_detections", "classes", "channel_order",
    "capture_ts", "binary_data_output", "shared_memory_region",
)  # fmt: skip


@pytest.fixture(scope="module")
def volley(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VolleyProcess]:
    """The shipped models served with a 2 MiB message limit."""
    repository: Path = copy_shipped_models(tmp_path_factory.mktemp("fuzz-grpc"))
    with serving(repository, "--max-request-bytes", str(MAX_MESSAGE_BYTES)) as proc:
        yield proc


baseline, still_serving = watchdog_fixtures("volley")


@pytest.fixture(scope="module")
def channel(volley: VolleyProcess) -> Iterator[grpc.Channel]:
    """One channel for the module's raw calls."""
    with grpc.insecure_channel(volley.grpc) as ch:
        yield ch


def show(text: str) -> None:
    """Print `text` with a falsifying example (protobuf messages have no useful repr)."""
    with contextlib.suppress(InvalidArgument):  # not inside a hypothesis test
        note(text)


def unary(channel: grpc.Channel, payload: bytes, method: str = "ModelInfer") -> bytes:
    """Send raw bytes to a unary method; the raw response bytes."""
    call = channel.unary_unary(
        SERVICE + method, request_serializer=None, response_deserializer=None
    )
    return call(payload, timeout=TIMEOUT)


def infer(channel: grpc.Channel, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """ModelInfer with a message built by the test."""
    show(f"request: {request}")
    return pb.ModelInferResponse.FromString(unary(channel, request.SerializeToString()))


def assert_refused(channel: grpc.Channel, request: pb.ModelInferRequest) -> str:
    """ModelInfer must fail with a client-error code and a message; returns the message."""
    with pytest.raises(grpc.RpcError) as caught:
        infer(channel, request)
    return assert_grpc_client_error(caught.value)


def assert_answer_or_refused(channel: grpc.Channel, request: pb.ModelInferRequest) -> None:
    """ModelInfer answers with outputs of the model asked, or fails as a client error."""
    try:
        response = infer(channel, request)
    except grpc.RpcError as error:
        assert_grpc_client_error(error)
        return
    assert response.model_name == request.model_name
    assert len(response.outputs) == len(response.raw_output_contents) > 0


def stream(channel: grpc.Channel, payloads: list[bytes]) -> list[pb.ModelStreamInferResponse]:
    """Send raw messages on one ModelStreamInfer call; every answer until it ends."""
    call = channel.stream_stream(
        SERVICE + "ModelStreamInfer",
        request_serializer=None,
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    show(f"stream of {len(payloads)} messages: {payloads}")
    return list(call(iter(payloads), timeout=TIMEOUT))


def assert_one_answer_each(
    answers: list[pb.ModelStreamInferResponse], requests: list[pb.ModelInferRequest]
) -> dict[str, pb.ModelStreamInferResponse]:
    """Every request got exactly one answer with its id: outputs, a skipped frame, or an error
    message that is the client's (never an internal error)."""
    by_id = {a.infer_response.id: a for a in answers}
    assert len(answers) == len(requests) == len(by_id), [a.infer_response.id for a in answers]
    assert set(by_id) == {r.id for r in requests}
    for answer in answers:
        response = answer.infer_response
        if answer.error_message:
            assert "internal error" not in answer.error_message.lower(), answer.error_message
        else:
            skipped = (
                response.parameters["skipped"].bool_param
                if "skipped" in response.parameters
                else False
            )
            assert skipped or len(response.outputs) == len(response.raw_output_contents) > 0, answer
    return by_id


# --- Requests built field by field -------------------------------------------------------------


@st.composite
def infer_parameters(draw: st.DrawFn) -> pb.InferParameter:
    """An InferParameter holding any value of any of its kinds, or none."""
    param = pb.InferParameter()
    kind = draw(st.sampled_from(["bool", "int64", "uint64", "double", "string", "unset"]))
    if kind == "bool":
        param.bool_param = draw(st.booleans())
    elif kind == "int64":
        param.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    elif kind == "uint64":
        param.uint64_param = draw(st.integers(0, 2**64 - 1))
    elif kind == "double":
        param.double_param = draw(st.floats())
    elif kind == "string":
        param.string_param = draw(
            st.sampled_from(["inf", "nan", "-1", "rgb", "bgr", "3,7"]) | st.text(max_size=8)
        )
    return param


parameter_maps = st.dictionaries(
    st.sampled_from(PARAMETER_KEYS) | st.text(max_size=6), infer_parameters(), max_size=3
)
dims = (
    st.integers(0, 20)
    | st.sampled_from([17, 3, 320, 2**31, 2**62, 2**63 - 1])
    | st.integers(-(2**63), 2**63 - 1)
)


def template(model: str) -> pb.ModelInferRequest:
    """A small request for `model` (valid for fraud and detect)."""
    if model == "fraud":
        return fraud_request_pb()
    request = pb.ModelInferRequest(model_name=model)
    name, datatype = INPUT[model]
    shape = [1, 4, 4, 3] if model == "detect" else [1, 3, 4, 4]
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(bytes(48 * ITEMSIZE[datatype]))
    return request


@st.composite
def mutated_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A model's template request with one to three fields made inconsistent."""
    model = draw(st.sampled_from(MODELS))
    request = template(model)
    for _ in range(draw(st.integers(1, 3))):
        tensor = request.inputs[0] if request.inputs else request.inputs.add()
        where = draw(st.sampled_from(
            ["model", "version", "name", "datatype", "shape", "raw", "contents", "input_parameters",
             "parameters", "outputs", "extra_input", "no_inputs"]
        ))  # fmt: skip
        if where == "model":
            request.model_name = draw(st.sampled_from(MODELS) | st.text(max_size=8))
        elif where == "version":
            request.model_version = draw(
                st.sampled_from(["1", "2", "0", "-1", "1e3", "99999999999999999999"])
                | st.text(max_size=4)
            )
        elif where == "name":
            tensor.name = draw(
                st.sampled_from(["features", "images", "pixels", ""]) | st.text(max_size=8)
            )
        elif where == "datatype":
            tensor.datatype = draw(st.sampled_from(DATATYPES) | st.text(max_size=6))
        elif where == "shape":
            tensor.ClearField("shape")
            tensor.shape.extend(draw(st.lists(dims, max_size=8)))
        elif where == "raw":
            blobs = draw(st.lists(st.binary(max_size=300), max_size=3))
            request.ClearField("raw_input_contents")
            request.raw_input_contents.extend(blobs)
        elif where == "contents":
            field = draw(st.sampled_from(sorted(CONTENTS_FIELDS)))
            getattr(tensor.contents, field).extend(
                draw(st.lists(CONTENTS_FIELDS[field], max_size=64))
            )
        elif where == "input_parameters":
            for key, value in draw(parameter_maps).items():
                tensor.parameters[key].CopyFrom(value)
        elif where == "parameters":
            for key, value in draw(parameter_maps).items():
                request.parameters[key].CopyFrom(value)
        elif where == "outputs":
            for name in draw(
                st.lists(
                    st.sampled_from(["score", "is_fraud", "detections", "boxes"])
                    | st.text(max_size=6),
                    max_size=3,
                )
            ):
                request.outputs.add(name=name)
        elif where == "extra_input":
            extra = request.inputs.add()
            extra.CopyFrom(tensor)
            if draw(st.booleans()):
                request.raw_input_contents.append(draw(st.binary(max_size=100)))
        else:
            request.ClearField("inputs")
    return request


@fuzz_settings(max_examples=600)
@example(request=template("detect"))
@given(request=mutated_requests())
def test_inconsistent_requests_get_an_answer_or_a_client_error(
    channel: grpc.Channel, request: pb.ModelInferRequest
) -> None:
    """Well-formed protobuf whose fields disagree with each other or the model: never INTERNAL."""
    assert_answer_or_refused(channel, request)


def with_parameter(
    request: pb.ModelInferRequest, key: str, **value: object
) -> pb.ModelInferRequest:
    request.parameters[key].CopyFrom(pb.InferParameter(**value))
    return request


@pytest.mark.parametrize(
    "request_",
    [
        # The echoed capture_ts was put in int64_param: out of range, an INTERNAL error.
        with_parameter(template("detect"), "capture_ts", uint64_param=2**64 - 1),
        with_parameter(template("detect"), "capture_ts"),  # set, but holding no value
        with_parameter(template("detect"), "capture_ts", double_param=float("nan")),
        # int(inf) raised OverflowError: an INTERNAL error.
        with_parameter(template("detect"), "max_detections", double_param=float("inf")),
        with_parameter(template("detect"), "max_detections", string_param="inf"),
        with_parameter(template("fraud"), "timeout", uint64_param=2**64 - 1),
    ],
    ids=["capture_ts_uint64", "capture_ts_unset", "capture_ts_nan", "max_detections_inf",
         "max_detections_inf_text", "timeout_uint64"],
)  # fmt: skip
def test_parameters_at_the_edges_of_their_kinds(
    channel: grpc.Channel, request_: pb.ModelInferRequest
) -> None:
    """Parameters past int64, non-finite, or unset: an answer or a client error, not INTERNAL."""
    assert_answer_or_refused(channel, request_)


@fuzz_settings(max_examples=200)
@example(model="fraud", shape=[0, 2**62, 2**62], raw=True)  # numpy's ValueError: UNKNOWN
@example(model="detect", shape=[0, 2**62, 2**62], raw=False)
@given(model=st.sampled_from(MODELS), shape=impossible_shapes(int64=True), raw=st.booleans())
def test_impossible_shapes_are_refused(
    channel: grpc.Channel, model: str, shape: list[int], raw: bool
) -> None:
    """Negative, too many, or overflowing dimensions: INVALID_ARGUMENT, raw or typed contents."""
    name, datatype = INPUT[model]
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw:
        request.raw_input_contents.append(b"")
    code_message = assert_refused(channel, request)
    assert "shape" in code_message or "dimensions" in code_message, code_message


@fuzz_settings(max_examples=200)
@given(
    rows=st.integers(1, 4),
    sizes=st.lists(st.integers(0, 400), min_size=0, max_size=3),
    typed=st.booleans(),
)
def test_raw_contents_that_do_not_fit_are_refused(
    channel: grpc.Channel, rows: int, sizes: list[int], typed: bool
) -> None:
    """raw_input_contents of the wrong count or size (or beside typed contents): refused."""
    request = pb.ModelInferRequest(model_name="fraud")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[rows, 17])
    right = rows * 17 * 4
    assume(sizes != [right] or typed)
    request.raw_input_contents.extend(bytes(size) for size in sizes)
    if typed:
        tensor.contents.fp32_contents.extend([0.5] * rows * 17)
        assume(sizes)  # typed contents alone, of the right count, are valid
    assert_refused(channel, request)


def raw_for(datatype: str, count: int) -> bytes:
    """Wire bytes of `count` elements of `datatype`."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", 1) + b"x" for _ in range(count))
    return bytes(count * ITEMSIZE[datatype])


@fuzz_settings(max_examples=200)
@given(
    model=st.sampled_from(["fraud", "detect"]),
    datatype=st.sampled_from(DATATYPES) | st.text(max_size=6),
    typed=st.booleans(),
)
def test_datatypes_other_than_the_models_are_refused(
    channel: grpc.Channel, model: str, datatype: str, typed: bool
) -> None:
    """Contents that fit the declared datatype, which is not the model's (or not one at all)."""
    name, expected = INPUT[model]
    assume(datatype != expected)
    request = template(model)
    request.inputs[0].datatype = datatype
    request.ClearField("raw_input_contents")
    count = int(np.prod(request.inputs[0].shape))
    field = {"FP32": "fp32_contents", "BYTES": "bytes_contents", "BOOL": "bool_contents"}.get(
        datatype
    )
    if typed and field:
        getattr(request.inputs[0].contents, field).extend(
            [b"x" if field == "bytes_contents" else 1] * count
        )
    else:
        request.raw_input_contents.append(
            raw_for(datatype, count) if datatype in DATATYPES else b""
        )
    assert "datatype" in assert_refused(channel, request)


@fuzz_settings(max_examples=200)
@given(
    field=st.sampled_from(sorted(CONTENTS_FIELDS)),
    count=st.integers(0, 40),
    data=st.data(),
)
def test_typed_contents_in_the_wrong_field_or_count_are_refused(
    channel: grpc.Channel, field: str, count: int, data: st.DataObject
) -> None:
    """fraud's FP32 input with typed contents of another field, or not 17 of them."""
    assume(field != "fp32_contents" or count != 17)
    request = pb.ModelInferRequest(model_name="fraud")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[1, 17])
    values = data.draw(st.lists(CONTENTS_FIELDS[field], min_size=count, max_size=count))
    getattr(tensor.contents, field).extend(values)
    assert_refused(channel, request)


# --- Streams -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["²", "①"])
def test_versions_that_are_digits_but_not_numbers_are_refused(
    channel: grpc.Channel, version: str
) -> None:
    """model_version '²': INVALID_ARGUMENT or NOT_FOUND, as any other bad version."""
    request = fraud_request_pb()
    request.model_version = version
    assert_refused(channel, request)


def huge_shape_request() -> pb.ModelInferRequest:
    """A shape numpy cannot reshape to: its ValueError once ended the stream silently."""
    request = pb.ModelInferRequest(model_name="fraud")
    request.inputs.add(name="features", datatype="FP32", shape=[0, 2**62, 2**62])
    request.raw_input_contents.append(b"")
    return request


@fuzz_settings(max_examples=150)
@example(requests=[fraud_request_pb(), huge_shape_request(), fraud_request_pb()])
@given(requests=st.lists(mutated_requests(), min_size=1, max_size=5))
def test_a_stream_answers_each_inconsistent_request_once(
    channel: grpc.Channel, requests: list[pb.ModelInferRequest]
) -> None:
    """On ModelStreamInfer every request gets one answer with its id, and the stream goes on:
    a valid fraud request sent last is answered."""
    for i, request in enumerate(requests):
        request.id = f"r{i}"
    last = fraud_request_pb("last")
    answers = stream(channel, [r.SerializeToString() for r in [*requests, last]])
    by_id = assert_one_answer_each(answers, [*requests, last])
    assert not by_id["last"].error_message and len(by_id["last"].infer_response.outputs) == 2


# --- Bytes that are not a ModelInferRequest, and messages over the size limit --------------------


@st.composite
def undecodable(draw: st.DrawFn) -> bytes:
    """Bytes that protobuf cannot parse as a ModelInferRequest."""
    valid = fraud_request_pb().SerializeToString()
    kind = draw(st.sampled_from(["random", "truncated", "appended"]))
    if kind == "random":
        data = draw(st.binary(min_size=1, max_size=512))
    elif kind == "truncated":
        data = valid[: draw(st.integers(1, len(valid) - 1))]
    else:
        data = valid + draw(st.binary(min_size=1, max_size=32))
    try:
        pb.ModelInferRequest.FromString(data)
    except Exception:  # DecodeError (or a RuntimeWarning-free variant of it)
        return data
    assume(False)
    return data


@fuzz_settings(max_examples=50)
@example(payload=b"\xff\xff\xff", method="ModelInfer")
@given(
    payload=undecodable(),
    method=st.sampled_from(["ModelInfer", "ModelMetadata", "ModelConfig", "RepositoryModelLoad"]),
)
def test_undecodable_messages_get_invalid_argument(
    channel: grpc.Channel, payload: bytes, method: str
) -> None:
    """Bytes that are no protobuf message: INVALID_ARGUMENT with a message."""
    with pytest.raises(grpc.RpcError) as caught:
        unary(channel, payload, method)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, caught.value


def test_an_undecodable_message_on_a_stream_is_refused_after_answering_the_rest(
    channel: grpc.Channel,
) -> None:
    """The request before the garbage is answered; the stream then ends INVALID_ARGUMENT."""
    call = channel.stream_stream(
        SERVICE + "ModelStreamInfer",
        request_serializer=None,
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    answers = []
    with pytest.raises(grpc.RpcError) as caught:
        for answer in call(
            iter([fraud_request_pb("a").SerializeToString(), b"\xff\xff\xff"]), timeout=TIMEOUT
        ):
            answers.append(answer)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert [a.infer_response.id for a in answers] == ["a"]


def oversized(request_id: str = "") -> pb.ModelInferRequest:
    request = fraud_request_pb(request_id)
    request.raw_input_contents[0] = bytes(MAX_MESSAGE_BYTES + 1024)
    return request


def test_oversized_message_is_refused_with_resource_exhausted(channel: grpc.Channel) -> None:
    """A message past --max-request-bytes: RESOURCE_EXHAUSTED, unary and on a stream."""
    message = assert_refused(channel, oversized())
    assert "larger than max" in message, message
    with pytest.raises(grpc.RpcError) as caught:
        stream(
            channel, [fraud_request_pb("a").SerializeToString(), oversized("b").SerializeToString()]
        )
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value


def test_message_just_under_the_limit_is_decoded(channel: grpc.Channel) -> None:
    """The limit is the cause: a message just under it gets the codec's own size error."""
    request = fraud_request_pb()
    request.raw_input_contents[0] = bytes(MAX_MESSAGE_BYTES - 1024)
    assert "expected 68 bytes" in assert_refused(channel, request)


# --- Images ------------------------------------------------------------------------------------


def detect_request(images: list[bytes], request_id: str = "") -> pb.ModelInferRequest:
    """detect with its `images` input as one raw BYTES tensor."""
    request = pb.ModelInferRequest(model_name="detect", id=request_id)
    request.inputs.add(name="images", datatype="BYTES", shape=[len(images)])
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(i)) + i for i in images))
    return request


@fuzz_settings(max_examples=300)
@given(image=hostile_images(), position=st.integers(0, 1))
def test_hostile_images_are_refused_naming_the_image(
    channel: grpc.Channel, image: tuple[bytes, bool], position: int
) -> None:
    """Random, truncated, bit-flipped, lying images: INVALID_ARGUMENT naming the image (or an
    answer, for a flip that leaves a decodable file)."""
    data, must_fail = image
    request = detect_request([VALID_IMAGES["PNG"], data] if position else [data])
    try:
        response = infer(channel, request)
    except grpc.RpcError as error:
        message = assert_grpc_client_error(error)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and f"image {position}" in message
        return
    assert not must_fail, response
    assert len(response.outputs) == 5


@fuzz_settings(max_examples=80)
@given(images=st.lists(hostile_images(), min_size=1, max_size=4))
def test_hostile_camera_frames_each_get_one_answer(
    channel: grpc.Channel, images: list[tuple[bytes, bool]]
) -> None:
    """Frames to detect on a stream (latest-frame-wins): one answer per frame, a refused frame
    named in `error_message`, and a good frame after them still answered."""
    frames = [detect_request([data], f"f{i}") for i, (data, _) in enumerate(images)]
    last = detect_request([VALID_IMAGES["JPEG"]], "last")
    answers = stream(channel, [f.SerializeToString() for f in [*frames, last]])
    by_id = assert_one_answer_each(answers, [*frames, last])
    for frame, (_, must_fail) in zip(frames, images, strict=True):
        answer = by_id[frame.id]
        if answer.error_message:
            assert answer.error_message.startswith(f"frame '{frame.id}': image 0: "), answer
        else:
            assert not must_fail or "skipped" in answer.infer_response.parameters, answer
    assert not by_id["last"].error_message
