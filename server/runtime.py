"""ONNX Runtime: one session per model instance, execution-provider choice, warmup.

Nothing here knows about requests, queues or protocols: an instance takes a dict of numpy arrays
and returns a dict of numpy arrays. On a GPU an instance stages each batch in page-locked
buffers of its own and runs it with IO binding, so the copies to and from the device are direct.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.config import ModelConfig, WarmupConfig, cpu_threads
from server.copies import join_rows
from server.cpus import machine_cpus
from server.datatypes import numpy_dtype
from server.pinned import pinned_empty

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


def provider_settings(config: ModelConfig) -> list[str | tuple[str, dict[str, str]]]:
    """`choose_providers` for a model, with the CUDA provider's options from its config."""
    cuda = {"cudnn_conv_algo_search": config.cudnn_conv_algo_search.upper()}
    return [
        (name, cuda) if name == "CUDAExecutionProvider" else name
        for name in choose_providers(config.execution_providers)
    ]


@cache
def load_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of NVIDIA's pip wheels (onnxruntime-gpu[cuda,cudnn]).

    ONNX Runtime's CUDA provider finds them only on the loader's path otherwise, and without
    them it falls back to the CPU. Libraries already on the path (a CUDA base image,
    LD_LIBRARY_PATH) are used as they are.
    """
    try:
        ort.preload_dlls()
    except Exception as exc:  # old ORT builds, odd installs: the provider reports what it lacks
        log.info(
            "cuda libraries not preloaded", extra={"event": "cuda_preload", "reason": str(exc)}
        )


def device_warmup_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Batch sizes a GPU instance runs at load, so no request meets a shape for the first time.

    Every size up to 64, then powers of two and the largest: the first run of a shape sets up
    kernels and memory, which would otherwise stall a live batch.
    """
    if max_batch_size <= 64:
        return tuple(range(1, max_batch_size + 1))
    sizes = list(range(1, 65)) + [2**k for k in range(7, max_batch_size.bit_length())]
    return tuple(sorted({*sizes, max_batch_size}))


DEVICE_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


class OnnxInstance:
    """One ONNX Runtime session: a model instance that runs one batch at a time.

    `staged`: gather batches in page-locked buffers and run with IO binding (default: when the
    session runs on a GPU). `padded`: a staged batch runs at the buffers' full `max_batch_size`
    rows, so the graph always sees one shape (default: on a GPU, as `pad_device_batches` says).
    `solo`: the version's spare session for batches that run alone (`solo_session`), with a
    thread for each CPU the process may use, not only its worker's share under `--workers N`
    (a lone batch may take the cores the other workers leave idle). Outputs are always fresh
    arrays the caller may keep.
    """

    def __init__(
        self,
        source: Path | bytes,
        config: ModelConfig,
        index: int,
        staged: bool | None = None,
        solo: bool = False,
        padded: bool | None = None,
    ) -> None:
        options = ort.SessionOptions()
        self.threads = machine_cpus() if solo else cpu_threads(config)
        self.solo = solo
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        if not config.intra_op_spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.index = index
        providers = provider_settings(config)
        if "CUDAExecutionProvider" in (p[0] for p in providers if isinstance(p, tuple)):
            load_cuda_libraries()
        self.session = ort.InferenceSession(
            source if isinstance(source, bytes) else str(source), options, providers=providers
        )
        self.provider = self.session.get_providers()[0]
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.output_names = [o.name for o in config.outputs]
        on_device = self.provider in DEVICE_PROVIDERS
        self.staged = on_device if staged is None else staged
        if padded is None:
            padded = on_device and config.pad_device_batches
        self.padded = self.staged and padded and config.max_batch_size > 0
        self.pinned = False  # whether the staging buffers are page-locked (set as they are made)
        self._rows = max(config.max_batch_size, 1)
        self._buffers: dict[tuple, np.ndarray] = {}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph once on ready-made inputs (releases the GIL while it computes)."""
        if self.staged:
            return self._run_bound(inputs)
        results = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, results, strict=True))

    def gather(self, name: str, parts: list[np.ndarray]) -> np.ndarray:
        """The batch of one input: its requests' rows joined, in a staging buffer if staged."""
        first = parts[0]
        if first.dtype == np.object_:
            return first if len(parts) == 1 else np.concatenate(parts)
        rows = sum(len(p) for p in parts)
        if self.staged and rows <= self._rows:
            batch = self._buffer(name, first.dtype, first.shape[1:])[:rows]
        elif len(parts) == 1:
            return first
        else:
            batch = np.empty((rows, *first.shape[1:]), first.dtype)
        return join_rows(parts, batch)

    def _buffer(self, name: str, dtype: np.dtype, item_shape: tuple[int, ...]) -> np.ndarray:
        """This instance's staging buffer for `name` (`max_batch_size` rows), made on first use."""
        key = _buffer_key(name, dtype, item_shape)
        buffer = self._buffers.get(key)
        if buffer is None:
            shape = (self._rows, *item_shape)
            buffer, self.pinned = pinned_empty(shape, dtype, self.provider in DEVICE_PROVIDERS)
            self._buffers[key] = buffer
        return buffer

    def _run_bound(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run with IO binding: inputs from host memory, outputs copied back into host memory."""
        inputs, rows = self._padded(inputs)
        binding = self.session.io_binding()
        for name, value in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        results = binding.copy_outputs_to_cpu()
        if rows is not None:
            results = [result[:rows] for result in results]
        return dict(zip(self.output_names, results, strict=True))

    def _padded(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int | None]:
        """The inputs as whole staging buffers and the batch's rows, where every input is the
        head of its buffer (as `gather` leaves it) and padding is on; else them unchanged."""
        if not self.padded:
            return inputs, None
        whole = {}
        for name, value in inputs.items():
            buffer = self._buffers.get(_buffer_key(name, value.dtype, value.shape[1:]))
            if buffer is None or value.ctypes.data != buffer.ctypes.data:
                return inputs, None
            whole[name] = buffer
        rows = {len(value) for value in inputs.values()}
        return (whole, rows.pop()) if len(rows) == 1 else (inputs, None)


def _buffer_key(name: str, dtype: np.dtype, item_shape: tuple[int, ...]) -> tuple:
    """Which staging buffer holds an input's rows: one per name, dtype and row shape."""
    return (name, dtype.str, item_shape)


def onnx_strings(array: np.ndarray) -> np.ndarray:
    """BYTES elements as the UTF-8 `str` objects ONNX Runtime's string tensors need."""
    out = np.empty(array.shape, dtype=np.object_)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat_in):
        flat_out[i] = item.decode("utf-8") if isinstance(item, bytes) else str(item)
    return out


def load_instances(source: Path | bytes, config: ModelConfig) -> list[OnnxInstance]:
    """Create `instance_count` sessions (and the solo one, `solo_session`, on the CPU) and warm
    each up.

    A configured warmup must succeed (the model is not served otherwise, as in Triton). Without
    one, a zero-data warmup runs best-effort: a graph that cannot take zeros or empty strings
    (say, one that parses its string input) still serves, with a warning in the log. On a GPU
    that default warmup runs the one shape a padded instance runs (`max_batch_size`), or every
    batch size (`device_warmup_sizes`) where padding is off.
    """
    instances = [OnnxInstance(source, config, i) for i in range(config.instance_count)]
    if config.solo_session and instances[0].provider not in DEVICE_PROVIDERS:
        instances.append(OnnxInstance(source, config, config.instance_count, solo=True))
    for instance in instances:
        if config.warmup is not None:
            warm_up(instance, config, config.warmup)
            continue
        default = WarmupConfig()
        if instance.provider in DEVICE_PROVIDERS and config.batching:
            if instance.padded:  # the one shape its batches run at
                sizes: tuple[int, ...] = (config.max_batch_size,)
            else:
                sizes = device_warmup_sizes(config.max_batch_size)
            default = WarmupConfig(batch_sizes=sizes)
        try:
            warm_up(instance, config, default)
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
        for _ in range(warmup.count):  # the live path: staged where the instance stages
            instance.run({name: instance.gather(name, [value]) for name, value in inputs.items()})


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
