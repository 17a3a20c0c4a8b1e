"""The full CPU run of ``--mode tables`` (see docs/tables.md): the paper's sampler grid at its step counts.

    python main.py --mode tables --config configs/tables/cpu.py --workdir results/tables

Built on the CIFAR-10 defaults, so that ``config.model`` holds the SDEs of the paper's CIFAR-10 runs
(σ ∈ [0.01, 50], β ∈ [0.1, 20]) and ``main.py``'s config checks apply unchanged; the job reads only
``config.tables``, ``config.model``'s SDE parameters and ``config.seed``.
"""
import ml_collections

from configs.default_cifar10_configs import get_default_configs


def get_config():
    """Table 1's grid (P1000, P2000, C2000, PC1000) on 2-D and 16-D mixtures, 5 seeds, exact and trained scores;
    Table 2 with the exact score and with trained models (with and without likelihood weighting)."""
    config = get_default_configs()
    # Not read by the job (each cell sets its own SDE and sampler); named so that the config passes
    # main.py's checks like every file under configs/.
    config.training.sde = 'vpsde'
    config.model.name = 'ncsnpp'
    config.sampling.method = 'pc'
    config.sampling.predictor = 'reverse_diffusion'
    config.sampling.corrector = 'langevin'

    tables = config.tables = ml_collections.ConfigDict()
    tables.which = ('sampler', 'likelihood', 'trained_likelihood', 'trained_sampler', 'paper')
    tables.sdes = ('vesde', 'vpsde', 'subvpsde')
    tables.predictors = ('ancestral_sampling', 'reverse_diffusion', 'probability_flow')
    tables.samplers = ('P1000', 'P2000', 'C2000', 'PC1000')
    tables.dims = (2, 16)
    tables.seeds = 5
    tables.num_samples = 4000
    # The Langevin corrector's signal-to-noise ratio: the original's default (the paper tuned it per
    # sampler on CIFAR-10, Table 5; mixtures are not CIFAR-10).
    tables.snr = 0.16
    tables.projections = 256
    tables.mmd_points = 2000  # MMD² on the first 2000 samples (n² cost)
    tables.likelihood_points = 256
    tables.likelihood_rtol = 1e-5
    tables.likelihood_atol = 1e-5
    # Trained small models (models/mlp.py through run_lib's train step; score_sde/mixture_training.py):
    # VE, VP, subVP on each of trained_dims, with λ = std² ('plain') and λ = g² (likelihood weighting).
    tables.trained_dims = (2, 16)
    tables.train_steps = 3000
    tables.train_batch_size = 256
    tables.train_width = 64
    tables.train_blocks = 2
    tables.train_lr = 2e-3
    # The sampler grid with the trained (plain) score: fewer samples and seeds than the exact-score
    # grid (a network evaluation costs ~100x an exact mixture score), with its own exact-samples floor.
    tables.trained_samplers = ('P1000', 'P2000', 'C2000', 'PC1000')
    tables.trained_num_samples = 400
    tables.trained_seeds = 3
    # Table 2 with trained models: bits/dim on nll_points fresh points, nll_probes Rademacher probes,
    # ODE tolerances (rtol = atol) swept over nll_tolerances (the first is the reported one).
    tables.nll_points = 128
    tables.nll_probes = 3
    tables.nll_tolerances = (1e-4, 1e-3)
    # The digits stage (score_sde/tables_digits.py): Table 2 (bits/dim) and a digits-FD column on the embedded
    # 8x8 digits, uniformly dequantised, with residual MLPs (models/mlp.py) trained by run_lib.train.
    tables.which += ('digits',)
    tables.digits_sdes = ('vesde', 'vpsde', 'subvpsde')
    tables.digits_train_steps = 1500
    tables.digits_batch_size = 128
    tables.digits_width = 256
    tables.digits_blocks = 2
    tables.digits_lr = 1e-3
    # Bits/dim on the first digits_nll_points test digits, digits_nll_probes Rademacher probes, ODE tolerances
    # (rtol = atol; the first is reported, the others measure the solver error).
    tables.digits_nll_points = 297
    tables.digits_nll_probes = 3
    tables.digits_nll_tolerances = (1e-4, 1e-3)
    # digits-FD of digits_num_samples samples of the λ = std² models per sampler, against the 297 test digits.
    tables.digits_predictors = ('reverse_diffusion', 'probability_flow')
    tables.digits_samplers = ('P100', 'PC100')
    tables.digits_num_samples = 297
    tables.digits_bootstrap = 200
    # Folder of evaluated released checkpoints (<eval_root>/<checkpoint>/eval_*/summary.json); '' for none.
    tables.eval_root = ''
    return config
