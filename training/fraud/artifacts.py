"""Files of a Volley model folder: config.yaml, metrics.json and the ONNX metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MAX_BATCH_SIZE = 1024


def threshold_text(threshold: float) -> str:
    """Shortest decimal that parses back to exactly the float32 threshold used in the graph."""
    return str(np.float32(threshold))


def onnx_metadata(
    threshold: float, target_fpr: float, feature_names: tuple[str, ...], extra: dict[str, str]
) -> dict[str, str]:
    """metadata_props for the exported model: the decision rule plus provenance."""
    return {
        "threshold": threshold_text(threshold),
        "target_fpr": str(target_fpr),
        "feature_names": ",".join(feature_names),
        **extra,
    }


def config_yaml(threshold: float, target_fpr: float, feature_names: tuple[str, ...]) -> str:
    """config.yaml text for Volley's model repository (two outputs, dynamic batching)."""
    quoted = json.dumps  # a JSON string is a valid double-quoted YAML scalar
    return "\n".join(
        [
            "platform: onnx",
            f"max_batch_size: {MAX_BATCH_SIZE}",
            "inputs:",
            f"  - {{name: features, datatype: FP32, dims: [{len(feature_names)}]}}",
            "outputs:",
            "  - {name: score, datatype: FP32, dims: [1]}",
            "  - {name: is_fraud, datatype: BOOL, dims: [1]}",
            "dynamic_batching:",
            "  max_queue_delay_us: 0",
            "  max_queue_size: 4096",
            "instance_count: 1",
            "# One ONNX Runtime thread: a 17-feature MLP gains nothing from parallel",
            "# operators, and a second, spinning thread takes the core the event loop",
            "# needs (bench/RESULTS.md).",
            "intra_op_threads: 1",
            "# Requests read together run as one batch on the event loop instead of waking",
            "# the instance thread: for this model the two hand-offs cost more than the",
            '# batch (docs/batching.md, rule 6; bench/RESULTS.md, "inline batches").',
            "inline_batches: true",
            "# No convolutions to set up again per batch shape: on a GPU, padding every batch",
            f"# to {MAX_BATCH_SIZE} rows would only add copies (docs/model-config.md).",
            "pad_device_batches: false",
            "parameters:",
            f"  threshold: {quoted(threshold_text(threshold))}",
            f"  target_fpr: {quoted(str(target_fpr))}",
            f"  feature_names: {quoted(','.join(feature_names))}",
            "",
        ]
    )


def write_model_folder(
    out: Path, threshold: float, target_fpr: float, feature_names: tuple[str, ...], metrics: dict
) -> None:
    """Write config.yaml and metrics.json into `out` (the ONNX file goes to out/1/model.onnx)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_yaml(threshold, target_fpr, feature_names))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
