"""score_flow's Flow++ variational dequantiser for ImageNet 32×32 (its ``dequantization_imagenet32``).

The CIFAR-10 dequantiser's flow (:mod:`models.flowpp.dequantizer`) made deeper and weight-normalised:
8 × [Norm, coupling, swap] on the checkerboard halves of the noise (no invertible 1×1 convolutions;
score_flow merges and re-splits the halves after the fourth step, which changes nothing), couplings of
128 filters and 8 attention blocks whose convolutions are weight-normalised and whose output conv reads
``concat_elu`` of the features, and a deeper context network (:class:`DeepProcessor`). 35.5M parameters at
32×32×3. Parameter names and shapes are score_flow's, so its checkpoints load.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from models.flowpp import flows, layers


class DeepProcessor(nn.Module):
    """Context features of ``x`` (B, H, W, C) in [0, 1]: the halves of ``x - 0.5`` side by side, a conv to 32
    channels, then ``blocks`` × [gated conv, layer norm, gated attention (``heads`` heads, a learnt position
    embedding ``pos_emb_dq``), layer norm] -> (B, H, W/2, 32). All convolutions weight-normalised."""

    dropout_p: float = 0.0
    blocks: int = 8
    heads: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        a, b = flows.checkerboard_split(x - 0.5)
        h = layers.conv2d_weightnorm(self, jnp.concatenate([a, b], axis=-1), name="proj", num_units=32)
        pos_emb = self.param("pos_emb_dq", nn.initializers.normal(stddev=0.01), h.shape[1:])
        for i in range(self.blocks):
            h = layers.gated_conv(self, h, name=f"c{i}", use_nin=False, dropout_p=self.dropout_p, train=train,
                                  conv=layers.conv2d_weightnorm)
            h = layers.layernorm(self, h, name=f"dqln{i}")
            h = layers.gated_attn(self, h, name=f"dqattn{i}", pos_emb=pos_emb, heads=self.heads,
                                  dropout_p=self.dropout_p, train=train)
            h = layers.layernorm(self, h, name=f"ln{i}")
        return h


class WeightNormAttnCoupling(flows.MixLogisticAttnCoupling):
    """score_flow's ImageNet coupling: the CIFAR-10 one with weight-normalised convolutions (the first named
    ``c1``) and ``concat_elu`` before the output conv (``block<blocks-1>_c2``, 2 · filters input channels)."""

    def features(self, a, context, train):
        pos_emb = self.param("pos_emb", nn.initializers.normal(stddev=0.01), a.shape[1:3] + (self.filters,))
        x = layers.conv2d_weightnorm(self, a, name="c1", num_units=self.filters)
        x = self.attention_blocks(x, context, pos_emb, train, conv=layers.conv2d_weightnorm)
        return layers.conv2d_weightnorm(self, layers.concat_elu(x), name=f"block{self.blocks - 1}_c2",
                                        num_units=a.shape[-1] * (2 + 3 * self.components), init_scale=self.init_scale)


class Dequantizer(nn.Module):
    """``(eps, x) -> (u, -log q(u | x))``: ``eps`` (B, H, W, C) standard normal, ``x`` (B, H, W, C) in [0, 1];
    ``u`` (B, H, W, C) in (0, 1), ``-log q`` (B,) in nats.

    Defaults are score_flow's ImageNet 32×32 dequantiser (dropout 0 everywhere); the context network's size
    is fixed there and here. The image width must be even.
    """

    filters: int = 128
    components: int = 32
    blocks: int = 8
    attn_heads: int = 4
    dropout_p: float = 0.0

    @nn.compact
    def __call__(self, eps, x, train: bool = False):
        context = DeepProcessor(dropout_p=self.dropout_p)(x, train=train)
        halves = flows.checkerboard_split(eps)
        logdet = 0.0
        for i in range(8):
            halves, norm_logdet = flows.Norm()(halves)
            # Named as score_flow's class, which this subclass replaces.
            halves, coupling_logdet = WeightNormAttnCoupling(
                filters=self.filters, blocks=self.blocks, components=self.components, heads=self.attn_heads,
                dropout_p=self.dropout_p, name=f"MixLogisticAttnCoupling_{i}")(halves, context, train=train)
            logdet = logdet + norm_logdet + coupling_logdet
            halves = halves[::-1]
        u, sigmoid_logdet = flows.sigmoid(flows.checkerboard_merge(*halves))
        return u, logdet + sigmoid_logdet - flows.standard_normal_logpdf(eps)
