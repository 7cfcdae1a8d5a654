"""Threads are sized from the CPUs the process may use: its affinity and its cgroup's quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.cpus import (
    MAX_AUTOMATIC_WORKERS,
    WORKERS_ENV,
    automatic_workers,
    cgroup_quota,
    gpu_build_installed,
    usable_cpus,
)

AFFINITY = len(os.sched_getaffinity(0))


def v2(root: Path, text: str) -> Path:
    root.mkdir(exist_ok=True)
    (root / "cpu.max").write_text(text)
    return root


def v1(root: Path, quota: int, period: int) -> Path:
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


@pytest.mark.parametrize(
    "text, quota",
    [("max 100000\n", None), ("200000 100000\n", 2.0), ("150000 100000\n", 1.5)],
)
def test_cgroup_v2_quota(tmp_path: Path, text: str, quota: float | None) -> None:
    assert cgroup_quota(v2(tmp_path, text)) == quota


@pytest.mark.parametrize("quota, period, cpus", [(-1, 100000, None), (50000, 100000, 0.5)])
def test_cgroup_v1_quota(tmp_path: Path, quota: int, period: int, cpus: float | None) -> None:
    assert cgroup_quota(v1(tmp_path, quota, period)) == cpus


def test_a_quota_caps_the_threads_at_its_cpus_rounded_up(tmp_path: Path) -> None:
    """A pod limited to 1.5 CPUs on any machine: 2 threads at most, and never more than the
    CPUs the process may run on; half a CPU still gets one thread."""
    assert usable_cpus(v2(tmp_path / "a", "150000 100000")) == min(2, AFFINITY)
    assert usable_cpus(v1(tmp_path / "b", 50000, 100000)) == 1
    assert usable_cpus(v2(tmp_path / "c", "6400000 100000")) == AFFINITY  # quota above the cores


def test_no_cgroup_files_means_the_affinity(tmp_path: Path) -> None:
    assert cgroup_quota(tmp_path) is None
    assert usable_cpus(tmp_path) == AFFINITY


def test_worker_processes_share_the_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--workers N`: each worker sizes its threads from an N-th of the CPUs, at least one."""
    cgroup = v2(tmp_path, "800000 100000")  # 8 CPUs' worth, capped by the affinity
    monkeypatch.setenv(WORKERS_ENV, "2")
    assert usable_cpus(cgroup) == max(1, min(8, AFFINITY) // 2)
    monkeypatch.setenv(WORKERS_ENV, "64")
    assert usable_cpus(cgroup) == 1


def test_automatic_workers_are_one_per_cpu_the_quota_allows(tmp_path: Path) -> None:
    """`--workers auto`, the default, on a CPU install: a process per usable CPU, so a pod
    limited to half a CPU runs one process (no supervisor) and a 1.5-CPU one two."""
    assert not gpu_build_installed()  # the development and CI machines: the CPU build
    assert automatic_workers(v1(tmp_path / "a", 50000, 100000)) == 1
    assert automatic_workers(v2(tmp_path / "b", "150000 100000")) == min(2, AFFINITY)
    assert automatic_workers(tmp_path / "none") == min(AFFINITY, MAX_AUTOMATIC_WORKERS)


def test_automatic_workers_stop_at_a_bound_on_a_large_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On 64 CPUs `auto` runs 8 workers, each with 8 CPUs' threads, not 64 copies of the
    models."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert automatic_workers(tmp_path) == MAX_AUTOMATIC_WORKERS == 8
    monkeypatch.setenv(WORKERS_ENV, str(MAX_AUTOMATIC_WORKERS))
    assert usable_cpus(tmp_path) == 8


def test_automatic_workers_are_one_with_the_gpu_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With onnxruntime-gpu installed one process serves, so the GPU gets one process's
    batches; here a stand-in distribution's metadata on the path plays the GPU build."""
    dist = tmp_path / "onnxruntime_gpu-1.31.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Name: onnxruntime-gpu\nVersion: 1.31.1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert gpu_build_installed()
    assert automatic_workers(v2(tmp_path / "c", "800000 100000")) == 1
