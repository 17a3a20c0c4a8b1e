"""Supporting code of score_sde: data, evaluation, checkpoints, controllable generation,
analytic test distributions, device parallelism and reporting."""
