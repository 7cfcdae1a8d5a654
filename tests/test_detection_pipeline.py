"""The shipped `detect` pipeline over the shipped detector: images in, boxes in original pixels."""

from __future__ import annotations

import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import VolleyProcess
from metrics_scrape import scrape, total
from tritonclient.utils import InferenceServerException
from vision_scenes import SceneImage, encode, matched_fraction, scene_image

# (crop width, crop height) of a 320x320 scene, then a scale: several sizes and aspect ratios
SHAPES = [((320, 240), 2.0), ((240, 320), 1.5), ((320, 320), 1.0), ((200, 300), 3.1),
          ((320, 180), 4.0)]  # fmt: skip
MATCHED_FLOOR = 0.85  # share of objects found at IoU >= 0.5; about 0.93 measured


@pytest.fixture(scope="module")
def scenes() -> list[SceneImage]:
    return [scene_image(seed, crop, scale) for seed in range(4) for crop, scale in SHAPES]


def http_detect(proc: VolleyProcess, blobs: list[bytes], **params) -> httpclient.InferResult:
    client = httpclient.InferenceServerClient(proc.http)
    tensor = httpclient.InferInput("images", [len(blobs)], "BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    try:
        return client.infer("detect", [tensor], parameters=params or None)
    finally:
        client.close()


def per_image(result) -> list[tuple[np.ndarray, np.ndarray]]:
    counts = result.as_numpy("num_detections")
    boxes, ids = result.as_numpy("boxes"), result.as_numpy("class_ids")
    return [(boxes[i, :n], ids[i, :n]) for i, n in enumerate(counts)]


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".bmp"])
def test_boxes_match_ground_truth_in_original_pixels_over_http(
    shipped: VolleyProcess, scenes: list[SceneImage], ext: str
) -> None:
    result = http_detect(shipped, [encode(s.image, ext) for s in scenes])
    found = per_image(result)
    assert len(found) == len(scenes)
    fractions = [matched_fraction(s, b, c) for s, (b, c) in zip(scenes, found, strict=True)]
    weights = [len(s.boxes) for s in scenes]
    assert sum(weights) > 50
    assert np.average(fractions, weights=weights) >= MATCHED_FLOOR, fractions
    names = result.as_numpy("class_names")
    ids = result.as_numpy("class_ids")
    assert all(
        n.decode() == str(i) for n, i in zip(names.ravel(), ids.ravel(), strict=True) if i >= 0
    )


def test_boxes_match_ground_truth_over_grpc_one_image_per_request(
    shipped: VolleyProcess, scenes: list[SceneImage]
) -> None:
    client = grpcclient.InferenceServerClient(shipped.grpc)
    fractions, weights = [], []
    for scene in scenes:
        tensor = grpcclient.InferInput("images", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([encode(scene.image)], dtype=np.object_))
        result = client.infer("detect", [tensor], parameters={"capture_ts": "cam-7"})
        ((boxes, ids),) = per_image(result)
        assert np.all(boxes[:, 2] <= scene.width) and np.all(boxes[:, 3] <= scene.height)
        fractions.append(matched_fraction(scene, boxes, ids))
        weights.append(len(scene.boxes))
        params = result.get_response().parameters
        assert params["capture_ts"].string_param == "cam-7"
        assert params["image_width"].int64_param == scene.width
        for key in ("decode_us", "queue_us", "inference_us", "nms_us", "total_us"):
            assert params[key].int64_param >= 0, key
        assert params["total_us"].int64_param >= params["inference_us"].int64_param
    client.close()
    assert np.average(fractions, weights=weights) >= MATCHED_FLOOR, fractions


def test_raw_pixels_answer_like_the_same_image_encoded(shipped: VolleyProcess) -> None:
    scene = scene_image(11, (320, 240), 2.0)
    encoded = per_image(http_detect(shipped, [encode(scene.image, ".png")]))[0]
    client = httpclient.InferenceServerClient(shipped.http)
    for order, pixels in [("rgb", scene.image), ("bgr", scene.image[..., ::-1])]:
        tensor = httpclient.InferInput("pixels", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(np.ascontiguousarray(pixels), binary_data=True)
        result = client.infer("detect", [tensor], parameters={"channel_order": order})
        raw = per_image(result)[0]
        np.testing.assert_allclose(raw[0], encoded[0], atol=1e-3)
        assert raw[1].tolist() == encoded[1].tolist()
    client.close()


def test_concurrent_requests_share_detector_batches(shipped: VolleyProcess) -> None:
    blob = encode(scene_image(3, (320, 240), 2.0).image)
    before = requests.get(f"{shipped.url}/v2/models/detector/stats", timeout=5).json()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: http_detect(shipped, [blob]), range(64)))
    after = requests.get(f"{shipped.url}/v2/models/detector/stats", timeout=5).json()
    rows = after["model_stats"][0]["inference_count"] - before["model_stats"][0]["inference_count"]
    runs = after["model_stats"][0]["execution_count"] - before["model_stats"][0]["execution_count"]
    assert rows == 64
    assert runs < rows, "64 concurrent one-image requests never shared a detector batch"


def test_detect_has_metadata_config_stats_and_stage_metrics(shipped: VolleyProcess) -> None:
    http_detect(shipped, [encode(scene_image(5).image)] * 3)
    client = httpclient.InferenceServerClient(shipped.http)
    meta = client.get_model_metadata("detect")
    assert meta["platform"] == "volley_detection"
    assert [i["name"] for i in meta["inputs"]] == ["images", "pixels"]
    config = client.get_model_config("detect")
    assert config["parameters"]["detector"]["string_value"] == "detector"
    assert all(i["optional"] for i in config["input"])
    stats = client.get_inference_statistics("detect")["model_stats"][0]
    assert stats["inference_count"] >= 3
    for stage in ("compute_input", "compute_infer", "compute_output", "success"):
        assert stats["inference_stats"][stage]["count"] >= 1, stage
        assert stats["inference_stats"][stage]["ns"] > 0, stage
    client.close()
    samples = scrape(f"http://127.0.0.1:{shipped.metrics_port}/metrics")
    for stage in ("decode", "inference", "nms"):
        count = total(samples, "volley_pipeline_stage_duration_seconds_count", model="detect",
                      stage=stage)  # fmt: skip
        assert count >= 1, stage


def png_declaring(width: int, height: int) -> bytes:
    """A real PNG whose header is rewritten (with a valid CRC) to declare another size."""
    data = bytearray(encode(np.zeros((4, 4, 3), np.uint8), ".png"))
    ihdr = bytes(data[12:29])  # b"IHDR" + 13 bytes
    patched = b"IHDR" + struct.pack(">II", width, height) + ihdr[12:]
    data[12:29] = patched
    data[29:33] = struct.pack(">I", zlib.crc32(patched))
    return bytes(data)


def gif_bytes() -> bytes:
    ok, buf = cv2.imencode(".gif", np.zeros((8, 8, 3), np.uint8))
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda jpg: jpg[: len(jpg) // 2], "image 1: the image data is truncated or corrupt"),
        (lambda jpg: b"definitely not an image", "image 1: not a JPEG, PNG, WebP or BMP image"),
        (lambda jpg: b"", "image 1: empty (0 bytes)"),
        (lambda jpg: png_declaring(100_000, 100_000), "image 1: 100000x100000 is 10000000000"),
        (lambda jpg: png_declaring(0, 16), "image 1: "),
        (lambda jpg: gif_bytes(), "image 1: GIF images are not supported"),
    ],
)
def test_bad_images_get_a_clear_error_naming_the_image(
    shipped: VolleyProcess, bad, message: str
) -> None:
    good = encode(scene_image(2, (320, 240), 2.0).image)
    for protocol in ("http", "grpc"):
        if protocol == "http":
            with pytest.raises(InferenceServerException) as caught:
                http_detect(shipped, [good, bad(good)])
            assert caught.value.status() == "400"
        else:
            client = grpcclient.InferenceServerClient(shipped.grpc)
            tensor = grpcclient.InferInput("images", [2], "BYTES")
            tensor.set_data_from_numpy(np.array([good, bad(good)], dtype=np.object_))
            with pytest.raises(InferenceServerException) as caught:
                client.infer("detect", [tensor])
            client.close()
            assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert message in caught.value.message()
    assert per_image(http_detect(shipped, [good]))[0][0].shape[0] > 0  # the server goes on


def test_malformed_requests_are_refused(shipped: VolleyProcess) -> None:
    client = httpclient.InferenceServerClient(shipped.http)
    cases = []
    many = httpclient.InferInput("images", [65], "BYTES")
    many.set_data_from_numpy(np.array([b"x"] * 65, dtype=np.object_))
    cases.append(([many], "65 images in one request; model 'detect' takes 1 to 64"))
    empty = httpclient.InferInput("pixels", [0, 8, 3], "UINT8")
    empty.set_data_from_numpy(np.zeros((0, 8, 3), np.uint8))
    cases.append(([empty], "zero-sized image"))
    floats = httpclient.InferInput("pixels", [8, 8, 3], "FP32")
    floats.set_data_from_numpy(np.zeros((8, 8, 3), np.float32))
    cases.append(([floats], "input 'pixels' has datatype FP32, model 'detect' expects UINT8"))
    gray = httpclient.InferInput("pixels", [8, 8], "UINT8")
    gray.set_data_from_numpy(np.zeros((8, 8), np.uint8))
    cases.append(([gray], "input 'pixels' must have shape [H, W, 3] or [N, H, W, 3]"))
    one = httpclient.InferInput("images", [1], "BYTES")
    one.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    cases.append(([one, gray], "takes exactly one input"))
    for inputs, message in cases:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("detect", inputs)
        assert caught.value.status() == "400"
        assert message in caught.value.message()
    pixels = httpclient.InferInput("pixels", [8, 8, 3], "UINT8")
    pixels.set_data_from_numpy(np.zeros((8, 8, 3), np.uint8))
    classes = httpclient.InferRequestedOutput("scores", class_count=2)
    with pytest.raises(InferenceServerException, match="answers detections, not classes"):
        client.infer("detect", [pixels], outputs=[classes])
    client.close()


def test_detect_follows_its_detector_through_unload_and_load(shipped: VolleyProcess) -> None:
    client = httpclient.InferenceServerClient(shipped.http)
    blob = encode(scene_image(4).image)
    client.unload_model("detector")
    assert not client.is_model_ready("detect")
    with pytest.raises(InferenceServerException) as caught:
        http_detect(shipped, [blob])
    assert caught.value.status() == "503"
    assert "wraps model 'detector'" in caught.value.message()
    client.load_model("detector")
    assert client.is_model_ready("detect")
    assert per_image(http_detect(shipped, [blob]))[0][0].shape[0] > 0
    client.close()
