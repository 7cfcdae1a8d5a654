"""How many CPUs this process may really use: what threads are sized from.

`os.cpu_count()` is the machine's count. In a container with a CPU limit (a Kubernetes pod with
`limits.cpu: 2` on a 64-core node) or a restricted affinity, sizing ONNX Runtime and decode
threads from it would start dozens of threads that fight over two cores' worth of time.
With `volley serve --workers N` each worker process gets an N-th of them (at least one): N full
servers sized for the whole machine would run N times the threads it has cores for.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
# Set by the supervisor of `--workers N` for its workers: how many processes share the CPUs.
WORKERS_ENV = "VOLLEY_WORKER_PROCESSES"
# Each worker holds its own copy of every model (about 190 MB of memory each with the shipped
# ones), and on 16 cores 8 workers served no more than 4 (bench/RESULTS.md): past this many
# CPUs, `--workers auto` gives the extra cores to each worker's ONNX Runtime threads instead.
MAX_AUTOMATIC_WORKERS = 8


def usable_cpus(cgroup: Path = CGROUP) -> int:
    """This process's share of the CPUs: the least of the CPUs it may run on and its cgroup CPU
    quota (rounded up), divided between the worker processes (at least 1)."""
    return max(1, machine_cpus(cgroup) // worker_processes())


def automatic_workers(cgroup: Path = CGROUP) -> int:
    """`--workers auto`, the default: one server process per CPU this process may use, at most
    `MAX_AUTOMATIC_WORKERS`, or one where ONNX Runtime's GPU build is installed. Measured
    (bench/RESULTS.md): on the CPU a second process on 2 cores serves 1.5x the HTTP JSON
    requests of one and the same over binary HTTP and gRPC; on a GPU each process would open
    its own CUDA context and batch only its own requests, so the detector's batches shrink
    (docs/architecture.md)."""
    if gpu_build_installed():
        return 1
    return min(machine_cpus(cgroup), MAX_AUTOMATIC_WORKERS)


def gpu_build_installed() -> bool:
    """Whether `onnxruntime-gpu` (the `volley[gpu]` extra) is installed, without importing it."""
    try:
        importlib.metadata.distribution("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def machine_cpus(cgroup: Path = CGROUP) -> int:
    """The least of: the CPUs this process may run on, and its cgroup CPU quota (rounded up)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cgroup_quota(cgroup)
    if quota is not None:
        cpus = min(cpus or 1, max(1, math.ceil(quota)))
    return max(1, cpus or 1)


def worker_processes() -> int:
    """How many worker processes serve side by side (1: a single-process server)."""
    try:
        return max(1, int(os.environ.get(WORKERS_ENV, "1")))
    except ValueError:
        return 1


def cgroup_quota(cgroup: Path = CGROUP) -> float | None:
    """CPUs' worth of time the cgroup allows (`cpu.max` in v2, cfs files in v1); None: no limit."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]  # v2: "max 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())  # v1: -1 for no limit
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period
