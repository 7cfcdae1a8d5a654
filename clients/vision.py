"""Client side of the `detect` pipeline model: requests from encoded images, parsed detections.

Built on tritonclient (HTTP or gRPC). The wire contract: BYTES input `images` [N] of encoded
image files; outputs `num_detections` [N], `boxes` [N,K,4] (xyxy, original pixels), `scores`
[N,K], `class_ids` [N,K], `class_names` [N,K] where rows past `num_detections[i]` are padding.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

Protocol = Literal["grpc", "http"]
DEFAULT_PORTS: dict[str, int] = {"grpc": 8001, "http": 8000}
MAX_IMAGES_PER_REQUEST = 16  # the server takes up to 64; smaller requests keep bodies modest
OUTPUTS = ("num_detections", "boxes", "scores", "class_ids", "class_names")
_IMAGE_INDEX = re.compile(r"\bimage (\d+)\b")


class VisionError(Exception):
    """A failure worth one clear line to the user (bad file, server error, unreachable)."""


class ServerUnreachable(VisionError):
    """The server could not be reached at all."""


@dataclass(frozen=True)
class Detection:
    """One detected object: xyxy box in the original image's pixels, score, class."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    class_id: int
    class_name: str

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    def to_json(self) -> dict[str, Any]:
        """The JSON form used by the CLIs: {"box": [x1,y1,x2,y2], "score", "class_id", ...}."""
        return {
            "box": [round(v, 2) for v in self.box],
            "score": round(self.score, 4),
            "class_id": self.class_id,
            "class_name": self.class_name,
        }


@dataclass
class ImageDetections:
    """The detections of one image file."""

    path: str
    width: int
    height: int
    detections: list[Detection] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.path,
            "width": self.width,
            "height": self.height,
            "detections": [d.to_json() for d in self.detections],
        }


def default_server(protocol: Protocol) -> str:
    """localhost:8001 for gRPC, localhost:8000 for HTTP."""
    return f"localhost:{DEFAULT_PORTS[protocol]}"


def detect_parameters(
    score_threshold: float | None = None,
    iou_threshold: float | None = None,
    max_detections: int | None = None,
    classes: str | Iterable[int | str] | None = None,
    capture_ts: float | None = None,
) -> dict[str, Any]:
    """Request parameters for `detect`, leaving out those not given."""
    params: dict[str, Any] = {}
    if score_threshold is not None:
        params["score_threshold"] = float(score_threshold)
    if iou_threshold is not None:
        params["iou_threshold"] = float(iou_threshold)
    if max_detections is not None:
        params["max_detections"] = int(max_detections)
    if classes is not None:
        text = classes if isinstance(classes, str) else ",".join(str(c) for c in classes)
        if text.strip():
            params["classes"] = text.replace(" ", "")
    if capture_ts is not None:
        params["capture_ts"] = float(capture_ts)
    return params


def _client_module(protocol: Protocol) -> Any:
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ValueError(f"protocol must be grpc or http, not {protocol!r}")
    return module


def images_input(images: Sequence[bytes], protocol: Protocol) -> Any:
    """The BYTES input `images` [N] holding encoded image files, for tritonclient."""
    if not images:
        raise ValueError("at least one image is needed")
    module = _client_module(protocol)
    data = np.empty(len(images), dtype=np.object_)
    data[:] = [bytes(image) for image in images]
    tensor = module.InferInput("images", [len(images)], "BYTES")
    if protocol == "http":
        tensor.set_data_from_numpy(data, binary_data=True)
    else:
        tensor.set_data_from_numpy(data)
    return tensor


def requested_outputs(protocol: Protocol) -> list[Any]:
    """All five outputs, binary over HTTP."""
    module = _client_module(protocol)
    if protocol == "http":
        return [module.InferRequestedOutput(name, binary_data=True) for name in OUTPUTS]
    return [module.InferRequestedOutput(name) for name in OUTPUTS]


def response_parameters(result: Any) -> dict[str, Any]:
    """The response-level parameters of an http or grpc InferResult as a plain dict."""
    response = result.get_response()
    if isinstance(response, Mapping):  # tritonclient.http: the JSON header
        return dict(response.get("parameters") or {})
    params: dict[str, Any] = {}
    for key, value in response.parameters.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            params[key] = getattr(value, choice)
    return params


def response_id(result: Any) -> str:
    """The request id echoed in an http or grpc InferResult ("" when none)."""
    response = result.get_response()
    if isinstance(response, Mapping):
        return str(response.get("id", ""))
    return str(response.id)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def parse_detections(result: Any) -> list[list[Detection]]:
    """The detections per image of a `detect` InferResult (http or grpc), padding dropped."""
    counts = result.as_numpy("num_detections")
    if counts is None:
        raise VisionError("the response has no 'num_detections' output")
    counts = np.asarray(counts).reshape(-1)
    n = len(counts)
    arrays = {name: result.as_numpy(name) for name in OUTPUTS[1:]}
    missing = [name for name, array in arrays.items() if array is None]
    if missing:
        if counts.any():
            raise VisionError(f"the response lacks output(s) {', '.join(missing)}")
        return [[] for _ in range(n)]
    boxes = np.asarray(arrays["boxes"], dtype=np.float32).reshape(n, -1, 4)
    parsed: list[list[Detection]] = []
    for i, count in enumerate(counts.tolist()):
        if count <= 0:
            parsed.append([])
            continue
        scores = np.asarray(arrays["scores"]).reshape(n, -1)[i]
        ids = np.asarray(arrays["class_ids"]).reshape(n, -1)[i]
        names = np.asarray(arrays["class_names"], dtype=np.object_).reshape(n, -1)[i]
        count = min(int(count), len(scores))
        parsed.append(
            [
                Detection(
                    *(float(v) for v in boxes[i, k]),
                    score=float(scores[k]),
                    class_id=int(ids[k]),
                    class_name=_text(names[k]),
                )
                for k in range(count)
            ]
        )
    return parsed


def one_line(message: object) -> str:
    """A message squeezed onto one line."""
    return " ".join(str(message).split())


def client_error(exc: BaseException, server: str, protocol: Protocol) -> VisionError:
    """A tritonclient / socket exception as a one-line VisionError."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        message = one_line(exc.message() or exc)
        if status.endswith("UNAVAILABLE") or status.endswith("DEADLINE_EXCEEDED"):
            return ServerUnreachable(f"cannot reach the {protocol} server at {server}: {message}")
        code = status.removeprefix("StatusCode.")
        return VisionError(f"server error{f' ({code})' if code else ''}: {message}")
    if isinstance(exc, OSError):
        reason = one_line(exc.strerror or exc)
        return ServerUnreachable(f"cannot reach the {protocol} server at {server}: {reason}")
    return VisionError(f"{type(exc).__name__}: {one_line(exc)}")


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an encoded image, or None when OpenCV cannot decode it."""
    import cv2

    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        return None
    return int(image.shape[1]), int(image.shape[0])


def read_image_file(path: str | Path) -> tuple[bytes, int, int]:
    """The bytes, width and height of an image file; VisionError when unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise VisionError(f"{path}: cannot read file: {exc.strerror or exc}") from None
    if not data:
        raise VisionError(f"{path}: empty file, not an image")
    size = image_size(data)
    if size is None:
        raise VisionError(f"{path}: not a readable image (expected JPEG, PNG, WebP or BMP)")
    return data, size[0], size[1]


def detect_images(
    images: Sequence[bytes],
    client: Any,
    protocol: Protocol,
    model: str = "detect",
    params: Mapping[str, Any] | None = None,
) -> list[list[Detection]]:
    """One `detect` request for encoded images with an open tritonclient client."""
    result = client.infer(
        model,
        [images_input(images, protocol)],
        outputs=requested_outputs(protocol),
        parameters=dict(params or {}) or None,
    )
    detections = parse_detections(result)
    if len(detections) != len(images):
        raise VisionError(f"sent {len(images)} image(s), got answers for {len(detections)}")
    return detections


def detect_files(
    paths: Sequence[str | Path],
    server: str | None = None,
    protocol: Protocol = "grpc",
    model: str = "detect",
    params: Mapping[str, Any] | None = None,
) -> list[ImageDetections]:
    """Detect objects in image files, in requests of up to MAX_IMAGES_PER_REQUEST images.

    Raises VisionError (one-line message) for an unreadable file, a server error (naming the
    file when the server names the image) or an unreachable server (ServerUnreachable).
    """
    server = server or default_server(protocol)
    files = [(str(path), *read_image_file(path)) for path in paths]
    module = _client_module(protocol)
    try:
        client = module.InferenceServerClient(server)
    except Exception as exc:  # e.g. a malformed address
        raise client_error(exc, server, protocol) from None
    results: list[ImageDetections] = []
    try:
        for start in range(0, len(files), MAX_IMAGES_PER_REQUEST):
            chunk = files[start : start + MAX_IMAGES_PER_REQUEST]
            try:
                detections = detect_images([f[1] for f in chunk], client, protocol, model, params)
            except VisionError:
                raise
            except Exception as exc:
                error = client_error(exc, server, protocol)
                match = _IMAGE_INDEX.search(str(error))
                if (
                    match
                    and int(match.group(1)) < len(chunk)
                    and not isinstance(error, ServerUnreachable)
                ):
                    error = VisionError(f"{chunk[int(match.group(1))][0]}: {error}")
                raise error from None
            results.extend(
                ImageDetections(path, width, height, found)
                for (path, _, width, height), found in zip(chunk, detections, strict=True)
            )
    finally:
        client.close()
    return results
