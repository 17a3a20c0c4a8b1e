"""NCSN (v1), NCSNv2 and the noise-conditional WideResnet classifier against the original code.

Full-size models are only traced (``jax.eval_shape``); outputs are checked at small sizes on
golden numbers made by the original (``tests/golden/models.json`` case ``ncsnv2_ve`` and
``tests/golden/extra/ncsn_*``, ``classifier*``; see the READMEs there).
"""
from __future__ import annotations

import importlib
import json
import math
import pathlib

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import sde_lib
from models import utils as mutils
from models import wideresnet_noise_conditional as wrn
from models.ncsn_normalization import (ConditionalInstanceNorm2dPlus, InstanceNorm2d, InstanceNorm2dPlus,
                                       VarianceNorm2d, get_normalization, instance_moments)
from tests.helpers import assert_close_scaled

NCSN_MODELS = ("ncsn", "ncsnv2_64", "ncsnv2_128", "ncsnv2_256")
CONFIG_ROOT = pathlib.Path(__file__).resolve().parents[1] / "configs"


# ----------------------------------------------------------------------------- helpers

def load_config(name: str) -> ml_collections.ConfigDict:
    """``get_config()`` of ``configs/<name>.py`` (e.g. ``ve/ncsnv2/cifar10``)."""
    return importlib.import_module("configs." + name.replace("/", ".")).get_config()


def ncsn_config_names() -> list[str]:
    """Every config under ``configs/ve/ncsn`` and ``configs/ve/ncsnv2`` (the original's NCSN configs)."""
    return sorted("/".join(p.relative_to(CONFIG_ROOT).with_suffix("").parts)
                  for folder in ("ve/ncsn", "ve/ncsnv2") for p in (CONFIG_ROOT / folder).glob("*.py")
                  if p.name != "__init__.py")


def flat_shapes(tree) -> dict:
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    return {"/".join(k): tuple(v.shape) for k, v in flat.items()}


def traced_variables(model, x_shape: tuple, label_dtype=jnp.int32) -> dict:
    return jax.eval_shape(
        lambda: model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                           jnp.zeros(x_shape), jnp.zeros((x_shape[0],), label_dtype), train=False))


def load_variables(npz) -> dict:
    """``var/<collection>/<path>/<leaf>`` entries as a nested float32 tree."""
    return flax.traverse_util.unflatten_dict(
        {tuple(k.split("/")[1:]): jnp.asarray(npz[k], jnp.float32) for k in npz.files if k.startswith("var/")})


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    for key, value in overrides.items():
        group, field = key.split(".")
        setattr(config[group], field, value)
    return config


def small_ncsn_v1_config(nf: int = 4, image_size: int = 16) -> ml_collections.ConfigDict:
    config = load_config("ve/ncsn/cifar10")
    config.model.nf = nf
    config.data.image_size = image_size
    return config


# ----------------------------------------------------------------------------- parameter trees

def ncsn_param_tree_cases(golden_dir) -> dict:
    trees = json.loads((golden_dir / "param_trees.json").read_text())
    return {name: tree for name, tree in trees.items() if tree["model_name"] in NCSN_MODELS}


def test_param_tree_cases_present(golden_dir):
    assert sorted(ncsn_param_tree_cases(golden_dir)) == ["ve/ncsnv2/cifar10"]


@pytest.mark.parametrize("name", ["ve/ncsnv2/cifar10"])
def test_param_tree_matches_original(golden_dir, name):
    golden = ncsn_param_tree_cases(golden_dir)[name]
    config = load_config(name)
    assert config.model.name == golden["model_name"]
    ours = flat_shapes(traced_variables(mutils.create_model(config), tuple(golden["input_shape"])))
    expected = {path: tuple(shape) for path, shape in golden["variables"].items()}
    assert ours == expected
    assert sum(math.prod(s) for s in ours.values()) == golden["num_params"] == 33_970_563


def full_size_trees() -> dict:
    path = pathlib.Path(__file__).parent / "golden" / "extra" / "ncsn_param_trees.json"
    return json.loads(path.read_text())


def test_full_size_tree_list_covers_every_ncsn_config():
    assert sorted(full_size_trees()) == ncsn_config_names()


@pytest.mark.parametrize("name", ncsn_config_names())
def test_every_ncsn_config_initialises_at_full_size_as_the_original(name):
    """Each ``ve/ncsn*`` config's model, traced at full size, has the original's parameter tree
    (NCSNv1: the original with its one-line fix and num_classes = num_scales, see the extra README)."""
    config = load_config(name)
    assert config.model.name in NCSN_MODELS
    shapes = flat_shapes(traced_variables(mutils.create_model(config), mutils.model_input_shape(config)))
    golden = full_size_trees()[name]
    assert shapes == {path: tuple(shape) for path, shape in golden["variables"].items()}
    assert sum(math.prod(s) for s in shapes.values()) == golden["num_params"]
    if config.model.name == "ncsn":
        # one conditional-normalisation class per noise level, in every block
        embeddings = {path: shape for path, shape in shapes.items() if path.endswith("Embed_0/embedding")}
        assert embeddings and all(shape[0] == config.model.num_scales for shape in embeddings.values())


def test_classifier_param_tree_matches_original(golden_dir):
    golden = json.loads((golden_dir / "extra" / "classifier_param_tree.json").read_text())
    expected = {path: tuple(shape) for path, shape in golden["variables"].items()}
    # create_classifier builds the released WRN-28-10 (blocks_per_group=4, channel_multiplier=10, 10 classes)
    params = jax.eval_shape(lambda key: mutils.create_classifier(key, 1, random_init=True)[1], jax.random.PRNGKey(0))
    ours = {"params/" + path: shape for path, shape in flat_shapes(params).items()}
    assert ours == expected
    assert sum(math.prod(s) for s in ours.values()) == golden["num_params"] == 38_913_242


# ----------------------------------------------------------------------------- outputs vs the original

def test_ncsnv2_golden_outputs_and_score(golden_dir):
    case = json.loads((golden_dir / "models.json").read_text())["ncsnv2_ve"]
    config = load_config(case["base_config"])
    for group, fields in case["config"].items():
        if isinstance(fields, dict):
            for field, value in fields.items():
                setattr(config[group], field, value)
        else:
            setattr(config, group, fields)
    npz = np.load(golden_dir / "model_ncsnv2_ve.npz")
    variables = load_variables(npz)
    model = mutils.create_model(config)
    x = jnp.asarray(npz["x"])
    assert flat_shapes(variables) == flat_shapes(traced_variables(model, x.shape))
    assert_close_scaled(jax.jit(model.apply, static_argnames="train")(variables, x, jnp.asarray(npz["cond"]),
                                                                      train=False), npz["model_out"])

    sde = sde_lib.VESDE(config.model.sigma_min, config.model.sigma_max, config.model.num_scales)
    score_fn = mutils.get_score_fn(sde, model, variables["params"], {}, train=False, continuous=case["continuous"])
    assert_close_scaled(jax.jit(score_fn)(x, jnp.asarray(npz["t"])), npz["score"])


def extra_cases() -> dict:
    path = pathlib.Path(__file__).parent / "golden" / "extra" / "ncsn_cases.json"
    return {name: case for name, case in json.loads(path.read_text()).items() if name != "classifier"}


@pytest.mark.parametrize("name", sorted(extra_cases()))
def test_extra_golden_outputs(golden_dir, name):
    case = extra_cases()[name]
    config = apply_overrides(load_config(case["base_config"]), case["overrides"])
    assert config.model.name == case["model_name"]
    npz = np.load(golden_dir / "extra" / f"ncsn_{name}.npz")
    variables = load_variables(npz)
    model = mutils.create_model(config)
    x, labels = jnp.asarray(npz["x"]), jnp.asarray(npz["labels"])
    assert flat_shapes(variables) == flat_shapes(traced_variables(model, x.shape))
    assert sum(math.prod(s) for s in flat_shapes(variables).values()) == case["num_params"]
    apply = jax.jit(model.apply, static_argnames="train")  # compiling is cheaper than running op by op
    assert_close_scaled(apply(variables, x, labels, train=False), npz["model_out"])


def _with_golden_noise(npz, init_variables) -> tuple[dict, dict]:
    """Re-create the golden's variables from ``init_variables`` (+ the README's noise, float16 rounding)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(init_variables))
    noise = np.random.RandomState(11)
    ours = {}
    for path, value in sorted(flat.items()):
        noisy = np.asarray(value) + 0.05 * noise.standard_normal(value.shape).astype(np.float32)
        ours["/".join(path)] = noisy.astype(np.float16)
    stored = {k[len("var/"):]: npz[k] for k in npz.files if k.startswith("var/")}
    return ours, stored


@pytest.fixture(scope="module")
def ncsn_v1_initialised(golden_dir):
    """The ``ncsn_v1`` golden case's model, initialised (eagerly, once) with the golden's rngs."""
    case = extra_cases()["ncsn_v1"]
    npz = np.load(golden_dir / "extra" / "ncsn_ncsn_v1.npz")
    config = apply_overrides(load_config(case["base_config"]), case["overrides"])
    model = mutils.create_model(config)
    rngs = {"params": jax.random.PRNGKey(7), "dropout": jax.random.PRNGKey(8)}
    variables = model.init(rngs, jnp.asarray(npz["x"]), jnp.asarray(npz["labels"]), train=False)
    return config, model, variables, npz


def test_initialisation_is_the_originals(ncsn_v1_initialised):
    """Same rngs -> bit for bit the original's initial parameters (PyTorch-style conv init, N(1, 0.02²)
    conditional-norm tables): the golden's variables are that init plus seeded noise."""
    _, _, variables, npz = ncsn_v1_initialised
    ours, stored = _with_golden_noise(npz, variables)
    assert ours.keys() == stored.keys()
    for path, value in stored.items():
        np.testing.assert_array_equal(ours[path], value, err_msg=path)


def test_classifier_golden_logits_and_gradient(golden_dir):
    npz = np.load(golden_dir / "extra" / "classifier.npz")
    classifier = wrn.WideResnet(blocks_per_group=1, channel_multiplier=1, num_outputs=10)
    params = load_variables(npz)["params"]
    x, sigmas = jnp.asarray(npz["x"]), jnp.asarray(npz["sigmas"])
    assert flat_shapes(params) == flat_shapes(traced_variables(classifier, x.shape, jnp.float32)["params"])
    logit_fn = mutils.get_logit_fn(classifier, params)
    assert_close_scaled(jax.jit(logit_fn)(x, sigmas), npz["logits"])
    grad = jax.jit(mutils.get_classifier_grad_fn(logit_fn))(x, sigmas, jnp.asarray(npz["labels"]))
    assert_close_scaled(grad, npz["grad"])


# ----------------------------------------------------------------------------- NCSNv1 works

def test_ncsn_v1_parameter_naming():
    config = small_ncsn_v1_config(nf=4)
    shapes = flat_shapes(traced_variables(mutils.create_model(config), mutils.model_input_shape(config)))
    n = config.model.num_scales
    assert shapes["params/ConditionalResidualBlock_0/ConditionalInstanceNorm2dPlus_0/Embed_0/embedding"] == (n, 12)
    # the down-sampling block normalises twice (the original's broken call is the second one)
    down = "params/ConditionalResidualBlock_2/"
    assert shapes[down + "ConditionalInstanceNorm2dPlus_1/Embed_0/embedding"] == (n, 12)
    assert shapes[down + "ConvMeanPool_0/Conv_0/kernel"] == (3, 3, 4, 8)
    assert shapes["params/CondRefineBlock_3/CondMSFBlock_0/ConditionalInstanceNorm2dPlus_1/Embed_0/embedding"] == (
        n, 24)
    assert shapes["params/CondRefineBlock_0/CondCRPBlock_0/Conv_1/kernel"] == (3, 3, 8, 8)
    assert shapes["params/ConditionalInstanceNorm2dPlus_0/Embed_0/embedding"] == (n, 12)
    assert not any(k.startswith("params/InstanceNorm2dPlus") for k in shapes)


def test_ncsn_v1_trains_one_step(ncsn_v1_initialised):
    """NCSNv1 (``ve/ncsn/cifar10`` at nf=4, 16×16) takes one Adam step on a denoising score matching loss
    and the loss goes down."""
    config, model, variables, _ = ncsn_v1_initialised
    assert list(variables) == ["params"]
    params = variables["params"]
    sigmas = mutils.get_sigmas(config)
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 16, 16, 3))
    labels = jnp.arange(4, dtype=jnp.int32) * 3
    noise = jax.random.normal(jax.random.PRNGKey(2), x.shape)

    def loss_fn(p):
        sigma = sigmas[labels][:, None, None, None]
        score = model.apply({"params": p}, x + sigma * noise, labels, train=True)
        return jnp.mean(jnp.sum(jnp.square(score * sigma + noise), axis=(1, 2, 3)))

    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    loss0, grads = value_and_grad(params)
    assert np.isfinite(loss0)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    embed_grad = grads["ConditionalInstanceNorm2dPlus_0"]["Embed_0"]["embedding"]
    used = np.zeros(config.model.num_scales, bool)
    used[np.asarray(labels)] = True
    assert np.abs(embed_grad[used]).sum(axis=1).min() > 0  # the classes in the batch get a gradient
    assert np.abs(embed_grad[~used]).max() == 0  # the others do not
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    assert value_and_grad(params)[0] < loss0


def test_ncsn_v1_num_classes_defaults_to_num_scales_and_must_cover_it():
    config = small_ncsn_v1_config()
    del config.model["num_classes"]  # as in the original configs
    assert get_normalization(config, conditional=True)().num_classes == config.model.num_scales
    config.model.num_classes = config.model.num_scales - 1
    with pytest.raises(ValueError, match="num_classes"):
        get_normalization(config, conditional=True)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("shape, field", [((2, 8, 8, 3), "config.data.image_size"),
                                          ((2, 16, 16, 1), "config.data.num_channels"),
                                          ((16, 16, 3), "config.data.image_size")])
def test_input_not_matching_config_is_a_clear_error(shape, field):
    config = small_ncsn_v1_config()
    for name in ("ncsn", "ncsnv2_64"):
        config.model.name = name
        model = mutils.create_model(config)
        with pytest.raises(ValueError, match=field):
            model.init(jax.random.PRNGKey(0), jnp.zeros(shape), jnp.zeros((2,), jnp.int32), train=False)


def test_image_size_must_allow_the_downsampling():
    config = small_ncsn_v1_config(image_size=20)
    config.model.name = "ncsnv2_256"  # halves three times
    with pytest.raises(ValueError, match="config.data.image_size=20 must be divisible by 8"):
        mutils.init_model(jax.random.PRNGKey(0), config)


def test_continuous_labels_are_rejected_with_the_fix():
    config = small_ncsn_v1_config()
    model = mutils.create_model(config)
    with pytest.raises(ValueError, match="training.continuous"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), jnp.ones((1,), jnp.float32), train=False)


# ----------------------------------------------------------------------------- normalisation maths

def _numpy_instance_stats(x):
    x = np.asarray(x, np.float64)
    return x.mean(axis=(1, 2)), x.var(axis=(1, 2))


def test_instance_moments_are_accurate_with_a_large_mean():
    rng = np.random.RandomState(0)
    x = (1e4 + rng.standard_normal((2, 16, 16, 3)) * np.asarray([1e-2, 1.0, 10.0])).astype(np.float32)
    x[:, 0, 0, :] += 5.0  # the shift pixel is an outlier
    mean, var = instance_moments(jnp.asarray(x))
    ref_mean, ref_var = _numpy_instance_stats(x)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=2e-2)  # float32 inputs at 1e4 carry ~1e-3 absolute error
    naive = np.mean(np.square(x), axis=(1, 2)) - np.square(np.mean(x, axis=(1, 2)))
    assert np.abs(naive - ref_var)[:, 0].max() > 10 * np.abs(np.asarray(var) - ref_var)[:, 0].max()


def test_normalisations_match_their_definitions():
    rng = np.random.RandomState(1)
    x = (rng.standard_normal((3, 8, 8, 5)) * 2 + rng.standard_normal((3, 1, 1, 5)) * 3).astype(np.float32)
    mean, var = _numpy_instance_stats(x)
    mean4, std4 = mean[:, None, None, :], np.sqrt(var + 1e-5)[:, None, None, :]
    means_plus = (mean - mean.mean(-1, keepdims=True)) / np.sqrt(mean.var(-1, keepdims=True) + 1e-5)

    def run(module, *args):
        variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x), *args)
        variables = jax.tree_util.tree_map(
            lambda v: v + 0.1 * jax.random.normal(jax.random.PRNGKey(3), v.shape), variables)
        p = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), flax.core.unfreeze(variables)["params"])
        return np.asarray(module.apply(variables, jnp.asarray(x), *args)), p

    out, p = run(InstanceNorm2d())
    np.testing.assert_allclose(out, (x - mean4) / std4 * p["scale"] + p["bias"], atol=2e-5)
    out, p = run(VarianceNorm2d())
    np.testing.assert_allclose(out, x / std4 * p["scale"], atol=2e-5)
    out, p = run(InstanceNorm2dPlus())
    expected = ((x - mean4) / std4 + means_plus[:, None, None, :] * p["alpha"]) * p["gamma"] + p["beta"]
    np.testing.assert_allclose(out, expected, atol=2e-5)

    y = jnp.asarray([0, 2, 2], jnp.int32)
    out, p = run(ConditionalInstanceNorm2dPlus(num_classes=3), y)
    table = p["Embed_0"]["embedding"][np.asarray(y)][:, None, None, :]
    gamma, alpha, beta = table[..., :5], table[..., 5:10], table[..., 10:]
    np.testing.assert_allclose(out, gamma * ((x - mean4) / std4 + means_plus[:, None, None, :] * alpha) + beta,
                               atol=2e-5)
