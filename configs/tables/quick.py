"""The quick run of ``--mode tables`` (CI: under 5 minutes on 2 CPU cores): the grid at a few dozen steps.

    python main.py --mode tables --config configs/tables/quick.py --workdir /tmp/tables_quick

Small enough to run in CI, large enough that its ground-truth checks mean something: at 25 steps
the exact-score samplers are measurably off the truth and 50 steps reduce that (the claim "the
error shrinks with more steps"); the exact-score bits/dim match the exact NLL within 1e-3; the
trained 2-D models' bits/dim sit above the exact NLL (Gibbs' inequality).
"""
from configs.tables import cpu


def get_config():
    """``cpu.py`` with P25 / P50 / C50 / PC25 (two predictors), 3 seeds of 500 samples; Table 2's trained models in 2-D."""
    config = cpu.get_config()
    tables = config.tables
    tables.predictors = ('reverse_diffusion', 'probability_flow')
    tables.samplers = ('P25', 'P50', 'C50', 'PC25')
    tables.seeds = 3
    tables.num_samples = 500
    tables.projections = 128
    tables.mmd_points = 500
    tables.likelihood_points = 64
    # The trained-score sampler grid is left to cpu.py (minutes of network evaluations); Table 2's trained
    # models stay, in 2-D.
    tables.which = ('sampler', 'likelihood', 'trained_likelihood', 'paper')  # no 'digits' (cpu.py's ~10 minutes)
    tables.trained_dims = (2,)
    tables.train_steps = 500
    tables.train_width = 32
    tables.train_blocks = 1
    tables.nll_points = 64
    tables.nll_probes = 2
    tables.nll_tolerances = (1e-4, 1e-3)
    return config
