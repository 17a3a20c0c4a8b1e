"""losses.py: each loss against a direct computation, the optimizer against flax.optim.Adam's rule."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import losses
import sde_lib
from models import utils as mutils
from score_sde import parallel

SHAPE = (3, 4, 4, 2)


class TinyScoreNet(nn.Module):
    """A few-parameter time-conditional network: enough to make losses and gradients non-trivial."""

    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x, labels, train: bool = False):
        cond = nn.Dense(4)(jnp.log1p(jnp.abs(labels.astype(jnp.float32)))[:, None])
        h = nn.Conv(4, (3, 3))(x) + cond[:, None, None, :]
        h = nn.Dropout(0.5, deterministic=not train)(nn.swish(h))
        return nn.Conv(x.shape[-1], (3, 3))(h)


def _model_and_params():
    model = TinyScoreNet(config=ml_collections.ConfigDict())
    variables = model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                           jnp.zeros(SHAPE), jnp.zeros(SHAPE[:1]), train=False)
    # Push the weights away from their initial scale so the network output matters.
    params = jax.tree_util.tree_map(lambda p: p + 0.3 * jnp.ones_like(p), variables["params"])
    return model, params


def _batch():
    return {"image": jax.random.uniform(jax.random.PRNGKey(5), SHAPE, minval=-1.0, maxval=1.0)}


def _keys(rng, n):
    """The keys the original's loss functions draw: ``rng, k = split(rng)`` ``n`` times."""
    out = []
    for _ in range(n):
        rng, k = jax.random.split(rng)
        out.append(k)
    return out


def _apply(model, params, x, labels):
    return np.asarray(model.apply({"params": params}, x, labels, train=False), np.float64)


SDES = {
    "vp": lambda: sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000),
    "subvp": lambda: sde_lib.subVPSDE(beta_min=0.1, beta_max=20.0, N=1000),
    "ve": lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=1000),
}


def _direct_sde_loss(sde_name, model, params, data, rng, reduce_mean, likelihood_weighting, eps):
    """The continuous DSM loss written out in float64 numpy from the paper's formulas."""
    k_t, k_z, _ = _keys(rng, 3)
    n = data.shape[0]
    t = np.asarray(jax.random.uniform(k_t, (n,), minval=eps, maxval=1.0), np.float64)
    z = np.asarray(jax.random.normal(k_z, data.shape), np.float64)
    x0 = np.asarray(data, np.float64)
    b0, b1 = 0.1, 20.0
    log_a = -0.25 * t ** 2 * (b1 - b0) - 0.5 * t * b0  # log of the VP mean coefficient
    if sde_name == "vp":
        mean_coef, std = np.exp(log_a), np.sqrt(1.0 - np.exp(2 * log_a))
        g2 = b0 + t * (b1 - b0)
        label = 999 * t
    elif sde_name == "subvp":
        mean_coef, std = np.exp(log_a), 1.0 - np.exp(2 * log_a)
        g2 = (b0 + t * (b1 - b0)) * (1.0 - np.exp(-2 * b0 * t - (b1 - b0) * t ** 2))
        label = 999 * t
    else:
        smin, smax = 0.01, 50.0
        mean_coef, std = np.ones_like(t), smin * (smax / smin) ** t
        g2 = std ** 2 * 2 * np.log(smax / smin)
        label = std
    xt = mean_coef[:, None, None, None] * x0 + std[:, None, None, None] * z
    out = _apply(model, params, jnp.asarray(xt, jnp.float32), jnp.asarray(label, jnp.float32))
    score = -out / std[:, None, None, None] if sde_name != "ve" else out
    if likelihood_weighting:
        per_dim = (score + z / std[:, None, None, None]) ** 2
    else:
        per_dim = (score * std[:, None, None, None] + z) ** 2
    per_dim = per_dim.reshape(n, -1)
    per_example = per_dim.mean(-1) if reduce_mean else 0.5 * per_dim.sum(-1)
    if likelihood_weighting:
        per_example = per_example * g2
    return per_example.mean()


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("reduce_mean", [True, False])
@pytest.mark.parametrize("likelihood_weighting", [False, True])
def test_sde_loss_equals_direct_computation(sde_name, reduce_mean, likelihood_weighting):
    model, params = _model_and_params()
    batch = _batch()
    rng = jax.random.PRNGKey(3)
    eps = 1e-5
    loss_fn = losses.get_sde_loss_fn(SDES[sde_name](), model, train=False, reduce_mean=reduce_mean,
                                     continuous=True, likelihood_weighting=likelihood_weighting, eps=eps)
    loss, new_state = jax.jit(loss_fn)(rng, params, {}, batch)
    expected = _direct_sde_loss(sde_name, model, params, batch["image"], rng, reduce_mean, likelihood_weighting, eps)
    assert new_state == {}
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)


def test_smld_loss_equals_direct_computation():
    model, params = _model_and_params()
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=10)
    batch = _batch()
    rng = jax.random.PRNGKey(4)
    loss, _ = losses.get_smld_loss_fn(sde, model, train=False, reduce_mean=False)(rng, params, {}, batch)
    k_label, k_noise, _ = _keys(rng, 3)
    labels = np.asarray(jax.random.choice(k_label, 10, shape=(SHAPE[0],)))
    sigmas_desc = np.exp(np.linspace(np.log(50.0), np.log(0.01), 10))
    sigma = sigmas_desc[labels][:, None, None, None]
    noise = np.asarray(jax.random.normal(k_noise, SHAPE), np.float64) * sigma
    out = _apply(model, params, jnp.asarray(np.asarray(batch["image"]) + noise, jnp.float32), jnp.asarray(labels))
    per_example = 0.5 * ((out + noise / sigma ** 2) ** 2).reshape(SHAPE[0], -1).sum(-1) * sigma.ravel() ** 2
    np.testing.assert_allclose(float(loss), per_example.mean(), rtol=2e-5)


def test_ddpm_loss_equals_direct_computation():
    model, params = _model_and_params()
    sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000)
    batch = _batch()
    rng = jax.random.PRNGKey(6)
    loss, _ = losses.get_ddpm_loss_fn(sde, model, train=False, reduce_mean=True)(rng, params, {}, batch)
    k_label, k_noise, _ = _keys(rng, 3)
    labels = np.asarray(jax.random.choice(k_label, 1000, shape=(SHAPE[0],)))
    betas = np.linspace(0.1 / 1000, 20.0 / 1000, 1000)
    abar = np.cumprod(1 - betas)[labels][:, None, None, None]
    noise = np.asarray(jax.random.normal(k_noise, SHAPE), np.float64)
    xt = np.sqrt(abar) * np.asarray(batch["image"]) + np.sqrt(1 - abar) * noise
    out = _apply(model, params, jnp.asarray(xt, jnp.float32), jnp.asarray(labels))
    np.testing.assert_allclose(float(loss), ((out - noise) ** 2).reshape(SHAPE[0], -1).mean(-1).mean(), rtol=2e-5)


def test_discrete_losses_reject_the_wrong_sde():
    model, _ = _model_and_params()
    with pytest.raises(ValueError, match="VE SDE"):
        losses.get_smld_loss_fn(SDES["vp"](), model, train=True)
    with pytest.raises(ValueError, match="VP SDE"):
        losses.get_ddpm_loss_fn(SDES["ve"](), model, train=True)
    with pytest.raises(ValueError, match="likelihood_weighting"):
        losses.get_step_fn(SDES["vp"](), model, train=True, optimize_fn=lambda s, g: None, continuous=False,
                           likelihood_weighting=True)


def _optim_config(warmup, grad_clip, weight_decay):
    config = ml_collections.ConfigDict()
    config.optim = ml_collections.ConfigDict(dict(optimizer="Adam", lr=2e-2, beta1=0.9, eps=1e-8,
                                                  weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip))
    config.model = ml_collections.ConfigDict(dict(ema_rate=0.9))
    return config


def _flax_optim_adam_reference(params, grads_per_step, lr, warmup, grad_clip, weight_decay, ema_rate,
                               beta1=0.9, beta2=0.999, eps=1e-8):
    """The original's rule (flax.optim.Adam + optimization_manager + EMA) written out in float64."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    ema = dict(p)
    for step, grads in enumerate(grads_per_step):
        step_lr = lr * min(step / warmup, 1.0) if warmup > 0 else lr
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        if grad_clip >= 0:
            norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
            g = {k: x * grad_clip / max(norm, grad_clip) for k, x in g.items()}
        for k in p:
            m[k] = beta1 * m[k] + (1 - beta1) * g[k]
            v[k] = beta2 * v[k] + (1 - beta2) * g[k] ** 2
            m_hat = m[k] / (1 - beta1 ** (step + 1))
            v_hat = v[k] / (1 - beta2 ** (step + 1))
            p[k] = p[k] - step_lr * m_hat / (np.sqrt(v_hat) + eps) - step_lr * weight_decay * p[k]
            ema[k] = ema[k] * ema_rate + p[k] * (1 - ema_rate)
    return p, ema


@pytest.mark.parametrize("warmup,grad_clip,weight_decay", [(2, 1.0, 0.0), (0, 0.05, 0.1), (3, -1.0, 0.01)])
def test_optimizer_step_matches_flax_optim_adam_semantics(warmup, grad_clip, weight_decay):
    config = _optim_config(warmup, grad_clip, weight_decay)
    params = {"a": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array([[0.1, 0.2], [-0.3, 0.4]])}
    grads = [{"a": jnp.array([0.3, -0.2, 0.1]) * (s + 1), "b": jnp.array([[1.0, -2.0], [0.5, 0.25]]) / (s + 1)}
             for s in range(4)]
    state = mutils.State(step=0, params=params, opt_state=losses.get_optimizer(config).init(params),
                         lr=config.optim.lr, model_state={}, ema_rate=config.model.ema_rate, params_ema=params,
                         rng=jax.random.PRNGKey(0))
    optimize_fn = losses.optimization_manager(config)
    for g in grads:
        new_params, new_opt_state = optimize_fn(state, g)
        new_ema = jax.tree_util.tree_map(lambda e, p: e * state.ema_rate + p * (1 - state.ema_rate),
                                         state.params_ema, new_params)
        state = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state, params_ema=new_ema)
    expected_p, expected_ema = _flax_optim_adam_reference(params, grads, config.optim.lr, warmup, grad_clip,
                                                          weight_decay, config.model.ema_rate)
    # float32 round-off: up to ~6e-7 after 4 steps of size lr = 2e-2 (with jax_enable_x64 the port
    # agrees with this float64 reference to 1e-9).
    for k in params:
        np.testing.assert_allclose(np.asarray(state.params[k]), expected_p[k], rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(np.asarray(state.params_ema[k]), expected_ema[k], rtol=1e-5, atol=2e-6)
    if warmup > 0:
        # lr·min(0/warmup, 1) = 0: the first step leaves the parameters where they were.
        first, _ = optimize_fn(state.replace(step=0), grads[0])
        np.testing.assert_array_equal(np.asarray(first["a"]), np.asarray(state.params["a"]))


def test_train_step_fn_applies_grad_optimizer_and_ema():
    """get_step_fn(train=True) = value_and_grad of the loss, optimize_fn, EMA, step + 1 (under pmap)."""
    model, params = _model_and_params()
    sde = SDES["vp"]()
    config = _optim_config(warmup=0, grad_clip=1.0, weight_decay=0.0)
    state = mutils.State(step=0, params=params, opt_state=losses.get_optimizer(config).init(params),
                         lr=config.optim.lr, model_state={}, ema_rate=0.9, params_ema=params,
                         rng=jax.random.PRNGKey(0))
    optimize_fn = losses.optimization_manager(config)
    step_fn = losses.get_step_fn(sde, model, train=True, optimize_fn=optimize_fn, reduce_mean=True)
    batch = _batch()
    rng = jax.random.PRNGKey(11)
    (new_rng, new_state), loss = parallel.pmap(step_fn)(
        parallel.replicate((rng, state)), parallel.replicate(batch))
    new_state = parallel.unreplicate(new_state)

    _, step_rng = jax.random.split(rng)
    loss_fn = losses.get_sde_loss_fn(sde, model, train=True, reduce_mean=True, likelihood_weighting=False)
    (expected_loss, _), grad = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(step_rng, params, {}, batch)
    expected_params, _ = optimize_fn(state, grad)
    assert int(new_state.step) == 1
    np.testing.assert_array_equal(np.asarray(new_rng[0]), np.asarray(jax.random.split(rng)[0]))
    np.testing.assert_allclose(float(loss[0]), float(expected_loss), rtol=1e-5)
    for got, want, old in zip(jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(expected_params),
                              jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
        assert not np.allclose(np.asarray(got), np.asarray(old))
    for ema, new, old in zip(jax.tree_util.tree_leaves(new_state.params_ema),
                             jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(np.asarray(ema), 0.9 * np.asarray(old) + 0.1 * np.asarray(new), rtol=1e-6)

    # The evaluation step scores params_ema and leaves the state alone.
    eval_fn = losses.get_step_fn(sde, model, train=False, reduce_mean=True)
    (_, same_state), eval_loss = parallel.pmap(eval_fn)(parallel.replicate((rng, state)), parallel.replicate(batch))
    eval_only = losses.get_sde_loss_fn(sde, model, train=False, reduce_mean=True, likelihood_weighting=False)
    np.testing.assert_allclose(float(eval_loss[0]), float(eval_only(step_rng, params, {}, batch)[0]), rtol=1e-5)
    assert int(parallel.unreplicate(same_state).step) == 0
