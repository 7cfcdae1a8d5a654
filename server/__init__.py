"""Volley: a batched ONNX Runtime inference server speaking KServe v2 / Triton over HTTP and gRPC."""

__version__ = "0.1.0"
