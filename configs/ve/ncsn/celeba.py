"""CelebA 64x64, NCSN (v1) with annealed Langevin dynamics; 10 noise levels from sigma=1 (the NCSN
paper's setting), no EMA.
"""
from configs.default_celeba_configs import get_default_configs


def get_config():
    """Return this file's ConfigDict (see the module docstring)."""
    config = get_default_configs()

    # training
    training = config.training
    # the original sets `training.loss` here (a typo), leaving training.sde unset
    training.sde = 'vesde'
    training.continuous = False

    # sampling: annealed Langevin dynamics only
    sampling = config.sampling
    sampling.method = 'pc'
    sampling.predictor = 'none'
    sampling.corrector = 'ald'
    sampling.n_steps_each = 100
    sampling.snr = 0.316

    # model
    model = config.model
    model.name = 'ncsn'
    model.scale_by_sigma = False
    model.sigma_max = 1.
    model.num_scales = 10
    # NCSN (v1) is a class-conditional network with one class per noise level. The original configs
    # never set this field (a bug). Here it is a reference to num_scales: the two stay equal whichever
    # is overridden on the command line.
    model.num_classes = model.get_ref('num_scales')
    model.ema_rate = 0.0
    model.normalization = 'InstanceNorm++'
    model.nonlinearity = 'elu'
    model.nf = 128
    model.interpolation = 'bilinear'

    # optim
    optim = config.optim
    optim.weight_decay = 0
    optim.optimizer = 'Adam'
    optim.lr = 1e-3
    optim.beta1 = 0.9
    optim.amsgrad = False
    optim.eps = 1e-8
    optim.warmup = 0
    optim.grad_clip = -1.

    return config
