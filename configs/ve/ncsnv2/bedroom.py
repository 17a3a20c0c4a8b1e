"""LSUN bedroom 128x128, NCSNv2 (Song & Ermon 2020) with annealed Langevin dynamics."""
from configs.default_lsun_configs import get_default_configs


def get_config():
    """Return this file's ConfigDict (see the module docstring)."""
    config = get_default_configs()

    # training
    training = config.training
    training.batch_size = 128
    training.sde = 'vesde'
    # The original misspells this field (`training.continuouse`), which leaves the default
    # continuous = True in force; NCSNv2 is trained on its discrete noise levels, as intended here.
    training.continuous = False

    # sampling: annealed Langevin dynamics only
    sampling = config.sampling
    sampling.method = 'pc'
    sampling.predictor = 'none'
    sampling.corrector = 'ald'
    sampling.n_steps_each = 3
    sampling.snr = 0.095

    # data
    data = config.data
    data.category = 'bedroom'
    data.image_size = 128

    # model
    model = config.model
    model.name = 'ncsnv2_128'
    model.scale_by_sigma = True
    model.sigma_max = 190
    model.num_scales = 1086
    model.ema_rate = 0.9999
    model.sigma_min = 0.01
    model.normalization = 'InstanceNorm++'
    model.nonlinearity = 'elu'
    model.nf = 128
    model.interpolation = 'bilinear'

    # optim
    optim = config.optim
    optim.weight_decay = 0
    optim.optimizer = 'Adam'
    optim.lr = 1e-4
    optim.beta1 = 0.9
    optim.amsgrad = False
    optim.eps = 1e-8
    optim.warmup = 0
    optim.grad_clip = -1.

    return config
