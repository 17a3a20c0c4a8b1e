"""Short path for the paper's main CIFAR-10 SUBVP config: the same as
`configs/subvp/cifar10_ddpmpp_continuous.py`.
"""
from configs.subvp import cifar10_ddpmpp_continuous


def get_config():
    """Return `configs/subvp/cifar10_ddpmpp_continuous.py`'s config."""
    return cifar10_ddpmpp_continuous.get_config()
