"""Densities of logistic distributions and their mixtures, elementwise.

Shapes: ``x`` (...), mixture parameters (..., K) for K components.
"""
import jax
import jax.numpy as jnp


def logistic_logpdf(x, mean, logscale):
    """log density of Logistic(mean, exp(logscale)) at ``x`` (all broadcastable)."""
    z = (x - mean) * jnp.exp(-logscale)
    return z - logscale - 2 * jax.nn.softplus(z)


def logistic_logcdf(x, mean, logscale):
    """log CDF of Logistic(mean, exp(logscale)) at ``x`` (all broadcastable)."""
    return jax.nn.log_sigmoid((x - mean) * jnp.exp(-logscale))


def mixlogistic_logpdf(x, logits, means, logscales):
    """log density of the mixture: ``x`` (...), ``logits``/``means``/``logscales`` (..., K) -> (...)."""
    return jax.nn.logsumexp(jax.nn.log_softmax(logits, axis=-1) + logistic_logpdf(x[..., None], means, logscales),
                            axis=-1)


def mixlogistic_logcdf(x, logits, means, logscales):
    """log CDF of the mixture: ``x`` (...), ``logits``/``means``/``logscales`` (..., K) -> (...)."""
    return jax.nn.logsumexp(jax.nn.log_softmax(logits, axis=-1) + logistic_logcdf(x[..., None], means, logscales),
                            axis=-1)
