"""losses.py: each loss against a direct computation, the optimizer against flax.optim.Adam's rule."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import losses
from models import utils as mutils
from score_sde import parallel
from tests.helpers import SDE_NAMES, make_sde

SHAPE = (3, 4, 4, 2)


class TinyScoreNet(nn.Module):
    """A few-parameter time-conditional network: enough to make losses and gradients non-trivial."""

    config: ml_collections.ConfigDict
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x, labels, train: bool = False):
        cond = nn.Dense(4)(jnp.log1p(jnp.abs(labels.astype(jnp.float32)))[:, None])
        h = nn.Conv(4, (3, 3))(x) + cond[:, None, None, :]
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.swish(h))
        return nn.Conv(x.shape[-1], (3, 3))(h)


def _model_and_params(dropout=0.5):
    """The tiny network; ``dropout=0`` makes its training-mode output deterministic (formula-checkable)."""
    model = TinyScoreNet(config=ml_collections.ConfigDict(), dropout=dropout)
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


def _direct_sde_loss(sde_name, model, params, data, rng, reduce_mean, likelihood_weighting, eps):
    """The continuous DSM loss written out in float64 numpy from the paper's formulas."""
    k_t, k_z, _ = _keys(rng, 3)
    n = data.shape[0]
    t = np.asarray(jax.random.uniform(k_t, (n,), minval=eps, maxval=1.0), np.float64)
    z = np.asarray(jax.random.normal(k_z, data.shape), np.float64)
    x0 = np.asarray(data, np.float64)
    b0, b1 = 0.1, 20.0
    log_a = -0.25 * t ** 2 * (b1 - b0) - 0.5 * t * b0  # log of the VP mean coefficient
    if sde_name == "vpsde":
        mean_coef, std = np.exp(log_a), np.sqrt(1.0 - np.exp(2 * log_a))
        g2 = b0 + t * (b1 - b0)
        label = 999 * t
    elif sde_name == "subvpsde":
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
    score = -out / std[:, None, None, None] if sde_name != "vesde" else out
    if likelihood_weighting:
        per_dim = (score + z / std[:, None, None, None]) ** 2
    else:
        per_dim = (score * std[:, None, None, None] + z) ** 2
    per_dim = per_dim.reshape(n, -1)
    per_example = per_dim.mean(-1) if reduce_mean else 0.5 * per_dim.sum(-1)
    if likelihood_weighting:
        per_example = per_example * g2
    return per_example.mean()


@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("reduce_mean", [True, False])
@pytest.mark.parametrize("likelihood_weighting", [False, True])
def test_sde_loss_equals_direct_computation(sde_name, reduce_mean, likelihood_weighting):
    model, params = _model_and_params()
    batch = _batch()
    rng = jax.random.PRNGKey(3)
    eps = 1e-5
    loss_fn = losses.get_sde_loss_fn(make_sde(sde_name), model, train=False, reduce_mean=reduce_mean,
                                     continuous=True, likelihood_weighting=likelihood_weighting, eps=eps)
    loss, new_state = jax.jit(loss_fn)(rng, params, {}, batch)
    expected = _direct_sde_loss(sde_name, model, params, batch["image"], rng, reduce_mean, likelihood_weighting, eps)
    assert new_state == {}
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)


def _direct_smld_loss(model, params, data, rng, n_scales, reduce_mean):
    """The SMLD (NCSN) loss written out in float64: noise level ``sigma_i``, weight ``sigma_i²``."""
    k_label, k_noise, _ = _keys(rng, 3)
    n = data.shape[0]
    labels = np.asarray(jax.random.choice(k_label, n_scales, shape=(n,)))
    sigmas_desc = np.exp(np.linspace(np.log(50.0), np.log(0.01), n_scales))
    sigma = sigmas_desc[labels][:, None, None, None]
    noise = np.asarray(jax.random.normal(k_noise, data.shape), np.float64) * sigma
    out = _apply(model, params, jnp.asarray(np.asarray(data) + noise, jnp.float32), jnp.asarray(labels))
    per_dim = ((out + noise / sigma ** 2) ** 2).reshape(n, -1)
    per_example = per_dim.mean(-1) if reduce_mean else 0.5 * per_dim.sum(-1)
    return (per_example * sigma.ravel() ** 2).mean()


def _direct_ddpm_loss(model, params, data, rng, n_scales, reduce_mean):
    """The DDPM loss written out in float64: ``|eps_theta(sqrt(abar) x + sqrt(1 - abar) z, i) - z|²``."""
    k_label, k_noise, _ = _keys(rng, 3)
    n = data.shape[0]
    labels = np.asarray(jax.random.choice(k_label, n_scales, shape=(n,)))
    betas = np.linspace(0.1 / n_scales, 20.0 / n_scales, n_scales)
    abar = np.cumprod(1 - betas)[labels][:, None, None, None]
    noise = np.asarray(jax.random.normal(k_noise, data.shape), np.float64)
    xt = np.sqrt(abar) * np.asarray(data) + np.sqrt(1 - abar) * noise
    out = _apply(model, params, jnp.asarray(xt, jnp.float32), jnp.asarray(labels))
    per_dim = ((out - noise) ** 2).reshape(n, -1)
    return (per_dim.mean(-1) if reduce_mean else 0.5 * per_dim.sum(-1)).mean()


def test_smld_loss_equals_direct_computation():
    model, params = _model_and_params()
    batch, rng = _batch(), jax.random.PRNGKey(4)
    loss, _ = losses.get_smld_loss_fn(make_sde("vesde", 10), model, train=False, reduce_mean=False)(
        rng, params, {}, batch)
    np.testing.assert_allclose(float(loss), _direct_smld_loss(model, params, batch["image"], rng, 10, False),
                               rtol=2e-5)


def test_ddpm_loss_equals_direct_computation():
    model, params = _model_and_params()
    batch, rng = _batch(), jax.random.PRNGKey(6)
    loss, _ = losses.get_ddpm_loss_fn(make_sde("vpsde"), model, train=False, reduce_mean=True)(
        rng, params, {}, batch)
    np.testing.assert_allclose(float(loss), _direct_ddpm_loss(model, params, batch["image"], rng, 1000, True),
                               rtol=2e-5)


def test_discrete_losses_reject_the_wrong_sde():
    model, _ = _model_and_params()
    with pytest.raises(ValueError, match="VE SDE"):
        losses.get_smld_loss_fn(make_sde("vpsde"), model, train=True)
    with pytest.raises(ValueError, match="VP SDE"):
        losses.get_ddpm_loss_fn(make_sde("vesde"), model, train=True)
    with pytest.raises(ValueError, match="likelihood_weighting"):
        losses.get_step_fn(make_sde("vpsde"), model, train=True, optimize_fn=lambda s, g: None, continuous=False,
                           likelihood_weighting=True)


def _optim_config(warmup, grad_clip, weight_decay):
    config = ml_collections.ConfigDict()
    config.optim = ml_collections.ConfigDict(dict(optimizer="Adam", lr=2e-2, beta1=0.9, eps=1e-8,
                                                  weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip))
    config.model = ml_collections.ConfigDict(dict(ema_rate=0.9))
    return config


def _flax_optim_adam_reference(params, grads_per_step, lr, warmup, grad_clip, weight_decay, ema_rate,
                               params_ema=None, beta1=0.9, beta2=0.999, eps=1e-8):
    """The original's rule (flax.optim.Adam + optimization_manager + EMA) written out in float64 on the leaves of
    ``params`` (EMA from ``params_ema``, default ``params``); returns ``(params, params_ema)`` as leaf lists."""
    leaves = jax.tree_util.tree_leaves
    p = [np.asarray(x, np.float64) for x in leaves(params)]
    ema = [np.asarray(x, np.float64) for x in leaves(params if params_ema is None else params_ema)]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    for step, grads in enumerate(grads_per_step):
        step_lr = lr * min(step / warmup, 1.0) if warmup > 0 else lr
        g = [np.asarray(x, np.float64) for x in leaves(grads)]
        if grad_clip >= 0:
            norm = np.sqrt(sum((x ** 2).sum() for x in g))
            g = [x * grad_clip / max(norm, grad_clip) for x in g]
        for k in range(len(p)):
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
    for got, want in zip(jax.tree_util.tree_leaves((state.params, state.params_ema)), expected_p + expected_ema):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-6)
    if warmup > 0:
        # lr·min(0/warmup, 1) = 0: the first step leaves the parameters where they were.
        first, _ = optimize_fn(state.replace(step=0), grads[0])
        np.testing.assert_array_equal(np.asarray(first["a"]), np.asarray(state.params["a"]))


def _state_with_distinct_ema(params, config):
    """A training state whose ``params_ema`` is far from ``params`` (as after many steps), so a step that used the
    wrong one cannot pass."""
    params_ema = jax.tree_util.tree_map(lambda p: 0.5 * p - 0.2, params)
    return mutils.State(step=3, params=params, opt_state=losses.get_optimizer(config).init(params),
                        lr=config.optim.lr, model_state={}, ema_rate=0.9, params_ema=params_ema,
                        rng=jax.random.PRNGKey(0))


def _run_step(step_fn, rng, state, batch):
    """``step_fn`` under ``pmap`` on one device; returns ``(new_rng, new_state, loss)`` of that device."""
    (new_rng, new_state), loss = parallel.pmap(step_fn)(parallel.replicate((rng, state)), parallel.replicate(batch))
    return new_rng[0], parallel.unreplicate(new_state), float(loss[0])


def test_train_step_fn_applies_grad_optimizer_and_ema():
    """get_step_fn(train=True) = value_and_grad of the loss at params, Adam (the original's rule), EMA, step + 1."""
    model, params = _model_and_params(dropout=0.0)  # deterministic in training mode: the loss has a formula
    sde = make_sde("vpsde")
    config = _optim_config(warmup=0, grad_clip=1.0, weight_decay=0.0)
    state = _state_with_distinct_ema(params, config)
    step_fn = losses.get_step_fn(sde, model, train=True, optimize_fn=losses.optimization_manager(config),
                                 reduce_mean=True)
    batch, rng = _batch(), jax.random.PRNGKey(11)
    new_rng, new_state, loss = _run_step(step_fn, rng, state, batch)

    next_rng, step_rng = jax.random.split(rng)
    np.testing.assert_array_equal(np.asarray(new_rng), np.asarray(next_rng))
    np.testing.assert_allclose(loss, _direct_sde_loss("vpsde", model, params, batch["image"], step_rng, True, False,
                                                      1e-5), rtol=2e-5)
    loss_fn = losses.get_sde_loss_fn(sde, model, train=True, reduce_mean=True, likelihood_weighting=False)
    grad = jax.grad(lambda p: loss_fn(step_rng, p, {}, batch)[0])(params)
    # One step of the original's Adam from a fresh optimizer state (the state's step 3 only matters for warmup).
    want_params, want_ema = _flax_optim_adam_reference(params, [grad], config.optim.lr, 0, 1.0, 0.0, 0.9,
                                                       params_ema=state.params_ema)
    assert int(new_state.step) == 4
    for got, want, old in zip(jax.tree_util.tree_leaves(new_state.params), want_params,
                              jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
        assert not np.allclose(np.asarray(got), np.asarray(old))
    for got, want in zip(jax.tree_util.tree_leaves(new_state.params_ema), want_ema):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sde_name", SDE_NAMES)
def test_eval_step_scores_params_ema_and_keeps_the_state(sde_name):
    model, params = _model_and_params()
    state = _state_with_distinct_ema(params, _optim_config(warmup=0, grad_clip=1.0, weight_decay=0.0))
    eval_fn = losses.get_step_fn(make_sde(sde_name), model, train=False, reduce_mean=False)
    batch, rng = _batch(), jax.random.PRNGKey(12)
    new_rng, new_state, loss = _run_step(eval_fn, rng, state, batch)
    next_rng, step_rng = jax.random.split(rng)
    at_ema, at_params = (_direct_sde_loss(sde_name, model, p, batch["image"], step_rng, False, False, 1e-5)
                         for p in (state.params_ema, state.params))
    assert abs(at_ema - at_params) > 1e-2 * abs(at_ema)  # the two parameter sets are told apart
    np.testing.assert_allclose(loss, at_ema, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(new_rng), np.asarray(next_rng))
    for got, want in zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(state)):
        got = np.asarray(got)  # replicated: Python scalars (lr, ema_rate, step) became 32-bit arrays
        np.testing.assert_array_equal(got, np.asarray(want, got.dtype))


@pytest.mark.parametrize("sde_name, direct, reduce_mean", [("vesde", _direct_smld_loss, False),
                                                           ("vpsde", _direct_ddpm_loss, True),
                                                           ("vpsde", _direct_ddpm_loss, False)])
def test_discrete_step_fn_uses_the_smld_or_ddpm_loss(sde_name, direct, reduce_mean):
    """continuous=False: SMLD for VE, DDPM for VP, on the SDE's N levels; training at params, evaluation at EMA."""
    model, params = _model_and_params(dropout=0.0)
    config = _optim_config(warmup=0, grad_clip=1.0, weight_decay=0.0)
    state = _state_with_distinct_ema(params, config)
    sde = make_sde(sde_name, 20)
    batch, rng = _batch(), jax.random.PRNGKey(13)
    _, step_rng = jax.random.split(rng)
    eval_fn = losses.get_step_fn(sde, model, train=False, reduce_mean=reduce_mean, continuous=False)
    _, _, eval_loss = _run_step(eval_fn, rng, state, batch)
    np.testing.assert_allclose(eval_loss, direct(model, state.params_ema, batch["image"], step_rng, 20, reduce_mean),
                               rtol=2e-5)
    train_fn = losses.get_step_fn(sde, model, train=True, optimize_fn=losses.optimization_manager(config),
                                  reduce_mean=reduce_mean, continuous=False)
    _, new_state, train_loss = _run_step(train_fn, rng, state, batch)
    np.testing.assert_allclose(train_loss, direct(model, params, batch["image"], step_rng, 20, reduce_mean),
                               rtol=2e-5)
    loss_fn = (losses.get_smld_loss_fn if sde_name == "vesde" else losses.get_ddpm_loss_fn)(
        sde, model, train=True, reduce_mean=reduce_mean)
    grad = jax.grad(lambda p: loss_fn(step_rng, p, {}, batch)[0])(params)
    want_params, _ = _flax_optim_adam_reference(params, [grad], config.optim.lr, 0, 1.0, 0.0, 0.9)
    for got, want in zip(jax.tree_util.tree_leaves(new_state.params), want_params):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)


def test_discrete_step_fn_rejects_subvp():
    model, _ = _model_and_params()
    with pytest.raises(ValueError, match=r"subVPSDE.*config\.training\.continuous=True"):
        losses.get_step_fn(make_sde("subvpsde"), model, train=False, continuous=False)
