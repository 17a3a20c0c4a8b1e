"""What each job compiles (issue 16): one train step, one eval step, one sampler, and a known few small helpers.

Every XLA compilation request is counted by a listener on JAX's compile event (``jax.monitoring``,
``/jax/core/compile/backend_compile_duration``, with the program's name). The event fires on
persistent-cache hits too, so conftest's compilation cache cannot hide a compile from the count.
A program JAX already holds in memory (the same function at the same shapes) is not compiled
again: that reuse is what these tests check, over runs that cross every boundary of the jobs
at least twice. docs/performance.md ("What each job compiles") lists the measured programs.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import traceback

import jax
import numpy as np

import run_lib
from score_sde import datasets
from tests.test_train import tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
VENV = pathlib.Path(sys.prefix).resolve()
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass(frozen=True)
class Compile:
    """One compilation: JAX's program name and the innermost line of project code that asked for it."""

    name: str
    site: str  # 'run_lib.py:_train'
    line: str  # that line's source text
    calls: tuple[str, ...]  # the source text of every project line on the stack, innermost first

    def __str__(self):
        return f"{self.name} at {self.site} ({self.line})"


def _project_frames() -> list[traceback.FrameSummary]:
    """The stack frames in the project's own modules (not JAX, not the tests), innermost first."""
    frames = []
    for frame in reversed(traceback.extract_stack()):
        path = pathlib.Path(frame.filename).resolve()
        # A virtual environment may live inside the repository (CI's .ci-venv): its packages are not the project.
        if (ROOT in path.parents and "site-packages" not in path.parts and not path.is_relative_to(VENV)
                and "tests" not in path.relative_to(ROOT).parts):
            frames.append(frame)
    return frames


@contextlib.contextmanager
def counting_compiles():
    """Yield a list that receives a :class:`Compile` for every program compiled inside the block."""
    compiles: list[Compile] = []

    def listener(event, duration_secs, **kwargs):
        del duration_secs
        if event != COMPILE_EVENT:
            return
        frames = _project_frames()
        site = f"{os.path.relpath(frames[0].filename, ROOT)}:{frames[0].name}" if frames else "?"
        compiles.append(Compile(str(kwargs.get("fun_name", "?")), site, frames[0].line if frames else "",
                                tuple(f.line for f in frames)))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _listing(compiles: list[Compile]) -> str:
    """``'2 x jit(squeeze) at parallel.py:<lambda> (x[0]); ...'``: each distinct compile once, with its count."""
    return "; ".join(f"{n} x {c}" for c, n in collections.Counter(str(c) for c in compiles).items())


def _check(compiles: list[Compile], programs: dict[str, str], helpers: dict[str, int]) -> dict[str, int]:
    """Fail unless each of ``programs`` compiled exactly once and the rest stay within ``helpers``.

    Args:
        compiles: what the job compiled.
        programs: ``label -> call`` for the job's main programs, each recognised by the text of
            a line on the stack when it compiles (e.g. ``'p_train_step('``); each must compile
            exactly once, including any eager helper its call compiles.
        helpers: ``site -> most programs`` for the small programs of the job's eager JAX code
            (keys, model initialisation, SDE tables, ...); any other site is an extra compile.

    Returns:
        The number of compiles of each program label and helper site.
    """
    counts = collections.Counter()
    by_key = collections.defaultdict(list)
    for c in compiles:
        label = next((label for label, call in programs.items() if any(call in line for line in c.calls)), c.site)
        counts[label] += 1
        by_key[label].append(c)
    problems = [f"{label} compiled {counts[label]} times, expected once: {_listing(by_key[label])}"
                for label in programs if counts[label] != 1]
    problems += [f"{counts[key]} program(s) compiled at {key}, expected at most {helpers.get(key, 0)}: "
                 f"{_listing(by_key[key])}"
                 for key in by_key if key not in programs and counts[key] > helpers.get(key, 0)]
    assert not problems, "Unexpected compilation:\n" + "\n".join(problems)
    return dict(counts)


# The main programs of each job, by the call that runs them (run_lib), or for training's train step by the call
# that compiles it ahead, in a worker thread (score_sde/train_programs.py); its later calls must compile nothing.
TRAIN_PROGRAMS = {"train step": "train_step_lowered.compile(", "eval step": "p_eval_step(", "sampler": "sampling_fn("}
EVAL_PROGRAMS = {"eval step": "job.p_eval_step("}

# The small programs that eager JAX code compiles, once per shape, where the project calls it
# (measured on jax 0.10.2; docs/performance.md lists them by name).
TRAIN_HELPERS = {
    "run_lib.py:_train": 2,  # PRNGKey(config.seed): lift the seed, threefry seed
    "losses.py:init_train_state": 3,  # the key split and its unstacking; the optimizer state's zeros
    "models/utils.py:init_inputs": 4,  # the dummy inputs (casts, broadcasts)
    "score_sde/train_programs.py:_compile_init": 1,  # jit(model.init), compiled in a worker thread
    "sde_lib.py:__init__": 4,  # the VP SDE's discrete tables (linspace, 1 - beta, cumprod, sqrt)
    "score_sde/parallel.py:fold_in_process": 2,  # fold the process index into the key
    "score_sde/parallel.py:split_per_device": 2,  # split the key: the carry key and the per-device keys
}
EVAL_HELPERS = {
    "run_lib.py:evaluate": 3,  # PRNGKey(config.seed + 1) and its split
    "score_sde/eval_job.py:_meta_key": 1,  # the stored key as an array
    "score_sde/parallel.py:fold_in_process": 2,
    "score_sde/parallel.py:split_per_device": 2,
    "sde_lib.py:__init__": 4,
}


def _config():
    """The tiny digits run of test_train, crossing each boundary at least twice in 12 steps.

    Logs at 2, 4, ..., 12; eval loss and preemption checkpoints at 4, 8, 12; numbered checkpoints
    (1 and 2) with snapshot samples at 8 and at the end, 12.
    """
    c = tiny_config()
    c.training.n_iters = 12
    c.training.log_freq = 2
    c.training.eval_freq = 4
    c.training.snapshot_freq_for_preemption = 4
    c.training.snapshot_freq = 8
    c.training.snapshot_sampling = True
    c.eval.begin_ckpt, c.eval.end_ckpt = 1, 2
    c.eval.batch_size = 148  # the test split's 297 digits: 2 batches per checkpoint
    c.eval.enable_bpd = False
    c.eval.enable_sampling = False
    return c


def test_training_and_eval_compile_each_program_once(tmp_path):
    config = _config()
    workdir = tmp_path / "workdir"
    with counting_compiles() as compiles:
        run_lib.train(config, str(workdir))
    assert sorted(os.listdir(workdir / "samples")) == ["iter_12.npy", "iter_12.png", "iter_8.npy", "iter_8.png"]
    counts = _check(compiles, TRAIN_PROGRAMS, TRAIN_HELPERS)
    assert not [c for c in compiles if any("p_train_step(" in line for line in c.calls)], _listing(compiles)
    assert sum(counts.values()) <= len(TRAIN_PROGRAMS) + sum(TRAIN_HELPERS.values())

    with counting_compiles() as compiles:
        summary = run_lib.evaluate(config, str(workdir))
    assert sorted(summary["checkpoints"]) == ["1", "2"]
    _check(compiles, EVAL_PROGRAMS, EVAL_HELPERS)


def test_training_batches_never_shrink():
    """The train and eval-loss pipelines repeat before batching and drop remainders: one batch shape only.

    40 batches of 8 go past the end of the 297-digit test split, which 8 does not divide.
    """
    config = tiny_config()
    train_ds, eval_ds, _ = datasets.get_dataset(config, additional_dim=config.training.n_jitted_steps)
    for ds in (train_ds, eval_ds):
        shapes = {tuple(np.shape(example["image"])) for example in ds.take(40).as_numpy_iterator()}
        assert shapes == {(1, 1, 8, 8, 8, 1)}, shapes


UNREPLICATE_SCRIPT = """
import json, jax, numpy as np
from score_sde import parallel
compiles = []
step = parallel.pmap(lambda t: jax.tree_util.tree_map(lambda x: x * 2, t))
tree = step(parallel.replicate({"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "step": np.int32(4)}))
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: compiles.append(kw.get("fun_name")) if event == "%s" else None)
host = parallel.unreplicate_to_host(tree)
print(json.dumps({"devices": jax.local_device_count(), "compiles": compiles, "types": [type(x).__name__ for x in
                  jax.tree_util.tree_leaves(host)], "w": host["w"].tolist(), "step": int(host["step"]),
                  "dtypes": [str(x.dtype) for x in jax.tree_util.tree_leaves(host)]}))
""" % COMPILE_EVENT


def test_unreplicate_to_host_compiles_nothing_on_two_devices():
    """One replica on the host, the device axis removed, dtypes kept, and no program compiled."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "-c", UNREPLICATE_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2
    assert result["compiles"] == []
    assert result["types"] == ["ndarray", "ndarray"] and result["dtypes"] == ["int32", "float32"]
    assert result["step"] == 8 and result["w"] == [[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]]


def _print_audit(title: str, compiles: list[Compile]) -> None:
    print(f"\n{title}: {len(compiles)} compilation(s)")
    for (name, site), n in collections.Counter((c.name, c.site) for c in compiles).items():
        print(f"  {n:3d}  {name:28s} {site}")


def main() -> None:
    """Print what each job compiles (docs/performance.md): ``python -m tests.test_compile_count``.

    The training run and loss evaluation of the test; bits/dim over the 5 rounds of checkpoint 2
    (one batch of 296 test digits, rtol = atol = 1e-3); ``--mode sample`` with DDIM (3 batches).
    """
    import tempfile  # noqa: PLC0415

    config = _config()
    with tempfile.TemporaryDirectory() as root:
        workdir = os.path.join(root, "workdir")
        for title, job in (("train", lambda: run_lib.train(config, workdir)),
                           ("eval: loss, checkpoints 1-2", lambda: run_lib.evaluate(config, workdir))):
            with counting_compiles() as compiles:
                job()
            _print_audit(title, compiles)
        bpd = _config()
        bpd.eval.begin_ckpt, bpd.eval.enable_loss, bpd.eval.enable_bpd, bpd.eval.batch_size = 2, False, True, 296
        bpd.sampling.ode_rtol = bpd.sampling.ode_atol = 1e-3
        with counting_compiles() as compiles:
            run_lib.evaluate(bpd, workdir, eval_folder="eval_bpd")
        _print_audit("eval: bits/dim, 5 rounds of checkpoint 2", compiles)
        sample = _config()
        sample.eval.batch_size, sample.sampling.num_samples = 4, 10
        sample.sampling.method, sample.sampling.steps = "ddim", 3
        with counting_compiles() as compiles:
            run_lib.sample(sample, workdir)
        _print_audit("sample: DDIM, 3 batches of 4, and the reverse-process GIF", compiles)


if __name__ == "__main__":
    main()
