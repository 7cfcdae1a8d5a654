"""`volley models` and `volley infer`: manage and query a running server with tritonclient.

Both speak HTTP (default, localhost:8000) or gRPC (localhost:8001). `clients/bench_cli.py` builds
`volley bench` on the same helpers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from clients.vision import Protocol, client_error, default_server, response_parameters

STATS_COLUMNS = (
    "model",
    "version",
    "inferences",
    "executions",
    "mean batch",
    "avg queue ms",
    "avg compute ms",
    "success",
    "fail",
)


class CliError(Exception):
    """A failure worth one clear line on stderr (bad input, server error, unreachable)."""


def client_module(protocol: Protocol) -> Any:
    """`tritonclient.http` or `tritonclient.grpc`."""
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


@contextmanager
def server_errors(server: str, protocol: Protocol) -> Iterator[None]:
    """Turn tritonclient and socket exceptions raised inside into a one-line CliError."""
    try:
        yield
    except CliError:
        raise
    except Exception as exc:
        raise CliError(str(client_error(exc, server, protocol))) from None


def connect(args: argparse.Namespace) -> tuple[Any, str]:
    """A tritonclient InferenceServerClient for --server/--protocol, and its address."""
    server = args.server or default_server(args.protocol)
    with server_errors(server, args.protocol):
        return client_module(args.protocol).InferenceServerClient(server), server


def as_json(protocol: Protocol, call: Callable[..., Any], *args: Any) -> Any:
    """Call a tritonclient method; gRPC answers asked for as JSON (HTTP's always are)."""
    return call(*args, as_json=True) if protocol == "grpc" else call(*args)


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Aligned plain-text columns; numbers right-aligned, text left-aligned."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(row, widths, numeric, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


# --- volley models ------------------------------------------------------------------------------


def run_models(args: argparse.Namespace) -> int:
    """`volley models [list|load|unload|stats] [NAME]`; 0 on success, 1 on error."""
    if args.action in ("load", "unload") and not args.name:
        print(f"error: volley models {args.action} needs a model NAME", file=sys.stderr)
        return 2
    try:
        client, server = connect(args)
        with server_errors(server, args.protocol):
            if args.action == "load":
                client.load_model(args.name)
                print(f"{args.name}: loaded")
            elif args.action == "unload":
                client.unload_model(args.name, unload_dependents=args.with_dependents)
                print(f"{args.name}: unloaded" + (" with its dependents" * args.with_dependents))
            elif args.action == "stats":
                _print_stats(client, args)
            else:
                _print_index(client, args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_index(client: Any, args: argparse.Namespace) -> None:
    index = as_json(args.protocol, client.get_model_repository_index)
    rows = index["models"] if isinstance(index, dict) else index
    models = [
        {
            "name": row["name"],
            "version": row.get("version") or "",
            "state": row.get("state") or "UNKNOWN",
            "reason": row.get("reason") or "",
        }
        for row in rows
        if not args.name or row["name"] == args.name
    ]
    if args.name and not models:
        raise CliError(f"no model named {args.name!r} in the repository")
    if args.json:
        print(json.dumps(models, indent=2))
    else:
        table = [(m["name"], m["version"] or "-", m["state"], m["reason"]) for m in models]
        print(format_table(("name", "version", "state", "reason"), table))


def model_stats(raw: dict) -> dict[str, Any]:
    """One model version's v2 statistics as plain numbers (gRPC sends int64 as strings)."""

    def count(key: str) -> int:
        return int(raw["inference_stats"].get(key, {}).get("count", 0))

    def nanos(key: str) -> int:
        return int(raw["inference_stats"].get(key, {}).get("ns", 0))

    inferences, executions = int(raw.get("inference_count", 0)), int(raw.get("execution_count", 0))
    compute_ns = sum(nanos(k) for k in ("compute_input", "compute_infer", "compute_output"))
    return {
        "model": raw["name"],
        "version": str(raw.get("version", "")),
        "inference_count": inferences,
        "execution_count": executions,
        "mean_batch": inferences / executions if executions else 0.0,
        "avg_queue_ms": nanos("queue") / count("queue") / 1e6 if count("queue") else 0.0,
        "avg_compute_ms": compute_ns / count("compute_infer") / 1e6
        if count("compute_infer")
        else 0.0,
        "success": count("success"),
        "fail": count("fail"),
    }


def _print_stats(client: Any, args: argparse.Namespace) -> None:
    raw = as_json(args.protocol, client.get_inference_statistics, args.name or "")
    stats = sorted(
        (model_stats(s) for s in raw.get("model_stats", [])),
        key=lambda s: (s["model"], s["version"]),
    )
    if args.json:
        print(json.dumps(stats, indent=2))
        return
    print(format_table(STATS_COLUMNS, [tuple(s.values()) for s in stats]))


# --- volley infer -------------------------------------------------------------------------------


def run_infer(args: argparse.Namespace) -> int:
    """`volley infer MODEL --json FILE|-`; prints the response as JSON; 0 or 1."""
    try:
        body = _read_request(args.json)
        inputs, outputs, parameters = _build_request(body, args.protocol)
        client, server = connect(args)
        with server_errors(server, args.protocol):
            result = client.infer(
                args.model,
                inputs,
                model_version=args.model_version,
                outputs=outputs,
                request_id=str(body.get("id", "")),
                parameters=parameters,
            )
            print(json.dumps(response_json(result, args.protocol)))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _read_request(source: str) -> dict:
    name = "stdin" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{name}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{name}: invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise CliError(f"{name}: the request must be a JSON object with an 'inputs' list")
    return body


def _field(obj: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise CliError(f"{where}: missing '{key}'")
    if not isinstance(obj[key], kind):
        raise CliError(f"{where}: '{key}' has the wrong type ({type(obj[key]).__name__})")
    return obj[key]


def _build_request(body: dict, protocol: Protocol) -> tuple[list, list | None, dict | None]:
    """tritonclient InferInputs, requested outputs and parameters from a KServe v2 JSON body."""
    from tritonclient.utils import triton_to_np_dtype

    module = client_module(protocol)
    specs = _field(body, "inputs", list, "request")
    if not specs:
        raise CliError("request: 'inputs' is empty")
    inputs = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise CliError(f"inputs[{i}]: must be an object")
        name = _field(spec, "name", str, f"inputs[{i}]")
        where = f"input {name!r}"
        datatype = _field(spec, "datatype", str, where)
        shape = _field(spec, "shape", list, where)
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CliError(f"{where}: 'shape' must be a list of non-negative integers")
        data = _field(spec, "data", (list, str, int, float, bool), where)
        dtype = triton_to_np_dtype(datatype)
        if dtype is None:
            raise CliError(f"{where}: unknown datatype {datatype!r}")
        try:
            if datatype == "BYTES":
                flat = np.array(data, dtype=np.object_).reshape(-1)
                array = np.array([str(v).encode() for v in flat], dtype=np.object_)
            else:
                array = np.asarray(data, dtype=dtype).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise CliError(f"{where}: data is not {datatype}: {exc}") from None
        if array.size != int(np.prod(shape)):
            raise CliError(f"{where}: {array.size} values do not fill shape {shape}")
        tensor = module.InferInput(name, shape, datatype)
        binary = {"binary_data": True} if protocol == "http" else {}
        try:
            tensor.set_data_from_numpy(array.reshape(shape), **binary)
        except Exception as exc:  # tritonclient's own checks (dtype, shape)
            raise CliError(f"{where}: {exc}") from None
        inputs.append(tensor)
    outputs = None
    if "outputs" in body:
        outputs = []
        for i, spec in enumerate(_field(body, "outputs", list, "request")):
            if not isinstance(spec, dict):
                raise CliError(f"outputs[{i}]: must be an object")
            name = _field(spec, "name", str, f"outputs[{i}]")
            classes = int((spec.get("parameters") or {}).get("classification", 0))
            if protocol == "http":
                outputs.append(
                    module.InferRequestedOutput(name, binary_data=True, class_count=classes)
                )
            else:
                outputs.append(module.InferRequestedOutput(name, class_count=classes))
    parameters = body.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise CliError("request: 'parameters' must be an object")
    return inputs, outputs, parameters


def response_json(result: Any, protocol: Protocol) -> dict[str, Any]:
    """An InferResult as KServe v2 JSON: model, version, outputs with flat data lists."""
    response = result.get_response(as_json=True) if protocol == "grpc" else result.get_response()
    answer: dict[str, Any] = {
        "model_name": response.get("model_name", ""),
        "model_version": str(response.get("model_version", "")),
    }
    if response.get("id"):
        answer["id"] = response["id"]
    parameters = response_parameters(result)  # gRPC's typed parameters as plain values
    if parameters:
        answer["parameters"] = parameters
    answer["outputs"] = [
        {
            "name": out["name"],
            "datatype": out["datatype"],
            "shape": [int(d) for d in out.get("shape", [])],
            "data": _plain(result.as_numpy(out["name"])),
        }
        for out in response.get("outputs", [])
    ]
    return answer


def _plain(array: np.ndarray | None) -> list:
    """Flat JSON-ready values; floats in their shortest round-tripping form, bytes as text."""
    if array is None:
        return []
    flat = array.reshape(-1)
    if flat.dtype == np.object_:
        return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in flat]
    if flat.dtype.kind == "f":
        return [float(str(v)) for v in flat]
    return flat.tolist()
