"""Building blocks of NCSN++ / DDPM++ (``models/ncsnpp.py``).

Class names and the order in which each block creates its submodules are those of
the original code, so Flax's automatic names (``ResnetBlockBigGANpp_3/Conv_0/kernel``,
``AttnBlockpp_0/NIN_2/W``, ``Combine_1/Conv_0/bias``, ...) and shapes match the
released checkpoints. All images are NHWC, ``(batch, H, W, C)``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers, up_or_down_sampling
from models.normalization import GroupNorm

Array = Any

conv1x1 = layers.ddpm_conv1x1
conv3x3 = layers.ddpm_conv3x3
NIN = layers.NIN
default_init = layers.default_init

_INV_SQRT2 = float(1.0 / np.sqrt(2.0))  # a Python float: keeps bfloat16 activations bfloat16


def group_norm(channels: int) -> GroupNorm:
    """NCSN++'s GroupNorm: ``min(channels // 4, 32)`` groups."""
    return GroupNorm(num_groups=min(channels // 4, 32))


def residual_sum(x: Array, h: Array, skip_rescale: bool) -> Array:
    """``x + h``, divided by √2 when ``skip_rescale`` (keeps the variance of the sum)."""
    return (x + h) * _INV_SQRT2 if skip_rescale else x + h


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of the (log) noise level.

    Parameter ``W`` (embedding_size,) ~ N(0, scale²) is never trained (its gradient
    is stopped).
    """

    embedding_size: int = 256
    scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (B,) -> (B, 2·embedding_size) = [sin(2π x W), cos(2π x W)]."""
        w = self.param("W", jax.nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
        proj = x[:, None] * jax.lax.stop_gradient(w)[None, :] * (2 * np.pi)
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class Combine(nn.Module):
    """Merge a skip connection ``x`` into ``y`` after a 1×1 conv to ``y``'s channels.

    Attributes:
        method: ``'cat'`` (concatenate along channels) or ``'sum'``.
    """

    method: str = "cat"

    @nn.compact
    def __call__(self, x: Array, y: Array) -> Array:
        """x: (B, H, W, Cx), y: (B, H, W, Cy) -> (B, H, W, 2·Cy) for cat, (B, H, W, Cy) for sum."""
        if self.method not in ("cat", "sum"):
            raise ValueError(f"config.model.progressive_combine={self.method!r} is not supported; use 'cat' or 'sum'.")
        h = conv1x1(x, y.shape[-1])
        return jnp.concatenate([h, y], axis=-1) if self.method == "cat" else h + y


class AttnBlockpp(nn.Module):
    """DDPM's self-attention block with GroupNorm, optional √2 rescaling of the sum."""

    skip_rescale: bool = False
    init_scale: float = 0.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        channels = x.shape[-1]
        h = group_norm(channels)(x)
        q, k, v = NIN(channels)(h), NIN(channels)(h), NIN(channels)(h)
        h = layers.spatial_self_attention(q, k, v)
        h = NIN(channels, init_scale=self.init_scale)(h)
        return residual_sum(x, h, self.skip_rescale)


class Upsample(nn.Module):
    """2× upsampling: nearest neighbour or FIR, with an optional 3×3 conv to ``out_ch``."""

    out_ch: Optional[int] = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: Sequence[int] = (1, 3, 3, 1)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (B, H, W, C) -> (B, 2H, 2W, out_ch or C)."""
        out_ch = self.out_ch if self.out_ch else x.shape[-1]
        if not self.fir:
            h = layers.nearest_upsample(x, 2)
            return conv3x3(h, out_ch) if self.with_conv else h
        if not self.with_conv:
            return up_or_down_sampling.upsample_2d(x, self.fir_kernel, factor=2)
        return up_or_down_sampling.Conv2d(out_ch, kernel=3, up=True, resample_kernel=self.fir_kernel,
                                          use_bias=True, kernel_init=default_init())(x)


class Downsample(nn.Module):
    """2× downsampling: average pooling or FIR, or a strided 3×3 conv to ``out_ch``."""

    out_ch: Optional[int] = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: Sequence[int] = (1, 3, 3, 1)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (B, H, W, C) -> (B, H/2, W/2, out_ch or C)."""
        out_ch = self.out_ch if self.out_ch else x.shape[-1]
        if not self.fir:
            if self.with_conv:
                return conv3x3(x, out_ch, stride=2)
            return up_or_down_sampling.naive_downsample_2d(x, factor=2)
        if not self.with_conv:
            return up_or_down_sampling.downsample_2d(x, self.fir_kernel, factor=2)
        return up_or_down_sampling.Conv2d(out_ch, kernel=3, down=True, resample_kernel=self.fir_kernel,
                                          use_bias=True, kernel_init=default_init())(x)


class ResnetBlockDDPMpp(nn.Module):
    """DDPM's residual block with GroupNorm, for NCSN++ (``resblock_type='ddpm'``).

    Attributes:
        act: activation function.
        out_ch: output channels (default: input channels).
        conv_shortcut: project the shortcut with a 3×3 conv instead of NIN.
        dropout: dropout rate (active when ``train``).
        skip_rescale: divide the residual sum by √2.
        init_scale: initial scale of the last conv (0 gives ~1e-10).
    """

    act: Any
    out_ch: Optional[int] = None
    conv_shortcut: bool = False
    dropout: float = 0.1
    skip_rescale: bool = False
    init_scale: float = 0.0

    @nn.compact
    def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = True) -> Array:
        """x: (B, H, W, C), temb: (B, E) or None -> (B, H, W, out_ch)."""
        channels = x.shape[-1]
        out_ch = self.out_ch if self.out_ch else channels
        h = conv3x3(self.act(group_norm(channels)(x)), out_ch)
        if temb is not None:
            h = h + nn.Dense(out_ch, kernel_init=default_init(), dtype=h.dtype)(self.act(temb))[:, None, None, :]
        h = self.act(group_norm(out_ch)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv3x3(h, out_ch, init_scale=self.init_scale)
        if channels != out_ch:
            x = conv3x3(x, out_ch) if self.conv_shortcut else NIN(out_ch)(x)
        return residual_sum(x, h, self.skip_rescale)


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN's residual block, optionally resampling by 2 (``resblock_type='biggan'``).

    Attributes:
        act: activation function.
        up / down: upsample or downsample both paths by 2.
        out_ch: output channels (default: input channels).
        dropout: dropout rate (active when ``train``).
        fir: resample with the FIR filter ``fir_kernel`` (else nearest / average).
        skip_rescale: divide the residual sum by √2.
        init_scale: initial scale of the last conv (0 gives ~1e-10).
    """

    act: Any
    up: bool = False
    down: bool = False
    out_ch: Optional[int] = None
    dropout: float = 0.1
    fir: bool = False
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0

    def _resample(self, x: Array) -> Array:
        if self.up:
            if self.fir:
                return up_or_down_sampling.upsample_2d(x, self.fir_kernel, factor=2)
            return up_or_down_sampling.naive_upsample_2d(x, factor=2)
        if self.down:
            if self.fir:
                return up_or_down_sampling.downsample_2d(x, self.fir_kernel, factor=2)
            return up_or_down_sampling.naive_downsample_2d(x, factor=2)
        return x

    @nn.compact
    def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = True) -> Array:
        """x: (B, H, W, C), temb: (B, E) or None -> (B, H', W', out_ch), H' = 2H / H/2 / H."""
        channels = x.shape[-1]
        out_ch = self.out_ch if self.out_ch else channels
        h = self.act(group_norm(channels)(x))
        h, x = self._resample(h), self._resample(x)
        h = conv3x3(h, out_ch)
        if temb is not None:
            h = h + nn.Dense(out_ch, kernel_init=default_init(), dtype=h.dtype)(self.act(temb))[:, None, None, :]
        h = self.act(group_norm(out_ch)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv3x3(h, out_ch, init_scale=self.init_scale)
        if channels != out_ch or self.up or self.down:
            x = conv1x1(x, out_ch)
        return residual_sum(x, h, self.skip_rescale)
