"""Command line: flags and config in, one ``run_lib`` call out.

    python main.py --config configs/vp/digits.py --workdir runs/digits --mode train
    python main.py --config configs/vp/cifar10_ddpmpp_continuous.py --workdir runs/c10 --mode eval \\
        --eval_folder eval --config.eval.batch_size=256

Any config field can be overridden with ``--config.<section>.<field>=<value>``. For several
hosts, start the same command on each with ``--coordinator_address host:port
--num_processes P --process_id i`` (or the environment variables ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections.config_flags import config_flags

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file("config", None, "Config file (configs/**.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Working directory: checkpoints, samples, logs, TensorBoard events.")
flags.DEFINE_string("mode", None, "Running mode: train, eval or fid_stats.")
flags.DEFINE_string("eval_folder", "eval", "Folder (inside workdir) for evaluation results.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: address host:port of process 0's coordinator.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: index of this process, 0..num_processes-1.")

# mode -> (the run_lib function, the config_checks mode that validates its config)
MODES = {
    "train": ("train", "train"),
    "eval": ("evaluate", "eval"),
    "fid_stats": ("fid_stats", "eval"),
}


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; every option is a --flag (see --help).")
    if FLAGS.mode not in MODES:
        _fail(f"--mode={FLAGS.mode!r} is not a mode; use one of {', '.join(MODES)}.")
    if not FLAGS.workdir:
        _fail("--workdir is required: the folder for checkpoints, samples and logs.")
    if FLAGS.config is None:
        _fail("--config is required, e.g. --config configs/vp/digits.py.")

    # Joining a multi-process run must come before anything touches a JAX backend.
    from score_sde import parallel

    parallel.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)

    from score_sde import config_checks

    function_name, check_mode = MODES[FLAGS.mode]
    try:
        config_checks.validate_config(FLAGS.config, check_mode)
    except ValueError as err:
        _fail(str(err))

    import tensorflow as tf

    # TensorFlow only feeds data here; keep it off the accelerators that JAX uses.
    tf.config.set_visible_devices([], "GPU")

    import run_lib
    from score_sde.datasets import DatasetUnavailableError

    job = getattr(run_lib, function_name, None)
    if job is None:
        _fail(f"--mode={FLAGS.mode} is not available in this version (run_lib.{function_name} is missing).")
    kwargs = {"eval_folder": FLAGS.eval_folder} if FLAGS.mode == "eval" else {}
    try:
        job(FLAGS.config, FLAGS.workdir, **kwargs)
    except (run_lib.TrainingDivergedError, DatasetUnavailableError) as err:
        logging.error("%s", err)
        _fail(str(err), code=1)


if __name__ == "__main__":
    app.run(main)
