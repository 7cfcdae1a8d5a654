"""GPU benchmark: the detector's copy paths, and the detect pipeline served, against in-process.

Run it where onnxruntime-gpu sees a GPU (it also runs on a CPU, for a smoke test):

    python bench/gpu.py                       # about 3 minutes
    python bench/gpu.py --seconds 2 --streams 2,4 --load-processes 2   # quick check

1. Detector, in process, per batch size: `sess.run` on host float32 (what a plain server pays),
   Volley's staged instance (page-locked buffers, IO binding) on float32, and the same on uint8
   images converted inside the graph (what the detect pipeline sends on a GPU).
   Then the uint8 instance on batches whose size changes every call (as a busy server forms
   them), at their own shape and padded to `max_batch_size` (`pad_device_batches`).
2. In-process pipeline ceiling: decode + letterbox on a thread per core, batches of the
   detector's size through the uint8 staged instance, NMS; no server.
3. Volley serving `models/`: concurrent gRPC clients in several processes sending one 640x480
   JPEG per request to `detect`, raw pixels to `detect`, and float tensors to `detector`; then
   30 FPS camera streams; then one JPEG at a time over HTTP and gRPC.

Served runs sweep every combination of `--workers`, `--decode-processes`,
`--switch-interval-ms`, `--detector-instances` and `--detector-options` (other detector config
changes); each prints the detector's mean gather / run / split time per batch from the v2
statistics. `--probe DIR` loads `bench/server_probe.py` into the server processes and prints,
per setting, the GIL wait a thread meets, the cores used and each ONNX Runtime call's wall and
thread CPU time. `--py-spy DIR` also samples every server thread
(native frames, idle ones too: a thread waiting for the GIL shows it) through the middle of each
camera load, as collapsed stacks, one file per setting (needs `py-spy` on the PATH).
`--perf-analyzer BIN` runs the fraud loads under Triton's perf_analyzer (C++, the wheel
perf-analyzer==2.60.0 runs as it is where glibc is 2.38 or newer) instead of Python clients,
whose own CPU use bounded the `--workers` scaling measured on 16 cores.

The load generators run on the same machine and take CPU from the server.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from serving import (
    Volley,
    machine,
    perf_analyzer,
    probe_env,
    repository_copy,
    start_volley,
    stop,
    switch_flags,
)
from vision import FPS, OPTIONS, STAGES, StreamLog, camera, camera_frames, single_image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.config import ModelConfig, build_config  # noqa: E402
from server.image_front import uint8_image_graph  # noqa: E402
from server.pipelines.images import decode_image, letterbox  # noqa: E402
from server.pipelines.layouts import read_candidates  # noqa: E402
from server.pipelines.postprocess import select, to_original  # noqa: E402
from server.runtime import OnnxInstance, provider_settings  # noqa: E402

SIZE = 320


def gpu_name() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    except Exception:  # no driver or no library: say so
        return "no GPU"


def timed(fn, seconds: float) -> tuple[int, float, np.ndarray]:
    """Calls of `fn` in `seconds` after 3 warm-up calls: (calls, elapsed s, per-call ms)."""
    for _ in range(3):
        fn()
    times = []
    begin = time.perf_counter()
    while (now := time.perf_counter()) - begin < seconds or len(times) < 5:
        fn()
        times.append((time.perf_counter() - now) * 1e3)
    return len(times), time.perf_counter() - begin, np.array(times)


@dataclass
class Instances:
    host: ort.InferenceSession
    staged: OnnxInstance
    uint8: OnnxInstance
    uint8_graph: bytes  # the detector taking uint8 [H, W, 3] images (converted in the graph)
    uint8_config: ModelConfig
    name: str
    batch: int  # the detector's max_batch_size


def make_instances(models: Path) -> Instances:
    folder = models / "detector"
    model_file = folder / "1" / "model.onnx"
    config = build_config(folder, model_file)
    name = config.inputs[0].name
    host = ort.InferenceSession(str(model_file), providers=provider_settings(config))
    staged = OnnxInstance(model_file, config, 0, staged=True)
    uint8_config = config.model_copy(
        update={"inputs": (config.inputs[0].model_copy(update={"datatype": "UINT8",
                                                               "dims": (SIZE, SIZE, 3)}),)}
    )  # fmt: skip
    graph = uint8_image_graph(model_file, name, 1 / 255)
    uint8 = OnnxInstance(graph, uint8_config, 0, staged=True)
    return Instances(host, staged, uint8, graph, uint8_config, name, config.max_batch_size)


SHAPE_CYCLE = (16, 11, 7, 14, 9, 12, 5, 15)  # batch sizes as a busy server forms them


def shape_changes(inst: Instances, seconds: float) -> list[str]:
    """The uint8 detector on batches whose size changes every call, run at their own shape and
    padded to `max_batch_size` rows (`pad_device_batches`), beside batches of one size."""
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (inst.batch, SIZE, SIZE, 3), dtype=np.uint8)
    lines = ["| batches | run at | ms per batch (mean) | images/s |", "|---|---|---:|---:|"]
    for padded in (False, True):
        instance = OnnxInstance(inst.uint8_graph, inst.uint8_config, 0, staged=True, padded=padded)
        for label, sizes in (
            (f"all {inst.batch} rows", (inst.batch,)),
            ("sizes " + ", ".join(map(str, SHAPE_CYCLE)), SHAPE_CYCLE),
        ):
            turn = itertools.cycle(sizes)

            def call(instance=instance, turn=turn) -> None:
                rows = next(turn)
                instance.run({inst.name: instance.gather(inst.name, [frames[:rows]])})

            _, _, ms = timed(call, seconds)
            run_at = "max_batch_size (padded)" if instance.padded else "their own size"
            images = np.mean(sizes) / ms.mean() * 1e3
            lines.append(f"| {label} | {run_at} | {ms.mean():.2f} | {images:,.0f} |")
    return lines


def detector_table(inst: Instances, batches: list[int], seconds: float) -> list[str]:
    rng = np.random.default_rng(0)
    lines = [
        "| batch | host float32 `sess.run` | staged float32, IO binding | staged uint8, "
        "converted in the graph |",
        "|---:|---:|---:|---:|",
    ]
    for batch in batches:
        u8 = rng.integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
        f32 = u8.transpose(0, 3, 1, 2).astype(np.float32) / 255
        cells = []
        for fn in (
            lambda f32=f32: inst.host.run(None, {inst.name: f32}),
            lambda f32=f32: inst.staged.run({inst.name: inst.staged.gather(inst.name, [f32])}),
            lambda u8=u8: inst.uint8.run({inst.name: inst.uint8.gather(inst.name, [u8])}),
        ):
            calls, elapsed, ms = timed(fn, seconds)
            cells.append(f"{calls * batch / elapsed:,.0f} img/s ({np.median(ms):.2f} ms)")
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    return lines


def prepare(data: bytes):
    decoded = decode_image(data, "frame", 40_000_000, fit=(SIZE, SIZE))
    return letterbox(decoded.rgb, SIZE, SIZE, 114, (decoded.width, decoded.height))


def pipeline_ceiling(inst: Instances, frames: list[bytes], batch: int, seconds: float) -> float:
    """Frames/s of decode + letterbox (a thread per core) + uint8 detector + NMS, no server."""
    pool = ThreadPoolExecutor(os.cpu_count() or 1)
    index = 0

    def submit():
        nonlocal index
        chunk = [frames[(index + i) % len(frames)] for i in range(batch)]
        index += batch
        return [pool.submit(prepare, f) for f in chunk]

    pending = submit()
    done = 0
    begin = time.perf_counter()
    while time.perf_counter() - begin < seconds:
        boxed = [f.result() for f in pending]
        pending = submit()
        pixels = np.stack([b.pixels for b in boxed])
        (raw,) = inst.uint8.run({inst.name: inst.uint8.gather(inst.name, [pixels])}).values()
        for per_image, b in zip(raw, boxed, strict=True):
            to_original(select(read_candidates("volley", per_image, 0.3), OPTIONS, True), b)
        done += batch
    rate = done / (time.perf_counter() - begin)
    pool.shutdown()
    return rate


def single_loop(inst: Instances, frames: list[bytes], seconds: float) -> np.ndarray:
    """Per-frame ms of the whole pipeline, one frame at a time in one loop (the c=1 floor)."""
    count = 0

    def one():
        nonlocal count
        b = prepare(frames[count % len(frames)])
        count += 1
        (raw,) = inst.uint8.run(
            {inst.name: inst.uint8.gather(inst.name, [b.pixels[None]])}
        ).values()
        to_original(select(read_candidates("volley", raw[0], 0.3), OPTIONS, True), b)

    return timed(one, seconds)[2]


KINDS = {  # what one request of each load kind is: model, input, shape, datatype
    "jpeg": ("detect", "images", [1], "BYTES"),
    "pixels": ("detect", "pixels", [1, 480, 640, 3], "UINT8"),
    "detector": ("detector", "images", [1, 3, SIZE, SIZE], "FP32"),
    "fraud-grpc": ("fraud", "features", [1, 17], "FP32"),
    "fraud-http": ("fraud", "features", [1, 17], "FP32"),
}


def load_worker(addresses: dict, kind: str, threads: int, seconds: float, queue) -> None:
    """One load-generator process: `threads` clients in a closed loop; puts latencies (ms)."""
    model, name, shape, datatype = KINDS[kind]
    module = httpclient if kind.endswith("-http") else grpcclient
    address = addresses["http" if kind.endswith("-http") else "grpc"]
    tensor = module.InferInput(name, shape, datatype)
    rng = np.random.default_rng(0)
    if datatype == "BYTES":
        tensor.set_data_from_numpy(np.array(camera_frames(1), dtype=np.object_))
    elif datatype == "UINT8":
        tensor.set_data_from_numpy(rng.integers(0, 256, shape, dtype=np.uint8))
    else:
        tensor.set_data_from_numpy(rng.random(shape, dtype=np.float32))  # binary on both
    out: list[float] = []
    inside: list[float] = []  # the server's own total (pipeline responses say it)
    errors = 0
    lock = threading.Lock()

    def run() -> None:
        nonlocal errors
        client = module.InferenceServerClient(address)
        mine, theirs = [], []
        end = time.perf_counter() + seconds
        while (t0 := time.perf_counter()) < end:
            try:
                result = client.infer(model, [tensor])
                mine.append((time.perf_counter() - t0) * 1e3)
                if model == "detect":
                    total = result.get_response().parameters["total_us"].int64_param
                    theirs.append(total / 1e3)
            except Exception:
                with lock:
                    errors += 1
        with lock:
            out.extend(mine)
            inside.extend(theirs)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    queue.put((out, errors, inside))


def served_load(addresses: dict, kind: str, procs: int, threads: int, seconds: float) -> str:
    queue = multiprocessing.get_context("spawn").Queue()
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=load_worker, args=(addresses, kind, threads, seconds, queue))
               for _ in range(procs)]  # fmt: skip
    for w in workers:
        w.start()
    results = [queue.get(timeout=seconds + 120) for _ in workers]
    for w in workers:
        w.join()
    latency = np.concatenate([np.array(r[0]) for r in results] or [np.zeros(1)])
    errors = sum(r[1] for r in results)
    inside = np.concatenate([np.array(r[2]) for r in results])
    server = f"{np.median(inside):.1f}" if len(inside) else "-"
    p50, p99 = np.percentile(latency, [50, 99])
    return (f"| {kind} | {procs * threads} | {len(latency) / seconds:,.0f} | {p50:.1f} | "
            f"{p99:.1f} | {server} | {errors} |")  # fmt: skip


def perf_analyzer_load(args: argparse.Namespace, addresses: dict, kind: str) -> str:
    """A fraud load from perf_analyzer (C++: far less CPU per request than the Python clients)
    at as many concurrent requests as the Python load would have."""
    protocol = "http" if kind.endswith("-http") else "grpc"
    clients = args.load_processes * args.load_threads
    rps, p50, p99 = perf_analyzer("fraud", addresses[protocol], protocol, clients, [],
                                  args.seconds, binary=[str(args.perf_analyzer)])  # fmt: skip
    return f"| {kind}, perf_analyzer | {clients} | {rps:,.0f} | {p50:.1f} | {p99:.1f} | - | 0 |"


def camera_group(address: str, streams: list[str], seconds: float, queue) -> None:
    frames = camera_frames()
    logs = {name: StreamLog() for name in streams}
    threads = [threading.Thread(target=camera, args=(address, frames, n, seconds, logs[n]))
               for n in streams]  # fmt: skip
    for i, t in enumerate(threads):
        t.start()
        time.sleep(1 / FPS / len(threads) * (i > 0))
    for t in threads:
        t.join()
    queue.put([(len(g.sent), g.latency_ms, g.server_us) for g in logs.values()])


def served_cameras(address: str, streams: int, procs: int, seconds: float) -> str:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    names = [f"c{i}" for i in range(streams)]
    groups = [names[i::procs] for i in range(min(procs, streams))]
    workers = [ctx.Process(target=camera_group, args=(address, g, seconds, queue)) for g in groups]
    for w in workers:
        w.start()
    logs = [log for _ in workers for log in queue.get(timeout=seconds + 120)]
    for w in workers:
        w.join()
    sent = sum(g[0] for g in logs)
    latency = np.concatenate([np.array(g[1]) for g in logs] + [np.zeros(0)])
    answered = len(latency)
    skipped = sent - answered
    p50, p99 = np.percentile(latency, [50, 99]) if answered else (0.0, 0.0)
    sustained = p99 <= 100 and skipped / max(sent, 1) < 0.01
    stages = np.array([row for g in logs for row in g[2]] or [[0] * len(STAGES)])
    inside = " / ".join(f"{v / 1e3:.1f}" for v in np.median(stages, axis=0))
    return (f"| {streams} | {answered / seconds:,.0f} | {skipped / max(sent, 1):.1%} | {p50:.1f} |"
            f" {p99:.1f} | {inside} | {'yes' if sustained else 'no'} |")  # fmt: skip


def detector_batching(http: str) -> str:
    stats = requests.get(f"{http}/v2/models/detector/stats", timeout=5).json()["model_stats"]
    inferences = sum(int(s["inference_count"]) for s in stats)
    executions = sum(int(s["execution_count"]) for s in stats)
    mean = inferences / max(executions, 1)
    stages = {"gather": "compute_input", "run": "compute_infer", "split": "compute_output"}
    per_batch = []
    for label, key in stages.items():  # batch_stats count each batch once (not per request)
        ns = sum(int(b[key]["ns"]) for s in stats for b in s["batch_stats"])
        per_batch.append(f"{label} {ns / max(executions, 1) / 1e6:.2f}")
    return (f"Detector: {inferences:,} images in {executions:,} batches (mean {mean:.1f}); "
            f"mean ms per batch: {' / '.join(per_batch)}")  # fmt: skip


@dataclass(frozen=True)
class Setting:
    """One served configuration of the sweep."""

    workers: int
    decoders: int  # detect's decode_processes (0: threads)
    switch_ms: float | None  # the server processes' GIL switch interval (None: Python's)
    instances: int  # the detector's instance_count
    options: str  # more detector config changes, "key=value,..." ("default": none)

    def title(self) -> str:
        title = (f"Volley `--workers {self.workers}`, `detect` with decode_processes: "
                 f"{self.decoders}, detector instance_count: {self.instances}")  # fmt: skip
        if self.switch_ms is not None:
            title += f", GIL switch interval {self.switch_ms} ms"
        if self.options != "default":
            title += f", detector {self.options}"
        return title

    def detector_changes(self) -> dict:
        changes: dict = {"instance_count": self.instances}
        if self.instances == 1:
            changes["solo_session"] = False  # a lone instance always runs alone
        if self.options != "default":
            for pair in self.options.split(","):
                key, value = pair.split("=", 1)
                changes[key] = yaml.safe_load(value)
        return changes

    def slug(self) -> str:
        slug = f"w{self.workers}-d{self.decoders}-i{self.instances}-s{self.switch_ms or 'default'}"
        return slug if self.options == "default" else f"{slug}-{self.options.replace('=', '')}"


def py_spy_record(pid: int, seconds: float, file: Path, label: str) -> None:
    """Append `seconds` of py-spy samples of `pid` and its worker processes to `file`: every
    thread, idle ones too, with native frames (a thread waiting for the GIL shows it), as
    collapsed stacks with their sample counts."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as raw:
        done = subprocess.run(
            ["py-spy", "record", "--native", "--idle", "--threads", "--subprocesses",
             "--rate", "100", "--duration", str(max(1, round(seconds))), "--format", "raw",
             "--output", raw.name, "--pid", str(pid)],
            capture_output=True, text=True, timeout=seconds + 60, check=False,
        )  # fmt: skip
        stacks = Path(raw.name).read_text()
    with file.open("a") as out:
        out.write(f"===== {label} (py-spy exit {done.returncode}) {done.stderr[-500:]}\n")
        out.write(stacks)


def served(
    args: argparse.Namespace,
    setting: Setting,
    frames: list[bytes],
    loop_ms,
) -> list[str]:
    """Start Volley as `setting` says and run every served load against it."""
    probe = None
    if args.probe:
        probe = args.probe / setting.slug()
        probe.mkdir(parents=True, exist_ok=True)
    with (
        repository_copy(args.models, "detector", **setting.detector_changes()) as detector,
        repository_copy(detector, "detect", decode_processes=setting.decoders) as models,
        probe_env(probe) as env,
    ):
        flags = ("--workers", str(setting.workers), *switch_flags(setting.switch_ms))
        volley = start_volley(models, *flags, env=env)
        out = served_on(args, volley, frames, loop_ms, setting)
    return out if probe is None else out + ["", *probe_summary(probe)]


def probe_summary(folder: Path) -> list[str]:
    """`server_probe`'s lines, per server process, over the seconds it ran the detector."""
    out = ["| process | seconds under load | GIL wait p50 / p99 / max ms (medians) | cores | "
           "threads | ONNX Runtime calls: count, mean wall / thread CPU ms |",
           "|---|---:|---|---:|---:|---|"]  # fmt: skip
    for file in sorted(folder.glob("probe-*.txt")):
        rows = [
            dict(f.split("=", 1) for f in line.split()) for line in file.read_text().splitlines()
        ]
        busy = [r for r in rows if any(k.startswith(("images", "pixels")) for k in r)]
        if not busy:
            continue
        gil = np.median([[float(v) for v in r["gil"].split("/")] for r in busy], axis=0)
        calls: dict[str, list[float]] = {}
        for r in busy:
            for key, value in r.items():
                if "." in key:
                    n, wall, cpu = (float(v) for v in value.split("/"))
                    total = calls.setdefault(key, [0.0, 0.0, 0.0])
                    total[0] += n
                    total[1] += n * wall
                    total[2] += n * cpu
        runs = "; ".join(
            f"{k} {n:,.0f}, {w / n:.2f} / {c / n:.2f}" for k, (n, w, c) in calls.items()
        )
        out.append(f"| {file.stem} | {len(busy)} | {' / '.join(f'{v:.2f}' for v in gil)} | "
                   f"{np.median([float(r['cpu']) for r in busy]):.2f} | "
                   f"{max(int(r['threads']) for r in busy)} | {runs} |")  # fmt: skip
    return out


def served_on(
    args: argparse.Namespace, volley: Volley, frames: list[bytes], loop_ms, setting: Setting
) -> list[str]:
    """Every served load against `volley`, which is stopped after."""
    http = f"http://{volley.http}"
    addresses = {"http": volley.http, "grpc": volley.grpc}
    out = []
    try:
        config = requests.get(f"{http}/v2/models/detector/config", timeout=5).json()
        out += [f"Detector instance kind: {config['instance_group'][0]['kind']}", "",
                "| load (closed loop) | clients | requests/s | p50 ms | p99 ms | "
                "in the server, p50 ms | errors |",
                "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for kind in args.kinds.split(","):
            if args.perf_analyzer and kind.startswith("fraud-"):
                out.append(perf_analyzer_load(args, addresses, kind))
                continue
            out.append(
                served_load(addresses, kind, args.load_processes, args.load_threads, args.seconds)
            )
        out += ["", detector_batching(http), "",
                "| 30 FPS cameras (gRPC streams) | processed frames/s | skipped | p50 ms | "
                "p99 ms | in the server, p50 ms: decode / queue / infer / NMS / total | "
                "sustained (p99 <= 100 ms, < 1 % skipped) |",
                "|---:|---:|---:|---:|---:|---|:---:|"]  # fmt: skip
        for streams in (int(s) for s in args.streams.split(",")):
            spy = None
            if args.py_spy:  # samples of every thread through the middle of the load
                file = args.py_spy / f"pyspy-{setting.slug()}.txt"
                spy = threading.Timer(args.seconds / 4, py_spy_record,
                                      (volley.proc.pid, args.seconds / 2, file,
                                       f"{streams} cameras"))  # fmt: skip
                spy.start()
            out.append(
                served_cameras(addresses["grpc"], streams, args.load_processes, args.seconds)
            )
            if spy is not None:
                spy.join()
        single = single_image(addresses["http"], addresses["grpc"], frames[0], 200)
        out += ["", "| one 640x480 JPEG at a time | p50 ms | p99 ms |", "|---|---:|---:|",
                f"| in-process single loop | {np.percentile(loop_ms, 50):.2f} | "
                f"{np.percentile(loop_ms, 99):.2f} |"]  # fmt: skip
        for name, times in single.items():
            p50, p99 = np.percentile(times, [50, 99])
            out.append(f"| Volley {name} | {p50:.2f} | {p99:.2f} |")
    finally:
        stop(volley.proc)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--streams", default="16,32,48,64")
    parser.add_argument("--load-processes", type=int, default=8)
    parser.add_argument("--load-threads", type=int, default=8)
    parser.add_argument("--workers", default="1", help="served runs, one per worker count")
    parser.add_argument(
        "--decode-processes", default="0", help="and per detect decode_processes (0: threads)"
    )
    parser.add_argument(
        "--switch-interval-ms",
        default="default",
        help="and per GIL switch interval of the server processes (default: Python's 5 ms)",
    )
    parser.add_argument("--detector-instances", default="2", help="and per detector instance_count")
    parser.add_argument(
        "--detector-options",
        default="default",
        help="and per set of other detector config changes: 'key=value,...' sets separated by '|'",
    )
    parser.add_argument(
        "--probe",
        type=Path,
        help="folder: per second GIL wait, cores and ONNX Runtime call times inside the server "
        "(bench/server_probe.py), summarized under each setting",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        help="folder: py-spy samples of the server through the middle of each camera load",
    )
    parser.add_argument("--kinds", default="jpeg,fraud-grpc,fraud-http", help=", ".join(KINDS))
    parser.add_argument(
        "--perf-analyzer",
        type=Path,
        help="perf_analyzer binary: the fraud loads run under it instead of Python clients",
    )
    args = parser.parse_args()

    inst = make_instances(args.models)
    frames = camera_frames()
    table = detector_table(inst, [int(b) for b in args.batches.split(",")], args.seconds / 2)
    table += [
        "",
        "Batch sizes that change, in process:",
        "",
        *shape_changes(inst, args.seconds / 2),
    ]
    out = [
        f"Machine: {machine()}, GPU: {gpu_name()}",
        f"Detector provider: {inst.staged.provider}; staging buffers page-locked: "
        f"{inst.staged.pinned and inst.uint8.pinned}",
        "",
        "Detector in process (images/s, median ms per call):",
        "",
        *table,
    ]
    batch = inst.batch
    ceiling = pipeline_ceiling(inst, frames, batch, args.seconds)
    loop_ms = single_loop(inst, frames, args.seconds / 2)
    out += [
        "",
        f"In-process pipeline ceiling (640x480 JPEG: decode + letterbox on {os.cpu_count()} "
        f"threads, uint8 batches of {batch}, NMS): {ceiling:,.0f} frames/s",
        f"In-process single loop, one frame at a time: p50 {np.percentile(loop_ms, 50):.2f} ms, "
        f"p99 {np.percentile(loop_ms, 99):.2f} ms",
    ]
    del inst
    fraud_file = args.models / "fraud" / "1" / "model.onnx"
    fraud = ort.InferenceSession(str(fraud_file), providers=["CUDAExecutionProvider",
                                                             "CPUExecutionProvider"])  # fmt: skip
    row = np.random.default_rng(0).random((1, 17), dtype=np.float32)
    calls, elapsed, ms = timed(lambda: fraud.run(None, {"features": row}), args.seconds / 2)
    out.append(f"In-process fraud model, one row per `sess.run` on {fraud.get_providers()[0]}: "
               f"{calls / elapsed:,.0f} calls/s, p50 {np.median(ms):.3f} ms")  # fmt: skip

    switches = [float(s) if s != "default" else None for s in args.switch_interval_ms.split(",")]
    if args.py_spy:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    for workers, decoders, switch_ms, instances, options in itertools.product(
        [int(w) for w in args.workers.split(",")],
        [int(d) for d in args.decode_processes.split(",")],
        switches,
        [int(n) for n in args.detector_instances.split(",")],
        args.detector_options.split("|"),
    ):
        setting = Setting(workers, decoders, switch_ms, instances, options)
        out += ["", f"### {setting.title()}", ""]
        section = served(args, setting, frames, loop_ms)
        out += section
        print(f"{setting.title()}:", *section, sep="\n", file=sys.stderr)  # progress
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
