"""The floor for one Python process: a minimal batched raw-ASGI v2 JSON server (issue 15).

No validation, metrics, admission control, auth or error handling: it parses the first input's
`data`, batches everything the event loop collected since the last batch into one ONNX Runtime
call on a worker thread, and answers. Volley's HTTP JSON path is compared against it in
bench/peers.py, which starts it as: python bench/batched_floor.py MODEL_FILE PORT
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn

HEADERS = [(b"content-type", b"application/json")]
DATATYPES = {"tensor(float)": "FP32", "tensor(bool)": "BOOL", "tensor(int64)": "INT64"}


def build_app(model_file: str):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_file, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_names = [o.name for o in session.get_outputs()]
    datatypes = [DATATYPES[o.type] for o in session.get_outputs()]
    pending: list[tuple[list, asyncio.Future]] = []
    running: list[bool] = [False]

    async def run_batches() -> None:
        loop = asyncio.get_running_loop()
        while pending:
            batch = pending[:]
            pending.clear()
            rows = np.asarray([row for row, _ in batch], dtype=np.float32)
            feeds = {input_name: rows}
            outputs = await loop.run_in_executor(None, session.run, output_names, feeds)
            for i, (_, future) in enumerate(batch):
                future.set_result([o[i] for o in outputs])
        running[0] = False

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET":  # readiness, for the benchmark's start-up
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        request = orjson.loads(body)
        future = asyncio.get_running_loop().create_future()
        pending.append((request["inputs"][0]["data"], future))
        if not running[0]:
            running[0] = True
            asyncio.ensure_future(run_batches())
        results = await future
        outputs = [
            {"name": name, "datatype": datatype, "shape": [1, *r.shape], "data": r.tolist()}
            for name, datatype, r in zip(output_names, datatypes, results, strict=True)
        ]
        answer = orjson.dumps({"model_name": "fraud", "outputs": outputs})
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": answer})

    return app


if __name__ == "__main__":
    uvicorn.run(build_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]),
                log_level="warning", access_log=False, lifespan="off")  # fmt: skip
