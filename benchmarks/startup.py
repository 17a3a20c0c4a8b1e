"""Seconds from ``python main.py --mode train`` to its first training step: cold cache, warm cache, after kill -9.

Runs the README's digits job (``configs/vp/digits.py``) four times, each timed until the first logged
training step (``log_freq = n_jitted_steps``), then killed with SIGKILL once the meta checkpoint
written after that step is on disk:

1. ``cold``: an empty compilation cache folder, a new workdir;
2. ``warm``: the same cache folder, another new workdir (the programs come from the cache);
3. ``resume``: the same cache, the workdir of run 2 again (resumes from its meta checkpoint);
4. ``resume, no cache``: the same workdir with ``--jax_cache_dir=none``.

    python benchmarks/startup.py [--config configs/vp/digits.py] [--timeout 900] [-- extra main.py flags]

The figures include Python, TensorFlow and JAX imports, data loading and model initialisation,
which the cache does not change; the difference between rows is compilation.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STEP_MARK = "training_loss"


def steps_per_call(config: str, extra: list[str]) -> int:
    """``config.training.n_jitted_steps`` of the config file ``config`` with the overrides in ``extra``: the step at
    which the run first logs when ``log_freq`` is set to it (one call of the train step)."""
    for i, flag in enumerate(extra):
        if flag.startswith("--config.training.n_jitted_steps="):
            return int(flag.split("=", 1)[1])
        if flag == "--config.training.n_jitted_steps" and i + 1 < len(extra):
            return int(extra[i + 1])
    spec = importlib.util.spec_from_file_location("startup_config", os.path.join(ROOT, config))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.get_config().training.n_jitted_steps)


def seconds_to_first_step(config: str, workdir: str, cache_dir: str, extra: list[str], timeout: float,
                          resumes: bool = False) -> float:
    """Start main.py, wait for the first logged training step in ``workdir/stdout.txt``; seconds elapsed.

    The run is then killed with SIGKILL once its meta checkpoint of that step is on disk (written just after the
    log line), so that the next run of the same workdir has something to resume from. ``resumes``: raise unless
    this run resumed from such a checkpoint (it would otherwise time a fresh start).
    """
    first_step = steps_per_call(config, extra)
    log = os.path.join(workdir, "stdout.txt")
    start_size = os.path.getsize(log) if os.path.exists(log) else 0
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, "main.py", "--config", config, "--workdir", workdir, "--mode", "train",
           f"--jax_cache_dir={cache_dir}", f"--config.training.log_freq={first_step}",
           f"--config.training.snapshot_freq_for_preemption={first_step}", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while time.perf_counter() - start < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"main.py exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            if os.path.exists(log):
                with open(log) as f:
                    f.seek(start_size)
                    new_lines = f.read()
                if FIRST_STEP_MARK in new_lines:
                    elapsed = time.perf_counter() - start
                    if resumes and not re.search(r"Starting training loop at step [1-9]\d* ", new_lines):
                        raise RuntimeError(f"main.py did not resume from a checkpoint in {workdir}.")
                    _wait_for_meta_checkpoint(workdir, proc, timeout)
                    return elapsed
            time.sleep(0.05)  # polling adds on average half of this to every row
        raise TimeoutError(f"no training step logged within {timeout} s: {' '.join(cmd)}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


def _wait_for_meta_checkpoint(workdir: str, proc: subprocess.Popen, timeout: float) -> None:
    """Return once ``workdir/checkpoints-meta`` holds a checkpoint (files are renamed into place when complete)."""
    folder = os.path.join(workdir, "checkpoints-meta")
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if os.path.isdir(folder) and any(name.startswith("checkpoint_") for name in os.listdir(folder)):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"main.py exited with {proc.returncode} before its meta checkpoint was written.")
        time.sleep(0.05)
    raise TimeoutError(f"no meta checkpoint in {folder} within {timeout} s.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/vp/digits.py")
    parser.add_argument("--timeout", type=float, default=900.0)
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    # The backend main.py will pick, read in this process without taking the accelerator's memory from the runs.
    child_env_preallocate = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    sys.path.insert(0, ROOT)
    from benchmarks import common

    common.print_backend()
    if child_env_preallocate is None:
        os.environ.pop("XLA_PYTHON_CLIENT_PREALLOCATE")
    else:
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = child_env_preallocate
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        rows = [("cold cache", os.path.join(tmp, "w1"), cache),
                ("warm cache", os.path.join(tmp, "w2"), cache),
                ("resume after kill -9, warm cache", os.path.join(tmp, "w2"), cache),
                ("resume after kill -9, no cache", os.path.join(tmp, "w2"), "none")]
        print(f"{args.config} {' '.join(extra)}: seconds from launch to the first training step", flush=True)
        times = {}
        for name, workdir, cache_dir in rows:
            times[name] = seconds_to_first_step(args.config, workdir, cache_dir, extra, args.timeout,
                                                resumes=name.startswith("resume"))
            print(f"  {name:34s} {times[name]:7.1f} s", flush=True)
        print(f"  cold / warm: {times['cold cache'] / times['warm cache']:.2f}x; resume without cache / resume warm: "
              f"{times['resume after kill -9, no cache'] / times['resume after kill -9, warm cache']:.2f}x")


if __name__ == "__main__":
    main()
