"""What the benchmark scripts share: the benchmark DDPM++ of ``docs/performance.md`` (anchors)."""
from configs.vp import cifar10_ddpmpp_continuous

BENCHMARK_DDPMPP_PARAMS = 1_754_147


def shrink(config):
    """The benchmark size: ``nf=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,)``."""
    config.model.nf = 32
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    return config


def benchmark_config():
    """``configs/vp/cifar10_ddpmpp_continuous.py`` shrunk to the benchmark DDPM++ (1,754,147 parameters)."""
    return shrink(cifar10_ddpmpp_continuous.get_config())
