"""Building blocks shared by the score networks (DDPM family and helpers used by NCSN).

Convolution helpers create a ``flax.linen.Conv`` inside the calling module, so its
parameters are auto-named ``Conv_<i>`` there, exactly as in the original code, which
keeps released checkpoints loadable. All images are NHWC, ``(batch, H, W, C)``.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = Any


def check_image_batch(x: Array, config, model_name: str) -> None:
    """Raise a ValueError unless ``x`` is (B, image_size, image_size, num_channels) per ``config.data``."""
    expected = (config.data.image_size, config.data.image_size, config.data.num_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"{model_name}: input of shape {tuple(x.shape)} does not match the config: expected "
            f"(batch, {expected[0]}, {expected[1]}, {expected[2]}) from config.data.image_size="
            f"{config.data.image_size} and config.data.num_channels={config.data.num_channels}.")


def check_time_cond(time_cond: Array, x: Array, model_name: str) -> None:
    """Raise a ValueError unless ``time_cond`` is one value per image, shape (B,)."""
    if time_cond.shape != (x.shape[0],):
        raise ValueError(f"{model_name}: the time/noise conditioning must have shape (batch,) = ({x.shape[0]},), "
                         f"got {tuple(time_cond.shape)}.")


_ACTIVATIONS = {
    "elu": nn.elu,
    "relu": nn.relu,
    "lrelu": functools.partial(nn.leaky_relu, negative_slope=0.2),
    "swish": nn.swish,
}


def get_act(config) -> Callable[[Array], Array]:
    """The activation named by ``config.model.nonlinearity`` (elu, relu, lrelu, swish)."""
    name = config.model.nonlinearity.lower()
    if name not in _ACTIVATIONS:
        raise ValueError(f"config.model.nonlinearity={config.model.nonlinearity!r} is not supported; "
                         f"choose one of {sorted(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]


def default_init(scale: float = 1.0) -> Callable:
    """DDPM's initializer: variance scaling, fan-average, uniform. ``scale=0`` means 1e-10."""
    return jax.nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


def _pytorch_init(kernel_shape: tuple, init_scale: float) -> tuple[Callable, Callable]:
    """PyTorch's default conv initialisation (NCSNv1/v2): uniform, fan-in, variance 1/3.

    The bias is drawn from the same distribution as the kernel (fan-in of the kernel).
    """
    kernel_init = jax.nn.initializers.variance_scaling(1 / 3 * (1e-10 if init_scale == 0 else init_scale),
                                                       "fan_in", "uniform")

    def bias_init(key, shape, dtype=jnp.float32):
        return kernel_init(key, kernel_shape, dtype)[0, 0, 0, :]

    return kernel_init, bias_init


def _conv(x: Array, out_planes: int, size: int, stride: int, bias: bool, dilation: int,
          kernel_init: Callable, bias_init: Callable) -> Array:
    # Computes in the input's dtype (bfloat16 activations: mixed precision); parameters stay float32.
    return nn.Conv(out_planes, kernel_size=(size, size), strides=(stride, stride), padding="SAME",
                   use_bias=bias, kernel_dilation=(dilation, dilation), kernel_init=kernel_init,
                   bias_init=bias_init, dtype=x.dtype)(x)


def ncsn_conv1x1(x: Array, out_planes: int, stride: int = 1, bias: bool = True, dilation: int = 1,
                 init_scale: float = 1.0) -> Array:
    """1×1 convolution with PyTorch initialisation (NCSNv1/v2). x: (B, H, W, Cin)."""
    return _conv(x, out_planes, 1, stride, bias, dilation,
                 *_pytorch_init((1, 1, x.shape[-1], out_planes), init_scale))


def ncsn_conv3x3(x: Array, out_planes: int, stride: int = 1, bias: bool = True, dilation: int = 1,
                 init_scale: float = 1.0) -> Array:
    """3×3 'SAME' convolution with PyTorch initialisation (NCSNv1/v2). x: (B, H, W, Cin)."""
    return _conv(x, out_planes, 3, stride, bias, dilation,
                 *_pytorch_init((3, 3, x.shape[-1], out_planes), init_scale))


def ddpm_conv1x1(x: Array, out_planes: int, stride: int = 1, bias: bool = True, dilation: int = 1,
                 init_scale: float = 1.0) -> Array:
    """1×1 convolution with DDPM initialisation (zero bias). x: (B, H, W, Cin)."""
    return _conv(x, out_planes, 1, stride, bias, dilation, default_init(init_scale), nn.initializers.zeros)


def ddpm_conv3x3(x: Array, out_planes: int, stride: int = 1, bias: bool = True, dilation: int = 1,
                 init_scale: float = 1.0) -> Array:
    """3×3 'SAME' convolution with DDPM initialisation (zero bias). x: (B, H, W, Cin)."""
    return _conv(x, out_planes, 3, stride, bias, dilation, default_init(init_scale), nn.initializers.zeros)


def get_timestep_embedding(timesteps: Array, embedding_dim: int, max_positions: int = 10000) -> Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in Transformers / DDPM.

    Args:
        timesteps: (B,) time indices or noise levels.
        embedding_dim: output width D; odd D gets one zero column at the end.
        max_positions: the longest period is ``2π·max_positions``.

    Returns:
        (B, D) float32: ``[sin(t·f_0..f_{D/2-1}), cos(t·f_0..)]`` with
        ``f_i = max_positions^(-i / (D/2 - 1))``.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"get_timestep_embedding: timesteps must be 1-D (batch,), got shape {timesteps.shape}.")
    half_dim = embedding_dim // 2
    freqs = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * (-math.log(max_positions) / (half_dim - 1)))
    angles = timesteps[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


@functools.lru_cache(maxsize=None)
def _rematerialised(block: type, static_argnums: tuple[int, ...]) -> type:
    wrapped = nn.remat(block, static_argnums=static_argnums)
    # Flax names a submodule after its class (``ResnetBlockDDPM_3``); nn.remat would prefix
    # "Checkpoint". Keeping the block's name keeps the parameter tree, hence checkpoints,
    # independent of ``config.model.remat``.
    wrapped.__name__ = wrapped.__qualname__ = block.__name__
    return wrapped


def remat_block(block: type, config, static_argnums: tuple[int, ...] = ()) -> type:
    """``block`` (a Module class), recomputed in the backward pass if ``config.model.remat``.

    With remat, only the block's inputs are kept for the gradient; its activations are
    recomputed from them, trading one more forward pass of the block for memory.
    ``static_argnums`` index ``__call__``'s Python (non-array) arguments, counting ``self`` as 0:
    ``(3,)`` for ``train`` in ``block(x, temb, train)``. Configs without the field do not remat.
    """
    if not config.model.get("remat", False):
        return block
    return _rematerialised(block, tuple(static_argnums))


def contract_inner(x: Array, y: Array) -> Array:
    """``tensordot(x, y, 1)``: contract the last axis of ``x`` with the first of ``y``."""
    return jnp.tensordot(x, y, axes=1)


class NIN(nn.Module):
    """Network-in-network: a per-pixel linear map over channels (a 1×1 conv).

    Parameters ``W`` (Cin, num_units) and ``b`` (num_units,), float32; computes in ``x``'s dtype.
    """

    num_units: int
    init_scale: float = 0.1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (..., Cin) -> (..., num_units)."""
        w = self.param("W", default_init(scale=self.init_scale), (x.shape[-1], self.num_units))
        b = self.param("b", nn.initializers.zeros, (self.num_units,))
        return contract_inner(x, w.astype(x.dtype)) + b.astype(x.dtype)


def spatial_self_attention(q: Array, k: Array, v: Array) -> Array:
    """Softmax attention between all pixels of an image.

    Args:
        q, k, v: (B, H, W, C) queries, keys and values.

    Returns:
        (B, H, W, C): for each pixel, the softmax(q·k / √C)-weighted mean of ``v`` over
        all H·W pixels, in ``v``'s dtype (the softmax itself runs in float32 or wider).
    """
    b, h, w, c = q.shape
    q = q.reshape(b, h * w, c) * (c ** -0.5)
    k = k.reshape(b, h * w, c)
    v = v.reshape(b, h * w, c)
    logits = jnp.einsum("bic,bjc->bij", q, k)
    weights = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1).astype(v.dtype)
    return jnp.einsum("bij,bjc->bic", weights, v).reshape(b, h, w, c)


class AttnBlock(nn.Module):
    """DDPM's self-attention block: ``x + NIN(attention(norm(x)))``.

    Attributes:
        normalize: normalisation module class (called without arguments).
    """

    normalize: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        channels = x.shape[-1]
        h = self.normalize()(x)
        q, k, v = NIN(channels)(h), NIN(channels)(h), NIN(channels)(h)
        h = spatial_self_attention(q, k, v)
        return x + NIN(channels, init_scale=0.0)(h)


def nearest_upsample(x: Array, factor: int = 2) -> Array:
    """Nearest-neighbour upsampling: (B, H, W, C) -> (B, H·factor, W·factor, C)."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
    return x.reshape(b, h * factor, w * factor, c)


class Upsample(nn.Module):
    """DDPM's 2× nearest-neighbour upsampling, optionally followed by a 3×3 conv."""

    with_conv: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (B, H, W, C) -> (B, 2H, 2W, C)."""
        h = nearest_upsample(x, 2)
        if self.with_conv:
            h = ddpm_conv3x3(h, x.shape[-1])
        return h


class Downsample(nn.Module):
    """DDPM's 2× downsampling: a stride-2 3×3 conv, or 2×2 average pooling."""

    with_conv: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (B, H, W, C) -> (B, H/2, W/2, C)."""
        if self.with_conv:
            return ddpm_conv3x3(x, x.shape[-1], stride=2)
        return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding="SAME")


class ResnetBlockDDPM(nn.Module):
    """DDPM's residual block, conditioned on a time embedding.

    ``x + conv(drop(act(norm(conv(act(norm(x))) + Dense(act(temb))))))``, with a 1×1
    (NIN) or 3×3 projection of ``x`` when the channel count changes.

    Attributes:
        act: activation function.
        normalize: normalisation module class (called without arguments).
        out_ch: output channels (default: input channels).
        conv_shortcut: project the shortcut with a 3×3 conv instead of NIN.
        dropout: dropout rate (active when ``train``).
    """

    act: Any
    normalize: Any
    out_ch: Optional[int] = None
    conv_shortcut: bool = False
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = True) -> Array:
        """x: (B, H, W, C), temb: (B, E) or None -> (B, H, W, out_ch)."""
        channels = x.shape[-1]
        out_ch = self.out_ch if self.out_ch else channels
        h = ddpm_conv3x3(self.act(self.normalize()(x)), out_ch)
        if temb is not None:
            h = h + nn.Dense(out_ch, kernel_init=default_init(), dtype=h.dtype)(self.act(temb))[:, None, None, :]
        h = self.act(self.normalize()(h))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = ddpm_conv3x3(h, out_ch, init_scale=0.0)
        if channels != out_ch:
            x = ddpm_conv3x3(x, out_ch) if self.conv_shortcut else NIN(out_ch)(x)
        return x + h
