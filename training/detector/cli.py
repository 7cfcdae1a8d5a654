"""`python -m training.detector`: data -> training -> ONNX export -> checks -> model folder."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.detector.artifacts import (
    INPUT_NAME,
    OUTPUT_NAME,
    format_table,
    write_card,
    write_config,
    write_metrics,
)
from training.detector.coco import DetectionSet, load_coco
from training.detector.evaluate import (
    coco_map,
    images_to_input,
    onnx_predictor,
    ort_latency,
    predict,
)
from training.detector.model import CenterNet, Detector
from training.detector.parity import detection_difference
from training.detector.synth import write_synthetic_coco
from training.detector.train import TrainConfig, bf16_is_fast, train
from training.export import OPSET, check_parity, export_onnx, next_version

INPUT_SIZE = 320
TOP_K = 100
PARITY_BATCH_SIZES = (1, 3, 8)
COCO_VAL_FRACTION = 0.1
DEFAULT_OUT = Path("models/detector")
QUICK_OUT = Path("runs/quick/detector")


@dataclass(frozen=True)
class Plan:
    """How much synthetic data to draw and how long to train."""

    train_images: int
    val_images: int
    epochs: int


FULL = Plan(train_images=15000, val_images=500, epochs=5)
QUICK = Plan(train_images=800, val_images=100, epochs=6)


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    parser = argparse.ArgumentParser(prog="python -m training.detector", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small data, short run (tests)")
    parser.add_argument(
        "--coco",
        type=Path,
        help="train on this COCO instances data set instead: a folder holding annotations.json "
        "(image file_name relative to it or to its images/), or the annotation file; "
        f"a seeded {round(COCO_VAL_FRACTION * 100)}%% of the images is held out",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"model folder (default: {DEFAULT_OUT}; with --quick: {QUICK_OUT}); the run writes "
        "the next version folder in it (1/, 2/, ...), never over an existing one",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="override the plan's number of epochs")
    parser.add_argument(
        "--threads", type=int, default=2, help="CPU threads (fixed for determinism)"
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="training forward pass; auto = bf16 autocast where the CPU has AMX (export is fp32)",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line (sys.argv[1:] when argv is None)."""
    return build_parser().parse_args(argv)


def split_coco(full: DetectionSet, seed: int) -> tuple[DetectionSet, DetectionSet]:
    """A seeded random split of a user's data set into training and held-out images."""
    if len(full) < 2:
        raise ValueError("a COCO data set needs at least 2 images: one is held out for evaluation")
    order = np.random.default_rng(seed).permutation(len(full))
    n_val = max(1, round(len(full) * COCO_VAL_FRACTION))
    return full.subset(order[n_val:]), full.subset(order[:n_val])


def load_data(
    args: argparse.Namespace, plan: Plan, scratch: Path
) -> tuple[DetectionSet, DetectionSet, dict]:
    """Training and held-out sets plus a description of where they came from."""
    if args.coco is not None:
        train_set, val_set = split_coco(load_coco(args.coco, INPUT_SIZE), args.seed)
        info = {"source": "coco", "path": str(args.coco)}
    else:
        train_dir, val_dir = scratch / "train", scratch / "val"
        write_synthetic_coco(train_dir, plan.train_images, args.seed, "train", workers=args.threads)
        write_synthetic_coco(val_dir, plan.val_images, args.seed, "test", workers=args.threads)
        train_set = load_coco(train_dir, INPUT_SIZE)
        val_set = load_coco(val_dir, INPUT_SIZE)
        info = {"source": "synthetic"}
    sizes = {"train_images": len(train_set), "val_images": len(val_set), "seed": args.seed}
    return train_set, val_set, info | sizes


def export_and_check(
    net: CenterNet, val_set: DetectionSet, model_file: Path, scratch: Path
) -> tuple[Path, float]:
    """Export the decoded graph and check ONNX Runtime against PyTorch (path, worst difference)."""
    detector = Detector(net, TOP_K).eval()
    example = torch.rand(1, 3, INPUT_SIZE, INPUT_SIZE)
    metadata = {
        "classes": ",".join(val_set.class_names),
        "input_size": str(INPUT_SIZE),
        "opset": str(OPSET),
    }
    with warnings.catch_warnings():  # the grid size becomes a constant: the input is fixed
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        path = export_onnx(detector, example, model_file, INPUT_NAME, [OUTPUT_NAME], metadata)
    heads = export_onnx(
        net, example, scratch / "heads.onnx", INPUT_NAME, ["heat_logits", "distances"]
    )
    generator = torch.Generator().manual_seed(1234)

    def random_images(batch: int) -> torch.Tensor:
        return torch.rand(batch, 3, INPUT_SIZE, INPUT_SIZE, generator=generator)

    def held_out_images(batch: int) -> torch.Tensor:
        return torch.from_numpy(images_to_input(val_set.images[np.arange(batch) % len(val_set)]))

    worst = check_parity(net, heads, random_images, PARITY_BATCH_SIZES)
    decoded = check_parity(
        detector, path, held_out_images, PARITY_BATCH_SIZES, compare=detection_difference
    )
    worst = max(worst, decoded)
    return path, worst


def main(argv: list[str] | None = None) -> int:
    """Run the whole pipeline; write config.yaml, <version>/model.onnx, metrics.json, README.md."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    version = next_version(args.out)
    plan = QUICK if args.quick else FULL
    epochs = args.epochs or plan.epochs
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="volley-detector-") as tmp:
        train_set, val_set, data_info = load_data(args, plan, Path(tmp))
        net = CenterNet(len(train_set.class_names))
        bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_is_fast())
        config = TrainConfig(epochs=epochs, seed=args.seed, bf16=bf16)
        training = train(net, train_set, config)
        model_file = args.out / str(version) / "model.onnx"
        path, worst = export_and_check(net, val_set, model_file, Path(tmp))
    detections = predict(onnx_predictor(path, args.threads), val_set.images)
    metrics = {
        "command": shlex.join(["python", "-m", "training.detector", *argv]),
        "data": data_info,
        "quality": coco_map(val_set, detections),
        "training": training
        | {
            "epochs": epochs,
            "batch_size": config.batch_size,
            "threads": args.threads,
            "precision": "bf16 autocast" if bf16 else "fp32",
        },
        "model": {
            "input_size": INPUT_SIZE,
            "k": TOP_K,
            "stride": net.stride,
            "class_names": train_set.class_names,
            "parameters": sum(p.numel() for p in net.parameters()),
            "onnx_bytes": path.stat().st_size,
        },
        "export": {
            "opset": OPSET,
            "parity_max_rel_diff": worst,
            "parity_batch_sizes": list(PARITY_BATCH_SIZES),
        },
        "latency_ort_cpu": ort_latency(path, INPUT_SIZE, args.threads),
    }
    write_metrics(args.out, metrics)
    write_config(args.out, train_set.class_names, INPUT_SIZE, TOP_K)
    write_card(args.out, metrics)
    print(format_table(metrics))
    print(f"wrote {args.out}/config.yaml, {version}/model.onnx, metrics.json, README.md")
    return 0
