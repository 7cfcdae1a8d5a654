"""Diagnostics a benchmark loads into Volley's processes (a `sitecustomize`, see
`serving.probe_env`); never imported by the server itself.

Once a second each process appends one line to `<folder>/probe-<pid>.txt`:

- `gil`: how late a thread that sleeps 1 ms runs Python again (p50 / p99 / max ms): the wait for
  the GIL that any thread returning from C code meets;
- `cpu`: the cores the process used, and its thread count;
- per ONNX Runtime graph (named by its first input) and call (`run`, `run_with_iobinding`): the
  calls, their mean wall time and the mean CPU time of the calling thread in them. Wall far
  above CPU means the thread waited (for the GPU, or for the GIL on the way out).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

_calls: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
_lock = threading.Lock()


def _timed(method_name: str, method):
    def timed(self, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return method(self, *args, **kwargs)
        finally:
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            key = f"{self._inputs_meta[0].name}.{method_name}"
            with _lock:
                entry = _calls[key]
                entry[0] += 1
                entry[1] += wall
                entry[2] += cpu

    return timed


def _patch_onnxruntime() -> None:
    """Time ONNX Runtime's run calls once the process has imported it (if it ever does)."""
    deadline = time.monotonic() + 600
    while "onnxruntime" not in sys.modules and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # let the import finish
    module = sys.modules.get("onnxruntime")
    if module is None:
        return
    cls = module.InferenceSession
    for name in ("run", "run_with_iobinding"):
        setattr(cls, name, _timed(name, getattr(cls, name)))


def _report(folder: Path) -> None:
    out = folder / f"probe-{os.getpid()}.txt"
    lags: list[float] = []
    last_wall, last_cpu = time.perf_counter(), time.process_time()
    while True:
        start = time.perf_counter()
        time.sleep(0.001)
        lags.append(time.perf_counter() - start - 0.001)
        now = time.perf_counter()
        if now - last_wall < 1.0:
            continue
        cores = (time.process_time() - last_cpu) / (now - last_wall)
        last_wall, last_cpu = now, time.process_time()
        lags.sort()
        gil = [lags[len(lags) // 2], lags[int(len(lags) * 0.99)], lags[-1]]
        lags.clear()
        with _lock:
            calls = {k: tuple(v) for k, v in _calls.items()}
            _calls.clear()
        fields = [f"t={time.time():.1f}", "gil=" + "/".join(f"{v * 1e3:.2f}" for v in gil),
                  f"cpu={cores:.2f}", f"threads={len(os.listdir('/proc/self/task'))}"]  # fmt: skip
        fields += [f"{k}={n}/{w / n * 1e3:.2f}/{c / n * 1e3:.2f}" for k, (n, w, c) in calls.items()]
        with out.open("a") as file:
            file.write(" ".join(fields) + "\n")


def start(folder: str) -> None:
    """Begin probing this process (daemon threads: they never keep it alive)."""
    threading.Thread(target=_patch_onnxruntime, daemon=True, name="probe-ort").start()
    threading.Thread(target=_report, args=(Path(folder),), daemon=True, name="probe").start()
