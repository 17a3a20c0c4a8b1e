"""score_sde/train_programs.py: the init and train step compiled in worker threads, started early only where safe.

That the train step so compiled is the one the run calls (nothing compiled at its first call) is checked by
tests/test_compile_count.py over a whole training run.
"""
from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest

import losses
import run_lib
from configs.vp import cifar10_ddpmpp_continuous
from score_sde import checkpoints, train_programs
from score_sde.workdir_config import save_config
from tests.test_compile_count import counting_compiles
from tests.test_train import tiny_config


def test_initial_state_is_the_plain_initialisation_and_the_batch_shape_the_pipelines(tmp_path):
    config = tiny_config(training__n_jitted_steps=2)
    programs = train_programs.start_before_data(config, str(tmp_path / "new"))
    assert isinstance(programs, train_programs.TrainPrograms)
    rng = jax.random.PRNGKey(config.seed + 3)
    state = programs.initial_state(rng)
    expected = losses.init_train_state(rng, config)[1]
    leaves, tree = jax.tree_util.tree_flatten(state)
    expected_leaves, expected_tree = jax.tree_util.tree_flatten(expected)
    assert tree == expected_tree
    for leaf, expected_leaf in zip(leaves, expected_leaves):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected_leaf))
    assert callable(programs.train_step())
    # (local devices, fused steps, per-device batch, H, W, C), as datasets.get_dataset batches the train split.
    assert train_programs.batch_shape(config) == (1, 2, config.training.batch_size, 8, 8, 1)


def test_no_early_start_where_the_job_must_stop_first(tmp_path):
    # Data that may be missing: the job checks them before it builds anything.
    assert train_programs.start_before_data(cifar10_ddpmpp_continuous.get_config(), str(tmp_path / "c10")) is None
    # A workdir whose checkpoints were trained with another config: run_lib.train refuses it.
    workdir = tmp_path / "other"
    workdir.mkdir()
    save_config(tiny_config(model__nf=16), str(workdir))
    checkpoints.save_checkpoint(str(workdir / "checkpoints-meta"), {"step": 2}, step=1)
    assert train_programs.start_before_data(tiny_config(), str(workdir)) is None
    # A workdir that cannot be created (its parent is a file).
    (tmp_path / "file").write_text("")
    assert train_programs.start_before_data(tiny_config(), str(tmp_path / "file" / "w")) is None


def test_run_lib_compiles_no_train_step_when_the_checkpoint_is_damaged(tmp_path, monkeypatch):
    """The train step starts compiling only after the State is restored: a job stopped by a damaged checkpoint
    does not wait for a compilation it will never use (a worker's compilation cannot be cancelled)."""
    started = []
    start = train_programs.TrainPrograms.start_train_step
    monkeypatch.setattr(train_programs.TrainPrograms, "start_train_step",
                        lambda self: started.append(True) or start(self))
    workdir = tmp_path / "run"
    path = pathlib.Path(checkpoints.save_checkpoint(str(workdir / "checkpoints-meta"), {"step": 2}, step=1))
    path.write_bytes(path.read_bytes()[:10])
    with counting_compiles() as compiles, pytest.raises(checkpoints.CorruptCheckpointError):
        run_lib.train(tiny_config(), str(workdir))
    assert started == []
    # Resuming restores into a State of zeros: the init is not compiled either.
    assert [c.name for c in compiles if c.name == "jit(init)"] == []


def test_a_resumed_run_never_compiles_the_init(tmp_path):
    """Every value of a resumed State comes from its checkpoint, so the run restores into zeros of the State's
    shapes and neither compiles nor runs the model's initialisation; it goes on from the checkpoint's step."""
    workdir = str(tmp_path / "run")
    config = tiny_config(training__n_iters=2, training__snapshot_freq_for_preemption=2)
    first = run_lib.train(config, workdir)
    config.training.n_iters = 4
    with counting_compiles() as compiles:
        programs = train_programs.start_before_data(config, workdir)
        resumed = run_lib.train(config, workdir, programs=programs)
    names = [c.name for c in compiles]
    assert "jit(init)" not in names, names
    assert int(resumed.step) == 4 and int(first.step) == 2
