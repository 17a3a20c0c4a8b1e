"""score_flow's subvp/cifar10_ddpmpp_continuous: DDPM++ (4 residual blocks), sub-VP SDE, for likelihood training.

score_sde's config of the same name with score_flow's defaults; score_flow samples with the
probability-flow ODE. Likelihood weighting and importance sampling are off here, as in score_flow:
turn them on with ``--config.training.likelihood_weighting --config.training.importance_weighting``.
"""
from configs.subvp import cifar10_ddpmpp_continuous as score_sde_config
from configs.score_flow.default_cifar10_configs import apply_score_flow_defaults


def get_config():
    config = apply_score_flow_defaults(score_sde_config.get_config())
    config.sampling.method = 'ode'
    # score_flow's sub-VP configs start training, the bound and sampling at t = 0.01.
    config.training.smallest_time = 0.01
    config.sampling.smallest_time = 0.01
    return config
