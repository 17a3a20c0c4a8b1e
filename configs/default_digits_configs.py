"""Defaults for the embedded UCI handwritten digits (8×8×1, 1,797 images): CPU-sized runs.

Every field of the CIFAR-10 defaults exists here too (this file starts from them), so tools
that read a CIFAR-10 config read these. What differs is sized so that
``python main.py --config configs/vp/digits.py --workdir runs/digits --mode train`` finishes in
about ten minutes on two CPU cores and samples recognisable digits:

* a ~1M-parameter DDPM++ (``nf=32``, ``ch_mult=(1, 2)``: resolutions 8 and 4);
* batch 64, short warmup, learning rate 1e-3, EMA rate 0.995 (the EMA must forget the
  initial weights within a few thousand steps; 0.9999 would not);
* 1000 discretisation steps would take minutes per snapshot on a CPU: ``num_scales = 250``;
* one train step per call (``n_jitted_steps = 1``; see below).
"""
import ml_collections

from configs.default_cifar10_configs import get_default_configs as get_cifar10_defaults
from configs.score_flow.default_cifar10_configs import add_deq_defaults


def get_default_configs() -> ml_collections.ConfigDict:
    """Digits defaults: training, sampling, eval, data, model and optim sections, plus the seed."""
    config = get_cifar10_defaults()

    # training
    training = config.training
    training.batch_size = 64
    training.n_iters = 1500
    training.snapshot_freq = 1500
    training.log_freq = 50
    training.eval_freq = 250
    training.snapshot_freq_for_preemption = 250
    training.snapshot_sampling = True
    # One step per call: on a CPU fusing 5 steps is only 3-19% faster per step, but its program takes ~4.6× longer
    # to compile and ~20× longer to load from the compilation cache (docs/performance.md, "Compilation"), so
    # the README's run finishes sooner and restarts ~5× sooner with 1.
    training.n_jitted_steps = 1

    # sampling
    sampling = config.sampling
    sampling.ode_solver = 'jax'

    # evaluation: the numbered checkpoint of a default run; loss on the held-out digits.
    evaluate = config.eval
    evaluate.begin_ckpt = 1
    evaluate.end_ckpt = 1
    evaluate.batch_size = 64
    evaluate.num_samples = 256
    evaluate.enable_sampling = False
    evaluate.enable_loss = True
    evaluate.enable_bpd = False

    # data
    data = config.data
    data.dataset = 'DIGITS'
    data.image_size = 8
    data.num_channels = 1
    data.random_flip = False
    data.centered = False
    data.uniform_dequantization = False

    # model: a small DDPM++ (see configs/vp/cifar10_ddpmpp_continuous.py for the full-size one)
    model = config.model
    model.name = 'ncsnpp'
    model.num_scales = 250
    model.sigma_min = 0.01
    # ≈ the largest distance between two digits (4.8), NCSNv2's technique 1; an int like the default's 50.
    model.sigma_max = 5
    model.beta_min = 0.1
    model.beta_max = 20.
    model.dropout = 0.1
    model.scale_by_sigma = False
    model.ema_rate = 0.995
    model.normalization = 'GroupNorm'
    model.nonlinearity = 'swish'
    model.nf = 32
    model.ch_mult = (1, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (4,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = False
    model.fir_kernel = [1, 3, 3, 1]
    model.skip_rescale = True
    model.resblock_type = 'biggan'
    model.progressive = 'none'
    model.progressive_input = 'none'
    model.progressive_combine = 'sum'
    model.attention_type = 'ddpm'
    model.init_scale = 0.
    model.embedding_type = 'positional'
    model.fourier_scale = 16
    model.conv_size = 3

    # optimization
    optim = config.optim
    optim.lr = 1e-3
    optim.warmup = 100
    optim.grad_clip = 1.

    # variational dequantisation (--mode train_deq, eval.dequantizer): score_flow's fields, a smaller network
    evaluate.dequantizer = False
    deq = add_deq_defaults(config).deq
    deq.n_iters = 500
    deq.filters = 32
    deq.components = 8

    config.seed = 42
    return config
