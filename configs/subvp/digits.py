"""Digits (embedded, 8×8×1), small DDPM++, sub-VP SDE, continuous-time objective."""
from configs.default_digits_configs import get_default_configs


def get_config():
    """DDPM++ on digits with the sub-VP SDE; Euler-Maruyama snapshot samples."""
    config = get_default_configs()
    training = config.training
    training.sde = 'subvpsde'
    training.continuous = True
    training.reduce_mean = True

    sampling = config.sampling
    sampling.method = 'pc'
    sampling.predictor = 'euler_maruyama'
    sampling.corrector = 'none'

    config.data.centered = True
    return config
