"""The DDPM U-Net (Ho et al., 2020), registered as ``'ddpm'``.

A Flax port of the DDPM TensorFlow model with the original score_sde parameter names:
residual blocks conditioned on a sinusoidal time embedding, self-attention at the
resolutions in ``config.model.attn_resolutions``, and GroupNorm(32) throughout.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from models import layers
from models.layers import check_image_batch, check_time_cond
from models import utils as mutils
from models.normalization import GroupNorm

Array = Any


def _normalization(config):
    """The normalisation module class named by ``config.model.normalization``."""
    name = config.model.normalization
    if name == "GroupNorm":
        return GroupNorm
    from models import ncsn_normalization  # the NCSN family's (non-conditional) normalisations

    return ncsn_normalization.get_normalization(config)


@mutils.register_model(name="ddpm")
class DDPM(nn.Module):
    """DDPM score network.

    Attributes:
        config: the experiment config (``config.model`` and ``config.data`` are read).
    """

    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x: Array, labels: Array, train: bool = True) -> Array:
        """Evaluate the network.

        Args:
            x: (B, H, W, C) images, H = W = ``config.data.image_size``,
                C = ``config.data.num_channels``; in [0, 1] unless ``config.data.centered``.
            labels: (B,) time labels (integer noise-level indices for ``scale_by_sigma``).
            train: enables dropout (needs a ``'dropout'`` rng).

        Returns:
            (B, H, W, C) float32 network output (ε-prediction; divided by σ if ``scale_by_sigma``),
            computed in ``config.model.dtype``.
        """
        config = self.config
        m = config.model
        check_image_batch(x, config, "ddpm")
        check_time_cond(labels, x, "ddpm")
        act = layers.get_act(config)
        normalize = _normalization(config)
        nf, ch_mult = m.nf, m.ch_mult
        num_resolutions = len(ch_mult)
        attn_resolutions = tuple(m.attn_resolutions)

        attn_block = functools.partial(layers.remat_block(layers.AttnBlock, config), normalize=normalize)
        resnet_block = functools.partial(layers.remat_block(layers.ResnetBlockDDPM, config, static_argnums=(3,)),
                                         act=act, normalize=normalize, dropout=m.dropout)

        dtype = mutils.compute_dtype(config)
        if m.conditional:
            temb = layers.get_timestep_embedding(labels, nf).astype(dtype)  # the sines in float32
            temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dtype)(temb)
            temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dtype)(act(temb))
        else:
            temb = None

        h = x if config.data.centered else 2 * x - 1.0  # data in [0, 1] -> [-1, 1]
        h = h.astype(dtype)  # every layer computes in its input's dtype

        # Downsampling path.
        hs = [layers.ddpm_conv3x3(h, nf)]
        for i_level in range(num_resolutions):
            for _ in range(m.num_res_blocks):
                h = resnet_block(out_ch=nf * ch_mult[i_level])(hs[-1], temb, train)
                if h.shape[1] in attn_resolutions:
                    h = attn_block()(h)
                hs.append(h)
            if i_level != num_resolutions - 1:
                hs.append(layers.Downsample(with_conv=m.resamp_with_conv)(hs[-1]))

        h = hs[-1]
        h = resnet_block()(h, temb, train)
        h = attn_block()(h)
        h = resnet_block()(h, temb, train)

        # Upsampling path.
        for i_level in reversed(range(num_resolutions)):
            for _ in range(m.num_res_blocks + 1):
                h = resnet_block(out_ch=nf * ch_mult[i_level])(jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
            if h.shape[1] in attn_resolutions:
                h = attn_block()(h)
            if i_level != 0:
                h = layers.Upsample(with_conv=m.resamp_with_conv)(h)

        h = act(normalize()(h))
        h = layers.ddpm_conv3x3(h, x.shape[-1], init_scale=0.0).astype(jnp.float32)

        if m.scale_by_sigma:
            # Divide by σ (NCSN-style training); the DDPM loss handles σ itself.
            h = h / mutils.get_sigmas(config)[labels].reshape((-1, 1, 1, 1))
        return h
