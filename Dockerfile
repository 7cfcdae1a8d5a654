# Volley server image. CPU by default; for NVIDIA GPUs build on a CUDA runtime image with Python 3.11+:
#   docker build --build-arg BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg ORT_PACKAGE=onnxruntime-gpu==1.31.1 -t volley:gpu .
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG ORT_PACKAGE=onnxruntime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server server
COPY clients clients
COPY training training
# The server and ONNX Runtime (CPU build, or ORT_PACKAGE=onnxruntime-gpu==...); no PyTorch.
RUN python3 -m pip install . "$ORT_PACKAGE"
COPY models models

EXPOSE 8000 8001 8002
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
  CMD python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready').status != 200)"
CMD ["volley", "serve", "--model-repository", "/app/models"]
