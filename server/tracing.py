"""Triton's trace extension: which requests are traced, what is recorded, and where it goes.

Settings (Triton's names; every value is a string, `trace_level` a list of strings):
- `trace_level`: ["OFF"], or some of "TIMESTAMPS" (when each stage of a request began and
  ended) and "TENSORS" (its input and output tensors, values included);
- `trace_rate`: one request in that many is traced;
- `trace_count`: traces still to collect (-1: no limit); it counts down as requests are traced;
- `log_frequency`: 0 writes the traces to `trace_file` when the server stops; N writes every N
  traces to `<trace_file>.<k>`, k = 0, 1, ... (and what is left when the count runs out);
- `trace_file` and `trace_mode` ("triton") are fixed when the server starts
  (`--trace-config triton,file=PATH`): a client may not make the server write where it likes.

A model may be given settings of its own; those it was not given follow the global settings as
they change, and a null gives one back to them (to the start-up value, globally). The global
settings and each model's own sample and count on their own, as in Triton.

The file is Triton's JSON trace format, so Triton's `trace_summary.py` reads it: per trace, one
record naming the model (and the parent trace, for the model a pipeline runs), then one record
per timestamp (`{"id", "timestamps": [{"name", "ns"}]}`, CLOCK_MONOTONIC nanoseconds) and, with
TENSORS, one per tensor. With `--workers N` every process traces the requests it serves (each
settings change reaches them all; each counts on its own) into files of its own,
`<trace_file>.worker<i>[.<k>]`, with trace ids that do not collide.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import orjson

from server.errors import ErrorKind, VolleyError, invalid

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

LEVELS = ("TIMESTAMPS", "TENSORS")
# setting name -> TraceValues field, for the settings a client may change
FIELDS = {
    "trace_level": "level",
    "trace_rate": "rate",
    "trace_count": "count",
    "log_frequency": "log_frequency",
}
NAMES = (*FIELDS, "trace_file", "trace_mode")
MAX_UINT32 = 2**32 - 1
MAX_COUNT = 2**63 - 1
ID_STRIDE = 2**40  # worker i numbers its traces from i * ID_STRIDE + 1


@dataclass(frozen=True)
class TraceValues:
    """One scope's settings: the levels on (none: OFF), the rate, the count and the frequency."""

    level: tuple[str, ...] = ()
    rate: int = 1000
    count: int = -1
    log_frequency: int = 0

    def as_settings(self, remaining: int, file: str) -> dict[str, str | list[str]]:
        """In Triton's words (`remaining`: the count left now)."""
        return {
            "trace_level": list(self.level) or ["OFF"],
            "trace_rate": str(self.rate),
            "trace_count": str(remaining),
            "log_frequency": str(self.log_frequency),
            "trace_file": file,
            "trace_mode": "triton",
        }


def parse_changes(raw: Mapping[str, Any], file: str) -> dict[str, Any]:
    """A client's changes (setting name -> string, list of strings, or null) checked and turned
    into TraceValues fields (null, or an empty list: back to the default); raises a client error
    naming the first bad one. `trace_file` and `trace_mode` are accepted only unchanged."""
    changes: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in NAMES:
            raise invalid(f"unknown trace setting '{name}'; the settings are {', '.join(NAMES)}")
        if value is None or value == []:
            if name in FIELDS:
                changes[FIELDS[name]] = None
            continue
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in values):
            raise invalid(f"trace setting '{name}' takes strings, got {value!r}")
        if name == "trace_level":
            changes["level"] = _levels(values)
            continue
        if len(values) != 1:
            raise invalid(f"trace setting '{name}' takes one value, got {len(values)}")
        text = values[0]
        if name == "trace_rate":
            changes["rate"] = _whole(name, text, 1, MAX_UINT32)
        elif name == "trace_count":
            changes["count"] = _whole(name, text, -1, MAX_COUNT)
        elif name == "log_frequency":
            changes["log_frequency"] = _whole(name, text, 0, MAX_UINT32)
        elif name == "trace_file" and text != file:
            raise VolleyError(
                ErrorKind.UNSUPPORTED,
                "trace_file can only be chosen when the server starts (--trace-config "
                "triton,file=PATH): a client may not choose where the server writes",
            )
        elif name == "trace_mode" and text != "triton":
            raise invalid(f"trace_mode can only be 'triton' in Volley, got {text!r}")
    return changes


def _levels(values: list[str]) -> tuple[str, ...]:
    if "OFF" in values:
        if len(values) > 1:
            raise invalid("trace_level 'OFF' cannot be given with other levels")
        return ()
    for value in values:
        if value not in LEVELS:
            raise invalid(f"unknown trace level {value!r}; the levels are OFF, {', '.join(LEVELS)}")
    return tuple(level for level in LEVELS if level in values)


def _whole(name: str, text: str, low: int, high: int) -> int:
    number = int(text) if re.fullmatch(r"-?[0-9]{1,20}", text) else None
    if number is None or not low <= number <= high:
        raise invalid(f"trace setting '{name}' must be a whole number from {low} to {high}, "
                      f"got {text!r}")  # fmt: skip
    return number


class Scope:
    """The global settings, or a model's own: they sample, count and collect their traces."""

    def __init__(self, values: TraceValues, given: dict[str, Any] | None = None) -> None:
        self.values = values
        self.given = given or {}  # a model's: the fields it was given itself
        self.seen = 0  # requests since the last one traced
        self.remaining = values.count
        self.open = 0  # traces started and not yet finished
        self.collected: list[list[dict]] = []  # finished traces not yet written (log_frequency)


class Trace:
    """The timestamps (and tensors) of one traced request; written once it finishes."""

    __slots__ = ("scope", "id", "model", "version", "request_id", "parent", "records", "tensors",
                 "owned", "children")  # fmt: skip

    def __init__(
        self, scope: Scope, trace_id: int, model: str, tensors: bool, parent: int = 0
    ) -> None:
        self.scope = scope
        self.id = trace_id
        self.model = model
        self.version = ""
        self.request_id = ""
        self.parent = parent
        self.records: list[dict] = []
        self.tensors = tensors
        self.owned = False  # finished by the data plane (the front end did not start it)
        self.children: list[Trace] = []

    def stamp(self, name: str, ns: int | None = None) -> None:
        """Record that stage `name` happened now (or at `ns`, time.perf_counter_ns)."""
        when = time.perf_counter_ns() if ns is None else ns
        self.records.append({"id": self.id, "timestamps": [{"name": name, "ns": when}]})

    def tensor(self, activity: str, name: str, datatype: str, data: np.ndarray) -> None:
        """Record a tensor's values (TENSORS level only)."""
        self.records.append({
            "id": self.id,
            "activity": activity,
            "tensor": {
                "name": name,
                "data": tensor_text(data, datatype),
                "shape": ",".join(str(d) for d in data.shape),
                "dtype": datatype,
            },
        })  # fmt: skip

    def child(self, model: str, version: str) -> Trace:
        """The trace of a request this one makes to another model (a pipeline's detector)."""
        child = Trace(self.scope, TRACER.new_id(), model, self.tensors, parent=self.id)
        child.version = version
        self.children.append(child)
        return child

    def document(self) -> list[dict]:
        """Triton's records of this trace and its children's."""
        head: dict[str, Any] = {"id": self.id, "model_name": self.model,
                                "model_version": int(self.version) if self.version.isdigit()
                                else -1}  # fmt: skip
        if self.request_id:
            head["request_id"] = self.request_id
        if self.parent:
            head["parent_id"] = self.parent
        records = [head, *self.records]
        for child in self.children:
            records += child.document()
        return records

    def finish(self) -> None:
        """Hand the trace over to be written (`Tracer.finish`)."""
        TRACER.finish(self)


def tensor_text(data: np.ndarray, datatype: str) -> str:
    """A tensor's values as Triton's trace writes them: comma-separated, flattened. BYTES
    elements are written as text where they are UTF-8, else base64."""
    flat = data.reshape(-1)
    if datatype == "BYTES":
        return ",".join(_bytes_text(item) for item in flat)
    if datatype == "BOOL":
        return ",".join("1" if v else "0" for v in flat.tolist())
    return ",".join(map(str, flat))  # numpy scalars: the shortest text of their own type


def _bytes_text(item: object) -> str:
    if isinstance(item, str):
        return item
    raw = bytes(item)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(raw).decode("ascii")


class Tracer:
    """This process's trace settings, sampling and trace file(s).

    `on` is read on every request: it is false unless some scope traces at some level.
    """

    def __init__(self) -> None:
        self.on = False
        self.file = ""
        self.start = TraceValues()  # what the server started with (a global null goes back)
        self.scope = Scope(self.start)
        self.models: dict[str, Scope] = {}
        self._next_id = 1
        self._next_file = 0  # k of the next `<file>.<k>`
        self._stream: IO[bytes] | None = None  # `file`, with log_frequency 0: written as we go
        self._failing = False  # the last write failed (logged once until one succeeds)

    def configure(self, values: TraceValues, file: str, worker: int | None = None) -> None:
        """Start from `values` (`--trace-config`), writing to `file` (a worker: to its own)."""
        self.close()
        self.file = file if worker is None or not file else f"{file}.worker{worker}"
        self.start = values
        self.scope = Scope(values)
        self.models = {}
        self._next_id = 1 + (worker or 0) * ID_STRIDE
        self._next_file = 0
        self._update_on()

    def settings(self, model: str = "") -> dict[str, str | list[str]]:
        """The settings of `model` (its own, else the global ones), or the global ones."""
        scope = self.models.get(model, self.scope) if model else self.scope
        return scope.values.as_settings(scope.remaining, self.file)

    def apply(self, model: str, raw: Mapping[str, Any]) -> dict[str, str | list[str]]:
        """Apply a client's changes (`parse_changes`) to `model`'s settings (no changes: drop
        its own), or to the global ones; returns that scope's settings. A bad change, or one
        that would turn tracing on in a server started without a trace file, is refused and
        changes nothing."""
        changes = parse_changes(raw, self.file)
        if model:
            scope = self.models.get(model)
            given = dict(scope.given) if scope is not None else {}
            for field, value in changes.items():
                if value is None:
                    given.pop(field, None)
                else:
                    given[field] = value
            if not changes:
                given = {}
            values = dataclasses.replace(self.scope.values, **given)
            self._check_file(values)
            if not given:
                self.models.pop(model, None)
            elif scope is None:
                self.models[model] = Scope(values, given)
            else:
                self._reset(scope, values, "count" in changes)
                scope.given = given
        else:
            fields = {f: getattr(self.start, f) if v is None else v for f, v in changes.items()}
            values = dataclasses.replace(self.scope.values, **fields)
            self._check_file(values)
            self._reset(self.scope, values, "count" in changes)
            for scope in self.models.values():
                own = dataclasses.replace(values, **scope.given)
                self._reset(scope, own, "count" in changes and "count" not in scope.given)
        self._update_on()
        return self.settings(model)

    def _check_file(self, values: TraceValues) -> None:
        if values.level and not self.file:
            raise invalid(
                "tracing needs a trace file, and this server was started without one: start "
                "it with --trace-config triton,file=PATH"
            )

    @staticmethod
    def _reset(scope: Scope, values: TraceValues, count_changed: bool) -> None:
        scope.values = values
        if count_changed:
            scope.remaining = values.count

    def _update_on(self) -> None:
        self.on = bool(self.scope.values.level) or any(s.values.level for s in self.models.values())

    def state(self) -> dict[str, Any]:
        """The settings as they stand, for a worker that starts later (`restore`)."""
        return {
            "global": dataclasses.asdict(self.scope.values),
            "models": {name: scope.given for name, scope in self.models.items()},
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take on the settings of another process (`state`)."""
        values = TraceValues(**{**state["global"], "level": tuple(state["global"]["level"])})
        self._reset(self.scope, values, True)
        self.models = {}
        for name, given in state["models"].items():
            if "level" in given:
                given = {**given, "level": tuple(given["level"])}
            self.models[name] = Scope(dataclasses.replace(values, **given), given)
        self._update_on()

    def new_id(self) -> int:
        """The next trace id of this process."""
        trace_id = self._next_id
        self._next_id += 1
        return trace_id

    def sample(self, model: str) -> Trace | None:
        """A new trace for this request to `model` if it is one to trace, else None."""
        scope = self.models.get(model, self.scope) if self.models else self.scope
        values = scope.values
        if not values.level or scope.remaining == 0:
            return None
        scope.seen += 1
        if scope.seen < values.rate:
            return None
        scope.seen = 0
        if scope.remaining > 0:
            scope.remaining -= 1
        scope.open += 1
        return Trace(scope, self.new_id(), model, "TENSORS" in values.level)

    def finish(self, trace: Trace) -> None:
        """Write a finished trace now (log_frequency 0: onto the trace file) or collect it until
        its scope has log_frequency of them, or its count has run out."""
        scope = trace.scope
        scope.open -= 1
        try:
            if scope.values.log_frequency == 0:
                self._append(trace.document())
                return
            scope.collected.append(trace.document())
            if len(scope.collected) >= scope.values.log_frequency or (
                scope.remaining == 0 and scope.open == 0
            ):
                self._write_collected(scope)
        except OSError as exc:  # a full disk must not fail requests: logged instead
            self._write_failed(exc)
        else:
            self._failing = False

    def _append(self, records: list[dict]) -> None:
        """Add a trace's records to the open array in `file` (one write a trace)."""
        items = orjson.dumps(records)[1:-1]  # the records without their array's brackets
        if self._stream is None:
            self._stream = open(self.file, "wb")  # noqa: SIM115 - kept open until `close`
            self._stream.write(b"[" + items)
        else:
            self._stream.write(b"," + items)

    def _write_collected(self, scope: Scope) -> None:
        traces, scope.collected = scope.collected, []
        path = f"{self.file}.{self._next_file}"
        self._next_file += 1
        with open(path, "wb") as out:
            out.write(orjson.dumps([record for trace in traces for record in trace]))

    def close(self) -> None:
        """Write everything still held (the server is stopping)."""
        try:
            for scope in (self.scope, *self.models.values()):
                if scope.collected:
                    self._write_collected(scope)
        except OSError as exc:
            self._write_failed(exc)
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.write(b"]")
                stream.close()  # closes the file even when the last flush fails
            except OSError as exc:
                self._write_failed(exc)

    def _write_failed(self, exc: OSError) -> None:
        """Log the first failure of a run of them (a full disk fails every trace after it)."""
        if not self._failing:
            extra = {"event": "trace_write_failed", "file": self.file, "error": str(exc)}
            log.error("traces not written until the trace file takes writes again", extra=extra)
        self._failing = True


def parse_trace_config(items: list[str]) -> tuple[TraceValues, str]:
    """`--trace-config` as Triton takes it: `[triton,]file=PATH`, `[triton,]log-frequency=N`,
    `level=TIMESTAMPS|TENSORS|OFF` (given again for more levels), `rate=N`, `count=N`,
    `mode=triton`. Returns the start-up values and the file; ValueError says what is wrong."""
    raw: dict[str, Any] = {}
    levels: list[str] = []
    file = ""
    for item in items:
        mode, _, setting = item.rpartition(",")
        name, equals, value = setting.partition("=")
        if mode not in ("", "triton") or not equals:
            raise ValueError(f"--trace-config {item!r}: expected [triton,]SETTING=VALUE")
        if name == "file" and mode == "triton":
            file = value
        elif name == "log-frequency" and mode == "triton":
            raw["log_frequency"] = value
        elif name == "level" and not mode:
            levels.append(value)
        elif name in ("rate", "count", "mode") and not mode:
            raw[f"trace_{name}"] = value
        else:
            raise ValueError(
                f"--trace-config {item!r}: unknown setting; the settings are "
                "triton,file= triton,log-frequency= level= rate= count= mode="
            )
    if levels:
        raw["trace_level"] = levels
    try:
        changes = parse_changes(raw, file)
    except VolleyError as exc:
        raise ValueError(f"--trace-config: {exc.message}") from None
    values = dataclasses.replace(TraceValues(), **changes)
    if values.level and not file:
        raise ValueError("--trace-config: tracing needs a file (triton,file=PATH)")
    return values, file


TRACER = Tracer()  # the process's: front ends and the data plane ask it, `server.app` sets it up
