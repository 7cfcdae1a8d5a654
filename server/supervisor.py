"""`volley serve --workers N`: N worker processes serve; this process holds the ports and
supervises them.

Each worker (`server.worker`) is the whole server, with its own event loop, repository, batchers
and ONNX Runtime sessions. The supervisor serves no request. It

- holds the listening sockets (bound at start, listening once every worker serves), accepts
  each connection and passes it to the serving worker with the fewest (`server.handoff`);
- creates a private directory for prometheus_client's multiprocess files and the Unix sockets
  below (removed at exit), and lists its own and the workers' pids there (`process_*`);
- is the one way model control goes: a load or unload request a worker takes is sent to every
  worker, one request at a time, and answered once all have applied it; the last request per
  model is kept and replayed to a worker that starts later, before it is passed a connection;
  the same for client shared-memory registrations (`--allow-client-shm`), so every worker can
  read a region whichever one took the registration;
- has every worker poll the repository at once with `--poll-repository`;
- gathers the other workers' statistics for the worker that answers a statistics request;
- forwards SIGTERM/SIGINT, waits for the workers to drain, and exits 0 (1 if one failed);
- restarts a worker that dies after it was serving; one that dies while starting stops the
  server (exit 1): a restart would most likely die the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import orjson
from prometheus_client.multiprocess import mark_process_dead

from server import ipc
from server.cpus import WORKERS_ENV
from server.errors import VolleyError, region_already_registered
from server.handoff import GRPC, HTTP, METRICS, ConnectionCounts, Dispatcher, bind_listeners
from server.ipc import CONNECTION_COUNTS, CONTROL_SOCKET, worker_socket
from server.log_settings import process_settings
from server.metrics import PIDS_FILE
from server.paths import model_folder
from server.settings import ServeSettings
from server.tracing import TRACER

log = logging.getLogger(__name__)

GRACE_SECONDS = 10.0  # past --shutdown-timeout, for a worker to finish exiting
PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # workers import this same copy


@dataclass
class _Slot:
    """One worker's place: its current process, whether it takes commands yet, and whether it
    listens (then a death is restarted)."""

    index: int
    process: asyncio.subprocess.Process | None = None
    registered: bool = False
    serving: bool = False


async def supervise(settings: ServeSettings, log_level: str) -> int:
    """Run `settings.workers` workers until SIGTERM/SIGINT; return the exit code."""
    directory = Path(tempfile.mkdtemp(prefix="volley-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    os.environ[WORKERS_ENV] = str(settings.workers)
    try:
        return await Supervisor(settings, log_level, directory).run()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class Supervisor:
    """The workers' processes, the model control they share, and their shutdown."""

    def __init__(self, settings: ServeSettings, log_level: str, directory: Path) -> None:
        self.settings = settings
        TRACER.configure(settings.trace, settings.trace_file)  # kept to replay, never written
        self.log_level = log_level
        self.directory = directory
        self.slots = [_Slot(index) for index in range(settings.workers)]
        self.journal: dict[str, dict] = {}  # the last load/unload request per model, in order
        self.regions: dict[str, dict] = {}  # shared-memory registrations in force, by name
        self.control = asyncio.Lock()  # one model control request (or registration) at a time
        self.stop = asyncio.Event()
        self.stopping = False
        self.failed = False
        self.announced = False
        self._watchers: set[asyncio.Task] = set()
        ports = {HTTP: settings.http_port, GRPC: settings.grpc_port}
        if settings.metrics_port:
            ports[METRICS] = settings.metrics_port
        counts = ConnectionCounts(directory / CONNECTION_COUNTS, settings.workers, create=True)
        listeners = bind_listeners(settings.host, ports)
        self.dispatcher = Dispatcher(listeners, counts, settings.workers)

    async def run(self) -> int:
        """Start the workers, serve their requests until a signal (or a failed start), stop
        them; the exit code."""
        server = await ipc.listen(self.directory / CONTROL_SOCKET, self._answer)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        workers, directory = len(self.slots), str(self.directory)
        log.info("starting workers", extra={"event": "workers", "workers": workers,
                                            "directory": directory})  # fmt: skip
        for slot in self.slots:
            await self._start(slot)
        poller = None
        if self.settings.model_control == "poll":
            poller = asyncio.create_task(self._poll_forever())
        await self.stop.wait()
        self.stopping = True
        self.dispatcher.stop()
        if poller is not None:
            poller.cancel()
        clean = await self._stop_workers()
        self.dispatcher.close()
        server.close()
        log.info("stopped", extra={"event": "stopped"})
        return 0 if clean and not self.failed else 1

    async def _start(self, slot: _Slot) -> None:
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, path]))}
        channel = self.dispatcher.attach(slot.index)  # the connections it will serve
        fd = channel.fileno()  # the same number in the worker
        with channel:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-m", "server.worker",
                stdin=asyncio.subprocess.PIPE, env=env, pass_fds=(fd,),
                start_new_session=True,  # Ctrl-C reaches the supervisor only; it forwards SIGTERM
            )  # fmt: skip
        args = {
            "settings": self.settings,
            "index": slot.index,
            "directory": self.directory,
            "channel": fd,
            "log_level": self.log_level,
            "supervisor": os.getpid(),
        }
        process.stdin.write(pickle.dumps(args))
        await process.stdin.drain()
        process.stdin.close()
        slot.process, slot.registered, slot.serving = process, False, False
        self._write_pids()
        log.info("worker started", extra={"event": "worker_started", "worker": slot.index,
                                          "pid": process.pid})  # fmt: skip
        watcher = asyncio.create_task(self._watch(slot, process))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, slot: _Slot, process: asyncio.subprocess.Process) -> None:
        """Wait for the worker to exit; restart it if it was serving and nobody asked it to."""
        code = await process.wait()
        serving = slot.serving
        slot.registered = slot.serving = False
        self.dispatcher.detach(slot.index)
        with contextlib.suppress(OSError):  # a file already gone must not stop the restart
            mark_process_dead(process.pid, str(self.directory))  # its live gauges leave the sums
        self._write_pids()
        if self.stopping:
            return
        log.error(
            "worker exited",
            extra={"event": "worker_exited", "worker": slot.index, "pid": process.pid,
                   "code": code, "restart": serving},
        )  # fmt: skip
        if serving:
            await self._start(slot)
        else:
            self.failed = True
            self.stop.set()

    async def _stop_workers(self) -> bool:
        """SIGTERM every worker and wait for them to drain; whether all exited cleanly."""
        processes = [slot.process for slot in self.slots if slot.process is not None]
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        waits = [asyncio.create_task(process.wait()) for process in processes]
        await asyncio.wait(waits, timeout=self.settings.shutdown_timeout + GRACE_SECONDS)
        for process in processes:
            if process.returncode is None:
                log.error("worker did not exit", extra={"event": "worker_killed",
                                                        "pid": process.pid})  # fmt: skip
                process.kill()
                await process.wait()
        # -SIGTERM: stopped while starting, before it had taken anything
        return all(process.returncode in (0, -signal.SIGTERM) for process in processes)

    def _write_pids(self) -> None:
        live = [s.process.pid for s in self.slots if s.process and s.process.returncode is None]
        staged = self.directory / f"{PIDS_FILE}.new"
        staged.write_bytes(orjson.dumps([os.getpid(), *live]))
        staged.replace(self.directory / PIDS_FILE)

    async def _answer(self, message: dict) -> dict:
        """A worker's request: register, serving, stats, load, unload, a shared-memory
        registration or log settings."""
        op = message["op"]
        if op == "register":
            await self._register(self.slots[message["index"]], message["pid"])
            return {}
        if op == "serving":
            self._serving(self.slots[message["index"]], message["pid"])
            return {}
        if op == "stats":
            answers = await self._fan_out({"op": "stats", "args": message["args"]},
                                          skip=message["from"])  # fmt: skip
            return {"stats": [answer["stats"] for answer in answers if isinstance(answer, dict)]}
        if op in ("shm_register", "shm_unregister"):
            async with self.control:
                await self._shared_memory(message)
            return {}
        if op == "log_settings":  # checked by the worker that took the request
            async with self.control:
                process_settings().apply(message["settings"])  # its own logs, and the replay
                await self._fan_out(message)
            return {}
        if op == "trace_settings":  # already applied by the worker that took the request
            async with self.control:
                TRACER.apply(message["model"], message["changes"])  # kept for the replay
                await self._fan_out(message, skip=message["from"])
            return {}
        async with self.control:
            if self._is_model_folder(message["model"]):
                self.journal.pop(message["model"], None)
                self.journal[message["model"]] = message
            answers = await self._fan_out(message)
        for answer in answers:
            if isinstance(answer, VolleyError):
                raise answer
        return {}

    async def _shared_memory(self, message: dict) -> None:
        """Register or unregister a region in every worker; a registration that fails in one
        is taken back from all (every worker opens the same object, so they agree)."""
        name = message["name"]
        if message["op"] == "shm_unregister":
            for key in [name] if name else list(self.regions):
                self.regions.pop(key, None)
            await self._fan_out(message)
            return
        if name in self.regions:
            raise region_already_registered(name)
        errors = [a for a in await self._fan_out(message) if isinstance(a, VolleyError)]
        if errors:
            await self._fan_out({"op": "shm_unregister", "name": name})
            raise errors[0]
        self.regions[name] = message

    async def _register(self, slot: _Slot, pid: int) -> None:
        """Replay the journal to a starting worker, then send it every later request."""
        async with self.control:
            if slot.process is None or slot.process.pid != pid:
                return  # an earlier process of the slot, gone meanwhile
            settings = {"op": "log_settings", "settings": process_settings().current}
            trace = {"op": "trace_state", "state": TRACER.state()}
            for request in [*self.journal.values(), *self.regions.values(), settings, trace]:
                await self._send(slot, request)  # its outcome is the other workers' outcome
            slot.registered = True

    def _serving(self, slot: _Slot, pid: int) -> None:
        """A worker listens: once all do, the server is ready."""
        if slot.process is None or slot.process.pid != pid:
            return
        slot.serving = True
        self.dispatcher.serving(slot.index)
        log.info("worker serving", extra={"event": "worker_serving", "worker": slot.index,
                                          "pid": pid})  # fmt: skip
        if not self.announced and all(s.serving for s in self.slots):
            self.announced = True
            pids = [s.process.pid for s in self.slots if s.process is not None]
            log.info("ready", extra={"event": "ready", "workers": pids})

    async def _fan_out(self, message: dict, skip: int | None = None) -> list:
        """Send `message` to every registered worker (but `skip`); their answers or errors."""
        slots = [slot for slot in self.slots if slot.registered and slot.index != skip]
        return await asyncio.gather(*(self._send(slot, message) for slot in slots))

    async def _send(self, slot: _Slot, message: dict) -> dict | VolleyError | None:
        try:
            return await ipc.call(worker_socket(self.directory, slot.index), message)
        except VolleyError as exc:
            return exc
        except OSError:  # it exited meanwhile: its replacement gets the journal
            return None

    def _is_model_folder(self, name: str) -> bool:
        """Whether `name` names a model folder (only those are journaled, so that requests
        for made-up names cannot grow the journal)."""
        try:
            return model_folder(self.settings.model_repository, name).is_dir()
        except VolleyError:
            return False

    async def _poll_forever(self) -> None:
        """`--poll-repository`: every worker re-scans at the same time."""
        while True:
            await asyncio.sleep(self.settings.poll_seconds)
            async with self.control:
                await self._fan_out({"op": "poll"})
