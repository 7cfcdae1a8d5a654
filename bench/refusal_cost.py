"""What one refusal costs the event loop: a full `detect` pipeline refusing JPEG requests.

Under overload most requests are refused, and every microsecond of the event loop a refusal
takes is taken from the requests being served (bench/overload.py). This serves the shipped
models with `detect` at `max_queue_size: 1`, sends 640x480 JPEGs in a closed loop with
bench/overload.py's lean loads (16 in flight over keep-alive HTTP connections with binary
tensors, or over one gRPC connection) so that nearly every request is refused, and divides the
CPU time of the server's main thread (the event loop) by the answers.

    python bench/refusal_cost.py                          # this checkout, two rounds
    python bench/refusal_cost.py --tree /tmp/old --rounds 3   # alternated with another checkout

`--tree` names another checkout (e.g. `git worktree add /tmp/old HEAD~1`), run in alternation
with this one, so both meet the same phases of a shared VM.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import uvloop
from overload import HttpLoad, Load, RawGrpcLoad, cpu_seconds
from serving import Volley, machine, repository_copy, volley_running
from vision import camera_frames

ROOT = Path(__file__).resolve().parents[1]
IN_FLIGHT = 16


async def answer_counts(load: Load, seconds: float) -> dict[str, int]:
    """Keep IN_FLIGHT requests in flight for `seconds`, each sent from the callback that took
    the last answer (no task per request: the generator takes little CPU from the server)."""
    counts: dict[str, int] = {}
    stop_at = time.monotonic() + seconds
    finished = asyncio.get_running_loop().create_future()
    in_flight = sent = 0

    def answered(outcome: str) -> None:
        nonlocal in_flight
        counts[outcome] = counts.get(outcome, 0) + 1
        in_flight -= 1
        send()

    def send() -> None:
        nonlocal in_flight, sent
        if time.monotonic() < stop_at:
            in_flight += 1
            sent += 1
            load.start(sent, answered)
        elif in_flight == 0 and not finished.done():
            finished.set_result(None)

    for _ in range(IN_FLIGHT):
        send()
    await finished
    return counts


async def measure(volley: Volley, protocol: str, seconds: float) -> tuple[int, int, float]:
    """(answers, refusals, event-loop CPU seconds) of one protocol's closed loop."""
    frames = camera_frames(1)
    load: Load = (
        HttpLoad(volley.http, frames) if protocol == "http" else RawGrpcLoad(volley.grpc, frames)
    )
    pid = volley.proc.pid
    await load.connect()
    try:
        await answer_counts(load, 1.0)  # warm up
        before = cpu_seconds(pid, main_thread=True)
        counts = await answer_counts(load, seconds)
        cpu = cpu_seconds(pid, main_thread=True) - before
    finally:
        await load.close()
    return sum(counts.values()), counts.get("refused", 0), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, help="another checkout, run in alternation")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    trees = [("this checkout", ROOT)] + ([(str(args.tree), args.tree)] if args.tree else [])
    print(f"Machine: {machine()}")
    print(f"detect, max_queue_size 1, 640x480 JPEG, {IN_FLIGHT} in flight, {args.seconds:g} s\n")
    print("| tree | round | protocol | answers/s | refused | event-loop CPU us per answer |")
    print("|---|---:|---|---:|---:|---:|")
    for round_ in range(1, args.rounds + 1):
        for name, tree in trees:
            with (
                repository_copy(ROOT / "models", "detect", max_queue_size=1) as repository,
                volley_running(repository, tree=tree) as volley,
            ):
                for protocol in ("http", "grpc"):
                    answers, refused, cpu = uvloop.run(measure(volley, protocol, args.seconds))
                    share, per_answer = refused / answers, cpu / answers * 1e6
                    print(
                        f"| {name} | {round_} | {protocol} | {answers / args.seconds:,.0f} | "
                        f"{share:.1%} | {per_answer:.0f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
