"""Variational lower bound on the log-likelihood of a score model (score_flow's ``bound_likelihood``).

Song, Durkan, Murray & Ermon (2021), "Maximum Likelihood Training of Score-Based Diffusion Models",
Theorem 1 with denoising score matching: for data ``x`` and ``x_t = mean(x, t) + std(t) z``,

    -log p_eps(x) <= E[-log π(x_T)] + ½ ∫_eps^T E[g² (‖s(x_t, t) - ∇log p_0t‖² - ‖∇log p_0t‖²) - 2 ∇·f] dt

where ``∇log p_0t(x_t | x) = -z / std``, ``π`` is the prior and ``f``, ``g`` the SDE's drift and
diffusion. The gap is the score-matching error (zero for the exact score, up to ``p_T ≠ π``).
The time integral is a Monte-Carlo average over ``N`` times per example, uniform on ``[eps, T]``
or importance-sampled with density ``∝ g²/std²`` (VP / sub-VP), which cancels the ``1/t``
growth of the integrand near 0. Without ``dsm`` the integrand is the sliced score matching form
``g² (2 ∇·s + ‖s‖²) - 2 ∇·f`` with a Hutchinson probe.

The offset term bounds the step from ``p_eps`` to ``p_0`` (Jensen's inequality): the
reconstruction ``-log q(x | x_eps)`` under the Gaussian ``q`` centred at Tweedie's denoiser
``(x_eps + std² s(x_eps)) / α``, minus the entropy of ``p_eps|0(· | x)``.

Every term is an unbiased one-sample estimate, so the per-example bound is noisy; average over
examples (and repeats) and report the standard error. Shapes: ``data`` ``(batch, ...)``.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import sde_lib
from likelihood import bpd_offset, get_div_fn, get_drift_div_fn
from models import utils as mutils
from score_sde import parallel
from sde_lib import batch_mul

PROBE_TYPES = ("Rademacher", "Gaussian")


def _marginal_prob(sde: sde_lib.SDE) -> Callable:
    """The SDE's kernel mean and std, the cancellation-free version where one exists (VP, sub-VP)."""
    return getattr(sde, "marginal_prob_high_precision", sde.marginal_prob)


def _likelihood_weight(sde: sde_lib.SDE, t: jax.Array) -> jax.Array:
    """``g(t)² / std(t)²``, shape of ``t``; exact at small ``t`` for VP and sub-VP."""
    if hasattr(sde, "likelihood_importance_weight"):
        return sde.likelihood_importance_weight(t)
    g = sde.sde(jnp.zeros((t.shape[0], 1)), t)[1]
    return (g / sde.marginal_prob(jnp.zeros((t.shape[0], 1)), t)[1]) ** 2


def _probe(rng: jax.Array, shape, probe_type: str) -> jax.Array:
    """Hutchinson probe as score_flow draws it (``jax.random.rademacher``, not ``likelihood.sample_probe``)."""
    if probe_type == "Rademacher":
        return jax.random.rademacher(rng, shape, dtype=jnp.float32)
    return jax.random.normal(rng, shape)


def _sum_sq(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(x.reshape((x.shape[0], -1))), axis=-1)


def _check_arguments(sde: sde_lib.SDE, hutchinson_type: str, N: int, importance_weighting: bool) -> None:
    if hutchinson_type not in PROBE_TYPES:
        raise NotImplementedError(f"hutchinson_type={hutchinson_type!r} unknown for the bound; use one of "
                                  f"{list(PROBE_TYPES)}.")
    if importance_weighting and not hasattr(sde, "sample_importance_weighted_time_for_likelihood"):
        raise ValueError(f"importance_weighting=True needs a VP or sub-VP SDE (config.training.sde='vpsde' or "
                         f"'subvpsde'); {type(sde).__name__} has no importance distribution. Pass "
                         "importance_weighting=False.")
    if int(N) < 1:
        raise ValueError(f"N (Monte-Carlo times per example) must be >= 1, got {N}.")


def get_likelihood_offset_fn(sde: sde_lib.SDE, score_fn: Callable, eps: float = 1e-5) -> Callable:
    """The bound's step from ``p_eps`` to ``p_0``, one sample.

    Returns:
        ``offset_fn(rng, data) -> (batch,)`` nats: ``-log q(x | x_eps) - H[p_eps|0(· | x)]`` for one
        ``x_eps = α x + std z``, ``q = N((x_eps + std² s(x_eps)) / α, (std / α)² I)``; ``rng`` is split
        twice and the second half draws ``x_eps``, as score_flow.
    """
    marginal_prob = _marginal_prob(sde)

    def offset_fn(rng, data):
        rng, _ = jax.random.split(rng)
        _, step_rng = jax.random.split(rng)
        dim = int(np.prod(data.shape[1:]))
        eps_vec = jnp.full((data.shape[0],), eps)
        # Kernel coefficients: mean(1, eps) = α (the same for every dimension), std.
        alpha, std = marginal_prob(jnp.ones((data.shape[0], 1)), eps_vec)
        alpha = alpha[:, 0]
        z = jax.random.normal(step_rng, data.shape)
        noisy = batch_mul(alpha, data) + batch_mul(std, z)
        score = score_fn(noisy, eps_vec)
        q_std = std / alpha
        p_entropy = dim / 2.0 * (np.log(2 * np.pi) + 2 * jnp.log(std) + 1.0)
        # (x - q_mean) / q_std = -(z + std s): no float32 cancellation in x_eps - α x when std ~ 1e-6
        # (sub-VP at eps = 1e-5), where score_flow's x - q_mean keeps few correct digits.
        q_recon = dim / 2.0 * (np.log(2 * np.pi) + 2 * jnp.log(q_std)) + _sum_sq(z + batch_mul(std, score)) / 2.0
        return q_recon - p_entropy

    return offset_fn


def get_likelihood_bound_fn_from_score(sde: sde_lib.SDE, score_fn: Callable, inverse_scaler: Callable = lambda v: v,
                                       hutchinson_type: str = "Rademacher", dsm: bool = True, eps: float = 1e-5,
                                       N: int = 1000, importance_weighting: bool = True,
                                       eps_offset: bool = True) -> Callable:
    """The bound in bits/dim for a plain ``score_fn(x, t)`` on one device.

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t) -> ∇_x log p_t(x)``, x ``(batch, ...)``, t ``(batch,)``.
        inverse_scaler: maps model inputs back to data in [0, 1] (sets the dequantisation offset).
        hutchinson_type: 'Rademacher' or 'Gaussian' probe for the divergences.
        dsm: denoising score matching form (score_flow's default); else sliced score matching.
        eps: lower end of the time integral (score_flow's ``config.training.smallest_time``).
        N: Monte-Carlo times per example.
        importance_weighting: times with density ``∝ g²/std²`` (VP and sub-VP only).
        eps_offset: add the bound's ``p_eps -> p_0`` step (else the bound is on ``log p_eps``).

    Returns:
        ``bound_fn(rng, data) -> bpd (batch,)``, an unbiased estimate of an upper bound on the
        negative log-likelihood in bits/dim (the same offset as ``likelihood.get_likelihood_fn``).
        Random numbers are drawn in score_flow's order: equal keys give score_flow's numbers.
        Costs ``N`` (+1 with ``eps_offset``) score evaluations per example (2x with a JVP without ``dsm``).
    """
    _check_arguments(sde, hutchinson_type, N, importance_weighting)
    offset_bpd = bpd_offset(inverse_scaler)
    nats_fn = _bound_nats_fn(sde, score_fn, hutchinson_type, dsm, eps, N, importance_weighting, eps_offset)
    return lambda rng, data: _to_bpd(nats_fn(rng, data), data.shape, offset_bpd)


def _to_bpd(nats: jax.Array, shape, offset_bpd: float) -> jax.Array:
    return nats / (np.log(2) * np.prod(shape[1:])) + offset_bpd


def _bound_nats_fn(sde, score_fn, hutchinson_type, dsm, eps, N, importance_weighting, eps_offset) -> Callable:
    """``nats_fn(rng, data) -> (batch,)``: the bound on ``-log p(x)`` in nats (see the module docstring)."""
    marginal_prob = _marginal_prob(sde)
    drift_div = get_div_fn(lambda x, t: sde.sde(x, t)[0])
    score_value_div = get_drift_div_fn(score_fn)

    def nats_fn(rng, data):
        shape = data.shape
        rng, step_rng = jax.random.split(rng)
        if importance_weighting:
            times = sde.sample_importance_weighted_time_for_likelihood(step_rng, (N, shape[0]), eps=eps)
            total = sde.likelihood_importance_cum_weight(sde.T, eps=eps)
        else:
            times = jax.random.uniform(step_rng, (N, shape[0]), minval=eps, maxval=sde.T)
            total = sde.T - eps  # length of the interval; score_flow used 1 (a 1e-5 relative difference)

        def integrand(rng, t):
            rng, step_rng = jax.random.split(rng)
            probe = _probe(step_rng, shape, hutchinson_type)
            rng, step_rng = jax.random.split(rng)
            z = jax.random.normal(step_rng, shape)
            mean, std = marginal_prob(data, t)
            noisy = mean + batch_mul(std, z)
            if dsm:
                # std² (‖s - ∇log p_0t‖² - ‖∇log p_0t‖²) with ∇log p_0t = -z / std
                score_term = _sum_sq(batch_mul(std, score_fn(noisy, t)) + z) - _sum_sq(z)
            else:
                score, score_div = score_value_div(noisy, t, probe)
                score_term = std ** 2 * (2 * score_div + _sum_sq(score))
            # integrand / (g²/std²) = score_term - 2 ∇·f / (g²/std²): no division by std -> 0
            scaled = score_term - 2 * drift_div(noisy, t, probe) / _likelihood_weight(sde, t)
            value = scaled if importance_weighting else _likelihood_weight(sde, t) * scaled
            return rng, value

        rng, values = jax.lax.scan(integrand, rng, times)
        integral = total * jnp.mean(values, axis=0)
        mean, std = marginal_prob(data, jnp.full((shape[0],), sde.T))
        rng, step_rng = jax.random.split(rng)
        nlogp = -sde.prior_logp(mean + batch_mul(std, jax.random.normal(step_rng, shape))) + 0.5 * integral
        if eps_offset:
            rng, step_rng = jax.random.split(rng)
            nlogp = nlogp + get_likelihood_offset_fn(sde, score_fn, eps)(step_rng, data)
        return nlogp

    return nats_fn


def get_likelihood_bound_fn(sde: sde_lib.SDE, model, inverse_scaler: Callable, hutchinson_type: str = "Rademacher",
                            dsm: bool = True, eps: float = 1e-5, N: int = 1000, importance_weighting: bool = True,
                            eps_offset: bool = True) -> Callable:
    """The bound in bits/dim for a Flax score model, pmapped (score_flow's API; arguments as
    :func:`get_likelihood_bound_fn_from_score`).

    Returns:
        ``bound_fn(prng, pstate, data) -> (bpd, nfe)``: ``prng`` ``(n_devices, 2)`` keys, one per
        device; ``pstate`` the replicated :class:`models.utils.State` (``params_ema`` and
        ``model_state`` are used); ``data`` ``(n_devices, batch, H, W, C)`` in model input space.
        ``bpd`` is ``(n_devices, batch)``; ``nfe`` the score evaluations per example (a python int).
    """

    _check_arguments(sde, hutchinson_type, N, importance_weighting)
    offset_bpd = bpd_offset(inverse_scaler)

    def one_device(rng, state, data):
        score_fn = mutils.get_score_fn(sde, model, state.params_ema, state.model_state, train=False, continuous=True)
        nats = _bound_nats_fn(sde, score_fn, hutchinson_type, dsm, eps, N, importance_weighting, eps_offset)(rng, data)
        return _to_bpd(nats, data.shape, offset_bpd)

    p_bound = parallel.pmap(one_device)
    nfe = int(N) + int(eps_offset)

    def bound_fn(prng, pstate, data):
        return p_bound(prng, pstate, data), nfe

    return bound_fn
