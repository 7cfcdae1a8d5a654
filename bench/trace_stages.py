"""Where traced requests spent their time, stage by stage, with percentiles.

Reads trace files in Triton's JSON format (Volley's `--trace-config`, docs/tracing.md; Triton's
own files too) and prints, per model and protocol, the p50 / p90 / p99 / max of each stage
between consecutive timestamps (Triton's `trace_summary.py` gives averages only, which hide
the tail a latency target is about).

    python bench/trace_stages.py trace.json [trace.json.worker1 ...]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson

# (stage, from timestamp, to timestamp); a trace lacking either end is left out of that stage
STAGES = [
    ("read (HTTP)", "HTTP_RECV_START", "HTTP_RECV_END"),
    ("read (gRPC: opened to read)", "GRPC_WAITREAD_START", "GRPC_WAITREAD_END"),
    ("front end to data plane", ("HTTP_RECV_END", "GRPC_WAITREAD_END"), "REQUEST_START"),
    ("validation to queue", "REQUEST_START", "QUEUE_START"),
    ("queue", "QUEUE_START", "COMPUTE_START"),
    ("compute: inputs", "COMPUTE_START", "COMPUTE_INPUT_END"),
    ("compute: run", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START"),
    ("compute: outputs", "COMPUTE_OUTPUT_START", "COMPUTE_END"),
    ("batch done to answer", "COMPUTE_END", "REQUEST_END"),
    ("answer to send", "REQUEST_END", ("HTTP_SEND_START", "GRPC_SEND_START")),
    ("send", ("HTTP_SEND_START", "GRPC_SEND_START"), ("HTTP_SEND_END", "GRPC_SEND_END")),
    ("server total", ("HTTP_RECV_START", "GRPC_WAITREAD_END", "REQUEST_START"),
     ("HTTP_SEND_END", "GRPC_SEND_END", "REQUEST_END")),
]  # fmt: skip


def load(paths: list[Path]) -> list[dict]:
    """Every trace in the files: its head record's fields plus `stamps` (name -> ns)."""
    traces: dict[tuple[Path, int], dict] = {}
    for path in paths:
        for record in orjson.loads(path.read_bytes()):
            trace = traces.setdefault((path, record["id"]), {"stamps": {}})
            if "model_name" in record:
                trace.update(record)
            for stamp in record.get("timestamps", ()):
                trace["stamps"][stamp["name"]] = stamp["ns"]
    return [t for t in traces.values() if "model_name" in t]


def _first(stamps: dict[str, int], names: str | tuple[str, ...]) -> int | None:
    for name in (names,) if isinstance(names, str) else names:
        if name in stamps:
            return stamps[name]
    return None


def protocol(stamps: dict[str, int]) -> str:
    if "HTTP_RECV_START" in stamps:
        return "HTTP"
    if "GRPC_WAITREAD_END" in stamps:
        return "gRPC"
    return "stream or pipeline"


def report(traces: list[dict]) -> str:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for trace in traces:
        groups[(trace["model_name"], protocol(trace["stamps"]))].append(trace)
    lines = []
    for (model, proto), members in sorted(groups.items()):
        lines += [f"\n{model}, {proto}: {len(members)} traces\n",
                  "| stage | p50 us | p90 us | p99 us | max us |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        for stage, start, end in STAGES:
            spans = []
            for trace in members:
                t0, t1 = _first(trace["stamps"], start), _first(trace["stamps"], end)
                if t0 is not None and t1 is not None:
                    spans.append((t1 - t0) / 1000)
            if spans:
                p50, p90, p99 = np.percentile(spans, [50, 90, 99])
                lines.append(f"| {stage} | {p50:,.0f} | {p90:,.0f} | {p99:,.0f} | "
                             f"{max(spans):,.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    print(report(load(args.files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
