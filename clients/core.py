"""Types, request building, response parsing and settings shared by `clients.sdk.VolleyClient`
and `clients.aio.AsyncVolleyClient` (no I/O here)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clients.errors import Unavailable, VolleyError, to_error
from clients.vision import (
    MAX_IMAGES_PER_REQUEST,
    Detection,
    parse_detections,
    response_id,
    response_parameters,
)

log = logging.getLogger("clients.sdk")  # one logger for both clients: retries are warnings

Image = str | Path | bytes | np.ndarray
"""An image file path, encoded image bytes (JPEG, PNG, WebP, BMP) or RGB uint8 pixels [H, W, 3]."""
FRAUD_OUTPUTS = ("score", "is_fraud")
_FRAME_ID = re.compile(r"frame '([^']*)'")


@dataclass(frozen=True)
class Endpoint:
    """Where a client connects: protocol, "host:port" and whether TLS is on."""

    protocol: Literal["grpc", "http"]
    address: str
    ssl: bool = False

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """gRPC for "host:port" or "grpc://host:port"; HTTP for "http://" or "https://"."""
        scheme, sep, rest = url.partition("://")
        if not sep:
            scheme, rest = "grpc", url
        if scheme not in ("grpc", "http", "https") or not rest.strip("/"):
            raise ValueError(f"url must be host:port, grpc://, http:// or https://, not {url!r}")
        protocol: Literal["grpc", "http"] = "grpc" if scheme == "grpc" else "http"
        return cls(protocol, rest.strip("/"), scheme == "https")


@dataclass
class FraudScores:
    """Fraud scores of N transactions: `scores` FP32 [N], `decisions` bool [N] (the model's
    `is_fraud` output), `threshold` from the model config (NaN when it has none)."""

    scores: np.ndarray
    decisions: np.ndarray
    threshold: float

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class FrameResult:
    """The answer to one stream frame. `id` is the frame's position in the input, as a string;
    `status` is processed (with `detections` and server `timings` in microseconds), skipped
    (with `skip_reason`) or error (with `error`)."""

    id: str
    status: Literal["processed", "skipped", "error"]
    detections: list[Detection] = field(default_factory=list)
    skip_reason: str | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """One entry of the repository index."""

    name: str
    version: str
    state: str
    reason: str = ""


def model_infos(index: Any) -> list[ModelInfo]:
    """ModelInfos from a repository index: HTTP's JSON list or gRPC's {"models": [...]}."""
    entries = index.get("models", []) if isinstance(index, Mapping) else index
    return [
        ModelInfo(e["name"], e.get("version", ""), e.get("state", ""), e.get("reason", ""))
        for e in entries
    ]


@dataclass(frozen=True)
class FraudSpec:
    """What `score` needs from a model config: input name, column order, threshold, batch cap."""

    input_name: str
    feature_names: tuple[str, ...] | None
    threshold: float
    max_batch_size: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FraudSpec:
        config = config.get("config", config)  # gRPC's JSON wraps the config
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        names = tuple(n.strip() for n in params.get("feature_names", "").split(",") if n.strip())
        threshold = float(params["threshold"]) if params.get("threshold") else math.nan
        batch = int(config.get("max_batch_size", 0))  # gRPC's JSON leaves out zeros
        return cls(config["input"][0]["name"], names or None, threshold, batch)


def transactions_array(transactions: Any, names: tuple[str, ...] | None) -> np.ndarray:
    """FP32 [N, F] in graph order from dicts, a DataFrame (named columns) or a 2-D array."""
    if isinstance(transactions, np.ndarray):
        rows = np.atleast_2d(transactions)
        if rows.ndim != 2 or (names is not None and rows.shape[1] != len(names)):
            want = f"[N, {len(names)}]" if names else "[N, F]"
            raise ValueError(f"transactions array has shape {list(transactions.shape)}, not {want}")
        return rows.astype(np.float32)
    if names is None:
        raise ValueError("the model config has no feature_names: pass an array in graph order")
    if hasattr(transactions, "columns") and hasattr(transactions, "to_numpy"):
        columns = [str(c) for c in transactions.columns]
        _check_columns(columns, names, "DataFrame")
        table = np.asarray(transactions.to_numpy(), dtype=np.float32)
        return table[:, [columns.index(n) for n in names]]
    rows = [transactions] if isinstance(transactions, Mapping) else list(transactions)
    if not rows or not all(isinstance(row, Mapping) for row in rows):
        raise ValueError("transactions must be dicts, a DataFrame or a 2-D array, and not empty")
    for i, row in enumerate(rows):
        _check_columns(list(row), names, f"transaction {i}")
    return np.array([[row[n] for n in names] for row in rows], dtype=np.float32)


def _check_columns(columns: list[str], names: tuple[str, ...], what: str) -> None:
    missing = [n for n in names if n not in columns]
    extra = [c for c in columns if c not in names]
    if missing or extra:
        problems = [f"missing column(s) {', '.join(missing)}"] if missing else []
        problems += [f"unknown column(s) {', '.join(extra)}"] if extra else []
        raise ValueError(f"{what}: {'; '.join(problems)}")


def make_inputs(module: Any, inputs: Mapping[str, np.ndarray]) -> list[Any]:
    """tritonclient InferInputs (binary over HTTP); object, bytes and str arrays go as BYTES."""
    from tritonclient.utils import np_to_triton_dtype

    tensors = []
    for name, value in inputs.items():
        array = np.asarray(value)
        if array.dtype.kind == "U":
            array = array.astype(np.object_)
        datatype = np_to_triton_dtype(array.dtype)
        if datatype is None:
            raise ValueError(f"input '{name}': numpy dtype {array.dtype} has no Triton datatype")
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def make_outputs(module: Any, names: Iterable[str] | None) -> list[Any] | None:
    """tritonclient InferRequestedOutputs (binary over HTTP), or None for every output."""
    return None if names is None else [module.InferRequestedOutput(name) for name in names]


def result_arrays(result: Any) -> dict[str, np.ndarray]:
    """Every output of an HTTP or gRPC InferResult, by name."""
    response = result.get_response()
    if isinstance(response, Mapping):
        names = [output["name"] for output in response.get("outputs", [])]
    else:
        names = [output.name for output in response.outputs]
    return {name: result.as_numpy(name) for name in names}


def fraud_scores(parts: Sequence[Mapping[str, np.ndarray]], threshold: float) -> FraudScores:
    """FraudScores from the outputs of one or more `score` requests, in order."""
    scores = np.concatenate([part["score"].reshape(-1) for part in parts])
    decisions = np.concatenate([part["is_fraud"].reshape(-1).astype(bool) for part in parts])
    return FraudScores(scores, decisions, threshold)


def row_chunks(rows: np.ndarray, size: int) -> list[np.ndarray]:
    """`rows` in pieces of at most `size` rows (one piece when size <= 0)."""
    return [rows] if size <= 0 else [rows[i : i + size] for i in range(0, len(rows), size)]


def image_inputs(image: Image) -> dict[str, np.ndarray]:
    """The `detect` input for one image: `pixels` for an array, else `images` (encoded bytes)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"pixels must be RGB uint8 [H, W, 3], not {image.dtype} {image.shape}")
        return {"pixels": image}
    if isinstance(image, str | Path):
        image = Path(image).read_bytes()
    if not isinstance(image, bytes | bytearray | memoryview):
        raise TypeError(f"an image is a path, bytes or a numpy array, not {type(image).__name__}")
    data = np.empty(1, dtype=np.object_)
    data[0] = bytes(image)
    return {"images": data}


def image_requests(images: Sequence[Image]) -> list[tuple[list[int], dict[str, np.ndarray]]]:
    """`detect` requests for many images: (indices, inputs), encoded files and same-sized pixel
    arrays each batched up to MAX_IMAGES_PER_REQUEST."""
    groups: dict[Any, list[tuple[int, np.ndarray]]] = {}
    for i, image in enumerate(images):
        ((name, value),) = image_inputs(image).items()
        key = name if name == "images" else value.shape
        groups.setdefault(key, []).append((i, value[None] if name == "pixels" else value))
    requests = []
    for key, members in groups.items():
        name = "images" if key == "images" else "pixels"
        for start in range(0, len(members), MAX_IMAGES_PER_REQUEST):
            chunk = members[start : start + MAX_IMAGES_PER_REQUEST]
            batch = np.concatenate([value for _, value in chunk])
            requests.append(([i for i, _ in chunk], {name: batch}))
    return requests


def frame_result(result: Any, failure: Exception | None) -> FrameResult:
    """A stream answer as a FrameResult; raises the VolleyError of a failed stream."""
    if result is None:
        problem = to_error(failure, "the stream") if failure else None
        problem = problem or VolleyError(str(failure or "an answer with no result"))
        if problem.status:  # the stream itself failed, not one frame
            raise problem
        match = _FRAME_ID.search(problem.message)
        return FrameResult(match.group(1) if match else "", "error", error=problem.message)
    params = response_parameters(result)
    if params.get("skipped"):
        return FrameResult(response_id(result), "skipped", skip_reason=params.get("skip_reason"))
    timings = {k: float(v) for k, v in params.items() if k.endswith("_us")}
    return FrameResult(
        response_id(result), "processed", parse_detections(result)[0], timings=timings
    )


class ClientBase:
    """Settings and per-model caches shared by the sync and asyncio clients."""

    def __init__(
        self, url: str, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5
    ) -> None:
        """`timeout` bounds each call (seconds); an UNAVAILABLE failure is retried `retries`
        times, waiting `backoff`, then twice that, and so on."""
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError("timeout must be > 0, retries and backoff >= 0")
        self.url, self.endpoint = url, Endpoint.parse(url)
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._fraud_specs: dict[str, FraudSpec] = {}

    @property
    def _grpc(self) -> bool:
        return self.endpoint.protocol == "grpc"

    def _kwargs(self, **kwargs: Any) -> dict[str, Any]:
        """Per-call tritonclient keywords: gRPC takes the timeout and `as_json`, HTTP neither
        (its timeouts are the connection's and it always answers JSON)."""
        if self._grpc:
            return {**kwargs, "client_timeout": self.timeout}
        kwargs.pop("as_json", None)
        return kwargs

    def _retry_delay(self, exc: Exception, attempt: int) -> float:
        """Seconds to wait before retrying after `exc`; raises its VolleyError when not to."""
        failure = to_error(exc, self.url)
        if failure is None:
            raise exc
        if not isinstance(failure, Unavailable) or attempt >= self.retries:
            raise failure from (None if failure is exc else exc)
        delay = self.backoff * 2**attempt
        log.warning("%s (retry %d of %d in %.2f s)", failure, attempt + 1, self.retries, delay)
        return delay

    def _check_stream(self) -> None:
        if not self._grpc:
            raise VolleyError(
                f"stream() needs gRPC (ModelStreamInfer); {self.url} is HTTP: "
                "connect with 'host:port' or 'grpc://host:port'",
                "UNIMPLEMENTED",
            )
