"""An image as the whole HTTP body (`Content-Type: image/...`) to a pipeline model's infer route:
detections back as plain JSON in the image's own pixels, parameters from the query string, bad
input refused with the infer route's errors. One real server on the shipped models."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from conftest import VolleyProcess, copy_shipped_models, serving
from vision_scenes import encode, matched_fraction, scene_image

MAX_REQUEST_BYTES = 3_000_000
TIMEOUT = 30


@pytest.fixture(scope="module")
def volley(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VolleyProcess]:
    repository = copy_shipped_models(tmp_path_factory.mktemp("image-body"))
    with serving(repository, "--max-request-bytes", str(MAX_REQUEST_BYTES)) as proc:
        yield proc


def post_image(volley: VolleyProcess, body: bytes, kind: str, query: str = "", model="detect"):
    return requests.post(
        f"{volley.url}/v2/models/{model}/infer{query}",
        data=body,
        headers={"Content-Type": kind},
        timeout=TIMEOUT,
    )


@pytest.mark.parametrize(
    ("seed", "crop", "scale", "ext", "kind"),
    [
        (401, (320, 240), 2.0, ".jpg", "image/jpeg"),
        (402, (240, 320), 1.0, ".png", "image/png"),
        (403, (300, 200), 1.5, ".webp", "image/webp"),
        (404, (320, 320), 0.75, ".bmp", "image/bmp"),
    ],
)
def test_an_image_body_gets_its_detections_in_its_own_pixels(
    volley: VolleyProcess, seed: int, crop: tuple[int, int], scale: float, ext: str, kind: str
) -> None:
    truth = scene_image(seed, crop, scale)
    data = encode(truth.image, ext)
    response = post_image(volley, data, kind)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert (doc["width"], doc["height"]) == (truth.width, truth.height)
    boxes = np.array([d["box"] for d in doc["detections"]], np.float32).reshape(-1, 4)
    labels = np.array([d["class_id"] for d in doc["detections"]])
    assert matched_fraction(truth, boxes, labels) >= 0.7
    assert {"decode_us", "inference_us", "total_us"} <= set(doc["timings"])
    # the same bytes as a v2 BYTES tensor: the same detections
    client = httpclient.InferenceServerClient(volley.http)
    tensor = httpclient.InferInput("images", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    result = client.infer("detect", [tensor])
    count = int(result.as_numpy("num_detections")[0])
    assert count == len(doc["detections"])
    np.testing.assert_allclose(boxes, result.as_numpy("boxes")[0, :count], atol=0.05)
    names = [n.decode() for n in result.as_numpy("class_names")[0, :count]]
    assert names == [d["class_name"] for d in doc["detections"]]


def test_query_parameters_tune_detection(volley: VolleyProcess) -> None:
    truth = scene_image(405, (320, 240), 2.0)
    data = encode(truth.image, ".jpg")
    every = post_image(volley, data, "image/jpeg", "?score_threshold=0.05").json()["detections"]
    assert len(every) >= 2
    kept = every[0]["class_name"]
    only = post_image(volley, data, "image/jpeg", f"?score_threshold=0.05&classes={kept}")
    assert {d["class_name"] for d in only.json()["detections"]} == {kept}
    one = post_image(volley, data, "image/jpeg", "?score_threshold=0.05&max_detections=1")
    assert one.json()["detections"] == every[:1]
    confident = post_image(volley, data, "image/jpeg", "?score_threshold=0.99").json()
    assert all(d["score"] >= 0.99 for d in confident["detections"])
    named = post_image(volley, data, "image/jpeg", "?id=frame-7&capture_ts=12.5&timeout=9000000")
    assert named.status_code == 200, named.text
    named = named.json()
    assert (named["id"], named["capture_ts"]) == ("frame-7", "12.5")


def test_bad_image_bodies_get_clear_errors_and_the_server_goes_on(volley: VolleyProcess) -> None:
    truth = scene_image(406, (320, 240), 1.0)
    jpeg = encode(truth.image, ".jpg")
    cases = [
        (b"not an image at all", "image/jpeg", "", "detect", 400, "not a JPEG, PNG, WebP or BMP"),
        (jpeg[: len(jpeg) // 2], "image/jpeg", "", "detect", 400, "truncated or corrupt"),
        (b"", "image/png", "", "detect", 400, "empty (0 bytes)"),
        (jpeg, "image/jpeg", "?score_threshold=2", "detect", 400, "'score_threshold' must be"),
        (jpeg, "image/jpeg", "?classes=1&classes=2", "detect", 400, "'classes' given twice"),
        (jpeg, "image/jpeg", "?score_treshold=0.5", "detect", 400, "unknown query parameter"),
        (jpeg, "image/jpeg", "?timeout=soon", "detect", 400, "'timeout' must be"),
        (jpeg, "image/jpeg", "", "fraud", 400, "takes v2 inference requests, not an image"),
        (jpeg, "image/jpeg", "", "nope", 404, "'nope' is not found"),
        (b"\xff" * (MAX_REQUEST_BYTES + 1), "image/jpeg", "", "detect", 413, "exceeds"),
    ]
    for body, kind, query, model, status, message in cases:
        response = post_image(volley, body, kind, query, model)
        assert response.status_code == status, (model, query, response.text)
        assert message in response.json()["error"], response.text
    response = post_image(volley, jpeg, "image/jpeg")
    assert response.status_code == 200 and "detections" in response.json()


def test_image_bodies_are_counted_in_the_models_statistics(volley: VolleyProcess) -> None:
    def successes() -> int:
        stats = requests.get(f"{volley.url}/v2/models/detect/stats", timeout=TIMEOUT).json()
        return stats["model_stats"][0]["inference_stats"]["success"]["count"]

    before = successes()
    jpeg = encode(scene_image(407, (320, 240), 1.0).image, ".jpg")
    for _ in range(3):
        assert post_image(volley, jpeg, "image/jpeg").status_code == 200
    assert successes() == before + 3
