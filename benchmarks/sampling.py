"""Seconds per score evaluation of every sampler (PC, probability-flow ODE, the fast samplers) on the benchmark DDPM++.

Model ``--config`` (``benchmarks/common.py``; default the benchmark DDPM++: ``configs/vp/cifar10_ddpmpp_continuous.py``
with ``nf=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,)``; ``vp/cifar10_ddpmpp_continuous`` the full
one); ``--batch`` images (default 8) of the config's size; the config's SDE (VPSDE(0.1, 20) for these); initial
weights from PRNGKey(1), as the original code was timed for ``docs/performance.md``. The first line printed is the
default backend (``backend platform=...``).

Printed (one line per figure; every timing excludes compilation and is the minimum over repeats, in
wall seconds and in CPU seconds of this process, the steadier figure on a shared machine):

* ``score_eval`` — one jitted score evaluation (the floor any sampler pays per evaluation);
* ``pc_N<N>`` — :func:`sampling.get_pc_sampler` with reverse diffusion + Langevin (snr 0.16,
  one corrector step), total seconds, NFE = 2N (one predictor and one corrector evaluation per
  step), seconds per step and per evaluation, and the ratio of the latter to ``score_eval`` (goal ≤ 1.05×;
  the original: 0.115 s per evaluation on this CPU);
* ``ode_<solver>`` — :func:`sampling.get_ode_sampler` (RK45 pair, no denoising) with the JAX
  solver (one compiled program) and scipy's ``solve_ivp`` (host loop): NFE and seconds per NFE;
* ``fast_<name>`` — each setting of :data:`FAST_SAMPLERS` through
  :func:`fast_sampling.get_fast_sampler` (the model-level sampler ``--mode sample`` and evaluation
  run): the NFE it reports and seconds per evaluation beside ``score_eval`` measured again right
  after it (goal ≤ 1.05×; with ``--record`` also with the reverse-process recording ``--mode sample``
  uses for its GIF).

Usage (repository root): ``python benchmarks/sampling.py [--config benchmark] [--batch 8] [--n 100]
[--rtol 1e-3 --atol 1e-3] [--reps 3] [--skip_pc] [--skip_ode] [--skip_fast] [--fast ddim,heun] [--record]
[--out results.json]``; ``--out`` writes every figure as JSON (``results``: one entry per line printed).
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

import fast_sampling  # noqa: E402
import sampling  # noqa: E402
import sde_lib  # noqa: E402
from benchmarks import common  # noqa: E402
from models import utils as mutils  # noqa: E402
from score_sde import parallel  # noqa: E402

ORIGINAL_PC_PER_EVAL = 0.115
# Name, method, config.sampling options: each sampler at the NFE it is typically run with (10-50).
FAST_SAMPLERS = (
    ("ddim_eta0", "ddim", {"steps": 20}),
    ("ddim_eta1", "ddim", {"steps": 20, "eta": 1.0}),
    ("heun", "heun", {"steps": 10}),
    ("heun_churn", "heun", {"steps": 10, "churn": 10.0}),
    ("dpm_solver1", "dpm_solver", {"steps": 20, "order": 1}),
    ("dpm_solver2", "dpm_solver", {"steps": 10, "order": 2}),
    ("dpm_solver3", "dpm_solver", {"steps": 7, "order": 3}),
    ("dpm_solver_pp", "dpm_solver_pp", {"steps": 20}),
    ("adaptive_sde", "adaptive_sde", {}),
)
GOAL = 1.05  # seconds per score evaluation inside a sampler / one score evaluation alone


def timed(fn, reps: int):
    """Minimum wall and CPU (process) seconds of ``reps`` calls after one warm-up call (compilation),
    and the last call's result.

    CPU seconds are less disturbed than wall seconds when other processes share the cores.
    """
    out = jax.block_until_ready(fn())
    walls, cpus = [], []
    for _ in range(reps):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(fn())
        walls.append(time.perf_counter() - wall0)
        cpus.append(time.process_time() - cpu0)
    return (min(walls), min(cpus)), out


def report(results: dict, name: str, wall: float, cpu: float, nfe: int, floor: tuple[float, float], extra: str = "",
           **fields) -> None:
    """One line: totals, NFE, seconds per evaluation and their ratio to one score evaluation (wall, CPU); the same
    figures (and ``fields``) into ``results[name]``."""
    nfe = int(nfe)
    print(f"{name} total {wall:.2f} s nfe {nfe} per_eval {wall / nfe:.4f} s ratio_to_score_eval "
          f"{wall / nfe / floor[0]:.3f} | cpu per_eval {cpu / nfe:.4f} s ratio {cpu / nfe / floor[1]:.3f}{extra}",
          flush=True)
    results[name] = {"total_s": wall, "nfe": nfe, "per_eval_s": wall / nfe,
                     "ratio_to_score_eval": wall / nfe / floor[0], "cpu_per_eval_s": cpu / nfe,
                     "cpu_ratio_to_score_eval": cpu / nfe / floor[1], "score_eval_s": floor[0], **fields}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_arguments(parser)
    parser.add_argument("--n", type=int, default=100, help="PC sampler steps N")
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--atol", type=float, default=1e-3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip_pc", action="store_true")
    parser.add_argument("--skip_ode", action="store_true")
    parser.add_argument("--skip_fast", action="store_true")
    parser.add_argument("--fast", default="", help="comma-separated names of FAST_SAMPLERS to run (default all)")
    parser.add_argument("--record", action="store_true",
                        help="also time each fast sampler recording its path (16 frames of 16 images)")
    args = parser.parse_args(argv)
    backend = common.print_backend()

    config = common.load_config(args.config)
    n_dev = parallel.local_device_count()
    if args.batch % n_dev:
        raise ValueError(f"--batch {args.batch} is not divisible by the {n_dev} local devices.")
    model, params = common.init_params(config)
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    shape = mutils.model_input_shape(config, args.batch // n_dev)  # per device, as the samplers take it
    print(f"config {args.config} | params {num_params:,} | batch {shape[0] * n_dev} of {shape[1:]}", flush=True)
    x = jax.random.normal(jax.random.PRNGKey(0), shape)

    sde, eps = sde_lib.get_sde(config)
    # The parameters are an argument, not a constant baked into the program (hundreds of MB at full size).
    one_eval_fn = jax.jit(lambda p, x, t: mutils.get_score_fn(sde, model, p, {}, train=False, continuous=True)(x, t))
    t_half = jnp.full((shape[0],), 0.5)
    one_eval = lambda: one_eval_fn(params, x, t_half)  # noqa: E731
    floor, _ = timed(one_eval, max(5, 3 * args.reps))
    print(f"score_eval wall {floor[0]:.4f} s cpu {floor[1]:.4f} s", flush=True)
    results = {"score_eval": {"wall_s": floor[0], "cpu_s": floor[1]}}

    state = mutils.State(step=0, params=params, opt_state={}, lr=0.0, model_state={}, ema_rate=0.0,
                         params_ema=params, rng=jax.random.PRNGKey(0))
    pstate = parallel.replicate(state)
    prng = jnp.asarray([jax.random.PRNGKey(4)] * n_dev)

    if not args.skip_pc:
        config_n = config.copy_and_resolve_references()
        config_n.model.num_scales = args.n
        sde_n, _ = sde_lib.get_sde(config_n)
        pc = sampling.get_pc_sampler(sde_n, model, shape, sampling.get_predictor("reverse_diffusion"),
                                     sampling.get_corrector("langevin"), lambda v: v, 0.16, n_steps=1,
                                     probability_flow=False, continuous=True, denoise=True, eps=eps)
        (wall, cpu), (_, nfe) = timed(lambda: pc(prng, pstate), args.reps)
        report(results, f"pc_N{args.n}", wall, cpu, nfe, floor,
               f" per_step {wall / args.n:.4f} s (goal <= {GOAL}; original per_eval {ORIGINAL_PC_PER_EVAL} s on CPU)",
               steps=args.n, per_step_s=wall / args.n)

    if not args.skip_fast:
        chosen = set(filter(None, args.fast.split(",")))
        for name, method, options in FAST_SAMPLERS:
            if chosen and name not in chosen:
                continue
            config.sampling.method = method
            for field, value in options.items():
                setattr(config.sampling, field, value)
            variants = [("", None)] + ([("_recorded", fast_sampling.Recording(frames=16, first=16))]
                                       if args.record else [])
            for suffix, record in variants:
                fast = fast_sampling.get_fast_sampler(config, sde, model, shape, lambda v: v, eps, record=record)
                (wall, cpu), out = timed(lambda: fast(prng, pstate)[:2], args.reps)
                # The floor again, right after: on a shared machine the load drifts between samplers.
                floor_here, _ = timed(one_eval, max(5, 3 * args.reps))
                report(results, f"fast_{name}{suffix}", wall, cpu, out[1], floor_here,
                       f" (goal <= {GOAL}; score_eval now wall {floor_here[0]:.4f} s cpu {floor_here[1]:.4f} s)")
            for field in options:
                setattr(config.sampling, field, None)

    if not args.skip_ode:
        for solver in ("jax", "scipy"):
            ode = sampling.get_ode_sampler(sde, model, shape, lambda v: v, denoise=False, rtol=args.rtol,
                                           atol=args.atol, method="RK45", eps=eps, solver=solver)
            (wall, cpu), (_, nfe) = timed(lambda: ode(prng, pstate), args.reps)
            report(results, f"ode_{solver}_rtol{args.rtol:g}_atol{args.atol:g}", wall, cpu, nfe, floor)

    settings = {"config": args.config, "batch": args.batch, "params": num_params, "n": args.n, "reps": args.reps,
                "rtol": args.rtol, "atol": args.atol}
    common.write_json(args.out, "sampling", backend, settings, results)


if __name__ == "__main__":
    main()
