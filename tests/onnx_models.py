"""Small real ONNX models built with onnx.helper, written into a model repository for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def mlp(path: Path, features: int = 32, hidden: int = 256, seed: int = 0) -> Path:
    """The benchmark stand-in: FP32 [B, features] -> 2 hidden ReLU layers -> sigmoid [B, 1]."""
    rng = np.random.default_rng(seed)
    sizes = [features, hidden, hidden, 1]
    inits, nodes, current = [], [], "input"
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        bias = (rng.standard_normal(b) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"g{i}"]))
        current = f"g{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"]))
            current = f"r{i}"
    nodes.append(helper.make_node("Sigmoid", [current], ["score"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    return save(graph, path)


def dtypes(path: Path) -> Path:
    """One input per datatype the server handles, each echoed through a simple op.

    fp16 -> fp16 * 2, int64 -> int64 + 1, int32 -> int32 * 3, uint8 -> cast to int32,
    bool -> not bool; each tensor is [B, 4].
    """
    two = numpy_helper.from_array(np.array(2, dtype=np.float16), "two")
    one = numpy_helper.from_array(np.array(1, dtype=np.int64), "one")
    three = numpy_helper.from_array(np.array(3, dtype=np.int32), "three")
    nodes = [
        helper.make_node("Mul", ["f16", "two"], ["f16_out"]),
        helper.make_node("Add", ["i64", "one"], ["i64_out"]),
        helper.make_node("Mul", ["i32", "three"], ["i32_out"]),
        helper.make_node("Cast", ["u8"], ["u8_out"], to=TensorProto.INT32),
        helper.make_node("Not", ["flag"], ["flag_out"]),
    ]

    def io(name: str, kind: int) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, kind, ["batch", 4])

    graph = helper.make_graph(
        nodes,
        "dtypes",
        [
            io("f16", TensorProto.FLOAT16),
            io("i64", TensorProto.INT64),
            io("i32", TensorProto.INT32),
            io("u8", TensorProto.UINT8),
            io("flag", TensorProto.BOOL),
        ],
        [
            io("f16_out", TensorProto.FLOAT16),
            io("i64_out", TensorProto.INT64),
            io("i32_out", TensorProto.INT32),
            io("u8_out", TensorProto.INT32),
            io("flag_out", TensorProto.BOOL),
        ],
        [two, one, three],
    )
    return save(graph, path)


# Every datatype docs/model-config.md lists, as (v2 name, ONNX type, numpy dtype).
EVERY_DATATYPE: list[tuple[str, int, type]] = [
    ("BOOL", TensorProto.BOOL, np.bool_),
    ("UINT8", TensorProto.UINT8, np.uint8),
    ("UINT16", TensorProto.UINT16, np.uint16),
    ("UINT32", TensorProto.UINT32, np.uint32),
    ("UINT64", TensorProto.UINT64, np.uint64),
    ("INT8", TensorProto.INT8, np.int8),
    ("INT16", TensorProto.INT16, np.int16),
    ("INT32", TensorProto.INT32, np.int32),
    ("INT64", TensorProto.INT64, np.int64),
    ("FP16", TensorProto.FLOAT16, np.float16),
    ("FP32", TensorProto.FLOAT, np.float32),
    ("FP64", TensorProto.DOUBLE, np.float64),
    ("BYTES", TensorProto.STRING, np.object_),
]


def every_datatype(path: Path, width: int = 3) -> Path:
    """One input per datatype in EVERY_DATATYPE, named after it in lower case ("uint16"), each
    [B, width] -> "<name>_out" [B, width] with its columns reversed (a Slice, any type)."""
    consts = [
        numpy_helper.from_array(np.array([value], dtype=np.int64), name)
        for name, value in (("starts", -1), ("ends", np.iinfo(np.int64).min), ("axes", 1),
                            ("steps", -1))
    ]  # fmt: skip
    names = [(v2.lower(), kind) for v2, kind, _ in EVERY_DATATYPE]
    graph = helper.make_graph(
        [helper.make_node("Slice", [n, "starts", "ends", "axes", "steps"], [f"{n}_out"])
         for n, _ in names],
        "every_datatype",
        [helper.make_tensor_value_info(n, kind, ["batch", width]) for n, kind in names],
        [helper.make_tensor_value_info(f"{n}_out", kind, ["batch", width]) for n, kind in names],
        consts,
    )  # fmt: skip
    return save(graph, path)


def strings(path: Path) -> Path:
    """BYTES [B, 2] -> the same strings (ONNX string tensors: UTF-8 text)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["text_out"])],
        "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", 2])],
        [helper.make_tensor_value_info("text_out", TensorProto.STRING, ["batch", 2])],
    )
    return save(graph, path)


def parsed_strings(path: Path) -> Path:
    """Triton's `simple_string` in ONNX: two BYTES [B, 16] inputs holding numbers, parsed with
    a string-to-int Cast; outputs their sum and difference as INT32 [B, 16]. Empty strings (a
    naive warmup's sample data) make it fail."""
    nodes = [
        helper.make_node("Cast", ["INPUT0"], ["a"], to=TensorProto.INT32),
        helper.make_node("Cast", ["INPUT1"], ["b"], to=TensorProto.INT32),
        helper.make_node("Add", ["a", "b"], ["OUTPUT0"]),
        helper.make_node("Sub", ["a", "b"], ["OUTPUT1"]),
    ]
    graph = helper.make_graph(
        nodes,
        "parsed_strings",
        [helper.make_tensor_value_info(n, TensorProto.STRING, ["batch", 16])
         for n in ("INPUT0", "INPUT1")],
        [helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", 16])
         for n in ("OUTPUT0", "OUTPUT1")],
    )  # fmt: skip
    return save(graph, path)


def variable_length(path: Path) -> Path:
    """FP32 [B, N] -> row sums FP32 [B, 1], N variable: batches only join equal N."""
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=1)],
        "rowsum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch", 1])],
        [axes],
    )
    return save(graph, path)


def save(graph: onnx.GraphProto, path: Path) -> Path:
    """Write `graph` as a checked opset-17 model at `path` (folders made); returns `path`."""
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_config(model_dir: Path, config: dict) -> None:
    """Write `config.yaml` for a model folder."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config))


def slow(path: Path, iterations: int = 10000, width: int = 512) -> Path:
    """FP32 [B, width] -> FP32 [B, width] after `iterations` MatMul+Tanh steps in a Loop.

    Slow on purpose (tens of milliseconds per batch), for queue-full, timeout and drain tests.
    """
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(
        (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "w"
    )
    trips = numpy_helper.from_array(np.array(iterations, dtype=np.int64), "trips")
    cond = numpy_helper.from_array(np.array(True), "cond")
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["state_in", "w"], ["mm"]),
            helper.make_node("Tanh", ["mm"], ["state_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", TensorProto.FLOAT, ["batch", width]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, ["batch", width]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)],
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [w, trips, cond],
    )
    return save(graph, path)


def fixed_scale(path: Path, shape: tuple[int, ...] = (2, 3), factor: float = 2.0) -> Path:
    """FP32 `shape` -> FP32 `shape` times `factor`, every dimension fixed (so no batching)."""
    scale = numpy_helper.from_array(np.array(factor, dtype=np.float32), "factor")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "factor"], ["y"])],
        "fixed_scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        [scale],
    )
    return save(graph, path)
