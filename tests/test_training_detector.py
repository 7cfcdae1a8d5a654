"""The object detector: synthetic COCO data, decoding, training end to end, ONNX export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from pycocotools.coco import COCO

from training.detector import main
from training.detector.coco import load_coco
from training.detector.decode import decode
from training.detector.loss import build_targets
from training.detector.model import CenterNet
from training.detector.synth import CLASS_NAMES, SCENES_PER_CHUNK, scenes, write_synthetic_coco
from training.detector.train import TrainConfig, bf16_is_fast, train

QUICK_MAP50_FLOOR = 0.3  # chance is ~0; an untrained or broken model scores < 0.01


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("detector")
    assert main(["--quick", "--out", str(out)]) == 0
    return out


def test_decode_hand_made_heatmap() -> None:
    stride, k = 4, 5
    heat = torch.full((1, 3, 10, 12), -8.0)
    heat[0, 2, 3, 5] = 5.0  # the peak: class 2, row 3, column 5
    heat[0, 2, 3, 6] = 4.0  # its neighbour: suppressed by the 3x3 max-pool
    heat[0, 0, 9, 0] = 2.0  # a weaker peak of class 0 in the bottom-left corner cell
    distances = torch.zeros(1, 4, 10, 12)
    distances[0, :, 3, 5] = torch.tensor([4.0, 6.0, 8.0, 10.0])
    distances[0, :, 9, 0] = torch.tensor([50.0, 1.0, 3.0, 50.0])
    detections = decode(heat, distances, stride, k)
    assert detections.shape == (1, k, 6)
    # cell (row 3, col 5) has its centre at (5*4+2, 3*4+2) = (22, 14)
    expected = [22 - 4, 14 - 6, 22 + 8, 14 + 10, 1 / (1 + math.exp(-5.0)), 2.0]
    torch.testing.assert_close(detections[0, 0], torch.tensor(expected))
    # centre (2, 38): the box is clipped to the 48x40 input
    expected = [0.0, 37.0, 5.0, 40.0, 1 / (1 + math.exp(-2.0)), 0.0]
    torch.testing.assert_close(detections[0, 1], torch.tensor(expected))
    rest = detections[0, 2:, 4]
    assert torch.all(rest < 1e-3), "the suppressed neighbour (score 0.98) must not come back"
    assert torch.all(detections[0, :-1, 4] >= detections[0, 1:, 4])


def test_targets_decode_back_to_the_boxes() -> None:
    stride = 4
    boxes = torch.tensor([[10.0, 20.0, 40.0, 70.0], [100.0, 100.0, 118.0, 124.0]])
    labels = torch.tensor([7, 3])
    targets = build_targets([boxes], [labels], 10, (40, 40), stride)
    assert float(targets.heatmap.max()) == 1.0
    assert int(targets.heatmap.eq(1.0).sum()) == 2
    assert float(targets.weight[0].sum()) > 0
    logits = torch.logit(targets.heatmap.clamp(1e-6, 1 - 1e-6))
    ys, xs = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    centre_x, centre_y = xs * stride + stride / 2, ys * stride + stride / 2
    target = targets.boxes[0].T.reshape(4, 40, 40)
    distances = torch.stack(
        (centre_x - target[0], centre_y - target[1], target[2] - centre_x, target[3] - centre_y)
    ).unsqueeze(0)
    detections = decode(logits, distances, stride, k=2)[0]
    order = detections[:, 5].argsort(descending=True)
    torch.testing.assert_close(detections[order, :4], boxes)
    assert detections[order, 5].tolist() == [7.0, 3.0]


def test_scenes_do_not_depend_on_the_number_of_drawing_processes() -> None:
    n = SCENES_PER_CHUNK + 7  # two chunks, the second one short
    alone = list(scenes(n, seed=5, split="test", workers=1))
    parallel = list(scenes(n, seed=5, split="test", workers=2))
    assert len(alone) == len(parallel) == n
    for one, other in zip(alone, parallel, strict=True):
        assert np.array_equal(one.image, other.image)
        assert np.array_equal(one.boxes, other.boxes)
        assert np.array_equal(one.labels, other.labels)
    assert not np.array_equal(alone[0].image, alone[SCENES_PER_CHUNK].image)


def test_synthetic_data_is_valid_reproducible_coco(tmp_path: Path) -> None:
    first = write_synthetic_coco(tmp_path / "a", 6, seed=3, split="train")
    again = write_synthetic_coco(tmp_path / "b", 6, seed=3, split="train")
    other = write_synthetic_coco(tmp_path / "c", 6, seed=4, split="train")
    assert first.read_text() == again.read_text()
    assert first.read_text() != other.read_text()
    coco = COCO(str(first))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES)
    assert len(coco.getImgIds()) == 6
    anns = coco.loadAnns(coco.getAnnIds())
    assert 6 <= len(anns) <= 6 * 20
    for ann in anns:
        image = coco.loadImgs(ann["image_id"])[0]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0
        assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
        assert 1 <= ann["category_id"] <= 10
        assert (first.parent / image["file_name"]).is_file()
    data = load_coco(first.parent, 320)
    assert data.images.shape == (6, 320, 320, 3)
    assert sum(len(b) for b in data.boxes) == len(anns)


def test_training_is_deterministic(tmp_path: Path) -> None:
    data = load_coco(write_synthetic_coco(tmp_path, 4, seed=0, split="train"), 320)

    def weights() -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = CenterNet(len(data.class_names))
        train(net, data, TrainConfig(epochs=2, batch_size=2, bf16=bf16_is_fast()))
        return [p.detach().clone() for p in net.state_dict().values()]

    for a, b in zip(weights(), weights(), strict=True):
        assert torch.equal(a, b)


def test_quick_run_writes_a_servable_model(quick_run: Path) -> None:
    from server.config import build_config

    config = yaml.safe_load((quick_run / "config.yaml").read_text())
    assert config["inputs"] == [{"name": "images", "datatype": "FP32", "dims": [3, 320, 320]}]
    assert config["outputs"] == [{"name": "detections", "datatype": "FP32", "dims": [100, 6]}]
    assert config["parameters"]["classes"] == ",".join(CLASS_NAMES)
    assert config["max_batch_size"] == 16
    built = build_config(quick_run, quick_run / "1" / "model.onnx")
    assert built.dynamic_batching is not None

    model = onnx.load(str(quick_run / "1" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    assert (quick_run / "README.md").read_text().count("mAP@0.5") >= 2


def test_quick_run_detections_format(quick_run: Path) -> None:
    session = ort.InferenceSession(str(quick_run / "1" / "model.onnx"))
    for batch in (1, 5):
        x = np.random.default_rng(batch).random((batch, 3, 320, 320), dtype=np.float32)
        (out,) = session.run(["detections"], {"images": x})
        assert out.shape == (batch, 100, 6) and out.dtype == np.float32
        boxes, scores, classes = out[..., :4], out[..., 4], out[..., 5]
        assert np.all(scores[:, :-1] >= scores[:, 1:])
        assert np.all((scores >= 0) & (scores <= 1))
        assert np.all(classes == np.round(classes)) and np.all((classes >= 0) & (classes < 10))
        assert np.all((boxes >= 0) & (boxes <= 320))
        assert np.all(boxes[..., 2] >= boxes[..., 0]) and np.all(boxes[..., 3] >= boxes[..., 1])


def test_quick_run_quality_far_above_chance(quick_run: Path) -> None:
    metrics = json.loads((quick_run / "metrics.json").read_text())
    assert metrics["quality"]["map50"] >= QUICK_MAP50_FLOOR
    assert metrics["quality"]["map50_95"] > 0.1
    assert metrics["export"]["parity_max_rel_diff"] <= 1e-4
    for batch in ("batch_1", "batch_8"):
        assert metrics["latency_ort_cpu"][batch]["ms_per_batch"] > 0


def test_training_on_a_user_coco_dataset(tmp_path: Path) -> None:
    dataset = write_synthetic_coco(tmp_path / "mine", 20, seed=9, split="train").parent
    out = tmp_path / "model"
    assert main(["--quick", "--coco", str(dataset), "--out", str(out), "--epochs", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == {
        "source": "coco",
        "path": str(dataset),
        "train_images": 18,
        "val_images": 2,
        "seed": 0,
    }
    assert 0.0 <= metrics["quality"]["map50"] <= 1.0
    session = ort.InferenceSession(str(out / "1" / "model.onnx"))
    x = np.zeros((2, 3, 320, 320), dtype=np.float32)
    assert session.run(None, {"images": x})[0].shape == (2, 100, 6)


def test_help_describes_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--quick", "--coco", "--out", "--seed", "--epochs", "--threads", "--precision"):
        assert option in text
