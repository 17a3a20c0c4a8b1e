"""Group normalisation for the DDPM / NCSN++ / DDPM++ architectures.

:class:`GroupNorm` has the semantics and parameter names of ``flax.linen.GroupNorm``
(``scale`` and ``bias``, shape ``(C,)``; auto-named ``GroupNorm_<i>`` inside a parent),
so parameter trees and released checkpoints of the original code load unchanged.

It differs only in how the statistics are computed. Flax reshapes the input to
``(B, H, W, G, C/G)`` and reduces over the spatial *and* the minor channel axis, which
XLA:CPU turns into a slow reduction. Here every reduction first runs over the spatial
axes only (channels stay the fast, minor axis), giving per-channel moments of shape
``(B, C)``; these tiny arrays are then combined exactly into per-group moments. The
variance is computed in two passes (mean first, then the mean of squared deviations),
so it stays accurate when the mean is large relative to the spread, unlike the
one-pass ``E[x²] - E[x]²``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Array = Any


def group_moments(x: Array, num_groups: int) -> tuple[Array, Array]:
    """Per-group mean and (biased) variance of a channel-last tensor.

    Each channel's mean and variance over the spatial axes are computed first (two
    passes: mean, then mean squared deviation); the group's moments then follow
    exactly from the per-channel ones (the parallel-variance formula
    ``var_g = mean_c(var_c + (mean_c - mean_g)²)``), which keeps every large
    reduction over non-minor axes.

    Args:
        x: (B, ..., C) activations; ``C`` must be divisible by ``num_groups``.
        num_groups: number of channel groups ``G``.

    Returns:
        ``(mean, var)``, each of shape (B, 1, ..., 1, C): the statistics of the group of
        each channel, broadcast back to its channels, in float32 or wider.
    """
    batch, channels = x.shape[0], x.shape[-1]
    group_size = channels // num_groups
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    spatial_axes = tuple(range(1, x.ndim - 1))
    stat_shape = (batch,) + (1,) * len(spatial_axes) + (channels,)

    def group_mean(per_channel: Array) -> Array:
        # (B, C) -> mean over the channels of each group, repeated per channel -> (B, C)
        grouped = per_channel.reshape(batch, num_groups, group_size).mean(axis=-1, keepdims=True)
        return jnp.broadcast_to(grouped, (batch, num_groups, group_size)).reshape(batch, channels)

    channel_mean = jnp.mean(x, axis=spatial_axes, keepdims=True)
    channel_var = jnp.mean(jnp.square(x - channel_mean), axis=spatial_axes).reshape(batch, channels)
    channel_mean = channel_mean.reshape(batch, channels)
    mean = group_mean(channel_mean)
    var = group_mean(channel_var + jnp.square(channel_mean - mean))
    return mean.reshape(stat_shape), var.reshape(stat_shape)


class GroupNorm(nn.Module):
    """Group normalisation over the spatial axes and groups of channels (NHWC input).

    A drop-in replacement for ``flax.linen.GroupNorm`` on channel-last images.

    Attributes:
        num_groups: number of channel groups (default 32, as in the paper and flax).
        group_size: channels per group; give this or ``num_groups``, not both.
        epsilon: added to the variance before the reciprocal square root (1e-6, flax's
            default and what the original code used).
        use_bias: learn a per-channel offset ``bias`` of shape (C,).
        use_scale: learn a per-channel gain ``scale`` of shape (C,).
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    use_bias: bool = True
    use_scale: bool = True

    def _groups(self, channels: int) -> int:
        if (self.num_groups is None) == (self.group_size is None):
            raise ValueError("GroupNorm: give exactly one of num_groups and group_size.")
        groups = self.num_groups if self.num_groups is not None else channels // self.group_size
        if groups < 1 or channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels cannot be split into {groups} equal groups "
                             f"(num_groups={self.num_groups}, group_size={self.group_size}).")
        return groups

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Normalise ``x`` of shape (B, ..., C); returns the same shape and dtype."""
        channels = x.shape[-1]
        mean, var = group_moments(x, self._groups(channels))
        inv = 1.0 / jnp.sqrt(var + self.epsilon)
        if self.use_scale:
            inv = inv * self.param("scale", nn.initializers.ones, (channels,))
        y = (x - mean) * inv
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (channels,))
        return y.astype(x.dtype)
