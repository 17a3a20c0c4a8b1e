"""--mode train_deq (score_sde/dequantizer_train.py) and bits/dim under the dequantiser in --mode eval."""
from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

import likelihood
import run_lib
from score_sde import checkpoints
from score_sde.dequantizer_train import DEQ_FOLDER, DequantizerError
from test_train import tiny_config

# A small dequantiser; the score model is test_train's tiny digits DDPM++. No eval step during training (one
# program less to compile).
DEQ = {"deq.filters": 8, "deq.components": 4, "deq.blocks": 1, "deq.attn_heads": 2, "deq.n_iters": 2,
       "training.snapshot_freq": 2, "training.snapshot_freq_for_preemption": 2, "training.eval_freq": 1000,
       "training.log_freq": 1, "training.n_iters": 2}


def deq_config(**overrides):
    config = tiny_config()
    for key, value in {**DEQ, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
        section, field = key.split(".")
        setattr(config[section], field, value)
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir with a 2-step score model (checkpoint_1) and a 2-step dequantiser."""
    path = tmp_path_factory.mktemp("train_deq") / "workdir"
    run_lib.train(deq_config(), str(path))
    state = run_lib.train_deq(deq_config(), str(path))
    assert int(state.step) == 2
    return path


def test_train_deq_without_a_score_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(DequantizerError, match=r"has no numbered checkpoint.*--mode train"):
        run_lib.train_deq(deq_config(), str(tmp_path))
    with pytest.raises(DequantizerError, match=r"checkpoint_7.*config.deq.score_ckpt"):
        run_lib.train_deq(deq_config(deq__score_ckpt=7), str(tmp_path))


def test_train_deq_writes_checkpoints_and_resumes(workdir, tmp_path, caplog):
    """Resumed at step 2, the dequantiser ends at step 4 exactly as one trained 4 steps in one go."""
    deq_dir = workdir / DEQ_FOLDER
    first = checkpoints.latest_checkpoint(str(deq_dir / "checkpoints"))
    assert first is not None and checkpoints.checkpoint_step(first) == 2
    one_go_workdir = tmp_path / "one_go"
    shutil.copytree(workdir, one_go_workdir, ignore=shutil.ignore_patterns(DEQ_FOLDER))
    one_go = run_lib.train_deq(deq_config(deq__n_iters=4), str(one_go_workdir))
    with caplog.at_level("INFO"):
        state = run_lib.train_deq(deq_config(deq__n_iters=4), str(workdir))
    assert int(state.step) == int(one_go.step) == 4
    # (``rng`` aside: the returned State carries the key it was initialised or restored with, not the loop's.)
    for resumed, uninterrupted in zip(jax.tree_util.tree_leaves(state.replace(rng=None)),
                                      jax.tree_util.tree_leaves(one_go.replace(rng=None))):
        np.testing.assert_array_equal(np.asarray(resumed), np.asarray(uninterrupted))
    assert any("from step 2 of 4" in r.getMessage() for r in caplog.records)
    assert checkpoints.checkpoint_step(checkpoints.latest_checkpoint(str(deq_dir / "checkpoints"))) == 4
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state.params))
    history = (deq_dir / run_lib.CONFIG_HISTORY).read_text().splitlines()
    assert len(history) == 2 and '"deq.n_iters": [2, 4]' in history[1]  # first run, then the longer resume


def test_train_deq_refuses_to_resume_with_another_dequantizer(workdir):
    """As --mode train: the dequantiser's checkpoints are not resumed under another network (nothing is run)."""
    with pytest.raises(run_lib.WorkdirConfigError, match=r"deq.filters: 8 -> 16"):
        run_lib.train_deq(deq_config(deq__filters=16, deq__n_iters=4), str(workdir))


def test_eval_bpd_under_the_dequantizer(workdir, monkeypatch):
    """The eval job adds log2 q(u|x) / D to the bits/dim of (x + u) / 256, u from the trained dequantiser."""
    seen = []

    def stand_in_likelihood_fn(*args, **kwargs):
        # The ODE is tested elsewhere; a cheap stand-in (bits/dim 0) isolates what the dequantiser adds.
        def fn(keys, pstate, data):
            seen.append(np.asarray(data))
            return np.zeros(data.shape[:2]), 0
        return fn

    monkeypatch.setattr(likelihood, "get_likelihood_fn", stand_in_likelihood_fn)
    results = {}
    for deq in (False, True):
        config = deq_config()
        config.eval.update(begin_ckpt=1, end_ckpt=1, enable_loss=False, enable_bpd=True, enable_sampling=False,
                           batch_size=296, dequantizer=deq)
        seen.clear()
        run_lib.evaluate(config, str(workdir), eval_folder=f"eval_deq{int(deq)}")
        files = sorted((workdir / f"eval_deq{int(deq)}").glob("test_ckpt_1_bpd_*.npz"))
        results[deq] = np.concatenate([np.load(p)["arr_0"] for p in files]), np.concatenate(seen)
    uniform_bpd, uniform_data = results[False]
    deq_bpd, deq_data = results[True]
    np.testing.assert_array_equal(uniform_bpd, 0.0)
    assert np.all(np.isfinite(deq_bpd)) and np.std(deq_bpd) > 0
    # The model inputs are dequantised by q, not by the uniform noise: the same images, other noise.
    assert deq_data.shape == uniform_data.shape and not np.allclose(deq_data, uniform_data)
    # Still (x + u) / 256 scaled to the model's range with u in (0, 1): rounding recovers x.
    pixels = (deq_data + 1) / 2 * 256 if deq_data.min() < 0 else deq_data * 256
    assert np.all(np.floor(pixels) <= 255)


def test_eval_without_a_trained_dequantizer_says_what_to_do(tmp_path):
    path = tmp_path / "workdir"
    run_lib.train(deq_config(), str(path))
    config = deq_config()
    config.eval.update(begin_ckpt=1, end_ckpt=1, enable_loss=False, enable_bpd=True, enable_sampling=False,
                       batch_size=296, dequantizer=True)
    with pytest.raises(DequantizerError, match="--mode train_deq"):
        run_lib.evaluate(config, str(path))


def test_train_deq_through_main_without_a_score_model(tmp_path):
    from test_main import _main

    result = _main("--config", "configs/vp/digits.py", "--workdir", str(tmp_path), "--mode", "train_deq")
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: The dequantiser is trained against a trained score model") and "--mode train" in last
