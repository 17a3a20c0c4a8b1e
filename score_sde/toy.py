"""Analytic data distributions with exact scores and densities at every diffusion time.

For every forward SDE of :mod:`sde_lib` the transition kernel is Gaussian and isotropic,
``x(t) = a(t) x(0) + s(t) ε`` with ``ε ~ N(0, I)``:

* VP:     ``a = exp(log_mean_coeff(t))``, ``s² = 1 - a²``;
* sub-VP: ``a = exp(log_mean_coeff(t))``, ``s² = (1 - a²)²``;
* VE:     ``a = 1``,                      ``s² = σ(t)² - σ_min²`` (the variance the SDE adds on
  ``[0, t]``; ``sde.marginal_prob`` reports ``σ(t)``, which assumes ``σ_min`` noise at ``t = 0``).

Gaussian data and Gaussian mixtures therefore stay Gaussian (mixtures) under diffusion, so the
diffused marginal ``p_t``, its log-density and its score ``∇_x log p_t`` are exact in closed form.
The classes below expose them as ``score_fn(x, t)`` callables with the signature the samplers and
the likelihood code take from a trained model.

Shapes: each distribution lives on ``event_shape`` (e.g. ``(4, 4, 1)``; ``d = prod(event_shape)``).
``x`` is ``(batch, *event_shape)``, ``t`` is ``(batch,)``; ``score`` returns ``(batch, *event_shape)``
and ``log_prob`` returns ``(batch,)`` in nats. ``sample(rng, n)`` draws ``(n, *event_shape)`` data.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

import sde_lib
from sde_lib import ScoreFn


def transition_coefficients(sde: sde_lib.SDE, t: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """``(a(t), s(t)²)`` of the kernel ``x(t) | x(0) ~ N(a x(0), s² I)``; both shaped like ``t``."""
    t = jnp.asarray(t, jnp.float32)
    if isinstance(sde, sde_lib.VESDE):
        return jnp.ones_like(t), sde.sigma(t) ** 2 - sde.sigma_min ** 2
    if isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE)):
        lmc = sde.log_mean_coeff(t)
        one_minus_a2 = -jnp.expm1(2.0 * lmc)  # 1 - a², accurate for small t
        var = one_minus_a2 if isinstance(sde, sde_lib.VPSDE) else one_minus_a2 ** 2
        return jnp.exp(lmc), var
    raise NotImplementedError(f"No closed-form transition kernel for SDE class {type(sde).__name__}.")


def _flat(x: jax.Array, event_shape: Tuple[int, ...]) -> jax.Array:
    """``(batch, *event_shape)`` -> ``(batch, d)``, checking the trailing shape."""
    if tuple(x.shape[1:]) != tuple(event_shape):
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (batch, *{tuple(event_shape)}).")
    return x.reshape(x.shape[0], -1)


class Distribution:
    """Common interface: exact ``log_prob`` and ``score`` of the diffused marginal ``p_t``."""

    event_shape: Tuple[int, ...]

    @property
    def dim(self) -> int:
        return int(np.prod(self.event_shape))

    def sample(self, rng: jax.Array, n: int) -> jax.Array:
        """``n`` draws from the data distribution ``p_0``, shape ``(n, *event_shape)``."""
        raise NotImplementedError

    def log_prob(self, sde: sde_lib.SDE, x: jax.Array, t: jax.Array) -> jax.Array:
        """``log p_t(x)`` (nats), shape ``(batch,)``."""
        raise NotImplementedError

    def score(self, sde: sde_lib.SDE, x: jax.Array, t: jax.Array) -> jax.Array:
        """``∇_x log p_t(x)``, shape of ``x``."""
        raise NotImplementedError

    def score_fn(self, sde: sde_lib.SDE) -> ScoreFn:
        """The exact score as ``score_fn(x, t)``, a drop-in for ``models.utils.get_score_fn``'s result."""
        return lambda x, t: self.score(sde, x, t)

    def log_prob_fn(self, sde: sde_lib.SDE) -> Callable[[jax.Array, jax.Array], jax.Array]:
        """``log_prob_fn(x, t) -> (batch,)`` bound to ``sde``."""
        return lambda x, t: self.log_prob(sde, x, t)

    def marginal_sample(self, rng: jax.Array, sde: sde_lib.SDE, t: float, n: int) -> jax.Array:
        """``n`` draws of ``x(t)`` under the forward SDE, shape ``(n, *event_shape)``."""
        data_rng, noise_rng = jax.random.split(rng)
        x0 = self.sample(data_rng, n)
        a, var = transition_coefficients(sde, jnp.asarray(t, jnp.float32))
        return a * x0 + jnp.sqrt(var) * jax.random.normal(noise_rng, x0.shape)


class IsotropicGaussian(Distribution):
    """Data ``x(0) ~ N(mean, std² I)`` on ``event_shape``.

    Args:
        mean: scalar or array broadcastable to ``event_shape``.
        std: scalar standard deviation of every coordinate.
        event_shape: shape of one example.

    The golden data of ``tests/golden`` is ``IsotropicGaussian(0.3, 0.5, (4, 4, 1))``.
    """

    def __init__(self, mean, std: float, event_shape: Sequence[int]):
        self.event_shape = tuple(int(s) for s in event_shape)
        self.mean = jnp.broadcast_to(jnp.asarray(mean, jnp.float32), self.event_shape)
        self.std = float(std)

    def mean_var(self, sde: sde_lib.SDE, t: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """Mean ``(batch, *event_shape)`` and per-coordinate variance ``(batch,)`` of ``p_t``."""
        a, var = transition_coefficients(sde, t)
        mean = a.reshape((-1,) + (1,) * len(self.event_shape)) * self.mean
        return mean, a ** 2 * self.std ** 2 + var

    def sample(self, rng, n):
        return self.mean + self.std * jax.random.normal(rng, (n,) + self.event_shape)

    def log_prob(self, sde, x, t):
        mean, v = self.mean_var(sde, t)
        sq = jnp.sum(_flat(x - mean, self.event_shape) ** 2, axis=1)
        return -0.5 * self.dim * jnp.log(2 * math.pi * v) - 0.5 * sq / v

    def score(self, sde, x, t):
        mean, v = self.mean_var(sde, t)
        return -sde_lib.batch_mul(1.0 / v, x - mean)

    def flow_map(self, sde: sde_lib.SDE, x: jax.Array, t_from: jax.Array, t_to: jax.Array) -> jax.Array:
        """Exact solution of the probability-flow ODE from ``t_from`` to ``t_to`` (affine)."""
        m0, v0 = self.mean_var(sde, t_from)
        m1, v1 = self.mean_var(sde, t_to)
        return m1 + sde_lib.batch_mul(jnp.sqrt(v1 / v0), x - m0)


class Gaussian(Distribution):
    """Data ``x(0) ~ N(mean, cov)`` with a full covariance over the flattened event.

    Args:
        mean: ``(d,)`` or ``event_shape``.
        cov: ``(d, d)`` symmetric positive definite.
        event_shape: shape of one example, ``prod(event_shape) == d`` (default ``(d,)``).

    ``p_t = N(a mean, a² cov + s² I)``. All ``p_t`` share the eigenvectors of ``cov``, which makes
    the probability-flow map affine (:meth:`flow_map`).
    """

    def __init__(self, mean, cov, event_shape: Sequence[int] | None = None):
        cov = np.asarray(cov, np.float64)
        d = cov.shape[0]
        if cov.shape != (d, d) or not np.allclose(cov, cov.T):
            raise ValueError(f"cov must be a symmetric (d, d) matrix, got shape {cov.shape}.")
        self.event_shape = (d,) if event_shape is None else tuple(int(s) for s in event_shape)
        if self.dim != d:
            raise ValueError(f"event_shape {self.event_shape} has {self.dim} elements but cov is {d}×{d}.")
        evals, evecs = np.linalg.eigh(cov)
        if evals.min() <= 0:
            raise ValueError("cov must be positive definite.")
        self.mean_flat = jnp.asarray(np.broadcast_to(np.asarray(mean, np.float64).reshape(-1), (d,)), jnp.float32)
        self.cov = jnp.asarray(cov, jnp.float32)
        self._evals = jnp.asarray(evals, jnp.float32)
        self._evecs = jnp.asarray(evecs, jnp.float32)
        self._chol = jnp.asarray(np.linalg.cholesky(cov), jnp.float32)

    @property
    def mean(self) -> jax.Array:
        return self.mean_flat.reshape(self.event_shape)

    def _eig_t(self, sde, t):
        """Eigenvalues of cov(p_t), ``(batch, d)``, and ``a(t)`` ``(batch,)``."""
        a, var = transition_coefficients(sde, t)
        return a[:, None] ** 2 * self._evals + var[:, None], a

    def covariance_at(self, sde: sde_lib.SDE, t: float) -> jax.Array:
        """``cov(p_t) = a² cov + s² I``, ``(d, d)``."""
        a, var = transition_coefficients(sde, jnp.asarray(t, jnp.float32))
        return a ** 2 * self.cov + var * jnp.eye(self.dim)

    def mean_at(self, sde: sde_lib.SDE, t: float) -> jax.Array:
        """``E[x(t)] = a(t) mean``, ``(d,)``."""
        a, _ = transition_coefficients(sde, jnp.asarray(t, jnp.float32))
        return a * self.mean_flat

    def sample(self, rng, n):
        z = jax.random.normal(rng, (n, self.dim))
        return (self.mean_flat + z @ self._chol.T).reshape((n,) + self.event_shape)

    def _whitened(self, sde, x, t):
        """Centred x in the eigenbasis, ``(batch, d)``, with eigenvalues of cov(p_t)."""
        lam, a = self._eig_t(sde, t)
        y = _flat(x, self.event_shape) - a[:, None] * self.mean_flat
        return y @ self._evecs, lam

    def log_prob(self, sde, x, t):
        u, lam = self._whitened(sde, x, t)
        return -0.5 * jnp.sum(jnp.log(2 * math.pi * lam) + u ** 2 / lam, axis=1)

    def score(self, sde, x, t):
        u, lam = self._whitened(sde, x, t)
        return (-(u / lam) @ self._evecs.T).reshape(x.shape)

    def flow_map(self, sde: sde_lib.SDE, x: jax.Array, t_from: jax.Array, t_to: jax.Array) -> jax.Array:
        """Exact probability-flow ODE map ``x(t_from) -> x(t_to)``:
        ``a₁ μ + C₁^{½} C₀^{-½} (x - a₀ μ)`` with the commuting covariances ``C`` of ``p_t``."""
        u, lam0 = self._whitened(sde, x, t_from)
        lam1, a1 = self._eig_t(sde, t_to)
        y = (u * jnp.sqrt(lam1 / lam0)) @ self._evecs.T + a1[:, None] * self.mean_flat
        return y.reshape(x.shape)


class GaussianMixture(Distribution):
    """Data from ``Σ_k w_k N(mean_k, cov_k)``.

    Args:
        weights: ``(K,)`` non-negative, normalised here.
        means: ``(K, d)``.
        covs: ``(K, d, d)`` full covariances, or ``(K,)`` isotropic standard deviations.
        event_shape: shape of one example (default ``(d,)``).

    ``log p_t = logsumexp_k (log w_k + log N(x; a mean_k, a² cov_k + s² I))`` and the score is the
    posterior-weighted sum of the component scores.
    """

    def __init__(self, weights, means, covs, event_shape: Sequence[int] | None = None):
        means = np.asarray(means, np.float64)
        k, d = means.shape
        covs = np.asarray(covs, np.float64)
        if covs.shape == (k,):
            covs = covs[:, None, None] ** 2 * np.eye(d)
        weights = np.asarray(weights, np.float64)
        if weights.shape != (k,) or np.any(weights < 0):
            raise ValueError(f"weights must be {k} non-negative numbers, got {weights}.")
        self.weights = jnp.asarray(weights / weights.sum(), jnp.float32)
        self.components = [Gaussian(means[i], covs[i], event_shape) for i in range(k)]
        self.event_shape = self.components[0].event_shape

    @property
    def num_components(self) -> int:
        return len(self.components)

    def sample(self, rng, n):
        return self.sample_with_labels(rng, n)[0]

    def sample_with_labels(self, rng: jax.Array, n: int) -> Tuple[jax.Array, jax.Array]:
        """Data ``(n, *event_shape)`` and the component index of each draw ``(n,)`` int32."""
        label_rng, comp_rng = jax.random.split(rng)
        labels = jax.random.categorical(label_rng, jnp.log(self.weights), shape=(n,))
        keys = jax.random.split(comp_rng, self.num_components)
        draws = jnp.stack([c.sample(k_, n) for c, k_ in zip(self.components, keys)])
        return draws[labels, jnp.arange(n)], labels.astype(jnp.int32)

    def component_log_probs(self, sde: sde_lib.SDE, x: jax.Array, t: jax.Array) -> jax.Array:
        """``log w_k + log N_k,t(x)``, ``(batch, K)``."""
        logs = [c.log_prob(sde, x, t) for c in self.components]
        return jnp.stack(logs, axis=1) + jnp.log(self.weights)

    def log_posterior(self, sde: sde_lib.SDE, x: jax.Array, t: jax.Array) -> jax.Array:
        """Exact classifier ``log p_t(k | x)``, ``(batch, K)``."""
        return jax.nn.log_softmax(self.component_log_probs(sde, x, t), axis=1)

    def log_prob(self, sde, x, t):
        return jax.scipy.special.logsumexp(self.component_log_probs(sde, x, t), axis=1)

    def score(self, sde, x, t):
        post = jnp.exp(self.log_posterior(sde, x, t))
        scores = jnp.stack([c.score(sde, x, t) for c in self.components], axis=1)
        return jnp.einsum("bk,bk...->b...", post, scores)

    def classifier_grad(self, sde: sde_lib.SDE, x: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
        """``∇_x log p_t(labels | x)`` = component score of ``labels`` minus the mixture score."""
        scores = jnp.stack([c.score(sde, x, t) for c in self.components], axis=1)
        return scores[jnp.arange(x.shape[0]), labels] - self.score(sde, x, t)
