"""The `volley` command: `volley serve`, `volley train fraud|detector`, `volley detect`,
`volley camera`, and the admin tools `volley models`, `volley infer` and `volley bench`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from server import __version__


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the models of a model repository over HTTP and gRPC",
        description="Load every model in the repository and serve it over the KServe v2 / "
        "Triton protocol on HTTP and gRPC, with Prometheus metrics. SIGTERM drains and exits 0.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model-repository",
        type=Path,
        default=Path("models"),
        help="folder holding <model>/config.yaml and <model>/<version>/model.onnx",
    )
    p.add_argument("--host", default="0.0.0.0", help="address every listener binds to")
    p.add_argument("--http-port", type=int, default=8000, help="KServe v2 REST port")
    p.add_argument("--grpc-port", type=int, default=8001, help="KServe v2 gRPC port")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=8002,
        help="Prometheus /metrics port (0: only on the HTTP port)",
    )
    p.add_argument(
        "--poll-repository",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="re-scan the repository this often and load new or changed models "
        "without a restart (0: never); implies --model-control poll",
    )
    p.add_argument(
        "--model-control",
        choices=["none", "poll", "explicit"],
        default=None,
        help="Triton's model control modes. none: load every model at start, refuse load/unload "
        "requests. poll: the same, and re-scan the repository (every --poll-repository "
        "seconds, 5 by default). explicit: load only the --load-model models at start, then "
        "whatever load/unload requests say. Default: explicit with --load-model '*' (every "
        "model at start, load/unload allowed), or poll when --poll-repository is set",
    )
    p.add_argument(
        "--load-model",
        action="append",
        default=None,
        metavar="NAME",
        help="with --model-control explicit: a model to load at start (repeatable; '*': all)",
    )
    p.add_argument(
        "--strict-readiness",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="server ready only while every model it should serve is ready (else: once the "
        "models of the start have loaded or failed)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=64 * 1024 * 1024,
        help="largest request body (HTTP, after decompression) or gRPC message",
    )
    p.add_argument(
        "--max-json-bytes",
        type=int,
        default=16 * 1024 * 1024,
        help="largest JSON part of an HTTP request (binary tensor data aside); JSON costs "
        "about 15 ms of decoding per MB, binary data nothing",
    )
    p.add_argument(
        "--api-keys",
        type=Path,
        metavar="FILE",
        help="YAML file of API keys with scopes (infer, admin): every call except liveness "
        "then needs 'Authorization: Bearer <key>' (docs/security.md)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        type=_cors_origin,
        default=[],
        metavar="ORIGIN",
        help="let web pages of this origin (scheme://host[:port], or * for any; repeatable) "
        "call the HTTP API from a browser: CORS preflights answered, answers readable "
        "(docs/security.md)",
    )
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve HTTPS and gRPC over TLS")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="PEM",
        help="mutual TLS: clients must present a certificate signed by this CA",
    )
    p.add_argument(
        "--metrics-tls",
        action="store_true",
        help="put the metrics port behind the same TLS (default: plain HTTP)",
    )
    p.add_argument(
        "--rate-limit",
        type=float,
        default=0.0,
        metavar="PER_SECOND",
        help="inference requests a second each client address may send (0: no limit); "
        "past it 429 / RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--rate-burst",
        type=float,
        default=0.0,
        metavar="REQUESTS",
        help="requests a client may send at once above --rate-limit (0: one second's worth)",
    )
    p.add_argument(
        "--allow-client-shm",
        action="store_true",
        help="let clients on this host register system shared-memory regions (Triton's "
        "extension) and pass tensors in them; only for clients trusted as the server's user",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds to let in-flight requests finish after SIGTERM",
    )
    p.add_argument(
        "--http-keepalive-timeout",
        type=_keepalive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="close an HTTP connection that has been idle this long since its last answer; "
        "behind a load balancer, set it above the balancer's own idle timeout, so that the "
        "balancer closes idle connections first (default 30)",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default="auto",
        metavar="N",
        help="server processes, each with its own models and an N-th of the CPUs' threads; past "
        "1, a supervisor process runs them: it holds the ports and passes each connection to the "
        "worker holding the fewest, keeps their model control, statistics, metrics and rate "
        "limits as one server's, and restarts one that dies "
        "(default 'auto': one per usable CPU up to 8, or 1 where ONNX Runtime's GPU build is "
        "installed, so that one process batches for the GPU)",
    )
    p.add_argument(
        "--busy-poll-us",
        type=_busy_poll_us,
        default=300,
        metavar="US",
        help="once no request is left to answer, keep the event loop polling for up to this "
        "many microseconds before it sleeps, if the last request came within that time of "
        "the loop's previous idle moment: a client sending one request after another has "
        "each read at once and run warm (lower latency at low load), for the price of a busy "
        "core while it keeps sending; a lone request leaves the loop asleep (0: always sleep "
        "at once)",
    )
    p.add_argument(
        "--busy-poll-always",
        action="store_true",
        help="poll for the --busy-poll-us window after every answer, however long ago the "
        "last request came",
    )
    p.add_argument(
        "--switch-interval-ms",
        type=_switch_interval_ms,
        metavar="MS",
        help="how long a thread running Python keeps the GIL while others wait for it "
        "(Python's default: 5). Lower serves camera streams with less latency and fewer "
        "skipped frames (the decode and batch threads wait less behind the event loop), for "
        "some throughput of small requests (bench/RESULTS.md, 'switch interval')",
    )
    p.add_argument(
        "--trace-config",
        action="append",
        default=[],
        metavar="[triton,]SETTING=VALUE",
        help="request tracing, as Triton's flag: triton,file=PATH (where traces go; needed to "
        "trace at all), level=TIMESTAMPS or TENSORS (again for both; default OFF), rate=N (one "
        "request in N, default 1000), count=N (traces to collect, default -1: no limit), "
        "triton,log-frequency=N (write every N traces to PATH.<k>; default 0: to PATH when the "
        "server stops). Clients change all but the file at run time (docs/tracing.md)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="least severe event logged",
    )
    # fmt: skip


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a shipped model (fraud or detector); --help shows each one's options",
        add_help=False,
    )
    p.add_argument("model", nargs="?", choices=["fraud", "detector"], help="which model to train")
    p.add_argument("-h", "--help", action="store_true", help="show the options of both models")
    p.add_argument("args", nargs=argparse.REMAINDER, help="options for that training script")


def _detect_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "detect",
        help="detect objects in image files with a running server's detection pipeline",
        description="Send image files (JPEG/PNG/WebP/BMP) to the `detect` model of a running "
        "Volley (or Triton) server and print the detections: boxes in the images' own pixels.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument(
        "--server",
        metavar="HOST:PORT",
        help="server address (default: localhost:8001 for grpc, localhost:8000 for http)",
    )
    p.add_argument(
        "--protocol", choices=["grpc", "http"], default="grpc", help="wire protocol (default: grpc)"
    )
    p.add_argument("--model", default="detect", help="detection pipeline model (default: detect)")
    p.add_argument(
        "--json", action="store_true", help="print JSON (one list of images) instead of a table"
    )
    p.add_argument(
        "--save",
        type=Path,
        metavar="DIR",
        help="write annotated copies of the images (same file names) to DIR",
    )
    p.add_argument(
        "--score-threshold", type=float, metavar="F", help="lowest score kept (server default)"
    )
    p.add_argument(
        "--classes", metavar="LIST", help="keep only these classes, e.g. 3,7 (names or ids)"
    )


def _camera_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "camera",
        help="stream a webcam, video file or RTSP/HTTP stream to the detection pipeline",
        description="Read frames with OpenCV from SOURCE, stream them as JPEG over gRPC "
        "ModelStreamInfer (latest frame wins on the server) and draw the newest detections with "
        "FPS and end-to-end latency, in a window or (--headless) into a video file and a "
        "JSON-lines log. Reconnects when the server goes away; Ctrl-C stops cleanly.",
    )
    p.add_argument("source", metavar="SOURCE", help="webcam index (0), video file, or URL")
    p.add_argument(
        "--server",
        default="localhost:8001",
        metavar="HOST:PORT",
        help="gRPC address (default: localhost:8001)",
    )
    p.add_argument("--model", default="detect", help="detection pipeline model (default: detect)")
    p.add_argument(
        "--headless",
        action="store_true",
        help="no window: write the annotated video (--out) and the answer log (--log)",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="VIDEO",
        help="annotated video, .avi (MJPG) or .mp4 (mp4v) (default with --headless: annotated.avi)",
    )
    p.add_argument(
        "--log",
        type=Path,
        metavar="JSONL",
        help="one JSON line per server answer (default with --headless: frames.jsonl)",
    )
    p.add_argument(
        "--max-fps",
        type=float,
        metavar="F",
        help="send at most F frames per second (video files: pace at F instead of the file's FPS)",
    )
    p.add_argument(
        "--score-threshold", type=float, metavar="F", help="lowest score kept (server default)"
    )
    p.add_argument(
        "--jpeg-quality",
        type=int,
        default=80,
        metavar="Q",
        help="JPEG quality of sent frames (default: 80)",
    )


def _client_options(p: argparse.ArgumentParser) -> None:
    """--server and --protocol of the admin tools (HTTP by default)."""
    p.add_argument(
        "--server",
        metavar="HOST:PORT",
        help="server address (default: localhost:8000 for http, localhost:8001 for grpc)",
    )
    p.add_argument(
        "--protocol", choices=["http", "grpc"], default="http", help="wire protocol (default: http)"
    )


def _models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list, load, unload a running server's models, or show their statistics",
        description="list: every model of the repository with version, state and reason. "
        "load/unload NAME: load or unload a model. stats [NAME]: per model version, inference "
        "and execution counts, mean batch size, average queue and compute time, successes and "
        "failures (the v2 statistics).",
    )
    p.add_argument(
        "action",
        nargs="?",
        default="list",
        choices=["list", "load", "unload", "stats"],
        help="what to do (default: list)",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="model name (list/stats: only this one)")
    _client_options(p)
    p.add_argument("--json", action="store_true", help="list/stats: print JSON instead of a table")
    p.add_argument(
        "--with-dependents",
        action="store_true",
        help="unload: also the models NAME runs (a pipeline's detector) that no other model "
        "runs (Triton's unload_dependents)",
    )


def _infer_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "infer",
        help="send one KServe v2 JSON inference request and print the outputs as JSON",
        description='Read a KServe v2 JSON infer request body ({"inputs": [{"name", '
        '"datatype", "shape", "data"}], optional "parameters" and "outputs"}) from '
        "FILE or stdin (-), send it with tritonclient and print the response as JSON: "
        '{"model_name", "model_version", "outputs": [{"name", "datatype", "shape", '
        '"data"}]}.',
    )
    p.add_argument("model", metavar="MODEL", help="model name")
    p.add_argument(
        "--json", required=True, metavar="FILE", help="request body file, or - for stdin"
    )
    p.add_argument("--model-version", default="", metavar="V", help="version (default: newest)")
    _client_options(p)


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="a short load test of one model: req/s and latency percentiles",
        description="Load-test MODEL on a running server at a fixed concurrency and print "
        "req/s and latency percentiles. Runs Triton's perf_analyzer when it is found (--perf-"
        "analyzer, PATH, or ../shared/tools/perf_analyzer next to the repository); otherwise "
        "(or with --builtin) worker threads send requests made from the model's metadata "
        "(random data; an encoded image for detection pipelines).",
    )
    p.add_argument("model", metavar="MODEL", help="model name")
    p.add_argument(
        "--concurrency", type=int, default=4, metavar="N", help="requests in flight (default: 4)"
    )
    p.add_argument(
        "--seconds", type=float, default=5.0, metavar="S", help="how long to run (default: 5)"
    )
    p.add_argument("--model-version", default="", metavar="V", help="version (default: newest)")
    _client_options(p)
    p.add_argument("--perf-analyzer", metavar="PATH", help="perf_analyzer executable to run")
    p.add_argument(
        "--builtin",
        action="store_true",
        help="use the built-in load test even if perf_analyzer is installed",
    )


def _number_between(convert: type, low: float, high: float, unit: str) -> Callable[[str], float]:
    """An argparse type: a number (`convert`: int or float) from `low` to `high` `unit`."""

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {low} to {high} {unit}, got {text!r}")
        return value

    return parse


_switch_interval_ms = _number_between(float, 0.05, 100, "milliseconds")
_busy_poll_us = _number_between(int, 0, 1_000_000, "microseconds")


def _keepalive_seconds(text: str) -> float:
    """`--http-keepalive-timeout`: seconds, more than 0 and at most a day."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"expected seconds above 0, up to 86400, got {text!r}")
    return value


def _cors_origin(text: str) -> str:
    """`--cors-origin`: `*` or scheme://host[:port]."""
    from server.cors import check_origin

    try:
        return check_origin(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workers(text: str) -> int:
    """`--workers`: a count of at least 1, or 'auto' (`cpus.automatic_workers`)."""
    if text == "auto":
        from server.cpus import automatic_workers

        return automatic_workers()
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a count of at least 1 or 'auto', got {text!r}")
    return count


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `volley` command."""
    parser = argparse.ArgumentParser(prog="volley", description="Volley inference server")
    parser.add_argument("--version", action="version", version=f"volley {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _train_parser(sub)
    _detect_parser(sub)
    _camera_parser(sub)
    _models_parser(sub)
    _infer_parser(sub)
    _bench_parser(sub)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "detect":
        return _detect(args)
    if args.command == "camera":
        return _camera(args)
    if args.command in ("models", "infer", "bench"):
        return _admin(args)
    if args.help or args.model is None:
        return _train_help()
    return _train(args.model, args.args)


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return _usage_error(
            "ONNX Runtime is not installed: pip install 'volley[cpu]' (or 'volley[gpu]' for CUDA)"
        )

    import uvloop

    from server import logs
    from server.settings import ServeSettings, StartupError, check_startup
    from server.tls import TlsFiles
    from server.tracing import parse_trace_config

    logs.configure(args.log_level)
    control = args.model_control or ("poll" if args.poll_repository > 0 else "explicit")
    if args.load_model and control != "explicit":
        return _usage_error("--load-model needs --model-control explicit")
    if args.poll_repository > 0 and control != "poll":
        return _usage_error(f"--poll-repository needs --model-control poll, not {control}")
    if (args.tls_cert is None) != (args.tls_key is None):
        return _usage_error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        return _usage_error("--tls-client-ca needs --tls-cert and --tls-key")
    tls = None
    if args.tls_cert is not None:
        tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca)
    try:
        trace, trace_file = parse_trace_config(args.trace_config)
    except ValueError as exc:
        return _usage_error(str(exc))
    default_all = args.model_control is None and not args.load_model
    load_models = ("*",) if default_all else tuple(args.load_model or ())
    settings = ServeSettings(
        model_repository=args.model_repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        model_control=control,
        load_models=load_models,
        strict_readiness=args.strict_readiness,
        poll_seconds=args.poll_repository or (5.0 if control == "poll" else 0.0),
        max_request_bytes=args.max_request_bytes,
        max_json_bytes=args.max_json_bytes,
        api_keys=args.api_keys,
        cors_origins=tuple(args.cors_origin),
        tls=tls,
        metrics_tls=args.metrics_tls,
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        shutdown_timeout=args.shutdown_timeout,
        http_keepalive_timeout=args.http_keepalive_timeout,
        workers=args.workers,
        allow_client_shm=args.allow_client_shm,
        busy_poll_us=args.busy_poll_us,
        busy_poll_always=args.busy_poll_always,
        switch_interval_ms=args.switch_interval_ms,
        trace=trace,
        trace_file=trace_file,
    )
    try:
        check_startup(settings)
    except StartupError as exc:
        print(f"volley serve: error: {exc}", file=sys.stderr)
        return 1
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if settings.workers > 1:
        from server.supervisor import supervise

        return asyncio.run(supervise(settings, args.log_level))
    from server.app import serve

    return asyncio.run(serve(settings))


def _usage_error(message: str) -> int:
    print(f"volley serve: error: {message}", file=sys.stderr)
    return 2


def _train_help() -> int:
    """`volley train --help`: every training script's options (they need the train extra)."""
    print("usage: volley train {fraud,detector} [options]\n")
    try:
        from training.detector.cli import build_parser as detector_parser
        from training.fraud.cli import build_parser as fraud_parser
    except ImportError as exc:
        print(f"the training options need the train extra ({exc}): pip install -e '.[cpu,train]'")
        return 0
    for name, build in (("fraud", fraud_parser), ("detector", detector_parser)):
        parser = build()
        parser.prog = f"volley train {name}"
        print(parser.format_help())
    return 0


def _train(model: str, args: list[str]) -> int:
    if model == "fraud":
        from training.fraud import main as train_main
    else:
        from training.detector import main as train_main
    return train_main(args)


def _detect(args: argparse.Namespace) -> int:
    from clients.detect_cli import run

    return run(args)


def _camera(args: argparse.Namespace) -> int:
    from clients.camera import run

    return run(args)


def _admin(args: argparse.Namespace) -> int:
    if args.command == "bench":
        from clients.bench_cli import run_bench

        return run_bench(args)
    from clients.admin_cli import run_infer, run_models

    return run_models(args) if args.command == "models" else run_infer(args)
