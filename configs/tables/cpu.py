"""The full CPU run of ``--mode tables`` (see docs/tables.md): the paper's sampler grid at its step counts.

    python main.py --mode tables --config configs/tables/cpu.py --workdir results/tables

Built on the CIFAR-10 defaults, so that ``config.model`` holds the SDEs of the paper's CIFAR-10 runs
(σ ∈ [0.01, 50], β ∈ [0.1, 20]) and ``main.py``'s config checks apply unchanged; the job reads only
``config.tables``, ``config.model``'s SDE parameters and ``config.seed``.
"""
import ml_collections

from configs.default_cifar10_configs import get_default_configs


def get_config():
    """Table 1's grid (P1000, P2000, C2000, PC1000) on 2-D and 16-D mixtures, 5 seeds; Table 2's method."""
    config = get_default_configs()
    # Not read by the job (each cell sets its own SDE and sampler); named so that the config passes
    # main.py's checks like every file under configs/.
    config.training.sde = 'vpsde'
    config.model.name = 'ncsnpp'
    config.sampling.method = 'pc'
    config.sampling.predictor = 'reverse_diffusion'
    config.sampling.corrector = 'langevin'

    tables = config.tables = ml_collections.ConfigDict()
    tables.which = ('sampler', 'likelihood', 'paper')
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
    # Folder of evaluated released checkpoints (<eval_root>/<checkpoint>/eval_*/summary.json); '' for none.
    tables.eval_root = ''
    return config
