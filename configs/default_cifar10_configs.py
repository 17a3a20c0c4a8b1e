"""Default CIFAR-10 settings shared by every CIFAR-10 config (the paper's hyperparameters).

A specific config calls :func:`get_default_configs` and overrides what differs.
"""
import ml_collections

from configs.default_sampler_options import add_fast_sampler_options


def get_default_configs() -> ml_collections.ConfigDict:
    """The CIFAR-10 defaults: training, sampling, eval, data, model and optim sections, plus the seed."""
    config = ml_collections.ConfigDict()

    # training
    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128
    training.n_iters = 1300001
    training.snapshot_freq = 50000
    training.log_freq = 50
    training.eval_freq = 100
    # extra checkpoints so that a preempted job can resume
    training.snapshot_freq_for_preemption = 10000
    # produce samples at each snapshot
    training.snapshot_sampling = True
    training.likelihood_weighting = False
    training.continuous = True
    # number of training steps fused into one jitted call
    training.n_jitted_steps = 5
    training.reduce_mean = False

    # sampling
    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.n_steps_each = 1
    sampling.noise_removal = True
    sampling.probability_flow = False
    sampling.snr = 0.16
    # New (not in the original): ODE solver used by the probability-flow sampler and by bits/dim.
    # 'jax' = JAX-native adaptive solver (runs on the accelerator); 'scipy' = the original's
    # scipy.integrate.solve_ivp (RK45) on the host.
    sampling.ode_solver = 'jax'
    # New: relative / absolute tolerances of that ODE solver (the original's values).
    sampling.ode_rtol = 1e-5
    sampling.ode_atol = 1e-5
    add_fast_sampler_options(sampling)  # new: the fast samplers' options, unset

    # evaluation
    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.begin_ckpt = 9
    evaluate.end_ckpt = 26
    evaluate.batch_size = 1024
    evaluate.enable_sampling = False
    evaluate.num_samples = 50000
    evaluate.enable_loss = True
    evaluate.enable_bpd = False
    evaluate.bpd_dataset = 'test'
    # New: local directory of the Inception SavedModel used for FID/IS/KID
    # (None = download it from TF-Hub); a typed placeholder so the command line can set it.
    evaluate.inception_path = ml_collections.config_dict.placeholder(str)
    # Folder of the dataset statistics files (<dataset>_stats.npz); None = assets/stats.
    evaluate.stats_dir = ml_collections.config_dict.placeholder(str)
    # New: seconds to wait for each checkpoint of begin_ckpt..end_ckpt not written yet (by a running
    # training); 0 = do not wait: a missing checkpoint is an error at once.
    evaluate.wait_for_checkpoints_s = 0.
    # New: the likelihood bound (score_flow's bound_likelihood) in bits/dim beside the ODE bits/dim, on the
    # bits/dim batches, with bound_num_times Monte-Carlo times per example (score_flow: 1000).
    evaluate.enable_bound = False
    evaluate.bound_num_times = 1000

    # data
    config.data = data = ml_collections.ConfigDict()
    data.dataset = 'CIFAR10'
    data.image_size = 32
    data.random_flip = True
    data.centered = False
    data.uniform_dequantization = False
    data.num_channels = 3
    # New: tensorflow-datasets data_dir (None = the tfds default, ~/tensorflow_datasets); a typed
    # placeholder so that --config.data.data_dir=PATH works on the command line.
    data.data_dir = ml_collections.config_dict.placeholder(str)

    # model
    config.model = model = ml_collections.ConfigDict()
    model.sigma_min = 0.01
    model.sigma_max = 50
    model.num_scales = 1000
    model.beta_min = 0.1
    model.beta_max = 20.
    model.dropout = 0.1
    model.embedding_type = 'fourier'
    # new (issue 16): recompute each residual / attention block in the backward pass (less memory, same
    # gradients), and the network's compute dtype ('bfloat16': mixed precision, parameters stay float32)
    model.remat = False
    model.dtype = 'float32'

    # optimization
    config.optim = optim = ml_collections.ConfigDict()
    optim.weight_decay = 0
    optim.optimizer = 'Adam'
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.warmup = 5000
    optim.grad_clip = 1.

    config.seed = 42
    return config
