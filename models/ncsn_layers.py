"""Building blocks of NCSN (v1) and NCSNv2: a dilated ResNet backbone and RefineNet decoder blocks.

Ported from the NCSN/NCSNv2 code bases (ermongroup/ncsn, ermongroup/ncsnv2) as the
score_sde code expressed them in Flax. Every image is channel-last, (B, H, W, C).

Parameter names depend only on class names and creation order, so they match the
original's (e.g. ``RefineBlock_1/MSFBlock_0/Conv_1/kernel``). Each noise-conditional block
(``Cond*``, ``ConditionalResidualBlock``) is its unconditional twin with a normalisation
``normalizer()(h, y)`` inserted where NCSNv1 has one; ``y`` holds (B,) integer noise-level
indices. The unconditional and conditional twins share one implementation, taking the
normalisation as a callable ``h -> h`` (identity where NCSNv2 has none). The convolutions with
PyTorch initialisation (``ncsn_conv1x1``/``ncsn_conv3x3``) live in :mod:`models.layers` and are
re-exported here.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax

from models.layers import ncsn_conv1x1, ncsn_conv3x3

__all__ = ["ncsn_conv1x1", "ncsn_conv3x3", "CRPBlock", "CondCRPBlock", "RCUBlock", "CondRCUBlock", "MSFBlock",
           "CondMSFBlock", "RefineBlock", "CondRefineBlock", "ConvMeanPool", "MeanPoolConv", "ResidualBlock",
           "ConditionalResidualBlock"]

Array = Any
NormFn = Callable[[Array], Array]


def _identity(h: Array) -> Array:
    return h


def _mean_pool_2x2(x: Array) -> Array:
    """Average of each 2×2 spatial block: (B, H, W, C) -> (B, H/2, W/2, C); H and W must be even."""
    batch, height, width, channels = x.shape
    if height % 2 or width % 2:
        raise ValueError(f"2×2 mean pooling needs even spatial sizes, got {height}×{width}.")
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))


def _resize(h: Array, shape: Sequence[int], interpolation: str) -> Array:
    methods = {"bilinear": "bilinear", "nearest_neighbor": "nearest"}
    if interpolation not in methods:
        raise ValueError(f"config.model.interpolation={interpolation!r} does not exist; choose one of "
                         f"{sorted(methods)}.")
    return jax.image.resize(h, (h.shape[0], *shape, h.shape[-1]), methods[interpolation])


# --------------------------------------------------------------------------- RefineNet blocks

def _crp(x: Array, features: int, n_stages: int, act, norm: NormFn, pool) -> Array:
    """Chained residual pooling: ``n_stages`` × (norm, 5×5 pool, 3×3 conv), each stage added to the input."""
    x = act(x)
    path = x
    for _ in range(n_stages):
        path = pool(norm(path), window_shape=(5, 5), strides=(1, 1), padding="SAME")
        path = ncsn_conv3x3(path, features, stride=1, bias=False)
        x = path + x
    return x


def _rcu(x: Array, features: int, n_blocks: int, n_stages: int, act, norm: NormFn) -> Array:
    """Residual conv units: ``n_blocks`` × (``n_stages`` × (norm, act, 3×3 conv) + skip)."""
    for _ in range(n_blocks):
        residual = x
        for _ in range(n_stages):
            x = ncsn_conv3x3(act(norm(x)), features, stride=1, bias=False)
        x = x + residual
    return x


def _msf(xs: Sequence[Array], shape: Sequence[int], features: int, interpolation: str, norm: NormFn) -> Array:
    """Multi-resolution fusion: conv every input to ``features`` channels, resize to ``shape``, sum."""
    total = None
    for x in xs:
        h = _resize(ncsn_conv3x3(norm(x), features, stride=1, bias=True), shape, interpolation)
        total = h if total is None else total + h
    return total


class CRPBlock(nn.Module):
    """Chained residual pooling (max pool) of RefineNet. Used in NCSNv2."""

    features: int
    n_stages: int
    act: Any = nn.relu

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return _crp(x, self.features, self.n_stages, self.act, _identity, nn.max_pool)


class CondCRPBlock(nn.Module):
    """Noise-conditional chained residual pooling (normalise, average pool). Used in NCSNv1."""

    features: int
    n_stages: int
    normalizer: Any
    act: Any = nn.relu

    @nn.compact
    def __call__(self, x: Array, y: Array) -> Array:
        return _crp(x, self.features, self.n_stages, self.act, lambda h: self.normalizer()(h, y), nn.avg_pool)


class RCUBlock(nn.Module):
    """Residual conv units of RefineNet. Used in NCSNv2."""

    features: int
    n_blocks: int
    n_stages: int
    act: Any = nn.relu

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return _rcu(x, self.features, self.n_blocks, self.n_stages, self.act, _identity)


class CondRCUBlock(nn.Module):
    """Noise-conditional residual conv units (normalise before each activation). Used in NCSNv1."""

    features: int
    n_blocks: int
    n_stages: int
    normalizer: Any
    act: Any = nn.relu

    @nn.compact
    def __call__(self, x: Array, y: Array) -> Array:
        return _rcu(x, self.features, self.n_blocks, self.n_stages, self.act, lambda h: self.normalizer()(h, y))


class MSFBlock(nn.Module):
    """Multi-resolution fusion of RefineNet. Used in NCSNv2. ``shape``: output (H, W)."""

    shape: Sequence[int]
    features: int
    interpolation: str = "bilinear"

    @nn.compact
    def __call__(self, xs: Sequence[Array]) -> Array:
        return _msf(xs, self.shape, self.features, self.interpolation, _identity)


class CondMSFBlock(nn.Module):
    """Noise-conditional multi-resolution fusion (normalise each input first). Used in NCSNv1."""

    shape: Sequence[int]
    features: int
    normalizer: Any
    interpolation: str = "bilinear"

    @nn.compact
    def __call__(self, xs: Sequence[Array], y: Array) -> Array:
        return _msf(xs, self.shape, self.features, self.interpolation, lambda h: self.normalizer()(h, y))


def _refine(block: nn.Module, xs: Sequence[Array], rcu, msf, crp) -> Array:
    """RefineNet block: RCU on each input, fuse (unless ``start``), CRP, output RCU (3 units if ``end``).

    ``rcu(h, features, n_blocks)``, ``msf(hs)`` and ``crp(h)`` create and apply the sub-blocks.
    """
    hs = [rcu(x, x.shape[-1], 2) for x in xs]
    h = hs[0] if block.start else msf(hs)
    return rcu(crp(h), block.features, 3 if block.end else 1)


class RefineBlock(nn.Module):
    """RefineNet block of NCSNv2. Call on a list of inputs (first: the skip at ``output_shape``)."""

    output_shape: Sequence[int]
    features: int
    act: Any = nn.relu
    interpolation: str = "bilinear"
    start: bool = False
    end: bool = False

    @nn.compact
    def __call__(self, xs: Sequence[Array]) -> Array:
        return _refine(
            self, xs,
            rcu=lambda h, features, n_blocks: RCUBlock(features, n_blocks, 2, act=self.act)(h),
            msf=lambda hs: MSFBlock(tuple(self.output_shape), self.features, self.interpolation)(hs),
            crp=lambda h: CRPBlock(self.features, 2, act=self.act)(h))


class CondRefineBlock(nn.Module):
    """Noise-conditional RefineNet block of NCSNv1. Call as ``block(xs, y)``."""

    output_shape: Sequence[int]
    features: int
    normalizer: Any
    act: Any = nn.relu
    interpolation: str = "bilinear"
    start: bool = False
    end: bool = False

    @nn.compact
    def __call__(self, xs: Sequence[Array], y: Array) -> Array:
        norm = self.normalizer
        return _refine(
            self, xs,
            rcu=lambda h, features, n_blocks: CondRCUBlock(features, n_blocks, 2, norm, act=self.act)(h, y),
            msf=lambda hs: CondMSFBlock(tuple(self.output_shape), self.features, norm, self.interpolation)(hs, y),
            crp=lambda h: CondCRPBlock(self.features, 2, norm, act=self.act)(h, y))


# --------------------------------------------------------------------------- ResNet backbone

class ConvMeanPool(nn.Module):
    """Convolution (Flax default init) then 2×2 mean pooling."""

    output_dim: int
    kernel_size: int = 3
    biases: bool = True

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        output = nn.Conv(features=self.output_dim, kernel_size=(self.kernel_size, self.kernel_size),
                         strides=(1, 1), padding="SAME", use_bias=self.biases)(inputs)
        return _mean_pool_2x2(output)


class MeanPoolConv(nn.Module):
    """2×2 mean pooling then convolution (Flax default init)."""

    output_dim: int
    kernel_size: int = 3
    biases: bool = True

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        return nn.Conv(features=self.output_dim, kernel_size=(self.kernel_size, self.kernel_size),
                       strides=(1, 1), padding="SAME", use_bias=self.biases)(_mean_pool_2x2(inputs))


def _residual(block: nn.Module, x: Array, norm: NormFn) -> Array:
    """Pre-activation residual block: (norm, act, conv) × 2 plus a shortcut.

    ``resample='down'`` halves the resolution (mean pooling) when ``dilation == 1``; with
    ``dilation > 1`` the resolution is kept and the receptive field grows instead.
    """
    act, out_dim, dilation = block.act, block.output_dim, block.dilation
    h = act(norm(x))
    if block.resample == "down":
        h = ncsn_conv3x3(h, h.shape[-1], dilation=dilation)
        h = act(norm(h))
        if dilation > 1:
            h = ncsn_conv3x3(h, out_dim, dilation=dilation)
            shortcut = ncsn_conv3x3(x, out_dim, dilation=dilation)
        else:
            h = ConvMeanPool(output_dim=out_dim)(h)
            shortcut = ConvMeanPool(output_dim=out_dim, kernel_size=1)(x)
    elif block.resample is None:
        if out_dim == x.shape[-1]:
            shortcut = x
        elif dilation > 1:
            shortcut = ncsn_conv3x3(x, out_dim, dilation=dilation)
        else:
            shortcut = ncsn_conv1x1(x, out_dim)
        h = ncsn_conv3x3(h, out_dim, dilation=dilation)
        h = ncsn_conv3x3(act(norm(h)), out_dim, dilation=dilation)
    else:
        raise ValueError(f"resample={block.resample!r} is not supported; use None or 'down'.")
    return h + shortcut


class ResidualBlock(nn.Module):
    """Residual block of the NCSNv2 backbone. ``normalization``: a module class, applied as ``norm()(x)``."""

    output_dim: int
    normalization: Any
    resample: Optional[str] = None
    act: Any = nn.elu
    dilation: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return _residual(self, x, lambda h: self.normalization()(h))


class ConditionalResidualBlock(nn.Module):
    """Noise-conditional residual block of NCSNv1; ``normalization()(x, y)`` everywhere.

    The original called ``self.normalization(h, y)`` (constructor arguments, not an
    application) in the down-sampling branch; here every normalisation is a fresh module
    applied to ``(h, y)``, named in creation order like all others.
    """

    output_dim: int
    normalization: Any
    resample: Optional[str] = None
    act: Any = nn.elu
    dilation: int = 1

    @nn.compact
    def __call__(self, x: Array, y: Array) -> Array:
        return _residual(self, x, lambda h: self.normalization()(h, y))
