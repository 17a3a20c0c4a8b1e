"""models.utils helpers: the DDPM schedule, scipy's flat-vector bridge, and the classifier from its checkpoint."""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from models import utils as mutils
from models import wideresnet_noise_conditional
from score_sde import checkpoints
from tests.helpers import make_sde


def test_ddpm_params_are_the_ddpm_schedule():
    """beta 0.1..20 over 1000 scales is Ho et al.'s linear schedule 1e-4..0.02, the same as VPSDE's discrete one."""
    config = ml_collections.ConfigDict({"model": {"beta_min": 0.1, "beta_max": 20.0, "num_scales": 1000}})
    params = mutils.get_ddpm_params(config)
    betas = params["betas"]
    assert betas.dtype == np.float64 and betas.shape == (1000,) and params["num_diffusion_timesteps"] == 1000
    np.testing.assert_allclose(betas[[0, -1]], [1e-4, 0.02], rtol=1e-12)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)  # linear
    vpsde = make_sde("vpsde", 1000)
    np.testing.assert_allclose(params["alphas_cumprod"], np.asarray(vpsde.alphas_cumprod), rtol=1e-5)
    np.testing.assert_allclose(params["alphas"], 1 - betas, rtol=0)
    np.testing.assert_allclose(params["alphas_cumprod"], np.cumprod(1 - betas), rtol=1e-12)
    np.testing.assert_allclose(params["sqrt_alphas_cumprod"] ** 2, params["alphas_cumprod"], rtol=1e-12)
    np.testing.assert_allclose(params["sqrt_1m_alphas_cumprod"] ** 2, 1 - params["alphas_cumprod"], rtol=1e-12)
    # The continuous-time betas that these discrete steps approximate: N·beta_i at the ends, times (N - 1)/N.
    assert params["beta_min"] == pytest.approx(0.1 * 999 / 1000, rel=1e-12)
    assert params["beta_max"] == pytest.approx(20.0 * 999 / 1000, rel=1e-12)


def test_flattened_numpy_round_trip():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 1))
    flat = mutils.to_flattened_numpy(x)
    assert isinstance(flat, np.ndarray) and flat.shape == (24,) and flat.dtype == np.float32
    np.testing.assert_array_equal(flat, np.asarray(x).ravel())  # row-major, as scipy's solvers see it
    back = mutils.from_flattened_numpy(flat.astype(np.float64), (2, 3, 4, 1))
    assert isinstance(back, jax.Array) and back.shape == (2, 3, 4, 1)
    np.testing.assert_array_equal(back, x)


# --------------------------------------------------------------------------- create_classifier

@pytest.fixture
def tiny_classifier(monkeypatch):
    """create_classifier builds WRN-16-1 instead of WRN-28-10: the same code path, small enough to initialise."""
    wide = wideresnet_noise_conditional.WideResnet
    monkeypatch.setattr(wideresnet_noise_conditional, "WideResnet",
                        lambda **kw: wide(**{**kw, "blocks_per_group": 1, "channel_multiplier": 1}))


def _trained_params():
    """Parameters unlike any initialisation (as a trained classifier's): init of key 5 plus noise."""
    _, params = mutils.create_classifier(jax.random.PRNGKey(5), 1, random_init=True)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(6), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _flax_031_layout(params):
    """The released (flax 0.3.1) layout: GroupNorm scale and bias of shape (1, 1, 1, C)."""
    flat = flax.traverse_util.flatten_dict(params)
    groupnorms = {key[:-1] for key in flat if key[-1] == "scale"}
    return flax.traverse_util.unflatten_dict(
        {key: np.asarray(v).reshape((1, 1, 1, -1)) if key[:-1] in groupnorms else np.asarray(v)
         for key, v in flat.items()})


def test_create_classifier_needs_a_checkpoint_or_random_init():
    with pytest.raises(ValueError, match=r"ckpt_path=None, random_init=False\): give the classifier's checkpoint"):
        mutils.create_classifier(jax.random.PRNGKey(0), 1)
    with pytest.raises(ValueError, match="random_init=True"):
        mutils.create_classifier(jax.random.PRNGKey(0), 1, ckpt_path="ckpt", random_init=True)


@pytest.mark.parametrize("layout", ["ours", "flax_0.3.1"])
def test_create_classifier_loads_its_checkpoint(tmp_path, tiny_classifier, layout):
    trained = _trained_params()
    if layout == "ours":
        checkpoints.save_checkpoint(str(tmp_path), trained, step=3)
        shapes = lambda tree: [np.shape(x) for x in jax.tree_util.tree_leaves(tree)]  # noqa: E731
        assert shapes(_flax_031_layout(trained)) != shapes(trained)  # the other case does reshape something
    else:
        (tmp_path / "checkpoint_7").write_bytes(flax.serialization.msgpack_serialize(_flax_031_layout(trained)))
    for ckpt_path in (str(tmp_path), str(next(tmp_path.iterdir()))):  # the folder, or the file itself
        classifier, params = mutils.create_classifier(jax.random.PRNGKey(0), 2, ckpt_path)
        for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(trained)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
    sigmas = jnp.array([0.5, 5.0])
    logits = jax.jit(mutils.get_logit_fn(classifier, params))(images, sigmas)
    normalised = (images - jnp.asarray(mutils._CIFAR10_MEAN)) / jnp.asarray(mutils._CIFAR10_STD)
    expected = jax.jit(lambda p, x: classifier.apply({"params": p}, x, sigmas, train=False))(trained, normalised)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_create_classifier_rejects_missing_and_foreign_checkpoints(tmp_path, tiny_classifier):
    with pytest.raises(FileNotFoundError, match="No classifier checkpoint at .*nowhere"):
        mutils.create_classifier(jax.random.PRNGKey(0), 1, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="No classifier checkpoint at"):  # a folder without checkpoint_<n>
        mutils.create_classifier(jax.random.PRNGKey(0), 1, str(tmp_path))
    trained = _trained_params()
    flat = flax.traverse_util.flatten_dict(trained)
    key = next(k for k in flat if k[-1] == "kernel")
    wrong_shape = flax.traverse_util.unflatten_dict({**flat, key: np.zeros((1,) + flat[key].shape)})
    checkpoints.save_checkpoint(str(tmp_path / "shape"), wrong_shape, step=1)
    with pytest.raises(ValueError, match=f"classifier parameter {'/'.join(key)} has shape"):
        mutils.create_classifier(jax.random.PRNGKey(0), 1, str(tmp_path / "shape"))
    checkpoints.save_checkpoint(str(tmp_path / "other"), {"dense": {"kernel": np.ones((2, 2))}}, step=1)
    with pytest.raises(ValueError, match="not a checkpoint of the WRN-28-10 classifier's parameters: missing"):
        mutils.create_classifier(jax.random.PRNGKey(0), 1, str(tmp_path / "other"))
