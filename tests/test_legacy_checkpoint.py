"""Checkpoints of the original code (flax.optim.Adam layout, flax 0.3.1 GroupNorm shapes) restore into our State."""
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models.utils import State
from score_sde import legacy_checkpoint

LEGACY_FILE = "legacy_checkpoint/checkpoints/checkpoint_26"


def _template(params, tx=None):
    tx = tx or optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8), optax.add_decayed_weights(0.0))
    return State(step=0, params=params, opt_state=tx.init(params), lr=2e-4, model_state={}, ema_rate=0.999,
                 params_ema=params, rng=jax.random.PRNGKey(0))


def _legacy(params, step=7):
    """A dict in the original's layout with distinct values in every slot."""
    shift = lambda c: jax.tree_util.tree_map(lambda x: np.asarray(x) + c, params)  # noqa: E731
    moments = jax.tree_util.tree_map(lambda x: {"grad_ema": np.asarray(x) + 2.0, "grad_sq_ema": np.asarray(x) + 3.0},
                                     params)
    return {"step": np.asarray(step), "lr": np.asarray(1e-3, np.float32), "model_state": {},
            "ema_rate": np.asarray(0.9999, np.float32), "rng": np.asarray([0, 42], np.uint32),
            "params_ema": shift(1.0),
            "optimizer": {"target": shift(0.0), "state": {"step": np.asarray(step), "param_states": moments}}}


def test_detects_layout():
    params = {"Dense_0": {"kernel": np.ones((2, 3), np.float32)}}
    assert legacy_checkpoint.is_legacy_state_dict(_legacy(params))
    ours = flax.serialization.to_state_dict(_template(params))
    assert not legacy_checkpoint.is_legacy_state_dict(ours)
    assert not legacy_checkpoint.is_legacy_state_dict([1, 2])


def test_groupnorm_reshaped_and_moments_carried():
    c = 4
    ours = {"GroupNorm_0": {"scale": np.arange(c, dtype=np.float32), "bias": np.zeros(c, np.float32)},
            "Conv_0": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 2, 2, 3)}}
    old_layout = {"GroupNorm_0": {k: v.reshape(1, 1, 1, c) for k, v in ours["GroupNorm_0"].items()},
                  "Conv_0": ours["Conv_0"]}
    raw = _legacy(old_layout, step=12)
    state = legacy_checkpoint.state_from_legacy(raw, _template(jax.tree_util.tree_map(np.zeros_like, ours)))
    assert state.step == 12 and isinstance(state.step, int)
    np.testing.assert_array_equal(state.params["GroupNorm_0"]["scale"], ours["GroupNorm_0"]["scale"])
    assert state.params["GroupNorm_0"]["bias"].shape == (c,)
    np.testing.assert_array_equal(state.params_ema["Conv_0"]["kernel"], ours["Conv_0"]["kernel"] + 1.0)
    adam = state.opt_state[0]
    assert isinstance(adam, optax.ScaleByAdamState) and int(adam.count) == 12
    np.testing.assert_array_equal(adam.mu["GroupNorm_0"]["scale"], ours["GroupNorm_0"]["scale"] + 2.0)
    np.testing.assert_array_equal(adam.nu["Conv_0"]["kernel"], ours["Conv_0"]["kernel"] + 3.0)
    np.testing.assert_array_equal(state.rng, np.asarray([0, 42], np.uint32))
    assert state.lr == pytest.approx(1e-3) and state.ema_rate == pytest.approx(0.9999)


def test_optimizer_step_continues_like_flax_adam():
    """One optax step from the carried moments equals flax.optim.Adam's update formula."""
    p = {"w": np.array([0.5, -1.0], np.float32)}
    raw = _legacy(p, step=3)
    raw["optimizer"]["state"]["param_states"] = {"w": {"grad_ema": np.array([0.1, 0.2], np.float32),
                                                       "grad_sq_ema": np.array([0.01, 0.03], np.float32)}}
    tx = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)
    state = legacy_checkpoint.state_from_legacy(raw, _template({"w": np.zeros(2, np.float32)}, tx))
    g = np.array([0.3, -0.4], np.float32)
    updates, _ = tx.update({"w": jnp.asarray(g)}, state.opt_state)
    m = 0.9 * np.array([0.1, 0.2]) + 0.1 * g
    v = 0.999 * np.array([0.01, 0.03]) + 0.001 * g ** 2
    t = 4  # flax.optim.Adam: t = state.step + 1
    expected = (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)


def test_shape_mismatch_names_parameter():
    raw = _legacy({"Conv_0": {"kernel": np.ones((3, 3, 2, 8), np.float32)}})
    with pytest.raises(ValueError, match=r"Conv_0/kernel.*\(3, 3, 2, 8\).*\(3, 3, 2, 4\)"):
        legacy_checkpoint.state_from_legacy(raw, _template({"Conv_0": {"kernel": np.ones((3, 3, 2, 4), np.float32)}}))
    # (1, 1, 1, C) only converts to (C,), not to another C.
    raw = _legacy({"GroupNorm_0": {"scale": np.ones((1, 1, 1, 8), np.float32)}})
    with pytest.raises(ValueError, match="GroupNorm_0/scale"):
        legacy_checkpoint.state_from_legacy(raw, _template({"GroupNorm_0": {"scale": np.ones(4, np.float32)}}))


def test_missing_parameter_named():
    raw = _legacy({"Dense_0": {"kernel": np.ones((2, 2), np.float32)}})
    template = _template({"Dense_0": {"kernel": np.ones((2, 2), np.float32)}, "Dense_1": {"bias": np.ones(2)}})
    with pytest.raises(ValueError, match="Dense_1/bias"):
        legacy_checkpoint.state_from_legacy(raw, template)


def test_golden_file_structure(golden_dir):
    """The stored file has the layout this module expects (msgpack only, no pickle)."""
    raw = flax.serialization.msgpack_restore((golden_dir / LEGACY_FILE).read_bytes())
    assert legacy_checkpoint.is_legacy_state_dict(raw)
    assert int(raw["step"]) == 260000


def _golden_config(golden_dir, case="ddpmpp_vp_cont"):
    """The shrunk config of a models.json case applied field by field to its base config."""
    import importlib
    import json

    spec = json.loads((golden_dir / "models.json").read_text())[case]
    config = importlib.import_module("configs." + spec["base_config"].replace("/", ".")).get_config()
    for section, fields in spec["config"].items():
        if isinstance(fields, dict):
            for key, value in fields.items():
                setattr(config[section], key, value)
        else:
            setattr(config, section, fields)
    return config


def test_golden_checkpoint_restores_and_scores(golden_dir):
    """Through the eval path (run_lib.evaluate's template and restore): step 260000, and params_ema /
    params reproduce the original's scores."""
    import run_lib
    import sde_lib
    from models import utils as mutils
    from score_sde import eval_checks

    config = _golden_config(golden_dir)
    model, template = run_lib.eval_state_template(config, jax.random.PRNGKey(0))
    state = eval_checks.wait_and_restore(str(golden_dir / "legacy_checkpoint" / "checkpoints"), 26, template)
    assert int(state.step) == 260000
    assert int(state.opt_state[0].count) == 260000
    assert state.ema_rate == pytest.approx(0.9999)
    raw = flax.serialization.msgpack_restore((golden_dir / LEGACY_FILE).read_bytes())
    np.testing.assert_array_equal(
        state.opt_state[0].nu["AttnBlockpp_0"]["GroupNorm_0"]["scale"],
        raw["optimizer"]["state"]["param_states"]["AttnBlockpp_0"]["GroupNorm_0"]["scale"]["grad_sq_ema"].reshape(-1))
    expected = np.load(golden_dir / "legacy_checkpoint" / "expected.npz")
    sde = sde_lib.VPSDE(0.1, 20.0, 1000)
    for params, key in ((state.params_ema, "score_params_ema"), (state.params, "score_params")):
        score_fn = jax.jit(mutils.get_score_fn(sde, model, params, state.model_state, train=False, continuous=True))
        score = np.asarray(score_fn(jnp.asarray(expected["x"]), jnp.asarray(expected["t"])))
        scale = np.abs(expected[key]).max()
        np.testing.assert_allclose(score, expected[key], rtol=1e-4, atol=1e-5 * scale)


def test_score_flow_dequantizer_checkpoint_restores(tmp_path):
    """score_flow's ``DeqState`` file (no ``model_state``; running bits/dim, not carried) restores through
    ``checkpoints.restore_checkpoint`` into our dequantiser state, every value in its place."""
    from configs.vp import digits
    from score_sde import checkpoints, dequantizer_train

    config = digits.get_config()
    template = dequantizer_train.state_template(config)
    params = jax.tree_util.tree_map(lambda x: np.arange(x.size, dtype=np.float32).reshape(x.shape) / x.size,
                                    template.params)
    raw = _legacy(params, step=5)
    del raw["model_state"]
    raw.update(ema_train_bpd=np.asarray(3.1, np.float32), ema_eval_bpd=np.asarray(3.2, np.float32))
    path = tmp_path / "checkpoint_5"
    path.write_bytes(flax.serialization.msgpack_serialize(raw))
    state = checkpoints.restore_checkpoint(str(path), template)
    assert state.step == 5 and state.model_state == {}
    leaves = jax.tree_util.tree_leaves_with_path(params)
    assert len(leaves) > 50  # the whole Flow++ tree, not a stub
    for key_path, value in leaves:
        name = jax.tree_util.keystr(key_path)
        ema = state.params_ema
        for key in key_path:
            ema = ema[key.key]
        np.testing.assert_array_equal(ema, value + 1.0, err_msg=name)
    for moment, expected in zip(jax.tree_util.tree_leaves(state.opt_state[0].nu), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(moment, expected + 3.0)
