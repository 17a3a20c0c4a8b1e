"""A 2-D Gaussian mixture (the ``GMM`` dataset), small residual MLP, VP SDE, continuous-time objective.

    python main.py --mode train --config configs/vp/gmm.py --workdir runs/gmm_vp

The mixture is ``score_sde.mixtures.make_mixture(config.data.dim)`` (2-D: 8 components on a circle;
``--config.data.dim=16`` with ``--config.data.num_channels=16`` for the 16-D one), whose exact
score and density ``--mode tables`` compares trained models with. Each point is a 1x1 "image"
with ``dim`` channels, so the losses, samplers and ``run_lib`` treat it like any image.
"""
from configs.default_digits_configs import get_default_configs


def get_config(sde: str = 'vpsde'):
    """The ``sde`` ('vpsde', 'subvpsde', 'vesde') model of the 2-D mixture; ve/gmm.py and subvp/gmm.py call this."""
    config = get_default_configs()
    training = config.training
    training.sde = sde
    training.continuous = True
    training.reduce_mean = True
    training.batch_size = 256
    training.n_iters = 4000
    training.snapshot_freq = 4000
    training.eval_freq = 500
    training.log_freq = 100
    training.snapshot_freq_for_preemption = 1000
    training.snapshot_sampling = False
    training.n_jitted_steps = 10

    sampling = config.sampling
    sampling.method = 'pc'
    sampling.predictor = 'reverse_diffusion'
    sampling.corrector = 'none'

    evaluate = config.eval
    evaluate.batch_size = 500
    evaluate.num_samples = 1000

    data = config.data
    data.dataset = 'GMM'
    data.dim = 2
    data.image_size = 1
    data.num_channels = 2
    data.centered = False

    model = config.model
    model.name = 'mlp'
    model.nf = 128
    model.num_res_blocks = 3
    # One resolution: the U-Nets' image-size rule (image_size a multiple of 2**(len(ch_mult) - 1)) holds for 1.
    model.ch_mult = (1,)
    model.num_scales = 1000
    model.ema_rate = 0.999
    model.dropout = 0.0
    # The paper's CIFAR-10 SDEs, as --mode tables uses (the digits defaults' σ_max = 5 is below the mixtures' spread).
    model.sigma_max = 50
    if sde == 'vesde':
        # VE labels are σ(t): Fourier features of log σ; inputs and outputs scaled by σ (models/mlp.py).
        model.embedding_type = 'fourier'
        model.scale_by_sigma = True
    else:
        model.embedding_type = 'positional'
        model.scale_by_sigma = False
    config.optim.lr = 2e-3
    config.optim.warmup = 200
    return config
