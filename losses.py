"""Training objectives and optimisation: DSM / SMLD / DDPM losses, Adam, ``get_step_fn``.

The losses are denoising score matching in three flavours (Song et al., ICLR 2021, Eq. 7):

* :func:`get_sde_loss_fn` — continuous time ``t ~ U(eps, T)`` for any SDE, with either the
  paper's weighting ``λ(t) = std(t)²`` or likelihood weighting ``λ(t) = g(t)²``
  (Song et al., 2021, "Maximum Likelihood Training of Score-Based Diffusion Models"), the latter
  optionally with importance-sampled time (VP / sub-VP, as that paper's code, score_flow).
* :func:`get_smld_loss_fn` — NCSN's discrete noise levels (VE SDE only).
* :func:`get_ddpm_loss_fn` — DDPM's ε-prediction on the discrete schedule (VP SDE only).

Every ``loss_fn(rng, params, states, batch)`` takes ``batch['image']`` of shape
``(batch, H, W, C)`` in the model's input scale (after the data scaler) and returns
``(scalar loss, new model state)``. Random numbers are drawn in the same order and with
the same key splits as the original code, so equal keys give equal losses.

Optimisation follows the original ``flax.optim.Adam`` (beta2 0.999, eps added to the square
root of the second moment, weight decay decoupled and scaled by the learning rate) driven by
:func:`optimization_manager` (linear warmup, global-norm clipping).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

import sde_lib
from models import utils as mutils
from score_sde import parallel
from sde_lib import batch_mul

# The original's flax.optim.Adam used beta2 = 0.999 and had no config field for it.
ADAM_BETA2 = 0.999


def get_optimizer(config) -> optax.GradientTransformation:
    """The optimizer of ``config.optim`` as an optax transformation *without* the learning rate.

    Its updates are the Adam direction ``m̂ / (sqrt(v̂) + eps)`` plus ``weight_decay · param``;
    :func:`optimization_manager` multiplies them by ``-lr`` (with warmup), which reproduces
    ``flax.optim.Adam``: ``p ← p − lr · (m̂ / (sqrt(v̂) + eps) + weight_decay · p)``.
    Keeping the learning rate outside lets it live in ``State.lr`` as in the original.

    Args:
        config: needs ``optim.optimizer`` ('Adam'), ``optim.beta1``, ``optim.eps``, ``optim.weight_decay``.
    """
    if config.optim.optimizer != "Adam":
        raise NotImplementedError(f"config.optim.optimizer={config.optim.optimizer!r} is not supported; use 'Adam'.")
    return optax.chain(
        optax.scale_by_adam(b1=config.optim.beta1, b2=ADAM_BETA2, eps=config.optim.eps),
        optax.add_decayed_weights(config.optim.weight_decay),
    )


def global_norm(tree) -> jax.Array:
    """Euclidean norm of all leaves of ``tree`` taken together."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def optimization_manager(config) -> Callable:
    """``optimize_fn(state, grad, warmup=..., grad_clip=...) -> (new_params, new_opt_state)``.

    One optimizer step from ``state.params`` / ``state.opt_state``:

    * learning rate ``state.lr · min(state.step / warmup, 1)`` when ``warmup > 0``
      (so the very first step, ``step = 0``, has learning rate 0, as in the original);
    * gradients clipped to global norm ``grad_clip``: ``g · clip / max(‖g‖, clip)``; disabled
      when ``grad_clip < 0``;
    * then the update of :func:`get_optimizer`.

    The original returned a new flax optimizer; here the two halves of it are returned.
    """
    optimizer = get_optimizer(config)

    def optimize_fn(state, grad, warmup=config.optim.warmup, grad_clip=config.optim.grad_clip):
        lr = state.lr
        if warmup > 0:
            lr = lr * jnp.minimum(state.step / warmup, 1.0)
        if grad_clip >= 0:
            norm = global_norm(grad)
            grad = jax.tree_util.tree_map(lambda g: g * grad_clip / jnp.maximum(norm, grad_clip), grad)
        updates, new_opt_state = optimizer.update(grad, state.opt_state, state.params)
        new_params = jax.tree_util.tree_map(lambda p, u: p - lr * u, state.params, updates)
        return new_params, new_opt_state

    return optimize_fn


def _reduce_op(reduce_mean: bool) -> Callable:
    """Per-example reduction over data dimensions: mean, or half the sum (the original's choice)."""
    if reduce_mean:
        return lambda x: jnp.mean(x, axis=-1)
    return lambda x: 0.5 * jnp.sum(x, axis=-1)


def get_sde_loss_fn(sde: sde_lib.SDE, model, train: bool, reduce_mean: bool = True, continuous: bool = True,
                    likelihood_weighting: bool = True, eps: float = 1e-5,
                    importance_weighting: bool = False) -> Callable:
    """Continuous-time denoising score matching for any SDE.

    For ``t ~ U(eps, T)``, ``z ~ N(0, I)`` and ``x_t = mean(x_0, t) + std(t) z``, the per-example loss is

    * ``reduce(‖s(x_t, t) · std + z‖²)``            (``likelihood_weighting=False``, λ = std²), or
    * ``reduce(‖s(x_t, t) + z / std‖²) · g(t)²``     (``likelihood_weighting=True``, λ = g²),

    where ``reduce`` is the mean over data dimensions (``reduce_mean``) or half their sum;
    the loss is the batch mean.

    With ``importance_weighting`` (needs ``likelihood_weighting``; VP and sub-VP only) ``t`` is drawn
    with density ``w(t) / Z``, ``w = g²/std²`` (``sde.sample_importance_weighted_time_for_likelihood``,
    ``Z = sde.likelihood_importance_cum_weight(T)``), and the per-example loss is
    ``reduce(‖s(x_t, t) · std + z‖²)``, as score_flow. Its expectation is the likelihood-weighted
    loss times ``(T - eps) / Z``: a constant, so the gradient direction is the same with far less
    variance (``w`` grows like ``1/t`` near 0). The constant is kept, not divided out, so that
    gradient clipping and learning rates act as in score_flow. ``mean`` and ``std`` come from
    ``sde.marginal_prob_high_precision``: the sampled times cluster near ``eps``, where the
    float32 ``1 - exp`` of ``marginal_prob`` loses digits.

    Args:
        sde: the forward SDE.
        model: the score network (Flax module).
        train: training loss (dropout on) or evaluation loss.
        reduce_mean: average instead of half-sum over data dimensions.
        continuous: the model takes continuous time (see ``models.utils.get_score_fn``).
        likelihood_weighting: weight by ``g(t)²`` instead of ``std(t)²``.
        eps: smallest time sampled.
        importance_weighting: sample ``t`` by importance (see above).

    Returns:
        ``loss_fn(rng, params, states, batch) -> (loss, new_model_state)``.
    """
    check_importance_weighting(sde, likelihood_weighting, importance_weighting, continuous)
    reduce_op = _reduce_op(reduce_mean)

    def loss_fn(rng, params, states, batch):
        score_fn = mutils.get_score_fn(sde, model, params, states, train=train, continuous=continuous,
                                       return_state=True)
        data = batch["image"]
        rng, step_rng = jax.random.split(rng)
        if importance_weighting:
            t = sde.sample_importance_weighted_time_for_likelihood(step_rng, (data.shape[0],), eps=eps)
        else:
            t = jax.random.uniform(step_rng, (data.shape[0],), minval=eps, maxval=sde.T)
        rng, step_rng = jax.random.split(rng)
        z = jax.random.normal(step_rng, data.shape)
        marginal_prob = sde.marginal_prob_high_precision if importance_weighting else sde.marginal_prob
        mean, std = marginal_prob(data, t)
        perturbed_data = mean + batch_mul(std, z)
        rng, step_rng = jax.random.split(rng)
        score, new_model_state = score_fn(perturbed_data, t, rng=step_rng)

        if likelihood_weighting and not importance_weighting:
            g2 = sde.sde(jnp.zeros_like(data), t)[1] ** 2
            residual = jnp.square(score + batch_mul(z, 1.0 / std))
            losses = reduce_op(residual.reshape((residual.shape[0], -1))) * g2
        else:
            residual = jnp.square(batch_mul(score, std) + z)
            losses = reduce_op(residual.reshape((residual.shape[0], -1)))
        return jnp.mean(losses), new_model_state

    return loss_fn


def check_importance_weighting(sde: sde_lib.SDE, likelihood_weighting: bool, importance_weighting: bool,
                               continuous: bool = True) -> None:
    """Raise ``ValueError`` for importance weighting where score_flow has none (naming the config fields)."""
    if not importance_weighting:
        return
    if not likelihood_weighting:
        raise ValueError("config.training.importance_weighting=True needs config.training.likelihood_weighting=True: "
                         "it samples time for the likelihood weighting g(t)^2 and means nothing without it.")
    if not continuous:
        raise ValueError("config.training.importance_weighting=True needs config.training.continuous=True; the "
                         "discrete SMLD/DDPM losses have no likelihood weighting.")
    if not hasattr(sde, "sample_importance_weighted_time_for_likelihood"):
        raise ValueError(f"config.training.importance_weighting=True is available for config.training.sde='vpsde' "
                         f"or 'subvpsde', not {type(sde).__name__} (score_flow has no importance distribution for "
                         "VE); set config.training.importance_weighting=False.")


def get_smld_loss_fn(vesde: sde_lib.VESDE, model, train: bool, reduce_mean: bool = False) -> Callable:
    """NCSN's loss on the VE SDE's discrete noise levels (kept to reproduce SMLD results).

    Label ``i ~ U{0..N-1}`` indexes the *descending* sigmas (``i = 0`` is ``sigma_max``); the
    network gets the integer label and the loss is ``reduce(‖s + noise/σ²‖²) · σ²``.

    Returns:
        ``loss_fn(rng, params, states, batch) -> (loss, new_model_state)``.
    """
    if not isinstance(vesde, sde_lib.VESDE):
        raise ValueError("SMLD training (config.training.continuous=False) only works with the VE SDE "
                         f"(config.training.sde='vesde'); got {type(vesde).__name__}.")
    smld_sigma_array = vesde.discrete_sigmas[::-1]
    reduce_op = _reduce_op(reduce_mean)

    def loss_fn(rng, params, states, batch):
        model_fn = mutils.get_model_fn(model, params, states, train=train)
        data = batch["image"]
        rng, step_rng = jax.random.split(rng)
        labels = jax.random.choice(step_rng, vesde.N, shape=(data.shape[0],))
        sigmas = smld_sigma_array[labels]
        rng, step_rng = jax.random.split(rng)
        noise = batch_mul(jax.random.normal(step_rng, data.shape), sigmas)
        perturbed_data = noise + data
        rng, step_rng = jax.random.split(rng)
        score, new_model_state = model_fn(perturbed_data, labels, rng=step_rng)
        target = -batch_mul(noise, 1.0 / (sigmas ** 2))
        residual = jnp.square(score - target)
        losses = reduce_op(residual.reshape((residual.shape[0], -1))) * sigmas ** 2
        return jnp.mean(losses), new_model_state

    return loss_fn


def get_ddpm_loss_fn(vpsde: sde_lib.VPSDE, model, train: bool, reduce_mean: bool = True) -> Callable:
    """DDPM's ε-prediction loss on the VP SDE's discrete schedule (kept to reproduce DDPM results).

    ``i ~ U{0..N-1}``, ``x_i = sqrt(ᾱ_i) x_0 + sqrt(1 − ᾱ_i) ε``; loss ``reduce(‖model(x_i, i) − ε‖²)``.

    Returns:
        ``loss_fn(rng, params, states, batch) -> (loss, new_model_state)``.
    """
    if not isinstance(vpsde, sde_lib.VPSDE):
        raise ValueError("DDPM training (config.training.continuous=False) only works with the VP SDE "
                         f"(config.training.sde='vpsde'); got {type(vpsde).__name__}.")
    reduce_op = _reduce_op(reduce_mean)

    def loss_fn(rng, params, states, batch):
        model_fn = mutils.get_model_fn(model, params, states, train=train)
        data = batch["image"]
        rng, step_rng = jax.random.split(rng)
        labels = jax.random.choice(step_rng, vpsde.N, shape=(data.shape[0],))
        rng, step_rng = jax.random.split(rng)
        noise = jax.random.normal(step_rng, data.shape)
        perturbed_data = (batch_mul(vpsde.sqrt_alphas_cumprod[labels], data)
                          + batch_mul(vpsde.sqrt_1m_alphas_cumprod[labels], noise))
        rng, step_rng = jax.random.split(rng)
        score, new_model_state = model_fn(perturbed_data, labels, rng=step_rng)
        residual = jnp.square(score - noise)
        losses = reduce_op(residual.reshape((residual.shape[0], -1)))
        return jnp.mean(losses), new_model_state

    return loss_fn


def get_step_fn(sde: sde_lib.SDE, model, train: bool, optimize_fn: Callable | None = None,
                reduce_mean: bool = False, continuous: bool = True, likelihood_weighting: bool = False,
                importance_weighting: bool = False, smallest_time: float = 1e-5) -> Callable:
    """One training or evaluation step, shaped for ``jax.lax.scan`` inside ``pmap``.

    ``step_fn((rng, state), batch) -> ((rng, new_state), loss)``. With ``train=True`` it
    differentiates the loss at ``state.params``, averages gradients over the ``'batch'``
    axis, applies ``optimize_fn``, updates ``params_ema ← rate · params_ema + (1 − rate) ·
    new_params`` and increments ``step``. With ``train=False`` it evaluates the loss at
    ``state.params_ema`` and returns the state unchanged. The loss is averaged over the
    ``'batch'`` axis, so the function must run under ``pmap(axis_name='batch')`` (one
    device is fine).

    Args:
        sde, model: the forward SDE and the score network.
        train: training or evaluation step.
        optimize_fn: from :func:`optimization_manager` (needed when ``train``).
        reduce_mean, continuous, likelihood_weighting, importance_weighting: as in :func:`get_sde_loss_fn`;
            ``continuous=False`` selects SMLD (VE) or DDPM (VP) training.
        smallest_time: the continuous loss's ``eps`` (score_flow's ``config.training.smallest_time``).
    """
    check_importance_weighting(sde, likelihood_weighting, importance_weighting, continuous)
    if continuous:
        loss_fn = get_sde_loss_fn(sde, model, train, reduce_mean=reduce_mean, continuous=True,
                                  likelihood_weighting=likelihood_weighting, eps=smallest_time,
                                  importance_weighting=importance_weighting)
    else:
        if likelihood_weighting:
            raise ValueError("config.training.likelihood_weighting=True needs config.training.continuous=True; "
                             "the discrete SMLD/DDPM losses have no likelihood weighting.")
        if isinstance(sde, sde_lib.VESDE):
            loss_fn = get_smld_loss_fn(sde, model, train, reduce_mean=reduce_mean)
        elif isinstance(sde, sde_lib.VPSDE):
            loss_fn = get_ddpm_loss_fn(sde, model, train, reduce_mean=reduce_mean)
        else:
            raise ValueError(f"Discrete training (config.training.continuous=False) is not available for "
                             f"{type(sde).__name__}; use config.training.continuous=True.")
    if train and optimize_fn is None:
        raise ValueError("get_step_fn(train=True) needs optimize_fn (see losses.optimization_manager).")

    grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)

    def step_fn(carry_state, batch):
        rng, state = carry_state
        rng, step_rng = jax.random.split(rng)
        if train:
            (loss, new_model_state), grad = grad_fn(step_rng, state.params, state.model_state, batch)
            grad = parallel.pmean(grad)
            new_params, new_opt_state = optimize_fn(state, grad)
            new_params_ema = jax.tree_util.tree_map(
                lambda p_ema, p: p_ema * state.ema_rate + p * (1.0 - state.ema_rate), state.params_ema, new_params)
            new_state = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state,
                                      model_state=new_model_state, params_ema=new_params_ema)
        else:
            loss, _ = loss_fn(step_rng, state.params_ema, state.model_state, batch)
            new_state = state
        loss = parallel.pmean(loss)
        return (rng, new_state), loss

    return step_fn


def init_train_state(rng: jax.Array, config, *, model=None, init_fn=None):
    """Initialise the model and a fresh training :class:`models.utils.State`.

    ``model`` / ``init_fn``: an already created module and its :func:`models.utils.jitted_init`
    (see :func:`models.utils.init_model`).

    Returns:
        ``(model, state)``; ``state.rng`` is ``rng`` and ``params_ema`` starts equal to ``params``.
        The parameters are initialised from the second half of ``jax.random.split(rng)``,
        as the original's ``run_lib``.
    """
    rng, init_rng = jax.random.split(rng)
    model, init_model_state, initial_params = mutils.init_model(init_rng, config, model=model, init_fn=init_fn)
    state = mutils.State(step=0, params=initial_params, opt_state=jax.jit(get_optimizer(config).init)(initial_params),
                         lr=config.optim.lr, model_state=init_model_state, ema_rate=config.model.ema_rate,
                         params_ema=initial_params, rng=rng)
    return model, state
