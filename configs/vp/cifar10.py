"""Short path for the paper's main CIFAR-10 VP config: the same as
`configs/vp/cifar10_ddpmpp_continuous.py`.
"""
from configs.vp import cifar10_ddpmpp_continuous


def get_config():
    """Return `configs/vp/cifar10_ddpmpp_continuous.py`'s config."""
    return cifar10_ddpmpp_continuous.get_config()
