"""One worker process of `volley serve --workers N`: the whole server (`app.serve`), serving the
connections the supervisor (`server.supervisor`) accepts and passes to it (`server.handoff`).

Started as `python -P -m server.worker` with its arguments pickled on stdin. What must agree
between workers goes through the supervisor: load and unload requests (every worker applies
one before it is answered), statistics (summed over the workers), repository polls, shared
memory registrations and log settings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import sys
from pathlib import Path

from server import ipc
from server.child_process import die_with_parent
from server.dataplane import DataPlane
from server.errors import VolleyError, unavailable
from server.handoff import ConnectionCounts, ConnectionReceiver, receiver_channel
from server.ipc import CONNECTION_COUNTS, CONTROL_SOCKET, RATE_LIMITS, worker_socket
from server.log_settings import process_settings
from server.ratelimit import RateLimiter
from server.repository import CONTROL_REFUSED, ModelRepository
from server.shm import check_registration
from server.stats import merge_stats
from server.tracing import TRACER

log = logging.getLogger(__name__)


class Worker:
    """This process's place among the workers: its index, the supervisor's directory, and the
    channel its connections come through."""

    def __init__(self, index: int, workers: int, directory: Path, channel: int) -> None:
        self.index = index
        self.control = directory / CONTROL_SOCKET
        self.rate_limits = directory / RATE_LIMITS  # the buckets of --rate-limit, shared
        self._path = worker_socket(directory, index)
        self._dataplane: WorkerDataPlane | None = None
        self._server: asyncio.Server | None = None
        counts = ConnectionCounts(directory / CONNECTION_COUNTS, workers)
        self.connections = ConnectionReceiver(receiver_channel(channel), counts, index)

    def dataplane(
        self,
        repository: ModelRepository,
        strict_readiness: bool,
        rate_limiter: RateLimiter | None,
    ) -> WorkerDataPlane:
        """The data plane of this worker (statistics and model control span every worker)."""
        self._dataplane = WorkerDataPlane(repository, strict_readiness, rate_limiter, self)
        return self._dataplane

    async def join(self) -> None:
        """Take the supervisor's commands, and register: the supervisor first replays the load
        and unload requests the other workers took so far, then sends this one every new one."""
        self._server = await ipc.listen(self._path, self._command)
        await ipc.call(self.control, {"op": "register", "index": self.index, "pid": os.getpid()})

    async def serving(self) -> None:
        """Tell the supervisor this worker serves (from now on it is passed connections, and
        restarted if it dies)."""
        await ipc.call(self.control, {"op": "serving", "index": self.index, "pid": os.getpid()})

    async def leave(self) -> None:
        """Stop taking commands (the process is about to exit)."""
        if self._server is not None:
            self._server.close()

    async def _command(self, message: dict) -> dict:
        repository = self._dataplane.repository
        op = message["op"]
        if op == "load":
            await repository.request_load(message["model"], message["override"])
        elif op == "unload":
            await repository.request_unload(message["model"])
        elif op == "poll":
            try:
                await repository.poll()
            except Exception:  # as poll_forever in a single process: logged, tried again later
                log.exception("repository poll failed", extra={"event": "poll_failed"})
        elif op == "shm_register":
            regions = self._dataplane.shared_memory
            regions.register(
                message["name"], message["key"], message["offset"], message["byte_size"]
            )
        elif op == "shm_unregister":
            self._dataplane.shared_memory.unregister(message["name"])
        elif op == "log_settings":
            process_settings().apply(message["settings"])
        elif op == "trace_settings":
            TRACER.apply(message["model"], message["changes"])
        elif op == "trace_state":
            TRACER.restore(message["state"])
        elif op == "stats":
            try:
                return {"stats": await self._dataplane.own_statistics(**message["args"])}
            except VolleyError:
                return {"stats": []}  # not served here: the asking worker decides what it means
        return {}


class WorkerDataPlane(DataPlane):
    """A data plane whose statistics and model control cover every worker."""

    def __init__(
        self,
        repository: ModelRepository,
        strict_readiness: bool,
        rate_limiter: RateLimiter | None,
        worker: Worker,
    ) -> None:
        super().__init__(repository, strict_readiness, rate_limiter)
        self.worker = worker

    async def statistics(self, model: str = "", version: str = "") -> list[dict]:
        """This worker's statistics (its errors as in one process) plus every other worker's.

        Exact, not sampled: each worker answers with its counts at the time it is asked.
        """
        own = await self.own_statistics(model, version)
        message = {"op": "stats", "args": {"model": model, "version": version}}
        others = await ipc.call(self.worker.control, {**message, "from": self.worker.index})
        return merge_stats([own, *others["stats"]])

    async def own_statistics(self, model: str = "", version: str = "") -> list[dict]:
        """This worker's statistics alone."""
        return await super().statistics(model, version)

    async def load(self, model: str, override: dict | None = None) -> None:
        """Load in every worker (through the supervisor); answered once all have."""
        if self.repository.control != "explicit":
            raise unavailable(CONTROL_REFUSED)
        await ipc.call(self.worker.control, {"op": "load", "model": model, "override": override})

    async def unload(self, model: str, dependents: bool = False) -> None:
        """Unload in every worker (through the supervisor); answered once all have."""
        if self.repository.control != "explicit":
            raise unavailable(CONTROL_REFUSED)
        # One request per model, so that the supervisor's journal replays each of them.
        for name in self.unloaded_with(model, dependents):
            await ipc.call(self.worker.control, {"op": "unload", "model": name})

    async def update_log_settings(self, changes: dict[str, object]) -> dict[str, object]:
        """Change the log settings of every process (through the supervisor, which keeps them
        for workers that start later); checked here first, so a bad one changes nothing."""
        checked = process_settings().check(changes)
        await ipc.call(self.worker.control, {"op": "log_settings", "settings": checked})
        return self.log_settings()

    async def update_trace_settings(self, model: str, changes: dict) -> dict[str, object]:
        """Change the trace settings here (a bad change changes nothing anywhere), then in every
        other process (through the supervisor, which keeps them for workers that start later)."""
        settings = await super().update_trace_settings(model, changes)
        message = {"op": "trace_settings", "model": model, "changes": changes}
        await ipc.call(self.worker.control, {**message, "from": self.worker.index})
        return settings

    async def register_shared_memory(
        self, name: str, key: str, offset: int, byte_size: int
    ) -> None:
        """Register the region in every worker (through the supervisor): whichever worker a
        later request reaches can read it."""
        self._regions()  # 501 where shm is off, before asking the others
        check_registration(name, key, offset, byte_size)
        message = {"name": name, "key": key, "offset": offset, "byte_size": byte_size}
        await ipc.call(self.worker.control, {"op": "shm_register", **message})

    async def unregister_shared_memory(self, name: str = "") -> None:
        """Unregister in every worker (through the supervisor)."""
        if self.shared_memory is not None:
            await ipc.call(self.worker.control, {"op": "shm_unregister", "name": name})


class _WorkerField(logging.Filter):
    """Adds `"worker": <index>` to every log line of this process."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def main() -> int:
    """Entry point: read the arguments from stdin, serve until SIGTERM."""
    import uvloop

    from server import logs
    from server.app import serve

    args = pickle.loads(sys.stdin.buffer.read())  # written by our own supervisor
    die_with_parent(signal.SIGTERM)  # a supervisor killed outright takes its workers with it
    if os.getppid() != args["supervisor"]:
        return 1  # it died before that
    logs.configure(args["log_level"])
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerField(args["index"]))
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    worker = Worker(args["index"], args["settings"].workers, args["directory"], args["channel"])
    return asyncio.run(serve(args["settings"], worker))


if __name__ == "__main__":
    sys.exit(main())
