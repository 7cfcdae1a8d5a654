"""Model metadata and Triton-style model configuration, shared by both front ends."""

from __future__ import annotations

import json

from server.config import ModelConfig
from server.errors import ErrorKind, VolleyError, invalid
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
                **({"label_filename": t.label_filename} if t.label_filename else {}),
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


def server_metadata(version: str, shared_memory: bool = False) -> dict:
    """The v2 server metadata; `extensions` lists only what Volley implements (and system
    shared memory only where `--allow-client-shm` turned it on)."""
    extensions = [
        "classification",
        "binary_tensor_data",
        "model_configuration",
        "model_repository",
        "model_repository(unload_dependents)",
        "statistics",
        "schedule_policy",
        "parameters",
        "logging",
        "trace",
    ]
    if shared_memory:
        extensions.append("system_shared_memory")
    return {"name": "volley", "version": version, "extensions": extensions}


def load_override(model: str, parameters: dict) -> dict | None:
    """The config override of a load request (`parameters.config`, JSON), as a raw config.

    Takes Triton's JSON model config (what `tritonclient`'s `load_model(config=...)` sends) or
    Volley's own field names; `file:` overrides are not supported.
    """
    if any(str(key).startswith("file:") for key in parameters):
        raise VolleyError(
            ErrorKind.UNSUPPORTED,
            f"failed to load '{model}', file overrides are not supported: put the files in the "
            "model repository",
        )
    text = parameters.get("config")
    if text is None:
        return None
    try:
        doc = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError as exc:
        raise invalid(
            f"failed to load '{model}', config override is not valid JSON: {exc}"
        ) from None
    if not isinstance(doc, dict):
        raise invalid(f"failed to load '{model}', config override must be a JSON object")
    return config_from_triton(doc)


def unload_dependents(parameters: dict) -> bool:
    """The `unload_dependents` parameter of an unload request (tritonclient's
    `unload_model(name, unload_dependents=True)`): also unload the models it runs."""
    value = parameters.get("unload_dependents", False)
    if not isinstance(value, bool):
        raise invalid(f"parameter 'unload_dependents' must be true or false, got {value!r}")
    return value


def config_from_triton(doc: dict) -> dict:
    """Triton's JSON model config -> Volley's raw config (Volley's own field names pass through)."""
    out = {k: v for k, v in doc.items() if k not in TRITON_ONLY}
    if "input" in doc:
        out["inputs"] = [_tensor_from_triton(t) for t in _list(doc["input"], "input")]
    if "output" in doc:
        out["outputs"] = [_tensor_from_triton(t) for t in _list(doc["output"], "output")]
    batching = doc.get("dynamic_batching")
    if isinstance(batching, dict):
        policy = batching.get("default_queue_policy") or {}
        out["dynamic_batching"] = {
            key: value
            for key, value in {
                "preferred_batch_sizes": batching.get("preferred_batch_size"),
                "max_queue_delay_us": batching.get("max_queue_delay_microseconds"),
                # Triton's 0 means unbounded; Volley bounds every queue (its default then)
                "max_queue_size": policy.get("max_queue_size") or None,
                "default_timeout_us": policy.get("default_timeout_microseconds"),
            }.items()
            if value is not None
        }
    groups = doc.get("instance_group")
    if groups:
        groups = _list(groups, "instance_group")
        out["instance_count"] = sum(int(g.get("count", 1)) for g in groups)
        if all(g.get("kind") == "KIND_CPU" for g in groups):
            out["execution_providers"] = ["cpu"]
    if isinstance(doc.get("parameters"), dict):
        out["parameters"] = {
            k: v.get("string_value", "") if isinstance(v, dict) else v
            for k, v in doc["parameters"].items()
        }
    policy = doc.get("version_policy")
    if isinstance(policy, dict):
        if "latest" in policy:
            out["version_policy"] = {"latest": int(policy["latest"].get("num_versions", 1))}
        elif "specific" in policy:
            out["version_policy"] = {"specific": policy["specific"].get("versions", [])}
        elif "all" in policy:
            out["version_policy"] = {"all": True}
    return out


# Triton fields translated above, or meaningless to Volley (the backend is always ONNX Runtime).
TRITON_ONLY = {
    "input", "output", "dynamic_batching", "instance_group", "parameters", "version_policy",
    "platform", "backend", "name", "runtime", "default_model_filename", "optimization",
}  # fmt: skip


def _tensor_from_triton(tensor: object) -> dict:
    if not isinstance(tensor, dict) or "name" not in tensor:
        raise invalid("config override: every input and output needs a 'name'")
    datatype = str(tensor.get("data_type", ""))
    datatype = "BYTES" if datatype == "TYPE_STRING" else datatype.removeprefix("TYPE_")
    return {"name": tensor["name"], "datatype": datatype, "dims": list(tensor.get("dims", []))}


def _list(value: object, field: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise invalid(f"config override: '{field}' must be a list of objects")
    return value
