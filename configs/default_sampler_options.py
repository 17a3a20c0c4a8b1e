"""The options of the fast samplers (``fast_sampling.py``), shared by every default config.

New (not in the original). Each is a typed placeholder: unset (None) means "the chosen sampler's
own default" (``fast_sampling.sampler_options``), and ``--config.sampling.<field>=`` still sets it
from the command line. Only ``config.sampling.method`` selects a fast sampler ('ddim', 'heun',
'dpm_solver', 'dpm_solver_pp', 'adaptive_sde'); 'pc' and 'ode' ignore these fields.
"""
from ml_collections import config_dict

_TYPES = {
    'steps': int,  # time steps (not score evaluations: see fast_sampling for each sampler's count)
    'order': int,  # dpm_solver: 1, 2 or 3
    'eta': float,  # ddim: 0 deterministic, 1 ancestral
    'churn': float,  # heun: EDM's S_churn
    'rho': float,  # heun / edm schedule: the time-step exponent (7 in Karras et al.)
    'time_schedule': str,  # 'time_uniform', 'logsnr' or 'edm'
    'lower_order_final': bool,  # dpm_solver_pp: lower orders on the last steps
    'adaptive_rtol': float,  # adaptive_sde: error tolerances
    'adaptive_atol': float,
    'denoise_to_zero': bool,  # one more score evaluation: the Tweedie denoiser at the last time
    # --mode sample (run_lib.sample), any method: unset = one eval.batch_size batch / the newest checkpoint
    'num_samples': int,
    'ckpt': int,
}


def add_fast_sampler_options(sampling: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """Add the fast samplers' option fields, unset, to ``config.sampling``; returns it."""
    for name, kind in _TYPES.items():
        setattr(sampling, name, config_dict.placeholder(kind))
    return sampling
