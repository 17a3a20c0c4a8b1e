"""Digits (embedded, 8×8×1), small NCSN++-style network, VE SDE, continuous-time objective."""
from configs.default_digits_configs import get_default_configs


def get_config():
    """VE SDE on digits: Fourier time embedding, output scaled by 1/σ, PC sampling (reverse diffusion + Langevin)."""
    config = get_default_configs()
    training = config.training
    training.sde = 'vesde'
    training.continuous = True
    training.reduce_mean = False

    sampling = config.sampling
    sampling.method = 'pc'
    sampling.predictor = 'reverse_diffusion'
    sampling.corrector = 'langevin'
    sampling.snr = 0.16

    config.data.centered = False
    model = config.model
    model.scale_by_sigma = True
    model.embedding_type = 'fourier'
    return config
