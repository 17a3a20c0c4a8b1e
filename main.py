"""Command line: flags and config in, one ``run_lib`` call out.

    python main.py --config configs/vp/digits.py --workdir runs/digits --mode train
    python main.py --config configs/vp/cifar10_ddpmpp_continuous.py --workdir runs/c10 --mode eval \\
        --eval_folder eval --config.eval.batch_size=256

Any config field can be overridden with ``--config.<section>.<field>=<value>``. Every expected failure
(a missing config file, a misspelt field, an invalid value, a workdir trained with another config,
missing data, a damaged checkpoint, a read-only or full disk, divergence) ends with one line
``error: ...`` on stderr and exit status 2 (flags and config, before the job starts) or 1. For several
hosts, start the same command on each with ``--coordinator_address host:port
--num_processes P --process_id i`` (or the environment variables ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).
"""
from __future__ import annotations

import errno
import os
import re
import sys
from typing import Callable

from absl import app, flags
from ml_collections.config_flags import config_flags

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file("config", None, "Config file (configs/**.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Working directory: checkpoints, samples, logs, TensorBoard events.")
flags.DEFINE_string("mode", None, "Running mode: train, eval, fid_stats, sample, tables or train_deq.")
flags.DEFINE_string("eval_folder", "eval", "Folder (inside workdir) for evaluation results.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: address host:port of process 0's coordinator.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: index of this process, 0..num_processes-1.")
flags.DEFINE_string("jax_cache_dir", None, "JAX's persistent compilation cache (compiled programs reused by later "
                    "runs): a folder, or 'none' to turn it off. Default: $JAX_COMPILATION_CACHE_DIR, else "
                    "~/.cache/score_sde/jax; off for multi-process CPU runs unless given (score_sde/compile_cache.py).")

# mode -> (the run_lib function, the config_checks mode that validates its config)
MODES = {
    "train": ("train", "train"),
    "eval": ("evaluate", "eval"),
    "fid_stats": ("fid_stats", "eval"),
    "sample": ("sample", "eval"),
    "tables": ("tables", "eval"),
    "train_deq": ("train_deq", "train"),
}


# OSError numbers of a workdir that cannot be written: permissions, read-only file system, full disk or quota.
_DISK_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _check_workdir(path: str, create: bool) -> None:
    """Stop before any work when ``--workdir`` names a file or, for a job that starts one, cannot be made (a
    read-only or full disk is reported as the job reports it, exit status 1)."""
    if os.path.exists(path) and not os.path.isdir(path):
        _fail(f"--workdir={path} is a file, not a folder; choose another --workdir.")
    if create:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as err:
            if err.errno in _DISK_ERRNOS:
                _fail_cannot_write(err.filename or path, err.strerror)
            _fail(f"cannot create --workdir={path}: {err.strerror}; choose another --workdir.")


def _fail_cannot_write(path: str, reason: str) -> None:
    _fail(f"cannot write {path}: {reason}. Make it writable or free disk space, or choose another --workdir.", code=1)


def _config_file_message(argv: list[str]) -> str:
    """One line for a ``--config`` file that could not be loaded (its path taken from ``argv``)."""
    values = [b if a == "--config" else a.split("=", 1)[1] for a, b in zip(argv, argv[1:] + [""])
              if a == "--config" or a.startswith("--config=")]
    path = values[-1].split(":", 1)[0] if values else ""
    if not os.path.isfile(path):
        return (f"--config={path}: no such config file (looked for {os.path.abspath(path)}); give the path of a "
                "file under configs/, e.g. --config configs/vp/digits.py.")
    return f"--config={path} could not be loaded; run `python {path}` to see why."


def _unknown_field_message(argv: list[str], err: Exception) -> str:
    """One line for an override ``--config.a.b=v`` whose field does not exist (ml_collections' error text)."""
    text = str(err.args[0]) if err.args else str(err)
    suggestion = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    names = re.findall(r"'(\w+)'", text)
    field = suggestion.group(2) if suggestion else names[0] if names else text
    flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.")
                 and field in a.split("=", 1)[0].split(".")[1:]), "--config.<field>")
    hint = f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""
    return f"{flag}: the config has no field {field!r}{hint}"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, each error one line (ml_collections raises plain exceptions for config overrides)."""
    try:
        return FLAGS(argv)
    except flags.Error as err:
        _fail(str(err))
    except OSError:  # an override touched a config whose file failed to load
        _fail(_config_file_message(argv))
    except (AttributeError, KeyError) as err:
        _fail(_unknown_field_message(argv, err))


def _job(function_name: str) -> tuple[Callable, tuple[type[Exception], ...]]:
    """The job's function and the errors it ends with by design (reported in one line).

    ``--mode sample`` reads a checkpoint and runs JAX only: it is taken from ``score_sde.sample_job``
    without importing TensorFlow (~4 s of a warm digits sample job). Every other job imports ``run_lib``.
    """
    if function_name == "sample":
        from score_sde import sample_job  # noqa: PLC0415

        return sample_job.sample, (sample_job.SamplingError,)

    import tensorflow as tf  # noqa: PLC0415

    # TensorFlow only feeds data here; keep it off the accelerators that JAX uses.
    tf.config.set_visible_devices([], "GPU")

    import run_lib  # noqa: PLC0415
    from score_sde.checkpoints import CorruptCheckpointError  # noqa: PLC0415
    from score_sde.datasets import DatasetUnavailableError  # noqa: PLC0415
    from score_sde.dequantizer_train import DequantizerError  # noqa: PLC0415
    from score_sde.job_lock import FolderInUseError  # noqa: PLC0415
    from score_sde.paper_results import TablesError  # noqa: PLC0415

    job = getattr(run_lib, function_name, None)
    if job is None:
        _fail(f"--mode={FLAGS.mode} is not available in this version (run_lib.{function_name} is missing).")
    return job, (run_lib.TrainingDivergedError, run_lib.EvaluationError, run_lib.WorkdirConfigError,
                 DatasetUnavailableError, CorruptCheckpointError, TablesError, DequantizerError, FolderInUseError)


def main(argv) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; every option is a --flag (see --help).")
    if FLAGS.mode not in MODES:
        _fail(f"--mode={FLAGS.mode!r} is not a mode; use one of {', '.join(MODES)}.")
    if not FLAGS.workdir:
        _fail("--workdir is required: the folder for checkpoints, samples and logs.")
    if FLAGS.config is None:
        _fail("--config is required, e.g. --config configs/vp/digits.py.")
    try:
        FLAGS.config.get("training")
    except OSError:  # ml_collections defers a config file's load error to the first use of the config
        _fail(_config_file_message(sys.argv))

    # Joining a multi-process run must come before anything touches a JAX backend.
    from score_sde import parallel

    parallel.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)

    from score_sde import compile_cache

    try:
        compile_cache.configure(FLAGS.jax_cache_dir)
    except OSError as err:
        _fail(f"cannot use {err.filename}: {err.strerror}")

    from score_sde import config_checks

    function_name, check_mode = MODES[FLAGS.mode]
    try:
        config_checks.validate_config(FLAGS.config, check_mode)
    except ValueError as err:
        _fail(str(err))

    _check_workdir(FLAGS.workdir, create=check_mode == "train")

    # Training on data that are always present: compile its programs in the background while TensorFlow
    # imports and the data load (score_sde/train_programs.py).
    programs = None
    if FLAGS.mode == "train":
        from score_sde import train_programs

        programs = train_programs.start_before_data(FLAGS.config, FLAGS.workdir)

    job, expected_errors = _job(function_name)
    kwargs = {"eval_folder": FLAGS.eval_folder} if FLAGS.mode == "eval" else {}
    if programs is not None:
        kwargs["programs"] = programs
    try:
        job(FLAGS.config, FLAGS.workdir, **kwargs)
    except expected_errors as err:
        _fail(str(err), code=1)
    except OSError as err:
        if err.errno not in _DISK_ERRNOS:
            raise
        _fail_cannot_write(err.filename or FLAGS.workdir, err.strerror)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
