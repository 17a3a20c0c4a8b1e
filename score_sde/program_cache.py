"""Compiled training programs kept on disk by what they were built from, so a warm start skips tracing them.

JAX's persistent compilation cache (:mod:`score_sde.compile_cache`) is keyed by the lowered program, so
every start still traces and lowers the model's initialisation and the train step before the cache
can answer: ~4.5 s of Python on a 2-core CPU for the tiny digits model, more than loading the programs
(docs/performance.md, "Where a warm start's time goes"). This cache is keyed instead by everything the
trace is a function of, and holds the compiled executable (``jax.experimental.serialize_executable``)
with its argument and result structures:

* the run's config (every field, so a run with another config never shares an entry);
* the source of the project's modules (every ``.py`` file at the top level, in ``models/`` and in
  ``score_sde/``), so editing the code retires its entries;
* the Python, jax, jaxlib, flax, optax and numpy versions (and those of JAX's CUDA or TPU plugins where installed),
  every ``jax.config`` option except the caches' own, and ``$XLA_FLAGS``;
* the backend's platform and version, and the kind and id of each device (a pmapped program is bound to
  its devices).

A library edited in place without a new version number is not seen: delete the folder (always safe) or
run with ``--jax_cache_dir=none``. Like JAX's cache, loading an entry runs machine code from the folder:
use a folder only you can write. Entries live in ``programs/`` inside the JAX cache folder and follow its
switch (``main.py --jax_cache_dir``); single-process runs only. The least recently used ones are deleted
once the folder holds more than :data:`MAX_BYTES`. Any failure to read or write an entry is logged and
the program is traced and compiled as without this cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import pickle
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import jax
from jax.experimental import serialize_executable

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Folders whose modules the traced programs are made of (besides the top-level modules).
SOURCE_FOLDERS = ("models", "score_sde")
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")
# Installed where an accelerator is used; their versions count too where present.
PLUGIN_PACKAGES = ("jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt", "libtpu")
FORMAT = 1  # of an entry file; a new format retires every entry
MAX_BYTES = 2 * 1024 ** 3
FOLDER_NAME = "programs"
STALE_WRITE_SECONDS = 3600
# jax.monitoring events: XLA compiled a program (also fired when JAX's persistent cache supplies it), and the
# persistent cache supplied it.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
JAX_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


@dataclasses.dataclass
class Entry:
    """A stored program, read from disk but not yet loaded onto the devices (:meth:`load`, slow: run it off the
    main thread). ``extras``: values stored with it (e.g. the shapes of the training State)."""

    executable: bytes
    in_tree: Any
    out_tree: Any
    extras: dict

    def load(self) -> jax.stages.Compiled:
        return serialize_executable.deserialize_and_load(self.executable, self.in_tree, self.out_tree)


class _ThisThread(threading.local):
    compiles: int | None = None  # None: not counting in this thread
    jax_cache_hits: int = 0


_this_thread = _ThisThread()


def _count_compile(event: str, duration_secs: float, **kwargs) -> None:
    del duration_secs, kwargs
    if event == COMPILE_EVENT and _this_thread.compiles is not None:
        _this_thread.compiles += 1


def _count_jax_cache_hit(event: str, **kwargs) -> None:
    del kwargs
    if event == JAX_CACHE_HIT_EVENT and _this_thread.compiles is not None:
        _this_thread.jax_cache_hits += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)
jax.monitoring.register_event_listener(_count_jax_cache_hit)


def compile_storable(compile_fn: Callable[[Any], jax.stages.Compiled], lowered) -> tuple[jax.stages.Compiled, bool]:
    """``compile_fn(lowered)``, and whether the executable may be stored: XLA compiled it in this call.

    Not when JAX's persistent cache supplied it, nor when JAX returned one it already held in memory (which may
    have come from that cache): an executable that XLA:CPU loaded from a serialized form serializes again without
    part of its code, and the copy fails when run ("Function ... not found"; measured on jaxlib 0.10.2).
    """
    _this_thread.compiles, _this_thread.jax_cache_hits = 0, 0
    try:
        compiled = compile_fn(lowered)
        return compiled, _this_thread.compiles > 0 and _this_thread.jax_cache_hits == 0
    finally:
        _this_thread.compiles = None


def source_digest(root: pathlib.Path = ROOT) -> str:
    """sha256 over the relative path and bytes of every project module the programs are traced from."""
    files = sorted(root.glob("*.py"))
    for folder in SOURCE_FOLDERS:
        files += sorted(p for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def environment() -> dict:
    """What a traced and compiled program depends on besides the config and the sources (this module's docstring)."""
    versions = {name: importlib.metadata.version(name) for name in VERSIONED_PACKAGES}
    for name in PLUGIN_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    versions["python"] = sys.version
    options = {name: repr(value) for name, value in sorted(jax.config.values.items()) if "cache" not in name}
    devices = jax.local_devices()
    return {
        "versions": versions,
        "jax_config": options,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "backend": [devices[0].client.platform, devices[0].client.platform_version],
        "devices": [[d.id, d.device_kind] for d in devices],
        "processes": jax.process_count(),
    }


class ProgramCache:
    """Entries ``<key>-<program>.pkl`` in ``folder``; :meth:`key` names what one run's programs were built from."""

    def __init__(self, folder: str, max_bytes: int = MAX_BYTES):
        self.folder = folder
        self.max_bytes = max_bytes
        self._environment = None

    def key(self, config) -> str:
        """The hex digest that names the programs of a run of ``config`` in this environment."""
        if self._environment is None:
            self._environment = {"format": FORMAT, "sources": source_digest(), **environment()}
        described = {"config": json.loads(config.to_json_best_effort(sort_keys=True)), **self._environment}
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str, program: str) -> str:
        return os.path.join(self.folder, f"{key}-{program}.pkl")

    def read(self, key: str, program: str) -> Entry | None:
        """The entry of ``program`` under ``key``, or None (none stored, or unreadable: then it is deleted)."""
        path = self._path(key, program)
        try:
            with open(path, "rb") as f:
                stored = pickle.load(f)
            if stored.get("format") != FORMAT:
                raise ValueError(f"format {stored.get('format')!r}, expected {FORMAT}")
            entry = Entry(stored["executable"], stored["in_tree"], stored["out_tree"], stored["extras"])
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001 (a damaged or foreign file of any kind: recompile, never stop the job)
            logging.warning("Program cache: ignoring and deleting %s (%s: %s).", path, type(err).__name__, err)
            _remove(path)
            return None
        try:
            os.utime(path)  # most recently used: pruned last
        except OSError:  # a folder this process may read but not write: the entry is still good
            pass
        return entry

    def load(self, key: str, program: str, entry: Entry) -> jax.stages.Compiled | None:
        """``entry`` loaded onto the devices, or None if that fails (the entry is then deleted)."""
        try:
            return entry.load()
        except Exception as err:  # noqa: BLE001 (as in read: a stale executable must fall back to compiling)
            path = self._path(key, program)
            logging.warning("Program cache: cannot load %s (%s: %s); compiling instead.", path, type(err).__name__, err)
            _remove(path)
            return None

    def store(self, key: str, program: str, compiled: jax.stages.Compiled, extras: dict | None = None) -> bool:
        """Write ``compiled`` as the entry of ``program`` under ``key`` (atomically); False, logged, if it cannot be."""
        path = self._path(key, program)
        temporary = None
        try:
            executable, in_tree, out_tree = serialize_executable.serialize(compiled)
            os.makedirs(self.folder, exist_ok=True)
            with tempfile.NamedTemporaryFile("wb", dir=self.folder, suffix=".tmp", delete=False) as f:
                temporary = f.name
                pickle.dump({"format": FORMAT, "executable": executable, "in_tree": in_tree, "out_tree": out_tree,
                             "extras": extras or {}}, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(temporary, path)
        except Exception as err:  # noqa: BLE001 (not serializable, disk full, ...: the job goes on without the entry)
            logging.warning("Program cache: cannot store %s (%s: %s).", path, type(err).__name__, err)
            if temporary is not None:
                _remove(temporary)
            return False
        self.prune()
        return True

    def prune(self) -> None:
        """Delete the least recently used entries until the folder holds at most ``max_bytes``, and the temporary files
        of writes that never finished (a process killed while writing) once an hour old."""
        try:
            files = [(f, f.stat()) for f in os.scandir(self.folder) if f.name.endswith((".pkl", ".tmp"))]
        except OSError:
            return
        now = time.time()
        for file, stat in files:
            if file.name.endswith(".tmp") and now - stat.st_mtime > STALE_WRITE_SECONDS:
                _remove(file.path)
        total = 0
        for file, stat in sorted(files, key=lambda f: f[1].st_mtime, reverse=True):
            if file.name.endswith(".pkl"):
                total += stat.st_size
                if total > self.max_bytes:
                    _remove(file.path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


_folder: str | None = None


def configure(jax_cache_folder: str | None) -> None:
    """Turn the cache on in ``<jax_cache_folder>/programs`` (``score_sde.compile_cache.enable`` does), or off (None)."""
    global _folder
    _folder = None if jax_cache_folder is None else os.path.join(jax_cache_folder, FOLDER_NAME)


def active() -> ProgramCache | None:
    """The process's cache, or None: turned off, or one of several processes (each would hold other devices)."""
    if _folder is None or jax.process_count() > 1:
        return None
    return ProgramCache(_folder)
