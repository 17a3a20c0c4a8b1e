"""Bits/dim of one batch of the benchmark DDPM++ with each ODE solver: NFE, seconds per NFE, and the floor.

The floor is one jitted evaluation of the probability-flow drift plus its Hutchinson divergence
(one ``jax.jvp`` of the score network, as the likelihood computes it), the least any solver can
spend per NFE. The VJP formulation of the same estimate (the original's, whose floor
``docs/performance.md`` quotes) is timed beside it. Model ``--config`` (``benchmarks/common.py``; default the
benchmark DDPM++: ``configs/vp/cifar10_ddpmpp_continuous.py`` with ``nf=32, ch_mult=(1, 2, 2), num_res_blocks=2,
attn_resolutions=(16,)``; ``vp/cifar10_ddpmpp_continuous`` the full one); ``--batch`` images (default 8) of the
config's size; the config's SDE (VPSDE(0.1, 20, 1000) for these); initial weights from PRNGKey(1) (as the original
was timed), optionally perturbed by ``--perturb`` × N(0, 1) on every leaf; data ``0.5 · N(0, 1)``; identity inverse
scaler. The first line printed is the default backend (``backend platform=...``).

Solvers timed:
* ``scipy`` — :func:`likelihood.get_likelihood_fn` with ``solver='scipy'`` (RK45, the original's
  host loop, our single-JVP right-hand side);
* ``jax`` — the same with the whole solve compiled into one pmapped program (``solver='jax'``, default dop853
  with the max error norm; what ``--mode eval`` runs); ``jax_dopri5`` the same with the original's RK45 pair and
  RMS norm.

Each is timed on a second run; the first, which compiles, is reported apart.

Usage (repository root): ``python benchmarks/likelihood.py [--config benchmark] [--batch 8] [--rtol 1e-3 --atol 1e-3]
[--solvers scipy,jax] [--out results.json]``. Prints ``name value`` lines; ``--out`` writes them as JSON.
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
from benchmarks import common  # noqa: E402
from models import utils as mutils  # noqa: E402
from score_sde import parallel  # noqa: E402


def build(config, batch: int, perturb: float):
    """``(model, params, x)``: the timed weights (perturbed by ``perturb`` × N(0, 1)) and ``batch`` normal images."""
    model, params = common.init_params(config)
    if perturb:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(11), len(leaves))
        params = treedef.unflatten([p + perturb * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])
    return model, params, jax.random.normal(jax.random.PRNGKey(0), mutils.model_input_shape(config, batch))


def timed(fn) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call (CPU time is less disturbed by other processes
    on a shared machine: it counts this process's work on all its threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_arguments(parser)
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--atol", type=float, default=1e-3)
    parser.add_argument("--solvers", default="scipy,jax", help="comma-separated: scipy, jax, jax_dopri5")
    parser.add_argument("--perturb", type=float, default=0.0, help="std of Gaussian noise added to every weight")
    parser.add_argument("--floor_reps", type=int, default=10)
    args = parser.parse_args(argv)
    backend = common.print_backend()

    config = common.load_config(args.config)
    sde, _ = sde_lib.get_sde(config)
    model, params, x = build(config, args.batch, args.perturb)
    data = x * 0.5
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    print(f"config {args.config} | params {num_params:,} | batch {data.shape[0]} of {data.shape[1:]}", flush=True)

    # The parameters are an argument of every compiled program, not a constant baked into it.
    def score_of(p):
        return mutils.get_score_fn(sde, model, p, {}, train=False, continuous=True)

    def drift_of(p):
        return lambda y, t: sde.reverse(score_of(p), probability_flow=True).sde(y, t)[0]

    # Floor: one jitted drift + Hutchinson divergence, as the likelihood computes it (a single jvp).
    drift_div = jax.jit(lambda p, y, t, v: likelihood.get_drift_div_fn(drift_of(p), "Rademacher")(y, t, v))
    probe = likelihood.sample_probe(jax.random.PRNGKey(5), data.shape, "Rademacher")
    t_half = jnp.full((args.batch,), 0.5)

    def vjp_drift_div(p, y, t):  # the same estimate through a VJP, the original's formulation
        out, vjp_fn = jax.vjp(lambda z: drift_of(p)(z, t), y)
        return out, jnp.sum(vjp_fn(probe)[0] * probe, axis=(1, 2, 3))

    vjp_floor_fn = jax.jit(vjp_drift_div)
    floor_compile, _ = timed(lambda: drift_div(params, data, t_half, probe))
    timed(lambda: vjp_floor_fn(params, data, t_half))
    jvp_times, vjp_times = [], []
    for _ in range(args.floor_reps):  # interleaved, so that load changes hit both alike
        jvp_times.append(timed(lambda: drift_div(params, data, t_half, probe)))
        vjp_times.append(timed(lambda: vjp_floor_fn(params, data, t_half)))
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
    results = {"floor_drift_div": {"min_s": float(jvp_times[:, 0].min()), "median_s": float(floor),
                                   "cpu_median_s": float(floor_cpu), "first_call_s": floor_compile},
               "floor_drift_div_vjp": {"min_s": float(vjp_times[:, 0].min()),
                                       "median_s": float(np.median(vjp_times[:, 0]))}}

    state = mutils.State(step=0, params=params, opt_state={}, lr=0.0, model_state={}, ema_rate=0.0,
                         params_ema=params, rng=jax.random.PRNGKey(0))
    pstate = parallel.replicate(state)
    prng = jnp.asarray([jax.random.PRNGKey(6)] * parallel.local_device_count())
    pdata = parallel.shard(data)
    tol = f"rtol {args.rtol:g} atol {args.atol:g}"

    solvers = {"scipy": ("scipy", None), "jax": ("jax", None), "jax_dopri5": ("jax", "dopri5")}
    for name in args.solvers.split(","):
        if name not in solvers:
            raise ValueError(f"--solvers: unknown {name!r}; choose from {', '.join(solvers)}.")
        solver, method = solvers[name]
        lf = likelihood.get_likelihood_fn(sde, model, lambda v: v, rtol=args.rtol, atol=args.atol, method=method,
                                          solver=solver)
        box = {}

        def run():
            box["out"] = lf(prng, pstate, pdata)
            return box["out"][0]

        first_wall, first_cpu = timed(run)  # includes compiling the pmapped solve (jax) or drift + div (scipy)
        print(f"{name} first run incl. compile: wall {first_wall:.2f} s cpu {first_cpu:.2f} s", flush=True)
        wall, cpu = timed(run)
        bpd, _, nfe = box["out"]
        label = f"{name}_{method or ('RK45' if solver == 'scipy' else 'dop853')}"
        results[label] = report(label, tol, wall, cpu, nfe, floor, floor_cpu, "second run", bpd)
        results[label]["first_run_s"] = first_wall

    settings = {"config": args.config, "batch": args.batch, "params": num_params, "rtol": args.rtol,
                "atol": args.atol, "perturb": args.perturb}
    common.write_json(args.out, "likelihood", backend, settings, results)


def report(name, tol, wall, cpu, nfe, floor, floor_cpu, note, bpd) -> dict:
    """Print one solver's line; return its figures."""
    print(f"{name} {tol} total {wall:.2f} s ({note}) nfe {nfe} per_nfe {wall / nfe:.4f} s "
          f"ratio_to_floor {wall / nfe / floor:.3f} | cpu per_nfe {cpu / nfe:.4f} s ratio_to_floor_cpu "
          f"{cpu / nfe / floor_cpu:.3f} | bpd_mean {float(jnp.mean(bpd)):.6f}", flush=True)
    return {"total_s": wall, "nfe": int(nfe), "per_nfe_s": wall / nfe, "ratio_to_floor": wall / nfe / floor,
            "cpu_per_nfe_s": cpu / nfe, "bpd_mean": float(jnp.mean(bpd))}


if __name__ == "__main__":
    main()
