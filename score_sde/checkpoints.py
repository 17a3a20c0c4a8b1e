"""Checkpoints on disk: flax msgpack files with a checksum footer, written atomically, the original's layout.

A training run keeps two folders, as the original ``run_lib``:

* ``checkpoints/checkpoint_<n>`` — numbered snapshots, ``n = ceil(step / snapshot_freq)`` (the numbers
  ``eval.begin_ckpt`` / ``eval.end_ckpt`` refer to);
* ``checkpoints-meta/checkpoint_<n>`` — the newest preemption checkpoint, from which a restarted run resumes.

File format: ``msgpack(flax.serialization.to_state_dict(state))`` followed by a 64-byte footer
(:data:`FOOTER`: magic, the training step of the state, the length of the msgpack part and its SHA-256).
The footer makes two things cheap: knowing a file's step without reading it (:func:`checkpoint_step`;
:func:`number_for_step` uses it so that numbers grow with the step whatever the frequencies) and
finding damage (:func:`read_raw` checks the length and the checksum and raises
:class:`CorruptCheckpointError`). Files without a footer (the original code's, and this port's before
the footer) are read as plain flax msgpack, unchecked.

Writes go to a temporary file in the same folder, are flushed to disk and then renamed over the
final name (``os.replace`` is atomic), so a process killed at any moment leaves either the previous
file or the new one, never a truncated checkpoint. Reading never unpickles anything.

:func:`restore_checkpoint` also reads checkpoints written by the original code (through
``score_sde.legacy_checkpoint``). The names mirror ``flax.training.checkpoints``.
"""
from __future__ import annotations

import hashlib
import os
import re
import struct
import tempfile
from typing import Any

import flax
import jax
import numpy as np

PREFIX = "checkpoint_"
_MAGIC = b"score_sde ckpt 1"
FOOTER = struct.Struct("<16sqQ32s")
"""magic (16 bytes), training step (int64), msgpack length (uint64), SHA-256 of the msgpack part (32 bytes)."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file is damaged (checksum mismatch, truncated, not msgpack); reading it again will not help."""


def numbered_checkpoints(ckpt_dir: str, prefix: str = PREFIX) -> list[tuple[int, str]]:
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


def checkpoint_step(path: str) -> int | None:
    """The training step recorded in the footer of ``path``; None for a file without a (valid) footer."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < FOOTER.size:
                return None
            f.seek(size - FOOTER.size)
            magic, step, length, _ = FOOTER.unpack(f.read(FOOTER.size))
    except OSError:
        return None
    return step if magic == _MAGIC and length == size - FOOTER.size else None


def latest_checkpoint(ckpt_dir: str, prefix: str = PREFIX) -> str | None:
    """Path of the highest-numbered checkpoint in ``ckpt_dir`` (the newest: see :func:`number_for_step`), or None."""
    found = numbered_checkpoints(ckpt_dir, prefix)
    return found[-1][1] if found else None


def number_for_step(ckpt_dir: str, step: int, freq: int, prefix: str = PREFIX) -> int:
    """The file number for a checkpoint of training step ``step`` written every ``freq`` steps.

    ``ceil(step / freq)`` (the original's numbering, the last one rounded up), unless that would not
    be above every existing number (``freq`` changed since those were written) while the file of that
    number does not hold ``step`` itself (a resumed run redoing a step replaces its own checkpoint):
    then the number after the highest existing one. Numbers thus grow with the step and a checkpoint
    of another step is never replaced.
    """
    natural = -(-int(step) // int(freq))
    existing = dict(numbered_checkpoints(ckpt_dir, prefix))
    highest = max(existing, default=0)
    if natural > highest or (natural in existing and checkpoint_step(existing[natural]) == int(step)):
        return natural
    return highest + 1


def _state_step(state_dict: Any, default: int) -> int:
    if isinstance(state_dict, dict) and "step" in state_dict:
        return int(np.asarray(state_dict["step"]))
    return int(default)


def save_checkpoint(ckpt_dir: str, target: Any, step: int, keep: int | float = 1, prefix: str = PREFIX,
                    overwrite: bool = True) -> str:
    """Write ``target`` (a flax-serialisable pytree, e.g. an unreplicated State) as ``<prefix><step>``.

    Args:
        ckpt_dir: folder (created if needed).
        target: the pytree; device arrays are fetched to the host. Its ``step`` entry (the
            training step) goes into the footer; a pytree without one records ``step``.
        step: the number in the file name (see :func:`number_for_step`).
        keep: how many of the highest-numbered checkpoints to keep (``np.inf`` keeps all); the
            file just written is never deleted.
        prefix: file-name prefix.
        overwrite: replace an existing file of the same number (otherwise raise).

    Returns:
        The path written.

    Raises:
        OSError: the folder is not writable or the disk is full; ``filename`` is the checkpoint's
            path, and the previous files are untouched.
    """
    path = os.path.join(ckpt_dir, f"{prefix}{int(step)}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"Checkpoint {path} exists already; pass overwrite=True to replace it.")
    state_dict = flax.serialization.to_state_dict(jax.device_get(target))
    data = flax.serialization.msgpack_serialize(state_dict)
    footer = FOOTER.pack(_MAGIC, _state_step(state_dict, step), len(data), hashlib.sha256(data).digest())
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        _write_atomically(ckpt_dir, path, (data, footer))
    except OSError as err:
        raise OSError(err.errno, f"cannot write checkpoint ({err.strerror})", path) from err
    if keep != np.inf:
        _remove_older(ckpt_dir, path, int(keep), prefix)
    return path


def _write_atomically(folder: str, path: str, chunks: tuple[bytes, ...]) -> None:
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync_dir(folder)


def _remove_older(ckpt_dir: str, written: str, keep: int, prefix: str) -> None:
    """Delete all but the ``keep`` highest-numbered checkpoints, never the file just ``written``."""
    existing = numbered_checkpoints(ckpt_dir, prefix)
    for _, path in existing[:max(len(existing) - keep, 0)]:
        if path != written:
            os.remove(path)


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


def _corrupt(path: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"Checkpoint file {path} is not a readable checkpoint: {what}. The file is damaged; delete or "
        "move it (a training run then resumes from the newest good checkpoint) or replace it from a copy.")


def read_raw(path: str) -> dict:
    """The nested dict stored in the checkpoint file ``path`` (msgpack; no pickle), its checksum verified.

    Raises:
        CorruptCheckpointError: the footer's length or SHA-256 does not match, or the data is not msgpack.
    """
    with open(path, "rb") as f:
        data = f.read()
    payload = memoryview(data)
    if len(data) >= FOOTER.size:
        magic, _, length, digest = FOOTER.unpack(data[-FOOTER.size:])
        if magic == _MAGIC:
            payload = payload[:-FOOTER.size]
            if length != len(payload):
                raise _corrupt(path, f"{len(payload)} bytes of data where its footer records {length}")
            if hashlib.sha256(payload).digest() != digest:
                raise _corrupt(path, "its SHA-256 checksum does not match the data")
    try:
        return flax.serialization.msgpack_restore(payload)
    except Exception as err:  # msgpack raises several unrelated exception types on bad input.
        raise _corrupt(path, f"not flax msgpack ({type(err).__name__}: {err})") from err


def restore_checkpoint(ckpt_dir_or_file: str, target: Any, prefix: str = PREFIX) -> Any:
    """Restore a checkpoint into the structure of ``target``.

    Args:
        ckpt_dir_or_file: a checkpoint file, or a folder whose newest checkpoint
            (:func:`latest_checkpoint`) is read.
        target: template pytree (e.g. a freshly initialised State) giving structure and dtypes.

    Returns:
        The restored pytree (host numpy arrays), or ``target`` itself if the folder holds no
        checkpoint. Checkpoints written by the original code are converted by
        ``score_sde.legacy_checkpoint.state_from_legacy``.

    Raises:
        CorruptCheckpointError: the file is damaged (at once: retrying cannot help).
        ValueError: the checkpoint belongs to another model (the message names the parameter).
        FileNotFoundError: no such file or folder.
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
