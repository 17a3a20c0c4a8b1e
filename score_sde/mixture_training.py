"""Train the ``mlp`` score model on a Gaussian mixture through ``run_lib``'s train step.

:func:`train` runs ``score_sde.train_steps.make_train_and_eval_steps`` (the same losses, optimizer, EMA and fused
steps as image training) on fresh draws of ``score_sde.mixtures.make_mixture(config.data.dim)``
each step (the mixture is known, so there is no finite training set to overfit), and returns
the EMA parameters. :func:`score_fn` turns them into a score on flat ``(n, d)`` points for the
samplers and likelihoods of ``--mode tables``.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

import losses
import sde_lib
from models import utils as mutils
from score_sde import mixtures, parallel, train_steps


def train(config, steps: int, rng: jax.Array) -> tuple[object, dict, list[float]]:
    """Train ``config``'s model for ``steps`` steps (a multiple of ``config.training.n_jitted_steps``).

    Args:
        config: a GMM config (``configs/vp/gmm.py``): ``data.dim``, ``training.*``, ``model.*``, ``optim.*``.
        steps: optimizer steps.
        rng: the seed of the initialisation and of every batch.

    Returns:
        ``(model, params_ema, losses)``: the Flax module, its EMA parameters (host arrays) and the
        training loss of every step.
    """
    n_jitted = config.training.n_jitted_steps
    if steps % n_jitted:
        raise ValueError(f"{steps} training steps are not a multiple of config.training.n_jitted_steps = {n_jitted}.")
    sde, _ = sde_lib.get_sde(config)
    init_rng, data_rng, step_rng = jax.random.split(rng, 3)
    model, state = losses.init_train_state(init_rng, config)
    p_train_step, _ = train_steps.make_train_and_eval_steps(config, sde, model)
    mixture = mixtures.make_mixture(config.data.dim)
    batch_shape = (parallel.local_device_count(), n_jitted, config.training.batch_size // parallel.local_device_count())
    draw = jax.jit(lambda key: mixture.sample(key, int(np.prod(batch_shape))).reshape(
        batch_shape + (1, 1, config.data.dim)))
    pstate = parallel.replicate(state)
    keys = parallel.split_per_device(step_rng)[1]
    history = []
    for call in range(steps // n_jitted):
        batch = {"image": draw(jax.random.fold_in(data_rng, call))}
        (keys, pstate), step_losses = p_train_step((keys, pstate), batch)
        history.extend(np.asarray(step_losses[0]).tolist())
    return model, jax.device_get(parallel.unreplicate(pstate).params_ema), history


def score_fn(sde: sde_lib.SDE, model, params, dim: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The trained score on flat points: ``fn(x (n, dim), t (n,)) -> (n, dim)`` (continuous-time labels)."""
    inner = mutils.get_score_fn(sde, model, params, {}, train=False, continuous=True)

    def fn(x, t):
        return inner(x.reshape((x.shape[0], 1, 1, dim)), t).reshape(x.shape)

    return fn


def loss_fn(config, model, params, rng: jax.Array, n: int) -> jax.Array:
    """The training objective of ``config`` at ``params`` on ``n`` fresh mixture points (one number)."""
    sde, _ = sde_lib.get_sde(config)
    fn = losses.get_sde_loss_fn(sde, model, train=False, reduce_mean=config.training.reduce_mean,
                                continuous=True, likelihood_weighting=config.training.likelihood_weighting)
    data_rng, loss_rng = jax.random.split(rng)
    x = mixtures.make_mixture(config.data.dim).sample(data_rng, n).reshape((n, 1, 1, config.data.dim))
    return fn(loss_rng, params, {}, {"image": x})[0]
