"""The 2-D Gaussian mixture with the VE SDE (see configs/vp/gmm.py)."""
from configs.vp import gmm


def get_config():
    """configs/vp/gmm.py with ``training.sde = 'vesde'`` (Fourier time embedding, σ-scaled network)."""
    return gmm.get_config('vesde')
