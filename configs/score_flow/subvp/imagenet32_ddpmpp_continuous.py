"""score_flow's subvp/imagenet32_ddpmpp_continuous: DDPM++ (4 residual blocks), sub-VP SDE, ImageNet 32×32.

score_flow's CIFAR-10 config of the same name (``configs/score_flow/subvp/cifar10_ddpmpp_continuous.py``) with the
ImageNet 32×32 defaults; the model is the same. Likelihood weighting and importance sampling are off,
as in score_flow: turn them on with
``--config.training.likelihood_weighting --config.training.importance_weighting``.

score_flow's sub-VP configs start training, the bound and sampling at t = 0.01 (as for CIFAR-10).
"""
from configs.score_flow.subvp import cifar10_ddpmpp_continuous as cifar10_config
from configs.score_flow.default_imagenet32_configs import apply_imagenet32_defaults


def get_config():
    return apply_imagenet32_defaults(cifar10_config.get_config())
