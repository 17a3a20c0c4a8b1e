"""Digits (embedded, 8×8×1), small DDPM++, VP SDE, continuous-time objective: the CPU demo."""
from configs.default_digits_configs import get_default_configs


def get_config():
    """DDPM++ on digits with the VP SDE; Euler-Maruyama snapshot samples."""
    config = get_default_configs()
    training = config.training
    training.sde = 'vpsde'
    training.continuous = True
    training.reduce_mean = True

    sampling = config.sampling
    sampling.method = 'pc'
    sampling.predictor = 'euler_maruyama'
    sampling.corrector = 'none'

    config.data.centered = True
    return config
