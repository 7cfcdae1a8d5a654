"""Triton's logging extension: the process's log settings, read and changed at run time.

Settings (Triton's names): `log_info`, `log_warning`, `log_error` (bool: whether records of
that severity are written), `log_verbose_level` (0: no debug records; above 0: debug records
too), `log_file` and `log_format`. Volley always writes JSON lines to stderr, so `log_file` is
"" and `log_format` is "json", and those two only accept their current value: a client may not
make the server write to a path of its choosing. A setting given as null (or, over gRPC, with
no value) goes back to what the server started with (`--log-level`).

The settings live in the logging module's root handler filter, so they cover every logger
(Volley's, uvicorn's, grpc's). With `--workers N` a change reaches every process through the
supervisor (`server.worker`, `server.supervisor`).
"""

from __future__ import annotations

import logging

from server.errors import invalid

TYPES: dict[str, type] = {
    "log_file": str,
    "log_info": bool,
    "log_warning": bool,
    "log_error": bool,
    "log_verbose_level": int,
    "log_format": str,
}
KINDS = {bool: "a boolean", int: "an integer", str: "a string"}
FIXED = {"log_file": "", "log_format": "json"}  # what Volley does, and the only value accepted
MAX_VERBOSE_LEVEL = 2**32 - 1  # a uint32 over gRPC


def from_level(level: str) -> dict[str, object]:
    """The settings `--log-level` (debug, info, warning or error) stands for."""
    rank = ("debug", "info", "warning", "error").index(level.lower())
    return {
        **FIXED,
        "log_info": rank <= 1,
        "log_warning": rank <= 2,
        "log_error": True,
        "log_verbose_level": 1 if rank == 0 else 0,
    }


class SeverityFilter(logging.Filter):
    """Lets a record through only if its severity is switched on in the settings."""

    def __init__(self, settings: dict[str, object]) -> None:
        super().__init__()
        self.settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return bool(self.settings["log_error"])
        if record.levelno >= logging.WARNING:
            return bool(self.settings["log_warning"])
        if record.levelno >= logging.INFO:
            return bool(self.settings["log_info"])
        return int(self.settings["log_verbose_level"]) > 0


class LogSettings:
    """The settings of this process's logging, installed on the root logger's handlers."""

    def __init__(self, level: str) -> None:
        self.initial = from_level(level)
        self.current = dict(self.initial)
        self._filter = SeverityFilter(self.current)

    def install(self) -> None:
        """Put the filter on the root logger's handlers and set the root level to match."""
        root = logging.getLogger()
        for handler in root.handlers:
            if self._filter not in handler.filters:
                handler.addFilter(self._filter)
        self._set_root_level()

    def check(self, changes: dict[str, object]) -> dict[str, object]:
        """`changes` validated and with nulls replaced by the start-up values; raises a client
        error naming the first bad setting."""
        checked: dict[str, object] = {}
        for name, value in changes.items():
            if name not in TYPES:
                raise invalid(f"unknown log setting '{name}'; the settings are {', '.join(TYPES)}")
            if value is None:
                checked[name] = self.initial[name]
                continue
            wanted = TYPES[name]
            if type(value) is not wanted:  # bool is not an int here, nor the other way round
                raise invalid(f"log setting '{name}' must be {KINDS[wanted]}, got {value!r}")
            if name in FIXED and value != FIXED[name]:
                raise invalid(
                    f"log setting '{name}' can only be {FIXED[name]!r}: Volley writes JSON "
                    "lines to stderr"
                )
            if name == "log_verbose_level" and not 0 <= value <= MAX_VERBOSE_LEVEL:
                raise invalid(f"log setting 'log_verbose_level' must be 0 to {MAX_VERBOSE_LEVEL}")
            checked[name] = value
        return checked

    def apply(self, checked: dict[str, object]) -> dict[str, object]:
        """Apply settings already `check`ed; returns all the settings after the change."""
        self.current.update(checked)
        self._set_root_level()
        return dict(self.current)

    def _set_root_level(self) -> None:
        """The lowest severity switched on: records below it are not even made."""
        switched_on = [
            level
            for level, on in (
                (logging.DEBUG, int(self.current["log_verbose_level"]) > 0),
                (logging.INFO, self.current["log_info"]),
                (logging.WARNING, self.current["log_warning"]),
            )
            if on
        ]
        logging.getLogger().setLevel(switched_on[0] if switched_on else logging.ERROR)


_process: LogSettings | None = None


def install(level: str) -> LogSettings:
    """Make and install this process's settings from `--log-level` (done by `logs.configure`)."""
    global _process
    _process = LogSettings(level)
    _process.install()
    return _process


def process_settings() -> LogSettings:
    """This process's settings (those of `--log-level info` if logging was never configured)."""
    return _process if _process is not None else install("info")
