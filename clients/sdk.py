"""Volley's Python SDK: `VolleyClient("localhost:8001")` (gRPC) or `VolleyClient("http://...")`.

Built on tritonclient. Domain calls (`score` for the fraud model, `detect`/`detect_many` and
`stream` for the detection pipeline) sit on a generic `infer`. Calls that fail UNAVAILABLE
(connection refused, server not ready or draining) are retried with exponential backoff; every
other failure raises at once. Errors are `clients.errors.VolleyError` subclasses carrying the
server's message and status. `clients.aio.AsyncVolleyClient` is the asyncio twin.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from clients.core import (
    FRAUD_OUTPUTS,
    ClientBase,
    FrameResult,
    FraudScores,
    FraudSpec,
    Image,
    ModelInfo,
    frame_result,
    fraud_scores,
    image_inputs,
    image_requests,
    make_inputs,
    make_outputs,
    model_infos,
    result_arrays,
    row_chunks,
    transactions_array,
)
from clients.errors import DeadlineExceeded, Unavailable, to_error
from clients.vision import OUTPUTS, Detection, detect_parameters, parse_detections


class VolleyClient(ClientBase):
    """A synchronous Volley client over gRPC ("host:port", "grpc://host:port") or HTTP
    ("http://host:port"). Use as a context manager, or call close().

    `timeout` (seconds) bounds every call: gRPC's per-call deadline, HTTP's connection and
    network timeouts. A call failing UNAVAILABLE is retried `retries` times, after `backoff`
    seconds, then twice that, and so on; any other failure raises at once.
    """

    def __init__(
        self, url: str, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5
    ) -> None:
        super().__init__(url, timeout, retries, backoff)
        if self._grpc:
            import tritonclient.grpc as module

            self._client = module.InferenceServerClient(
                self.endpoint.address, ssl=self.endpoint.ssl
            )
        else:
            import tritonclient.http as module

            self._client = module.InferenceServerClient(
                self.endpoint.address,
                connection_timeout=timeout,
                network_timeout=timeout,
                ssl=self.endpoint.ssl,
            )
        self._module = module

    def __enter__(self) -> VolleyClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self._client.close()

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        call = getattr(self._client, method)
        attempt = 0
        while True:
            try:
                return call(*args, **self._kwargs(**kwargs))
            except Exception as exc:
                delay = self._retry_delay(exc, attempt)
            time.sleep(delay)
            attempt += 1

    def health(self) -> bool:
        """Whether the server is live (False when unreachable after the retries)."""
        with contextlib.suppress(Unavailable):
            return bool(self._call("is_server_live"))
        return False

    def ready(self) -> bool:
        """Whether the server is ready for inference (False when unreachable)."""
        with contextlib.suppress(Unavailable):
            return bool(self._call("is_server_ready"))
        return False

    def models(self) -> list[ModelInfo]:
        """The repository index: every model with its version, state and reason."""
        return model_infos(self._call("get_model_repository_index", as_json=True))

    def _infer_result(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Iterable[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> Any:
        return self._call(
            "infer",
            model,
            make_inputs(self._module, inputs),
            outputs=make_outputs(self._module, outputs),
            parameters=dict(parameters) if parameters else None,
        )

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Iterable[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run any model: numpy inputs by name in, outputs by name out (all unless `outputs`
        names some). Datatypes follow the numpy dtypes; object, bytes and str arrays are BYTES."""
        return result_arrays(self._infer_result(model, inputs, outputs, parameters))

    def _fraud_spec(self, model: str) -> FraudSpec:
        if model not in self._fraud_specs:
            config = self._call("get_model_config", model, as_json=True)
            self._fraud_specs[model] = FraudSpec.from_config(config)
        return self._fraud_specs[model]

    def score(self, transactions: Any, model: str = "fraud") -> FraudScores:
        """Score raw transactions: a dict or list of dicts keyed by feature name, a pandas
        DataFrame with named columns, or a 2-D array already in the graph's column order. Named
        columns are put in the order of the model config's `feature_names`; a missing or unknown
        column raises ValueError."""
        spec = self._fraud_spec(model)
        rows = transactions_array(transactions, spec.feature_names)
        parts = [
            self.infer(model, {spec.input_name: chunk}, FRAUD_OUTPUTS)
            for chunk in row_chunks(rows, spec.max_batch_size)
        ]
        return fraud_scores(parts, spec.threshold)

    def detect(
        self,
        image: Image,
        model: str = "detect",
        score_threshold: float | None = None,
        classes: str | Iterable[int | str] | None = None,
    ) -> list[Detection]:
        """Objects in one image (path, encoded bytes or RGB uint8 [H, W, 3]), boxes in its
        pixels. `classes` keeps only those class names or ids."""
        return self.detect_many([image], model, score_threshold, classes)[0]

    def detect_many(
        self,
        images: Sequence[Image],
        model: str = "detect",
        score_threshold: float | None = None,
        classes: str | Iterable[int | str] | None = None,
    ) -> list[list[Detection]]:
        """The detections of each image, in order (batched into few requests)."""
        params = detect_parameters(score_threshold=score_threshold, classes=classes)
        found: list[list[Detection]] = [[] for _ in images]
        for indices, inputs in image_requests(images):
            result = self._infer_result(model, inputs, OUTPUTS, params)
            for i, detections in zip(indices, parse_detections(result), strict=True):
                found[i] = detections
        return found

    def stream(
        self,
        frames: Iterable[bytes | np.ndarray],
        model: str = "detect",
        score_threshold: float | None = None,
        classes: str | Iterable[int | str] | None = None,
    ) -> Iterator[FrameResult]:
        """Camera frames (encoded bytes or RGB pixels) over one gRPC stream: one FrameResult per
        frame, as answers come. The server keeps only the newest waiting frame (latest-frame-
        wins): frames sent faster than it answers come back skipped. Not retried. gRPC only."""
        self._check_stream()
        params = detect_parameters(score_threshold=score_threshold, classes=classes)
        return self._stream(frames, model, params)

    def _stream(
        self, frames: Iterable[bytes | np.ndarray], model: str, params: dict[str, Any]
    ) -> Iterator[FrameResult]:
        self._call("get_model_metadata", model)  # ModelNotFound now, not an error per frame
        client = self._module.InferenceServerClient(self.endpoint.address, ssl=self.endpoint.ssl)
        answers: queue.Queue[tuple[Any, Exception | None]] = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        outputs = make_outputs(self._module, OUTPUTS)
        sent = received = 0
        try:
            for frame in frames:
                inputs = make_inputs(self._module, image_inputs(frame))
                try:
                    client.async_stream_infer(
                        model,
                        inputs,
                        outputs=outputs,
                        request_id=str(sent),
                        parameters=params or None,
                    )
                except Exception as exc:  # the stream broke: its callback says why
                    with contextlib.suppress(queue.Empty):
                        while True:
                            frame_result(*answers.get(timeout=1.0))
                    raise to_error(exc, self.url) or exc from exc
                sent += 1
                while received < sent and not answers.empty():
                    received += 1
                    yield frame_result(*answers.get_nowait())
            while received < sent:
                try:
                    answer = answers.get(timeout=self.timeout)
                except queue.Empty:
                    raise DeadlineExceeded(
                        f"no stream answer from {self.url} in {self.timeout:g} s",
                        "DEADLINE_EXCEEDED",
                    ) from None
                received += 1
                yield frame_result(*answer)
        finally:
            _end_stream(client, cancel=received < sent)


def _end_stream(client: Any, cancel: bool) -> None:
    """Close a tritonclient stream: gracefully, or cancelling what is outstanding."""
    stream = getattr(client, "_stream", None)
    with contextlib.suppress(Exception):
        client.stop_stream(cancel_requests=cancel)
    if cancel and stream is not None:  # a cancel leaves gRPC's request thread waiting for this
        stream._request_queue.put(None)
    client.close()
