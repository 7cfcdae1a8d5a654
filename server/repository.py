"""The model repository: scanning `models/`, loading versions, readiness, load/unload/poll.

Layout: `<root>/<model>/config.yaml` (optional) and `<root>/<model>/<version>/model.onnx`; a
pipeline is a folder with only a `config.yaml` that says `pipeline: detection` and names the
model it wraps (it serves as version 1, and loads after the plain models).
A (re)load builds and warms the new versions before it swaps them in, and drains the old ones
after, so requests keep being answered across a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from server.batcher import Batcher
from server.classification import read_labels
from server.config import (
    CONFIG_FILE,
    MODEL_FILE,
    ConfigError,
    ModelConfig,
    build_config,
    read_config_file,
)
from server.errors import ErrorKind, VolleyError, not_found, unavailable
from server.paths import model_folder
from server.pipelines.config import parse_detection_config
from server.pipelines.detection import DetectionPipeline
from server.runtime import load_instances
from server.servable import OnnxModel, Servable
from server.sessions import SHUTTING_DOWN
from server.stats import ModelStats

log = logging.getLogger(__name__)


def is_number(text: str) -> bool:
    """Whether `text` is a version number: ASCII digits only ('²' is a digit to str.isdigit)."""
    return text.isascii() and text.isdigit()


class ModelState(StrEnum):
    """Triton's repository index states."""

    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class ModelVersion:
    """One served version: the servable that answers it, and what it was loaded from."""

    name: str
    version: int
    model: Servable
    fingerprint: tuple

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def stats(self) -> ModelStats:
        return self.model.stats

    @property
    def provider(self) -> str:
        return self.model.provider


@dataclass
class ModelEntry:
    """Everything the repository knows about one model name."""

    name: str
    state: ModelState = ModelState.UNAVAILABLE
    reason: str = ""
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    fingerprint: tuple = ()
    unloaded: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def latest(self) -> ModelVersion | None:
        return self.versions[max(self.versions)] if self.versions else None


def model_fingerprint(model_dir: Path) -> tuple:
    """What changes when a model's config or any version's file changes on disk."""

    def stamp(path: Path) -> tuple:
        try:
            st = path.stat()
        except FileNotFoundError:
            return ()
        return (st.st_mtime_ns, st.st_size)

    versions = tuple(
        (p.name, stamp(p / MODEL_FILE)) for p in sorted(model_dir.iterdir()) if is_number(p.name)
    )
    return (stamp(model_dir / CONFIG_FILE), versions)


CONTROL_REFUSED = "explicit model load / unload is not allowed if polling is enabled"  # Triton's


class ModelRepository:
    """Loads, serves and unloads the models found under one folder.

    `control` is Triton's model control mode: `none` and `poll` serve every model on disk and
    refuse load/unload requests; `explicit` serves what was asked for at start and by requests.
    """

    def __init__(self, root: Path, control: str = "explicit") -> None:
        self.root = root
        self.control = control
        self.models: dict[str, ModelEntry] = {}
        # Models the server should serve (readiness): None = every model on disk.
        self.wanted: set[str] | None = set() if control == "explicit" else None
        # The smallest `queue_limit` of the versions serving: `DataPlane.refusal` reads it.
        self.smallest_queue_limit = 0
        # Whether `load_at_start` has finished: the server listens before it loads, and is not
        # ready until then (in explicit mode nothing is wanted before it, so `all_ready` alone
        # would say yes).
        self.started = False

    def _measure_queue_limits(self) -> None:
        limits = [v.model.queue_limit for e in self.models.values() for v in e.versions.values()]
        self.smallest_queue_limit = min(limits, default=0)

    def names_on_disk(self) -> list[str]:
        """Model folders present in the repository (a symlink leading out of it is skipped)."""
        if not self.root.is_dir():
            return []
        names = []
        for path in sorted(self.root.iterdir()):
            if not path.is_dir() or path.name[0] in "._":
                continue
            try:
                model_folder(self.root, path.name)
            except VolleyError as exc:
                log.warning(exc.message, extra={"event": "model_skipped", "model": path.name})
                continue
            names.append(path.name)
        return names

    def is_pipeline(self, name: str) -> bool:
        """Whether the model folder holds a pipeline (which wraps other models)."""
        try:
            return "pipeline" in read_config_file(self.root / name)
        except ConfigError:
            return False

    def in_load_order(self, names: list[str]) -> list[str]:
        """Plain models first, then the pipelines that wrap them."""
        return sorted(names, key=lambda name: (self.is_pipeline(name), name))

    async def load_at_start(self, names: tuple[str, ...] = ("*",)) -> None:
        """Load the models to serve from the start (explicit mode: `names`, '*' for all).

        A broken model is marked unavailable; the rest serve.
        """
        on_disk = self.names_on_disk()
        if not on_disk:
            log.warning("empty model repository", extra={"event": "empty_repository",
                                                         "path": str(self.root)})  # fmt: skip
        if self.control == "explicit" and "*" not in names:
            on_disk = [n for n in on_disk if n in names]
            for missing in sorted(set(names) - set(on_disk)):
                log.error("no such model to load", extra={"event": "load_failed",
                                                          "model": missing})  # fmt: skip
        for name in self.in_load_order(on_disk):
            with contextlib.suppress(VolleyError):  # logged and recorded in the index
                await self.load(name)
        self.started = True

    async def request_load(self, name: str, override: dict | None = None) -> None:
        """A client's load request (explicit mode only), optionally with a config override."""
        if self.control != "explicit":
            raise unavailable(CONTROL_REFUSED)
        await self.load(name, override)

    async def request_unload(self, name: str) -> None:
        """A client's unload request (explicit mode only)."""
        if self.control != "explicit":
            raise unavailable(CONTROL_REFUSED)
        await self.unload(name)

    def dependents(self, name: str) -> list[str]:
        """The models the served versions of `name` run (a pipeline's detector) that no other
        served model runs: what unloading `name` with `unload_dependents` also unloads."""

        def runs(model: str) -> set[str]:
            entry = self.models[model]
            return {wrapped for v in entry.versions.values() for wrapped in v.model.wraps}

        if name not in self.models:
            return []
        others = set().union(*(runs(m) for m in self.models if m != name))
        return sorted(runs(name) - others)

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version a request names, or the latest ready one; 404/503 otherwise."""
        entry = self.models.get(name)
        if entry is None:
            raise not_found(f"Request for unknown model: '{name}' is not found")
        if version:
            if not is_number(version):
                raise VolleyError(ErrorKind.INVALID_ARGUMENT, f"invalid version '{version}'")
            served = entry.versions.get(int(version))
            if served is None:
                raise not_found(
                    f"Request for unknown model: '{name}' version {version} is not found"
                )
            return served
        served = entry.latest
        if served is None:
            reason = f": {entry.reason}" if entry.reason else ""
            raise unavailable(f"model '{name}' is not ready{reason}")
        return served

    def served_versions(self, name: str = "", version: str = "") -> list[ModelVersion]:
        """The versions a statistics request covers: one, every one of a model, or all."""
        if not name:
            return [v for e in self.models.values() for v in e.versions.values()]
        if name not in self.models:
            raise VolleyError(
                ErrorKind.INVALID_ARGUMENT, f"requested model '{name}' is not available"
            )
        if version:
            return [self.get(name, version)]
        versions = self.models[name].versions
        return [versions[v] for v in sorted(versions)]

    def onnx_model(self, name: str) -> OnnxModel:
        """The latest version of a plain ONNX model, as a pipeline wraps it."""
        model = self.get(name).model
        if not isinstance(model, OnnxModel):
            raise unavailable(f"model '{name}' is a pipeline; a pipeline wraps an ONNX model")
        return model

    def is_ready(self, name: str, version: str = "") -> bool:
        """Whether the model (or that version of it) would take a request now; a version that is
        no number is the client's mistake (400), not an unready model."""
        try:
            return self.get(name, version).model.ready
        except VolleyError as exc:
            if exc.kind is ErrorKind.INVALID_ARGUMENT:
                raise
            return False

    def all_ready(self) -> bool:
        """Every model it should serve is serving, except those unloaded on purpose (as Triton).

        In explicit mode that is what was loaded at start or by request; else every model on disk.
        """
        names = self.names_on_disk() if self.wanted is None else sorted(self.wanted)
        for name in names:
            entry = self.models.get(name)
            if entry is None or not (entry.versions or entry.unloaded):
                return False
        return True

    def index(self, ready_only: bool = False) -> list[dict]:
        """Triton's repository index: every model on disk or loaded, with state and reason."""
        rows = []
        for name in sorted(set(self.names_on_disk()) | set(self.models)):
            entry = self.models.get(name)
            if entry is None:
                if not ready_only:
                    rows.append({"name": name, "state": ModelState.UNAVAILABLE, "reason": ""})
                continue
            if entry.versions:
                rows.extend(
                    {"name": name, "version": str(v), "state": ModelState.READY, "reason": ""}
                    for v in sorted(entry.versions)
                )
            elif not ready_only:
                rows.append({"name": name, "state": entry.state, "reason": entry.reason})
        return rows

    async def load(self, name: str, override: dict | None = None) -> None:
        """Load (or reload) a model from disk; the versions already serving keep serving.

        `override` is a raw config mapping used instead of the folder's `config.yaml`.
        """
        model_dir = model_folder(self.root, name)
        if not model_dir.is_dir():
            raise not_found(f"failed to load '{name}', no model folder '{name}' in {self.root}")
        entry = self.models.setdefault(name, ModelEntry(name))
        if self.wanted is not None:
            self.wanted.add(name)
        async with entry.lock:
            entry.unloaded = False
            fingerprint = model_fingerprint(model_dir)
            if not entry.versions:
                entry.state = ModelState.LOADING
            try:
                raw = read_config_file(model_dir) if override is None else dict(override)
                if "pipeline" in raw:
                    loaded = await self._load_pipeline(entry, model_dir, raw, fingerprint)
                else:
                    loaded = await self._load_versions(entry, model_dir, override)
            except (ConfigError, VolleyError) as exc:
                message = exc.message if isinstance(exc, VolleyError) else str(exc)
                entry.reason = message
                entry.fingerprint = fingerprint
                if not entry.versions:
                    entry.state = ModelState.UNAVAILABLE
                log.error(
                    "model load failed",
                    extra={"event": "load_failed", "model": name, "reason": message},
                )
                raise VolleyError(
                    ErrorKind.INVALID_ARGUMENT, f"failed to load '{name}', {message}"
                ) from None
            retired = [v for k, v in entry.versions.items() if loaded.get(k) is not v]
            entry.versions = loaded
            self._measure_queue_limits()
            entry.fingerprint = fingerprint
            entry.state = ModelState.READY if loaded else ModelState.UNAVAILABLE
            entry.reason = "" if loaded else "no version folder with a model.onnx"
            for version in loaded.values():
                version.stats.ready.set(1)
        await self._retire(retired)

    async def _load_pipeline(
        self, entry: ModelEntry, model_dir: Path, raw: dict, fingerprint: tuple
    ) -> dict[int, ModelVersion]:
        """Build a pipeline (version 1) over the models it wraps; unchanged ones are kept."""
        current = entry.versions.get(1)
        if current is not None and current.fingerprint == fingerprint:
            return {1: current}
        config = parse_detection_config({"name": model_dir.name, **raw}, model_dir / CONFIG_FILE)
        pipeline = DetectionPipeline(config, self.onnx_model, ModelStats(config.name, "1"))
        log.info(
            "pipeline loaded",
            extra={"event": "model_loaded", "model": config.name, "version": 1,
                   "wraps": config.detector, "layout": pipeline.plan().layout},
        )  # fmt: skip
        return {1: ModelVersion(config.name, 1, pipeline, fingerprint)}

    async def _load_versions(
        self, entry: ModelEntry, model_dir: Path, override: dict | None
    ) -> dict[int, ModelVersion]:
        """Build the versions the policy selects, reusing unchanged ones already serving."""
        numbers = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and is_number(p.name)]
        if not numbers:
            raise ConfigError(f"{model_dir}: no version folder (e.g. {model_dir}/1/{MODEL_FILE})")
        newest_file = model_dir / str(max(numbers)) / MODEL_FILE
        if not newest_file.exists():
            raise ConfigError(f"{newest_file}: missing")
        config = await asyncio.to_thread(build_config, model_dir, newest_file, override)
        loaded: dict[int, ModelVersion] = {}
        for number in config.version_policy.select(numbers):
            model_file = model_dir / str(number) / MODEL_FILE
            if not model_file.exists():
                raise ConfigError(f"{model_file}: missing")
            stamp = (model_file.stat().st_mtime_ns, model_file.stat().st_size, config)
            current = entry.versions.get(number)
            if current is not None and current.fingerprint == stamp:
                loaded[number] = current
                continue
            loaded[number] = await self._load_version(config, override, number, model_file, stamp)
        return loaded

    async def _load_version(
        self,
        config: ModelConfig,
        override: dict | None,
        number: int,
        model_file: Path,
        stamp: tuple,
    ) -> ModelVersion:
        started = time.perf_counter()
        if number != int(model_file.parent.name):
            raise ConfigError(f"{model_file}: version folder mismatch")
        try:
            # The version's own graph must agree with the config too.
            await asyncio.to_thread(build_config, model_file.parent.parent, model_file, override)
            labels = await asyncio.to_thread(read_labels, model_file.parent.parent, config)
            instances = await asyncio.to_thread(load_instances, model_file, config)
        except ConfigError:
            raise
        except Exception as exc:  # ORT raises several types; all mean "this version can't load"
            raise ConfigError(f"{model_file}: failed to load or warm up: {exc}") from None
        stats = ModelStats(config.name, str(number))
        seconds = time.perf_counter() - started
        stats.load_seconds.set(seconds)
        provider = instances[0].provider
        log.info(
            "model version loaded",
            extra={
                "event": "model_loaded",
                "model": config.name,
                "version": number,
                "provider": provider,
                "instances": len(instances),
                "max_batch_size": config.max_batch_size,
                "staged": instances[0].staged,  # page-locked buffers, IO binding (a GPU)
                "padded": instances[0].padded,  # batches run at max_batch_size rows
                "seconds": round(seconds, 3),
            },
        )
        batcher = Batcher(config, instances, stats)
        model = OnnxModel(
            config, number, batcher, stats, provider, instances[0].metadata, model_file, labels
        )
        return ModelVersion(config.name, number, model, stamp)

    async def unload(self, name: str) -> None:
        """Stop serving every version of a model once its queued requests are answered."""
        if name not in self.models and not model_folder(self.root, name).is_dir():
            raise not_found(f"Request for unknown model: '{name}' is not found")
        if self.wanted is not None:
            self.wanted.discard(name)
        entry = self.models.setdefault(name, ModelEntry(name))
        async with entry.lock:
            retired = list(entry.versions.values())
            entry.versions = {}
            self._measure_queue_limits()
            entry.state = ModelState.UNLOADING
            await self._retire(retired)
            entry.state = ModelState.UNAVAILABLE
            entry.reason = "unloaded"
            entry.unloaded = True
        log.info("model unloaded", extra={"event": "model_unloaded", "model": name})

    async def _retire(self, versions: list[ModelVersion]) -> None:
        for version in versions:
            version.stats.ready.set(0)
        await asyncio.gather(*(v.model.drain() for v in versions))
        for version in versions:  # its last observations, before it and its stats go
            version.stats.publish()

    async def poll(self) -> None:
        """One scan: load new or changed models, unload the ones whose folder is gone."""
        on_disk = set(self.names_on_disk())
        for name in self.in_load_order(list(on_disk)):
            entry = self.models.get(name)
            if entry is not None and entry.fingerprint == model_fingerprint(self.root / name):
                continue
            with contextlib.suppress(VolleyError):  # recorded; the old versions keep serving
                await self.load(name)
        for name in sorted(set(self.models) - on_disk):
            await self.unload(name)
            del self.models[name]

    async def poll_forever(self, seconds: float) -> None:
        """Re-scan the repository every `seconds` until cancelled."""
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.poll()
            except Exception:
                log.exception("repository poll failed", extra={"event": "poll_failed"})

    async def drain(self, timeout: float) -> None:
        """Answer every queued request of every model, then stop their batchers.

        Requests still queued after `timeout` seconds are answered 503 / UNAVAILABLE.
        """
        versions = [v for e in self.models.values() for v in e.versions.values()]
        # Pipelines first: what they have in progress still needs the models they wrap.
        pipelines = [v for v in versions if not isinstance(v.model, OnnxModel)]
        plain = [v for v in versions if isinstance(v.model, OnnxModel)]

        async def retire_in_order() -> None:
            await self._retire(pipelines)
            await self._retire(plain)

        try:
            await asyncio.wait_for(retire_in_order(), timeout)
        except TimeoutError:
            log.warning("drain timed out", extra={"event": "drain_timeout", "seconds": timeout})
            for version in versions:
                version.model.abort(unavailable(SHUTTING_DOWN))
