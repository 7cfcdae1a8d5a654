"""The `config.yaml` schema of a detection pipeline, and the model config it shows clients.

A pipeline folder holds only a `config.yaml` with `pipeline: detection`; it names the detector
model it wraps (a model of the same repository) and how to feed and read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from server.config import ModelConfig, TensorConfig, _Strict, validate


class DetectionConfig(_Strict):
    """Everything about a detection pipeline that `config.yaml` may set."""

    name: str
    pipeline: Literal["detection"]
    detector: str = Field(description="the repository model that does the inference")
    layout: Literal["auto", "volley", "yolov8", "yolov5", "end2end"] = "auto"
    input_size: tuple[int, int] | None = Field(
        None, description="(height, width) of the detector input; default: from its graph"
    )
    pad_value: int = Field(114, ge=0, le=255, description="letterbox padding grey level")
    pixel_scale: float = Field(1 / 255, gt=0, description="pixel value multiplier")
    image_conversion: Literal["auto", "host", "graph"] = Field(
        "auto",
        description="where uint8 pixels become the detector's floats: 'graph' (inside the "
        "detector graph: on a GPU the images cross the bus as bytes), 'host' (numpy, on the "
        "pipeline's threads), 'auto' (graph, or host where the graph cannot be rebuilt)",
    )
    score_threshold: float = Field(0.3, ge=0, le=1)
    iou_threshold: float = Field(0.5, ge=0, le=1)
    max_detections: int = Field(100, ge=1, le=10_000)
    class_names: tuple[str, ...] | None = None
    max_images: int = Field(64, ge=1, le=4096, description="images in one request")
    max_image_pixels: int = Field(40_000_000, ge=1, description="width x height, from the header")
    max_frame_age_ms: int = Field(1000, ge=1, description="older stream frames are skipped")
    workers: int = Field(0, ge=0, le=256, description="decode/NMS threads; 0 = CPU cores")
    decode_processes: int = Field(
        0,
        ge=0,
        le=256,
        description="processes that decode and letterbox encoded images, outside the server "
        "process; 0 = decode on the pipeline's threads",
    )
    decode_timeout_ms: int = Field(
        10_000,
        ge=1,
        description="with decode_processes: an image not decoded within this time fails with "
        "500 and its decoder process is killed and replaced (a codec stuck on a hostile image "
        "cannot hold a decoder forever)",
    )
    max_queue_size: int = Field(
        64, ge=1, description="requests in progress (decode, detector, NMS) before 429"
    )


def parse_detection_config(raw: dict, config_path: Path) -> DetectionConfig:
    """Validate a pipeline's raw config mapping; errors name the file and the field."""
    return validate(DetectionConfig, raw, config_path)


def pipeline_model_config(config: DetectionConfig) -> ModelConfig:
    """The v2 view of a pipeline: its inputs, outputs and settings, as metadata shows them."""
    return ModelConfig(
        name=config.name,
        platform="volley_detection",
        inputs=(
            TensorConfig(name="images", datatype="BYTES", dims=(-1,), optional=True),
            TensorConfig(name="pixels", datatype="UINT8", dims=(-1, -1, -1, 3), optional=True),
        ),
        outputs=(
            TensorConfig(name="num_detections", datatype="INT32", dims=(-1,)),
            TensorConfig(name="boxes", datatype="FP32", dims=(-1, -1, 4)),
            TensorConfig(name="scores", datatype="FP32", dims=(-1, -1)),
            TensorConfig(name="class_ids", datatype="INT32", dims=(-1, -1)),
            TensorConfig(name="class_names", datatype="BYTES", dims=(-1, -1)),
        ),
        execution_providers=("cpu",),
        parameters={
            "detector": config.detector,
            "layout": config.layout,
            "image_conversion": config.image_conversion,
            "score_threshold": str(config.score_threshold),
            "iou_threshold": str(config.iou_threshold),
            "max_detections": str(config.max_detections),
            "max_images": str(config.max_images),
            "max_image_pixels": str(config.max_image_pixels),
            "max_frame_age_ms": str(config.max_frame_age_ms),
            "max_queue_size": str(config.max_queue_size),
        },
    )
