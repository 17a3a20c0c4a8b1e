"""The likelihood bound in ``--mode eval`` (``config.eval.enable_bound``) on a tiny digits checkpoint.

The checkpoint is a freshly initialised tiny DDPM++ (test_train's) with ``params_ema`` moved off
the initial values, written without training: the bound's numbers need a score model, not a good one.
"""
import json
import logging

import jax
import numpy as np
import pytest

import bound_likelihood
import likelihood
import losses
import run_lib
import sde_lib
from score_sde import checkpoints, datasets, eval_job, eval_records, parallel

NUM_TIMES = 3
ROUNDS = 10  # 297 test digits, batch 148: 2 batches x 5 repeats


def _config(tmp_root):
    from test_eval_job import _tiny_digits_config

    config = _tiny_digits_config(tmp_root)
    config.eval.enable_loss = False
    config.eval.enable_bpd = False
    config.eval.enable_bound = True
    config.eval.bound_num_times = NUM_TIMES
    config.training.smallest_time = 1e-3  # not the bound function's default eps, so a dropped eps shows
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """``checkpoint_2`` of the tiny digits model, its ``params_ema`` perturbed (the output layer starts at 0)."""
    root = tmp_path_factory.mktemp("eval_bound")
    config = _config(root)
    _, state = losses.init_train_state(jax.random.PRNGKey(0), config)
    leaves, tree = jax.tree_util.tree_flatten(state.params_ema)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params_ema = tree.unflatten([x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    checkpoints.save_checkpoint(str(root / "workdir" / "checkpoints"), state.replace(params_ema=params_ema), step=2)
    return root / "workdir"


def _direct_bound(config, workdir, bound_round, keys_before):
    """Bound round ``bound_round`` recomputed with ``get_likelihood_bound_fn`` on the same batch and keys.

    ``keys_before``: per-device key splits the evaluation made before this round (one per earlier round).
    """
    seed, per_batch = config.seed, config.eval.batch_size
    repeat, batch_id = divmod(bound_round, 2)
    images = eval_job.eval_images(config, "test")
    order = np.random.default_rng([seed, repeat]).permutation(len(images))
    batch = images[order[batch_id * per_batch:(batch_id + 1) * per_batch]].astype(np.float32) / 255.0
    noise = np.random.default_rng([seed, 1, repeat, batch_id]).random(batch.shape, dtype=np.float32)
    batch = datasets.get_data_scaler(config)((noise + batch * 255.0) / 256.0)[None]
    rng = jax.random.fold_in(jax.random.split(jax.random.PRNGKey(seed + 1))[0], 0)
    for _ in range(keys_before + 1):
        rng, keys = parallel.split_per_device(rng)
    model, template = run_lib.eval_state_template(config, jax.random.PRNGKey(0))
    state = checkpoints.restore_checkpoint(str(workdir / "checkpoints" / "checkpoint_2"), template)
    sde, _ = sde_lib.get_sde(config)
    bound_fn = bound_likelihood.get_likelihood_bound_fn(
        sde, model, datasets.get_data_inverse_scaler(config), dsm=True, eps=1e-3, N=NUM_TIMES,
        importance_weighting=True, eps_offset=True)
    bpd, nfe = bound_fn(keys, parallel.replicate(state), batch)
    assert nfe == NUM_TIMES + 1
    return np.asarray(bpd).reshape(-1)


def _bound_files(eval_dir):
    return [eval_records.read_npz(eval_dir / f"test_ckpt_2_bound_{r}.npz")["arr_0"] for r in range(ROUNDS)]


def test_bound_rounds_equal_the_bound_function_and_are_summarised(workdir, tmp_path):
    config = _config(tmp_path)
    summary = run_lib.evaluate(config, str(workdir), "eval_straight")
    eval_dir = workdir / "eval_straight"
    bounds = _bound_files(eval_dir)
    assert all(b.shape == (148,) for b in bounds)
    assert not list(eval_dir.glob("test_ckpt_2_bpd_*.npz"))  # the ODE bits/dim are off
    np.testing.assert_allclose(bounds[3], _direct_bound(config, workdir, 3, keys_before=3), rtol=1e-6)
    values = np.concatenate(bounds)
    row = summary["checkpoints"]["2"]
    assert row["bound bits/dim (test)"] == pytest.approx(values.mean(), rel=1e-6)
    assert row["bound bits/dim std. error"] == pytest.approx(values.std(ddof=1) / np.sqrt(values.size), rel=1e-6)
    assert row["bound bits/dim evaluations"] == ROUNDS * 148
    assert json.loads((eval_dir / "summary.json").read_text())["checkpoints"]["2"] == row
    assert "bound bits/dim std. error" in (eval_dir / "summary.md").read_text()
    settings = json.loads((eval_dir / "settings.json").read_text())
    assert settings["eval.bound_num_times"] == NUM_TIMES and settings["training.smallest_time"] == 1e-3


class _Interrupted(Exception):
    pass


def _stand_in_ode_bpd(*args, **kwargs):
    """A cheap stand-in for the ODE bits/dim (tested in test_eval_job): per-example mean of the data."""
    return lambda keys, pstate, data: (data.mean(axis=(2, 3, 4)), 0)


def test_bound_resumes_at_the_next_round(workdir, tmp_path, monkeypatch, caplog):
    """Stopped after 4 bound rounds (beside the bits/dim); the rerun does the rest and equals a straight run."""
    config = _config(tmp_path)
    config.eval.enable_bpd = True
    monkeypatch.setattr(likelihood, "get_likelihood_fn", _stand_in_ode_bpd)
    eval_dir = workdir / "eval_resumed"
    real_bpd_batch = eval_job._bpd_batch
    calls = []

    def stop_at_bound_round_4(job, bpd_round):
        calls.append(bpd_round)
        if len(calls) == ROUNDS + 5:  # 10 bits/dim rounds, then bound rounds 0..3 done
            raise _Interrupted
        return real_bpd_batch(job, bpd_round)

    monkeypatch.setattr(eval_job, "_bpd_batch", stop_at_bound_round_4)
    with pytest.raises(_Interrupted):
        run_lib.evaluate(config, str(workdir), "eval_resumed")
    meta = json.loads((eval_dir / "meta_0.json").read_text())
    assert (meta["bpd_rounds_done"], meta["bound_rounds_done"]) == (ROUNDS, 4)
    written = {r: (eval_dir / f"test_ckpt_2_bound_{r}.npz").stat().st_mtime_ns for r in range(4)}
    assert not (eval_dir / "test_ckpt_2_bound_4.npz").exists()

    # Another number of Monte-Carlo times would mix two estimators in one mean: refused before any work.
    other = config.copy_and_resolve_references()
    other.eval.bound_num_times = NUM_TIMES + 1
    with pytest.raises(run_lib.EvaluationError, match="eval.bound_num_times: 3 -> 4"):
        run_lib.evaluate(other, str(workdir), "eval_resumed")

    monkeypatch.setattr(eval_job, "_bpd_batch", real_bpd_batch)
    with caplog.at_level(logging.INFO):
        summary = run_lib.evaluate(config, str(workdir), "eval_resumed")
    assert f"bits/dim rounds done: {ROUNDS}, bound rounds done: 4" in caplog.text
    assert all((eval_dir / f"test_ckpt_2_bound_{r}.npz").stat().st_mtime_ns == t for r, t in written.items())
    assert not (eval_dir / "meta_0.json").exists()
    # The keys continue after the bits/dim rounds' keys: round 7 after 10 + 7 earlier rounds.
    direct = _direct_bound(config, workdir, 7, keys_before=ROUNDS + 7)
    np.testing.assert_allclose(_bound_files(eval_dir)[7], direct, rtol=1e-6)
    row = summary["checkpoints"]["2"]
    assert row["bits/dim evaluations"] == row["bound bits/dim evaluations"] == ROUNDS * 148
    straight = run_lib.evaluate(config, str(workdir), "eval_both_straight")["checkpoints"]["2"]
    assert straight == row
    for a, b in zip(_bound_files(eval_dir), _bound_files(workdir / "eval_both_straight")):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sde_name, importance", [("vpsde", True), ("subvpsde", True), ("vesde", False)])
def test_bound_settings_from_the_config(monkeypatch, tmp_path, sde_name, importance):
    """score_flow's choices: importance-sampled time on VP / sub-VP, uniform on VE; eval.dsm / offset; smallest_time."""
    config = _config(tmp_path)
    config.training.sde = sde_name
    config.eval.dsm = False
    config.eval.offset = False
    seen = {}
    monkeypatch.setattr(bound_likelihood, "get_likelihood_bound_fn", lambda *a, **kw: seen.update(kw))
    eval_job.likelihood_bound_fn(config, sde_lib.get_sde(config)[0], None, None)
    assert seen == {"dsm": False, "eps": 1e-3, "N": NUM_TIMES, "importance_weighting": importance,
                    "eps_offset": False}


@pytest.mark.parametrize("field, value, message", [
    ("bound", True, "config.eval.bound = True is score_flow's switch and is not read here: set config.eval.enable_bound"),
    ("bound_num_times", 0, "config.eval.bound_num_times = 0; use a positive integer"),
])
def test_bad_bound_fields_fail_before_anything(tmp_path, field, value, message):
    config = _config(tmp_path)
    setattr(config.eval, field, value)
    with pytest.raises(run_lib.EvaluationError, match=message):
        run_lib.evaluate(config, str(tmp_path / "no_checkpoints_here"))
    assert not (tmp_path / "no_checkpoints_here").exists()
