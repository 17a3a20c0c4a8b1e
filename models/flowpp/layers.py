"""Flow++'s layers with data-dependent initialisation, as helpers that create parameters in a calling module.

Each helper takes the ``nn.Module`` whose ``@nn.compact`` method calls it and a ``name`` prefix;
parameters are ``<name>_W`` / ``<name>_b`` (``<name>_g`` / ``<name>_b`` for layer norm), as in
score_flow. Weights are initialised so that the layer's output on the initialisation batch has zero
mean and unit variance per channel (``init_scale`` times that), statistics averaged over devices
(``parallel.pmean_over_devices``). Images are (B, H, W, C).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_sde import parallel

# score_flow's convolution reads its input as (N, W, H, C) when applied: the kernel's first spatial axis runs
# along the image's width. Kept so that its trained kernels give its outputs; the initialisation statistics,
# taken as (N, H, W, C) there, are per channel and unaffected by the transposition of the output.
_APPLY_DIMS = ("NWHC", "HWIO", "NWHC")
_INIT_DIMS = ("NHWC", "HWIO", "NWHC")


def normalizing_scale_and_shift(y, axes, init_scale: float = 1.0):
    """``(scale, shift)`` making ``y * scale + shift`` zero-mean with variance ``init_scale²`` over ``axes``.

    The moments are averaged over devices; shapes are those of ``y`` without ``axes``.
    """
    mean = parallel.pmean_over_devices(jnp.mean(y, axis=axes))
    mean_sq = parallel.pmean_over_devices(jnp.mean(y ** 2, axis=axes))
    scale = init_scale * jax.lax.rsqrt(mean_sq - mean ** 2 + 1e-6)
    return scale, -mean * scale


def conv2d(module: nn.Module, x, *, name: str, num_units: int, init_scale: float = 1.0):
    """3×3 'SAME' convolution, stride 1: (B, H, W, C) -> (B, H, W, num_units). Kernel (3, 3, C, num_units)."""
    shape = (3, 3, x.shape[-1], num_units)

    def init_output(rng):
        kernel = jax.random.normal(rng, shape) * 0.05
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_INIT_DIMS)
        return kernel, normalizing_scale_and_shift(y, (0, 1, 2), init_scale)

    # As score_flow, the bias is initialised from its own random kernel, not the one kept.
    def w_init(rng):
        kernel, (scale, _) = init_output(rng)
        return kernel * scale

    kernel = module.param(f"{name}_W", w_init)
    bias = module.param(f"{name}_b", lambda rng: init_output(rng)[1][1])
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_APPLY_DIMS) + bias


def conv2d_weightnorm(module: nn.Module, x, *, name: str, num_units: int, init_scale: float = 1.0):
    """Weight-normalised (Salimans & Kingma 2016) 3×3 'SAME' convolution, stride 1, as score_flow's ImageNet
    dequantiser: (B, H, W, C) -> (B, H, W, num_units).

    Kernel ``g · V / |V|`` (the norm over all but the output axis): ``<name>_V`` (3, 3, C, num_units) drawn from
    N(0, 0.05²), the gain ``<name>_g`` and bias ``<name>_b`` (num_units,) set from the data. Unlike
    :func:`conv2d`, applied as (N, H, W, C), without transposition.
    """
    direction = module.param(f"{name}_V", nn.initializers.normal(stddev=0.05), (3, 3, x.shape[-1], num_units))
    direction = direction * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(direction), axis=(0, 1, 2)), 1e-12))

    def conv(kernel):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def from_data(i):  # 0: the gain, 1: the bias, standardising the output of the unit-norm kernel
        return lambda rng: normalizing_scale_and_shift(conv(direction), (0, 1, 2), init_scale)[i]

    gain = module.param(f"{name}_g", from_data(0))
    bias = module.param(f"{name}_b", from_data(1))
    return conv(direction * gain) + bias


def dense(module: nn.Module, x, *, name: str, num_units: int, init_scale: float = 1.0):
    """Affine map (N, D) -> (N, num_units). Kernel (D, num_units)."""
    shape = (x.shape[-1], num_units)

    def init_output(rng):
        kernel = jax.random.normal(rng, shape) * 0.05
        return kernel, normalizing_scale_and_shift(x @ kernel, (0,), init_scale)

    def w_init(rng):
        kernel, (scale, _) = init_output(rng)
        return kernel * scale

    kernel = module.param(f"{name}_W", w_init)
    bias = module.param(f"{name}_b", lambda rng: init_output(rng)[1][1])
    return x @ kernel + bias


def nin(module: nn.Module, x, *, name: str, num_units: int, init_scale: float = 1.0):
    """:func:`dense` on the last axis ("network in network"): (..., D) -> (..., num_units)."""
    flat = jnp.reshape(x, (int(np.prod(x.shape[:-1])), x.shape[-1]))
    out = dense(module, flat, name=name, num_units=num_units, init_scale=init_scale)
    return jnp.reshape(out, x.shape[:-1] + (num_units,))


def concat_elu(x):
    """ELU of ``[x, -x]`` on the last axis: (..., C) -> (..., 2C)."""
    return jax.nn.elu(jnp.concatenate([x, -x], axis=-1))


def gate(x):
    """``a · sigmoid(b)`` for ``[a, b]`` the halves of the last axis: (..., 2C) -> (..., C)."""
    a, b = jnp.split(x, 2, axis=-1)
    return a * jax.nn.sigmoid(b)


def gated_conv(module: nn.Module, x, *, name: str, context=None, use_nin: bool, dropout_p: float,
               train: bool, conv=conv2d):
    """Gated residual block: ``x + gate(W2 · concat_elu(W1 · concat_elu(x) [+ V · concat_elu(context)]))``.

    ``x`` (B, H, W, C); ``context`` (B, H, W, C') or None; ``W1`` a ``conv`` (:func:`conv2d` or
    :func:`conv2d_weightnorm`), ``W2`` a ``conv`` or (``use_nin``) a per-pixel dense layer to 2C channels with
    ``init_scale`` 0.1. Dropout (rate ``dropout_p``) on the hidden layer when ``train``.
    """
    channels = x.shape[-1]
    hidden = conv(module, concat_elu(x), name=f"{name}_c1", num_units=channels)
    if context is not None:
        hidden = hidden + nin(module, concat_elu(context), name=f"{name}_a_proj", num_units=channels)
    hidden = concat_elu(hidden)
    if dropout_p > 0:
        hidden = nn.Dropout(rate=dropout_p, deterministic=not train)(hidden)
    out = (nin if use_nin else conv)(module, hidden, name=f"{name}_c2", num_units=2 * channels, init_scale=0.1)
    return x + gate(out)


def layernorm(module: nn.Module, x, *, name: str, epsilon: float = 1e-5):
    """Layer norm over the last axis; gain and bias (1, ..., 1, C) start at 1 and 0."""
    shape = (1,) * (x.ndim - 1) + (x.shape[-1],)
    gain = module.param(f"{name}_g", nn.initializers.ones, shape)
    bias = module.param(f"{name}_b", nn.initializers.zeros, shape)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + epsilon) * gain + bias


def gated_attn(module: nn.Module, x, *, name: str, pos_emb, heads: int, dropout_p: float, train: bool):
    """Gated residual multi-head self-attention over the H·W positions.

    ``x`` (B, H, W, C), ``pos_emb`` (H, W, C) added before the query/key/value projection; C must be a
    multiple of ``heads``. Output ``x + gate(dense(attention))``, shape (B, H, W, C).
    """
    batch, height, width, channels = x.shape
    dim = channels // heads
    qkv = nin(module, x + pos_emb[None], name=f"{name}_proj1", num_units=3 * channels)
    # (B, T, 3, heads, dim) -> (3, B, heads, T, dim)
    qkv = jnp.transpose(jnp.reshape(qkv, (batch, height * width, 3, heads, dim)), (2, 0, 3, 1, 4))
    q, k, v = qkv[0], qkv[1], qkv[2]
    weights = jax.nn.softmax(jnp.einsum("bhsd,bhtd->bhst", q, k) / np.sqrt(float(dim)))
    attended = jnp.einsum("bhst,bhtd->bhsd", weights, v)
    attended = jnp.reshape(jnp.transpose(attended, (0, 2, 1, 3)), (batch, height, width, channels))
    if dropout_p > 0:
        attended = nn.Dropout(rate=dropout_p, deterministic=not train)(attended)
    out = nin(module, attended, name=f"{name}_proj2", num_units=2 * channels, init_scale=0.1)
    return x + gate(out)
