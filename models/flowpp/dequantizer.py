"""score_flow's Flow++ variational dequantiser for CIFAR-10-like images (its ``dequantization_cifar10``).

``q(u | x)``: Gaussian noise ``eps`` (B, H, W, C) pushed through 4 × [Norm, Pointwise, coupling, swap]
on the checkerboard halves of the image, conditioned on features of ``x``, then a sigmoid, giving
dequantisation noise ``u`` in (0, 1) for the 8-bit image ``x`` (values k / 255). The image width must be even.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.flowpp import flows, layers
from score_sde import parallel


class ShallowProcessor(nn.Module):
    """Context features of ``x`` (B, H, W, C) in [0, 1]: the halves of ``x - 0.5`` side by side, a conv to 32
    channels, 3 gated conv blocks -> (B, H, W/2, 32)."""

    dropout_p: float = 0.2

    @nn.compact
    def __call__(self, x, train: bool = False):
        a, b = flows.checkerboard_split(x - 0.5)
        h = layers.conv2d(self, jnp.concatenate([a, b], axis=-1), name="proj", num_units=32)
        for i in range(3):
            h = layers.gated_conv(self, h, name=f"c{i}", use_nin=False, dropout_p=self.dropout_p, train=train)
        return h


class Dequantizer(nn.Module):
    """``(eps, x) -> (u, -log q(u | x))``: ``eps`` (B, H, W, C) standard normal, ``x`` (B, H, W, C) in [0, 1];
    ``u`` (B, H, W, C) in (0, 1), ``-log q`` (B,) in nats.

    Defaults are score_flow's CIFAR-10 dequantiser (3.5M parameters at 32×32×3); its dropout is 0
    everywhere, the context network's included.
    """

    filters: int = 96
    components: int = 32
    blocks: int = 2
    attn_heads: int = 4
    dropout_p: float = 0.0

    @nn.compact
    def __call__(self, eps, x, train: bool = False):
        context = ShallowProcessor(dropout_p=self.dropout_p)(x, train=train)
        halves = flows.checkerboard_split(eps)
        logdet = 0.0
        for _ in range(4):
            halves, norm_logdet = flows.Norm()(halves)
            halves, pointwise_logdet = flows.Pointwise()(halves)
            halves, coupling_logdet = flows.MixLogisticAttnCoupling(
                filters=self.filters, blocks=self.blocks, components=self.components, heads=self.attn_heads,
                dropout_p=self.dropout_p)(halves, context, train=train)
            logdet = logdet + norm_logdet + pointwise_logdet + coupling_logdet
            halves = halves[::-1]
        u, sigmoid_logdet = flows.sigmoid(flows.checkerboard_merge(*halves))
        log_p_eps = jnp.sum(-eps ** 2 / 2.0 - 0.5 * np.log(2 * np.pi), axis=(1, 2, 3))
        return u, logdet + sigmoid_logdet - log_p_eps


def create_dequantizer(config) -> Dequantizer:
    """The dequantiser of ``config.deq`` (``filters``, ``components``, ``blocks``, ``attn_heads``, ``dropout``)."""
    if config.data.image_size % 2:
        raise ValueError(f"The Flow++ dequantiser splits images into even and odd columns: config.data.image_size "
                         f"= {config.data.image_size} must be even.")
    deq = config.deq
    if deq.filters % deq.attn_heads:
        raise ValueError(f"config.deq.filters = {deq.filters} must be a multiple of config.deq.attn_heads = "
                         f"{deq.attn_heads}.")
    return Dequantizer(filters=deq.filters, components=deq.components, blocks=deq.blocks, attn_heads=deq.attn_heads,
                       dropout_p=deq.dropout)


def init_dequantizer(rng, model: Dequantizer, init_data):
    """Data-dependent initialisation on ``init_data`` (local_devices, B, H, W, C) in [0, 1], as score_flow.

    Each device initialises on its share with ``eps ~ N(0, I)``, statistics averaged over devices.
    Returns the variables (``{'params': ...}``), one copy on the host.
    """
    rng, eps_rng = jax.random.split(rng)
    eps = jax.random.normal(eps_rng, init_data.shape)
    rng, params_rng = parallel.split_per_device(rng)
    _, dropout_rng = parallel.split_per_device(rng)
    p_init = parallel.pmap(lambda p, d, e, x: model.init({"params": p, "dropout": d}, e, x, train=False))
    return jax.device_get(parallel.unreplicate(p_init(params_rng, dropout_rng, eps, jnp.asarray(init_data))))
