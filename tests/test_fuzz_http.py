"""Hostile input over HTTP, by property: the v2 JSON body, the binary extension, images.

One real server on the shipped models. Each hypothesis test sends its examples to fraud, detector
and detect, and asserts a well-formed answer or a 4xx with a JSON `{"error": ...}` message (never
a 5xx); the ones built to be invalid must get the 4xx. After every test the server must still be
live and ready and give fraud's answer unchanged over HTTP and gRPC.
"""

from __future__ import annotations

import copy
import gzip
import json
import struct
from collections.abc import Iterator

import numpy as np
import pytest
import requests
from conftest import VolleyProcess
from fuzzing import (
    DATATYPES,
    FRAUD_ROW,
    INPUT,
    ITEMSIZE,
    MODELS,
    TIMEOUT,
    VALID_IMAGES,
    assert_http_answer_or_client_error,
    assert_http_client_error,
    encoded_image,
    fraud_body,
    fuzz_settings,
    hostile_images,
    huge_ints,
    impossible_shapes,
    json_scalars,
    json_values,
    png_declaring,
    watchdog_fixtures,
)
from hypothesis import assume, example, given, note
from hypothesis import strategies as st
from PIL import Image
from websockets.sync.client import connect as ws_connect

pytestmark = pytest.mark.timeout(300)

# Per model: a small JSON body (valid for fraud and detect) and the one input it takes.
TEMPLATES = {
    "fraud": fraud_body(),
    "detector": {
        "inputs": [
            {"name": "images", "datatype": "FP32", "shape": [1, 3, 4, 4], "data": [0.5] * 48}
        ]
    },
    "detect": {
        "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 4, 4, 3], "data": [9] * 48}]
    },
}
KNOWN_PARAMETERS = {
    "timeout", "binary_data_output", "binary_data_size", "binary_data", "shared_memory_region",
    "shared_memory_offset", "shared_memory_byte_size", "score_threshold", "iou_threshold",
    "max_detections", "classes", "channel_order", "capture_ts",
}  # fmt: skip
DETECT_PARAMETERS = ("score_threshold", "iou_threshold", "max_detections", "classes",
                     "channel_order", "capture_ts", "timeout")  # fmt: skip
NUMBER_TEXTS = ("inf", "-inf", "nan", "NaN", "1e999", "-1", "0x10", "", " 5 ", "1_0", "½")


baseline, still_serving = watchdog_fixtures("shipped")


@pytest.fixture
def session() -> Iterator[requests.Session]:
    """One keep-alive HTTP session per test."""
    with requests.Session() as s:
        yield s


def infer(
    session: requests.Session,
    proc: VolleyProcess,
    model: str,
    body: bytes,
    headers: dict | None = None,
) -> requests.Response:
    """POST a raw infer body."""
    url = f"{proc.url}/v2/models/{model}/infer"
    return session.post(url, data=body, headers=headers or {}, timeout=TIMEOUT)


def dumps(doc: object) -> bytes:
    """JSON text; the stdlib writes integers of any size (orjson stops at 64 bits)."""
    return json.dumps(doc).encode()


def binary_request(tensors: list[tuple[dict, bytes]], top: dict | None = None) -> tuple[bytes, int]:
    """(body, JSON header length) of a binary-extension request."""
    header = dumps({**(top or {}), "inputs": [t for t, _ in tensors]})
    return header + b"".join(blob for _, blob in tensors), len(header)


def bytes_tensor(items: list[bytes]) -> bytes:
    """BYTES wire format: each element with its 4-byte little-endian length."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


# --- The JSON body ----------------------------------------------------------------------------

names = st.sampled_from(["features", "images", "pixels", ""]) | st.text(max_size=10) | json_values
datatypes = st.sampled_from(DATATYPES) | st.text(max_size=8) | json_values
shapes = (
    st.lists(st.integers(-(2**65), 2**65) | huge_ints | st.integers(0, 20), max_size=40)
    | json_values
)
data_values = json_values | st.lists(json_scalars, max_size=64)
parameter_dicts = st.dictionaries(
    st.sampled_from(sorted(KNOWN_PARAMETERS)) | st.text(max_size=5),
    json_values | huge_ints | st.sampled_from(NUMBER_TEXTS),
    max_size=4,
)
output_lists = json_values | st.lists(
    st.fixed_dictionaries(
        {"name": st.sampled_from(["score", "is_fraud", "detections", "boxes", "x"]) | json_values},
        optional={"parameters": parameter_dicts | json_values},
    ),
    max_size=3,
)


def nested(depth: int) -> list:
    value: list = [0.5]
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def mutated_bodies(draw: st.DrawFn) -> tuple[str, dict | object]:
    """A model and its small template body with one to three fields made hostile."""
    model = draw(st.sampled_from(MODELS))
    body: dict = copy.deepcopy(TEMPLATES[model])
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(body, dict):
            break
        tensors = body.get("inputs")
        tensor = tensors[0] if isinstance(tensors, list) and tensors else {}
        if not isinstance(tensor, dict):
            tensor = {}
        where = draw(
            st.sampled_from(
                ["name", "datatype", "shape", "data", "nested", "tensor_parameters", "drop",
                 "id", "outputs", "parameters", "inputs", "extra_input", "unknown_field", "body"]
            )
        )  # fmt: skip
        if where == "name":
            tensor["name"] = draw(names)
        elif where == "datatype":
            tensor["datatype"] = draw(datatypes)
        elif where == "shape":
            tensor["shape"] = draw(shapes)
        elif where == "data":
            tensor["data"] = draw(data_values)
        elif where == "nested":
            tensor["data"] = nested(draw(st.integers(1, 200)))
        elif where == "tensor_parameters":
            tensor["parameters"] = draw(parameter_dicts | json_values)
        elif where == "drop":
            key = draw(st.sampled_from(["name", "datatype", "shape", "data", "inputs"]))
            (body if key == "inputs" else tensor).pop(key, None)
        elif where == "extra_input":
            extra = copy.deepcopy(tensor) if draw(st.booleans()) else draw(json_values)
            if isinstance(tensors, list):
                tensors.append(extra)
        elif where == "unknown_field":
            (body if draw(st.booleans()) else tensor)[draw(st.text(max_size=6))] = draw(json_values)
        elif where == "body":
            body = draw(json_values)
        else:  # id, outputs, parameters, inputs
            strategy = {"id": json_values, "outputs": output_lists, "inputs": json_values}
            body[where] = draw(strategy.get(where, parameter_dicts | json_values))
    return model, body


@fuzz_settings(max_examples=1000)
@given(case=mutated_bodies())
def test_mutated_json_bodies_get_an_answer_or_a_client_error(
    shipped: VolleyProcess, session: requests.Session, case: tuple[str, object]
) -> None:
    """Wrong, missing and extra fields, anywhere in the body: never a 5xx."""
    model, body = case
    assert_http_answer_or_client_error(infer(session, shipped, model, dumps(body)), model)


@fuzz_settings(max_examples=200)
@given(
    model=st.sampled_from(["fraud", "detect"]),
    rows=st.integers(1, 3),
    count=st.integers(0, 400),
)
def test_wrong_element_counts_are_refused(
    shipped: VolleyProcess, session: requests.Session, model: str, rows: int, count: int
) -> None:
    """`data` with more or fewer elements than the shape holds: 400 naming the count."""
    body = copy.deepcopy(TEMPLATES[model])
    tensor = body["inputs"][0]
    tensor["shape"] = [rows, 17] if model == "fraud" else [rows, 4, 4, 3]
    assume(count != int(np.prod(tensor["shape"])))
    tensor["data"] = [1] * count
    message = assert_http_client_error(infer(session, shipped, model, dumps(body)))
    assert "elements" in message, message


@fuzz_settings(max_examples=300)
@example(model="fraud", shape=[0, 2**62, 2**62], data=[])  # numpy's own error text, once
@given(
    model=st.sampled_from(MODELS),
    shape=impossible_shapes(int64=False),
    data=st.sampled_from([[], [1]]),
)
def test_impossible_shapes_are_refused(
    shipped: VolleyProcess, session: requests.Session, model: str, shape: list[int], data: list
) -> None:
    """Huge, negative and overflowing shapes: 400, as JSON data and as binary data."""
    name, datatype = INPUT[model]
    body = {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}
    assert_http_client_error(infer(session, shipped, model, dumps(body)))
    blob = b"\0" * ITEMSIZE[datatype] * len(data)
    tensor = {"name": name, "datatype": datatype, "shape": shape,
              "parameters": {"binary_data_size": len(blob)}}  # fmt: skip
    raw, length = binary_request([(tensor, blob)])
    headers = {"Inference-Header-Content-Length": str(length)}
    assert_http_client_error(infer(session, shipped, model, raw, headers))


def values_of(datatype: str, count: int) -> st.SearchStrategy[list]:
    """JSON values that the codec accepts as `datatype`."""
    if datatype == "BOOL":
        element = st.booleans()
    elif datatype == "BYTES":
        element = st.text(max_size=4)
    elif datatype.startswith(("FP",)):
        element = st.floats(-1e3, 1e3)
    else:
        element = st.integers(0, 100)
    return st.lists(element, min_size=count, max_size=count)


@fuzz_settings(max_examples=200)
@given(
    model=st.sampled_from(["fraud", "detect"]), datatype=st.sampled_from(DATATYPES), data=st.data()
)
def test_datatypes_other_than_the_models_are_refused(
    shipped: VolleyProcess,
    session: requests.Session,
    model: str,
    datatype: str,
    data: st.DataObject,
) -> None:
    """Values that fit the declared datatype, which is not the model's: 400."""
    name, expected = INPUT[model]
    assume(datatype != expected)
    shape = TEMPLATES[model]["inputs"][0]["shape"]
    values = data.draw(values_of(datatype, int(np.prod(shape))))
    body = {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": values}]}
    message = assert_http_client_error(infer(session, shipped, model, dumps(body)))
    assert "datatype" in message, message


@fuzz_settings(max_examples=200)
@given(
    datatype=st.sampled_from([d for d in DATATYPES if d != "BYTES"]),
    bad=st.lists(
        st.text(max_size=3) | st.none() | st.dictionaries(st.text(max_size=2), st.integers())
        | st.lists(st.integers(), min_size=2, max_size=3),
        min_size=1,
        max_size=17,
    ),
    data=st.data(),
)  # fmt: skip
def test_strings_and_objects_where_numbers_belong_are_refused(
    shipped: VolleyProcess,
    session: requests.Session,
    datatype: str,
    bad: list,
    data: st.DataObject,
) -> None:
    """Strings, nulls, objects or ragged lists among numbers: 400."""
    values: list = [1] * (17 - len(bad))
    for item in bad:
        values.insert(data.draw(st.integers(0, len(values))), item)
    body = {
        "inputs": [{"name": "features", "datatype": datatype, "shape": [1, 17], "data": values}]
    }
    assert_http_client_error(infer(session, shipped, "fraud", dumps(body)))


@fuzz_settings(max_examples=200)
@given(
    top=st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    per_input=st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    per_output=st.dictionaries(st.text(max_size=8), json_values, max_size=3),
)
def test_unknown_parameters_are_ignored(
    shipped: VolleyProcess,
    session: requests.Session,
    baseline: tuple[list, list],
    top: dict,
    per_input: dict,
    per_output: dict,
) -> None:
    """Parameters Volley does not know, at every level, change nothing in fraud's answer."""
    assume(not (set(top) | set(per_input) | set(per_output)) & KNOWN_PARAMETERS)
    body = fraud_body()
    body["parameters"] = top
    body["inputs"][0]["parameters"] = per_input
    body["outputs"] = [{"name": n, "parameters": per_output} for n in ("score", "is_fraud")]
    response = infer(session, shipped, "fraud", dumps(body))
    assert response.status_code == 200, response.text
    assert [(o["name"], o["data"]) for o in response.json()["outputs"]] == baseline[0]


@st.composite
def malformed_texts(draw: st.DrawFn) -> tuple[bytes, dict]:
    """(body, headers): not JSON, not UTF-8, too deep, non-finite or too large numbers."""
    text = dumps(fraud_body())
    kind = draw(st.sampled_from(
        ["random", "truncated", "non_utf8", "non_finite", "deep", "big_number", "gzip"]
    ))  # fmt: skip
    if kind == "random":
        return draw(st.binary(max_size=300)), {}
    if kind == "truncated":
        return text[: draw(st.integers(0, len(text) - 1))], {}
    if kind == "non_utf8":
        bad = draw(
            st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80"])
        )
        return text.replace(b"features", b"feat" + bad + b"ures"), {}
    if kind == "non_finite":
        literal = draw(
            st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"nan", b"1e999", b"-1e400"])
        )
        return text.replace(b"120.5", literal, 1), {}
    if kind == "deep":
        depth = draw(st.integers(2, 5000))
        nested_text = b"[" * depth + b"0.5" + b"]" * depth
        return text.replace(b"[120.5", b"[" + nested_text, 1), {}
    if kind == "big_number":
        # In the shape: past 64 bits orjson reads a float (a finite one in `data` is valid FP32).
        number = b"9" * draw(st.integers(20, 400))
        return text.replace(b"[1, 17]", b"[" + number + b", 17]"), {}
    # Not gzip at all, or gzip of something that is not JSON.
    payload = draw(st.binary(max_size=200))
    return (gzip.compress(payload) if draw(st.booleans()) else payload), {
        "Content-Encoding": "gzip"
    }


@fuzz_settings(max_examples=500)
@given(case=malformed_texts())
def test_malformed_json_is_refused(
    shipped: VolleyProcess, session: requests.Session, case: tuple[bytes, dict]
) -> None:
    """Bodies that are not a valid v2 request in any reading: 400 with a message."""
    body, headers = case
    assert_http_client_error(infer(session, shipped, "fraud", body, headers))


# --- The binary extension ---------------------------------------------------------------------


def valid_binary(model: str, rows: int) -> tuple[dict, bytes]:
    """One binary input tensor that `model` accepts."""
    if model == "fraud":
        blob = np.asarray([FRAUD_ROW] * rows, dtype="<f4").tobytes()
        return {"name": "features", "datatype": "FP32", "shape": [rows, 17]}, blob
    if model == "detector":
        blob = np.zeros((1, 3, 320, 320), dtype="<f4").tobytes()
        return {"name": "images", "datatype": "FP32", "shape": [1, 3, 320, 320]}, blob
    images = [VALID_IMAGES["PNG"]] * rows
    return {"name": "images", "datatype": "BYTES", "shape": [rows]}, bytes_tensor(images)


@st.composite
def broken_framings(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """(model, body, headers) of a binary request with exactly one framing fault."""
    model = draw(st.sampled_from(MODELS))
    tensor, blob = valid_binary(model, draw(st.integers(1, 2)))
    size = len(blob)
    tensor["parameters"] = {"binary_data_size": size}
    trailing = b""
    fault = draw(st.sampled_from(
        ["header_length", "header_text", "size_past_end", "size_short", "size_invalid",
         "not_multiple", "datatype", "both", "trailing", "bytes_prefix"]
    ))  # fmt: skip
    header_override = None
    if fault == "header_length":
        header_override = draw(st.integers(-(2**70), 2**70))
    elif fault == "header_text":
        header_override = draw(st.sampled_from(["abc", "", "1.5", "0x10", "-", "1e3", "NaN"]))
    elif fault == "size_past_end":
        tensor["parameters"]["binary_data_size"] = size + draw(st.integers(1, 2**70))
    elif fault == "size_short":
        tensor["parameters"]["binary_data_size"] = draw(st.integers(0, size - 1))
        trailing = b""  # the rest is then unclaimed or mis-sized: refused either way
    elif fault == "size_invalid":
        tensor["parameters"]["binary_data_size"] = draw(
            st.integers(-(2**70), -1) | st.floats(allow_nan=False) | st.text(max_size=4)
            | st.none().map(lambda _: [size]) | st.booleans()
        )  # fmt: skip
    elif fault == "not_multiple":
        assume(tensor["datatype"] != "BYTES")
        cut = draw(st.integers(1, 3))
        blob = blob[:-cut] if draw(st.booleans()) else blob + b"\0" * cut
        tensor["parameters"]["binary_data_size"] = len(blob)
    elif fault == "datatype":
        other = draw(st.sampled_from([d for d in DATATYPES if d != tensor["datatype"]]))
        tensor["datatype"] = other
    elif fault == "both":
        tensor["data"] = [0]
    elif fault == "trailing":
        trailing = draw(st.binary(min_size=1, max_size=64))
    else:  # BYTES elements whose length prefixes lie
        assume(tensor["datatype"] == "BYTES")
        blob = draw(bad_bytes_tensors(tensor["shape"][0]))
        tensor["parameters"]["binary_data_size"] = len(blob)
    body, length = binary_request([(tensor, blob)])
    body += trailing
    headers = {"Inference-Header-Content-Length": str(length)}
    if header_override is not None:
        assume(header_override != length)
        headers["Inference-Header-Content-Length"] = str(header_override)
    return model, body, headers


@st.composite
def bad_bytes_tensors(draw: st.DrawFn, count: int) -> bytes:
    """BYTES wire data that cannot be `count` elements: lying, cut or missing length prefixes."""
    image = VALID_IMAGES["PNG"]
    kind = draw(st.sampled_from(["too_long", "cut_prefix", "wrong_count", "huge", "random"]))
    if kind == "too_long":
        return struct.pack("<I", len(image) + draw(st.integers(1, 1000))) + image
    if kind == "cut_prefix":
        return bytes_tensor([image] * count) + struct.pack("<I", 7)[: draw(st.integers(1, 3))]
    if kind == "wrong_count":
        other = draw(st.integers(0, 4).filter(lambda n: n != count))
        return bytes_tensor([image] * other)
    if kind == "huge":
        return struct.pack("<I", draw(st.integers(2**31, 2**32 - 1))) + image
    data = draw(st.binary(min_size=1, max_size=64))
    assume(len(data) < 4 or struct.unpack_from("<I", data)[0] + 4 != len(data) or count != 1)
    return data


@fuzz_settings(max_examples=600)
@given(case=broken_framings())
def test_broken_binary_framing_is_refused(
    shipped: VolleyProcess, session: requests.Session, case: tuple[str, bytes, dict[str, str]]
) -> None:
    """Header length, sizes, offsets, datatypes and BYTES prefixes that do not add up: 400."""
    model, body, headers = case
    assert_http_client_error(infer(session, shipped, model, body, headers))


@pytest.mark.parametrize("model", MODELS)
def test_correct_binary_framing_is_served(
    shipped: VolleyProcess, session: requests.Session, model: str
) -> None:
    """The valid requests the framing faults start from are served (the faults are the cause)."""
    tensor, blob = valid_binary(model, 1)
    tensor["parameters"] = {"binary_data_size": len(blob)}
    body, length = binary_request([(tensor, blob)])
    response = infer(
        session, shipped, model, body, {"Inference-Header-Content-Length": str(length)}
    )
    assert response.status_code == 200, response.text
    assert response.json()["model_name"] == model


# --- Images and detect's parameters ---------------------------------------------------------


def detect_images(
    session: requests.Session, proc: VolleyProcess, images: list[bytes], **params
) -> requests.Response:
    """The detect pipeline over the binary extension, images as one BYTES tensor."""
    blob = bytes_tensor(images)
    tensor = {"name": "images", "datatype": "BYTES", "shape": [len(images)],
              "parameters": {"binary_data_size": len(blob)}}  # fmt: skip
    body, length = binary_request([(tensor, blob)], {"parameters": params} if params else None)
    return infer(session, proc, "detect", body, {"Inference-Header-Content-Length": str(length)})


@fuzz_settings(max_examples=600)
@given(image=hostile_images(), position=st.integers(0, 1))
def test_hostile_images_are_refused_naming_the_image(
    shipped: VolleyProcess, session: requests.Session, image: tuple[bytes, bool], position: int
) -> None:
    """Random bytes, truncated or bit-flipped files, lying headers: 400 naming the image (or,
    for a flip that leaves a decodable file, an answer); never a 5xx."""
    data, must_fail = image
    images = [VALID_IMAGES["JPEG"], data] if position else [data]
    response = detect_images(session, shipped, images)
    if must_fail or response.status_code != 200:
        message = assert_http_client_error(response)
        assert f"image {position}" in message, message
    else:
        assert response.json()["model_name"] == "detect"


def test_png_declaring_100000_by_100000_is_refused_from_its_header(
    shipped: VolleyProcess, session: requests.Session
) -> None:
    """A 100-byte file that claims ten gigapixels is refused before any decoding."""
    response = detect_images(session, shipped, [png_declaring(100000, 100000)])
    message = assert_http_client_error(response)
    assert "100000x100000 is 10000000000 pixels, over the limit" in message, message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_rotated_photo_is_served_upright(
    shipped: VolleyProcess, session: requests.Session, fmt: str
) -> None:
    """A phone photo stored 80x40 with EXIF orientation 6 is a valid 40x80 image, not corrupt."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded_image(fmt, width=80, height=40, exif=exif.tobytes())
    response = detect_images(session, shipped, [data])
    assert response.status_code == 200, response.text
    parameters = response.json()["parameters"]
    assert (parameters["image_width"], parameters["image_height"]) == (40, 80)


@fuzz_settings(max_examples=300)
@example(parameters={"max_detections": "inf"})  # int(inf) raised OverflowError: a 500
@example(parameters={"score_threshold": "nan"})
@example(parameters={"classes": "²"})  # isdigit() but not int(): a 500
@given(
    parameters=st.dictionaries(
        st.sampled_from(DETECT_PARAMETERS),
        json_values | huge_ints | st.sampled_from(NUMBER_TEXTS) | st.floats(allow_nan=False),
        min_size=1,
        max_size=3,
    )
)
def test_hostile_detect_parameters_get_an_answer_or_a_client_error(
    shipped: VolleyProcess, session: requests.Session, parameters: dict
) -> None:
    """Thresholds, counts, class filters and channel orders of any JSON value: never a 5xx."""
    response = detect_images(session, shipped, [VALID_IMAGES["PNG"]], **parameters)
    assert_http_answer_or_client_error(response, "detect")


# --- Camera frames over the WebSocket ---------------------------------------------------------

RESET = {"score_threshold": 0.3, "iou_threshold": 0.5, "max_detections": 100, "classes": "",
         "channel_order": "rgb", "timeout": 0}  # fmt: skip
ws_parameters = st.dictionaries(
    st.sampled_from(DETECT_PARAMETERS) | st.text(max_size=4),
    st.text(max_size=6) | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.booleans()
    | st.sampled_from(NUMBER_TEXTS),
    max_size=3,
)  # fmt: skip


@st.composite
def ws_messages(draw: st.DrawFn) -> list[tuple[str, object]]:
    """("frame", bytes, must_fail) or ("header", dict) or ("bad_text", str) messages."""
    messages: list = []
    for i in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["frame", "frame", "header", "bad_text"]))
        if kind == "frame":
            data, must_fail = draw(hostile_images())
            messages.append(("frame", data, must_fail))
        elif kind == "header":
            header = {"id": f"h{i}", "parameters": draw(ws_parameters)}
            if draw(st.booleans()):
                header["capture_ts"] = draw(
                    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5)
                )
            messages.append(("header", header))
        else:
            text = draw(
                st.text(max_size=20).filter(lambda t: not t.strip().startswith("{"))
                | st.sampled_from(['{"id": [1]}', '{"nope": 1}', '{"parameters": {"a": [1]}}',
                                   '{"capture_ts": {}}', "[]", "null", '{"id": 1.5}'])
            )  # fmt: skip
            messages.append(("bad_text", text))
    return messages


@fuzz_settings(max_examples=60)
@given(messages=ws_messages())
def test_hostile_websocket_frames_each_get_one_answer(
    shipped: VolleyProcess, messages: list[tuple]
) -> None:
    """Random and broken frames, hostile parameters and bad text messages on the camera socket:
    one JSON answer per frame (detections, skipped, or an error naming it), one error per bad
    text message, and a good frame after them all is still answered."""
    note(f"messages: {[m[:2] if m[0] != 'frame' else (m[0], m[1][:40], m[2]) for m in messages]}")
    expected_errors_without_id = 0
    frames: dict[str, bool] = {}
    with ws_connect(f"ws://{shipped.http}/v2/models/detect/stream", max_size=None) as ws:
        count = 0
        pending_id: str | None = None
        for message in messages:
            if message[0] == "frame":
                count += 1
                frames[pending_id or str(count)] = message[2]
                pending_id = None
                ws.send(message[1])
            elif message[0] == "header":
                pending_id = message[1]["id"]
                ws.send(json.dumps(message[1]))
            else:  # refused, and it replaces the header before it
                expected_errors_without_id += 1
                pending_id = None
                ws.send(message[1])
        ws.send(json.dumps({"id": "last", "parameters": RESET}))
        ws.send(VALID_IMAGES["JPEG"])
        answers: dict[str, dict] = {}
        anonymous = 0
        while "last" not in answers:
            doc = json.loads(ws.recv(timeout=TIMEOUT))
            if doc["id"] is None:
                assert doc["error"], doc
                anonymous += 1
                continue
            assert doc["id"] not in answers, doc
            answers[doc["id"]] = doc
    assert anonymous == expected_errors_without_id
    assert set(answers) == {*frames, "last"}, (answers, frames)
    for frame_id, must_fail in frames.items():
        doc = answers[frame_id]
        if "error" in doc:
            assert doc["error"].startswith(f"frame '{frame_id}': "), doc
        else:
            assert doc.get("skipped") or not must_fail, doc
    # Skipped only if the box is so loaded that the frame aged past max_frame_age_ms.
    assert "detections" in answers["last"] or answers["last"].get("skipped"), answers["last"]
