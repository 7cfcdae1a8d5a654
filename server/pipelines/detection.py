"""The detection pipeline: images in, boxes in original pixels out, served as a model.

Per request: decode and letterbox each image on the pipeline's thread pool, run the wrapped
detector through its own dynamic batcher (so images of many requests and streams share batches),
then read the raw output, filter, run per-class NMS, map boxes back and pack the output tensors,
again on the pool. The event loop only hands work over. The wrapped model is looked up per
request, so a reload of the detector is picked up without reloading the pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from server.config import ConfigError
from server.cpus import usable_cpus
from server.datatypes import numpy_dtype
from server.errors import ErrorKind, VolleyError, invalid, raise_if_set, unavailable
from server.pipelines.config import DetectionConfig, pipeline_model_config
from server.pipelines.decoders import DecoderPool
from server.pipelines.images import Letterboxed, check_size, decode_image, letterbox
from server.pipelines.layouts import (
    NEEDS_NMS,
    check_dims,
    class_count,
    detect_layout,
    metadata_class_names,
    metadata_input_size,
    read_candidates,
)
from server.pipelines.postprocess import (
    DetectOptions,
    detect_options,
    pack,
    select,
    to_original,
)
from server.servable import FramePolicy, OnnxModel, check_outputs, queue_timeout_us
from server.stats import ModelStats
from server.tracing import Trace
from server.types import InferenceRequest, InferenceResponse, InferTensor

log = logging.getLogger(__name__)

ModelLookup = Callable[[str], OnnxModel]


@dataclass(frozen=True)
class DetectorPlan:
    """How to feed and read one loaded version of the wrapped detector."""

    detector: OnnxModel
    input_name: str
    input_dtype: np.dtype
    height: int
    width: int
    batch_dim: bool  # False: a detector with a fixed batch of 1 (its input is [1, 3, H, W])
    max_rows: int
    output_name: str
    layout: str
    class_names: tuple[str, ...]


def plan_detector(config: DetectionConfig, detector: OnnxModel) -> DetectorPlan:
    """Check that `detector` can serve this pipeline and work out how to feed and read it."""
    model = detector.config
    where = f"pipeline '{config.name}': detector '{config.detector}'"
    if len(model.inputs) != 1 or model.inputs[0].datatype not in ("FP32", "FP16"):
        raise ConfigError(f"{where} must have one FP32 or FP16 image input")
    spec = model.inputs[0]
    dims, batch_dim = spec.dims, model.batching
    if not batch_dim:
        if len(dims) != 4 or dims[0] != 1:
            raise ConfigError(f"{where}: input dims {list(dims)} are not [N, 3, H, W]")
        dims = dims[1:]
    if len(dims) != 3 or dims[0] not in (3, -1):
        raise ConfigError(f"{where}: input dims {list(dims)} are not [N, 3, H, W]")
    metadata = detector.metadata
    size = config.input_size or (
        (dims[1], dims[2]) if dims[1] > 0 and dims[2] > 0 else metadata_input_size(metadata)
    )
    if size is None:
        raise ConfigError(f"{where} has a dynamic input size: set 'input_size' in config.yaml")
    out = model.outputs[0]
    out_dims = out.dims if batch_dim else out.dims[1:]
    layout = config.layout
    if layout == "auto":
        layout = detect_layout(out_dims, metadata)
    check_dims(layout, out_dims)
    names = config.class_names or metadata_class_names(metadata)
    if names is None and "classes" in model.parameters:
        names = tuple(n.strip() for n in model.parameters["classes"].split(","))
    if names is None:
        names = tuple(str(i) for i in range(class_count(layout, out_dims) or 0))
    return DetectorPlan(
        detector=detector,
        input_name=spec.name,
        input_dtype=numpy_dtype(spec.datatype),
        height=int(size[0]),
        width=int(size[1]),
        batch_dim=batch_dim,
        max_rows=model.max_batch_size if batch_dim else 1,
        output_name=out.name,
        layout=layout,
        class_names=names,
    )


@dataclass
class Prepared:
    """One image ready for the detector, and how to map its boxes back."""

    tensor: np.ndarray  # [3, H, W] in the detector's dtype, or uint8 [H, W, 3] for the graph
    geometry: Letterboxed


class DetectionPipeline:
    """A `Servable` that wraps a detector model of the repository."""

    def __init__(self, config: DetectionConfig, lookup: ModelLookup, stats: ModelStats) -> None:
        self.detection = config
        self.config = pipeline_model_config(config)
        self._outputs = {spec.name: spec for spec in self.config.outputs}
        self.version = "1"
        self.stats = stats
        self.provider = "CPUExecutionProvider"  # pre/post-processing runs on the host
        self.frame_policy = FramePolicy(config.max_frame_age_ms)
        self.wraps = (config.detector,)
        self.queue_limit = config.max_queue_size
        self._lookup = lookup
        self._plan: DetectorPlan | None = None
        workers = config.workers or usable_cpus()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"pipeline-{config.name}")
        self._active = 0
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._host_only: weakref.WeakSet[OnnxModel] = weakref.WeakSet()
        plan = self.plan()  # refuse to load while the detector is missing or does not fit
        self.decoders = (  # only once it loads: a refused pipeline leaves no process behind
            DecoderPool(config.decode_processes, config.name, config.decode_timeout_ms / 1000)
            if config.decode_processes
            else None
        )
        self._warming = asyncio.get_running_loop().create_task(self._warm(plan))

    @property
    def ready(self) -> bool:
        try:
            self.plan()
        except VolleyError:
            return False
        return True

    def plan(self) -> DetectorPlan:
        """The plan for the detector version serving now (re-made when it was reloaded)."""
        try:
            detector = self._lookup(self.detection.detector)
        except VolleyError as exc:
            raise unavailable(
                f"model '{self.config.name}' wraps model '{self.detection.detector}', "
                f"which cannot serve: {exc.message}"
            ) from None
        if self._plan is None or self._plan.detector is not detector:
            try:
                self._plan = plan_detector(self.detection, detector)
            except ConfigError as exc:
                raise unavailable(str(exc)) from None
        return self._plan

    async def _warm(self, plan: DetectorPlan) -> None:
        """Make the detector variant this pipeline feeds before the first request needs it."""
        with contextlib.suppress(VolleyError):  # each request reports it
            await self._feed(plan)

    async def _feed(self, plan: DetectorPlan) -> tuple[OnnxModel, bool]:
        """The model to run and whether it takes uint8 images (see `image_conversion`)."""
        mode = self.detection.image_conversion
        detector = plan.detector
        if mode == "host" or not plan.batch_dim or detector in self._host_only:
            return detector, False
        try:
            variant = await detector.uint8_images(
                plan.input_name, self.detection.pixel_scale, plan.height, plan.width
            )
        except Exception as exc:  # onnx missing, a graph that cannot be edited, ORT errors
            if mode == "graph":
                raise unavailable(
                    f"model '{self.config.name}': image_conversion 'graph' failed for detector "
                    f"'{self.detection.detector}': {exc}"
                ) from None
            log.warning(
                "converting images on the host: the detector graph could not take uint8 images",
                extra={"event": "image_conversion", "model": self.config.name, "reason": str(exc)},
            )
            self._host_only.add(detector)
            return detector, False
        return variant, True

    def refusal(self) -> VolleyError | None:
        if self._draining:
            return unavailable(f"model '{self.config.name}' is unloading")
        if self._active >= self.detection.max_queue_size:
            return VolleyError(
                ErrorKind.QUEUE_FULL,
                f"model '{self.config.name}' has {self._active} requests in progress "
                f"(max_queue_size {self.detection.max_queue_size})",
            )
        return None

    async def infer(
        self, request: InferenceRequest, timeout_us: int, deadline_ns: int | None = None
    ) -> InferenceResponse:
        """Detect objects in every image of the request.

        `deadline_ns` bounds when the detector's batch may start (a stream frame's age limit).
        """
        raise_if_set(self.refusal())
        started = time.perf_counter_ns()
        self._active += 1
        self._idle.clear()
        try:
            response = await self._detect(request, timeout_us, deadline_ns, started)
        except VolleyError:
            self.stats.record_failure(time.perf_counter_ns() - started)
            raise
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()
        self.stats.record_success(time.perf_counter_ns() - started)
        return response

    async def _detect(
        self, request: InferenceRequest, timeout_us: int, deadline_ns: int | None, started: int
    ) -> InferenceResponse:
        plan = self.plan()
        options = detect_options(request.parameters, self.detection, plan.class_names)
        if check_outputs(self.config.name, self._outputs, request):
            raise invalid(f"model '{self.config.name}' answers detections, not classes: "
                          "classification cannot be asked of its outputs")  # fmt: skip
        loop = asyncio.get_running_loop()
        model, uint8 = await self._feed(plan)

        t0 = time.perf_counter_ns()
        prepared = await asyncio.gather(*self._prepare(request, plan, options, uint8))
        t1 = time.perf_counter_ns()
        raw, queue_ns, compute_ns = await self._run_detector(
            plan, model, prepared, queue_timeout_us(timeout_us, deadline_ns), request.trace
        )
        t2 = time.perf_counter_ns()
        geometry = [p.geometry for p in prepared]
        outputs = await loop.run_in_executor(self._pool, _postprocess, plan, raw, geometry, options)
        t3 = time.perf_counter_ns()

        self.stats.record_pipeline(len(prepared), t1 - t0, queue_ns, t2 - t1, t3 - t2)
        parameters: dict = {
            "decode_us": (t1 - t0) // 1000,
            "queue_us": queue_ns // 1000,
            "inference_us": compute_ns // 1000,
            "nms_us": (t3 - t2) // 1000,
            "total_us": (t3 - started) // 1000,
        }
        if len(prepared) == 1:
            parameters["image_width"] = prepared[0].geometry.width
            parameters["image_height"] = prepared[0].geometry.height
        if "capture_ts" in request.parameters:
            parameters["capture_ts"] = request.parameters["capture_ts"]
        wanted = [o.name for o in request.outputs] or list(outputs)
        tensors = [
            InferTensor(name, spec.datatype, outputs[name].shape, outputs[name])
            for spec in self.config.outputs
            if (name := spec.name) in wanted
        ]
        return InferenceResponse(self.config.name, self.version, request.id, tensors, parameters)

    def _prepare(
        self, request: InferenceRequest, plan: DetectorPlan, options: DetectOptions, uint8: bool
    ) -> list[Awaitable[Prepared]]:
        """Per image: decode (or take pixels), letterbox, to tensor, on the thread pool or
        (encoded images, `decode_processes`) in the decoder processes."""
        tensor = _image_input(request, self.config.name)
        limit = self.detection.max_images
        if tensor.name == "images":
            if len(tensor.shape) != 1:
                raise invalid(f"input 'images' must have shape [N], got {list(tensor.shape)}")
            count = tensor.shape[0]
        else:
            if len(tensor.shape) not in (3, 4) or tensor.shape[-1] != 3:
                raise invalid(
                    f"input 'pixels' must have shape [H, W, 3] or [N, H, W, 3], "
                    f"got {list(tensor.shape)}"
                )
            count = tensor.shape[0] if len(tensor.shape) == 4 else 1
        if not 1 <= count <= limit:
            raise invalid(f"{count} images in one request; model '{self.config.name}' takes "
                          f"1 to {limit}")  # fmt: skip
        settings = (plan, self.detection.pad_value, None if uint8 else self.detection.pixel_scale)
        max_pixels = self.detection.max_image_pixels
        loop = asyncio.get_running_loop()
        if tensor.name == "images":
            items = [(item, f"image {i}") for i, item in enumerate(tensor.data.reshape(-1))]
            for item, what in items:
                if not isinstance(item, bytes):
                    raise invalid(f"{what}: expected encoded image bytes")
            if self.decoders is not None:
                decode = self._decode_elsewhere
                return [decode(item, what, max_pixels, *settings) for item, what in items]
            return [
                loop.run_in_executor(
                    self._pool, _prepare_encoded, item, what, max_pixels, *settings
                )
                for item, what in items
            ]
        pixels = tensor.data if len(tensor.shape) == 4 else tensor.data[None]
        check_size(pixels.shape[2], pixels.shape[1], "pixels", max_pixels)
        return [
            loop.run_in_executor(self._pool, _prepare_pixels, image, options.bgr, *settings)
            for image in pixels
        ]

    async def _decode_elsewhere(
        self,
        data: bytes,
        what: str,
        max_pixels: int,
        plan: DetectorPlan,
        pad: int,
        scale: float | None,
    ) -> Prepared:
        """`_prepare_encoded`, with the decode and letterbox in a decoder process."""
        assert self.decoders is not None
        boxed = await self.decoders.letterbox(data, what, plan.height, plan.width, pad, max_pixels)
        if scale is None:
            return Prepared(boxed.pixels, boxed)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _to_float, boxed, plan, scale)

    async def _run_detector(
        self,
        plan: DetectorPlan,
        model: OnnxModel,
        prepared: list[Prepared],
        timeout_us: int,
        trace: Trace | None,
    ) -> tuple[np.ndarray, int, int]:
        """Feed the detector in chunks of at most its batch size; join the raw outputs. Each
        chunk is a request to the detector: with a `trace`, one traced as its child."""
        loop = asyncio.get_running_loop()
        chunks = [prepared[i : i + plan.max_rows] for i in range(0, len(prepared), plan.max_rows)]

        async def run(chunk: list[Prepared]) -> tuple[np.ndarray, int, int]:
            if len(chunk) == 1:
                batch = chunk[0].tensor[None]
            else:
                batch = await loop.run_in_executor(self._pool, np.stack, [p.tensor for p in chunk])
            child = None if trace is None else trace.child(model.config.name, model.version)
            if child is not None:
                child.stamp("REQUEST_START")
            try:
                outputs, queue_ns, compute_ns = await model.infer_tensors(
                    {plan.input_name: batch}, len(chunk), timeout_us, child
                )
            finally:
                if child is not None:
                    child.stamp("REQUEST_END")
            return outputs[plan.output_name], queue_ns, compute_ns

        try:
            done = await asyncio.gather(*(run(chunk) for chunk in chunks))
        except VolleyError as exc:
            if exc.kind is ErrorKind.INTERNAL:
                raise VolleyError(ErrorKind.INTERNAL, f"detector failed: {exc.message}") from None
            raise
        raw = done[0][0] if len(done) == 1 else np.concatenate([d[0] for d in done])
        return raw, max(d[1] for d in done), max(d[2] for d in done)

    async def drain(self) -> None:
        """Refuse new requests and wait for the ones in progress."""
        self._draining = True
        await self._idle.wait()
        self._pool.shutdown(wait=False)
        if self.decoders is not None:
            self.decoders.close()

    def abort(self, error: VolleyError) -> None:
        """Nothing queues inside the pipeline itself; its detector's queue is aborted there."""
        self._draining = True


def _image_input(request: InferenceRequest, model: str) -> InferTensor:
    """The request's one image input, `images` (encoded, BYTES) or `pixels` (UINT8)."""
    expected = {"images": "BYTES", "pixels": "UINT8"}
    names = [t.name for t in request.inputs]
    unknown = [n for n in names if n not in expected]
    if unknown or len(names) != 1:
        raise invalid(
            f"model '{model}' takes exactly one input: 'images' (BYTES [N], encoded JPEG, PNG, "
            f"WebP or BMP) or 'pixels' (UINT8 [N, H, W, 3]); got {names}"
        )
    tensor = request.inputs[0]
    if tensor.datatype != expected[tensor.name]:
        raise invalid(
            f"input '{tensor.name}' has datatype {tensor.datatype}, model '{model}' expects "
            f"{expected[tensor.name]}"
        )
    return tensor


def _prepare_encoded(
    data: bytes, what: str, max_pixels: int, plan: DetectorPlan, pad: int, scale: float | None
) -> Prepared:
    decoded = decode_image(data, what, max_pixels, fit=(plan.height, plan.width))
    return _to_tensor(decoded.rgb, plan, pad, scale, (decoded.width, decoded.height))


def _prepare_pixels(
    image: np.ndarray, bgr: bool, plan: DetectorPlan, pad: int, scale: float | None
) -> Prepared:
    rgb = np.ascontiguousarray(image[..., ::-1]) if bgr else np.ascontiguousarray(image)
    return _to_tensor(rgb, plan, pad, scale)


def _to_tensor(
    rgb: np.ndarray,
    plan: DetectorPlan,
    pad: int,
    scale: float | None,
    size: tuple[int, int] | None = None,
) -> Prepared:
    """Letterbox; then the detector's float [3, H, W], or (scale None) the uint8 pixels."""
    boxed = letterbox(rgb, plan.height, plan.width, pad, size)
    if scale is None:
        return Prepared(boxed.pixels, boxed)
    return _to_float(boxed, plan, scale)


def _to_float(boxed: Letterboxed, plan: DetectorPlan, scale: float) -> Prepared:
    """The detector's float [3, H, W] input from letterboxed uint8 pixels (host conversion)."""
    chw = boxed.pixels.transpose(2, 0, 1).astype(plan.input_dtype)
    chw *= plan.input_dtype.type(scale)
    return Prepared(chw, boxed)


def _postprocess(
    plan: DetectorPlan,
    raw: np.ndarray,
    geometry: list[Letterboxed],
    options: DetectOptions,
) -> dict[str, np.ndarray]:
    """The detector's raw output -> the pipeline's output tensors, boxes in original pixels."""
    nms = NEEDS_NMS[plan.layout]
    results = []
    for per_image, boxed in zip(raw, geometry, strict=True):
        found = read_candidates(plan.layout, per_image, options.score_threshold)
        results.append(to_original(select(found, options, nms), boxed))
    return pack(results, plan.class_names)
