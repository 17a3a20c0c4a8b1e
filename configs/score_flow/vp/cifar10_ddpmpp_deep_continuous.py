"""score_flow's vp/cifar10_ddpmpp_deep_continuous: DDPM++ (8 residual blocks), VP SDE, for likelihood training.

score_sde's config of the same name with score_flow's defaults; score_flow samples with the
probability-flow ODE. Likelihood weighting and importance sampling are off here, as in score_flow:
turn them on with ``--config.training.likelihood_weighting --config.training.importance_weighting``.
"""
from configs.vp import cifar10_ddpmpp_deep_continuous as score_sde_config
from configs.score_flow.default_cifar10_configs import apply_score_flow_defaults


def get_config():
    config = apply_score_flow_defaults(score_sde_config.get_config())
    config.sampling.method = 'ode'
    config.eval.begin_ckpt = 19
    config.eval.end_ckpt = 19
    return config
