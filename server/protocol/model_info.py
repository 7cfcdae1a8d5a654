"""Model metadata and Triton-style model configuration, shared by both front ends."""

from __future__ import annotations

from server.config import ModelConfig
from server.repository import ModelVersion

TRITON_TYPE = {"BYTES": "TYPE_STRING"}


def platform(config: ModelConfig) -> tuple[str, str]:
    """(platform, backend) as Triton names them: ONNX Runtime, or Volley's own pipelines."""
    if config.platform == "volley_detection":
        return "volley_detection", "volley"
    return "onnxruntime_onnx", "onnxruntime"


def model_metadata(served: ModelVersion, versions: list[int]) -> dict:
    """The v2 model metadata: names, datatypes and shapes with -1 for batch and variable dims."""
    config = served.config
    batch = [-1] if config.batching else []

    def tensors(specs) -> list[dict]:
        return [
            {"name": t.name, "datatype": t.datatype, "shape": batch + list(t.dims)} for t in specs
        ]

    return {
        "name": config.name,
        "versions": [str(v) for v in versions],
        "platform": platform(config)[0],
        "inputs": tensors(config.inputs),
        "outputs": tensors(config.outputs),
    }


def triton_config(config: ModelConfig, provider: str) -> dict:
    """The model's config in the JSON form of Triton's `ModelConfig` message."""

    def tensors(specs) -> list[dict]:
        return [
            {
                "name": t.name,
                "data_type": TRITON_TYPE.get(t.datatype, f"TYPE_{t.datatype}"),
                "dims": list(t.dims),
                **({"optional": True} if t.optional else {}),
            }
            for t in specs
        ]

    name, backend = platform(config)
    out: dict = {
        "name": config.name,
        "platform": name,
        "backend": backend,
        "max_batch_size": config.max_batch_size,
        "input": tensors(config.inputs),
        "output": tensors(config.outputs),
        "instance_group": [
            {
                "name": f"{config.name}_0",
                "count": config.instance_count,
                "kind": "KIND_CPU" if provider == "CPUExecutionProvider" else "KIND_GPU",
            }
        ],
        "version_policy": _version_policy(config),
        "parameters": {k: {"string_value": v} for k, v in config.parameters.items()},
    }
    batching = config.dynamic_batching
    if batching is not None:
        out["dynamic_batching"] = {
            "preferred_batch_size": list(batching.preferred_batch_sizes),
            "max_queue_delay_microseconds": batching.max_queue_delay_us,
            "default_queue_policy": {
                "max_queue_size": batching.max_queue_size,
                "default_timeout_microseconds": batching.default_timeout_us,
            },
        }
    return out


def _version_policy(config: ModelConfig) -> dict:
    policy = config.version_policy
    if policy.specific is not None:
        return {"specific": {"versions": list(policy.specific)}}
    if policy.latest is not None and not policy.all:
        return {"latest": {"num_versions": policy.latest}}
    return {"all": {}}


def server_metadata(version: str) -> dict:
    """The v2 server metadata; `extensions` lists only what Volley implements."""
    return {
        "name": "volley",
        "version": version,
        "extensions": [
            "binary_tensor_data",
            "model_configuration",
            "model_repository",
            "statistics",
            "schedule_policy",
            "parameters",
        ],
    }
