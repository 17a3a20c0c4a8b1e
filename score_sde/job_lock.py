"""One job at a time per folder: an advisory lock that a training or evaluation job holds while it writes there.

Two training jobs started on one workdir would both resume from its newest checkpoint and then overwrite each
other's checkpoints, samples and logs; two evaluations of one folder would race on its records. The job that
comes second is refused at once, with the holder's process, host and start time.

The lock is ``fcntl.flock`` on a file in the folder (:data:`TRAIN_LOCK` for a training job), so the operating
system releases it when the holding process ends, however it ends (``kill -9`` included): a lock file left on
disk is never stale and never needs deleting. ``main.py`` only checks that the workdir is free
(:func:`ensure_free`, in ``train_programs.start_before_data``) before it starts compiling; ``run_lib.train``
takes the lock. Holding is re-entrant within a process. ``flock`` is local to one machine: on a file system
shared between hosts (NFS) it may not see a job running on another host.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
import threading
from typing import Iterator

TRAIN_LOCK = "train.lock"
"""The lock file of a training job, in its workdir (``--mode train``) or dequantiser folder (``train_deq``)."""


def eval_lock(host: int) -> str:
    """The lock file of one host's evaluation, in its eval folder (each host writes files of its own there)."""
    return f"eval_host_{host}.lock"


class FolderInUseError(RuntimeError):
    """Another process holds the lock of this folder."""


_held: dict[str, list] = {}  # lock path -> [open file, depth]
_guard = threading.Lock()


def acquire(folder: str, name: str = TRAIN_LOCK) -> None:
    """Take the lock ``name`` of ``folder`` (created if absent) for this process, or raise :class:`FolderInUseError`.

    Taking a lock this process already holds only counts one more holder; :func:`release` undoes one.
    """
    path = os.path.join(os.path.realpath(folder), name)
    with _guard:
        if path in _held:
            _held[path][1] += 1
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open while the lock is held)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise FolderInUseError(
                f"{folder} is in use by {holder} (lock {path}). Wait for that job to end or stop it: the lock goes "
                "with its process. To run another job beside it, give it another folder.") from None
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        handle.write(f"process {os.getpid()} on {socket.gethostname()}, since {started}\n")
        handle.flush()
        _held[path] = [handle, 1]


def release(folder: str, name: str = TRAIN_LOCK) -> None:
    """Undo one :func:`acquire` of this process; the last one frees the lock (the file stays, harmlessly)."""
    path = os.path.join(os.path.realpath(folder), name)
    with _guard:
        entry = _held.get(path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[path]
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            entry[0].close()


def ensure_free(folder: str, name: str = TRAIN_LOCK) -> None:
    """Raise :class:`FolderInUseError` if another process holds the lock ``name`` of ``folder``; take nothing."""
    acquire(folder, name)
    release(folder, name)


@contextlib.contextmanager
def hold(folder: str, name: str = TRAIN_LOCK, enabled: bool = True) -> Iterator[None]:
    """``with hold(folder):`` the lock of :func:`acquire`, released on leaving; nothing when not ``enabled`` (the
    processes of a multi-process job other than the first, which write nothing there)."""
    if not enabled:
        yield
        return
    acquire(folder, name)
    try:
        yield
    finally:
        release(folder, name)
