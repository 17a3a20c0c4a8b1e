"""score_flow's Flow++ variational dequantiser for CIFAR-10-like images (its ``dequantization_cifar10``).

``q(u | x)``: Gaussian noise ``eps`` (B, H, W, C) pushed through 4 × [Norm, Pointwise, coupling, swap]
on the checkerboard halves of the image, conditioned on features of ``x``, then a sigmoid, giving
dequantisation noise ``u`` in (0, 1) for the 8-bit image ``x`` (values k / 255). The image width must be even.
:func:`create_dequantizer` builds the architecture that ``config.deq.arch`` names: this one or the ImageNet
32×32 one (:mod:`models.flowpp.dequantizer_imagenet32`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.flowpp import dequantizer_imagenet32, flows, layers
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
        return u, logdet + sigmoid_logdet - flows.standard_normal_logpdf(eps)


ARCHITECTURES = {"cifar10": Dequantizer, "imagenet32": dequantizer_imagenet32.Dequantizer}
"""``config.deq.arch`` -> the dequantiser: score_flow's for CIFAR-10 (the default when the field is absent) and
for ImageNet 32×32. (score_flow's ImageNet 64×64 one is not ported: its code reuses one parameter name in
every block and cannot be initialised, under its flax 0.3.3 as under today's.)"""


def create_dequantizer(config) -> nn.Module:
    """The dequantiser of ``config.deq``: the architecture ``arch`` (:data:`ARCHITECTURES`) of size ``filters``,
    ``components``, ``blocks``, ``attn_heads``, with dropout ``dropout``."""
    if config.data.image_size % 2:
        raise ValueError(f"The Flow++ dequantiser splits images into even and odd columns: config.data.image_size "
                         f"= {config.data.image_size} must be even.")
    deq = config.deq
    arch = deq.get("arch", "cifar10")
    if arch not in ARCHITECTURES:
        raise ValueError(f"config.deq.arch = {arch!r} is not a dequantiser architecture; use one of "
                         f"{', '.join(map(repr, ARCHITECTURES))}.")
    if deq.filters % deq.attn_heads:
        raise ValueError(f"config.deq.filters = {deq.filters} must be a multiple of config.deq.attn_heads = "
                         f"{deq.attn_heads}.")
    return ARCHITECTURES[arch](filters=deq.filters, components=deq.components, blocks=deq.blocks,
                               attn_heads=deq.attn_heads, dropout_p=deq.dropout)


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
