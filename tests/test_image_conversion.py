"""uint8 images into the detector graph (the GPU path's conversion), staged batches, IO binding.

On this CPU-only machine these run the same code the GPU uses, with ONNX Runtime's CPU provider:
the graph edit, the staging buffers and the IO-bound run. tests/test_gpu.py runs them on CUDA.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np
import onnx_models
import onnxruntime as ort
import pytest
import requests
import tritonclient.grpc as grpcclient
import yaml
from conftest import copy_shipped_models, serving
from onnx import TensorProto, helper, numpy_helper
from vision_scenes import encode, matched_fraction, scene_image

from server.config import ModelConfig, TensorConfig, build_config
from server.image_front import uint8_image_graph
from server.pinned import pinned_empty
from server.runtime import OnnxInstance, device_warmup_sizes, provider_settings

ROOT = Path(__file__).resolve().parents[1]
DETECTOR = ROOT / "models" / "detector" / "1" / "model.onnx"


def float_input(images: np.ndarray, scale: float, dtype=np.float32) -> np.ndarray:
    return (images.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(scale)).astype(dtype)


def test_uint8_graph_matches_the_float_graph_on_the_shipped_detector():
    images = np.random.default_rng(0).integers(0, 256, (3, 320, 320, 3), dtype=np.uint8)
    plain = ort.InferenceSession(str(DETECTOR), providers=["CPUExecutionProvider"])
    name = plain.get_inputs()[0].name
    (want,) = plain.run(None, {name: float_input(images, 1 / 255)})
    edited = ort.InferenceSession(
        uint8_image_graph(DETECTOR, name, 1 / 255), providers=["CPUExecutionProvider"]
    )
    (spec,) = edited.get_inputs()
    assert (spec.name, spec.type) == (name, "tensor(uint8)")
    assert spec.shape[1:] == [320, 320, 3]
    assert edited.get_modelmeta().custom_metadata_map == plain.get_modelmeta().custom_metadata_map
    (got,) = edited.run(None, {name: images})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def fp16_doubler(path: Path) -> Path:
    """FP16 [N, 3, 2, 2] -> its values times two, as FP16: shows the scale and the layout."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "fp16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 3, 2, 2])],
        [numpy_helper.from_array(np.array(2, np.float16), "two")],
    )
    return onnx_models.save(graph, path)


def test_uint8_graph_casts_to_fp16_and_keeps_the_channel_order(tmp_path):
    model = fp16_doubler(tmp_path / "fp16.onnx")
    session = ort.InferenceSession(
        uint8_image_graph(model, "x", 0.5), providers=["CPUExecutionProvider"]
    )
    pixels = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)  # N, H, W, C
    (got,) = session.run(None, {"x": pixels})
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, pixels.transpose(0, 3, 1, 2).astype(np.float16))


def test_uint8_graph_refuses_inputs_that_are_not_float_images(tmp_path):
    from onnx_models import mlp

    with pytest.raises(ValueError, match="not \\[N, 3, H, W\\]"):
        uint8_image_graph(mlp(tmp_path / "mlp.onnx"), "input", 1.0)


def assert_same_confident_detections(got: np.ndarray, want: np.ndarray) -> None:
    """Per image, the confident detections agree (near-equal weak ones may swap places between
    kernels)."""
    assert got.shape == want.shape
    for image, expected in zip(got, want, strict=True):
        image, expected = (rows[rows[:, 4] > 0.5] for rows in (image, expected))
        image, expected = (rows[np.lexsort(rows[:, :2].T)] for rows in (image, expected))
        assert len(image) == len(expected) > 0
        np.testing.assert_allclose(image, expected, rtol=1e-4, atol=1e-3)


def test_staged_instance_with_io_binding_matches_a_plain_run(tmp_path):
    config = build_config(ROOT / "models" / "detector", DETECTOR)
    plain = OnnxInstance(DETECTOR, config, 0, staged=False)
    staged = OnnxInstance(DETECTOR, config, 0, staged=True)
    scenes = np.stack([scene_image(seed, (320, 320), 1.0).image for seed in range(6)])
    images = float_input(scenes, 1 / 255)
    parts = [images[:1], images[1:4], images[4:]]
    batch = staged.gather("images", parts)
    assert batch.shape == (6, 3, 320, 320)
    assert staged.pinned == (staged.provider == "CUDAExecutionProvider")  # page-locked on a GPU
    # The batch lives in the instance's staging buffer, which is reused batch after batch.
    assert batch.base is not None and staged.gather("images", parts[:1]).base is batch.base
    first = staged.run({"images": staged.gather("images", parts)})
    want = plain.run({"images": images})
    assert_same_confident_detections(first["detections"], want["detections"])
    kept = first["detections"].copy()
    staged.run({"images": staged.gather("images", [np.zeros((6, 3, 320, 320), np.float32)])})
    np.testing.assert_array_equal(first["detections"], kept)  # outputs are the caller's own


def test_staging_is_bounded_by_the_batch_size():
    config = build_config(ROOT / "models" / "detector", DETECTOR)
    staged = OnnxInstance(DETECTOR, config, 0, staged=True)
    too_many = [np.zeros((config.max_batch_size + 1, 3, 320, 320), np.float32)]
    assert staged.gather("images", too_many) is too_many[0]


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="has CUDA")
def test_staging_buffers_are_page_aligned_and_plain_memory_without_a_gpu():
    array, pinned = pinned_empty((4, 5, 3), np.uint8)  # asks to pin: no GPU, so it cannot
    assert array.shape == (4, 5, 3) and array.dtype == np.uint8
    assert array.ctypes.data % mmap.PAGESIZE == 0
    assert pinned is False
    array[:] = 7  # plain, writable memory
    assert int(array.sum()) == 7 * array.size


def pipeline_repository(folder: Path) -> Path:
    """The shipped models plus `detect_host`: the same pipeline, floats made on the host."""
    repository = copy_shipped_models(folder)
    config = yaml.safe_load((repository / "detect" / "config.yaml").read_text())
    (repository / "detect_host").mkdir()
    config["image_conversion"] = "host"
    (repository / "detect_host" / "config.yaml").write_text(yaml.safe_dump(config))
    return repository


def detect(client: grpcclient.InferenceServerClient, model: str, blobs: list[bytes]):
    tensor = grpcclient.InferInput("images", [len(blobs)], "BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    return client.infer(model, [tensor])


def test_pipeline_with_conversion_in_the_graph_finds_the_same_boxes(tmp_path):
    scenes = [scene_image(seed, (320, 240), 2.0) for seed in range(6)]
    blobs = [encode(s.image) for s in scenes]
    with serving(pipeline_repository(tmp_path)) as server:
        client = grpcclient.InferenceServerClient(server.grpc)
        host = detect(client, "detect_host", blobs)
        graph = detect(client, "detect", blobs)  # the shipped pipeline: image_conversion auto
        np.testing.assert_array_equal(
            host.as_numpy("num_detections"), graph.as_numpy("num_detections")
        )
        np.testing.assert_allclose(host.as_numpy("boxes"), graph.as_numpy("boxes"), atol=0.05)
        np.testing.assert_allclose(host.as_numpy("scores"), graph.as_numpy("scores"), atol=1e-3)
        counts = graph.as_numpy("num_detections")
        boxes, ids = graph.as_numpy("boxes"), graph.as_numpy("class_ids")
        found = [matched_fraction(s, boxes[i, : counts[i]], ids[i, : counts[i]])
                 for i, s in enumerate(scenes)]  # fmt: skip
        assert np.mean(found) >= 0.85, found
        config = requests.get(f"{server.url}/v2/models/detect/config", timeout=5).json()
        assert config["parameters"]["image_conversion"]["string_value"] == "auto"
        events = [json.loads(line) for line in server.log().splitlines() if line.strip()]
        variants = [e for e in events if e.get("event") == "uint8_variant_loaded"]
        assert [v["model"] for v in variants] == ["detector"], variants  # made once, shared
        # The graph variant's batches count in the detector's own statistics.
        stats = client.get_inference_statistics("detector", as_json=True)["model_stats"][0]
        assert int(stats["inference_count"]) >= 2 * len(blobs)
        client.close()


def test_gpu_instances_warm_up_every_batch_size_they_can_meet():
    assert device_warmup_sizes(16) == tuple(range(1, 17))
    assert device_warmup_sizes(1024) == (*range(1, 65), 128, 256, 512, 1024)
    assert device_warmup_sizes(100) == (*range(1, 65), 100)


def test_cuda_provider_gets_the_configured_convolution_search(monkeypatch, tmp_path):
    config = build_config(ROOT / "models" / "detector", DETECTOR)
    assert config.cudnn_conv_algo_search == "heuristic"  # no per-shape benchmarking stalls
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert provider_settings(config) == [
        ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}),
        "CPUExecutionProvider",
    ]
    exhaustive = config.model_copy(update={"cudnn_conv_algo_search": "exhaustive"})
    assert provider_settings(exhaustive)[0][1] == {"cudnn_conv_algo_search": "EXHAUSTIVE"}


def test_an_unknown_convolution_search_is_refused_with_the_field_named(tmp_path):
    from onnx_models import mlp, write_config

    from server.config import ConfigError

    model = mlp(tmp_path / "m" / "1" / "model.onnx")
    write_config(tmp_path / "m", {"cudnn_conv_algo_search": "fastest"})
    with pytest.raises(ConfigError, match="cudnn_conv_algo_search"):
        build_config(tmp_path / "m", model)


def batch_size_seen(path: Path) -> Path:
    """FP32 [N, 1] -> [N, 1] where every row holds N: the batch size the graph ran at."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "zero"], ["zeros"]),
            helper.make_node("Add", ["zeros", "one"], ["ones"]),
            helper.make_node("ReduceSum", ["ones", "axis0"], ["rows"], keepdims=1),
            helper.make_node("Mul", ["ones", "rows"], ["y"]),
        ],
        "rows",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
        [
            numpy_helper.from_array(np.array(0, np.float32), "zero"),
            numpy_helper.from_array(np.array(1, np.float32), "one"),
            numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        ],
    )
    return onnx_models.save(graph, path)


def test_padded_batches_run_at_the_batch_size_limit_and_return_their_own_rows(tmp_path):
    model = batch_size_seen(tmp_path / "rows.onnx")
    config = ModelConfig(
        name="rows",
        max_batch_size=8,
        inputs=(TensorConfig(name="x", datatype="FP32", dims=(1,)),),
        outputs=(TensorConfig(name="y", datatype="FP32", dims=(1,)),),
    )
    assert config.pad_device_batches  # the default: padded wherever the instance is on a GPU
    padded = OnnxInstance(model, config, 0, staged=True, padded=True)
    exact = OnnxInstance(model, config, 0, staged=True, padded=False)
    for rows in (3, 8, 1, 5):
        parts = [np.ones((1, 1), np.float32)] * rows
        got = padded.run({"x": padded.gather("x", parts)})["y"]
        assert got.shape == (rows, 1)
        assert (got == 8).all()  # the graph saw the whole staging buffer
        assert (exact.run({"x": exact.gather("x", parts)})["y"] == rows).all()
    # Inputs that are not the head of a staging buffer run as they are.
    assert (padded.run({"x": np.ones((2, 1), np.float32)})["y"] == 2).all()
    off = config.model_copy(update={"pad_device_batches": False})
    assert not OnnxInstance(model, off, 0, staged=True).padded
    assert not OnnxInstance(model, config, 0).padded  # on the CPU: never


def test_padded_detector_batches_match_a_plain_run_whatever_the_padding_rows_hold():
    config = build_config(ROOT / "models" / "detector", DETECTOR)
    plain = OnnxInstance(DETECTOR, config, 0, staged=False)
    padded = OnnxInstance(DETECTOR, config, 0, staged=True, padded=True)
    scenes = np.stack([scene_image(seed, (320, 320), 1.0).image for seed in range(5)])
    images = float_input(scenes, 1 / 255)
    padded.run({"images": padded.gather("images", [images[::-1]])})  # leaves rows behind
    got = padded.run({"images": padded.gather("images", [images[:2]])})["detections"]
    assert_same_confident_detections(got, plain.run({"images": images[:2]})["detections"])
