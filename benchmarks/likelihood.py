"""Bits/dim of one batch of the benchmark DDPM++ with each ODE solver: NFE, seconds per NFE, and the floor.

The floor is one jitted evaluation of the probability-flow drift plus its Hutchinson divergence
(one ``jax.jvp`` of the score network, as the likelihood computes it), the least any solver can
spend per NFE. The VJP formulation of the same estimate (the original's, whose floor
``docs/performance.md`` quotes) is timed beside it. Benchmark model:
``configs/vp/cifar10_ddpmpp_continuous.py`` with ``nf=32, ch_mult=(1, 2, 2), num_res_blocks=2,
attn_resolutions=(16,)``; batch 8 of 32×32×3; VPSDE(0.1, 20, 1000); initial weights from
PRNGKey(1) (as the original was timed), optionally perturbed by ``--perturb`` × N(0, 1) on every
leaf; data ``0.5 · N(0, 1)``; identity inverse scaler.

Solvers timed:
* ``scipy`` — :func:`likelihood.get_likelihood_fn` with ``solver='scipy'`` (RK45, the original's
  host loop, our single-JVP right-hand side); timed on a second run (the first compiles).
* ``jax`` — the whole solve compiled into one program (``solver='jax'``, default dop853 with the
  max error norm), compiled ahead of time so that compilation is reported apart from the run;
  ``jax_dopri5`` the same with the original's RK45 pair and RMS norm.

Usage (repository root): ``python benchmarks/likelihood.py [--rtol 1e-3 --atol 1e-3] [--solvers scipy,jax]``.
Prints ``name value`` lines.
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

import likelihood  # noqa: E402
import sde_lib  # noqa: E402
from benchmarks.common import benchmark_config  # noqa: E402
from models import utils as mutils  # noqa: E402
from score_sde import parallel  # noqa: E402

BATCH = 8


def build(perturb: float):
    config = benchmark_config()
    model = mutils.create_model(config)
    x = jax.random.normal(jax.random.PRNGKey(0), (BATCH, 32, 32, 3))
    variables = model.init({"params": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)}, x,
                           jnp.zeros((BATCH,)), train=False)
    params = variables["params"]
    if perturb:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(11), len(leaves))
        params = treedef.unflatten([p + perturb * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])
    return model, params, x


def timed(fn) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call (CPU time is less disturbed by other processes
    on a shared machine: it counts this process's work on all its threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--atol", type=float, default=1e-3)
    parser.add_argument("--solvers", default="scipy,jax", help="comma-separated: scipy, jax, jax_dopri5")
    parser.add_argument("--perturb", type=float, default=0.0, help="std of Gaussian noise added to every weight")
    parser.add_argument("--floor_reps", type=int, default=10)
    args = parser.parse_args()

    sde = sde_lib.VPSDE(0.1, 20.0, 1000)
    model, params, x = build(args.perturb)
    data = x * 0.5
    print(f"params {sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))}", flush=True)
    score_fn = mutils.get_score_fn(sde, model, params, {}, train=False, continuous=True)

    # Floor: one jitted drift + Hutchinson divergence, as the likelihood computes it (a single jvp).
    drift = lambda y, t: sde.reverse(score_fn, probability_flow=True).sde(y, t)[0]
    drift_div = jax.jit(likelihood.get_drift_div_fn(drift, "Rademacher"))
    probe = likelihood.sample_probe(jax.random.PRNGKey(5), data.shape, "Rademacher")
    t_half = jnp.full((BATCH,), 0.5)

    def vjp_drift_div(y, t):  # the same estimate through a VJP, the original's formulation
        out, vjp_fn = jax.vjp(lambda z: drift(z, t), y)
        return out, jnp.sum(vjp_fn(probe)[0] * probe, axis=(1, 2, 3))

    vjp_floor_fn = jax.jit(vjp_drift_div)
    floor_compile, _ = timed(lambda: drift_div(data, t_half, probe))
    timed(lambda: vjp_floor_fn(data, t_half))
    jvp_times, vjp_times = [], []
    for _ in range(args.floor_reps):  # interleaved, so that load changes hit both alike
        jvp_times.append(timed(lambda: drift_div(data, t_half, probe)))
        vjp_times.append(timed(lambda: vjp_floor_fn(data, t_half)))
    jvp_times, vjp_times = np.asarray(jvp_times), np.asarray(vjp_times)
    # Ratios below are against the floor's medians: a solve is one long run whose per-NFE time is an
    # average over the machine's load, which a median matches better than a lucky minimum.
    floor, floor_cpu = np.median(jvp_times, axis=0)
    print(f"floor_drift_div (jvp, ours) wall min {jvp_times[:, 0].min():.4f} median {floor:.4f} s, "
          f"cpu min {jvp_times[:, 1].min():.4f} median {floor_cpu:.4f} s (first call incl. compile "
          f"{floor_compile:.2f} s)", flush=True)
    print(f"floor_drift_div_vjp (the original's formulation) wall min {vjp_times[:, 0].min():.4f} median "
          f"{np.median(vjp_times[:, 0]):.4f} s, cpu min {vjp_times[:, 1].min():.4f} median "
          f"{np.median(vjp_times[:, 1]):.4f} s", flush=True)

    state = mutils.State(step=0, params=params, opt_state={}, lr=0.0, model_state={}, ema_rate=0.0,
                         params_ema=params, rng=jax.random.PRNGKey(0))
    pstate = parallel.replicate(state)
    prng = jnp.asarray([jax.random.PRNGKey(6)] * parallel.local_device_count())
    pdata = parallel.shard(data)
    tol = f"rtol {args.rtol:g} atol {args.atol:g}"

    for solver in args.solvers.split(","):
        if solver == "scipy":
            lf = likelihood.get_likelihood_fn(sde, model, lambda v: v, rtol=args.rtol, atol=args.atol, solver="scipy")
            for attempt in ("first", "second"):  # the first run includes compiling the pmapped drift + div
                box = {}

                def run():
                    box["out"] = lf(prng, pstate, pdata)
                    return box["out"][0]

                wall, cpu = timed(run)
                if attempt == "first":
                    print(f"scipy_RK45 first run incl. compile: wall {wall:.2f} s cpu {cpu:.2f} s", flush=True)
            bpd, _, nfe = box["out"]
            note = "second run"
            report("scipy_RK45", tol, wall, cpu, nfe, floor, floor_cpu, note, bpd)
            continue
        method = {"jax": None, "jax_dopri5": "dopri5"}.get(solver, "unknown")
        if method == "unknown":
            raise ValueError(f"--solvers: unknown {solver!r}; choose from scipy, jax, jax_dopri5.")
        lf = likelihood.get_likelihood_fn_from_score(sde, score_fn, rtol=args.rtol, atol=args.atol, method=method,
                                                     solver="jax")
        start = time.perf_counter()
        compiled = jax.jit(lf).lower(jax.random.PRNGKey(6), data).compile()
        compile_s = time.perf_counter() - start
        box = {}

        def run():
            box["out"] = compiled(jax.random.PRNGKey(6), data)
            return box["out"][0]

        wall, cpu = timed(run)
        bpd, _, nfe = box["out"]
        report(f"{solver}_{method or 'dop853'}", tol, wall, cpu, int(nfe), floor, floor_cpu,
               f"compile {compile_s:.1f} s apart", bpd)


def report(name, tol, wall, cpu, nfe, floor, floor_cpu, note, bpd) -> None:
    print(f"{name} {tol} total {wall:.2f} s ({note}) nfe {nfe} per_nfe {wall / nfe:.4f} s "
          f"ratio_to_floor {wall / nfe / floor:.3f} | cpu per_nfe {cpu / nfe:.4f} s ratio_to_floor_cpu "
          f"{cpu / nfe / floor_cpu:.3f} | bpd_mean {float(jnp.mean(bpd)):.6f}", flush=True)


if __name__ == "__main__":
    main()
