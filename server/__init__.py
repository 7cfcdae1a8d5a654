"""Volley: a batched ONNX Runtime inference server (KServe v2 / Triton protocol, HTTP and gRPC)."""

__version__ = "0.1.0"
