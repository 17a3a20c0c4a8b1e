"""Variance of the importance-weighted vs the plain likelihood-weighted loss on the toy score network of
``tests/test_importance_weighting.py`` (``_toy_model``; data ``0.3 + 0.5 N(0, 1)`` of its ``SHAPE``), VP and sub-VP.

The importance-weighted loss is multiplied by ``Z / (T - eps)`` so that both have the same expectation
(see ``losses.get_sde_loss_fn``). Prints, per SDE: Z, both means with their standard errors, and
Var(plain) / Var(importance). Usage (repository root): ``python scripts/score_flow_varratio_toy.py [--keys 4000]``.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import losses  # noqa: E402
from tests.helpers import make_sde  # noqa: E402
from tests.test_importance_weighting import EPS, SHAPE, _toy_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=4000)
    args = parser.parse_args()
    model, params = _toy_model()
    data = 0.3 + 0.5 * jax.random.normal(jax.random.PRNGKey(5), SHAPE)
    keys = jax.random.split(jax.random.PRNGKey(7), args.keys)
    for name in ("vpsde", "subvpsde"):
        sde = make_sde(name)
        z = float(sde.likelihood_importance_cum_weight(sde.T, eps=EPS))
        values = {}
        for importance in (True, False):
            loss_fn = losses.get_sde_loss_fn(sde, model, train=False, reduce_mean=False, likelihood_weighting=True,
                                             eps=EPS, importance_weighting=importance)
            draw = jax.jit(jax.vmap(lambda k: loss_fn(k, params, {}, {"image": data})[0]))
            values[importance] = np.asarray(draw(keys), np.float64) * (z / (sde.T - EPS) if importance else 1.0)
        se = {k: v.std(ddof=1) / np.sqrt(v.size) for k, v in values.items()}
        print(f"{name}: Z {z:.4f}, importance-weighted mean {values[True].mean():.3f} ± {se[True]:.3f}, "
              f"plain mean {values[False].mean():.3f} ± {se[False]:.3f}, "
              f"Var(plain) / Var(importance) {values[False].var(ddof=1) / values[True].var(ddof=1):.1f}")


if __name__ == "__main__":
    main()
