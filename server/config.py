"""Model configuration: the `config.yaml` schema, auto-completion from the ONNX graph, validation.

A model folder may hold no config at all: names, datatypes and shapes come from the graph, and a
graph whose first dimension is dynamic is served with dynamic batching. Whatever the config does
say is checked against the graph, and every problem names the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import onnxruntime as ort
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from server.cpus import usable_cpus
from server.datatypes import ONNX_TO_V2, V2_TO_NUMPY

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.onnx"
DEFAULT_MAX_BATCH_SIZE = 64


class ConfigError(Exception):
    """A config or model file that cannot be served; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorConfig(_Strict):
    """One input or output. `dims` excludes the batch dimension; -1 marks a variable size."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False
    label_filename: str | None = None  # an output's class labels, a file in the model folder

    @field_validator("label_filename")
    @classmethod
    def _plain_file_name(cls, value: str | None) -> str | None:
        if value is not None and (
            not value or value.startswith(".") or any(c in value for c in "/\\\0")
        ):
            raise ValueError(f"label_filename must name a file in the model folder, got {value!r}")
        return value

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        if value not in V2_TO_NUMPY:
            raise ValueError(f"unknown datatype '{value}', expected one of {sorted(V2_TO_NUMPY)}")
        return value

    @field_validator("dims")
    @classmethod
    def _valid_dims(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(d == 0 or d < -1 for d in value):
            raise ValueError(f"dims must be positive or -1, got {list(value)}")
        return value


# Every model's queue is bounded, batching or not: past it, 429 / RESOURCE_EXHAUSTED.
DEFAULT_MAX_QUEUE_SIZE = 1024


class DynamicBatchingConfig(_Strict):
    """Triton's dynamic batcher settings."""

    max_queue_delay_us: int = Field(0, ge=0)
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = Field(
        DEFAULT_MAX_QUEUE_SIZE, ge=1, description="queued requests before 429 (no unbounded queue)"
    )
    default_timeout_us: int = Field(0, ge=0, description="queue timeout; 0 = none")


class WarmupInput(_Strict):
    """Sample data for one input: every element is `value` (e.g. "7" for a parsed string)."""

    value: bool | int | float | str


class WarmupConfig(_Strict):
    """Requests run on every instance at load; the model is not ready until they succeed."""

    batch_sizes: tuple[int, ...] = (1,)
    count: int = Field(1, ge=0)
    data: Literal["zero", "random"] = "zero"
    inputs: dict[str, WarmupInput] = {}


class VersionPolicy(_Strict):
    """Which version folders to serve: all of them, the latest N, or a specific list."""

    all: bool = False
    latest: int | None = Field(None, ge=1)
    specific: tuple[int, ...] | None = None

    def select(self, available: list[int]) -> list[int]:
        """The versions to load out of the ones on disk."""
        ordered = sorted(available)
        if self.specific is not None:
            return [v for v in ordered if v in self.specific]
        if self.latest is not None and not self.all:
            return ordered[-self.latest :]
        return ordered


class ModelConfig(_Strict):
    """Everything Volley needs to serve one model (all versions share it)."""

    name: str
    platform: Literal["onnx", "onnxruntime_onnx", "volley_detection"] = "onnx"
    max_batch_size: int = Field(0, ge=0)
    inputs: tuple[TensorConfig, ...] = ()
    outputs: tuple[TensorConfig, ...] = ()
    dynamic_batching: DynamicBatchingConfig | None = None
    instance_count: int = Field(1, ge=1, le=64)
    execution_providers: tuple[Literal["cuda", "tensorrt", "cpu"], ...] = ("cuda", "cpu")
    intra_op_threads: int = Field(0, ge=0, description="0 = cores / instance_count")
    intra_op_spinning: bool = Field(
        True, description="ORT threads spin between ops (lower latency; burns CPU others need)"
    )
    solo_session: bool = Field(
        False,
        description="a batch that starts while no other batch of the version runs takes a "
        "spare session with all the usable CPUs' threads (also the other workers' under "
        "--workers N) instead of its instance's share (CPU only; needs instance_count >= 2)",
    )
    inline_max_us: int = Field(
        200,
        ge=0,
        description="a lone one-row request to an idle model whose one-row runs take less than "
        "this (measured) runs on the event loop, skipping two thread hand-offs; 0 = never",
    )
    inline_batches: bool = Field(
        False,
        description="with inline runs on (CPU only): requests that arrive while others are held "
        "also run on the event loop, as one batch per loop pass, instead of waking an instance "
        "thread; for tiny models on few cores, where the hand-offs cost more than the runs",
    )
    pad_device_batches: bool = Field(
        True,
        description="on a GPU, run every batch at max_batch_size rows (the rows past the batch "
        "are ignored): a new batch shape makes cuDNN set its convolutions up again, which cost "
        "more CPU time than the whole batch takes on the GPU (bench/RESULTS.md)",
    )
    cudnn_conv_algo_search: Literal["heuristic", "exhaustive", "default"] = Field(
        "heuristic",
        description="how cuDNN picks convolution kernels on CUDA: 'exhaustive' times every "
        "candidate for each new input shape (a stall of up to hundreds of ms per new batch size)",
    )
    warmup: WarmupConfig | None = None  # None: a best-effort zero warmup (failure only warns)
    version_policy: VersionPolicy = VersionPolicy(all=True)
    parameters: dict[str, str] = {}

    @property
    def batching(self) -> bool:
        """Whether requests carry a leading batch dimension."""
        return self.max_batch_size > 0

    @field_validator("solo_session")
    @classmethod
    def _solo_needs_instances(cls, solo: bool, info: ValidationInfo) -> bool:
        if solo and info.data.get("instance_count", 1) < 2:
            raise ValueError("needs instance_count >= 2 (a lone instance always runs alone)")
        return solo


Schema = TypeVar("Schema", bound=BaseModel)


def validate(schema: type[Schema], raw: dict, config_path: Path) -> Schema:
    """Validate a raw config mapping against `schema`; the error names the file and field."""
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{config_path}: field '{field}': {first['msg']}") from None


def read_config_file(model_dir: Path) -> dict:
    """The raw mapping from `config.yaml`, or an empty one where the folder has none."""
    path = model_dir / CONFIG_FILE
    if not path.exists():
        return {}
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def build_config(model_dir: Path, model_file: Path, override: dict | None = None) -> ModelConfig:
    """Read `config.yaml` (or take a load request's `override`), auto-complete it from the ONNX
    graph and validate it."""
    raw = dict(read_config_file(model_dir) if override is None else override)
    config_path = model_dir / CONFIG_FILE if override is None else Path("config override")
    raw.setdefault("name", model_dir.name)
    graph = describe_graph(model_file)
    raw = _autocomplete(raw, graph)
    config = validate(ModelConfig, raw, config_path)
    _check_against_graph(config, graph, config_path, model_file)
    return config


class GraphTensor(BaseModel):
    """A tensor as the ONNX graph declares it (shape dims: int, or None for a symbolic dim)."""

    name: str
    datatype: str
    shape: tuple[int | None, ...]


def describe_graph(model_file: Path) -> dict[str, list[GraphTensor]]:
    """Names, datatypes and shapes of the graph's inputs and outputs."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several unrelated exception types
        raise ConfigError(f"{model_file}: ONNX Runtime cannot load it: {exc}") from None

    def tensors(args: list) -> list[GraphTensor]:
        return [
            GraphTensor(
                name=a.name,
                datatype=ONNX_TO_V2.get(a.type, a.type),
                shape=tuple(d if isinstance(d, int) and d > 0 else None for d in a.shape),
            )
            for a in args
        ]

    return {"inputs": tensors(session.get_inputs()), "outputs": tensors(session.get_outputs())}


def _autocomplete(raw: dict, graph: dict[str, list[GraphTensor]]) -> dict:
    """Fill in what the config leaves out from what the graph says."""
    raw = dict(raw)
    first_dims = [t.shape[0] if t.shape else 1 for t in graph["inputs"]]
    batchable = bool(first_dims) and all(d is None for d in first_dims)
    if "max_batch_size" not in raw:
        raw["max_batch_size"] = DEFAULT_MAX_BATCH_SIZE if batchable else 0
        if batchable and "dynamic_batching" not in raw:
            raw["dynamic_batching"] = {}
    skip = 1 if isinstance(raw["max_batch_size"], int) and raw["max_batch_size"] > 0 else 0
    for kind in ("inputs", "outputs"):
        if kind not in raw:
            raw[kind] = [
                {
                    "name": t.name,
                    "datatype": t.datatype,
                    "dims": [-1 if d is None else d for d in t.shape[skip:]],
                }
                for t in graph[kind]
            ]
    return raw


def _check_against_graph(
    config: ModelConfig, graph: dict[str, list[GraphTensor]], config_path: Path, model_file: Path
) -> None:
    """Each configured tensor must exist in the graph with its datatype and a fitting shape."""
    for kind in ("inputs", "outputs"):
        declared = {t.name: t for t in graph[kind]}
        configured = getattr(config, kind)
        for i, tensor in enumerate(configured):
            where = f"{config_path}: field '{kind}.{i}"
            found = declared.get(tensor.name)
            if found is None:
                raise ConfigError(
                    f"{where}.name': '{tensor.name}' is not a graph {kind[:-1]} of {model_file} "
                    f"(graph has {sorted(declared)})"
                )
            if found.datatype != tensor.datatype:
                raise ConfigError(
                    f"{where}.datatype': {tensor.datatype} but the graph says {found.datatype}"
                )
            graph_dims = found.shape[1:] if config.batching else found.shape
            if config.batching and found.shape and found.shape[0] is not None:
                raise ConfigError(
                    f"{config_path}: field 'max_batch_size': {config.max_batch_size} but "
                    f"{kind[:-1]} '{tensor.name}' has a fixed first dimension {found.shape[0]}"
                )
            if len(graph_dims) != len(tensor.dims) or any(
                g is not None and c != -1 and g != c
                for g, c in zip(graph_dims, tensor.dims, strict=True)
            ):
                shown = ["-1" if d is None else str(d) for d in graph_dims]
                raise ConfigError(
                    f"{where}.dims': {list(tensor.dims)} does not fit the graph's "
                    f"[{', '.join(shown)}]"
                    + (" (batch dimension excluded)" if config.batching else "")
                )
        if kind == "inputs":
            unknown = set(config.warmup.inputs if config.warmup else ()) - set(declared)
            if unknown:
                raise ConfigError(
                    f"{config_path}: field 'warmup.inputs': {sorted(unknown)} are not inputs"
                )
            missing = set(declared) - {t.name for t in configured}
            if missing:
                raise ConfigError(
                    f"{config_path}: field 'inputs': graph inputs {sorted(missing)} "
                    "are not configured"
                )


def cpu_threads(config: ModelConfig) -> int:
    """Intra-op threads per instance: configured, or the usable cores (CPU limit and affinity
    included) split between instances."""
    if config.intra_op_threads:
        return config.intra_op_threads
    return max(1, usable_cpus() // config.instance_count)
