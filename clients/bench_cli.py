"""`volley bench MODEL`: a short load test, run by perf_analyzer when it is installed.

Without perf_analyzer (or with --builtin), worker threads send requests generated from the
model's metadata for a fixed time and the latencies are summarised here.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clients.admin_cli import (
    CliError,
    as_json,
    client_module,
    connect,
    format_table,
    server_errors,
)
from clients.vision import client_error

ROOT = Path(__file__).resolve().parents[1]
SHARED_PERF_ANALYZER = ROOT.parent / "shared" / "tools" / "perf_analyzer"
SAMPLE_IMAGE = ROOT / "docs" / "samples" / "street-1.jpg"
PIPELINE_PLATFORM = "volley_detection"  # the `detect` pipeline: send an encoded image
BAR_WIDTH = 30


class Progress:
    """A one-line text progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total_seconds: float) -> None:
        self.total = total_seconds
        self.start = time.perf_counter()
        self.enabled = sys.stderr.isatty()

    def update(self, note: str, done: bool = False) -> None:
        """Redraw with the time elapsed so far; `done` fills the bar and ends the line."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        fraction = 1.0 if done else min(elapsed / self.total, 0.99)
        filled = int(fraction * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        end = "\n" if done else ""
        sys.stderr.write(f"\r[{bar}] {fraction:4.0%} {elapsed:5.1f}s  {note}   {end}")
        sys.stderr.flush()


def find_perf_analyzer(explicit: str | None) -> str | None:
    """--perf-analyzer, else `perf_analyzer` on PATH, else ../shared/tools/perf_analyzer."""
    if explicit:
        return explicit
    found = shutil.which("perf_analyzer")
    if found:
        return found
    if SHARED_PERF_ANALYZER.is_file() and os.access(SHARED_PERF_ANALYZER, os.X_OK):
        return str(SHARED_PERF_ANALYZER)
    return None


def sample_jpeg() -> bytes:
    """The sample street photo, or a generated JPEG where the samples are not installed."""
    if SAMPLE_IMAGE.is_file():
        return SAMPLE_IMAGE.read_bytes()
    import cv2

    image = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def request_arrays(metadata: dict) -> dict[str, tuple[np.ndarray, str]]:
    """One request's inputs by name, (array, datatype): random data, -1 dims as 1."""
    from tritonclient.utils import triton_to_np_dtype

    if metadata.get("platform") == PIPELINE_PLATFORM:
        return {"images": (np.array([sample_jpeg()], dtype=np.object_), "BYTES")}
    rng = np.random.default_rng(0)
    arrays = {}
    for spec in metadata["inputs"]:
        shape = [1 if int(d) < 0 else int(d) for d in spec["shape"]]
        datatype = spec["datatype"]
        if datatype == "BYTES":
            array = np.full(shape, b"volley", dtype=np.object_)
        elif datatype == "BOOL":
            array = rng.integers(0, 2, shape).astype(np.bool_)
        elif datatype in ("FP16", "FP32", "FP64", "BF16"):
            array = rng.standard_normal(shape).astype(triton_to_np_dtype(datatype))
        else:
            array = rng.integers(0, 10, shape).astype(triton_to_np_dtype(datatype))
        arrays[spec["name"]] = (array, datatype)
    return arrays


@dataclass
class Tally:
    """What one worker saw: latencies of successes (seconds), errors, the first error."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    def fail(self, message: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or message


def _worker(
    args: argparse.Namespace, server: str, metadata: dict, deadline: float, tally: Tally
) -> None:
    """Send requests back to back until the deadline."""
    module = client_module(args.protocol)
    try:
        client = module.InferenceServerClient(server)
    except Exception as exc:
        tally.fail(str(client_error(exc, server, args.protocol)))
        return
    inputs = []
    for name, (array, datatype) in request_arrays(metadata).items():
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    outputs = None
    if args.protocol == "http":  # binary outputs, as perf_analyzer asks for them
        names = [o["name"] for o in metadata.get("outputs", [])]
        outputs = [module.InferRequestedOutput(n, binary_data=True) for n in names]
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        try:
            client.infer(args.model, inputs, model_version=args.model_version, outputs=outputs)
        except Exception as exc:
            tally.fail(str(client_error(exc, server, args.protocol)))
            time.sleep(0.01)
            continue
        tally.latencies.append(time.perf_counter() - start)
    client.close()


def builtin(args: argparse.Namespace, server: str, metadata: dict) -> int:
    """The built-in load test: --concurrency threads for --seconds; prints its table."""
    tallies = [Tally() for _ in range(args.concurrency)]
    start = time.perf_counter()
    threads = [
        threading.Thread(
            target=_worker, args=(args, server, metadata, start + args.seconds, t), daemon=True
        )
        for t in tallies
    ]
    for thread in threads:
        thread.start()
    progress = Progress(args.seconds)

    while True:
        running = any(thread.is_alive() for thread in threads)
        ok, errors = sum(len(t.latencies) for t in tallies), sum(t.errors for t in tallies)
        progress.update(f"{ok} ok, {errors} errors", done=not running)
        if not running:
            break
        time.sleep(0.1)
    elapsed = time.perf_counter() - start
    ms = np.array([x for t in tallies for x in t.latencies]) * 1000
    if ms.size:
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        latency: list[object] = [float(p50), float(p90), float(p99), float(ms.max())]
    else:
        latency = ["-"] * 4
    print(
        f"{args.model} over {args.protocol} at {server}: {args.concurrency} workers, "
        f"{elapsed:.1f} s (built-in load test)"
    )
    header = ("requests", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms")
    print(format_table(header, [(ms.size + errors, errors, ms.size / elapsed, *latency)]))
    first_error = next((t.first_error for t in tallies if t.first_error), "")
    if first_error:
        print(f"error: {errors} request(s) failed, first: {first_error}", file=sys.stderr)
    return 0 if ms.size else 1


def perf_analyzer(
    tool: str, args: argparse.Namespace, server: str, metadata: dict, max_batch_size: int
) -> int:
    """Run perf_analyzer at --concurrency for about --seconds; print its numbers."""
    window_ms = max(int(args.seconds * 1000 / 3), 200)  # it measures (at least) three windows
    with tempfile.TemporaryDirectory() as tmp:
        table, log = Path(tmp) / "pa.csv", Path(tmp) / "pa.log"
        cmd = [tool, "-m", args.model, "-u", server, "-i", args.protocol,
               "--concurrency-range", str(args.concurrency),
               "--measurement-interval", str(window_ms),
               "--max-trials", "10", "--stability-percentage", "999", "-f", str(table)]  # fmt: skip
        if args.model_version:
            cmd += ["-x", args.model_version]
        if metadata.get("platform") == PIPELINE_PLATFORM:
            image = sample_jpeg()  # perf_analyzer's b64 BYTES data is the length-prefixed tensor
            b64 = base64.b64encode(struct.pack("<I", len(image)) + image).decode()
            data = Path(tmp) / "input.json"
            data.write_text(json.dumps({"data": [{"images": {"b64": b64, "shape": [1]}}]}))
            cmd += ["--input-data", str(data)]
        else:
            for spec in metadata["inputs"]:
                dims = [int(d) for d in spec["shape"]][1 if max_batch_size > 0 else 0 :]
                if any(d < 0 for d in dims):
                    shape = ",".join(str(1 if d < 0 else d) for d in dims)
                    cmd += ["--shape", f"{spec['name']}:{shape}"]
        start = time.perf_counter()
        with log.open("w") as out:
            try:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
            except OSError as exc:
                raise CliError(f"cannot run {tool}: {exc.strerror or exc}") from None
            progress = Progress(args.seconds)
            while proc.poll() is None:
                progress.update("perf_analyzer")
                time.sleep(0.1)
            progress.update("perf_analyzer", done=True)
        if proc.returncode != 0 or not table.exists():
            lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
            lines = [line for line in lines if line]
            reason = next((x for x in lines if "error" in x.lower()), lines[-1] if lines else "")
            raise CliError(f"perf_analyzer failed (exit {proc.returncode}) {reason}".strip())
        with table.open() as f:
            row = next(csv.DictReader(f))

    def ms(column: str) -> float:
        return float(row[column]) / 1000

    print(
        f"{args.model} over {args.protocol} at {server}: concurrency {args.concurrency}, "
        f"{time.perf_counter() - start:.1f} s (perf_analyzer: {tool})"
    )
    columns = {
        "req/s": float(row["Inferences/Second"]),
        **{f"{p} ms": ms(f"{p} latency") for p in ("p50", "p90", "p95", "p99")},
        "server queue ms": ms("Server Queue"),
        "server compute ms": sum(ms(f"Server Compute {x}") for x in ("Input", "Infer", "Output")),
    }
    print(format_table(list(columns), [list(columns.values())]))
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """`volley bench MODEL`; 0 when requests succeeded, 1 on error."""
    if args.concurrency < 1 or args.seconds <= 0:
        print("error: --concurrency must be >= 1 and --seconds > 0", file=sys.stderr)
        return 2
    try:
        client, server = connect(args)
        with server_errors(server, args.protocol):
            metadata = as_json(
                args.protocol, client.get_model_metadata, args.model, args.model_version
            )
            config = as_json(args.protocol, client.get_model_config, args.model, args.model_version)
        tool = None if args.builtin else find_perf_analyzer(args.perf_analyzer)
        if tool is None:
            return builtin(args, server, metadata)
        max_batch_size = int(config.get("config", config).get("max_batch_size", 0))
        return perf_analyzer(tool, args, server, metadata, max_batch_size)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
