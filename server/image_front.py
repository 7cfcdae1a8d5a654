"""A detector graph that takes uint8 images: the float conversion moves into the graph.

Given a detector whose input is float `[N, 3, H, W]` (pixel values times a scale), this builds
the same graph with a uint8 `[N, H, W, 3]` input in front: Transpose, Cast and Mul run inside
ONNX Runtime. On a GPU that means a quarter of the bytes cross the bus and the conversion runs
on the device; on the CPU it is the same work the host would do, done by ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


def uint8_image_graph(model: Path | bytes, input_name: str, scale: float) -> bytes:
    """The serialized model with `input_name` replaced by a uint8 NHWC input of the same name."""
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    graph = proto.graph
    (original,) = [i for i in graph.input if i.name == input_name]
    element = original.type.tensor_type.elem_type
    if element not in FLOAT_TYPES.values():
        raise ValueError(f"input '{input_name}' is not FP32 or FP16")
    dims = [_dim(d) for d in original.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ValueError(f"input '{input_name}' is not [N, 3, H, W]")
    inner = f"{input_name}__float"
    for node in graph.node:
        node.input[:] = [inner if name == input_name else name for name in node.input]
    batch, channels, height, width = dims
    uint8_input = helper.make_tensor_value_info(
        input_name, TensorProto.UINT8, [batch, height, width, channels]
    )
    scale_name = f"{input_name}__scale"
    graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), scale_name))
    front = [
        helper.make_node("Transpose", [input_name], [f"{inner}_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", [f"{inner}_nchw"], [f"{inner}_cast"], to=TensorProto.FLOAT),
        helper.make_node(
            "Mul",
            [f"{inner}_cast", scale_name],
            [inner if element == TensorProto.FLOAT else f"{inner}_fp32"],
        ),
    ]
    if element == TensorProto.FLOAT16:
        front.append(helper.make_node("Cast", [f"{inner}_fp32"], [inner], to=element))
    nodes = [*front, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    inputs = [uint8_input if i.name == input_name else i for i in graph.input]
    del graph.input[:]
    graph.input.extend(inputs)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | str:
    if dim.HasField("dim_value"):
        return dim.dim_value
    return dim.dim_param or "N"
