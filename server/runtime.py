"""ONNX Runtime: one session per model instance, execution-provider choice, warmup.

Nothing here knows about requests, queues or protocols: an instance takes a dict of numpy arrays
and returns a dict of numpy arrays.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.config import ModelConfig, WarmupConfig, cpu_threads
from server.datatypes import numpy_dtype

log = logging.getLogger(__name__)

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def choose_providers(preference: tuple[str, ...]) -> list[str]:
    """The preferred execution providers this ONNX Runtime build has, CPU always last."""
    available = set(ort.get_available_providers())
    chosen = [PROVIDER_NAMES[p] for p in preference if PROVIDER_NAMES[p] in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class OnnxInstance:
    """One ONNX Runtime session: a model instance that runs one batch at a time."""

    def __init__(self, model_file: Path, config: ModelConfig, index: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_threads(config)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        if not config.intra_op_spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.index = index
        self.session = ort.InferenceSession(
            str(model_file), options, providers=choose_providers(config.execution_providers)
        )
        self.provider = self.session.get_providers()[0]
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.output_names = [o.name for o in config.outputs]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph once on ready-made inputs (releases the GIL while it computes)."""
        results = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, results, strict=True))


def onnx_strings(array: np.ndarray) -> np.ndarray:
    """BYTES elements as the UTF-8 `str` objects ONNX Runtime's string tensors need."""
    out = np.empty(array.shape, dtype=np.object_)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat_in):
        flat_out[i] = item.decode("utf-8") if isinstance(item, bytes) else str(item)
    return out


def load_instances(model_file: Path, config: ModelConfig) -> list[OnnxInstance]:
    """Create `instance_count` sessions and warm each up.

    A configured warmup must succeed (the model is not served otherwise, as in Triton). Without
    one, a zero-data warmup runs best-effort: a graph that cannot take zeros or empty strings
    (say, one that parses its string input) still serves, with a warning in the log.
    """
    instances = [OnnxInstance(model_file, config, i) for i in range(config.instance_count)]
    for instance in instances:
        if config.warmup is not None:
            warm_up(instance, config, config.warmup)
            continue
        try:
            warm_up(instance, config, WarmupConfig())
        except Exception as exc:  # ORT raises several types; any means "zeros don't fit"
            log.warning(
                "default warmup failed; serving without it (configure warmup to supply data)",
                extra={"event": "warmup_skipped", "model": config.name, "reason": str(exc)},
            )
            break
    return instances


def warm_up(instance: OnnxInstance, config: ModelConfig, warmup: WarmupConfig) -> None:
    """Run warmup requests on one instance; raises if the model fails on them."""
    rng = np.random.default_rng(0)
    sizes = warmup.batch_sizes if config.batching else (1,)
    for batch in sizes:
        batch = min(batch, config.max_batch_size) if config.batching else batch
        inputs = {}
        for tensor in config.inputs:
            dims = tuple(1 if d == -1 else d for d in tensor.dims)
            shape = ((batch,) + dims) if config.batching else dims
            given = warmup.inputs.get(tensor.name)
            inputs[tensor.name] = sample_tensor(
                tensor.datatype, shape, warmup.data, rng, None if given is None else given.value
            )
        for _ in range(warmup.count):
            instance.run(inputs)


def sample_tensor(
    datatype: str,
    shape: tuple[int, ...],
    kind: str,
    rng: np.random.Generator,
    value: bool | int | float | str | None = None,
) -> np.ndarray:
    """A warmup tensor of a v2 datatype: every element `value`, else zero or random."""
    dtype = numpy_dtype(datatype)
    if datatype == "BYTES":
        return np.full(shape, "" if value is None else str(value), dtype=np.object_)
    if value is not None:
        return np.full(shape, value, dtype=dtype)
    if kind == "zero":
        return np.zeros(shape, dtype=dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.integers(0, 8, shape).astype(dtype)
