"""NCSN++ and DDPM++ (Song et al., 2021): one U-Net family, registered as ``'ncsnpp'``.

The options of ``config.model`` select the variant:

* ``resblock_type``: ``'biggan'`` (resampling inside residual blocks) or ``'ddpm'``;
* ``progressive`` (``'none'``, ``'output_skip'``, ``'residual'``) and
  ``progressive_input`` (``'none'``, ``'input_skip'``, ``'residual'``) with
  ``progressive_combine`` (``'sum'``, ``'cat'``): multi-scale pyramids of the output / input;
* ``embedding_type``: ``'fourier'`` (random Fourier features of log σ, continuous
  training only) or ``'positional'`` (sinusoidal embedding of the time label);
* ``fir`` / ``fir_kernel``: FIR resampling; ``skip_rescale``: residual sums / √2;
  ``init_scale``: scale of the last conv of each block; ``scale_by_sigma``: output / σ.

Submodules are created in the original's order with its class names, so the Flax
parameter tree (names and shapes) is that of the released checkpoints.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from models import layers, layerspp
from models import utils as mutils
from models.layers import check_image_batch, check_time_cond
from models.layerspp import conv3x3, group_norm

Array = Any

_PROGRESSIVE = ("none", "output_skip", "residual")
_PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
_EMBEDDINGS = ("fourier", "positional")
_RESBLOCKS = ("ddpm", "biggan")
_COMBINE = ("sum", "cat")


def _option(config, field: str, allowed: tuple) -> str:
    value = str(getattr(config.model, field)).lower()
    if value not in allowed:
        raise ValueError(f"config.model.{field}={getattr(config.model, field)!r} is not supported; "
                         f"choose one of {list(allowed)}.")
    return value


@mutils.register_model(name="ncsnpp")
class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ score network.

    Attributes:
        config: the experiment config (``config.model`` and ``config.data`` are read).
    """

    config: ml_collections.ConfigDict

    def _time_embedding(self, time_cond: Array, embedding_type: str, act, dtype) -> tuple[Array | None, Array | None]:
        """The conditioning vector (B, 4·nf) in ``dtype`` or None, and σ per image for ``scale_by_sigma``."""
        config = self.config
        nf = config.model.nf
        if embedding_type == "fourier":
            if not config.training.continuous:
                raise ValueError("config.model.embedding_type='fourier' needs config.training.continuous=True; "
                                 "use 'positional' for discrete training.")
            used_sigmas = time_cond
            temb = layerspp.GaussianFourierProjection(embedding_size=nf, scale=config.model.fourier_scale)(
                jnp.log(used_sigmas))
        else:
            used_sigmas = None
            if config.model.scale_by_sigma:
                used_sigmas = mutils.get_sigmas(config)[time_cond.astype(jnp.int32)]
            temb = layers.get_timestep_embedding(time_cond, nf)
        if not config.model.conditional:
            return None, used_sigmas
        temb = temb.astype(dtype)  # the sines in float32: their arguments reach hundreds of radians
        temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dtype)(temb)
        temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dtype)(act(temb))
        return temb, used_sigmas

    @nn.compact
    def __call__(self, x: Array, time_cond: Array, train: bool = True) -> Array:
        """Evaluate the network.

        Args:
            x: (B, H, W, C) images, H = W = ``config.data.image_size``,
                C = ``config.data.num_channels``; in [0, 1] unless ``config.data.centered``.
            time_cond: (B,) σ (``fourier`` embedding) or time label (``positional``).
            train: enables dropout (needs a ``'dropout'`` rng).

        Returns:
            (B, H, W, C) float32: the network output (the score for VE models; for VP models
            ``get_score_fn`` rescales it by -1/std). The network computes in ``config.model.dtype``.
        """
        config = self.config
        m = config.model
        check_image_batch(x, config, "ncsnpp")
        check_time_cond(time_cond, x, "ncsnpp")
        progressive = _option(config, "progressive", _PROGRESSIVE)
        progressive_input = _option(config, "progressive_input", _PROGRESSIVE_INPUT)
        embedding_type = _option(config, "embedding_type", _EMBEDDINGS)
        resblock_type = _option(config, "resblock_type", _RESBLOCKS)
        combine_method = _option(config, "progressive_combine", _COMBINE)

        act = layers.get_act(config)
        nf, ch_mult = m.nf, m.ch_mult
        num_resolutions = len(ch_mult)
        attn_resolutions = tuple(m.attn_resolutions)
        fir_kernel = tuple(m.fir_kernel)
        skip_rescale, init_scale = m.skip_rescale, m.init_scale

        dtype = mutils.compute_dtype(config)
        temb, used_sigmas = self._time_embedding(time_cond, embedding_type, act, dtype)

        attn_block = functools.partial(layers.remat_block(layerspp.AttnBlockpp, config), init_scale=init_scale,
                                       skip_rescale=skip_rescale)
        upsample = functools.partial(layerspp.Upsample, with_conv=m.resamp_with_conv, fir=m.fir,
                                     fir_kernel=fir_kernel)
        downsample = functools.partial(layerspp.Downsample, with_conv=m.resamp_with_conv, fir=m.fir,
                                       fir_kernel=fir_kernel)
        pyramid_upsample = functools.partial(layerspp.Upsample, fir=m.fir, fir_kernel=fir_kernel,
                                             with_conv=progressive == "residual")
        pyramid_downsample = functools.partial(layerspp.Downsample, fir=m.fir, fir_kernel=fir_kernel,
                                               with_conv=progressive_input == "residual")
        # Residual blocks are called as block(x, temb, train): `train` (argument 3) is static under remat.
        if resblock_type == "ddpm":
            resnet_block = functools.partial(layers.remat_block(layerspp.ResnetBlockDDPMpp, config, (3,)), act=act,
                                             dropout=m.dropout, init_scale=init_scale, skip_rescale=skip_rescale)
        else:
            resnet_block = functools.partial(layers.remat_block(layerspp.ResnetBlockBigGANpp, config, (3,)),
                                             act=act, dropout=m.dropout, fir=m.fir, fir_kernel=fir_kernel,
                                             init_scale=init_scale, skip_rescale=skip_rescale)

        if not config.data.centered:
            x = 2 * x - 1.0  # data in [0, 1] -> [-1, 1]
        x = x.astype(dtype)  # every layer computes in its input's dtype
        out_channels = x.shape[-1]

        # Downsampling path.
        input_pyramid = x if progressive_input != "none" else None
        hs = [conv3x3(x, nf)]
        for i_level in range(num_resolutions):
            for _ in range(m.num_res_blocks):
                h = resnet_block(out_ch=nf * ch_mult[i_level])(hs[-1], temb, train)
                if h.shape[1] in attn_resolutions:
                    h = attn_block()(h)
                hs.append(h)
            if i_level == num_resolutions - 1:
                continue
            if resblock_type == "ddpm":
                h = downsample()(hs[-1])
            else:
                h = resnet_block(down=True)(hs[-1], temb, train)
            if progressive_input == "input_skip":
                input_pyramid = pyramid_downsample()(input_pyramid)
                h = layerspp.Combine(method=combine_method)(input_pyramid, h)
            elif progressive_input == "residual":
                input_pyramid = pyramid_downsample(out_ch=h.shape[-1])(input_pyramid)
                input_pyramid = layerspp.residual_sum(input_pyramid, h, skip_rescale)
                h = input_pyramid
            hs.append(h)

        h = hs[-1]
        h = resnet_block()(h, temb, train)
        h = attn_block()(h)
        h = resnet_block()(h, temb, train)

        # Upsampling path.
        pyramid = None
        for i_level in reversed(range(num_resolutions)):
            for _ in range(m.num_res_blocks + 1):
                h = resnet_block(out_ch=nf * ch_mult[i_level])(jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
            if h.shape[1] in attn_resolutions:
                h = attn_block()(h)

            if progressive == "output_skip":
                if pyramid is not None:
                    pyramid = pyramid_upsample()(pyramid)
                out = conv3x3(act(group_norm(h.shape[-1])(h)), out_channels, bias=True, init_scale=init_scale)
                pyramid = out if pyramid is None else pyramid + out
            elif progressive == "residual":
                if pyramid is None:
                    pyramid = conv3x3(act(group_norm(h.shape[-1])(h)), h.shape[-1], bias=True)
                else:
                    pyramid = pyramid_upsample(out_ch=h.shape[-1])(pyramid)
                    pyramid = layerspp.residual_sum(pyramid, h, skip_rescale)
                    h = pyramid

            if i_level != 0:
                if resblock_type == "ddpm":
                    h = upsample()(h)
                else:
                    h = resnet_block(up=True)(h, temb, train)

        if progressive == "output_skip":
            h = pyramid
        else:
            h = conv3x3(act(group_norm(h.shape[-1])(h)), out_channels, init_scale=init_scale)

        h = h.astype(jnp.float32)
        if m.scale_by_sigma:
            h = h / used_sigmas.reshape((-1, 1, 1, 1))
        return h
