"""A time-conditioned residual MLP for low-dimensional data, registered as ``'mlp'``.

The data are ``(B, 1, 1, d)`` "images" (``config.data.image_size = 1``, ``num_channels = d``; the
``GMM`` dataset), so that the losses, samplers and ``run_lib`` treat them like any image. The
network flattens them, embeds the time / noise label (sinusoidal, or random Fourier features of
``log σ`` for VE, as NCSN++), and applies ``config.model.num_res_blocks`` residual blocks of width
``config.model.nf``, each adding the embedded time before its second layer.

Config fields (``config.model``): ``nf`` (width), ``num_res_blocks``, ``nonlinearity``,
``embedding_type`` ('positional' for VP / sub-VP labels ``999 t``; 'fourier' for VE labels
``σ(t)``), ``fourier_scale``, ``scale_by_sigma`` (VE only: the input is divided by
``sqrt(1 + σ²)`` and the output by ``σ``, so that the network sees inputs and predicts targets of
order one at every noise level).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from models import layers, layerspp
from models import utils as mutils

EMBEDDINGS = ("positional", "fourier")


@mutils.register_model(name="mlp")
class MLP(nn.Module):
    """Residual MLP score network.

    Attributes:
        config: the experiment config (``config.model`` and ``config.data`` are read).
    """

    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x: Any, time_cond: Any, train: bool = True) -> Any:
        """x: ``(B, 1, 1, d)`` (any ``(B, ...)`` matching ``config.data``), time_cond ``(B,)`` -> same shape as x."""
        del train  # no dropout or batch statistics
        m = self.config.model
        layers.check_image_batch(x, self.config, "mlp")
        layers.check_time_cond(time_cond, x, "mlp")
        if m.embedding_type not in EMBEDDINGS:
            raise ValueError(f"mlp: config.model.embedding_type={m.embedding_type!r}; use one of {EMBEDDINGS}.")
        act = layers.get_act(self.config)
        width = m.nf
        h = x.reshape((x.shape[0], -1))
        if m.embedding_type == "fourier":
            # VE labels are σ(t), spanning orders of magnitude: embed log σ.
            temb = layerspp.GaussianFourierProjection(embedding_size=width // 2, scale=m.fourier_scale)(
                jnp.log(time_cond))
        else:
            temb = layers.get_timestep_embedding(time_cond, width)
        temb = nn.Dense(width)(act(nn.Dense(width)(temb)))
        if m.scale_by_sigma:
            h = h / jnp.sqrt(1.0 + time_cond[:, None] ** 2)
        h = nn.Dense(width)(h)
        for _ in range(m.num_res_blocks):
            y = nn.Dense(width)(act(nn.LayerNorm()(h)))
            y = act(y + nn.Dense(width)(act(temb)))
            # Zero-initialised last layer: every block starts as the identity.
            h = h + nn.Dense(width, kernel_init=nn.initializers.zeros)(y)
        out = nn.Dense(x[0].size)(act(nn.LayerNorm()(h)))
        if m.scale_by_sigma:
            out = out / time_cond[:, None]
        return out.reshape(x.shape)
