"""Checkpoints on disk: flax msgpack files, written atomically, the original's layout.

A training run keeps two folders, as the original ``run_lib``:

* ``checkpoints/checkpoint_<n>`` — numbered snapshots (``n = step // snapshot_freq``);
* ``checkpoints-meta/checkpoint_<n>`` — the latest preemption checkpoint(s), from which a
  restarted run resumes.

Each file is the msgpack of ``flax.serialization.to_state_dict(state)``. Writes go to a
temporary file in the same folder, are flushed to disk and then renamed over the final name
(``os.replace`` is atomic), so a process killed at any moment leaves either the previous
file or the new one, never a truncated checkpoint. Reading never unpickles anything.

:func:`restore_checkpoint` also reads checkpoints written by the original code (through
``score_sde.legacy_checkpoint``). The names mirror ``flax.training.checkpoints``.
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Any

import flax
import jax
import numpy as np

PREFIX = "checkpoint_"


def _numbered_checkpoints(ckpt_dir: str, prefix: str = PREFIX) -> list[tuple[int, str]]:
    """``(n, path)`` of the files ``<prefix><n>`` in ``ckpt_dir``, by increasing ``n``."""
    if not os.path.isdir(ckpt_dir):
        return []
    pattern = re.compile("^" + re.escape(prefix) + r"(\d+)$")
    found = []
    for name in os.listdir(ckpt_dir):
        match = pattern.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(ckpt_dir, name)))
    return sorted(found)


def latest_checkpoint(ckpt_dir: str, prefix: str = PREFIX) -> str | None:
    """Path of the highest-numbered checkpoint in ``ckpt_dir``, or None if there is none."""
    found = _numbered_checkpoints(ckpt_dir, prefix)
    return found[-1][1] if found else None


def save_checkpoint(ckpt_dir: str, target: Any, step: int, keep: int | float = 1, prefix: str = PREFIX,
                    overwrite: bool = True) -> str:
    """Write ``target`` (a flax-serialisable pytree, e.g. an unreplicated State) as ``<prefix><step>``.

    Args:
        ckpt_dir: folder (created if needed).
        target: the pytree; device arrays are fetched to the host.
        step: the number in the file name.
        keep: how many of the highest-numbered checkpoints to keep (``np.inf`` keeps all).
        prefix: file-name prefix.
        overwrite: replace an existing file of the same number (otherwise raise).

    Returns:
        The path written.
    """
    os.makedirs(ckpt_dir, exist_ok=True)
    path = os.path.join(ckpt_dir, f"{prefix}{int(step)}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"Checkpoint {path} exists already; pass overwrite=True to replace it.")
    data = flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(jax.device_get(target)))
    fd, tmp_path = tempfile.mkstemp(prefix=f".{prefix}{int(step)}.", suffix=".tmp", dir=ckpt_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync_dir(ckpt_dir)
    if keep != np.inf:
        existing = _numbered_checkpoints(ckpt_dir, prefix)
        for _, old in existing[:max(len(existing) - int(keep), 0)]:
            os.remove(old)
    return path


def _fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_raw(path: str) -> dict:
    """The nested dict stored in the checkpoint file ``path`` (msgpack; no pickle)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return flax.serialization.msgpack_restore(data)
    except Exception as err:  # msgpack raises several unrelated exception types on bad input.
        raise ValueError(f"Checkpoint file {path} is not a readable flax msgpack checkpoint "
                         f"({type(err).__name__}: {err}). Delete it or point to another checkpoint.") from err


def restore_checkpoint(ckpt_dir_or_file: str, target: Any, prefix: str = PREFIX) -> Any:
    """Restore a checkpoint into the structure of ``target``.

    Args:
        ckpt_dir_or_file: a checkpoint file, or a folder whose highest-numbered
            ``<prefix><n>`` file is read.
        target: template pytree (e.g. a freshly initialised State) giving structure and dtypes.

    Returns:
        The restored pytree (host numpy arrays), or ``target`` itself if the folder holds no
        checkpoint. Checkpoints written by the original code are converted by
        ``score_sde.legacy_checkpoint.state_from_legacy``.
    """
    if os.path.isdir(ckpt_dir_or_file):
        path = latest_checkpoint(ckpt_dir_or_file, prefix)
        if path is None:
            return target
    elif os.path.exists(ckpt_dir_or_file):
        path = ckpt_dir_or_file
    else:
        raise FileNotFoundError(f"No checkpoint file or folder at {ckpt_dir_or_file}.")
    raw = read_raw(path)
    from score_sde import legacy_checkpoint  # noqa: PLC0415 (only needed for the original's files)

    if legacy_checkpoint.is_legacy_state_dict(raw):
        return legacy_checkpoint.state_from_legacy(raw, target)
    try:
        restored = flax.serialization.from_state_dict(target, raw)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"Checkpoint {path} does not match the model of this config ({err}). "
                         "Was it written with a different config?") from err
    _check_shapes(restored, target, path)
    return restored


def _check_shapes(restored: Any, target: Any, path: str) -> None:
    """Raise ``ValueError`` naming the first leaf whose shape differs from the template's."""
    got = jax.tree_util.tree_flatten_with_path(restored)[0]
    want = jax.tree_util.tree_leaves(target)
    for (key_path, leaf), template_leaf in zip(got, want):
        if np.shape(leaf) != np.shape(template_leaf):
            raise ValueError(f"Checkpoint {path}: {jax.tree_util.keystr(key_path)} has shape {np.shape(leaf)}, "
                             f"the model of this config expects {np.shape(template_leaf)}. "
                             "Was it written with a different config?")
