"""Forward and forward+backward time of the score networks, beside the anchors' figures.

Models (batch 8 of 32×32×3, float32, CPU):

* ``ddpmpp`` — the benchmark DDPM++: ``configs/vp/cifar10_ddpmpp_continuous.py`` with
  ``nf=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,)`` (1,754,147 parameters),
  VPSDE(0.1, 20, 1000). Anchors (``docs/performance.md``, min / median seconds): the original JAX
  code and its PyTorch port on this kind of 2-core CPU.
* ``ncsnpp`` — a small NCSN++ VE: ``configs/ve/cifar10_ncsnpp_continuous.py`` (FIR resampling,
  Fourier embedding, residual input pyramid) shrunk the same way; VESDE(0.01, 50). No anchor.

Times are min / median over repeated runs after compilation. ``fwd`` is ``model.apply`` with
``train=False``; ``fwd_bwd`` is the value and gradient of the continuous DSM loss
(``losses.get_sde_loss_fn``, ``train=True``, ``reduce_mean=False``, no likelihood weighting), as the
original's ``perf_ref.py`` times it. The PyTorch anchor for training is a whole step (forward,
backward, Adam and EMA), so ours is compared against more work there, not less.

Usage (repository root): ``python benchmarks/models.py [--quick] [--models ddpmpp,ncsnpp]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import losses  # noqa: E402
import sde_lib  # noqa: E402
from configs.ve import cifar10_ncsnpp_continuous  # noqa: E402
from benchmarks.common import BENCHMARK_DDPMPP_PARAMS, benchmark_config, print_backend, shrink  # noqa: E402
from models import utils as mutils  # noqa: E402

BATCH = 8
# (min, median) seconds: the anchors of docs/performance.md (first table).
ANCHORS = {
    ("ddpmpp", "fwd"): {"original_jax": (0.096, 0.100), "pytorch": (0.059, 0.061)},
    ("ddpmpp", "fwd_bwd"): {"original_jax": (0.331, 0.404), "pytorch_full_step": (0.253, 0.296)},
}


def build(name: str):
    """(config, model, params, sde, time conditioning for the forward pass) of a benchmark model."""
    if name == "ddpmpp":
        config = benchmark_config()
        sde = sde_lib.VPSDE(0.1, 20.0, 1000)
        cond = jnp.full((BATCH,), 500.0)  # 999·t
    elif name == "ncsnpp":
        config = shrink(cifar10_ncsnpp_continuous.get_config())
        sde = sde_lib.VESDE(0.01, 50.0, 1000)
        cond = jnp.full((BATCH,), 1.0)  # σ
    else:
        raise ValueError(f"unknown benchmark model {name!r}; choose ddpmpp or ncsnpp.")
    model = mutils.get_model(config.model.name)(config=config)
    x = jax.random.normal(jax.random.PRNGKey(0), (BATCH, 32, 32, 3))
    variables = model.init({"params": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)}, x, cond,
                           train=False)
    return config, model, variables["params"], sde, x, cond


def timeit(fn, reps: int) -> tuple[float, float]:
    """(min, median) seconds of ``fn()`` over ``reps`` runs after one warm-up (compilation) run."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times), float(np.median(times))


def report(model_name: str, what: str, ours: tuple[float, float]) -> None:
    line = f"{model_name:7s} {what:8s} ours {ours[0]:.4f} / {ours[1]:.4f} s"
    for who, (lo, med) in ANCHORS.get((model_name, what), {}).items():
        line += f" | {who} {lo:.3f} / {med:.3f} s, ratio ours/{who} {ours[0] / lo:.2f} / {ours[1] / med:.2f}"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--models", default="ddpmpp,ncsnpp", help="comma-separated: ddpmpp, ncsnpp")
    args = parser.parse_args()
    reps = 5 if args.quick else 20
    print_backend()

    for name in args.models.split(","):
        config, model, params, sde, x, cond = build(name)
        num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
        print(f"{name:7s} params {num_params:,}", flush=True)
        if name == "ddpmpp" and num_params != BENCHMARK_DDPMPP_PARAMS:
            raise RuntimeError(f"benchmark DDPM++ has {num_params:,} parameters, expected "
                               f"{BENCHMARK_DDPMPP_PARAMS:,}: configs/vp/cifar10_ddpmpp_continuous.py changed?")

        forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False))
        report(name, "fwd", timeit(lambda: forward(params, x, cond), reps))

        loss_fn = losses.get_sde_loss_fn(sde, model, train=True, reduce_mean=False, continuous=True,
                                         likelihood_weighting=False)
        value_and_grad = jax.jit(jax.value_and_grad(lambda p, rng, batch: loss_fn(rng, p, {}, {"image": batch})[0]))
        report(name, "fwd_bwd", timeit(lambda: value_and_grad(params, jax.random.PRNGKey(3), x), reps))


if __name__ == "__main__":
    main()
