"""Resampling of NHWC images with FIR filters, and convolutions fused with it.

These are the StyleGAN2 resampling operations used by NCSN++ (``fir=True``):

* :func:`upfirdn_2d` — zero-insertion upsampling, padding, FIR filtering, decimation.
* :func:`upsample_2d` / :func:`downsample_2d` — FIR resampling by an integer factor.
* :func:`upsample_conv_2d` / :func:`conv_downsample_2d` — a convolution fused with
  FIR resampling (padding applied once).
* :class:`Conv2d` — the Flax module owning the ``weight`` / ``bias`` of such a
  convolution (parameter names as in the original checkpoints).

Filters are given as a 1-D separable kernel (e.g. ``(1, 3, 3, 1)``) or a square 2-D
kernel; they are normalised to unit sum, so a constant image keeps its value times
``gain``. All images are ``(N, H, W, C)`` unless ``data_format='NCHW'`` is passed.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = Any


def _to_nhwc(x: Array, data_format: str) -> Array:
    if data_format == "NHWC":
        return x
    if data_format == "NCHW":
        return jnp.transpose(x, (0, 2, 3, 1))
    raise ValueError(f"data_format must be 'NHWC' or 'NCHW', got {data_format!r}.")


def _from_nhwc(x: Array, data_format: str) -> Array:
    return x if data_format == "NHWC" else jnp.transpose(x, (0, 3, 1, 2))


def _setup_kernel(k: Sequence) -> np.ndarray:
    """A square 2-D FIR kernel normalised to unit sum (1-D input means separable)."""
    k = np.asarray(k, dtype=np.float32)
    if k.ndim == 1:
        k = np.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {k.shape}.")
    return k / np.sum(k)


def upfirdn_2d(x: Array, k, upx: int = 1, upy: int = 1, downx: int = 1, downy: int = 1,
               padx0: int = 0, padx1: int = 0, pady0: int = 0, pady1: int = 0) -> Array:
    """Upsample (insert zeros), pad, FIR-filter and downsample a batch of images.

    Like ``scipy.signal.upfirdn`` applied to each image and channel:
    1. insert ``up - 1`` zeros after every pixel along each axis;
    2. pad with zeros (a negative pad crops);
    3. convolve with the 2-D filter ``k`` keeping only outputs whose footprint lies
       inside the padded image;
    4. keep every ``down``-th pixel.

    Args:
        x: (N, H, W, C) images.
        k: (kh, kw) FIR filter (used as given, not normalised).
        upx, upy, downx, downy: integer resampling factors along W and H.
        padx0, padx1, pady0, pady1: padding (left, right, top, bottom) in pixels.

    Returns:
        (N, (H·upy + pady0 + pady1 - kh) // downy + 1, (W·upx + padx0 + padx1 - kw) // downx + 1, C).
    """
    k = np.asarray(k, dtype=np.float32)
    if x.ndim != 4 or k.ndim != 2:
        raise ValueError(f"upfirdn_2d expects NHWC images and a 2-D filter, got {x.shape} and {k.shape}.")
    for name, v in dict(upx=upx, upy=upy, downx=downx, downy=downy).items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"upfirdn_2d: {name} must be a positive int, got {v!r}.")
    n, h, w, c = x.shape
    if upx > 1 or upy > 1:
        x = x.reshape(n, h, 1, w, 1, c)
        x = jnp.pad(x, ((0, 0), (0, 0), (0, upy - 1), (0, 0), (0, upx - 1), (0, 0)))
        x = x.reshape(n, h * upy, w * upx, c)
    x = jnp.pad(x, ((0, 0), (max(pady0, 0), max(pady1, 0)), (max(padx0, 0), max(padx1, 0)), (0, 0)))
    x = x[:, max(-pady0, 0):x.shape[1] - max(-pady1, 0), max(-padx0, 0):x.shape[2] - max(-padx1, 0), :]

    kh, kw = k.shape
    out_h = (x.shape[1] - kh) // downy + 1
    out_w = (x.shape[2] - kw) // downx + 1
    # A true convolution is a correlation with the flipped filter: sum its taps over
    # shifted, strided views (small filters; fuses into one elementwise loop).
    flipped = k[::-1, ::-1]
    out = None
    for i in range(kh):
        for j in range(kw):
            if flipped[i, j] == 0:
                continue
            view = x[:, i:i + (out_h - 1) * downy + 1:downy, j:j + (out_w - 1) * downx + 1:downx, :]
            term = view * float(flipped[i, j])  # a Python float keeps x's dtype (bfloat16 stays bfloat16)
            out = term if out is None else out + term
    if out is None:
        out = jnp.zeros((n, out_h, out_w, c), x.dtype)
    return out


def _simple_upfirdn_2d(x: Array, k, up: int = 1, down: int = 1, pad0: int = 0, pad1: int = 0) -> Array:
    """:func:`upfirdn_2d` with the same factors and padding along both axes."""
    return upfirdn_2d(x, k, upx=up, upy=up, downx=down, downy=down,
                      padx0=pad0, padx1=pad1, pady0=pad0, pady1=pad1)


def _check_factor(factor) -> None:
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}.")


def upsample_2d(x: Array, k=None, factor: int = 2, gain: float = 1, data_format: str = "NHWC") -> Array:
    """Upsample images by ``factor`` with FIR filter ``k`` (default: nearest neighbour).

    Args:
        x: (N, H, W, C) images (or NCHW with ``data_format='NCHW'``).
        k: FIR filter, 1-D separable or 2-D; normalised to sum ``gain``·factor².
        factor: integer upsampling factor.
        gain: scaling of the signal magnitude.

    Returns:
        (N, H·factor, W·factor, C) in the same layout as ``x``.
    """
    _check_factor(factor)
    k = _setup_kernel([1] * factor if k is None else k) * (gain * factor ** 2)
    p = k.shape[0] - factor
    y = _simple_upfirdn_2d(_to_nhwc(x, data_format), k, up=factor, pad0=(p + 1) // 2 + factor - 1, pad1=p // 2)
    return _from_nhwc(y, data_format)


def downsample_2d(x: Array, k=None, factor: int = 2, gain: float = 1, data_format: str = "NHWC") -> Array:
    """Downsample images by ``factor`` with FIR filter ``k`` (default: average pooling).

    Args:
        x: (N, H, W, C) images (or NCHW with ``data_format='NCHW'``).
        k: FIR filter, 1-D separable or 2-D; normalised to sum ``gain``.
        factor: integer downsampling factor.
        gain: scaling of the signal magnitude.

    Returns:
        (N, H // factor, W // factor, C) in the same layout as ``x``.
    """
    _check_factor(factor)
    k = _setup_kernel([1] * factor if k is None else k) * gain
    p = k.shape[0] - factor
    y = _simple_upfirdn_2d(_to_nhwc(x, data_format), k, down=factor, pad0=(p + 1) // 2, pad1=p // 2)
    return _from_nhwc(y, data_format)


def upsample_conv_2d(x: Array, w: Array, k=None, factor: int = 2, gain: float = 1,
                     data_format: str = "NHWC") -> Array:
    """Upsample by ``factor`` (FIR filter ``k``) fused with a convolution by ``w``.

    Computed as a transposed (fractionally strided) convolution followed by the FIR
    filter, with all padding applied once.

    Args:
        x: (N, H, W, Cin) images (or NCHW with ``data_format='NCHW'``).
        w: (kh, kw, Cin, Cout) convolution kernel, kh == kw.
        k: FIR filter (default: nearest neighbour); normalised to sum ``gain``·factor².
        factor: integer upsampling factor.
        gain: scaling of the signal magnitude.

    Returns:
        (N, H·factor, W·factor, Cout) in the same layout as ``x``.
    """
    _check_factor(factor)
    if w.ndim != 4 or w.shape[0] != w.shape[1]:
        raise ValueError(f"upsample_conv_2d: kernel must be (k, k, Cin, Cout), got {w.shape}.")
    conv_k = w.shape[0]
    k = _setup_kernel([1] * factor if k is None else k) * (gain * factor ** 2)
    p = (k.shape[0] - factor) - (conv_k - 1)
    x = _to_nhwc(x, data_format)
    # Transposed convolution with 'VALID' padding = convolution of the zero-dilated
    # input with the kernel, padded so that every overlapping output is kept.
    pad_lo = conv_k - 1
    pad_hi = factor - 1 + max(conv_k - factor, 0)
    y = jax.lax.conv_general_dilated(x, w, window_strides=(1, 1), padding=((pad_lo, pad_hi), (pad_lo, pad_hi)),
                                     lhs_dilation=(factor, factor), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = _simple_upfirdn_2d(y, k, pad0=(p + 1) // 2 + factor - 1, pad1=p // 2 + 1)
    return _from_nhwc(y, data_format)


def conv_downsample_2d(x: Array, w: Array, k=None, factor: int = 2, gain: float = 1,
                       data_format: str = "NHWC") -> Array:
    """A convolution by ``w`` fused with downsampling by ``factor`` (FIR filter ``k``).

    Args:
        x: (N, H, W, Cin) images (or NCHW with ``data_format='NCHW'``).
        w: (kh, kw, Cin, Cout) convolution kernel, kh == kw.
        k: FIR filter (default: average pooling); normalised to sum ``gain``.
        factor: integer downsampling factor.
        gain: scaling of the signal magnitude.

    Returns:
        (N, H // factor, W // factor, Cout) in the same layout as ``x``.
    """
    _check_factor(factor)
    if w.ndim != 4 or w.shape[0] != w.shape[1]:
        raise ValueError(f"conv_downsample_2d: kernel must be (k, k, Cin, Cout), got {w.shape}.")
    conv_k = w.shape[0]
    k = _setup_kernel([1] * factor if k is None else k) * gain
    p = (k.shape[0] - factor) + (conv_k - 1)
    x = _simple_upfirdn_2d(_to_nhwc(x, data_format), k, pad0=(p + 1) // 2, pad1=p // 2)
    y = jax.lax.conv_general_dilated(x, w, window_strides=(factor, factor), padding="VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return _from_nhwc(y, data_format)


def naive_upsample_2d(x: Array, factor: int = 2) -> Array:
    """Nearest-neighbour upsampling: (N, H, W, C) -> (N, H·factor, W·factor, C)."""
    n, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, factor, w, factor, c))
    return x.reshape(n, h * factor, w * factor, c)


def naive_downsample_2d(x: Array, factor: int = 2) -> Array:
    """Average pooling over factor×factor blocks: (N, H, W, C) -> (N, H/factor, W/factor, C)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


class Conv2d(nn.Module):
    """Convolution with optional fused FIR up- or downsampling by 2 (StyleGAN2).

    Parameters: ``weight`` (kernel, kernel, Cin, fmaps) and, with ``use_bias``, ``bias``
    (fmaps,), as in the original checkpoints.

    Attributes:
        fmaps: output channels.
        kernel: odd kernel size.
        up / down: upsample or downsample by 2 (not both).
        resample_kernel: FIR filter of the resampling.
        use_bias: add a learned bias.
        weight_var: name of the kernel parameter.
        kernel_init: initializer of the kernel.
    """

    fmaps: int
    kernel: int
    up: bool = False
    down: bool = False
    resample_kernel: Sequence[int] = (1, 3, 3, 1)
    use_bias: bool = True
    weight_var: str = "weight"
    kernel_init: Optional[Callable] = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (N, H, W, Cin) -> (N, H', W', fmaps) with H' = 2H (up), H/2 (down) or H."""
        if self.up and self.down:
            raise ValueError("Conv2d: up and down cannot both be set.")
        if self.kernel < 1 or self.kernel % 2 != 1:
            raise ValueError(f"Conv2d: kernel must be a positive odd size, got {self.kernel}.")
        kernel_init = self.kernel_init or nn.initializers.lecun_normal()
        # float32 parameters; the convolution runs in x's dtype (mixed precision)
        w = self.param(self.weight_var, kernel_init, (self.kernel, self.kernel, x.shape[-1], self.fmaps))
        w = w.astype(x.dtype)
        if self.up:
            x = upsample_conv_2d(x, w, k=self.resample_kernel)
        elif self.down:
            x = conv_downsample_2d(x, w, k=self.resample_kernel)
        else:
            x = jax.lax.conv_general_dilated(x, w, window_strides=(1, 1), padding="SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            x = x + self.param("bias", nn.initializers.zeros, (x.shape[-1],)).astype(x.dtype)
        return x
