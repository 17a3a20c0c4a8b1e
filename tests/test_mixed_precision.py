"""``config.model.dtype = 'bfloat16'``: the network computes in bfloat16 on float32 parameters.

* On the golden cases of the original code (``tests/golden/model_*.npz``), the bfloat16 score stays within
  ``BF16_RTOL`` of the original's float32 score, relative to its largest magnitude (the golden criterion
  of ``tests/helpers.assert_close_scaled`` with a bfloat16-sized tolerance: 8 significant bits, ~0.4% per
  rounding, accumulated over ~30 layers).
* Convolutions, dense layers and attention products run in bfloat16; the output is float32.
* Parameters, their gradients and the optimizer state are float32.
* ``models.utils.float32_model`` (what samplers and bits/dim use) computes in float32 again.
"""
from __future__ import annotations

import json

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import losses
from models import utils as mutils
from score_sde.config_checks import validate_config
from tests.helpers import assert_close_scaled, make_sde
from tests.test_models import _sde_for, unflatten_variables

# Measured: 0.9% (NCSN++ VE) to 2.8% (DDPM) of max |score| on the five golden cases (docs/performance.md).
BF16_RTOL = 5e-2


def golden_case(golden_dir, case: str, dtype: str):
    info = json.loads((golden_dir / "models.json").read_text())[case]
    config = ml_collections.ConfigDict(info["config"])
    config.model.dtype = dtype
    return info, config, np.load(golden_dir / f"model_{case}.npz")


def golden_score(golden_dir, case: str, dtype: str, float32_model: bool = False):
    """``(our score, the original's float32 score)`` on ``case``'s golden inputs with ``model.dtype = dtype``."""
    info, config, data = golden_case(golden_dir, case, dtype)
    model = mutils.create_model(config)
    if float32_model:
        model = mutils.float32_model(model)
    score_fn = mutils.get_score_fn(_sde_for(info, config), model, unflatten_variables(data)["params"], {},
                                   train=False, continuous=info["continuous"])
    return jax.jit(score_fn)(jnp.asarray(data["x"]), jnp.asarray(data["t"])), data["score"]


# NCSN++ (VE, Fourier, BigGAN blocks, FIR), DDPM++ (VP) and DDPM: each compiles one bfloat16 network.
@pytest.mark.parametrize("case", ["ncsnpp_ve_cont", "ddpmpp_vp_cont", "ddpm_vp"])
def test_bfloat16_score_is_close_to_the_original(golden_dir, case):
    score, expected = golden_score(golden_dir, case, "bfloat16")
    assert score.dtype == jnp.float32
    assert_close_scaled(score, expected, rtol=BF16_RTOL)


def test_float32_model_of_a_bfloat16_config_matches_the_original(golden_dir):
    # What samplers and bits/dim use: the same parameters evaluated in float32, to the original's tolerance.
    assert_close_scaled(*golden_score(golden_dir, "ddpm_vp", "bfloat16", float32_model=True))


def _primitive_dtypes(jaxpr, names: tuple) -> list:
    """The operand dtypes of every equation named in ``names``, nested calls included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _primitive_dtypes(sub, names)
    return found


@pytest.mark.parametrize("case", ["ncsnpp_ve_outputskip", "ddpmpp_vp_cont", "ddpm_vp"])
def test_bfloat16_network_computes_in_bfloat16_on_float32_parameters(golden_dir, case):
    _, config, data = golden_case(golden_dir, case, "bfloat16")
    model = mutils.create_model(config)
    x, cond = jnp.asarray(data["x"]), jnp.asarray(data["cond"])
    params = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, x, cond, train=False))["params"]
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}

    closed = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, cond, train=False))(params)
    assert closed.out_avals[0].dtype == jnp.float32
    products = _primitive_dtypes(closed.jaxpr, ("conv_general_dilated", "dot_general"))
    assert products and all(dtypes == ("bfloat16", "bfloat16") for dtypes in products), products


def test_bfloat16_training_keeps_float32_gradients_and_optimizer_state(golden_dir):
    _, config, data = golden_case(golden_dir, "ddpmpp_vp_cont", "bfloat16")
    state = jax.eval_shape(lambda: losses.init_train_state(jax.random.PRNGKey(0), config)[1])
    loss_fn = losses.get_sde_loss_fn(make_sde("vpsde"), mutils.create_model(config), train=True)
    batch = {"image": jnp.asarray(data["x"])}
    loss, grad = jax.eval_shape(jax.value_and_grad(lambda p: loss_fn(jax.random.PRNGKey(0), p, {}, batch)[0]),
                                state.params)
    float32 = jnp.dtype(jnp.float32)
    assert loss.dtype == float32
    for tree in (state.params, state.params_ema, state.opt_state, grad):
        floats = {leaf.dtype for leaf in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}
        assert floats == {float32}


@pytest.mark.parametrize("value", ["float16", "bf16", "float64"])
def test_other_dtypes_are_refused_naming_the_field(golden_dir, value):
    _, config, _ = golden_case(golden_dir, "ddpm_vp", value)
    with pytest.raises(ValueError, match="config.model.dtype"):
        mutils.compute_dtype(config)
    from configs.vp import cifar10_ddpmpp_continuous

    full = cifar10_ddpmpp_continuous.get_config()
    full.model.dtype = value
    with pytest.raises(ValueError, match="config.model.dtype"):
        validate_config(full)
    full.model.dtype = "bfloat16"
    validate_config(full)
