"""Instance-style normalisations of NCSN (v1) and NCSNv2 (Song & Ermon, 2019 and 2020).

All layers take channel-last images ``x`` of shape (B, H, W, C) and normalise every
(image, channel) pair over the spatial axes. Class and parameter names are those of the
original score_sde code (``InstanceNorm2dPlus_0/alpha``, ``.../gamma``, ``.../beta``, all of
shape (1, 1, 1, C); ``ConditionalInstanceNorm2dPlus_0/Embed_0/embedding`` of shape
(num_classes, 3·C)), so released checkpoints load unchanged.

Speed: the per-channel statistics come from one fused pass over the spatial axes
(channels stay the fast, minor axis). The variance is computed around a per-channel shift
(the first pixel, held constant for differentiation), ``Var[x] = E[(x-k)²] - E[x-k]²``,
which is exact in real arithmetic for any ``k`` and avoids the catastrophic cancellation of
the naive ``E[x²] - E[x]²`` when the mean is large relative to the spread. Each layer then
folds its statistics and parameters into one per-(image, channel) scale and offset, so the
full-size tensor is touched once more by a single multiply-add.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.normalization import GroupNorm

Array = Any

_EPS = 1e-5  # added to every variance, as in the original


def instance_moments(x: Array) -> tuple[Array, Array]:
    """Per-image, per-channel mean and biased variance over the spatial axes.

    Args:
        x: (B, H, W, C) activations.

    Returns:
        ``(mean, var)``, each (B, C), in float32 or wider.
    """
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    shift = jax.lax.stop_gradient(x[:, :1, :1, :])
    centred = x - shift
    mean_c = jnp.mean(centred, axis=(1, 2))
    mean_sq = jnp.mean(jnp.square(centred), axis=(1, 2))
    var = jnp.maximum(mean_sq - jnp.square(mean_c), 0.0)
    return mean_c + shift[:, 0, 0, :], var


def _affine(x: Array, scale: Array, offset: Array) -> Array:
    """``x * scale + offset`` with (B, C) ``scale``/``offset`` broadcast over space."""
    return (x * scale[:, None, None, :] + offset[:, None, None, :]).astype(x.dtype)


def _standardised_means(means: Array) -> Array:
    """InstanceNorm++'s correction term: channel means standardised across channels. (B, C) -> (B, C)."""
    m = jnp.mean(means, axis=-1, keepdims=True)
    v = jnp.var(means, axis=-1, keepdims=True)
    return (means - m) * jax.lax.rsqrt(v + _EPS)


def _normal_plus_one(key, shape, dtype=jnp.float32) -> Array:
    """N(1, 0.02²): the original's initialiser of multiplicative normalisation parameters."""
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class VarianceNorm2d(nn.Module):
    """Divide by the per-channel spatial standard deviation (no centring); learnt ``scale`` (and ``bias``)."""

    bias: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        _, var = instance_moments(x)
        scale = self.param("scale", _normal_plus_one, (1, 1, 1, channels)).reshape(1, -1)
        scale = scale * jax.lax.rsqrt(var + _EPS)
        offset = jnp.zeros_like(scale)
        if self.bias:
            offset = offset + self.param("bias", nn.initializers.zeros, (1, 1, 1, channels)).reshape(1, -1)
        return _affine(x, scale, offset)


class InstanceNorm2d(nn.Module):
    """Instance normalisation with learnt ``scale`` (ones) and optional ``bias`` (zeros), (1, 1, 1, C)."""

    bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        mean, var = instance_moments(x)
        scale = self.param("scale", nn.initializers.ones, (1, 1, 1, channels)).reshape(1, -1)
        scale = scale * jax.lax.rsqrt(var + _EPS)
        offset = -mean * scale
        if self.bias:
            offset = offset + self.param("bias", nn.initializers.zeros, (1, 1, 1, channels)).reshape(1, -1)
        return _affine(x, scale, offset)


class InstanceNorm2dPlus(nn.Module):
    """InstanceNorm++ (NCSN paper): instance norm that re-injects the standardised channel means.

    ``gamma · ((x - μ)/σ + α · (μ - mean_c μ)/std_c μ) + beta`` with per-channel ``alpha``,
    ``gamma`` ~ N(1, 0.02²) and ``beta`` = 0 (if ``bias``), each of shape (1, 1, 1, C).
    """

    bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        mean, var = instance_moments(x)
        means_plus = _standardised_means(mean)
        alpha = self.param("alpha", _normal_plus_one, (1, 1, 1, channels)).reshape(1, -1)
        gamma = self.param("gamma", _normal_plus_one, (1, 1, 1, channels)).reshape(1, -1)
        beta = self.param("beta", nn.initializers.zeros, (1, 1, 1, channels)).reshape(1, -1) if self.bias else 0.0
        inv_std = jax.lax.rsqrt(var + _EPS)
        scale = gamma * inv_std
        offset = gamma * (means_plus * alpha - mean * inv_std) + beta
        return _affine(x, scale, offset)


class ConditionalInstanceNorm2dPlus(nn.Module):
    """InstanceNorm++ whose ``gamma``, ``alpha`` (and ``beta``) are looked up per noise level.

    One ``nn.Embed`` (``Embed_0/embedding``, shape (num_classes, 3·C), or 2·C without bias)
    holds ``[gamma | alpha | beta]`` for each class; ``gamma`` and ``alpha`` start at
    N(1, 0.02²), ``beta`` at 0.

    Call as ``norm(x, y)`` with ``y`` (B,) integer noise-level indices in ``[0, num_classes)``.
    """

    num_classes: int = 10
    bias: bool = True

    @nn.compact
    def __call__(self, x: Array, y: Array) -> Array:
        if not jnp.issubdtype(jnp.asarray(y).dtype, jnp.integer):
            raise ValueError(
                "ConditionalInstanceNorm2dPlus is conditioned on integer noise-level indices, got labels of dtype "
                f"{jnp.asarray(y).dtype}. NCSN (v1) is a discrete-noise model: set training.continuous = False.")
        channels = x.shape[-1]
        n_params = 3 if self.bias else 2

        def init_embedding(key, shape, dtype=jnp.float32):
            multiplicative = _normal_plus_one(key, (shape[0], 2 * channels), dtype)
            additive = jnp.zeros((shape[0], shape[1] - 2 * channels), dtype)
            return jnp.concatenate([multiplicative, additive], axis=-1)

        embed = nn.Embed(num_embeddings=self.num_classes, features=n_params * channels,
                         embedding_init=init_embedding)
        params = embed(y)
        gamma, alpha = params[:, :channels], params[:, channels:2 * channels]
        beta = params[:, 2 * channels:] if self.bias else 0.0

        mean, var = instance_moments(x)
        means_plus = _standardised_means(mean)
        inv_std = jax.lax.rsqrt(var + _EPS)
        scale = gamma * inv_std
        offset = gamma * (means_plus * alpha - mean * inv_std) + beta
        return _affine(x, scale, offset)


def get_normalization(config, conditional: bool = False) -> Callable[..., nn.Module]:
    """The normalisation module class of ``config.model.normalization`` for NCSN-style models.

    Args:
        config: the experiment config; reads ``model.normalization`` and, if ``conditional``,
            ``model.num_classes`` (defaults to ``model.num_scales``: one class per noise level).
        conditional: return the noise-conditional variant (NCSNv1); only ``'InstanceNorm++'`` has one.

    Returns:
        A zero-argument constructor of the module (call it, then apply it as ``norm(x)`` or ``norm(x, y)``).
    """
    norm = config.model.normalization
    if conditional:
        if norm != "InstanceNorm++":
            raise NotImplementedError(
                f"config.model.normalization={norm!r} has no noise-conditional version; NCSN (v1) supports "
                "only 'InstanceNorm++'.")
        num_scales = config.model.num_scales
        num_classes = config.model.get("num_classes", num_scales)
        if num_classes < num_scales:
            raise ValueError(
                f"config.model.num_classes={num_classes} is smaller than config.model.num_scales={num_scales}: "
                "the conditional normalisation needs one class per noise level (set num_classes = num_scales).")
        return functools.partial(ConditionalInstanceNorm2dPlus, num_classes=num_classes)
    modules = {"InstanceNorm": InstanceNorm2d, "InstanceNorm++": InstanceNorm2dPlus,
               "VarianceNorm": VarianceNorm2d, "GroupNorm": GroupNorm}
    if norm not in modules:
        raise ValueError(f"Unknown config.model.normalization={norm!r}; choose one of {sorted(modules)}.")
    return modules[norm]

