"""``config.model.remat``: rematerialised residual and attention blocks change memory, not results.

On tiny models of each family (NCSN++ with BigGAN and DDPM residual blocks, DDPM, NCSNv2): the parameter
tree is the same with and without remat, every block is wrapped in a checkpoint, and the gradient of the
training loss (dropout on) is the same to float32 round-off.
"""
from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import losses
from models import utils as mutils
from tests.helpers import make_sde

_NCSNPP = dict(name="ncsnpp", nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1,
               resamp_with_conv=True, conditional=True, fir=False, fir_kernel=(1, 3, 3, 1), skip_rescale=True,
               resblock_type="biggan", progressive="none", progressive_input="none", progressive_combine="sum",
               embedding_type="positional", init_scale=0.0, fourier_scale=16, nonlinearity="swish",
               scale_by_sigma=False, normalization="GroupNorm")
MODELS = {
    "ncsnpp_biggan": _NCSNPP,
    "ncsnpp_ddpm_blocks": dict(_NCSNPP, resblock_type="ddpm", progressive="output_skip", progressive_input="residual"),
    "ddpm": dict(_NCSNPP, name="ddpm", nf=32),
    "ncsnv2": dict(name="ncsnv2_64", nf=8, normalization="InstanceNorm++", nonlinearity="elu", interpolation="bilinear",
                   scale_by_sigma=False),
}
# Blocks that remat wraps, by the class part of their parameter names.
BLOCKS = ("ResnetBlock", "AttnBlock", "ResidualBlock", "RefineBlock")


def tiny_config(model: str, remat: bool) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "data": {"image_size": 8, "num_channels": 3, "centered": True},
        "training": {"continuous": True},
        "model": dict(MODELS[model], remat=remat, sigma_min=0.01, sigma_max=50.0, num_scales=10),
    })


def _init(config):
    return mutils.init_model(jax.random.PRNGKey(0), config)


def _param_shapes(config) -> dict:
    """The parameter tree of ``config``'s model as ShapeDtypeStructs (initialisation traced, not run)."""
    return jax.eval_shape(lambda: _init(config)[2])


def _loss_and_grad(config, params):
    model = mutils.create_model(config)
    sde = make_sde("vesde") if config.model.name.startswith("ncsnv2") else make_sde("vpsde")
    loss_fn = losses.get_sde_loss_fn(sde, model, train=True, continuous=True, likelihood_weighting=False)
    batch = {"image": jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3), minval=-1.0, maxval=1.0)}
    grad_fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(jax.random.PRNGKey(2), p, {}, batch)[0]))
    return grad_fn(params)


def _block_names(params) -> set:
    return {name for name in params if any(block in name for block in BLOCKS)}


# Gradients on one model per block family (the others' blocks are wrapped by the same helper; the test
# below checks that every block is); each case compiles two backward passes.
@pytest.mark.parametrize("model", ["ncsnpp_biggan", "ddpm"])
def test_remat_keeps_parameters_and_gradients(model):
    _, _, params = _init(tiny_config(model, remat=False))
    loss, grad = _loss_and_grad(tiny_config(model, remat=False), params)
    loss_remat, grad_remat = _loss_and_grad(tiny_config(model, remat=True), params)
    np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
    largest = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grad))
    assert largest > 0
    for (path, g), g_remat in zip(jax.tree_util.tree_leaves_with_path(grad), jax.tree_util.tree_leaves(grad_remat)):
        # Per leaf, relative to its own scale; leaves whose exact gradient is 0 (the attention's key bias)
        # hold round-off only, compared with the largest gradient.
        tolerance = 1e-5 * float(jnp.abs(g).max()) + 1e-7 * largest
        assert float(jnp.abs(g_remat - g).max()) <= tolerance, jax.tree_util.keystr(path)


# The primitive jax.checkpoint traces to (its name differs between JAX versions).
CHECKPOINT = jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).eqns[0].primitive


def _count_checkpoints(jaxpr) -> int:
    """Checkpoint (remat) equations at the top level of ``jaxpr`` and inside nested calls, not inside checkpoints."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive is CHECKPOINT:
            count += 1
            continue
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _count_checkpoints(sub)
    return count


@pytest.mark.parametrize("model", MODELS)
def test_remat_keeps_the_parameter_tree_and_wraps_every_block_once(model):
    shapes = _param_shapes(tiny_config(model, remat=False))
    assert _param_shapes(tiny_config(model, remat=True)) == shapes
    assert _block_names(shapes), "the tiny model has no block to rematerialise"
    for remat in (False, True):
        config = tiny_config(model, remat)
        module, params = mutils.create_model(config), _param_shapes(config)
        x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda p: module.apply({"params": p}, x, t, train=False))(params).jaxpr
        assert _count_checkpoints(jaxpr) == (len(_block_names(params)) if remat else 0), f"remat={remat}"
