"""Short path for the paper's main CIFAR-10 VE config: the same as
`configs/ve/cifar10_ncsnpp_continuous.py`.
"""
from configs.ve import cifar10_ncsnpp_continuous


def get_config():
    """Return `configs/ve/cifar10_ncsnpp_continuous.py`'s config."""
    return cifar10_ncsnpp_continuous.get_config()
