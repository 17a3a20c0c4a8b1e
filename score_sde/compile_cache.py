"""JAX's persistent compilation cache for the command-line jobs: compile each program once per machine.

A train, eval or sample job compiles its programs (train step, sampler, likelihood ODE) before its
first step: ~20-40 s for the tiny digits model on a 2-core CPU, minutes for the full-size models.
With the cache on, a resumed run, a second eval or a sample job loads them from disk instead.
Entries are keyed by the program, the jax/jaxlib version, the devices and the XLA flags, so a
stale or foreign entry is never used; deleting the folder is always safe. The folder also holds
:mod:`score_sde.program_cache`'s entries (``programs/``): a training run's init and train step stored by what
they are traced from, which a warm start loads without tracing them.

Where the cache lives (``main.py --jax_cache_dir``), first match:

* ``--jax_cache_dir=PATH``: that folder; ``--jax_cache_dir=none`` (or empty): no persistent cache;
* ``$JAX_COMPILATION_CACHE_DIR``: that folder;
* multi-process runs on the CPU backend: no cache. gloo gives the processes a fixed 30 s to meet at
  their first collective, and a process that loads the train step from its cache while another
  compiles it misses that deadline (docs/training.md). Give every process the same explicit
  folder (e.g. on a shared file system) to have both;
* otherwise ``$XDG_CACHE_HOME/score_sde/jax`` (by default ``~/.cache/score_sde/jax``).
"""
from __future__ import annotations

import logging
import os

import jax

from score_sde import program_cache

DISABLED = ("", "none")


def resolve(flag_value: str | None, multi_process_cpu: bool) -> tuple[str | None, str]:
    """``(folder or None, why)``: the cache folder a job should use (the rules of this module's docstring).

    Args:
        flag_value: ``--jax_cache_dir`` (None when not given).
        multi_process_cpu: the job is one of several processes on the CPU backend (gloo).
    """
    if flag_value is not None and flag_value.strip().lower() in DISABLED:
        return None, "turned off by --jax_cache_dir=none"
    if flag_value is not None:
        return os.path.abspath(os.path.expanduser(flag_value)), "given by --jax_cache_dir"
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.path.abspath(os.environ["JAX_COMPILATION_CACHE_DIR"]), "given by $JAX_COMPILATION_CACHE_DIR"
    if multi_process_cpu:
        return None, ("off by default for multi-process CPU runs (gloo's 30 s first-collective deadline); "
                      "give every process the same --jax_cache_dir to turn it on")
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "score_sde", "jax"), "the default"


def enable(folder: str | None) -> None:
    """Point JAX's persistent compilation cache at ``folder`` (created), or turn it off for None; the program cache
    (``folder/programs``, :mod:`score_sde.program_cache`) follows.

    Must run before the job's first compilation. Every program is stored, however fast it compiled
    (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` overrides that): JAX's default of 1 s suits remote
    caches, but on a local disk loading a small program is faster than compiling it, and a train job's
    ~16 small programs (keys, SDE tables, casts) were otherwise recompiled on every start
    (docs/performance.md, "Where a warm start's time goes").
    """
    program_cache.configure(None)
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"{err.strerror} (the compilation cache; choose another --jax_cache_dir "
                      "or turn it off with --jax_cache_dir=none)", folder) from err
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", folder)
    program_cache.configure(folder)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def configure(flag_value: str | None) -> str | None:
    """Resolve and enable the cache for this process (after joining a multi-process run); logs the choice."""
    multi_process_cpu = jax.process_count() > 1 and jax.default_backend() == "cpu"
    folder, why = resolve(flag_value, multi_process_cpu)
    enable(folder)
    logging.info("JAX compilation cache: %s (%s).", folder or "off", why)
    return folder
