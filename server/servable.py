"""What a served model version is to the data plane, and the plain ONNX model that is one.

A `Servable` validates and answers its own requests; the data plane and both front ends talk to
every model through this one interface, whether it runs one ONNX graph through its batcher
(`OnnxModel`) or a pipeline around another model (`server.pipelines`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from server.batcher import Batcher, Tensors
from server.classification import UNCLASSIFIABLE, top_classes
from server.config import ModelConfig, TensorConfig
from server.errors import ErrorKind, VolleyError, invalid
from server.runtime import load_instances, onnx_strings
from server.stats import ModelStats
from server.tracing import Trace
from server.types import InferenceRequest, InferenceResponse, InferTensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FramePolicy:
    """How streams of frames to a model are served: latest-frame-wins, and how old is too old."""

    max_frame_age_ms: int


class Servable(Protocol):
    """One loaded model version as the data plane sees it."""

    config: ModelConfig
    stats: ModelStats
    provider: str
    frame_policy: FramePolicy | None  # None: stream requests are plain concurrent requests
    queue_limit: int  # requests it takes in before `refusal` says it is full
    wraps: tuple[str, ...]  # the repository's models it runs (a pipeline's detector)

    @property
    def ready(self) -> bool:
        """Whether it can take requests now (a pipeline also needs the model it wraps)."""

    async def infer(
        self, request: InferenceRequest, timeout_us: int, deadline_ns: int | None = None
    ) -> InferenceResponse:
        """Validate and answer one request; raises `VolleyError` for the client.

        `timeout_us` bounds the queue wait; `deadline_ns` (perf_counter) instead bounds when
        its batch may start at the latest.
        """

    def refusal(self) -> VolleyError | None:
        """The error a request would get now before any work is done on it (a full queue, an
        unloading version), else None. Front ends ask before decoding a request, so that under
        overload the excess costs as little as possible."""

    async def drain(self) -> None:
        """Refuse new work and return once everything accepted is answered."""

    def abort(self, error: VolleyError) -> None:
        """Fail everything still queued with `error`."""


def queue_timeout_us(timeout_us: int, deadline_ns: int | None) -> int:
    """The queue timeout left before `deadline_ns`; a timeout error if it has passed."""
    if deadline_ns is None:
        return timeout_us
    left_us = (deadline_ns - time.perf_counter_ns()) // 1000
    if left_us <= 0:
        raise VolleyError(ErrorKind.TIMEOUT, "the request's deadline passed before it was queued")
    return left_us


class OnnxModel:
    """An ONNX graph served through the dynamic batcher over its instances."""

    frame_policy = None
    wraps = ()

    def __init__(
        self,
        config: ModelConfig,
        version: int,
        batcher: Batcher,
        stats: ModelStats,
        provider: str,
        metadata: dict[str, str],
        source: Path | None = None,
        labels: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        """`labels`: class labels of the outputs whose config names a `label_filename`."""
        self.config = config
        self.version = str(version)
        self.batcher = batcher
        self.stats = stats
        self.provider = provider
        self.metadata = metadata  # the ONNX file's metadata_props (class names, input size...)
        self.source = source  # the ONNX file, for variants of the graph
        self._input_names = frozenset(spec.name for spec in config.inputs)
        self._outputs = {spec.name: spec for spec in config.outputs}  # in config order
        self.labels = labels or {}
        self.queue_limit = batcher.max_queue
        self._variants: dict[tuple, OnnxModel] = {}
        self._variant_lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return True

    async def infer(
        self, request: InferenceRequest, timeout_us: int, deadline_ns: int | None = None
    ) -> InferenceResponse:
        """Validate against the config before queueing, so a bad request fails alone."""
        inputs, rows = validate_inputs(self.config, self._input_names, request)
        classes = False
        if request.outputs:
            classes = check_outputs(self.config.name, self._outputs, request)
        timeout_us = queue_timeout_us(timeout_us, deadline_ns)
        outputs, _, _ = await self.batcher.infer_timed(inputs, rows, timeout_us, request.trace)
        response = build_response(self.config.name, self.version, self._outputs, request, outputs)
        if classes:
            classify_outputs(response, request, self.labels, self.config.batching)
        return response

    async def infer_tensors(
        self, inputs: Tensors, rows: int, timeout_us: int = 0, trace: Trace | None = None
    ) -> tuple[Tensors, int, int]:
        """Run ready-made, valid tensors through the batcher (for pipelines).

        Returns the outputs, how long the request queued and how long its batch ran (ns).
        """
        return await self.batcher.infer_timed(inputs, rows, timeout_us, trace)

    async def uint8_images(
        self, input_name: str, scale: float, height: int, width: int
    ) -> OnnxModel:
        """This version with uint8 `[N, H, W, 3]` images in place of its float image input.

        The conversion (transpose, cast, times `scale`) runs inside the graph, so on a GPU the
        images cross the bus as bytes and turn into floats on the device. Made once per version
        on first use, with instances and a batcher of its own that count in this version's
        statistics; drained and aborted with it.
        """
        key = (input_name, scale, height, width)
        variant = self._variants.get(key)
        if variant is not None:
            return variant
        async with self._variant_lock:
            if key not in self._variants:
                self._variants[key] = await self._build_uint8(*key)
        return self._variants[key]

    async def _build_uint8(
        self, input_name: str, scale: float, height: int, width: int
    ) -> OnnxModel:
        from server.image_front import uint8_image_graph  # onnx is imported only when needed

        if self.source is None:
            raise ValueError(f"model '{self.config.name}' has no ONNX file to rebuild")
        graph = await asyncio.to_thread(uint8_image_graph, self.source, input_name, scale)
        image = TensorConfig(name=input_name, datatype="UINT8", dims=(height, width, 3))
        config = self.config.model_copy(update={"inputs": (image,), "warmup": None})
        instances = await asyncio.to_thread(load_instances, graph, config)
        log.info(
            "uint8 image variant loaded",
            extra={"event": "uint8_variant_loaded", "model": self.config.name,
                   "version": self.version, "provider": instances[0].provider,
                   "staged": instances[0].staged, "padded": instances[0].padded},
        )  # fmt: skip
        batcher = Batcher(config, instances, self.stats, label=f"{config.name}-uint8")
        return OnnxModel(
            config, int(self.version), batcher, self.stats, instances[0].provider, self.metadata,
            labels=self.labels,
        )  # fmt: skip

    def refusal(self) -> VolleyError | None:
        return self.batcher.refusal()

    async def drain(self) -> None:
        await self.batcher.drain()
        for variant in list(self._variants.values()):
            await variant.drain()

    def abort(self, error: VolleyError) -> None:
        self.batcher.abort(error)
        for variant in self._variants.values():
            variant.abort(error)


def validate_inputs(
    config: ModelConfig, names: frozenset[str], request: InferenceRequest
) -> tuple[dict[str, np.ndarray], int]:
    """Check names (`names`: the config's input names), datatypes and shapes against the
    config; return inputs in config order."""
    given = {tensor.name: tensor for tensor in request.inputs}
    if len(given) != len(request.inputs):
        seen: set[str] = set()
        for tensor in request.inputs:
            if tensor.name in seen:
                raise invalid(f"input '{tensor.name}' is given twice")
            seen.add(tensor.name)
    if not names.issuperset(given):
        unknown = sorted(given.keys() - names)
        raise invalid(
            f"unexpected input {unknown[0]!r} for model '{config.name}', expected {sorted(names)}"
        )
    batching = config.batching
    rows = -1
    inputs: dict[str, np.ndarray] = {}
    for spec in config.inputs:
        tensor = given.get(spec.name)
        if tensor is None:
            raise invalid(f"missing input '{spec.name}' for model '{config.name}'")
        if tensor.datatype != spec.datatype:
            raise invalid(
                f"input '{spec.name}' has datatype {tensor.datatype}, model '{config.name}' "
                f"expects {spec.datatype}"
            )
        shape = tensor.shape
        dims = shape[1:] if batching else shape
        if (batching and not shape) or (  # no batch dimension, or another shape
            dims != spec.dims
            and (
                len(dims) != len(spec.dims)
                or any(d != s and s != -1 for d, s in zip(dims, spec.dims, strict=True))
            )
        ):
            wanted = ("-1",) * batching + tuple(str(d) for d in spec.dims)
            raise invalid(
                f"input '{spec.name}' has shape {list(shape)}, model '{config.name}' expects "
                f"[{', '.join(wanted)}]"
            )
        if batching:
            if not 1 <= shape[0] <= config.max_batch_size:
                raise invalid(
                    f"input '{spec.name}' has batch size {shape[0]}, model '{config.name}' "
                    f"accepts 1 to {config.max_batch_size}"
                )
            if rows not in (-1, shape[0]):
                raise invalid(f"inputs of model '{config.name}' disagree on the batch size")
            rows = shape[0]
        if spec.datatype == "BYTES":
            try:
                inputs[spec.name] = onnx_strings(tensor.data)
            except UnicodeDecodeError:
                raise invalid(f"input '{spec.name}' has BYTES elements that are not UTF-8, "
                              "which ONNX string tensors require") from None  # fmt: skip
        else:
            inputs[spec.name] = tensor.data
    return inputs, max(rows, 1)


def check_outputs(
    model: str, outputs: Mapping[str, TensorConfig], request: InferenceRequest
) -> bool:
    """Every output requested from `model` (whose outputs by name are `outputs`) must exist,
    and be numbers where its classes are asked for; checked before the request is queued.
    Returns whether classes are asked of some output."""
    classes = False
    for output in request.outputs:
        spec = outputs.get(output.name)
        if spec is None:
            raise invalid(
                f"unknown output '{output.name}' requested from model '{model}', "
                f"it has {sorted(outputs)}"
            )
        if output.classification:
            if spec.datatype in UNCLASSIFIABLE:
                raise invalid(
                    f"output '{output.name}' of model '{model}' is {spec.datatype}: "
                    "classification ranks numbers"
                )
            classes = True
    return classes


def classify_outputs(
    response: InferenceResponse,
    request: InferenceRequest,
    labels: Mapping[str, tuple[str, ...]],
    batched: bool,
) -> None:
    """Replace each output the request asked classes of with its top classes (Triton's
    classification extension, `server.classification`)."""
    wanted = {o.name: o.classification for o in request.outputs if o.classification}
    for i, tensor in enumerate(response.outputs):
        count = wanted.get(tensor.name)
        if count:
            data = top_classes(tensor.data, count, labels.get(tensor.name, ()), batched)
            response.outputs[i] = InferTensor(tensor.name, "BYTES", data.shape, data)


def build_response(
    model: str,
    version: str,
    specs: Mapping[str, TensorConfig],
    request: InferenceRequest,
    outputs: dict[str, np.ndarray],
) -> InferenceResponse:
    """Pick the requested outputs (all when none are named; `specs`: the model's outputs by
    name, in config order) and describe them."""
    chosen = [specs[o.name] for o in request.outputs] if request.outputs else specs.values()
    tensors = []
    for spec in chosen:
        data = outputs[spec.name]
        tensors.append(InferTensor(spec.name, spec.datatype, data.shape, data))
    return InferenceResponse(model, version, request.id, tensors)
