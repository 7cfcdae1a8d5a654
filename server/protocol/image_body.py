"""An image as the whole HTTP body: `POST /v2/models/{pipeline}/infer` with `Content-Type:
image/...`, detection parameters in the query string, detections back as plain JSON.

A Volley extension for clients without a v2 library (curl, a browser's `fetch`, a phone app):
the body is one encoded image, exactly the bytes of the file, and the answer lists the
detections in the image's own pixels, as the camera WebSocket answers a frame. Everything else
(limits, authentication, rate limits, metrics, statistics) is the infer route's.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import numpy as np

from server.errors import invalid
from server.types import InferenceRequest, InferenceResponse, InferTensor

MAX_QUERY_PARAMETERS = 16
# What an image body's query may hold: the pipeline's request parameters (docs/vision.md), the
# request's `timeout` (µs) and `id`. A name outside these is refused, not silently ignored.
QUERY_PARAMETERS = frozenset(
    {"score_threshold", "iou_threshold", "max_detections", "classes", "capture_ts", "timeout", "id"}
)
TIMINGS = ("decode_us", "queue_us", "inference_us", "nms_us", "total_us")


IMAGE = b"image/"  # the Content-Type prefix of an image body (lowercased)


def image_request(body: bytes, model: str, version: str, target: bytes) -> InferenceRequest:
    """The pipeline request for one image `body`; the parameters are the request target's query
    (`?score_threshold=0.5&classes=car,person`)."""
    query = urlsplit(target).query.decode("utf-8", errors="replace")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_QUERY_PARAMETERS)
    except ValueError:
        raise invalid(f"at most {MAX_QUERY_PARAMETERS} query parameters") from None
    parameters: dict[str, str | int] = {}
    for key, value in pairs:
        if key not in QUERY_PARAMETERS:
            known = ", ".join(sorted(QUERY_PARAMETERS))
            raise invalid(f"unknown query parameter '{key}'; an image body takes {known}")
        if key in parameters:
            raise invalid(f"query parameter '{key}' given twice")
        parameters[key] = value
    if parameters.get("timeout", "").isdigit():
        parameters["timeout"] = int(parameters["timeout"])
    request_id = parameters.pop("id", "")
    data = np.array([body], dtype=np.object_)
    return InferenceRequest(
        model=model,
        version=version,
        inputs=[InferTensor("images", "BYTES", (1,), data)],
        id=request_id,
        parameters=parameters,
    )


def detections_document(response: InferenceResponse) -> dict:
    """One image's detections as plain JSON: boxes `[x1, y1, x2, y2]` in the image's pixels,
    scores, class ids and names, the image's size and the server's timings (microseconds)."""
    params = response.parameters
    out = {t.name: t.data for t in response.outputs}
    count = int(out["num_detections"][0])
    doc: dict = {"id": response.id} if response.id else {}
    if "capture_ts" in params:
        doc["capture_ts"] = params["capture_ts"]
    doc["width"], doc["height"] = params.get("image_width"), params.get("image_height")
    doc["detections"] = [
        {
            "box": [round(float(x), 1) for x in out["boxes"][0, i]],
            "score": round(float(out["scores"][0, i]), 4),
            "class_id": int(out["class_ids"][0, i]),
            "class_name": out["class_names"][0, i].decode(),
        }
        for i in range(count)
    ]
    doc["timings"] = {key: params[key] for key in TIMINGS if key in params}
    return doc
