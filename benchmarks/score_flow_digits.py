"""Likelihood training at toy scale: digits with and without score_flow's likelihood weighting + importance sampling.

Three runs of ``configs/vp/digits.py`` that differ only in the loss weighting:

* ``plain``: the default weighting (``λ(t) = std(t)²``, uniform time);
* ``lw``: likelihood weighting (``λ(t) = g(t)²``, uniform time), ``training.likelihood_weighting``;
* ``lw_is``: likelihood weighting with importance-sampled time (``training.importance_weighting``).

All with uniformly dequantised training data (the bits/dim are of dequantised data), ``smallest_time``
1e-5, ``--steps`` steps, no snapshot sampling, and the model at a quarter of the digits DDPM++'s width
(``model.nf = 16``, 0.26M parameters) to keep the CPU time small.

Then, on ``params_ema`` of the final (or newest) checkpoint, ``--passes`` passes over the 297 held-out digits with
fresh dequantisation noise: test bits/dim through the probability-flow ODE and the likelihood bound
(``--bound_times`` Monte-Carlo times per example) on the same dequantised digits, each with its standard
error over the per-example values. These are the functions and the data of ``--mode eval`` with
``eval.enable_bpd`` and ``eval.enable_bound`` (pass ``p`` holds the dequantised digits of its bits/dim
round ``p`` with ``eval.batch_size = 297``), called directly because ``--mode eval`` always makes 5
passes, more than the CPU time this was measured with allowed. The ODE is scipy's RK45 at ``rtol = atol = 1e-3``
(``sampling.ode_*``; the default 1e-5 costs several times the NFE, and the JAX solver's compilation
costs more CPU than one pass).

Usage (repository root)::

    python benchmarks/score_flow_digits.py --stage train --out runs/score_flow_digits [--steps 600]
    python benchmarks/score_flow_digits.py --stage eval --out runs/score_flow_digits [--bound_times 20 --passes 1]
    python benchmarks/score_flow_digits.py --stage varratio --out runs/score_flow_digits --runs lw_is [--keys 200]

``train`` resumes an interrupted run (checkpoints); ``eval`` writes ``<out>/results_<run>.json``. Only the
runs listed with ``--runs`` (comma-separated).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RUNS = {
    "plain": {"training.likelihood_weighting": False, "training.importance_weighting": False},
    "lw": {"training.likelihood_weighting": True, "training.importance_weighting": False},
    "lw_is": {"training.likelihood_weighting": True, "training.importance_weighting": True},
}


def run_config(name: str, steps: int, bound_times: int):
    """``configs/vp/digits.py`` with the overrides of run ``name``; one numbered checkpoint at the end."""
    from configs.vp import digits

    config = digits.get_config()
    overrides = {
        "training.n_iters": steps, "training.snapshot_freq": steps, "training.snapshot_freq_for_preemption": 100,
        "training.eval_freq": 100000, "training.snapshot_sampling": False, "training.smallest_time": 1e-5,
        "data.uniform_dequantization": True, "model.nf": 16, "sampling.ode_rtol": 1e-3, "sampling.ode_atol": 1e-3,
        "sampling.ode_solver": "scipy",
        "eval.begin_ckpt": 1, "eval.end_ckpt": 1, "eval.enable_loss": False, "eval.enable_bpd": True,
        "eval.enable_bound": True, "eval.bound_num_times": bound_times, "eval.bpd_dataset": "test",
        "eval.batch_size": 297,  # the whole test split per round: 5 rounds
        "training.n_jitted_steps": 5,  # the digits default when results/score_flow_digits was made
        **RUNS[name]}
    for key, value in overrides.items():
        section, field = key.split(".")
        setattr(config[section], field, value)
    return config, overrides


def newest_checkpoint(workdir: str) -> str:
    """``checkpoints/checkpoint_1`` (the end of the run), else the newest preemption checkpoint (a cut run)."""
    from score_sde import checkpoints

    final = os.path.join(workdir, "checkpoints", "checkpoint_1")
    return final if os.path.exists(final) else checkpoints.latest_checkpoint(os.path.join(workdir, "checkpoints-meta"))


def evaluate(config, workdir: str, passes: int) -> dict:
    """ODE bits/dim and the bound of :func:`newest_checkpoint` on ``passes`` dequantised passes over the test digits."""
    import jax

    import likelihood
    import run_lib
    import sde_lib
    from score_sde import checkpoints, datasets, eval_job, eval_records, parallel

    model, template = run_lib.eval_state_template(config, jax.random.PRNGKey(0))
    state = checkpoints.restore_checkpoint(newest_checkpoint(workdir), template)
    pstate = parallel.replicate(state)
    sde, _ = sde_lib.get_sde(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    ode_fn = likelihood.get_likelihood_fn(sde, model, inverse_scaler, rtol=config.sampling.ode_rtol,
                                          atol=config.sampling.ode_atol, solver=config.sampling.ode_solver)
    bound_fn = eval_job.likelihood_bound_fn(config, sde, model, inverse_scaler)
    images = eval_job.eval_images(config, "test")
    rng = jax.random.PRNGKey(config.seed + 1)
    values = {"ode": [], "bound": []}
    seconds = {"ode": 0.0, "bound": 0.0}
    for p in range(passes):
        order = np.random.default_rng([config.seed, p]).permutation(len(images))
        batch = datasets.get_data_scaler(config)(eval_records.dequantize(images[order], (config.seed, 1, p, 0)))[None]
        for name, fn in (("ode", ode_fn), ("bound", bound_fn)):
            rng, keys = parallel.split_per_device(rng)
            start = time.time()
            values[name].append(np.asarray(fn(keys, pstate, batch)[0]).reshape(-1))
            seconds[name] += time.time() - start
            logging.info("%s pass %d: %s bits/dim %.4f", workdir, p, name, values[name][-1].mean())
    row = {}
    for name, label in (("ode", "bits/dim (test, ODE)"), ("bound", "bound bits/dim (test)")):
        v = np.concatenate(values[name])
        row[label] = float(v.mean())
        row[f"{label} std. error"] = float(v.std(ddof=1) / np.sqrt(v.size))
        row[f"{label} seconds"] = round(seconds[name])
    gap = np.concatenate(values["bound"]) - np.concatenate(values["ode"])
    row["bound - ODE (paired)"] = float(gap.mean())
    row["bound - ODE std. error"] = float(gap.std(ddof=1) / np.sqrt(gap.size))
    row["evaluations"] = int(gap.size)
    row["checkpoint"], row["step"] = newest_checkpoint(workdir), int(state.step)
    return row


def variance_ratio(config, workdir: str, num_keys: int, batch_size: int) -> dict:
    """Var(likelihood-weighted loss) / Var(importance-weighted loss, times ``Z / (T - eps)``) over random keys.

    Both losses of ``losses.get_sde_loss_fn`` (evaluation mode) for ``params_ema`` of ``checkpoint_1`` on the
    first ``batch_size`` canonical test digits (dequantised, scaled); ``num_keys`` keys, the same for both.
    The scaled importance-weighted loss has the likelihood-weighted loss's expectation (see losses.py), so
    the two means must agree within their standard errors. ``checkpoint_1`` or, for a cut run, the newest
    preemption checkpoint (:func:`newest_checkpoint`).
    """
    import jax

    import losses
    import run_lib
    import sde_lib
    from score_sde import checkpoints, datasets, eval_job, eval_records

    model, template = run_lib.eval_state_template(config, jax.random.PRNGKey(0))
    state = checkpoints.restore_checkpoint(newest_checkpoint(workdir), template)
    sde, _ = sde_lib.get_sde(config)
    images = eval_job.eval_images(config, "test")[:batch_size]
    batch = {"image": datasets.get_data_scaler(config)(eval_records.dequantize(images, (config.seed, 2)))}
    eps = config.training.smallest_time
    scale = float(sde.likelihood_importance_cum_weight(sde.T, eps=eps)) / (sde.T - eps)
    keys = jax.random.split(jax.random.PRNGKey(config.seed + 3), num_keys)
    row = {}
    for name, importance in (("likelihood weighting", False), ("importance weighting x Z/(T-eps)", True)):
        loss_fn = losses.get_sde_loss_fn(sde, model, train=False, reduce_mean=config.training.reduce_mean,
                                         likelihood_weighting=True, eps=eps, importance_weighting=importance)
        one = jax.jit(lambda key: loss_fn(key, state.params_ema, state.model_state, batch)[0])
        v = np.asarray([one(k) for k in keys], np.float64) * (scale if importance else 1.0)
        row[f"{name}: mean"] = float(v.mean())
        row[f"{name}: std. error"] = float(v.std(ddof=1) / np.sqrt(v.size))
        row[f"{name}: variance"] = float(v.var(ddof=1))
    row["variance ratio (plain / importance)"] = (row["likelihood weighting: variance"]
                                                  / row["importance weighting x Z/(T-eps): variance"])
    row.update(keys=num_keys, batch=batch_size, Z=scale * (sde.T - eps))
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=("train", "eval", "varratio"), required=True)
    parser.add_argument("--out", required=True, help="folder of the runs (one workdir per run)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--bound_times", type=int, default=20)
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--keys", type=int, default=200, help="varratio: Monte-Carlo keys")
    parser.add_argument("--batch", type=int, default=32, help="varratio: test digits per loss")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    import run_lib
    from benchmarks import common

    common.print_backend()

    for name in args.runs.split(","):
        config, overrides = run_config(name, args.steps, args.bound_times)
        workdir = os.path.join(args.out, name)
        start = time.time()
        if args.stage == "train":
            run_lib.train(config, workdir)
            print(f"{name}: trained {args.steps} steps in {time.time() - start:.0f} s", flush=True)
            continue
        if args.stage == "varratio":
            row = variance_ratio(config, workdir, args.keys, args.batch)
            with open(os.path.join(args.out, f"varratio_{name}.json"), "w") as fout:
                json.dump(row, fout, indent=2, sort_keys=True)
            print(name, json.dumps(row), flush=True)
            continue
        row = {"overrides": overrides, "passes": args.passes, **evaluate(config, workdir, args.passes)}
        with open(os.path.join(args.out, f"results_{name}.json"), "w") as fout:
            json.dump(row, fout, indent=2, sort_keys=True)
        print(name, json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
