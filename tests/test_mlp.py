"""The ``mlp`` score model, the ``GMM`` dataset and mixture training through ``run_lib``'s train step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.subvp import gmm as subvp_gmm
from configs.ve import gmm as ve_gmm
from configs.vp import gmm as vp_gmm
from models import utils as mutils
from score_sde import datasets, mixture_training, mixtures


def tiny(config, dim: int = 2):
    """A GMM config with a tiny network (fast tests)."""
    config.data.dim = config.data.num_channels = dim
    config.model.nf = 32
    config.model.num_res_blocks = 1
    config.training.batch_size = 128
    config.training.n_jitted_steps = 10
    config.model.ema_rate = 0.9
    config.optim.warmup = 20
    return config


@pytest.mark.parametrize("make", [vp_gmm.get_config, ve_gmm.get_config, subvp_gmm.get_config])
def test_mlp_is_registered_and_keeps_the_shape(make):
    config = tiny(make(), dim=3)
    assert "mlp" in mutils.registered_models()
    model, states, params = mutils.init_model(jax.random.PRNGKey(0), config)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 1, 1, 3))
    labels = jnp.linspace(0.1, 20.0, 5)
    out = model.apply({"params": params, **states}, x, labels, train=False)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    # The output depends on the time label (the embedding reaches the network). The blocks' last
    # layers start at zero (each block the identity), so perturb every weight first.
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params = jax.tree_util.tree_unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    out = model.apply({"params": params, **states}, x, labels, train=False)
    other = model.apply({"params": params, **states}, x, labels[::-1], train=False)
    assert float(jnp.max(jnp.abs(out - other))) > 0


def test_mlp_rejects_data_of_another_shape():
    config = tiny(vp_gmm.get_config())
    model, states, params = mutils.init_model(jax.random.PRNGKey(0), config)
    with pytest.raises(ValueError, match="num_channels"):
        model.apply({"params": params}, jnp.zeros((4, 1, 1, 5)), jnp.ones(4), train=False)


def test_ve_mlp_output_scales_as_one_over_sigma():
    """scale_by_sigma: a VE score network of order 1/σ (the score of N(0, σ²) at x ~ σ)."""
    config = tiny(ve_gmm.get_config())
    model, _, params = mutils.init_model(jax.random.PRNGKey(0), config)
    x = jax.random.normal(jax.random.PRNGKey(1), (256, 1, 1, 2))
    small = model.apply({"params": params}, 0.01 * x, jnp.full(256, 0.01), train=False)
    large = model.apply({"params": params}, 50.0 * x, jnp.full(256, 50.0), train=False)
    ratio = float(jnp.std(small) / jnp.std(large))
    assert 100 < ratio < 25000  # (50 / 0.01 = 5000 up to the network's dependence on σ)


def test_gmm_dataset_draws_the_mixture():
    config = tiny(vp_gmm.get_config())
    config.eval.batch_size = 500
    train_ds, eval_ds, source = datasets.get_dataset(config, additional_dim=2, evaluation=False)
    batch = next(iter(train_ds))["image"].numpy()
    assert batch.shape == (1, 2, 128, 1, 1, 2)
    test = source.splits["test"][0].reshape(-1, 2)
    mixture = mixtures.make_mixture(2)
    expected_mean = np.asarray(jnp.sum(mixture.weights[:, None] * mixture.means, axis=0))
    np.testing.assert_allclose(test.mean(0), expected_mean, atol=0.1)  # 5,000 points: se ≈ 0.03
    eval_batch = next(iter(datasets.get_dataset(config, evaluation=True)[1]))["image"].numpy()
    assert eval_batch.shape == (1, 500, 1, 1, 2)


def test_gmm_dataset_names_the_fields_of_a_bad_config():
    config = tiny(vp_gmm.get_config())
    config.data.num_channels = 3
    config.data.centered = True
    with pytest.raises(ValueError, match=r"num_channels = 3.*config.data.dim = 2.*centered"):
        datasets.get_dataset(config)


def test_short_training_on_the_2d_mixture_lowers_the_loss():
    config = tiny(vp_gmm.get_config())
    model, params_ema, history = mixture_training.train(config, 150, jax.random.PRNGKey(0))
    assert len(history) == 150 and np.all(np.isfinite(history))
    _, _, init_params = mutils.init_model(jax.random.split(jax.random.PRNGKey(0))[1], config)
    key = jax.random.PRNGKey(7)
    before = float(mixture_training.loss_fn(config, model, init_params, key, 4000))
    after = float(mixture_training.loss_fn(config, model, params_ema, key, 4000))
    assert after < 0.8 * before, (before, after)
    # And the trained score is closer to the exact one than the initial network's, at a middle time.
    sde, _ = mixture_training.sde_lib.get_sde(config)
    x = mixtures.make_mixture(2).sample(jax.random.PRNGKey(3), 1000)
    t = jnp.full(1000, 0.5)
    xt = sde.marginal_prob(x, t)[0] + sde.marginal_prob(x, t)[1][:, None] * jax.random.normal(key, x.shape)
    exact = mixtures.make_mixture(2).score(sde, xt, t)
    err = lambda p: float(jnp.mean((mixture_training.score_fn(sde, model, p, 2)(xt, t) - exact) ** 2))
    assert err(params_ema) < 0.8 * err(init_params)
