"""Invertible steps of the Flow++ dequantiser, forward direction only (noise -> dequantisation noise).

Each step maps ``h`` to ``(h', logdet)`` with ``logdet`` (B,) the log-Jacobian-determinant per example.
The flow works on pairs of half-images ``(a, b)``, each (B, H, W/2, C), from :func:`checkerboard_split`.
Module and parameter names are score_flow's (``Norm_<i>/norm<j>_g``, ``Pointwise_<i>/W<j>``,
``MixLogisticAttnCoupling_<i>/...``).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.flowpp import layers
from models.flowpp.logistic import mixlogistic_logcdf, mixlogistic_logpdf


def safe_log(x):
    """``log(max(x, 1e-7))``."""
    return jnp.log(jnp.clip(x, min=1e-7))


def sum_per_example(x):
    """(B, ...) -> (B,)."""
    return jnp.sum(jnp.reshape(x, (x.shape[0], -1)), axis=1)


def checkerboard_split(x):
    """(B, H, W, C) -> the even and odd columns, each (B, H, W/2, C)."""
    batch, height, width, channels = x.shape
    pairs = jnp.reshape(x, (batch, height, width // 2, 2, channels))
    return pairs[:, :, :, 0], pairs[:, :, :, 1]


def checkerboard_merge(a, b):
    """Inverse of :func:`checkerboard_split`: two (B, H, W/2, C) -> (B, H, W, C)."""
    batch, height, half_width, channels = a.shape
    return jnp.reshape(jnp.stack([a, b], axis=3), (batch, height, 2 * half_width, channels))


def sigmoid(x):
    """``(sigmoid(x), logdet)``, elementwise."""
    return jax.nn.sigmoid(x), sum_per_example(-jax.nn.softplus(x) - jax.nn.softplus(-x))


def logit(y):
    """``(log(y / (1 - y)), logdet)`` for ``y`` in (0, 1), elementwise (logs clipped at 1e-7)."""
    return -safe_log(1.0 / y - 1.0), sum_per_example(-safe_log(y) - safe_log(1.0 - y))


class Norm(nn.Module):
    """Elementwise affine ``h · g + b`` (g clipped at 1e-10), one ``(g, b)`` per half, each (H, W/2, C).

    Initialised from the data so that each element of each half is standardised over the batch.
    """

    @nn.compact
    def __call__(self, halves):
        outs, logdet = [], 0.0
        for i, h in enumerate(halves):
            gain = self.param(f"norm{i}_g", lambda rng, h=h: layers.normalizing_scale_and_shift(h, (0,))[0])
            bias = self.param(f"norm{i}_b", lambda rng, h=h: layers.normalizing_scale_and_shift(h, (0,))[1])
            gain = jnp.maximum(gain, 1e-10)
            outs.append(h * gain[None] + bias[None])
            logdet = logdet + jnp.sum(safe_log(gain))
        return tuple(outs), jnp.full((halves[0].shape[0],), logdet)


class Pointwise(nn.Module):
    """Invertible 1×1 convolution per half: ``h @ W``, ``W`` (C, C) initialised to ``I + noise · N(0, 1)``."""

    noise: float = 0.001

    @nn.compact
    def __call__(self, halves):
        outs, logdet = [], 0.0
        for i, h in enumerate(halves):
            channels = h.shape[-1]
            kernel = self.param(f"W{i}", lambda rng: jnp.eye(channels) + self.noise * jax.random.normal(
                rng, (channels, channels)))
            outs.append(h @ kernel)
            logdet = logdet + h.shape[1] * h.shape[2] * jnp.linalg.slogdet(kernel)[1]
        return tuple(outs), jnp.full((halves[0].shape[0],), logdet)


class MixLogisticAttnCoupling(nn.Module):
    """Coupling layer ``(a, b) -> (a, exp(s) · logit(MixLogisticCDF(b)) + t)`` with ``s``, ``t`` and the mixture
    (``components`` logistics per element) computed from ``a`` and the context.

    The conditioner (:meth:`features`): conv to ``filters`` channels, then ``blocks`` × [gated conv with the
    context, layer norm, gated attention with a learnt position embedding, layer norm], then a conv to
    ``C · (2 + 3 · components)`` channels (named after the last block, as score_flow's). ``filters`` must be
    a multiple of ``heads``. Subclasses change the conditioner by overriding :meth:`features`.
    """

    filters: int
    blocks: int
    components: int
    heads: int = 4
    init_scale: float = 0.1
    dropout_p: float = 0.0
    min_logscale: float = -7.0

    def attention_blocks(self, x, context, pos_emb, train, conv=layers.conv2d):
        """``blocks`` × [gated ``conv`` with the context, layer norm, gated attention, layer norm]: x (B, H, W', F),
        context (B, H, W', C'), pos_emb (H, W', F) -> (B, H, W', F)."""
        for i in range(self.blocks):
            name = f"block{i}"
            x = layers.gated_conv(self, x, name=f"{name}_conv", context=context, use_nin=True,
                                  dropout_p=self.dropout_p, train=train, conv=conv)
            x = layers.layernorm(self, x, name=f"{name}_ln1")
            x = layers.gated_attn(self, x, name=f"{name}_attn", pos_emb=pos_emb, heads=self.heads,
                                  dropout_p=self.dropout_p, train=train)
            x = layers.layernorm(self, x, name=f"{name}_ln2")
        return x

    def features(self, a, context, train):
        """Half (B, H, W', C), context (B, H, W', C') -> (B, H, W', C · (2 + 3 · components)): per element of
        ``b``, ``s`` and ``t`` before their activation, then the mixture's logits, means and log-scales."""
        pos_emb = self.param("pos_emb", nn.initializers.normal(stddev=0.01), a.shape[1:3] + (self.filters,))
        x = layers.conv2d(self, a, name="proj_in", num_units=self.filters)
        x = self.attention_blocks(x, context, pos_emb, train)
        return layers.conv2d(self, x, name=f"block{self.blocks - 1}_proj_out",
                             num_units=a.shape[-1] * (2 + 3 * self.components), init_scale=self.init_scale)

    @nn.compact
    def __call__(self, halves, context, train: bool = False):
        a, b = halves
        x = jnp.reshape(self.features(a, context, train), b.shape + (2 + 3 * self.components,))
        logits, means, logscales = jnp.split(x[..., 2:], 3, axis=-1)
        s, t = jnp.tanh(x[..., 0]), x[..., 1]
        logscales = jnp.maximum(logscales, self.min_logscale)
        cdf = jnp.exp(mixlogistic_logcdf(b, logits, means, logscales))
        logdet = sum_per_example(mixlogistic_logpdf(b, logits, means, logscales))
        h, logdet_logit = logit(cdf)
        return (a, h * jnp.exp(s) + t), logdet + logdet_logit + sum_per_example(s)


def standard_normal_logpdf(eps):
    """log N(eps; 0, I) per example: (B, ...) -> (B,)."""
    return sum_per_example(-eps ** 2 / 2.0 - 0.5 * math.log(2 * math.pi))
