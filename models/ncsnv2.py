"""NCSN (v1) and NCSNv2 score networks: a dilated ResNet encoder with a RefineNet decoder.

Registered models (``config.model.name``):

* ``ncsnv2_64`` (:class:`NCSNv2`): images up to 95 px (CIFAR-10, CelebA 64);
* ``ncsnv2_128`` (:class:`NCSNv2_128`): 96-128 px (LSUN bedroom 128);
* ``ncsnv2_256`` (:class:`NCSNv2_256`): 129-256 px;
* ``ncsn`` (:class:`NCSN`): NCSNv1, the ``ncsnv2_64`` layout with every normalisation
  replaced by a noise-conditional InstanceNorm++ (one class per noise level).

Call any of them as ``model.apply(variables, x, labels, train=False)`` with ``x`` of shape
(B, image_size, image_size, num_channels) in [0, 1] (or centred, per ``config.data.centered``)
and ``labels`` (B,) integer noise-level indices ``i`` (σ_i = ``get_sigmas(config)[i]``, largest
first). With ``config.model.scale_by_sigma`` the output is divided by σ_i (NCSNv2); otherwise
it is returned as is (NCSNv1).

Parameter trees are those of the original score_sde code (``Conv_0``, ``ResidualBlock_<i>``,
``RefineBlock_<i>``, ``InstanceNorm2dPlus_0``, ``Conv_1``), so its checkpoints load unchanged.

NCSNv1 fixes. The original ``ncsn`` model never initialised: (1) its configs have no
``model.num_classes``, which the conditional normalisation needs; (2) the down-sampling branch
of ``ConditionalResidualBlock`` called ``self.normalization(h, y)``, i.e. passed the activations
to the module's constructor instead of applying a new module to them. Here (1) ``num_classes``
defaults to ``model.num_scales`` (labels index noise levels; a smaller value is an error), and
(2) that call is ``self.normalization()(h, y)`` like every other one in the block. The intended
parameter tree follows with Flax's usual naming: ``Conv_0``, ``ConditionalResidualBlock_0..7``
(each with ``ConditionalInstanceNorm2dPlus_<j>/Embed_0/embedding`` of shape
(num_classes, 3·C) in creation order, then its ``Conv_<k>`` / ``ConvMeanPool_<k>``),
``CondRefineBlock_0..3`` (``CondRCUBlock_<i>``, ``CondMSFBlock_0``, ``CondCRPBlock_0``, each with
their normalisations), then ``ConditionalInstanceNorm2dPlus_0`` and ``Conv_1``.
"""
from __future__ import annotations

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from models.layers import get_act, remat_block
from models.ncsn_layers import (CondRefineBlock, ConditionalResidualBlock, RefineBlock, ResidualBlock,
                                ncsn_conv3x3)
from models.ncsn_normalization import get_normalization
from models.utils import compute_dtype, get_sigmas, register_model

Array = Any


def get_network(config) -> functools.partial:
    """The NCSNv2 variant suited to ``config.data.image_size``, bound to ``config``."""
    size = config.data.image_size
    if size < 96:
        return functools.partial(NCSNv2, config=config)
    if size <= 128:
        return functools.partial(NCSNv2_128, config=config)
    if size <= 256:
        return functools.partial(NCSNv2_256, config=config)
    raise NotImplementedError(f"No NCSNv2 network for config.data.image_size={size} px (at most 256).")


def check_input(x: Array, config, model_name: str, downsampling: int = 1) -> None:
    """Raise a ValueError naming the config fields when ``x`` is not an image batch the config describes."""
    size, channels = config.data.image_size, config.data.num_channels
    if x.ndim != 4 or x.shape[1:] != (size, size, channels):
        raise ValueError(
            f"{model_name}: input of shape {tuple(x.shape)} does not match the config: expected (batch, "
            f"config.data.image_size, config.data.image_size, config.data.num_channels) = (batch, {size}, {size}, "
            f"{channels}). Fix the data pipeline or those config fields.")
    if size % downsampling:
        raise ValueError(f"{model_name}: config.data.image_size={size} must be divisible by {downsampling} "
                         f"(the network halves the resolution {downsampling.bit_length() - 1} times).")


class _RefineNet(nn.Module):
    """Shared forward pass of NCSN/NCSNv2; subclasses fix the layout through class variables.

    ``stages``: ``(channel multiplier, dilation)`` per encoder stage, two residual blocks each;
    every stage after the first starts with ``resample='down'`` (a 2× mean-pool when its
    dilation is 1, a dilated convolution keeping the resolution otherwise).
    ``refine_mults``: channel multiplier of each RefineBlock, from the coarsest stage up.
    """

    config: ml_collections.ConfigDict

    stages: ClassVar[tuple] = ((1, 1), (2, 1), (2, 2), (2, 4))
    refine_mults: ClassVar[tuple] = (2, 2, 2, 1)
    conditional: ClassVar[bool] = False
    registered_name: ClassVar[str] = "ncsnv2_64"

    @nn.compact
    def __call__(self, x: Array, labels: Array, train: bool = True) -> Array:
        """Args: x (B, H, W, C) images; labels (B,) int noise-level indices; train (unused: no dropout).

        Returns: (B, H, W, C), the score estimate (divided by σ_label if ``model.scale_by_sigma``).
        """
        config = self.config
        downsampling = 2 ** sum(1 for i, (_, dilation) in enumerate(self.stages) if i and dilation == 1)
        check_input(x, config, self.registered_name, downsampling)
        if compute_dtype(config) != jnp.float32:
            raise ValueError(f"{self.registered_name}: config.model.dtype={config.model.dtype!r} is implemented for "
                             "the ncsnpp and ddpm models only; set config.model.dtype='float32'.")
        nf = config.model.nf
        act = get_act(config)
        normalizer = get_normalization(config, conditional=self.conditional)
        interpolation = config.model.interpolation

        if self.conditional:
            residual_block = remat_block(ConditionalResidualBlock, config)
            refine_block = remat_block(CondRefineBlock, config)

            def residual(h, features, resample, dilation):
                return residual_block(features, normalizer, resample, act, dilation)(h, labels)

            def refine(hs, features, start, end):
                return refine_block(hs[0].shape[1:3], features, normalizer, act, interpolation, start, end)(
                    hs, labels)

            def normalize(h):
                return normalizer()(h, labels)
        else:
            residual_block = remat_block(ResidualBlock, config)
            refine_block = remat_block(RefineBlock, config)

            def residual(h, features, resample, dilation):
                return residual_block(features, normalizer, resample, act, dilation)(h)

            def refine(hs, features, start, end):
                return refine_block(hs[0].shape[1:3], features, act, interpolation, start, end)(hs)

            def normalize(h):
                return normalizer()(h)

        h = x if config.data.centered else 2.0 * x - 1.0
        h = ncsn_conv3x3(h, nf, stride=1, bias=True)

        skips = []
        for i, (mult, dilation) in enumerate(self.stages):
            h = residual(h, mult * nf, "down" if i else None, dilation)
            h = residual(h, mult * nf, None, dilation)
            skips.append(h)

        skips = skips[::-1]
        for i, (skip, mult) in enumerate(zip(skips, self.refine_mults)):
            h = refine([skip] if i == 0 else [skip, h], mult * nf, start=i == 0, end=i == len(skips) - 1)

        h = ncsn_conv3x3(act(normalize(h)), x.shape[-1])

        if config.model.scale_by_sigma:
            if not jnp.issubdtype(labels.dtype, jnp.integer):
                raise ValueError(f"{self.registered_name}: config.model.scale_by_sigma needs integer noise-level "
                                 f"indices as labels, got dtype {labels.dtype} (set training.continuous = False).")
            used_sigmas = get_sigmas(config)[labels].reshape((x.shape[0], 1, 1, 1))
            h = h / used_sigmas
        return h


@register_model(name="ncsnv2_64")
class NCSNv2(_RefineNet):
    """NCSNv2 for images below 96 px: 4 stages (nf, 2nf, 2nf dilated ×2, 2nf dilated ×4), one halving."""


@register_model(name="ncsn")
class NCSN(_RefineNet):
    """NCSNv1: the NCSNv2-64 layout, noise-conditional through every normalisation (see the module docstring)."""

    conditional: ClassVar[bool] = True
    registered_name: ClassVar[str] = "ncsn"


@register_model(name="ncsnv2_128")
class NCSNv2_128(_RefineNet):  # noqa: N801  (the original's name)
    """NCSNv2 for 96-128 px: 5 stages (nf, 2nf, 2nf, 4nf dilated ×2, 4nf dilated ×4), two 2× downsamplings."""

    stages: ClassVar[tuple] = ((1, 1), (2, 1), (2, 1), (4, 2), (4, 4))
    refine_mults: ClassVar[tuple] = (4, 2, 2, 1, 1)
    registered_name: ClassVar[str] = "ncsnv2_128"


@register_model(name="ncsnv2_256")
class NCSNv2_256(_RefineNet):  # noqa: N801  (the original's name)
    """NCSNv2 for 129-256 px: 6 stages (nf, 2nf ×3, 4nf dilated ×2, 4nf dilated ×4), three 2× downsamplings."""

    stages: ClassVar[tuple] = ((1, 1), (2, 1), (2, 1), (2, 1), (4, 2), (4, 4))
    refine_mults: ClassVar[tuple] = (4, 2, 2, 2, 1, 1)
    registered_name: ClassVar[str] = "ncsnv2_256"
