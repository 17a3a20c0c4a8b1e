"""Fashion-MNIST (28×28×1, Debian's dataset-fashion-mnist or config.data.data_dir), DDPM++, VP SDE.

The larger CPU dataset: three resolutions (28, 14, 7), 32 base channels. Expect hours on a
CPU for good samples; snapshot grids every 5,000 steps show progress.
"""
from configs.default_digits_configs import get_default_configs


def get_config():
    """DDPM++ on Fashion-MNIST with the VP SDE, continuous-time training."""
    config = get_default_configs()
    training = config.training
    training.sde = 'vpsde'
    training.continuous = True
    training.reduce_mean = True
    training.batch_size = 64
    training.n_iters = 50000
    training.snapshot_freq = 5000
    training.log_freq = 100
    training.eval_freq = 500
    training.snapshot_freq_for_preemption = 1000

    sampling = config.sampling
    sampling.method = 'pc'
    sampling.predictor = 'euler_maruyama'
    sampling.corrector = 'none'

    evaluate = config.eval
    evaluate.begin_ckpt = 1
    evaluate.end_ckpt = 10

    data = config.data
    data.dataset = 'FASHION_MNIST'
    data.image_size = 28
    data.num_channels = 1
    data.centered = True

    model = config.model
    model.num_scales = 500
    model.ema_rate = 0.999
    model.ch_mult = (1, 2, 2)
    model.attn_resolutions = (7,)

    config.optim.lr = 5e-4
    config.optim.warmup = 1000
    return config
