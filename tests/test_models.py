"""NCSN++ / DDPM++ / DDPM: parameter trees, outputs and building blocks against the original.

Full-size models are only traced (``jax.eval_shape``); outputs are checked at small sizes.
"""
from __future__ import annotations

import functools
import importlib
import json
import pathlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.signal

import sde_lib
from models import layers, up_or_down_sampling
from models import utils as mutils
from models.normalization import GroupNorm
from tests.helpers import assert_close_scaled

OUR_MODELS = ("ncsnpp", "ddpm")
CONFIG_ROOT = pathlib.Path(__file__).resolve().parents[1] / "configs"
GOLDEN_CASES = ("ncsnpp_ve_cont", "ncsnpp_ve_outputskip", "ddpmpp_vp_cont", "ddpmpp_subvp_deep", "ddpm_vp")
EXTRA_CASES = ("ncsnpp_ddpmblocks_cat_skip", "ncsnpp_residual_fir_gray", "ddpmpp_vp_fourier")


# ----------------------------------------------------------------------------- helpers

def load_config(name: str) -> ml_collections.ConfigDict:
    """``get_config()`` of ``configs/<name>.py`` (e.g. ``vp/cifar10_ddpmpp_continuous``)."""
    return importlib.import_module("configs." + name.replace("/", ".")).get_config()


def all_config_names() -> list[str]:
    names = []
    for path in sorted(CONFIG_ROOT.rglob("*.py")):
        rel = path.relative_to(CONFIG_ROOT).with_suffix("")
        if path.name == "__init__.py" or path.name.startswith("default_") or len(rel.parts) < 2:
            continue  # packages and the shared default_*_configs.py (at the top and in subfolders)
        if rel.parts[0] == "tables":
            continue  # --mode tables runs on toy mixtures: config.model holds the SDE, not a network
        names.append("/".join(rel.parts))
    return names


def our_config_names() -> list[str]:
    names = []
    for name in all_config_names():
        config = load_config(name)
        if "model" in config and config.model.get("name") in OUR_MODELS:
            names.append(name)
    return names


def flatten(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = tuple(value.shape)
    return out


@functools.lru_cache(maxsize=None)
def traced_param_shapes(name: str, input_shape: tuple | None = None) -> dict:
    """Flattened ``{path: shape}`` of the model of ``configs/<name>.py``, from ``eval_shape`` of init."""
    config = load_config(name)
    model = mutils.get_model(config.model.name)(config=config)
    shape = input_shape or mutils.model_input_shape(config)
    variables = jax.eval_shape(
        lambda: model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                           jnp.zeros(shape), jnp.zeros((shape[0],), jnp.int32), train=False))
    return flatten(flax.core.unfreeze(variables))


def unflatten_variables(npz) -> dict:
    tree: dict = {}
    for key in npz.files:
        if not key.startswith("var/"):
            continue
        *path, leaf = key.split("/")[1:]
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(npz[key])
    return tree


def small_config(**model_overrides) -> ml_collections.ConfigDict:
    """A tiny NCSN++ config (8×8×3) for error-path tests."""
    config = ml_collections.ConfigDict({
        "data": {"image_size": 8, "num_channels": 3, "centered": True},
        "training": {"continuous": True},
        "model": dict(name="ncsnpp", nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                      resamp_with_conv=True, conditional=True, fir=False, fir_kernel=(1, 3, 3, 1),
                      skip_rescale=True, resblock_type="biggan", progressive="none", progressive_input="none",
                      progressive_combine="sum", embedding_type="positional", init_scale=0.0, fourier_scale=16,
                      nonlinearity="swish", scale_by_sigma=False, sigma_min=0.01, sigma_max=50, num_scales=10),
    })
    config.model.update(model_overrides)
    return config


# ----------------------------------------------------------------------------- parameter trees

def golden_param_trees(golden_dir) -> dict:
    trees = json.loads((golden_dir / "param_trees.json").read_text())
    return {name: tree for name, tree in trees.items() if tree["model_name"] in OUR_MODELS}


PARAM_TREE_CONFIGS = [
    "subvp/cifar10_ddpmpp_deep_continuous", "subvp/cifar10_ncsnpp_continuous", "ve/celebahq_256_ncsnpp_continuous",
    "ve/cifar10_ddpm", "ve/cifar10_ncsnpp", "ve/cifar10_ncsnpp_continuous", "ve/cifar10_ncsnpp_deep_continuous",
    "vp/cifar10_ddpmpp", "vp/cifar10_ddpmpp_continuous", "vp/cifar10_ddpmpp_deep_continuous",
    "vp/cifar10_ncsnpp_continuous", "vp/ddpm/cifar10",
]


def test_param_tree_list_is_complete(golden_dir):
    assert sorted(golden_param_trees(golden_dir)) == sorted(PARAM_TREE_CONFIGS)


@pytest.mark.parametrize("name", PARAM_TREE_CONFIGS)
def test_param_tree_matches_original(golden_dir, name):
    golden = golden_param_trees(golden_dir)[name]
    ours = traced_param_shapes(name, tuple(golden["input_shape"]))
    expected = {path: tuple(shape) for path, shape in golden["variables"].items()}
    assert sorted(set(expected) - set(ours)) == [] and sorted(set(ours) - set(expected)) == []
    assert {p: s for p, s in ours.items() if expected[p] != s} == {}
    assert sum(int(np.prod(s)) for s in ours.values()) == golden["num_params"]


@pytest.mark.parametrize("name", [n for n in our_config_names() if n not in PARAM_TREE_CONFIGS])
def test_every_config_initialises(name):
    shapes = traced_param_shapes(name)
    assert shapes and all(path.startswith("params/") for path in shapes)


# ----------------------------------------------------------------------------- outputs vs the original

def _sde_for(case_info, config):
    if case_info["sde"] == "VESDE":
        return sde_lib.VESDE(config.model.sigma_min, config.model.sigma_max, config.model.num_scales)
    if case_info["sde"] == "VPSDE":
        return sde_lib.VPSDE(0.1, 20.0, 1000)
    return sde_lib.subVPSDE(0.1, 20.0, 1000)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_model_output_and_score(golden_dir, case):
    info = json.loads((golden_dir / "models.json").read_text())[case]
    config = ml_collections.ConfigDict(info["config"])
    data = np.load(golden_dir / f"model_{case}.npz")
    variables = unflatten_variables(data)
    model = mutils.get_model(config.model.name)(config=config)
    x = jnp.asarray(data["x"])

    out = jax.jit(functools.partial(model.apply, train=False))(variables, x, jnp.asarray(data["cond"]))
    assert_close_scaled(out, data["model_out"])

    score_fn = mutils.get_score_fn(_sde_for(info, config), model, variables["params"], {}, train=False,
                                   continuous=info["continuous"])
    assert_close_scaled(jax.jit(score_fn)(x, jnp.asarray(data["t"])), data["score"])
    assert sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables)) == info["num_params"]


@pytest.mark.parametrize("case", EXTRA_CASES)
def test_extra_option_combinations_match_original(golden_dir, case):
    config = ml_collections.ConfigDict(json.loads((golden_dir / "extra" / f"{case}.json").read_text()))
    data = np.load(golden_dir / "extra" / f"{case}.npz")
    variables = unflatten_variables(data)
    model = mutils.get_model(config.model.name)(config=config)
    x, cond = jnp.asarray(data["x"]), jnp.asarray(data["cond"])

    init_shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, x, cond, train=False))
    assert flatten(flax.core.unfreeze(init_shapes)) == flatten(variables)
    apply = jax.jit(model.apply, static_argnames="train")
    assert_close_scaled(apply(variables, x, cond, train=False), data["model_out"])
    if "model_out_train" in data.files:  # dropout masks depend only on module paths and the rng
        out = apply(variables, x, cond, train=True, rngs={"dropout": jax.random.PRNGKey(5)})
        assert_close_scaled(out, data["model_out_train"])


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("model_name", OUR_MODELS)
@pytest.mark.parametrize("shape, field", [((2, 16, 16, 3), "config.data.image_size"),
                                          ((2, 8, 8, 1), "config.data.num_channels")])
def test_mismatched_image_gives_clear_error(model_name, shape, field):
    config = small_config(name=model_name, nf=32, normalization="GroupNorm")
    model = mutils.get_model(model_name)(config=config)
    with pytest.raises(ValueError, match=field):
        model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros(shape), jnp.zeros((2,)), train=False)


def test_time_conditioning_shape_is_checked():
    model = mutils.get_model("ncsnpp")(config=small_config())
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((2, 8, 8, 3)), jnp.zeros((2, 1)), train=False)


@pytest.mark.parametrize("field, value", [("progressive", "pyramid"), ("progressive_input", "skip"),
                                          ("resblock_type", "vgg"), ("embedding_type", "learned"),
                                          ("progressive_combine", "max"), ("nonlinearity", "tanh")])
def test_unknown_option_names_the_field(field, value):
    model = mutils.get_model("ncsnpp")(config=small_config(**{field: value}))
    with pytest.raises(ValueError, match=f"config.model.{field}"):
        model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)), train=False)


def test_fourier_embedding_requires_continuous_training():
    config = small_config(embedding_type="fourier")
    config.training.continuous = False
    model = mutils.get_model("ncsnpp")(config=config)
    with pytest.raises(ValueError, match="config.training.continuous"):
        model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 8, 8, 3)), jnp.ones((1,)), train=False)


# ----------------------------------------------------------------------------- GroupNorm

@pytest.mark.parametrize("shape, groups", [((2, 8, 8, 64), 16), ((2, 5, 7, 12), 3), ((2, 6, 6, 8), 1)])
def test_group_norm_matches_flax(shape, groups):
    x = 0.7 * jax.random.normal(jax.random.PRNGKey(0), shape) + 0.2
    ref = nn.GroupNorm(num_groups=groups)
    variables = ref.init(jax.random.PRNGKey(1), x)
    variables = jax.tree_util.tree_map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
                                       variables)
    ours = GroupNorm(num_groups=groups)
    assert jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)) == \
        jax.tree_util.tree_map(jnp.shape, variables)
    np.testing.assert_allclose(jax.jit(ours.apply)(variables, x), jax.jit(ref.apply)(variables, x),
                               rtol=1e-5, atol=1e-5)

    def grads(module):
        return jax.jit(jax.grad(lambda v, x: jnp.sum(jnp.sin(module.apply(v, x))), argnums=(0, 1)))(variables, x)

    g_ours, g_ref = grads(ours), grads(ref)
    for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_group_norm_is_accurate_when_mean_dominates():
    """A one-pass E[x²]−E[x]² variance loses everything here; ours must not."""
    x = 1000.0 + 0.1 * jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16))
    x64 = np.asarray(x, np.float64).reshape(2, 64, 4, 4)
    mean = x64.mean(axis=(1, 3), keepdims=True)
    var = x64.var(axis=(1, 3), keepdims=True)
    expected = ((x64 - mean) / np.sqrt(var + 1e-6)).reshape(2, 8, 8, 16)
    out = GroupNorm(num_groups=4).apply({"params": {"scale": jnp.ones(16), "bias": jnp.zeros(16)}}, x)
    # float32 values near 1000 are spaced 6e-5 apart: ~1e-3 of the spread (E[x²]-E[x]² would be all noise)
    np.testing.assert_allclose(out, expected, atol=1e-2)
    assert abs(float(np.std(out)) - 1.0) < 1e-3


def test_group_norm_group_size_and_errors():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 12))
    v = GroupNorm(num_groups=3).init(jax.random.PRNGKey(0), x)
    np.testing.assert_allclose(GroupNorm(num_groups=None, group_size=4).apply(v, x),
                               GroupNorm(num_groups=3).apply(v, x), rtol=1e-6)
    with pytest.raises(ValueError, match="equal groups"):
        GroupNorm(num_groups=5).init(jax.random.PRNGKey(0), x)


# ----------------------------------------------------------------------------- FIR resampling

def _reference_upfirdn(x, k2d, up, down, pad0, pad1):
    """upfirdn by its definition with scipy: insert zeros, pad, 'valid' 2-D convolution, decimate."""
    x = np.asarray(x, np.float64)
    n, h, w, c = x.shape
    dilated = np.zeros((n, h * up, w * up, c))
    dilated[:, ::up, ::up] = x
    padded = np.pad(dilated, ((0, 0), (pad0, pad1), (pad0, pad1), (0, 0)))
    out = np.stack([np.stack([scipy.signal.convolve2d(padded[i, :, :, j], k2d, mode="valid") for j in range(c)], -1)
                    for i in range(n)])
    return out[:, ::down, ::down]


@pytest.mark.parametrize("k", [(1, 3, 3, 1), (1, 1), (1, 2, 1)])
def test_fir_resampling_matches_scipy(k):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    k2d = np.outer(k, k) / np.sum(k) ** 2
    p = len(k) - 2
    np.testing.assert_allclose(up_or_down_sampling.downsample_2d(x, k),
                               _reference_upfirdn(x, k2d, 1, 2, (p + 1) // 2, p // 2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(up_or_down_sampling.upsample_2d(x, k),
                               _reference_upfirdn(x, 4 * k2d, 2, 1, (p + 1) // 2 + 1, p // 2), rtol=1e-5, atol=1e-6)


def test_fir_up_then_constant_and_shapes():
    x = jnp.full((1, 6, 6, 2), 3.0)
    up = up_or_down_sampling.upsample_2d(x, (1, 3, 3, 1))
    assert up.shape == (1, 12, 12, 2)
    np.testing.assert_allclose(up[:, 2:-2, 2:-2], 3.0, rtol=1e-6)  # interior keeps a constant image
    down = up_or_down_sampling.downsample_2d(x, (1, 3, 3, 1))
    assert down.shape == (1, 3, 3, 2)
    np.testing.assert_allclose(down[:, 1:-1, 1:-1], 3.0, rtol=1e-6)
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 2, 5))
    assert up_or_down_sampling.upsample_conv_2d(x, w, (1, 3, 3, 1)).shape == (1, 12, 12, 5)
    assert up_or_down_sampling.conv_downsample_2d(x, w, (1, 3, 3, 1)).shape == (1, 3, 3, 5)


def test_upsample_conv_equals_upsample_then_conv_for_box_filter():
    """With the nearest-neighbour filter, the fused op is nearest upsampling then a 'SAME' 3×3 conv."""
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 5, 2))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 4))
    fused = up_or_down_sampling.upsample_conv_2d(x, w, k=(1, 1))
    near = up_or_down_sampling.naive_upsample_2d(x)
    conv = jax.lax.conv_general_dilated(near, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(fused, conv, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- small layers

def test_timestep_embedding_closed_form():
    t = jnp.asarray([0.0, 1.0, 37.5])
    emb = layers.get_timestep_embedding(t, 9)
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3)
    expected = np.concatenate([np.sin(np.outer(t, freqs)), np.cos(np.outer(t, freqs)), np.zeros((3, 1))], axis=1)
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-6)


def test_attention_is_softmax_weighted_mean():
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 3, 4, 5)) for i in range(3))
    out = layers.spatial_self_attention(q, k, v)
    qf, kf, vf = (np.asarray(a, np.float64).reshape(2, 12, 5) for a in (q, k, v))
    logits = np.einsum("bic,bjc->bij", qf, kf) / np.sqrt(5)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, np.einsum("bij,bjc->bic", w, vf).reshape(2, 3, 4, 5), rtol=1e-5, atol=1e-5)


def test_model_registry_names_the_config_field_and_refuses_duplicates():
    assert {"ddpm", "ncsnpp", "ncsn", "ncsnv2_64"} <= set(mutils.registered_models())
    with pytest.raises(ValueError, match=r"config\.model\.name.*'ddpm'"):
        mutils.get_model("ddpmpp")
    with pytest.raises(ValueError, match="already registered"):
        mutils.register_model(nn.Module, name="ddpm")
