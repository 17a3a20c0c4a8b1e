"""score_flow's vp/imagenet32_ddpmpp_deep_continuous: DDPM++ (8 residual blocks), VP SDE, ImageNet 32×32.

score_flow's CIFAR-10 config of the same name (``configs/score_flow/vp/cifar10_ddpmpp_deep_continuous.py``) with the
ImageNet 32×32 defaults; the model is the same. Likelihood weighting and importance sampling are off,
as in score_flow: turn them on with
``--config.training.likelihood_weighting --config.training.importance_weighting``.

score_flow writes ``training.smallest_time = 5e-5 if likelihood_weighting and importance_weighting else 1e-5``
while both are still False, so it is 1e-5 (command-line flags come later); for the 5e-5 that expression
means with importance sampling, add ``--config.training.smallest_time=5e-5``.
"""
from configs.score_flow.vp import cifar10_ddpmpp_deep_continuous as cifar10_config
from configs.score_flow.default_imagenet32_configs import apply_imagenet32_defaults


def get_config():
    return apply_imagenet32_defaults(cifar10_config.get_config())
