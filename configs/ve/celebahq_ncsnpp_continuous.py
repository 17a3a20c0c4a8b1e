"""CelebA-HQ 1024x1024, NCSN++ with the VE SDE, continuous-time training; self-contained (no defaults module).

Differences from the original file, which could not run as given: it imported torch only to set
``config.device`` (unused by this JAX code, dropped), and it lacked fields that training and evaluation
read; those are added with the values of the other configs (marked "added" below), together with the new
fields of ``configs/default_*_configs.py`` (ode_solver, ode_rtol, ode_atol, data_dir, inception_path).
"""
import ml_collections

from configs.default_sampler_options import add_fast_sampler_options


def get_config():
    """Return this file's ConfigDict (see the module docstring)."""
    config = ml_collections.ConfigDict()

    # training
    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 8
    training.n_iters = 2400001
    training.snapshot_freq = 50000
    training.log_freq = 50
    training.eval_freq = 100
    training.snapshot_freq_for_preemption = 5000
    training.snapshot_sampling = True
    training.sde = 'vesde'
    training.continuous = True
    training.likelihood_weighting = False
    training.reduce_mean = False
    training.n_jitted_steps = 5  # added

    # sampling
    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.method = 'pc'
    sampling.predictor = 'reverse_diffusion'
    sampling.corrector = 'langevin'
    sampling.probability_flow = False
    sampling.snr = 0.15
    sampling.n_steps_each = 1
    sampling.noise_removal = True
    sampling.ode_solver = 'jax'  # added: 'jax' | 'scipy', see configs/default_cifar10_configs.py
    sampling.ode_rtol = 1e-5  # added
    sampling.ode_atol = 1e-5  # added
    add_fast_sampler_options(sampling)  # new: the fast samplers' options, unset

    # eval
    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.batch_size = 1024
    evaluate.num_samples = 50000
    evaluate.begin_ckpt = 1
    evaluate.end_ckpt = 96
    evaluate.enable_sampling = True  # added
    evaluate.enable_loss = True  # added
    evaluate.enable_bpd = False  # added
    evaluate.bpd_dataset = 'test'  # added
    evaluate.inception_path = ml_collections.config_dict.placeholder(str)  # added
    evaluate.stats_dir = ml_collections.config_dict.placeholder(str)  # added
    evaluate.wait_for_checkpoints_s = 0.  # added
    evaluate.enable_bound = False  # added
    evaluate.bound_num_times = 1000  # added

    # data
    config.data = data = ml_collections.ConfigDict()
    data.dataset = 'CelebAHQ'
    data.image_size = 1024
    data.centered = False
    data.random_flip = True
    data.uniform_dequantization = False
    data.num_channels = 3
    # the original author's path: point it at your own CelebA-HQ 1024x1024 tfrecords file
    data.tfrecords_path = '/atlas/u/yangsong/celeba_hq/-r10.tfrecords'
    data.data_dir = ml_collections.config_dict.placeholder(str)  # added

    # model
    config.model = model = ml_collections.ConfigDict()
    model.name = 'ncsnpp'
    model.scale_by_sigma = True
    model.sigma_max = 1348
    model.num_scales = 2000
    model.ema_rate = 0.9999
    model.sigma_min = 0.01
    model.beta_min = 0.1  # added (read only by VP SDEs)
    model.beta_max = 20.  # added (read only by VP SDEs)
    model.normalization = 'GroupNorm'
    model.nonlinearity = 'swish'
    model.nf = 16
    model.ch_mult = (1, 2, 4, 8, 16, 32, 32, 32)
    model.num_res_blocks = 1
    model.attn_resolutions = (16,)
    model.dropout = 0.
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = True
    model.fir_kernel = [1, 3, 3, 1]
    model.skip_rescale = True
    model.resblock_type = 'biggan'
    model.progressive = 'output_skip'
    model.progressive_input = 'input_skip'
    model.progressive_combine = 'sum'
    model.attention_type = 'ddpm'
    model.init_scale = 0.
    model.fourier_scale = 16
    model.conv_size = 3
    model.embedding_type = 'fourier'
    model.remat = False  # new: see configs/default_cifar10_configs.py
    model.dtype = 'float32'  # new: see configs/default_cifar10_configs.py

    # optim
    config.optim = optim = ml_collections.ConfigDict()
    optim.weight_decay = 0
    optim.optimizer = 'Adam'
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.amsgrad = False
    optim.eps = 1e-8
    optim.warmup = 5000
    optim.grad_clip = 1.

    config.seed = 42
    return config
