"""What a run leaves in the model folder: config.yaml, metrics.json and the README model card."""

from __future__ import annotations

import json
from pathlib import Path

from training.export import OPSET, PARITY_RULE

INPUT_NAME = "images"
OUTPUT_NAME = "detections"
SCORE_THRESHOLD = 0.3


def write_config(out: Path, class_names: list[str], size: int, k: int) -> Path:
    """Volley's config.yaml for the detector."""
    text = f"""platform: onnx
max_batch_size: 16
inputs:
  - {{name: {INPUT_NAME}, datatype: FP32, dims: [3, {size}, {size}]}}
outputs:
  - {{name: {OUTPUT_NAME}, datatype: FP32, dims: [{k}, 6]}}
dynamic_batching:
  max_queue_delay_us: 0  # a busy instance batches what queues meanwhile; waiting only adds latency
  max_queue_size: 256
instance_count: 1
# The detect pipeline decodes images on other threads at the same time: spinning ONNX Runtime
# threads would take the CPU they need (bench/RESULTS.md, vision).
intra_op_spinning: false
parameters:
  input_size: "{size}"
  classes: "{",".join(class_names)}"
  score_threshold: "{SCORE_THRESHOLD}"
"""
    path = out / "config.yaml"
    path.write_text(text)
    return path


def write_metrics(out: Path, metrics: dict) -> Path:
    """metrics.json, pretty-printed."""
    path = out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path


def format_table(metrics: dict) -> str:
    """Plain-text summary of a run: quality on the held-out set, cost, export check, latency."""
    quality, train, export = metrics["quality"], metrics["training"], metrics["export"]
    latency = metrics["latency_ort_cpu"]
    rows = [
        ("held-out images", str(metrics["data"]["val_images"])),
        ("COCO mAP@0.5", f"{quality['map50']:.4f}"),
        ("COCO mAP@0.5:0.95", f"{quality['map50_95']:.4f}"),
        ("training", f"{train['train_seconds']:.0f} s, {train['epochs']} epochs"),
        ("export parity (rel.)", f"{export['parity_max_rel_diff']:.1e}"),
        ("ORT CPU batch 1", f"{latency['batch_1']['ms_per_batch']} ms"),
        ("ORT CPU batch 8", f"{latency['batch_8']['ms_per_batch']} ms"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def write_card(out: Path, metrics: dict) -> Path:
    """README.md model card filled in from the run's metrics."""
    data, quality, latency = metrics["data"], metrics["quality"], metrics["latency_ort_cpu"]
    train, model = metrics["training"], metrics["model"]
    b1, b8 = latency["batch_1"], latency["batch_8"]
    if data["source"] == "synthetic":
        story = (
            "Synthetic scenes built at run time from material inside PyPI packages (nothing is "
            "downloaded). Objects are the handwritten digits 0-9 of scikit-learn's `load_digits` "
            "(8x8 glyphs, smoothed and warped to 16-64 px boxes, rotated up to +-20 degrees, "
            "randomly coloured with contrast to what they cover); backgrounds are random crops of "
            "the photographs bundled with scikit-image (astronaut, coffee, rocket, coins, brick, "
            "...), with colour jitter, random lines/circles/rectangles as clutter, up to 20 digits "
            "per image that may hide up to 30% of each other, blur and Gaussian noise. A box is "
            "the tight box around a digit's rendered pixels. The held-out scenes come from their "
            "own random stream and use only the 20% of scikit-learn digit samples never used for "
            "training."
        )
    else:
        side = model["input_size"]
        story = (
            f"The COCO data set at `{data['path']}`, resized to {side}x{side} (no letterbox); "
            f"a seeded random {data['val_images']} of its images are held out for evaluation."
        )
    size, stride = model["input_size"], model["stride"]
    parity = metrics["export"]["parity_max_rel_diff"]
    parity_batches = ", ".join(str(b) for b in metrics["export"]["parity_batch_sizes"])
    classes = ", ".join(model["class_names"])
    text = f"""# detector

Small single-stage anchor-free object detector (CenterNet/TTFNet style) trained on CPU.

## Interface

| | name | type | shape | meaning |
|---|---|---|---|---|
| input | `{INPUT_NAME}` | FP32 | `[N, 3, {size}, {size}]` | RGB, channels first, 0..1 |
| output | `{OUTPUT_NAME}` | FP32 | `[N, {model["k"]}, 6]` | `(x1, y1, x2, y2, score, class_id)` |

Input: RGB (not BGR) channels-first pixels divided by 255 (no mean/std normalisation: the first
batch norm takes care of it). Resize any image to {size}x{size} first (plain resize, no letterbox).

Output: {model["k"]} rows per image, sorted by score, best first; drop rows under a score
threshold (config.yaml's `score_threshold` suggests {SCORE_THRESHOLD}). Boxes are in pixels of
the {size}x{size} input (multiply by `W/{size}`, `H/{size}` for the original image). `class_id`
is a float holding the class index into: {classes}. The batch size is dynamic (the config allows
up to 16).

Decoding is inside the graph: sigmoid heatmaps, 3x3 max-pool peak suppression (no IoU NMS),
top-{model["k"]} over all classes and cells, boxes from the predicted distances to the four
edges. ONNX opset {OPSET}.

## Training data

{story}

Train images: {data["train_images"]}, held-out images: {data["val_images"]}, seed {data["seed"]}.

## Architecture

4x4 stride-4 patch stem, conv-bn-relu stages down to stride 32, a top-down path with 1x1
laterals back to stride {stride} ({size // stride}x{size // stride} grid), and two heads: a
heatmap logit per class (CenterNet focal loss, Gaussian targets) and the distances from each cell
centre to the box edges (GIoU loss on the central cells of each box, TTFNet style).
{model["parameters"]:,} parameters; ONNX file {model["onnx_bytes"] / 1e6:.1f} MB.

Trained for {train["epochs"]} epochs ({train["steps"]} steps of batch {train["batch_size"]}) with
AdamW and a one-cycle learning rate, forward pass in {train["precision"]}, in
{train["train_seconds"] / 60:.1f} minutes with {train["threads"]} CPU threads.

## Measured quality

Held-out set, pycocotools COCOeval (bbox), measured on the exported ONNX graph:

| metric | value |
|---|---|
| mAP@0.5 | {quality["map50"]:.3f} |
| mAP@0.5:0.95 | {quality["map50_95"]:.3f} |

ONNX Runtime CPU latency ({latency["threads"]} threads, median):

| batch | ms / batch | images / s |
|---|---|---|
| 1 | {b1["ms_per_batch"]} | {b1["images_per_s"]} |
| 8 | {b8["ms_per_batch"]} | {b8["images_per_s"]} |

ONNX Runtime matches PyTorch on fresh random inputs (raw head outputs) and on held-out images
(decoded detections), batch sizes {parity_batches}: the largest relative difference seen was
{parity:.1e} ({PARITY_RULE}). Detections whose scores tie within
that tolerance may come out in either order, so decoded rows are matched, not compared by position
(`training/detector/parity.py`).

## Rebuild

```
{metrics["command"]}
```

(`volley train detector` runs the same thing.) Same seed and threads, same metrics; timings
vary with the machine.
"""
    path = out / "README.md"
    path.write_text(text)
    return path
