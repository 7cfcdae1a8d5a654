"""What users hand-roll: FastAPI + pydantic, one `session.run` per request, v2 JSON only.

It speaks just enough of the v2 protocol (metadata, config, JSON infer) for perf_analyzer.
Run: python bench/naive_server.py MODEL_DIR PORT
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

DTYPES = {
    "tensor(float)": ("FP32", np.float32),
    "tensor(int64)": ("INT64", np.int64),
    "tensor(bool)": ("BOOL", np.bool_),
}


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[Tensor]


def build_app(model_dir: Path) -> FastAPI:
    name = model_dir.name
    versions = sorted(
        (p for p in model_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    )
    session = ort.InferenceSession(
        str(versions[-1] / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    app = FastAPI()

    def describe(args) -> list[dict]:
        return [{"name": a.name, "datatype": DTYPES[a.type][0], "shape": [-1, *a.shape[1:]]}
                for a in args]  # fmt: skip

    @app.get("/v2")
    def server_meta():
        return {"name": "naive", "version": "0", "extensions": []}

    @app.get("/v2/models/{model}")
    def model_meta(model: str):
        return {
            "name": name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": describe(session.get_inputs()),
            "outputs": describe(session.get_outputs()),
        }

    @app.get("/v2/models/{model}/config")
    def config(model: str):
        return {"name": name, "max_batch_size": 1024}

    @app.post("/v2/models/{model}/infer")
    def infer(model: str, request: InferRequest):
        feeds = {
            t.name: np.asarray(t.data, dtype=DTYPES[a.type][1]).reshape(t.shape)
            for t, a in zip(request.inputs, session.get_inputs(), strict=True)
        }
        results = session.run(None, feeds)
        outputs = [
            {"name": o.name, "datatype": DTYPES[o.type][0], "shape": list(r.shape),
             "data": r.reshape(-1).tolist()}
            for o, r in zip(session.get_outputs(), results, strict=True)
        ]  # fmt: skip
        return {"model_name": name, "id": request.id or "", "outputs": outputs}

    return app


if __name__ == "__main__":
    uvicorn.run(build_app(Path(sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]),
                log_level="warning", access_log=False)  # fmt: skip
