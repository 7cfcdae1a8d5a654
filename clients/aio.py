"""`AsyncVolleyClient`: the asyncio twin of `clients.sdk.VolleyClient`, on tritonclient's
grpc.aio and http.aio clients. Same URLs, methods, retries and errors; calls are coroutines and
`stream` is an async iterator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
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

Frames = Iterable[bytes | np.ndarray] | AsyncIterable[bytes | np.ndarray]


class AsyncVolleyClient(ClientBase):
    """An asyncio Volley client over gRPC ("host:port", "grpc://host:port") or HTTP
    ("http://host:port"); make it inside a coroutine and use `async with`, or await close().
    Timeout, retries and backoff as for VolleyClient."""

    def __init__(
        self, url: str, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5
    ) -> None:
        super().__init__(url, timeout, retries, backoff)
        if self._grpc:
            import tritonclient.grpc as module
            import tritonclient.grpc.aio as aio

            self._client = aio.InferenceServerClient(self.endpoint.address, ssl=self.endpoint.ssl)
        else:
            import tritonclient.http as module
            import tritonclient.http.aio as aio

            self._client = aio.InferenceServerClient(
                self.endpoint.address, conn_timeout=timeout, ssl=self.endpoint.ssl
            )
        self._module = module  # InferInput and InferRequestedOutput are shared with aio

    async def __aenter__(self) -> AsyncVolleyClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection."""
        await self._client.close()

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        call = getattr(self._client, method)
        attempt = 0
        while True:
            try:
                return await call(*args, **self._kwargs(**kwargs))
            except Exception as exc:
                delay = self._retry_delay(self._disconnected(exc), attempt)
            await asyncio.sleep(delay)
            attempt += 1

    def _disconnected(self, exc: Exception) -> Exception:
        """aiohttp's lost-connection errors that are not OSErrors, as Unavailable."""
        import aiohttp

        if isinstance(exc, aiohttp.ClientConnectionError) and not isinstance(exc, OSError):
            return Unavailable(f"lost the connection to {self.url}: {exc}", "UNAVAILABLE")
        return exc

    async def health(self) -> bool:
        """Whether the server is live (False when unreachable after the retries)."""
        try:
            return bool(await self._call("is_server_live"))
        except Unavailable:
            return False

    async def ready(self) -> bool:
        """Whether the server is ready for inference (False when unreachable)."""
        try:
            return bool(await self._call("is_server_ready"))
        except Unavailable:
            return False

    async def models(self) -> list[ModelInfo]:
        """The repository index: every model with its version, state and reason."""
        return model_infos(await self._call("get_model_repository_index", as_json=True))

    async def _infer_result(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Iterable[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> Any:
        return await self._call(
            "infer",
            model,
            make_inputs(self._module, inputs),
            outputs=make_outputs(self._module, outputs),
            parameters=dict(parameters) if parameters else None,
        )

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Iterable[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run any model; see VolleyClient.infer."""
        return result_arrays(await self._infer_result(model, inputs, outputs, parameters))

    async def _fraud_spec(self, model: str) -> FraudSpec:
        if model not in self._fraud_specs:
            config = await self._call("get_model_config", model, as_json=True)
            self._fraud_specs[model] = FraudSpec.from_config(config)
        return self._fraud_specs[model]

    async def score(self, transactions: Any, model: str = "fraud") -> FraudScores:
        """Score raw transactions (dicts, DataFrame or array); see VolleyClient.score."""
        spec = await self._fraud_spec(model)
        rows = transactions_array(transactions, spec.feature_names)
        parts = [
            await self.infer(model, {spec.input_name: chunk}, FRAUD_OUTPUTS)
            for chunk in row_chunks(rows, spec.max_batch_size)
        ]
        return fraud_scores(parts, spec.threshold)

    async def detect(
        self,
        image: Image,
        model: str = "detect",
        score_threshold: float | None = None,
        classes: str | Iterable[int | str] | None = None,
    ) -> list[Detection]:
        """Objects in one image, boxes in its pixels; see VolleyClient.detect."""
        return (await self.detect_many([image], model, score_threshold, classes))[0]

    async def detect_many(
        self,
        images: Sequence[Image],
        model: str = "detect",
        score_threshold: float | None = None,
        classes: str | Iterable[int | str] | None = None,
    ) -> list[list[Detection]]:
        """The detections of each image, in order; the requests run concurrently."""
        params = detect_parameters(score_threshold=score_threshold, classes=classes)
        requests = image_requests(images)
        results = await asyncio.gather(
            *(self._infer_result(model, inputs, OUTPUTS, params) for _, inputs in requests)
        )
        found: list[list[Detection]] = [[] for _ in images]
        for (indices, _), result in zip(requests, results, strict=True):
            for i, detections in zip(indices, parse_detections(result), strict=True):
                found[i] = detections
        return found

    def stream(
        self,
        frames: Frames,
        model: str = "detect",
        score_threshold: float | None = None,
        classes: str | Iterable[int | str] | None = None,
    ) -> AsyncIterator[FrameResult]:
        """Frames (a sync or async iterable) over one gRPC stream, one FrameResult each as
        answers come (`async for`); see VolleyClient.stream. gRPC only."""
        self._check_stream()
        params = detect_parameters(score_threshold=score_threshold, classes=classes)
        return self._stream(frames, model, params)

    async def _stream(
        self, frames: Frames, model: str, params: dict[str, Any]
    ) -> AsyncIterator[FrameResult]:
        await self._call("get_model_metadata", model)  # ModelNotFound now, not per frame
        sent = 0

        async def requests() -> AsyncIterator[dict[str, Any]]:
            nonlocal sent
            async for frame in _frames(frames):
                sent += 1
                yield {
                    "model_name": model,
                    "inputs": make_inputs(self._module, image_inputs(frame)),
                    "outputs": make_outputs(self._module, OUTPUTS),
                    "request_id": str(sent - 1),
                    "parameters": params or None,
                }

        responses = self._client.stream_infer(requests())
        received = 0
        try:
            while True:
                waiting = received < sent  # answers are due: bound the wait
                try:
                    answer = await asyncio.wait_for(
                        anext(responses), self.timeout if waiting else None
                    )
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"no stream answer from {self.url} in {self.timeout:g} s",
                        "DEADLINE_EXCEEDED",
                    ) from None
                except Exception as exc:
                    raise to_error(exc, self.url) or exc from exc
                received += 1
                yield frame_result(*answer)
        finally:
            responses.cancel()


async def _frames(frames: Frames) -> AsyncIterator[bytes | np.ndarray]:
    if isinstance(frames, AsyncIterable):
        async for frame in frames:
            yield frame
    else:
        for frame in frames:
            yield frame
