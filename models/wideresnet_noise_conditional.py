"""Noise-conditional Wide ResNet classifier for class-conditional sampling (Song et al., ICLR 2021, App. I).

A WRN-28-10-style classifier of noisy CIFAR-10 images ``x̃ = x + σ·z`` that also sees the
noise level σ: ``log σ`` is embedded with random Fourier features and added, through a
Dense layer, inside every residual block. Its gradient ∇ₓ log p(y | x̃, σ) steers the
VE-SDE sampler towards a class (``models.utils.get_classifier_grad_fn``).

Architecture, initialisation and parameter names follow the original score_sde module
(itself derived from Flax's cifar10 example and the AutoAugment WRN): per-image
standardisation, a 3×3 ``init_conv``, three groups of ``blocks_per_group`` pre-activation
blocks (GroupNorm ``init_bn``/``bn_2`` + ReLU, convs ``conv1``/``conv2``, widths 16·k, 32·k,
64·k, strides 1, 2, 2), a final ``pre-pool-bn``, global average pooling and a Dense layer.
Residual connections pool and zero-pad channels where shapes change. The original's unused
shake-shake/shake-drop helpers (which needed the removed ``flax.nn`` API) are not ported.
"""
from __future__ import annotations

from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.normalization import GroupNorm

Array = Any

# Kaiming normal initialisation in fan-out mode for convolution kernels.
conv_kernel_init_fn = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def dense_layer_init_fn(key, shape, dtype=jnp.float32) -> Array:
    """Final Dense kernel: U[-s, s] with ``s = 1/sqrt(num_outputs)`` (AutoAugment's choice)."""
    return jax.random.uniform(key, shape, dtype, -1.0, 1.0) * (1.0 / shape[1] ** 0.5)


def activation(x: Array, train: bool, apply_relu: bool = True, name: str = "") -> Array:
    """GroupNorm (min(C/4, 32) groups, ε=1e-5) named ``name``, then ReLU. ``train`` is unused (no batch stats)."""
    del train
    x = GroupNorm(num_groups=min(x.shape[-1] // 4, 32), epsilon=1e-5, name=name)(x)
    return jax.nn.relu(x) if apply_relu else x


def _output_add(block_x: Array, orig_x: Array) -> Array:
    """``block_x + orig_x``, average-pooling and zero-padding the channels of ``orig_x`` when they differ."""
    if block_x.shape[-1] != orig_x.shape[-1]:
        stride = orig_x.shape[-2] // block_x.shape[-2]
        orig_x = nn.avg_pool(orig_x, (stride, stride), (stride, stride))
        orig_x = jnp.pad(orig_x, [(0, 0), (0, 0), (0, 0), (0, block_x.shape[-1] - orig_x.shape[-1])])
    return block_x + orig_x


class GaussianFourierProjection(nn.Module):
    """Fixed random Fourier features of a scalar: (B,) -> (B, 2·embedding_size).

    ``W`` ~ N(0, scale²) is a parameter but receives no gradient.
    """

    embedding_size: int = 256
    scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = self.param("W", nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
        w = jax.lax.stop_gradient(w)
        x_proj = x[:, None] * w[None, :] * (2 * np.pi)
        return jnp.concatenate([jnp.sin(x_proj), jnp.cos(x_proj)], axis=-1)


class WideResnetBlock(nn.Module):
    """Pre-activation residual block; ``temb`` (B, D) adds a per-channel bias after the first conv."""

    channels: int
    strides: Tuple[int, int] = (1, 1)
    activate_before_residual: bool = False

    @nn.compact
    def __call__(self, x: Array, temb: Array | None = None, train: bool = True) -> Array:
        if self.activate_before_residual:
            x = activation(x, train, name="init_bn")
            block_x = x
        else:
            block_x = activation(x, train, name="init_bn")
        orig_x = x
        block_x = nn.Conv(self.channels, (3, 3), self.strides, padding="SAME", use_bias=False,
                          kernel_init=conv_kernel_init_fn, name="conv1")(block_x)
        if temb is not None:
            block_x = block_x + nn.Dense(self.channels)(nn.swish(temb))[:, None, None, :]
        block_x = activation(block_x, train, name="bn_2")
        block_x = nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False,
                          kernel_init=conv_kernel_init_fn, name="conv2")(block_x)
        return _output_add(block_x, orig_x)


class WideResnetGroup(nn.Module):
    """``blocks_per_group`` blocks; only the first one strides (and may activate before the residual)."""

    blocks_per_group: int
    channels: int
    strides: Tuple[int, int] = (1, 1)
    activate_before_residual: bool = False

    @nn.compact
    def __call__(self, x: Array, temb: Array | None = None, train: bool = True) -> Array:
        for i in range(self.blocks_per_group):
            x = WideResnetBlock(self.channels, self.strides if i == 0 else (1, 1),
                                activate_before_residual=self.activate_before_residual and i == 0)(x, temb, train)
        return x


class WideResnet(nn.Module):
    """Noise-conditional Wide ResNet.

    Attributes:
        blocks_per_group: residual blocks per group (4 for the released WRN-28-10).
        channel_multiplier: width factor k (10).
        num_outputs: number of classes (10).
    """

    blocks_per_group: int
    channel_multiplier: int
    num_outputs: int

    @nn.compact
    def __call__(self, x: Array, sigmas: Array, train: bool = True) -> Array:
        """Args: x (B, H, W, C) images; sigmas (B,) VE noise levels σ > 0; train (unused).

        Returns: (B, num_outputs) logits.
        """
        if x.ndim != 4:
            raise ValueError(f"WideResnet expects images of shape (batch, H, W, C), got {tuple(x.shape)}.")
        num_pixels = np.prod(x.shape[1:])
        mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
        std = jnp.std(x, axis=(1, 2, 3), keepdims=True)
        x = (x - mean) / jnp.maximum(std, 1.0 / np.sqrt(num_pixels))

        temb = GaussianFourierProjection(embedding_size=128, scale=16)(jnp.log(sigmas))
        temb = nn.Dense(128 * 4)(temb)
        temb = nn.Dense(128 * 4)(nn.swish(temb))

        k = self.channel_multiplier
        x = nn.Conv(16, (3, 3), padding="SAME", name="init_conv", kernel_init=conv_kernel_init_fn,
                    use_bias=False)(x)
        x = WideResnetGroup(self.blocks_per_group, 16 * k, activate_before_residual=True)(x, temb, train)
        x = WideResnetGroup(self.blocks_per_group, 32 * k, (2, 2))(x, temb, train)
        x = WideResnetGroup(self.blocks_per_group, 64 * k, (2, 2))(x, temb, train)
        x = activation(x, train, name="pre-pool-bn")
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_outputs, kernel_init=dense_layer_init_fn)(x)
