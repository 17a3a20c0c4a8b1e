"""score_flow's ImageNet 32×32 defaults: its CIFAR-10 defaults (``default_cifar10_configs``) with ImageNet's data.

``data.dataset = 'ImageNet'`` reads tfds ``downsampled_imagenet/32x32`` (1,281,149 train, 50,000 validation
images; ``score_sde.datasets``). What score_flow changed from its CIFAR-10 defaults: no random flips, no
dropout, one pass over the evaluation split for bits/dim (``eval.num_repeats``), and its ImageNet 32×32
dequantiser (``deq.arch``, sizes fixed in score_flow's code). Its ImageNet defaults
leave ``sampling.smallest_time`` unset; every ImageNet config sets it, so it stays here from CIFAR-10.
"""
import ml_collections

from configs.score_flow.default_cifar10_configs import get_default_configs as get_cifar10_defaults


def apply_imagenet32_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Change a score_flow CIFAR-10 config into its ImageNet 32×32 twin (in place; returns it)."""
    config.data.dataset = 'ImageNet'
    config.data.random_flip = False
    config.model.dropout = 0.
    config.eval.num_repeats = 1
    deq = config.deq
    deq.arch = 'imagenet32'
    deq.filters = 128
    deq.blocks = 8
    return config


def get_default_configs() -> ml_collections.ConfigDict:
    """score_flow's ``configs/default_imagenet32_configs.py``."""
    return apply_imagenet32_defaults(get_cifar10_defaults())
