"""score_flow's CIFAR-10 defaults: this port's CIFAR-10 defaults plus what score_flow changed or added.

Added fields (read by ``losses`` / ``bound_likelihood`` through ``run_lib``):

* ``training.importance_weighting``: importance-sampled time for likelihood weighting (VP / sub-VP).
* ``training.smallest_time``: smallest training time ``eps``, also the bound's and bits/dim's lower end.
* ``sampling.smallest_time``: the samplers' ``eps``.
* ``eval.bound``: report the variational bound (``bound_likelihood``) instead of the ODE bits/dim;
  ``eval.dsm``: its denoising (else sliced) score-matching form; ``eval.offset``: its ``p_eps -> p_0`` term.
* ``eval.num_repeats``: passes over the test split for bits/dim.

Not carried over: score_flow's ``deq.*`` / ``eval.dequantizer`` (Flow++ dequantiser, not ported),
``eval.ckpt_id`` (the dequantiser's checkpoint), ``model.data_init`` and ``model.trainable_embedding``
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
    return config


def get_default_configs() -> ml_collections.ConfigDict:
    """score_flow's ``configs/default_cifar10_configs.py``."""
    return apply_score_flow_defaults(default_cifar10_configs.get_default_configs())
