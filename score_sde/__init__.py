"""Supporting code of score_sde: data, evaluation, checkpoints, controllable generation,
analytic test distributions, device parallelism and reporting.

Importing the package adds this project's XLA settings to ``$XLA_FLAGS`` (``score_sde/xla_defaults.py``): it
must happen before JAX's backend starts, and every entry point imports ``score_sde`` first.
"""
from score_sde import xla_defaults as _xla_defaults

_xla_defaults.apply()
