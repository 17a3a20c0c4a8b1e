"""The 2-D Gaussian mixture with the sub-VP SDE (see configs/vp/gmm.py)."""
from configs.vp import gmm


def get_config():
    """configs/vp/gmm.py with ``training.sde = 'subvpsde'``."""
    return gmm.get_config('subvpsde')
