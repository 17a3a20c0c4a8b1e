"""The quick run of ``--mode tables`` (CI, a few minutes on 2 CPU cores): the full grid at a tenth of the steps.

    python main.py --mode tables --config configs/tables/quick.py --workdir /tmp/tables_quick
"""
from configs.tables import cpu


def get_config():
    """``cpu.py`` with P100 / P200 / C200 / PC100, 3 seeds of 500 samples, 64 likelihood points."""
    config = cpu.get_config()
    tables = config.tables
    tables.samplers = ('P100', 'P200', 'C200', 'PC100')
    tables.seeds = 3
    tables.num_samples = 500
    tables.projections = 128
    tables.mmd_points = 500
    tables.likelihood_points = 64
    return config
