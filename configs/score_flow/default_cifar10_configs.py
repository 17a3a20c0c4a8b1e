"""score_flow's CIFAR-10 defaults: this port's CIFAR-10 defaults plus what score_flow changed or added.

Added fields (read by ``losses`` / ``bound_likelihood`` through ``run_lib``):

* ``training.importance_weighting``: importance-sampled time for likelihood weighting (VP / sub-VP).
* ``training.smallest_time``: smallest training time ``eps``, also the bound's and bits/dim's lower end.
* ``sampling.smallest_time``: the samplers' ``eps``.
* ``eval.bound``: report the variational bound (``bound_likelihood``) instead of the ODE bits/dim;
  ``eval.dsm``: its denoising (else sliced) score-matching form; ``eval.offset``: its ``p_eps -> p_0`` term.
* ``eval.num_repeats``: passes over the test split for bits/dim.

* ``deq.*``: the Flow++ variational dequantiser (``--mode train_deq``, ``score_sde/dequantizer_train.py``):
  score_flow's ``n_iters``, ``ema_rate``, ``dropout``, ``offset`` (the bound's ``p_eps -> p_0`` term in its
  loss), plus its network's architecture (``arch``: ``'cifar10'``, or ``'imagenet32'`` in the ImageNet
  configs; score_flow chose by dataset) and size (``filters``, ``components``, ``blocks``, ``attn_heads``:
  score_flow's CIFAR-10 values, fixed in its code) and ``score_ckpt``, the score checkpoint it is trained against
  (0: the newest; score_flow read ``eval.ckpt_id``).
* ``eval.dequantizer``: bits/dim under the trained dequantiser instead of uniform noise.

Not carried over: ``eval.ckpt_id`` (see ``deq.score_ckpt``), ``model.data_init`` and ``model.trainable_embedding``
(nothing in score_flow's score model path reads them with their default values).
"""
import ml_collections

from configs import default_cifar10_configs


def apply_score_flow_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Change a config of this port's CIFAR-10 defaults into score_flow's (in place; returns it)."""
    config.training.log_freq = 100
    config.training.importance_weighting = False
    config.training.smallest_time = 1e-5
    config.sampling.smallest_time = 1e-3
    evaluate = config.eval
    evaluate.begin_ckpt = 26
    evaluate.end_ckpt = 26
    evaluate.enable_loss = False
    evaluate.enable_bpd = True
    evaluate.num_repeats = 5
    evaluate.bound = False
    evaluate.dsm = True
    evaluate.offset = True
    evaluate.dequantizer = False
    add_deq_defaults(config)
    return config


def add_deq_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add score_flow's ``deq`` section (the Flow++ dequantiser, CIFAR-10 sizes) to ``config`` (in place)."""
    config.deq = deq = ml_collections.ConfigDict()
    deq.n_iters = 300001
    deq.ema_rate = 0.99
    deq.dropout = 0.0
    deq.offset = True
    deq.arch = 'cifar10'  # models.flowpp.dequantizer.ARCHITECTURES
    deq.filters = 96
    deq.components = 32
    deq.blocks = 2
    deq.attn_heads = 4
    deq.score_ckpt = 0
    return config


def get_default_configs() -> ml_collections.ConfigDict:
    """score_flow's ``configs/default_cifar10_configs.py``."""
    return apply_score_flow_defaults(default_cifar10_configs.get_default_configs())
