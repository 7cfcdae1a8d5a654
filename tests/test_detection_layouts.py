"""Detector output layouts through the detection pipeline, on stub detectors with known output.

Each stub answers every image with the same raw table, so the expected boxes are known exactly:
read per layout, thresholded, NMS'd per class (except end-to-end exports), and mapped from the
64x64 letterboxed input back to the original image's pixels.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import VolleyProcess, serving
from detector_stubs import fixed_output_detector, rows_table, yolov5_table, yolov8_table
from onnx_models import write_config
from vision_scenes import encode

ULTRALYTICS_META = {"names": "{0: 'person', 1: 'bicycle', 2: 'car'}", "imgsz": "[64, 64]"}
WIDE = np.full((64, 128, 3), 90, np.uint8)  # 128 wide, 64 high: scale 0.5, 16 px pad top/bottom
TALL = np.full((128, 64, 3), 90, np.uint8)  # scale 0.5, 16 px pad left/right

# In 64x64 letterbox pixels: A, B overlapping A (same class, lower score), C at B's place in
# another class, D under the score threshold, E reaching into the padding above the image.
YOLOV8 = yolov8_table(
    [(32, 32, 16, 8, 0, 0.9), (33, 32, 16, 8, 0, 0.8), (33, 32, 16, 8, 1, 0.7),
     (50, 50, 8, 8, 1, 0.1), (10, 14, 8, 8, 2, 0.6)], classes=3,
)  # fmt: skip
YOLOV5 = yolov5_table(
    [(32, 32, 16, 8, 1.0, 0, 0.9), (33, 32, 16, 8, 1.0, 0, 0.8), (33, 32, 16, 8, 0.5, 1, 0.9),
     (50, 50, 8, 8, 0.2, 1, 0.5), (10, 14, 8, 8, 0.6, 2, 1.0)], classes=3,
)  # fmt: skip
ROWS = rows_table([(24, 28, 40, 36, 0.9, 0), (25, 28, 41, 36, 0.8, 0), (46, 46, 54, 54, 0.1, 1)])

# The same boxes in the pixels of WIDE: x / 0.5, (y - 16) / 0.5, clipped to the image.
A_WIDE = [48, 24, 80, 40]
B_WIDE = [50, 24, 82, 40]
E_WIDE = [12, 0, 28, 4]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VolleyProcess]:
    """One repository: a stub detector per layout and a pipeline over each."""
    root = tmp_path_factory.mktemp("layouts") / "models"
    stubs = {
        "v8": (YOLOV8, ULTRALYTICS_META, False),
        "v5": (YOLOV5, {}, False),
        "v5static": (YOLOV5, {}, True),
        "e2e": (ROWS, {}, False),
        "own": (ROWS, {"classes": "zero,one"}, False),
    }
    for name, (table, meta, static) in stubs.items():
        fixed_output_detector(root / f"{name}_net" / "1" / "model.onnx", table, (64, 64), meta,
                              static_batch=static)  # fmt: skip
        pipeline = {"pipeline": "detection", "detector": f"{name}_net", "score_threshold": 0.25}
        if name == "own":
            pipeline["layout"] = "volley"
        write_config(root / name, pipeline)
    with serving(root) as proc:
        yield proc


def detect(proc: VolleyProcess, model: str, images: list[np.ndarray], **params) -> list[dict]:
    """Send PNG-encoded images over HTTP; one dict of numpy outputs per image."""
    client = httpclient.InferenceServerClient(proc.http)
    data = np.array([encode(image, ".png") for image in images], dtype=np.object_)
    tensor = httpclient.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(data)
    result = client.infer(model, [tensor], parameters=params or None)
    client.close()
    counts = result.as_numpy("num_detections")
    return [
        {
            "boxes": result.as_numpy("boxes")[i, :n],
            "scores": result.as_numpy("scores")[i, :n],
            "class_ids": result.as_numpy("class_ids")[i, :n].tolist(),
            "class_names": [x.decode() for x in result.as_numpy("class_names")[i, :n]],
        }
        for i, n in enumerate(counts)
    ]


def test_every_layout_is_recognised_from_the_graph(layouts: VolleyProcess) -> None:
    client = httpclient.InferenceServerClient(layouts.http)
    index = {m["name"]: m["state"] for m in client.get_model_repository_index()}
    assert all(state == "READY" for state in index.values()), index
    log = layouts.log()
    for name, layout in [("v8", "yolov8"), ("v5", "yolov5"), ("e2e", "end2end"), ("own", "volley")]:
        assert f'"model":"{name}","version":1,"wraps":"{name}_net","layout":"{layout}"' in log
    client.close()


def test_yolov8_layout_nms_per_class_and_ultralytics_names(layouts: VolleyProcess) -> None:
    (found,) = detect(layouts, "v8", [WIDE])
    assert found["class_names"] == ["person", "bicycle", "car"]
    assert found["class_ids"] == [0, 1, 2]
    np.testing.assert_allclose(found["scores"], [0.9, 0.7, 0.6], rtol=1e-6)
    np.testing.assert_allclose(found["boxes"], [A_WIDE, [50, 24, 82, 40], E_WIDE], atol=1e-3)


def test_yolov5_layout_multiplies_objectness(layouts: VolleyProcess) -> None:
    for model in ("v5", "v5static"):
        (found,) = detect(layouts, model, [WIDE])
        assert found["class_ids"] == [0, 2, 1], model
        assert found["class_names"] == ["0", "2", "1"]
        np.testing.assert_allclose(found["scores"], [0.9, 0.6, 0.45], rtol=1e-6)
        np.testing.assert_allclose(found["boxes"], [A_WIDE, E_WIDE, B_WIDE], atol=1e-3)


def test_end_to_end_layout_is_not_suppressed_again(layouts: VolleyProcess) -> None:
    (found,) = detect(layouts, "e2e", [WIDE])
    np.testing.assert_allclose(found["scores"], [0.9, 0.8], rtol=1e-6)
    np.testing.assert_allclose(found["boxes"], [A_WIDE, B_WIDE], atol=1e-3)


def test_volley_layout_gets_nms_and_names_from_metadata(layouts: VolleyProcess) -> None:
    (found,) = detect(layouts, "own", [WIDE])
    assert found["class_names"] == ["zero"]
    np.testing.assert_allclose(found["boxes"], [A_WIDE], atol=1e-3)


def test_several_images_of_different_shapes_map_back_each_to_its_own(
    layouts: VolleyProcess,
) -> None:
    wide, tall = detect(layouts, "own", [WIDE, TALL])
    np.testing.assert_allclose(wide["boxes"], [A_WIDE], atol=1e-3)
    # TALL: scale 0.5, 16 px of padding left: x = (x - 16) / 0.5, y = y / 0.5
    np.testing.assert_allclose(tall["boxes"], [[16, 56, 48, 72]], atol=1e-3)


def test_request_parameters_override_the_config(layouts: VolleyProcess) -> None:
    (found,) = detect(layouts, "v8", [WIDE], score_threshold=0.65)
    assert found["class_ids"] == [0, 1]
    (found,) = detect(layouts, "v8", [WIDE], max_detections=1)
    assert found["class_ids"] == [0]
    (found,) = detect(layouts, "v8", [WIDE], classes="car,bicycle")
    assert found["class_names"] == ["bicycle", "car"]
    (found,) = detect(layouts, "v8", [WIDE], classes="2")
    assert found["class_names"] == ["car"]
    # A looser IoU threshold keeps B beside A (their IoU is about 0.88).
    (found,) = detect(layouts, "v8", [WIDE], iou_threshold=0.95)
    assert found["class_ids"] == [0, 0, 1, 2]


def test_pixels_input_with_channel_order_over_grpc(layouts: VolleyProcess) -> None:
    client = grpcclient.InferenceServerClient(layouts.grpc)
    for order in ("rgb", "bgr"):
        tensor = grpcclient.InferInput("pixels", [2, 64, 128, 3], "UINT8")
        tensor.set_data_from_numpy(np.stack([WIDE, WIDE]))
        result = client.infer("own", [tensor], parameters={"channel_order": order})
        assert result.as_numpy("num_detections").tolist() == [1, 1]
        np.testing.assert_allclose(result.as_numpy("boxes")[:, 0], [A_WIDE, A_WIDE], atol=1e-3)
    client.close()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"score_threshold": 1.5}, "parameter 'score_threshold' must be between 0 and 1"),
        ({"iou_threshold": "x"}, "parameter 'iou_threshold' must be a number"),
        ({"max_detections": 0}, "parameter 'max_detections' must be between 1 and 10000"),
        ({"classes": "dog"}, "parameter 'classes': unknown class 'dog'"),
        ({"channel_order": "yuv"}, "parameter 'channel_order' must be 'rgb' or 'bgr'"),
    ],
)
def test_bad_parameters_are_refused(layouts: VolleyProcess, params: dict, message: str) -> None:
    with pytest.raises(Exception) as caught:
        detect(layouts, "v8", [WIDE], **params)
    assert message in str(caught.value)
    assert "400" in str(caught.value.status())
