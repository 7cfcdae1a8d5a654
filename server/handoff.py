"""Connections balanced over the workers of `volley serve --workers N`, exactly.

The supervisor holds the listening sockets (HTTP, gRPC, metrics). It accepts each new
connection and passes it (SCM_RIGHTS, over a Unix socket pair of its own per worker) to the
serving worker with the fewest connections, counting those still on their way to it. The worker
serves it as if it had accepted it itself (`loop.connect_accepted_socket`): one hop per
connection, none per request.

Why not `SO_REUSEPORT` on every worker: the kernel then picks a worker by a hash of the
connection's addresses, blind to load. Eight connections split 7/1 in one run, and with four
cameras a 3/1 split or worse comes 62 % of the time; the busy worker's queue grows while the
other idles (bench/RESULTS.md, "connections balanced by the supervisor"). One accept queue also
means that no connection waits in the queue of a worker that dies or closes while others serve.

Each worker publishes, in a file that all map, how many connections it has received so far and
how many it holds open now (whenever either changes); the supervisor counts those it sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

from server.settings import address_family

log = logging.getLogger(__name__)

HTTP, GRPC, METRICS = b"h", b"g", b"m"  # which port a passed connection came in on
ACCEPTS_PER_WAKEUP = 64  # then other work on the supervisor's loop gets its turn
ACCEPT_RETRY_SECONDS = 0.1  # after running out of file descriptors

Server = tuple[Callable[[], asyncio.Protocol], "ssl.SSLContext | None"]  # protocol factory, TLS


class ConnectionCounts:
    """Per worker, connections received so far and open now: written by that worker, read by
    the supervisor. A file in the private directory that every process maps."""

    def __init__(self, path: Path, workers: int, create: bool = False) -> None:
        if create:
            path.write_bytes(bytes(16 * workers))
        with open(path, "r+b") as file:
            self._map = mmap.mmap(file.fileno(), 16 * workers)
        self._counts = memoryview(self._map).cast("q")

    def publish(self, index: int, received: int, open_now: int) -> None:
        """Worker `index` has received `received` connections and holds `open_now` open."""
        self._counts[2 * index] = received
        self._counts[2 * index + 1] = open_now

    def read(self, index: int) -> tuple[int, int]:
        """Worker `index`'s last published (received, open now)."""
        return self._counts[2 * index], self._counts[2 * index + 1]

    def reset(self, index: int) -> None:
        """Zero worker `index`'s counts (before a new process takes its place)."""
        self.publish(index, 0, 0)


def bind_listeners(host: str, ports: dict[bytes, int]) -> dict[bytes, socket.socket]:
    """A bound TCP socket per port, not listening yet (a connection is refused until then)."""
    listeners = {}
    for kind, port in ports.items():
        sock = socket.socket(address_family(host), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
        listeners[kind] = sock
    return listeners


class Dispatcher:
    """The supervisor's side: accept, choose a worker, pass the connection on."""

    def __init__(
        self, listeners: dict[bytes, socket.socket], counts: ConnectionCounts, workers: int
    ) -> None:
        self.listeners = listeners
        self.counts = counts
        self.workers = workers
        self._channels: dict[int, socket.socket] = {}  # by worker index
        self._sent: dict[int, int] = {}  # connections passed to each worker's current process
        self._serving: list[int] = []  # workers that take connections, in round-robin order
        self._listening = False
        self._accepting = False
        self._stopping = False
        self._closed = False

    def attach(self, index: int) -> socket.socket:
        """A new channel to worker `index`'s next process; returns the end to give it."""
        self.detach(index)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self._channels[index] = ours
        self._sent[index] = 0
        self.counts.reset(index)
        return theirs

    def serving(self, index: int) -> None:
        """Worker `index` serves: pass it connections. The ports listen once every worker
        serves: connections opened as soon as the server is ready (a client's pool, a load
        generator's) would otherwise all stay on the worker that was ready first."""
        if index not in self._channels or index in self._serving or self._closed:
            return
        self._serving.append(index)
        if not self._listening and len(self._serving) == self.workers:
            self._listening = True
            for sock in self.listeners.values():
                sock.listen(4096)
        if self._listening:
            self._resume()

    def stop(self) -> None:
        """The server is stopping: once no worker takes connections, close the ports (a new
        connection is refused rather than left waiting)."""
        self._stopping = True
        if not self._serving:
            self.close()

    def detach(self, index: int) -> None:
        """Worker `index`'s process is gone (or about to be replaced): no more connections."""
        if index in self._serving:
            self._serving.remove(index)
            if self._stopping and not self._serving:
                self.close()
        channel = self._channels.pop(index, None)
        if channel is not None:
            channel.close()

    def close(self) -> None:
        """Stop accepting and close the listening sockets (connections still queued are reset)."""
        self._pause()
        self._closed = True
        for sock in self.listeners.values():
            sock.close()

    def _resume(self) -> None:
        if self._accepting or self._closed or not self._serving:
            return
        self._accepting = True
        loop = asyncio.get_running_loop()
        for kind, sock in self.listeners.items():
            loop.add_reader(sock, self._accept, kind, sock)

    def _pause(self) -> None:
        if not self._accepting:
            return
        self._accepting = False
        loop = asyncio.get_running_loop()
        for sock in self.listeners.values():
            loop.remove_reader(sock)

    def _accept(self, kind: bytes, listener: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            if not self._serving:  # none to pass it to: leave it queued until one serves
                self._pause()
                return
            try:
                connection, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    reason = {"event": "accept_failed", "reason": exc.strerror}
                    log.error("cannot accept connections", extra=reason)
                    self._pause()
                    asyncio.get_running_loop().call_later(ACCEPT_RETRY_SECONDS, self._resume)
                return  # ECONNABORTED and the like: that connection is gone
            with connection:
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._pass(kind, connection)

    def _pass(self, kind: bytes, connection: socket.socket) -> None:
        """Send `connection` to the least-loaded serving worker (the next one if it cannot
        take it); drop it if none can."""
        for index in self._by_load():
            try:
                socket.send_fds(self._channels[index], [kind], [connection.fileno()])
            except BlockingIOError:  # its queue is full: it is stalled
                continue
            except OSError:  # it closed its end: it is exiting
                self.detach(index)
                continue
            self._sent[index] += 1
            return
        if self._serving:
            log.warning("no worker took a connection", extra={"event": "connection_dropped"})

    def _by_load(self) -> list[int]:
        """Serving workers by their connections (open, plus sent but not received yet), fewest
        first; ties in round-robin order."""
        loads = []
        for position, index in enumerate(self._serving):
            received, open_now = self.counts.read(index)
            loads.append((self._sent[index] - received + open_now, position, index))
        loads.sort()
        first = loads[0][2]
        self._serving.remove(first)  # the next tie goes to another worker
        self._serving.append(first)
        return [index for _, _, index in loads]


class TrackedConnections(set):
    """A set of open connections (a protocol adds itself when it starts, removes itself when it
    ends) that tells its receiver when one leaves."""

    def __init__(self, changed: Callable[[], None]) -> None:
        super().__init__()
        self._changed = changed

    def discard(self, connection: object) -> None:
        super().discard(connection)
        self._changed()

    def remove(self, connection: object) -> None:
        super().remove(connection)
        self._changed()


class ConnectionReceiver:
    """A worker's side: take the connections the supervisor passes and serve them."""

    def __init__(self, channel: socket.socket, counts: ConnectionCounts, index: int) -> None:
        self.channel = channel
        self.counts = counts
        self.index = index
        self.servers: dict[bytes, Server] = {}  # by kind
        self.received = 0
        self._open: list[TrackedConnections] = []
        self._handshakes: set[asyncio.Task] = set()
        self._publishing = False

    def serve(
        self,
        kind: bytes,
        protocol_factory: Callable[[], asyncio.Protocol],
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        """Serve connections of `kind` with `protocol_factory` (over TLS with `ssl_context`)."""
        self.servers[kind] = (protocol_factory, ssl_context)

    def tracked(self) -> TrackedConnections:
        """A set for a server's open connections, counted in what this worker publishes."""
        connections = TrackedConnections(self._changed)
        self._open.append(connections)
        return connections

    def start(self) -> None:
        """Take connections from now on."""
        self.channel.setblocking(False)
        asyncio.get_running_loop().add_reader(self.channel, self._receive)
        self._publish()

    def stop(self) -> None:
        """Take no more connections (those on their way are closed with the channel)."""
        if self.channel.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(self.channel)
            self.channel.close()

    def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:  # close-on-exec: no child process (an image decoder) inherits the connection
                message, fds, _, _ = socket.recv_fds(self.channel, 1, 1, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                break
            except OSError:
                self.stop()
                return
            if not fds:  # the supervisor closed its end
                self.stop()
                return
            self.received += 1
            sock = socket.socket(fileno=fds[0])
            server = self.servers.get(message)
            if server is None:
                sock.close()
                continue
            task = loop.create_task(self._connect(sock, *server))
            self._handshakes.add(task)
            task.add_done_callback(self._handshake_done)
        self._publish()

    async def _connect(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(protocol_factory, sock, ssl=ssl_context)
        except (TimeoutError, OSError, ssl.SSLError) as exc:  # the client's failure
            log.debug("connection failed", extra={"event": "connection_failed",
                                                  "reason": str(exc)})  # fmt: skip
            with contextlib.suppress(OSError):
                sock.close()

    def _handshake_done(self, task: asyncio.Task) -> None:
        self._handshakes.discard(task)
        self._changed()

    def _changed(self) -> None:
        """Publish soon (once for every change made meanwhile)."""
        if not self._publishing:
            self._publishing = True
            asyncio.get_running_loop().call_soon(self._publish)

    def _publish(self) -> None:
        self._publishing = False
        open_now = sum(len(connections) for connections in self._open) + len(self._handshakes)
        self.counts.publish(self.index, self.received, open_now)


def receiver_channel(fd: int) -> socket.socket:
    """The worker's end of its channel, from the file descriptor it inherited (and that its
    own child processes, the image decoders, must not: the supervisor sees the worker's end
    close when the worker exits)."""
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=fd)
    channel.set_inheritable(False)
    return channel
