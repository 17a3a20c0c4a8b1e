"""The config a workdir runs with: compared with the one it was trained with, and recorded.

``workdir/config.json`` holds the resolved config the run goes on with; ``config_history.jsonl``
one line per config the workdir has run with. A restart may change only the fields of
``config_checks.SAFE_TO_CHANGE`` (:func:`check_workdir_config`); any other difference is a
:class:`WorkdirConfigError`. Used by ``run_lib.train`` and ``score_sde.dequantizer_train``.
"""
from __future__ import annotations

import json
import os
import time

from score_sde import config_checks, parallel


class WorkdirConfigError(ValueError):
    """The config differs from the workdir's ``config.json`` in a field that defines its checkpoints."""


CONFIG_HISTORY = "config_history.jsonl"


def _config_dict(config) -> dict:
    """``config`` as the JSON dict that ``config.json`` holds (tuples become lists)."""
    return json.loads(config.to_json_best_effort())


def check_workdir_config(config, workdir: str, has_checkpoints: bool) -> dict[str, tuple]:
    """Compare ``config`` with ``workdir/config.json`` (reads only); return the changes that are allowed.

    Returns:
        ``field -> (old, new)`` of the differing fields listed in ``config_checks.SAFE_TO_CHANGE``
        (all differences when the workdir holds no checkpoint: nothing would be resumed); empty
        for a new workdir.

    Raises:
        WorkdirConfigError: the workdir holds checkpoints and another field differs; one line
            naming every such field with both values.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        recorded = json.load(f)
    safe, unsafe = config_checks.config_changes(recorded, _config_dict(config))
    if unsafe and has_checkpoints:
        fields = "; ".join(f"{field}: {old!r} -> {new!r}" for field, (old, new) in unsafe.items())
        raise WorkdirConfigError(
            f"{workdir} holds checkpoints trained with another config ({path}); refusing to resume with "
            f"different {fields}. Use a new --workdir for a new run, or the recorded values to go on with "
            f"this one (fields that may change between runs: {', '.join(config_checks.SAFE_TO_CHANGE)}).")
    return {**safe, **unsafe}


def save_config(config, workdir: str, step: int = 0, changes: dict | None = None) -> str:
    """Record the config a run goes on with: ``workdir/config.json`` and a line of ``config_history.jsonl``.

    ``config.json`` is replaced atomically; the history gets a line ``{"time", "step", "changes",
    "config"}`` when the config differs from the last one recorded (the first time, a
    ``config.json`` left by an older version is recorded first). Process 0 only.

    Args:
        config: the resolved config.
        workdir: the run's folder.
        step: the training step the run starts or resumes at.
        changes: ``field -> (old, new)`` against the previous config (:func:`check_workdir_config`).

    Returns:
        The path of ``config.json``.
    """
    path = os.path.join(workdir, "config.json")
    if not parallel.is_main_process():
        return path
    history = os.path.join(workdir, CONFIG_HISTORY)
    entries = []
    if not os.path.exists(history) and os.path.exists(path):
        with open(path) as f:
            entries.append({"time": None, "step": None, "changes": {}, "config": json.load(f)})
    if changes or not os.path.exists(path):
        entries.append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step": int(step),
                        "changes": {k: list(v) for k, v in (changes or {}).items()}, "config": _config_dict(config)})
    if entries:
        with open(history, "a") as f:
            f.writelines(json.dumps(entry, sort_keys=True) + "\n" for entry in entries)
    tmp_path = path + ".tmp"
    with open(tmp_path, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    os.replace(tmp_path, path)
    return path
