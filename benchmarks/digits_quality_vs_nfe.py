"""Digits quality vs score evaluations (NFE): digits-FD of every fast sampler against PC1000 and the ODE.

Samples a trained digits score model (the README's first command:
``python main.py --config configs/vp/digits.py --workdir runs/digits --mode train``) with

* each fast sampler of ``fast_sampling`` (DDIM η = 0, EDM's Heun, DPM-Solver orders 1–3,
  DPM-Solver++(2M)) at the NFE budgets ``--nfe`` (default 5, 10, 20, 50, 100): the largest step count
  whose NFE fits the budget (Heun costs 2 per step, DPM-Solver of order k costs k); the NFE the
  sampler reports is stored;
* the adaptive SDE solver at the tolerances ``--adaptive_rtol`` (it picks its own NFE);
* the paper's PC1000 (reverse diffusion + Langevin, ``config.sampling.snr``, N = 1000: 2,000
  evaluations) and the probability-flow ODE (RK45, rtol = atol = 1e-5);

each with the sampler options of ``config.sampling`` (``fast_sampling.sampler_options``) except the
step count, from the same latents (``PRNGKey(--seed)``), ``--num_samples`` images in one batch. Each
cell's quality is the digits-FD (:mod:`score_sde.digits_fd`; not FID) of its samples (clipped to
[0, 1]) against the 297 test digits, with a 95 % bootstrap interval (``--bootstrap`` resamples of
both sets; the resamples' spread around their median put around the estimate, :func:`centred_interval`). The row "training digits" is the digits-FD of ``--num_samples``
training images: the floor a perfect sampler would reach at this sample size.

The closing check compares the best fast sampler at ≤ 50 NFE with PC1000: whether its digits-FD lies
in PC1000's interval, and a paired bootstrap interval (the same test-set resamples) of the difference.

Writes ``--out`` (default ``results/digits_quality_vs_nfe``): ``results.json`` (every cell, written
after each one: a killed run resumes and skips finished cells), ``results.md`` and ``curves.png``.
Sample features are kept in ``--workdir/digits_quality_vs_nfe_features.npz`` for the bootstrap.

Usage (repository root)::

    python benchmarks/digits_quality_vs_nfe.py --workdir runs/digits [--num_samples 500]
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import re
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fast_sampling  # noqa: E402
import run_lib  # noqa: E402
import sampling  # noqa: E402
import sde_lib  # noqa: E402
from benchmarks import common  # noqa: E402
from configs.vp import digits as vp_digits  # noqa: E402
from models import utils as mutils  # noqa: E402
from score_sde import checkpoints, compile_cache, datasets, digits_fd  # noqa: E402
from score_sde.digits_fd import bootstrap_fd, centred_interval  # noqa: E402

# (row label, fast sampler, options, score evaluations per step)
FAST_SAMPLERS = [
    ("DDIM (η = 0)", "ddim", {"eta": 0.0}, 1),
    ("Heun (EDM)", "heun", {}, 2),
    ("DPM-Solver-1", "dpm_solver", {"order": 1}, 1),
    ("DPM-Solver-2", "dpm_solver", {"order": 2}, 2),
    ("DPM-Solver-3", "dpm_solver", {"order": 3}, 3),
    ("DPM-Solver++(2M)", "dpm_solver_pp", {}, 1),
]
ADAPTIVE = "adaptive SDE"
PC1000 = "PC1000 (reverse diffusion + Langevin)"
ODE = "probability-flow ODE (RK45, 1e-5)"
TRAIN_FLOOR = "training digits"
FAST_LIMIT = 50


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="workdir of a configs/vp/digits.py training run")
    parser.add_argument("--out", default="results/digits_quality_vs_nfe")
    parser.add_argument("--num_samples", type=int, default=100)
    parser.add_argument("--pc_steps", type=int, default=1000, help="N of the PC sampler (2 N evaluations)")
    parser.add_argument("--nfe", default="5,10,20,50,100")
    parser.add_argument("--adaptive_rtol", default="0.2,0.1")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render", action="store_true", help="only summarise the cells already in --out")
    return parser.parse_args(argv)


def newest_checkpoint(workdir: str) -> str:
    paths = glob.glob(os.path.join(workdir, "checkpoints", "checkpoint_*"))
    numbered = [(int(m.group(1)), p) for p in paths if (m := re.search(r"checkpoint_(\d+)$", p))]
    if not numbered:
        raise SystemExit(f"{workdir}/checkpoints holds no checkpoint_<n>; train one first: python main.py "
                         f"--config configs/vp/digits.py --workdir {workdir} --mode train")
    return max(numbered)[1]


class Cells:
    """The cells done so far (``results.json``) and their sample features (the workdir's npz)."""

    def __init__(self, out: str, features_path: str, settings: dict):
        self.json_path, self.features_path, self.settings = os.path.join(out, "results.json"), features_path, settings
        self.rows, self.features, self.command = [], {}, None
        if os.path.exists(self.json_path) and os.path.exists(features_path):
            with open(self.json_path) as f:
                stored = json.load(f)
            if stored.get("settings") == settings:
                self.command = stored.get("command")
                with np.load(features_path) as arrays:
                    self.features = {k: arrays[k] for k in arrays.files}
                self.rows = [r for r in stored["cells"] if r["key"] in self.features]

    def done(self, key: str) -> bool:
        return key in self.features

    def add(self, row: dict, feats: np.ndarray, extra: dict | None = None) -> None:
        self.rows.append(row)
        self.features[row["key"]] = feats.astype(np.float32)
        np.savez(self.features_path, **self.features)
        self.save(extra or {})

    def fail(self, row: dict) -> None:
        self.rows.append(row)
        self.save({})

    def save(self, extra: dict) -> None:
        os.makedirs(os.path.dirname(self.json_path), exist_ok=True)
        with open(self.json_path, "w") as f:
            json.dump({"settings": self.settings, "command": self.command, "cells": self.rows, **extra}, f, indent=1)
            f.write("\n")


def host_score_fn(config, model, state, sde) -> Callable:
    """``score_fn(x, t)`` for the samplers that runs the network, compiled once, through a host callback.

    XLA:CPU takes about a minute to compile a sampler loop with the network inside, and the samplers
    need a Python step count: one compilation per (sampler, NFE) cell. With the network behind
    ``jax.pure_callback`` the loops compile in about a second and the network once. Same arithmetic.
    """
    net = jax.jit(lambda params, model_state, x, t: mutils.get_score_fn(
        sde, model, params, model_state, train=False, continuous=config.training.continuous)(x, t))

    def host(x, t):
        t = np.broadcast_to(t, (x.shape[0],))
        return np.asarray(net(state.params_ema, state.model_state, x, t), np.float32)

    def score_fn(x, t):
        return jax.pure_callback(host, jax.ShapeDtypeStruct(x.shape, jnp.float32), x, t)
    return score_fn


def build_runners(config, score_fn, sde, sde_pc, eps, shape):
    """``(fast(name, options), pc, ode)``: jitted samplers ``(rng, ...) -> (samples in [0, 1], nfe)``."""
    inverse = datasets.get_data_inverse_scaler(config)

    def prior(rng):
        return sde.prior_sampling(jax.random.fold_in(rng, 1), shape)

    def fast(name, options):
        fn = fast_sampling.fast_sampler_fn(name)
        options = {**fast_sampling.sampler_options(name, config.sampling), **options}

        @functools.partial(jax.jit, static_argnames="steps")  # the samplers need a Python step count
        def run(rng, steps, rtol=None):
            extra = {"steps": steps} if rtol is None else {"adaptive_rtol": rtol}
            x, nfe = fn(rng, score_fn, sde, prior(rng), eps=eps, **{**options, **extra})
            return inverse(x), nfe
        return run

    predictor, corrector = sampling.get_predictor("reverse_diffusion"), sampling.get_corrector("langevin")

    @jax.jit
    def pc(rng):
        x = sampling.pc_sample(rng, score_fn, sde_pc, shape, predictor, corrector, config.sampling.snr,
                               config.sampling.n_steps_each, denoise=config.sampling.noise_removal, eps=eps)
        return inverse(x), sampling.pc_nfe(sde_pc, predictor, corrector, config.sampling.n_steps_each)

    @jax.jit
    def ode_run(rng):
        x, nfe = sampling.ode_sample_jax(score_fn, sde, prior(rng), rng, denoise=config.sampling.noise_removal,
                                         rtol=1e-5, atol=1e-5, eps=eps)
        return inverse(x), nfe

    return fast, pc, ode_run


def plan(args):
    """Every cell as ``(key, label, kind, target_nfe, call options)``."""
    budgets = [int(v) for v in args.nfe.split(",")]
    fast = [(f"{label}@{budget}", label, ("fast", name, options), budget, {"steps": max(1, budget // per_step)})
            for label, name, options, per_step in FAST_SAMPLERS for budget in budgets]
    # the cells of the closing comparison first: a run cut short still answers it
    cells = [c for c in fast if c[3] <= FAST_LIMIT]
    cells.append((PC1000, PC1000, ("pc",), 2 * args.pc_steps, {}))
    cells.append((ODE, ODE, ("ode",), None, {}))
    for rtol in (float(v) for v in args.adaptive_rtol.split(",")):
        cells.append((f"{ADAPTIVE}@rtol={rtol}", f"{ADAPTIVE} (rtol {rtol})", ("fast", "adaptive_sde", {}), None,
                      {"rtol": rtol}))
    return cells + [c for c in fast if c[3] > FAST_LIMIT]


def main(argv=None):
    args = parse_args(argv)
    compile_cache.configure(None)
    common.print_backend()
    config = vp_digits.get_config()
    ckpt_path = newest_checkpoint(args.workdir)
    model, template = run_lib.eval_state_template(config, jax.random.PRNGKey(config.seed + 1))
    state = checkpoints.restore_checkpoint(ckpt_path, template)
    sde, eps = sde_lib.get_sde(config)
    config.model.num_scales = args.pc_steps  # PC1000: N = 1000 (the digits default trains and snapshots at 250)
    sde_pc, _ = sde_lib.get_sde(config)
    shape = (args.num_samples, config.data.image_size, config.data.image_size, config.data.num_channels)

    images, _ = datasets.load_digits()
    images = images.astype(np.float32) / 255.0
    n_train = len(images) - datasets.DIGITS_NUM_EVAL
    test_feats = digits_fd.features(images[n_train:])
    settings = {"checkpoint": os.path.basename(ckpt_path), "step": int(state.step), "num_samples": args.num_samples,
                "seed": args.seed, "bootstrap": args.bootstrap, "config": "configs/vp/digits.py",
                "classifier_sha256": digits_fd.load_metadata()["sha256"]}
    cells = Cells(args.out, os.path.join(args.workdir, "digits_quality_vs_nfe_features.npz"), settings)
    if not args.render:
        cells.command = "python benchmarks/digits_quality_vs_nfe.py " + " ".join(argv or sys.argv[1:])

    if not cells.done(TRAIN_FLOOR):
        train_idx = np.random.RandomState(args.seed).choice(n_train, min(args.num_samples, n_train), replace=False)
        cells.add({"key": TRAIN_FLOOR, "label": TRAIN_FLOOR, "nfe": 0, "seconds": 0.0},
                  digits_fd.features(images[train_idx]))

    fast, pc, ode_run = build_runners(config, host_score_fn(config, model, state, sde), sde, sde_pc, eps, shape)
    runners = {}
    rng = jax.random.PRNGKey(args.seed)
    todo = [] if args.render else [c for c in plan(args) if not cells.done(c[0])]
    start = time.perf_counter()
    for n, (key, label, kind, target, call) in enumerate(todo):
        t0 = time.perf_counter()
        if kind[0] == "fast":
            runner = runners.setdefault(kind[1] + str(kind[2]), fast(kind[1], kind[2]))
            x, nfe = runner(rng, call.get("steps", 1), call.get("rtol"))
        elif kind[0] == "pc":
            x, nfe = pc(rng)
        else:
            x, nfe = ode_run(rng)
        x = np.asarray(x)
        seconds = time.perf_counter() - t0
        if not np.all(np.isfinite(x)):  # the adaptive solver's samples are NaN where max_iters did not reach eps
            print(f"{key}: {int(np.sum(~np.isfinite(x)))} NaN or infinite values in the samples; cell left empty")
            cells.fail({"key": key, "label": label, "target_nfe": target, "nfe": int(nfe), "failed": "non-finite samples"})
            continue
        x = np.clip(x, 0.0, 1.0)
        cells.add({"key": key, "label": label, "target_nfe": target, "nfe": int(nfe), "seconds": round(seconds, 1),
                   **{k: v for k, v in call.items()}}, digits_fd.features(x))
        elapsed = time.perf_counter() - start
        print(f"[{n + 1}/{len(todo)}] {key}: NFE {int(nfe)}, {seconds:.0f} s (elapsed {elapsed:.0f} s, "
              f"ETA {elapsed / (n + 1) * (len(todo) - n - 1):.0f} s)", flush=True)

    summary = summarise(cells, test_feats, args)
    cells.save(summary)
    write_markdown(cells, summary, os.path.join(args.out, "results.md"))
    plot(cells, os.path.join(args.out, "curves.png"))
    print(open(os.path.join(args.out, "results.md")).read())


def summarise(cells: Cells, test_feats, args) -> dict:
    """Bootstrap every cell (shared test-set resamples: paired differences) and the closing comparison."""
    rs = np.random.RandomState(args.seed + 1)
    test_idx = rs.randint(0, len(test_feats), (args.bootstrap, len(test_feats)))
    boots = {}
    for row in (r for r in cells.rows if r["key"] in cells.features):
        fd, lo, hi, boots[row["key"]] = bootstrap_fd(cells.features[row["key"]].astype(np.float64), test_feats, rs,
                                                     args.bootstrap, test_idx)
        row.update(fd=round(fd, 3), ci95=[round(lo, 3), round(hi, 3)])
    fast_rows = [r for r in cells.rows
                 if "fd" in r and r["key"] not in (PC1000, ODE, TRAIN_FLOOR) and r["nfe"] <= FAST_LIMIT]
    by_key = {r["key"]: r for r in cells.rows}
    if not fast_rows or PC1000 not in by_key:
        return {}
    best = min(fast_rows, key=lambda r: r["fd"])
    pc = by_key[PC1000]
    diff = boots[best["key"]] - boots[PC1000]
    within = pc["ci95"][0] <= best["fd"] <= pc["ci95"][1]
    return {"comparison": {
        "best_fast_at_most_50_nfe": best["key"], "best_fd": best["fd"], "best_ci95": best["ci95"],
        "best_nfe": best["nfe"], "pc1000_fd": pc["fd"], "pc1000_ci95": pc["ci95"],
        "best_fd_within_pc1000_interval": bool(within),
        "difference_best_minus_pc1000": round(best["fd"] - pc["fd"], 3),
        "difference_ci95": [round(v, 3) for v in centred_interval(best["fd"] - pc["fd"], diff)]}}


def write_markdown(cells: Cells, summary: dict, path: str) -> None:
    s = cells.settings
    budgets = sorted({r["target_nfe"] for r in cells.rows if r.get("target_nfe") and r["key"] != PC1000})
    lines = [
        "# Digits: sample quality vs score evaluations", "",
        f"digits-FD (Fréchet distance in the features of the shipped digits classifier, `score_sde/digits_fd.py`; "
        f"**not FID**) of {s['num_samples']} samples against the 297 test digits, with 95 % bootstrap intervals "
        f"({s['bootstrap']} resamples of both sets; their spread around the median, centred on the estimate, since "
        f"repeated samples inflate a resampled Fréchet distance). Model: `{s['config']}` trained by the README's first command, "
        f"{s['checkpoint']} (step {s['step']}). All samplers start from the same latents (seed {s['seed']}). "
        "Lower is better; the training-digits row is the floor at this sample size.", "",
        f"Command: `{cells.command}`", "",
        "| sampler | " + " | ".join(f"NFE {b}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    by_key = {r["key"]: r for r in cells.rows}

    def cell(r):
        if "fd" not in r:
            return f"failed ({r['failed']})"
        text = f"{r['fd']:.1f} [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]"
        return text + (f" ({r['nfe']})" if r.get("target_nfe") and r["nfe"] != r["target_nfe"] else "")

    for label, _, _, _ in FAST_SAMPLERS:
        row = [cell(by_key[f"{label}@{b}"]) if f"{label}@{b}" in by_key else "–" for b in budgets]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += ["", "Brackets after an interval: the NFE actually used where the budget is not a multiple of the "
              "sampler's evaluations per step.", "", "| sampler | NFE | digits-FD [95 % CI] | seconds |",
              "|---|---|---|---|"]
    for r in [r for r in cells.rows if r.get("target_nfe") is None] + [by_key[k] for k in (PC1000,) if k in by_key]:
        lines.append(f"| {r['label']} | {r['nfe']} | {cell(r)} | {r.get('seconds', '–')} |")
    c = summary.get("comparison")
    if c:
        verdict = "**is within**" if c["best_fd_within_pc1000_interval"] else "**is not within**"
        lines += ["", "## Best fast sampler at ≤ 50 NFE vs PC1000", "",
                  f"{c['best_fast_at_most_50_nfe']} (NFE {c['best_nfe']}): digits-FD {c['best_fd']:.1f} "
                  f"[{c['best_ci95'][0]:.1f}, {c['best_ci95'][1]:.1f}]; PC1000 ({by_key[PC1000]['nfe']} NFE): {c['pc1000_fd']:.1f} "
                  f"[{c['pc1000_ci95'][0]:.1f}, {c['pc1000_ci95'][1]:.1f}]. The best fast sampler's digits-FD "
                  f"{verdict} PC1000's interval; difference (best − PC1000) {c['difference_best_minus_pc1000']:+.1f}, "
                  f"paired bootstrap 95 % CI [{c['difference_ci95'][0]:+.1f}, {c['difference_ci95'][1]:+.1f}]."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(cells: Cells, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows_ok = [r for r in cells.rows if "fd" in r]
    by_key = {r["key"]: r for r in rows_ok}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, _, _, _ in FAST_SAMPLERS:
        rows = sorted((r for r in rows_ok if r["label"] == label), key=lambda r: r["nfe"])
        if rows:
            nfe = [r["nfe"] for r in rows]
            fd = np.array([r["fd"] for r in rows])
            err = np.abs(np.array([r["ci95"] for r in rows]).T - fd)
            ax.errorbar(nfe, fd, yerr=err, marker="o", ms=3, capsize=2, label=label)
    adaptive = sorted((r for r in rows_ok if r["key"].startswith(ADAPTIVE)), key=lambda r: r["nfe"])
    if adaptive:
        fd = np.array([r["fd"] for r in adaptive])
        ax.errorbar([r["nfe"] for r in adaptive], fd, yerr=np.abs(np.array([r["ci95"] for r in adaptive]).T - fd),
                    marker="s", ls="none", capsize=2, label=ADAPTIVE)
    for key, marker in ((ODE, "D"), (PC1000, "*")):
        if key in by_key:
            r = by_key[key]
            ax.errorbar([r["nfe"]], [r["fd"]], yerr=np.abs(np.array([r["ci95"]]).T - r["fd"]), marker=marker,
                        ms=8, ls="none", capsize=2, color="k" if key == PC1000 else "grey", label=r["label"])
    if PC1000 in by_key:
        ax.axhspan(*by_key[PC1000]["ci95"], color="k", alpha=0.1)
    if TRAIN_FLOOR in by_key:
        ax.axhline(by_key[TRAIN_FLOOR]["fd"], color="g", ls="--", lw=1, label="training digits (floor)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("score evaluations (NFE)")
    ax.set_ylabel("digits-FD to the test digits (not FID)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
