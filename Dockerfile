# Volley server image (docs/deploy.md). CPU by default; NVIDIA GPUs with VARIANT=cuda:
#   docker build -t volley:cpu .
#   docker build --build-arg VARIANT=cuda -t volley:cuda .
# Both variants run on the same slim Python base. The CUDA one installs onnxruntime-gpu with the
# CUDA 13 and cuDNN 9 libraries from NVIDIA's pip wheels (no CUDA base image); the host needs
# only the NVIDIA driver (>= 580 for CUDA 13) and the container toolkit (`docker run --gpus all`).
# Every version is pinned: the base and ONNX Runtime here, everything else in
# deploy/container/constraints.txt.
ARG PYTHON_IMAGE=python:3.11-slim
ARG VARIANT=cpu

# --- build: a virtual environment in /opt/venv with Volley and one ONNX Runtime ---------------
FROM ${PYTHON_IMAGE} AS build
ARG VARIANT
ARG ORT_VERSION=1.32.0
ARG ORT_GPU_VERSION=1.31.1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONSTRAINT=/src/constraints.txt \
    PATH=/opt/venv/bin:$PATH LD_LIBRARY_PATH=/opt/venv/nvidia/cu13/lib:/opt/venv/nvidia/cudnn/lib
RUN python3 -m venv /opt/venv
COPY deploy/container/constraints.txt pyproject.toml README.md /src/
COPY server /src/server
COPY clients /src/clients
COPY training /src/training
# cuda: onnxruntime-gpu 1.31 is built for CUDA 13 and cuDNN 9; its `cuda` and `cudnn` extras
# pull those libraries as NVIDIA wheels into site-packages/nvidia/{cu13,cudnn}/lib, which
# /opt/venv/nvidia links to and LD_LIBRARY_PATH names. The build fails if one does not load.
RUN case "${VARIANT}" in \
      cpu) pip install --no-cache-dir /src "onnxruntime==${ORT_VERSION}" ;; \
      cuda) pip install --no-cache-dir /src "onnxruntime-gpu[cuda,cudnn]==${ORT_GPU_VERSION}" \
        && ln -s "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia" \
             /opt/venv/nvidia \
        && python -c "import ctypes; [ctypes.CDLL(lib) for lib in ('libcudart.so.13', \
             'libcublas.so.13', 'libcublasLt.so.13', 'libcurand.so.10', 'libcufft.so.12', \
             'libnvrtc.so.13', 'libcudnn.so.9')]" ;; \
      *) echo "VARIANT must be cpu or cuda, not '${VARIANT}'" >&2; exit 1 ;; \
    esac \
 && python -c "import onnxruntime as o, server; print(o.__version__, o.get_available_providers())"

# --- runtime: the environment and the models, no build inputs, not root ------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
RUN groupadd --system --gid "${UID}" volley \
 && useradd --system --uid "${UID}" --gid volley --home-dir /app --no-create-home volley
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The shipped models; mount another repository over /app/models (read-only is enough) to serve
# your own: docker run -v "$PWD/models:/app/models:ro" ...
COPY models /app/models
# LD_LIBRARY_PATH: the CUDA variant's NVIDIA libraries (absent, and so unused, in the CPU one).
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    LD_LIBRARY_PATH=/opt/venv/nvidia/cu13/lib:/opt/venv/nvidia/cudnn/lib
USER ${UID}:${UID}
EXPOSE 8000 8001 8002
# SIGTERM reaches volley itself (exec form, PID 1): readiness turns false, new work is refused,
# accepted work is answered, and it exits 0 within --shutdown-timeout (default 30 s).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2).status != 200)"]
# Extra flags go after the image name (or in Kubernetes `args`); a later --model-repository wins.
ENTRYPOINT ["volley", "serve", "--model-repository", "/app/models"]
