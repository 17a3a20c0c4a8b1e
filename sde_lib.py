"""Forward SDEs of score-based generative modelling: VP, sub-VP and VE.

Pure math, no networks. Every function works on a mini-batch: ``x`` has shape
``(batch, ...)`` and ``t`` has shape ``(batch,)`` with values in ``[0, T]``.
Per-example scalars (``t``, ``beta(t)``, ``std``) broadcast over the trailing
dimensions of ``x`` through :func:`batch_mul`.

The formulas follow Song et al. (ICLR 2021), Appendix B, and produce the same
numbers as the original implementation (``tests/golden``).
"""
from __future__ import annotations

import abc
from typing import Callable, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# The one type of a time-dependent score everywhere in the project: score_fn(x (batch, ...), t (batch,)) -> like x.
ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]


def batch_mul(a: jax.Array, b: jax.Array) -> jax.Array:
    """Multiply per-example values ``a`` (batch,) with ``b`` (batch, ...).

    Either argument may also be a scalar; a ``(batch,)`` vector is broadcast over
    the trailing dimensions of the other operand.
    """
    return jax.vmap(lambda u, v: u * v)(a, b)


def _standard_normal_logp(z: jax.Array, scale: float = 1.0) -> jax.Array:
    """log N(z; 0, scale² I) summed over all but the batch axis; returns (batch,)."""
    dim = np.prod(z.shape[1:])
    sq = jnp.sum(z.reshape(z.shape[0], -1) ** 2, axis=1)
    return -dim / 2.0 * jnp.log(2 * np.pi * scale ** 2) - sq / (2 * scale ** 2)


def _log_expm1(x):
    """``log(exp(x) - 1)`` for ``x > 0``, accurate for small ``x``."""
    return jnp.log(jnp.expm1(x))


class SDE(abc.ABC):
    """Abstract forward SDE ``dx = f(x, t) dt + g(t) dw`` on ``t ∈ [0, T]``.

    Args:
        N: number of discretisation steps used by discrete samplers and losses.
    """

    def __init__(self, N: int):
        if int(N) < 1:
            raise ValueError(f"N (number of discretisation steps) must be >= 1, got {N}.")
        self.N = int(N)

    @property
    @abc.abstractmethod
    def T(self) -> float:
        """End time of the SDE."""

    @abc.abstractmethod
    def sde(self, x: jax.Array, t: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """Drift ``f(x, t)`` (shape of x) and diffusion ``g(t)`` (batch,)."""

    @abc.abstractmethod
    def marginal_prob(self, x: jax.Array, t: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """Mean (shape of x) and std (batch,) of the perturbation kernel ``p_0t(x(t) | x(0) = x)``."""

    @abc.abstractmethod
    def prior_sampling(self, rng: jax.Array, shape) -> jax.Array:
        """One sample of the prior ``p_T`` with the given shape."""

    @abc.abstractmethod
    def prior_logp(self, z: jax.Array) -> jax.Array:
        """log-density of the prior at ``z`` (batch, ...); returns (batch,) in nats."""

    def discretize(self, x: jax.Array, t: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """One step ``x_{i+1} = x_i + f_i + G_i z_i``; Euler–Maruyama by default.

        Returns ``f`` (shape of x) and ``G`` (batch,).
        """
        dt = 1.0 / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * jnp.sqrt(dt)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
        """The reverse-time SDE (or, with ``probability_flow``, the probability-flow ODE).

        Args:
            score_fn: ``score_fn(x, t)`` -> estimate of ``∇_x log p_t(x)``, shape of x.
            probability_flow: if True, the deterministic ODE with the same marginals.
        """
        return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
    """Reverse-time SDE / probability-flow ODE of a forward :class:`SDE`.

    ``sde(x, t)`` gives drift ``f - g² s (·½ for the ODE)`` and diffusion (zero for the
    ODE); ``discretize(x, t)`` the same for the forward SDE's discretisation.
    """

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool = False):
        self.forward = forward
        self.score_fn = score_fn
        self.probability_flow = bool(probability_flow)
        self.N = forward.N

    @property
    def T(self) -> float:
        return self.forward.T

    @property
    def _score_weight(self) -> float:
        return 0.5 if self.probability_flow else 1.0

    def sde(self, x, t):
        drift, diffusion = self.forward.sde(x, t)
        score = self.score_fn(x, t)
        drift = drift - batch_mul(diffusion ** 2, score * self._score_weight)
        if self.probability_flow:
            diffusion = jnp.zeros_like(diffusion)
        return drift, diffusion

    def discretize(self, x, t):
        f, G = self.forward.discretize(x, t)
        rev_f = f - batch_mul(G ** 2, self.score_fn(x, t) * self._score_weight)
        rev_G = jnp.zeros_like(G) if self.probability_flow else G
        return rev_f, rev_G


class _LinearBetaSDE(SDE):
    """Shared pieces of VP and sub-VP: linear ``beta(t)`` and its discrete DDPM schedule."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(N)
        self.beta_0 = beta_min
        self.beta_1 = beta_max
        # DDPM's discrete schedule beta_i = beta(i/(N-1))/N; the corrector's step size and
        # the DDPM sampler read these.
        self.discrete_betas = jnp.linspace(beta_min / N, beta_max / N, N)
        self.alphas = 1.0 - self.discrete_betas
        self.alphas_cumprod = jnp.cumprod(self.alphas, axis=0)
        self.sqrt_alphas_cumprod = jnp.sqrt(self.alphas_cumprod)
        self.sqrt_1m_alphas_cumprod = jnp.sqrt(1.0 - self.alphas_cumprod)

    @property
    def T(self) -> float:
        return 1

    @property
    def discrete_schedule_is_valid(self) -> bool:
        """False when ``beta_max / N >= 1``: DDPM's ``sqrt(1 - beta)`` is then undefined."""
        return bool(np.all(np.asarray(self.alphas) > 0))

    def beta(self, t):
        """``beta(t) = beta_min + t (beta_max - beta_min)``."""
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def log_mean_coeff(self, t):
        """``log alpha(t) = -¼ t² (beta_max - beta_min) - ½ t beta_min``."""
        return -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def prior_sampling(self, rng, shape):
        return jax.random.normal(rng, shape)

    def prior_logp(self, z):
        return _standard_normal_logp(z)

    def sample_importance_weighted_time_for_likelihood(self, rng, shape, quantile=None, eps: float = 1e-5,
                                                       steps: int = 100):
        """Times in ``[eps, T]`` with density ``∝ likelihood_importance_weight(t)`` (score_flow's sampler).

        Inverts :meth:`likelihood_importance_cum_weight` by bisection on a uniform draw in ``[0, Z]``,
        ``Z = likelihood_importance_cum_weight(T)``.

        Args:
            rng: PRNG key of the uniform draw (unused when ``quantile`` is given).
            shape: shape of the returned times, e.g. ``(batch,)``.
            quantile: optional values in ``[0, Z]`` to invert instead of the draw (shape of the result).
            eps: smallest time.
            steps: bisection steps; float32 stops moving after about 30, the original ran 100.

        Returns:
            ``t`` of ``shape`` (or of ``quantile``'s shape).
        """
        if quantile is None:
            total = self.likelihood_importance_cum_weight(self.T, eps=eps)
            quantile = jax.random.uniform(rng, shape, minval=0.0, maxval=total)
        lower = jnp.full(jnp.shape(quantile), eps, jnp.float32)
        upper = jnp.full(jnp.shape(quantile), self.T, jnp.float32)

        def bisect(bounds, _):
            lower, upper = bounds
            mid = (lower + upper) / 2.0
            below = self.likelihood_importance_cum_weight(mid, eps=eps) <= quantile
            return (jnp.where(below, mid, lower), jnp.where(below, upper, mid)), None

        (lower, upper), _ = jax.lax.scan(bisect, (lower, upper), None, length=steps)
        return (lower + upper) / 2.0


class VPSDE(_LinearBetaSDE):
    """Variance-preserving SDE ``dx = -½ β(t) x dt + sqrt(β(t)) dw`` (the DDPM limit).

    Args:
        beta_min: ``beta(0)``.
        beta_max: ``beta(1)``.
        N: number of discretisation steps.
    """

    def sde(self, x, t):
        beta_t = self.beta(t)
        return -0.5 * batch_mul(beta_t, x), jnp.sqrt(beta_t)

    def marginal_prob(self, x, t):
        lmc = self.log_mean_coeff(t)
        mean = batch_mul(jnp.exp(lmc), x)
        std = jnp.sqrt(1 - jnp.exp(2.0 * lmc))
        return mean, std

    def marginal_prob_high_precision(self, x, t):
        """:meth:`marginal_prob` without float32 cancellation in ``1 - exp(2 log α)`` at small ``t``.

        At ``t = 1e-5`` that cancellation puts a few percent of error on ``std``; importance-sampled
        times cluster there. score_flow's ``high_precision`` switches to a first-order expansion below
        ``|log α| = 1e-3``; ``expm1`` is exact to rounding everywhere.
        """
        lmc = self.log_mean_coeff(t)
        return batch_mul(jnp.exp(lmc), x), jnp.sqrt(-jnp.expm1(2.0 * lmc))

    def likelihood_importance_weight(self, t):
        """``g(t)² / std(t)² = β(t) / (1 - exp(-B(t)))``, ``B(t) = ∫_0^t β``; shape of ``t``."""
        return self.beta(t) / -jnp.expm1(2.0 * self.log_mean_coeff(t))

    def likelihood_importance_cum_weight(self, t, eps: float = 1e-5):
        """``∫_eps^t g²/std² ds = log(expm1(B(t)) / expm1(B(eps)))`` (score_flow's importance CDF, unnormalised)."""
        return _log_expm1(-2.0 * self.log_mean_coeff(t)) - _log_expm1(-2.0 * self.log_mean_coeff(eps))

    def discretize(self, x, t):
        """DDPM discretisation: ``f = (sqrt(1-β_i) - 1) x``, ``G = sqrt(β_i)``."""
        timestep = (t * (self.N - 1) / self.T).astype(jnp.int32)
        beta = self.discrete_betas[timestep]
        alpha = self.alphas[timestep]
        f = batch_mul(jnp.sqrt(alpha), x) - x
        return f, jnp.sqrt(beta)


class subVPSDE(_LinearBetaSDE):  # noqa: N801 - the original's public name
    """Sub-VP SDE ``dx = -½ β(t) x dt + sqrt(β(t)(1 - exp(-2∫β))) dw``; better likelihoods.

    Its discrete ``alphas`` are VP's (the same drift), which the Langevin corrector's step
    size needs; the original lacked them and its correctors crashed here.
    """

    def sde(self, x, t):
        beta_t = self.beta(t)
        discount = 1.0 - jnp.exp(-2 * self.beta_0 * t - (self.beta_1 - self.beta_0) * t ** 2)
        return -0.5 * batch_mul(beta_t, x), jnp.sqrt(beta_t * discount)

    def marginal_prob(self, x, t):
        lmc = self.log_mean_coeff(t)
        mean = batch_mul(jnp.exp(lmc), x)
        std = 1 - jnp.exp(2.0 * lmc)
        return mean, std

    def marginal_prob_high_precision(self, x, t):
        """:meth:`marginal_prob` with ``std = -expm1(2 log α)``, exact at small ``t`` (see VPSDE's)."""
        lmc = self.log_mean_coeff(t)
        return batch_mul(jnp.exp(lmc), x), -jnp.expm1(2.0 * lmc)

    def likelihood_importance_weight(self, t):
        """``g(t)² / std(t)² = β(t) (1 + exp(-B(t))) / (1 - exp(-B(t)))``, ``B(t) = ∫_0^t β``; shape of ``t``."""
        integrated = -2.0 * self.log_mean_coeff(t)
        return self.beta(t) * (1.0 + jnp.exp(-integrated)) / -jnp.expm1(-integrated)

    def likelihood_importance_cum_weight(self, t, eps: float = 1e-5):
        """``∫_eps^t g²/std² ds = 2 log(expm1(B(t)) / expm1(B(eps))) - (B(t) - B(eps))``."""
        b_t, b_eps = -2.0 * self.log_mean_coeff(t), -2.0 * self.log_mean_coeff(eps)
        return 2.0 * (_log_expm1(b_t) - _log_expm1(b_eps)) - (b_t - b_eps)


class VESDE(SDE):
    """Variance-exploding SDE ``dx = sqrt(d σ²(t)/dt) dw`` with ``σ(t) = σ_min (σ_max/σ_min)^t``.

    Args:
        sigma_min: smallest noise scale.
        sigma_max: largest noise scale (the prior's std).
        N: number of discretisation steps (noise levels of SMLD/NCSN).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        super().__init__(N)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.discrete_sigmas = jnp.exp(np.linspace(np.log(sigma_min), np.log(sigma_max), N))

    @property
    def T(self) -> float:
        return 1

    def sigma(self, t):
        """``σ(t) = σ_min (σ_max/σ_min)^t``."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x, t):
        diffusion = self.sigma(t) * jnp.sqrt(2 * (jnp.log(self.sigma_max) - jnp.log(self.sigma_min)))
        return jnp.zeros_like(x), diffusion

    def marginal_prob(self, x, t):
        return x, self.sigma(t)

    def prior_sampling(self, rng, shape):
        return jax.random.normal(rng, shape) * self.sigma_max

    def prior_logp(self, z):
        return _standard_normal_logp(z, self.sigma_max)

    def discretize(self, x, t):
        """SMLD (NCSN) discretisation: ``G = sqrt(σ_i² - σ_{i-1}²)``, no drift."""
        timestep = (t * (self.N - 1) / self.T).astype(jnp.int32)
        sigma = self.discrete_sigmas[timestep]
        adjacent = jnp.where(timestep == 0, jnp.zeros_like(sigma), self.discrete_sigmas[timestep - 1])
        return jnp.zeros_like(x), jnp.sqrt(sigma ** 2 - adjacent ** 2)


_SDES = {"vpsde": VPSDE, "subvpsde": subVPSDE, "vesde": VESDE}


def get_sde(config) -> Tuple[SDE, float]:
    """Build the SDE named by ``config.training.sde`` and its sampling epsilon.

    Returns ``(sde, sampling_eps)``: ``sampling_eps`` is ``config.sampling.smallest_time`` where the
    config has it (score_flow's configs), else 1e-3 for VP/sub-VP and 1e-5 for VE, as the original.
    """
    name = config.training.sde.lower()
    if name not in _SDES:
        raise ValueError(f"config.training.sde={config.training.sde!r} is unknown; use one of {sorted(_SDES)}.")
    if name == "vesde":
        sde, default_eps = VESDE(config.model.sigma_min, config.model.sigma_max, config.model.num_scales), 1e-5
    else:
        sde, default_eps = _SDES[name](config.model.beta_min, config.model.beta_max, config.model.num_scales), 1e-3
    return sde, config.sampling.get("smallest_time", default_eps)
