"""What ``run_lib.evaluate`` checks before any work, and its waiting for checkpoints and other processes' files.

The checks (:func:`check_eval_config`, :func:`check_checkpoints_present`, :func:`check_result_settings`)
run before anything is computed or written and raise :class:`EvaluationError` with one line naming
the config field or file. :func:`wait_and_restore` waits for a checkpoint a running training has
still to write (``config.eval.wait_for_checkpoints_s``); :func:`wait_for_host_files` for the files
the other processes of a multi-host evaluation write.
"""
from __future__ import annotations

import logging
import os
import time

from score_sde import checkpoints, parallel

# Seconds between looks for a checkpoint that has not arrived yet (the original waited 60 s).
CHECKPOINT_POLL_S = 60.0
# Seconds between looks for the files the other processes of a multi-host evaluation write.
HOST_FILES_POLL_S = 5.0
# Seconds to wait for them before concluding that a process died (sampling one checkpoint's share takes minutes to
# an hour on the released configs; a process that has not written its files after this is not coming back).
HOST_FILES_TIMEOUT_S = 4 * 3600.0


class EvaluationError(ValueError):
    """Evaluation cannot start or go on; the one-line message says why and what to do."""


def one_line(err: BaseException) -> str:
    """``str(err)`` on one line: every run of white space (newlines included) becomes one space."""
    return " ".join(str(err).split())


# ---- checks made before anything is computed or written ----------------------------------------

def check_eval_config(config) -> None:
    """Reject ``eval.*`` values that would otherwise fail late (the checkpoint range, batch size, bpd split)."""
    begin, end = config.eval.begin_ckpt, config.eval.end_ckpt
    if begin > end:
        raise EvaluationError(f"config.eval.begin_ckpt = {begin} is after config.eval.end_ckpt = {end}: there is "
                              "no checkpoint to evaluate. Set begin_ckpt <= end_ckpt.")
    wait_s = wait_seconds(config)
    if not wait_s >= 0:
        raise EvaluationError(f"config.eval.wait_for_checkpoints_s = {wait_s!r}; use 0 (do not wait) or a number "
                              "of seconds to wait for each checkpoint a running training has still to write.")
    devices = parallel.device_count()
    if config.eval.batch_size % devices != 0 or config.eval.batch_size < devices:
        raise EvaluationError(f"config.eval.batch_size = {config.eval.batch_size} must be a positive multiple of "
                              f"the number of devices ({devices}).")
    if config.eval.bpd_dataset.lower() not in ("train", "test"):
        raise EvaluationError(f"config.eval.bpd_dataset = {config.eval.bpd_dataset!r}; use 'train' or 'test'.")
    _check_bound_config(config)


def _check_bound_config(config) -> None:
    """The bound's fields (``eval.enable_bound``, ``eval.bound_num_times``), and score_flow's ``eval.bound`` refused."""
    if config.eval.get("bound", False):
        # score_flow's switch replaced the ODE bits/dim by the bound; silently ignoring it would report the ODE only.
        raise EvaluationError("config.eval.bound = True is score_flow's switch and is not read here: set "
                              "config.eval.enable_bound = True (the bound is reported beside the ODE bits/dim; "
                              "config.eval.enable_bpd = False skips the ODE) and config.eval.bound = False.")
    if not config.eval.get("enable_bound", False):
        return
    num_times = config.eval.get("bound_num_times", 1000)
    if not isinstance(num_times, int) or num_times < 1:
        raise EvaluationError(f"config.eval.bound_num_times = {num_times!r}; use a positive integer (Monte-Carlo "
                              "times per example for the likelihood bound; score_flow used 1000).")


def wait_seconds(config) -> float:
    """``config.eval.wait_for_checkpoints_s``: how long to wait for each checkpoint not written yet (0: do not wait)."""
    # .get: configs written before the field existed (a workdir's config.json) do not wait.
    return config.eval.get("wait_for_checkpoints_s", 0)


def _checkpoint_path(checkpoint_dir: str, ckpt: int) -> str:
    return os.path.join(checkpoint_dir, f"{checkpoints.PREFIX}{ckpt}")


def number_ranges(numbers: list[int]) -> str:
    """Increasing ``[1, 2, 3, 5]`` -> ``'1-3, 5'``."""
    spans = [[numbers[0], numbers[0]]]
    for n in numbers[1:]:
        if n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def check_checkpoints_present(checkpoint_dir: str, first: int, last: int, wait_s: float) -> None:
    """Fail at once when a checkpoint ``first..last`` is missing and waiting for it is not allowed.

    With ``wait_s > 0`` (``config.eval.wait_for_checkpoints_s``) the missing ones are logged and
    :func:`wait_and_restore` waits for each in turn.
    """
    missing = [n for n in range(first, last + 1) if not os.path.exists(_checkpoint_path(checkpoint_dir, n))]
    if not missing:
        return
    if wait_s > 0:
        if parallel.is_main_process():
            logging.info("Checkpoint(s) %s are not in %s yet; waiting up to %g s for each as it comes "
                         "(config.eval.wait_for_checkpoints_s).", number_ranges(missing), checkpoint_dir, wait_s)
        return
    if not os.path.isdir(checkpoint_dir):
        found = "the folder does not exist"
    else:
        latest = checkpoints.latest_checkpoint(checkpoint_dir)
        found = f"the highest there is {os.path.basename(latest)}" if latest else "it holds no checkpoint"
    raise EvaluationError(
        f"Checkpoint(s) {number_ranges(missing)} of config.eval.begin_ckpt..end_ckpt = {first}..{last} are not in "
        f"{checkpoint_dir} ({found}). Check --workdir and the range; to wait for checkpoints that a running "
        "`--mode train` will still write, set config.eval.wait_for_checkpoints_s (seconds).")


def check_result_settings(eval_dir: str, settings: dict) -> dict:
    """Refuse to add results to ``eval_dir`` when they were computed with other settings; returns what to record."""
    from score_sde import eval_records  # noqa: PLC0415 (TensorFlow's file API: not for --mode sample)

    recorded = eval_records.load_settings(eval_dir)
    differences = eval_records.settings_differences(recorded, settings) if recorded is not None else []
    if differences:
        raise EvaluationError(
            f"{eval_dir} holds results computed with other settings ({'; '.join(differences)}); new rounds would "
            "be mixed with them. Evaluate into another folder (--eval_folder) or with the settings recorded in "
            f"{eval_records.settings_path(eval_dir)}.")
    return eval_records.merged_settings(recorded, settings)


# ---- checkpoints --------------------------------------------------------------------------------

def _wait_for_checkpoint(path: str, wait_s: float) -> None:
    """Return once ``path`` exists, looking every ``CHECKPOINT_POLL_S`` for at most ``wait_s`` seconds."""
    if os.path.exists(path):
        return
    deadline = time.monotonic() + wait_s
    if parallel.is_main_process():
        logging.info("Waiting up to %g s for %s, which a running `--mode train` on this workdir would write "
                     "(config.eval.wait_for_checkpoints_s).", wait_s, path)
    while not os.path.exists(path):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise EvaluationError(
                f"{path} did not appear within config.eval.wait_for_checkpoints_s = {wait_s:g} s. Is `--mode train` "
                "still running on this workdir? Rerun later (the evaluation resumes where it stopped) or wait longer.")
        time.sleep(min(CHECKPOINT_POLL_S, remaining))


def wait_and_restore(checkpoint_dir: str, ckpt: int, template, wait_s: float = 0.0):
    """Restore ``checkpoint_<ckpt>`` into ``template``, first waiting up to ``wait_s`` seconds for it to appear.

    A checkpoint that cannot be read is not retried: checkpoints are written atomically, so a
    file under its final name is complete and a read error will not go away by itself (and an
    interrupted evaluation resumes where it stopped).

    Raises:
        EvaluationError: the file did not appear in time, or cannot be read (corrupt, truncated,
            unreadable, or of another model); the message names the file.
    """
    path = _checkpoint_path(checkpoint_dir, ckpt)
    _wait_for_checkpoint(path, wait_s)
    try:
        return checkpoints.restore_checkpoint(path, template)
    except (ValueError, OSError) as err:  # checkpoints.CorruptCheckpointError is a ValueError
        raise EvaluationError(f"Cannot evaluate {path}: {one_line(err)}") from err


def wait_for_host_files(paths: list[str], what: str) -> None:
    """Return once every file of ``paths`` exists (written by other processes of this evaluation)."""
    if all(os.path.exists(p) for p in paths):
        return
    logging.info("Waiting for %s from the other processes of this evaluation.", what)
    deadline = time.monotonic() + HOST_FILES_TIMEOUT_S
    while not all(os.path.exists(p) for p in paths):
        if time.monotonic() > deadline:
            missing = [p for p in paths if not os.path.exists(p)]
            raise EvaluationError(
                f"Waited {HOST_FILES_TIMEOUT_S:.0f} s for {what} and {len(missing)} file(s) never appeared (first: "
                f"{missing[0]}): did that process die? Restart every process of the evaluation; finished parts "
                "are kept and are not recomputed.")
        time.sleep(HOST_FILES_POLL_S)
