"""The Gaussian mixtures of ``--mode tables`` and of the ``GMM`` dataset: exact score and density at every time.

:func:`make_mixture` is the fixed test distribution of each dimension; :class:`IsotropicMixture`
evaluates its score and log-density in one fused computation over the components.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import toy


class IsotropicMixture(toy.Distribution):
    """``Σ_k w_k N(mean_k, std_k² I)``: the exact score and log-density of ``p_t``, vectorised over components.

    The same distribution as ``toy.GaussianMixture(weights, means, stds)`` (:meth:`as_toy`; the tests
    check that both give the same score and density), in one fused computation over the K
    components instead of one per component: the sampler grid evaluates the score millions of times.

    Args:
        weights: ``(K,)`` non-negative, normalised here.
        means: ``(K, d)``.
        stds: ``(K,)`` standard deviations.
    """

    def __init__(self, weights, means, stds):
        weights = np.asarray(weights, np.float64)
        self.weights = jnp.asarray(weights / weights.sum(), jnp.float32)
        self.means = jnp.asarray(means, jnp.float32)
        self.stds = jnp.asarray(stds, jnp.float32)
        self.event_shape = (self.means.shape[1],)

    def as_toy(self) -> toy.GaussianMixture:
        return toy.GaussianMixture(np.asarray(self.weights), np.asarray(self.means), np.asarray(self.stds))

    def sample(self, rng, n):
        return self.sample_with_labels(rng, n)[0]

    def sample_with_labels(self, rng: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        """``n`` draws ``(n, d)`` and the component each came from ``(n,)`` int32."""
        label_rng, noise_rng = jax.random.split(rng)
        labels = jax.random.categorical(label_rng, jnp.log(self.weights), shape=(n,))
        x = self.means[labels] + self.stds[labels, None] * jax.random.normal(noise_rng, (n, self.dim))
        return x, labels.astype(jnp.int32)

    def _terms(self, sde, x, t):
        """Per-component ``log w_k + log N_k,t(x)`` ``(n, K)``, ``x - a mean_k`` ``(n, K, d)``, variances ``(n, K)``."""
        a, var = toy.transition_coefficients(sde, t)
        v = a[:, None] ** 2 * self.stds ** 2 + var[:, None]
        diff = x[:, None, :] - a[:, None, None] * self.means
        logits = (jnp.log(self.weights) - 0.5 * self.dim * jnp.log(2 * math.pi * v)
                  - 0.5 * jnp.sum(diff ** 2, axis=-1) / v)
        return logits, diff, v

    def log_prob(self, sde, x, t):
        return jax.scipy.special.logsumexp(self._terms(sde, x, t)[0], axis=1)

    def score(self, sde, x, t):
        logits, diff, v = self._terms(sde, x, t)
        post = jax.nn.softmax(logits, axis=1)
        return -jnp.einsum("nk,nkd->nd", post / v, diff)


def make_mixture(dim: int) -> IsotropicMixture:
    """The test distribution in ``dim`` dimensions, fixed (no config seed: cells stay comparable).

    2-D: 8 components on a circle of radius 3, std 0.3, unequal weights. Higher: 6 components with
    means drawn N(0, 2² I) and stds in [0.3, 0.7], unequal weights (a sampler that gets the weights
    wrong shows in ``Δlog p``).
    """
    rng = np.random.default_rng(1234 + dim)
    if dim == 2:
        angles = 2 * np.pi * np.arange(8) / 8
        means = 3.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        return IsotropicMixture(np.linspace(1.0, 2.0, 8), means, np.full(8, 0.3))
    return IsotropicMixture(rng.uniform(1.0, 2.0, 6), rng.normal(0.0, 2.0, (6, dim)), rng.uniform(0.3, 0.7, 6))
