"""What :mod:`score_sde.tables` writes from its stored cells: markdown tables, the claims, PNG plots.

Everything here reads the store (``tables.json``'s content) and computes nothing expensive.
Intervals are 95% Student-t intervals over seeds (sampler table) or data points (likelihood).
"""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw

from score_sde import digits_fd, paper_results
from score_sde import tables as T

METRICS = (("sw", "sliced W1 to exact samples", "{:.3f}"), ("dlogp", "Δ mean log p (nats)", "{:+.3f}"),
           ("mmd2", "MMD² to exact samples", "{:.1e}"))
LIKELIHOOD_TOLERANCE = 1e-3
PREVIEW_DIGITS = 8  # digits per row of digits_samples.png
SDE_LABELS = {"vesde": "VE", "vpsde": "VP", "subvpsde": "subVP"}
ROW_LABELS = {"ancestral_sampling": "ancestral sampling", "reverse_diffusion": "reverse diffusion",
              "probability_flow": "probability flow", T.CORRECTOR_ONLY: "corrector only", T.EXACT: "exact samples"}
COLORS = {"ancestral_sampling": (31, 119, 180), "reverse_diffusion": (44, 160, 44),
          "probability_flow": (214, 39, 40), T.CORRECTOR_ONLY: (148, 103, 189), T.EXACT: (90, 90, 90)}


def _fmt(mean: float, half: float, pattern: str) -> str:
    if math.isnan(mean):
        return "n/a"
    return pattern.format(mean) + ("" if math.isnan(half) else " ± " + pattern.format(half).lstrip("+"))


def _cell(store: dict, dim, sde, predictor, sampler, table: str = "sampler") -> dict | None:
    return store.get(table, {}).get(T.sampler_key(dim, sde, predictor, sampler))


def _ci(cell: dict | None, metric: str) -> tuple[float, float]:
    if not cell or not cell[metric]:
        return float("nan"), float("nan")
    return T.mean_ci(cell[metric])


def _grid(config, names=None) -> dict:
    """The sampler names playing P<N>, P<2N>, C<2N>, PC<N> among ``names`` (default ``config.tables.samplers``)."""
    samplers = [T.parse_sampler(s) for s in (config.tables.samplers if names is None else names)]
    p = sorted((s for s in samplers if s.predictor and not s.corrector_steps), key=lambda s: s.num_scales)
    base = p[0].num_scales if p else None
    pick = lambda cond: next((s.name for s in samplers if cond(s)), None)
    return {"P": p[0].name if p else None,
            "P2": pick(lambda s: s.predictor and not s.corrector_steps and s.num_scales == 2 * (base or -1)),
            "C2": pick(lambda s: not s.predictor and s.nfe == 2 * (base or -1)),
            "PC": pick(lambda s: s.predictor and s.corrector_steps == 1 and s.num_scales == base)}


# ---------------------------------------------------------------------------------------------
# Claims
# ---------------------------------------------------------------------------------------------
CLAIM_METRICS = {"sw": "SW", "abs_dlogp": "|Δ log p|"}


def _values(cell: dict, metric: str) -> np.ndarray:
    return np.abs(cell["dlogp"]) if metric == "abs_dlogp" else np.asarray(cell[metric])


def _difference(worse: dict | None, better: dict | None, metric: str) -> tuple[float, float] | None:
    """Mean and CI half-width of ``worse - better`` (paired by seed when both have every seed)."""
    if not worse or not better or not worse["sw"] or not better["sw"]:
        return None
    a, b = _values(worse, metric), _values(better, metric)
    if a.size == b.size and not worse["diverged"] and not better["diverged"]:
        return T.mean_ci(a - b)
    (ma, ha), (mb, hb) = T.mean_ci(a), T.mean_ci(b)
    return ma - mb, math.hypot(ha, hb)


def _verdict(diff: tuple[float, float] | None) -> str:
    if diff is None or math.isnan(diff[1]):
        return "inconclusive"
    mean, half = diff
    return "holds" if mean - half > 0 else ("does not hold" if mean + half < 0 else "inconclusive")


def _claim(text: str, paper: str, pairs: list) -> dict:
    """``pairs``: ``(where, worse cell, better cell)``; per metric, each instance's verdict and the tally."""
    result = {"claim": text, "paper": paper, "overall": {}, "tally": {}, "instances": []}
    for metric in CLAIM_METRICS:
        diffs = [(where, _difference(worse, better, metric)) for where, worse, better in pairs]
        verdicts = [_verdict(d) for _, d in diffs]
        tally = {v: verdicts.count(v) for v in ("holds", "does not hold", "inconclusive")}
        n = len(verdicts)
        result["tally"][metric] = tally
        result["overall"][metric] = ("not measured" if not n else "holds" if tally["holds"] == n else
                                     "does not hold" if tally["does not hold"] == n else "inconclusive")
        for i, ((where, d), v) in enumerate(zip(diffs, verdicts)):
            if len(result["instances"]) <= i:
                result["instances"].append({"where": where})
            result["instances"][i][metric] = {"verdict": v, "difference": None if d is None else list(d)}
    return result


def claims(config, store: dict) -> list:
    """The paper's claims about samplers and likelihoods, judged on the measured cells.

    Each instance compares two cells' sliced Wasserstein distance (worse minus better, an
    interval over seeds): holds if the interval is above 0, does not hold if below, else
    inconclusive.
    """
    t, g = config.tables, _grid(config)
    where = [(d, s) for d in t.dims for s in t.sdes]
    label = lambda d, s, p="": f"{d}-D {SDE_LABELS[s]}" + (f" {ROW_LABELS[p]}" if p else "")
    preds = lambda s: [p for p in t.predictors if not (p == "ancestral_sampling" and s == "subvpsde")]
    out = []
    if g["P"] and g["PC"]:
        out.append(_claim(f"{g['PC']} beats {g['P']}: a corrector step after every predictor step helps",
                          "always (Table 1, every predictor, VE and VP)",
                          [(label(d, s, p), _cell(store, d, s, p, g["P"]), _cell(store, d, s, p, g["PC"]))
                           for d, s in where for p in preds(s)]))
    if g["P2"] and g["PC"]:
        out.append(_claim(f"{g['PC']} beats {g['P2']} at the same number of score evaluations",
                          "typically (Table 1)",
                          [(label(d, s, p), _cell(store, d, s, p, g["P2"]), _cell(store, d, s, p, g["PC"]))
                           for d, s in where for p in preds(s)]))
    if g["C2"] and g["P2"] and g["PC"]:
        out.append(_claim(f"corrector only ({g['C2']}) is worse than {g['P2']} and {g['PC']} at equal evaluations",
                          "yes (Table 1)",
                          [(label(d, s, p) + f" vs {other}",
                            _cell(store, d, s, T.CORRECTOR_ONLY, g["C2"]), _cell(store, d, s, p, other))
                           for d, s in where for p in preds(s) for other in (g["P2"], g["PC"])]))
    if g["P"] and {"ancestral_sampling", "reverse_diffusion"} <= set(t.predictors):
        out.append(_claim("reverse diffusion beats ancestral sampling", "always (Table 1)",
                          [(label(d, s) + f" {n}", _cell(store, d, s, "ancestral_sampling", n),
                            _cell(store, d, s, "reverse_diffusion", n))
                           for d, s in where if s != "subvpsde" for n in (g["P"], g["PC"]) if n]))
    if g["P"] and {"probability_flow", "reverse_diffusion"} <= set(t.predictors):
        out.append(_claim(f"probability flow is worse than reverse diffusion at {g['P']}",
                          "yes (Table 1, VE and VP P1000)",
                          [(label(d, s), _cell(store, d, s, "probability_flow", g["P"]),
                            _cell(store, d, s, "reverse_diffusion", g["P"]))
                           for d, s in where]))
    if g["P"] and g["P2"]:
        out.append(_claim(f"the error shrinks with more steps: {g['P2']} beats {g['P']}",
                          "yes for FID, except VP ancestral sampling (Table 1)",
                          [(label(d, s, p), _cell(store, d, s, p, g["P"]), _cell(store, d, s, p, g["P2"]))
                           for d, s in where for p in preds(s)]))
    out += _trained_likelihood_claims(config, store)
    out += _digits_claims(config, store)
    lik = store.get("likelihood", {})
    if lik:
        errors = {key: float(np.max(np.abs(c["solver"]))) for key, c in sorted(lik.items())}
        verdict = "holds" if max(errors.values()) < LIKELIHOOD_TOLERANCE else "does not hold"
        out.append({"claim": "with the exact score, the probability-flow ODE gives the exact NLL of p_eps plus the "
                             f"prior-mismatch term (every data point within {LIKELIHOOD_TOLERANCE} bits/dim)",
                    "paper": "the method (Section 4.3, Appendix D.2)", "overall": {"likelihood": verdict}, "tally": {},
                    "instances": [{"where": k, "likelihood": {"verdict": f"max |solver error| {v:.1e} bits/dim",
                                                               "difference": None}} for k, v in errors.items()]})
    return out


def solver_spread(cell: dict) -> float:
    """The spread (max − min) of the data-set mean bits/dim over the swept ODE tolerances."""
    return float(max(cell["tol_means"]) - min(cell["tol_means"]))


def hutchinson_error(cell: dict) -> float:
    """Standard error of the reported mean bits/dim from the Hutchinson probes (sd of per-probe means / √K)."""
    means = np.asarray(cell["probe_means"])
    return float(means.std(ddof=1) / math.sqrt(means.size))


def _bpd_difference(worse: dict | None, better: dict | None) -> tuple[float, float] | None:
    """Mean and half-width of ``worse − better`` bits/dim: a 95% interval over the (shared) data points,
    widened by both cells' solver-tolerance spreads (a bias, so added, not combined in quadrature)."""
    if not worse or not better:
        return None
    mean, half = T.mean_ci(np.asarray(worse["ode"]) - np.asarray(better["ode"]))
    return mean, half + solver_spread(worse) + solver_spread(better)


def _bpd_claim(text: str, paper: str, pairs: list, difference=None, metric: str = "bits/dim") -> dict:
    """``pairs``: ``(where, worse cell, better cell)`` of the trained-likelihood table (see :func:`_bpd_difference`);
    ``difference(worse, better) -> (mean, half-width) | None`` for other cells (``metric`` names the number)."""
    diffs = [(where, (difference or _bpd_difference)(worse, better)) for where, worse, better in pairs]
    verdicts = [_verdict(d) for _, d in diffs]
    tally = {v: verdicts.count(v) for v in ("holds", "does not hold", "inconclusive")}
    n = len(verdicts)
    overall = ("not measured" if not n else "holds" if tally["holds"] == n else
               "does not hold" if tally["does not hold"] == n else "inconclusive")
    return {"claim": text, "paper": paper, "overall": {metric: overall}, "tally": {metric: tally},
            "instances": [{"where": where, metric: {"verdict": v, "difference": None if d is None else list(d)}}
                          for (where, d), v in zip(diffs, verdicts)]}


def _exact_as_cell(cell: dict) -> dict:
    """The exact NLL of a trained-likelihood cell's points as a cell of its own (no solver spread)."""
    return {"ode": cell["exact"], "tol_means": [0.0]}


def _trained_likelihood_claims(config, store: dict) -> list:
    """Table 2's claims on the trained models: likelihood weighting lowers NLL; subVP ≤ VP; no model beats the truth."""
    t, lik = config.tables, store.get("trained_likelihood", {})
    if not lik:
        return []
    get = lambda d, s, w: lik.get(T.train_key(d, s, w))
    label = lambda d, s, w="": f"{d}-D {SDE_LABELS[s]}" + (f" ({w})" if w else "")
    out = [_bpd_claim("likelihood weighting (λ = g²) lowers the NLL (bits/dim) of the trained model",
                      "yes (Table 2: every model trained with likelihood weighting has a lower NLL)",
                      [(label(d, s), get(d, s, "plain"), get(d, s, "likelihood"))
                       for d in t.trained_dims for s in t.sdes])]
    if {"vpsde", "subvpsde"} <= set(t.sdes):
        out.append(_bpd_claim("subVP has a lower NLL than VP (the same training otherwise)",
                              "yes (Table 2: subVP ≤ VP in every pair)",
                              [(label(d, "vpsde", w), get(d, "vpsde", w), get(d, "subvpsde", w))
                               for d in t.trained_dims for w in T.WEIGHTINGS]))
    out.append(_bpd_claim("no trained model beats the exact NLL of the data (Gibbs' inequality; a sanity check)",
                          "— (ground truth the paper did not have)",
                          [(label(d, s, w), get(d, s, w), get(d, s, w) and _exact_as_cell(get(d, s, w)))
                           for d in t.trained_dims for s in t.sdes for w in T.WEIGHTINGS]))
    return out


def _fd_difference(worse: dict | None, better: dict | None) -> tuple[float, float] | None:
    """digits-FD of ``worse − better`` and the larger half of its 95 % bootstrap interval (the cells resample
    the test digits with the same indices, so the resampled differences are paired on them)."""
    if not worse or not better:
        return None
    diff = worse["fd"] - better["fd"]
    lo, hi = digits_fd.centred_interval(diff, np.asarray(worse["boot"]) - np.asarray(better["boot"]))
    return diff, max(hi - diff, diff - lo)


def _digits_claims(config, store: dict) -> list:
    """The paper's claims on the digits models: bits/dim (Table 2) and digits-FD of the samplers (Table 1)."""
    t, cells = config.tables, store.get("digits", {})
    if "digits" not in t.which or not cells.get("nll"):
        return []
    nll, fd, g = cells["nll"], cells.get("fd", {}), _grid(config, t.digits_samplers)
    key = lambda *parts: "/".join(parts)
    out = [_bpd_claim("digits: likelihood weighting (λ = g²) lowers the NLL (bits/dim) of the trained model",
                      "yes (Table 2)", [(f"digits {SDE_LABELS[s]}", nll.get(key(s, "plain")),
                                         nll.get(key(s, "likelihood"))) for s in t.digits_sdes])]
    if {"vpsde", "subvpsde"} <= set(t.digits_sdes):
        out.append(_bpd_claim("digits: subVP has a lower NLL than VP (the same training otherwise)",
                              "yes (Table 2: subVP ≤ VP in every pair)",
                              [(f"digits {w}", nll.get(key("vpsde", w)), nll.get(key("subvpsde", w)))
                               for w in T.WEIGHTINGS]))
    preds = lambda s: [p for p in t.digits_predictors if not (p == "ancestral_sampling" and s == "subvpsde")]
    if g["P"] and g["PC"] and fd:
        out.append(_bpd_claim(f"digits: {g['PC']} beats {g['P']} in digits-FD (a corrector step helps)",
                              "always (Table 1, FID)",
                              [(f"digits {SDE_LABELS[s]} {ROW_LABELS[p]}", fd.get(key(s, p, g["P"])),
                                fd.get(key(s, p, g["PC"]))) for s in t.digits_sdes for p in preds(s)],
                              _fd_difference, "digits-FD"))
    if g["P"] and fd and {"probability_flow", "reverse_diffusion"} <= set(t.digits_predictors):
        out.append(_bpd_claim(f"digits: probability flow is worse than reverse diffusion at {g['P']} in digits-FD",
                              "yes (Table 1, VE and VP P1000, FID)",
                              [(f"digits {SDE_LABELS[s]}", fd.get(key(s, "probability_flow", g["P"])),
                                fd.get(key(s, "reverse_diffusion", g["P"]))) for s in t.digits_sdes],
                              _fd_difference, "digits-FD"))
    return out


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def _sampler_tables(config, store: dict, table: str = "sampler") -> list[str]:
    t = config.tables
    trained = table == "trained_sampler"
    samplers = [T.parse_sampler(s) for s in (t.trained_samplers if trained else t.samplers)]
    rows = list(t.predictors) + [T.CORRECTOR_ONLY, T.EXACT]
    lines = []
    for dim in (t.trained_dims if trained else t.dims):
        for metric, title, pattern in METRICS:
            cols = [(s, smp) for s in t.sdes for smp in samplers]
            lines += [f"#### {dim}-D mixture, {'trained' if trained else 'exact'} score: {title}", "",
                      "| sampler (score evaluations) | " + " | ".join(f"{SDE_LABELS[s]} {smp.name} ({smp.nfe})"
                                                                  for s, smp in cols) + " |",
                      "|---" * (len(cols) + 1) + "|"]
            for row in rows:
                cells = []
                for s, smp in cols:
                    name = "-" if row == T.EXACT else smp.name
                    applies = (row == T.EXACT) or (row == T.CORRECTOR_ONLY) == (not smp.predictor)
                    cell = _cell(store, dim, s, row, name, table) if applies else None
                    text = _fmt(*_ci(cell, metric), pattern) if cell else "–"
                    if cell and cell["diverged"]:
                        text += f" ({cell['diverged']} diverged)"
                    cells.append(text)
                if any(c != "–" for c in cells):
                    lines.append(f"| {ROW_LABELS[row]} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def _likelihood_table(config, store: dict) -> list[str]:
    order = [f"d{d}/{s}" for d in config.tables.dims for s in config.tables.sdes]
    lines = ["| data | SDE | exact NLL | ODE bits/dim | ODE − exact | prior-mismatch term | solver error | "
             "max abs solver error | ODE evaluations |", "|---" * 9 + "|"]
    for key in [k for k in order if k in store["likelihood"]]:
        c = store["likelihood"][key]
        dim, sde = key.split("/")
        diff = np.asarray(c["ode"]) - np.asarray(c["exact"])
        cols = [_fmt(*T.mean_ci(c["exact"]), "{:.4f}"), _fmt(*T.mean_ci(c["ode"]), "{:.4f}"),
                _fmt(*T.mean_ci(diff), "{:+.1e}"), _fmt(*T.mean_ci(c["prior"]), "{:+.1e}"),
                _fmt(*T.mean_ci(c["solver"]), "{:+.1e}"), f"{np.max(np.abs(c['solver'])):.1e}", str(c["nfe"])]
        lines.append(f"| {dim[1:]}-D mixture | {SDE_LABELS[sde]} | " + " | ".join(cols) + " |")
    return lines + [""]


def _trained_likelihood_table(config, store: dict) -> list[str]:
    t = config.tables
    lines = ["| data | SDE | weighting | training loss (first → last 10%) | exact NLL | ODE bits/dim ± 95% CI "
             "over points | Hutchinson s.e. | tolerance sweep (rtol = atol: mean) | solver spread | ODE − exact | "
             "ODE evaluations |", "|---" * 11 + "|"]
    for d in t.trained_dims:
        for s in t.sdes:
            for w in T.WEIGHTINGS:
                key = T.train_key(d, s, w)
                c, tr = store.get("trained_likelihood", {}).get(key), store.get("train", {}).get(key)
                if not c:
                    continue
                sweep = ", ".join(f"{tol:.0e}: {m:.4f}" for tol, m in zip(c["tolerances"], c["tol_means"]))
                diff = np.asarray(c["ode"]) - np.asarray(c["exact"])
                loss = f"{tr['loss_first']:.3g} → {tr['loss_last']:.3g}" if tr else "n/a"
                cols = [loss, _fmt(*T.mean_ci(c["exact"]), "{:.4f}"), _fmt(*T.mean_ci(c["ode"]), "{:.4f}"),
                        f"{hutchinson_error(c):.1e} ({len(c['probe_means'])} probes)", sweep,
                        f"{solver_spread(c):.1e}", _fmt(*T.mean_ci(diff), "{:+.4f}"),
                        " / ".join(map(str, c["nfe"]))]
                lines.append(f"| {d}-D mixture | {SDE_LABELS[s]} | {'λ = g² (likelihood)' if w == 'likelihood' else 'λ = std²'} | "
                             + " | ".join(cols) + " |")
    return lines + [""]


def _digits_section(config, store: dict) -> list[str]:
    """Table 2 (bits/dim) and the digits-FD column of the digits stage (:mod:`score_sde.tables_digits`)."""
    t, cells = config.tables, store.get("digits", {})
    train, nll, fd = cells.get("train", {}), cells.get("nll", {}), cells.get("fd", {})
    lines = ["## Digits: Table 2 (bits/dim) and a digits-FD column", "",
             f"The embedded 8×8 digits, uniformly dequantised (the paper's setting). Models: "
             f"`configs/{{ve,vp,subvp}}/digits.py` with a residual MLP (`models/mlp.py`, width {t.digits_width}, "
             f"{t.digits_blocks} blocks) instead of their DDPM++, trained {t.digits_train_steps} steps (batch "
             f"{t.digits_batch_size}, lr {t.digits_lr}) by `run_lib.train` on dequantised training digits, with "
             "λ = std² or likelihood weighting λ = g² (no importance sampling).", "",
             f"**Bits/dim** of 8-bit data through the probability-flow ODE on the first {t.digits_nll_points} test "
             "digits, each dequantised once with fixed noise (the same for every model). Three error bars: the 95% "
             "interval over those points (which holds the dequantisation noise; ± after the value), the Hutchinson "
             f"standard error of the mean over {t.digits_nll_probes} Rademacher probes, and the spread of the mean "
             "over the ODE tolerances swept (the first is reported). **There is no exact NLL of the digits**: unlike "
             "the mixtures, these numbers compare models with each other only, as the paper's Table 2 does.", "",
             "| SDE | weighting | network (parameters, steps) | bits/dim ± 95% CI over points | Hutchinson s.e. | "
             "tolerance sweep (rtol = atol: mean) | solver spread | ODE evaluations |", "|---" * 8 + "|"]
    for s in t.digits_sdes:
        for w in T.WEIGHTINGS:
            c, tr = nll.get(f"{s}/{w}"), train.get(f"{s}/{w}")
            if not c:
                continue
            sweep = ", ".join(f"{tol:.0e}: {m:.4f}" for tol, m in zip(c["tolerances"], c["tol_means"]))
            net = f"{tr['parameters']:,}, {tr['steps']}" if tr else "n/a"
            lines.append(f"| {SDE_LABELS[s]} | {'λ = g² (likelihood)' if w == 'likelihood' else 'λ = std²'} | {net} | "
                         f"{_fmt(*T.mean_ci(c['ode']), '{:.4f}')} | {hutchinson_error(c):.1e} | {sweep} | "
                         f"{solver_spread(c):.1e} | {' / '.join(map(str, c['nfe']))} |")
    samplers = [T.parse_sampler(n) for n in t.digits_samplers]
    floor = fd.get("real_digits")
    lines += ["", f"**digits-FD** (Fréchet distance in the features of the shipped digits classifier, "
              "`score_sde/digits_fd.py`; **not FID**, comparable only with other digits-FD numbers) of "
              f"{t.digits_num_samples} samples of the λ = std² models against the 297 test digits, 95% bootstrap "
              f"intervals ({t.digits_bootstrap} resamples; their spread around the median, centred on the value). "
              f"Samplers named as Table 1's (N = noise scales; Langevin snr {t.snr}); score evaluations in brackets. "
              "The floor: as many real training digits against the same test digits"
              + (f": **{floor['fd']:.1f} [{floor['ci95'][0]:.1f}, {floor['ci95'][1]:.1f}]**." if floor else "."), "",
              "| sampler (score evaluations) | " + " | ".join(SDE_LABELS[s] for s in t.digits_sdes) + " |",
              "|---" * (len(t.digits_sdes) + 1) + "|"]
    for smp in samplers:
        for p in (list(t.digits_predictors) if smp.predictor else [T.CORRECTOR_ONLY]):
            row = []
            for s in t.digits_sdes:
                c = fd.get(f"{s}/{p}/{smp.name}")
                text = f"{c['fd']:.1f} [{c['ci95'][0]:.1f}, {c['ci95'][1]:.1f}]" if c else "–"
                row.append(text + (f" ({c['diverged']} diverged)" if c and c.get("diverged") else ""))
            if any(r != "–" for r in row):
                lines.append(f"| {ROW_LABELS[p]} {smp.name} ({smp.nfe}) | " + " | ".join(row) + " |")
    return lines + ["", "`digits_samples.png`: the first samples of each cell.", ""]


def _claims_section(claim_list: list) -> list[str]:
    lines = ["## Which of the paper's claims hold at this scale", "",
             "Generated from the measured cells. Each instance compares two cells on two distances to the truth, "
             "sliced W1 (SW) and the absolute mean log-density error |Δ log p|: it holds when the 95% interval "
             "of (worse − better), paired by seed, lies above 0, does not hold when below 0, and is inconclusive "
             "when it contains 0 (the samplers are then closer to each other than this many samples resolve). "
             "The bits/dim claims compare trained models on the same data points: a 95% interval of the paired "
             "difference over points, widened by both models' solver-tolerance spreads. The digits-FD claims: the "
             "larger half of a 95% bootstrap interval of the difference (test digits resampled alike for both "
             "cells).", ""]
    for c in claim_list:
        overall = "; ".join(f"{CLAIM_METRICS.get(m, m)}: **{v}**" + (
            " (" + ", ".join(f"{k} {n}" for k, n in c["tally"][m].items() if n) + ")" if c["tally"].get(m) else "")
            for m, v in c["overall"].items())
        lines.append(f"- **{c['claim']}** — paper: {c['paper']}. Here: {overall}.")
        for inst in c["instances"]:
            parts = []
            for m, r in inst.items():
                if m == "where":
                    continue
                d = r["difference"]
                numbers = "" if d is None else f" ({d[0]:+.4f} ± {d[1]:.4f})"
                parts.append(f"{CLAIM_METRICS.get(m, '')} {r['verdict']}{numbers}")
            lines.append(f"  - {inst['where']}: " + "; ".join(p.strip() for p in parts))
    return lines + [""]


def markdown(config, store: dict, paper: dict | None, ours: dict) -> str:
    """The whole ``tables.md``."""
    t = config.tables
    lines = ["# The paper's tables at CPU scale, with ground truth", "",
             "Produced by `python main.py --mode tables --config <config> --workdir <dir>` "
             "(`score_sde.tables.run`). Gaussian mixtures with exact scores (`score_sde/toy.py`): in the "
             "exact-score tables every number is the error of the numerical method alone; the trained-model "
             "tables (where present) add the learning error of small trained networks. Intervals: 95% over "
             f"{t.seeds} seeds of {t.num_samples} samples (sampler table) or over {t.likelihood_points} "
             f"data points (likelihood table). SDEs: VE σ ∈ [{config.model.sigma_min}, {config.model.sigma_max}], "
             f"VP / subVP β ∈ [{config.model.beta_min}, {config.model.beta_max}] (the paper's CIFAR-10 values); "
             f"Langevin corrector snr {t.snr}.", ""]
    if "sampler" in t.which:
        lines += ["## Table 1 analogue: samplers against exact samples", "",
                  "Rows as in the paper's Table 1, plus the corrector-only sampler (no predictor) and a second set "
                  "of exact samples (the noise floor of each distance). Lower SW / MMD² is better; Δ mean log p "
                  "is 0 for exact samples.", ""] + _sampler_tables(config, store)
    if "likelihood" in t.which:
        lines += ["## Table 2 analogue: bits/dim through the probability-flow ODE with the exact score", "",
                  "Bits/dim of continuous data (no dequantisation offset), exact divergence, "
                  f"rtol = {t.likelihood_rtol}, atol = {t.likelihood_atol}. ODE − exact = the method's bias: "
                  "the prior-mismatch term (known here) plus p_eps vs p_0 plus the solver error.", ""]
        lines += _likelihood_table(config, store)
    if "trained_likelihood" in t.which:
        lines += ["## Table 2 analogue: bits/dim of trained small models, with and without likelihood weighting", "",
                  f"Residual MLPs (`models/mlp.py`: width {t.train_width}, {t.train_blocks} blocks) trained "
                  f"{t.train_steps} steps (batch {t.train_batch_size}, lr {t.train_lr}) through `run_lib`'s train step "
                  "on fresh mixture draws (`score_sde/mixture_training.py`), with the paper's weighting λ = std² or "
                  "likelihood weighting λ = g² (no importance sampling). Bits/dim of continuous data through the "
                  f"probability-flow ODE on {t.nll_points} fresh mixture points (the same for every model), beside "
                  "their exact NLL. Three error bars: the 95% interval over data points (± after the value), the "
                  f"Hutchinson standard error of the mean over {t.nll_probes} Rademacher probes, and the spread of "
                  "the mean over the ODE tolerances swept (the first one is reported). ODE − exact is the learning "
                  "error plus the method's bias (the exact-score table above bounds the latter).", ""]
        lines += _trained_likelihood_table(config, store)
    if "trained_sampler" in t.which:
        lines += ["## Table 1 analogue with trained scores: the learning error added", "",
                  f"The same grid sampled with the trained score (the λ = std² models above) instead of the exact one, "
                  f"{t.trained_seeds} seeds of {t.trained_num_samples} samples (fewer than the exact-score grid: "
                  "the noise floor, row 'exact samples', is measured at this size and is higher). The difference "
                  "from the exact-score table is the learning error.", ""] + _sampler_tables(config, store,
                                                                                             "trained_sampler")
    if "digits" in t.which:
        lines += _digits_section(config, store)
    lines += _claims_section(store.get("claims", []))
    if paper is not None:
        lines.append(paper_results.markdown(paper, ours))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots (PIL; no matplotlib)
# ---------------------------------------------------------------------------------------------
def _panel(draw, box, series: dict, floor: float | None, title: str, xr, yr) -> None:
    """Log-log scatter with error bars: ``series[name] = [(nfe, mean, half)]``, a dashed noise floor."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0 + 4, y0 + 3), title, fill=(0, 0, 0))
    sx = lambda v: x0 + 30 + (math.log10(v) - xr[0]) / (xr[1] - xr[0] + 1e-9) * (x1 - x0 - 45)
    sy = lambda v: y1 - 20 - (math.log10(max(v, 1e-12)) - yr[0]) / (yr[1] - yr[0] + 1e-9) * (y1 - y0 - 40)
    if floor:
        for x in range(int(x0 + 2), int(x1 - 2), 8):
            draw.line((x, sy(floor), x + 4, sy(floor)), fill=COLORS[T.EXACT])
    for name, points in series.items():
        for nfe, mean, half in points:
            if not mean > 0:
                continue
            cx, cy = sx(nfe), sy(mean)
            if half == half and mean - half > 0:
                draw.line((cx, sy(mean + half), cx, sy(mean - half)), fill=COLORS[name])
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=COLORS[name])
    draw.text((x0 + 4, y1 - 14), f"NFE 10^{xr[0]:.1f}..10^{xr[1]:.1f}, SW 10^{yr[0]:.1f}..10^{yr[1]:.1f}",
              fill=(80, 80, 80))


def plots(config, store: dict, workdir: str) -> list[str]:
    """``sampler_error.png`` (SW vs score evaluations per dim × SDE) and ``samples_2d.png``."""
    t = config.tables
    digits = [_digits_plot(config, store, workdir)] if store.get("digits", {}).get("fd") else []
    if "sampler" not in t.which:
        return digits
    samplers = [T.parse_sampler(s) for s in t.samplers]
    panels = {}
    for dim in t.dims:
        for s in t.sdes:
            series = {}
            for p in list(t.predictors) + [T.CORRECTOR_ONLY]:
                pts = [(smp.nfe, *_ci(_cell(store, dim, s, p, smp.name), "sw")) for smp in samplers
                       if (p == T.CORRECTOR_ONLY) == (not smp.predictor)]
                series[p] = [q for q in pts if not math.isnan(q[1])]
            panels[(dim, s)] = (series, _ci(_cell(store, dim, s, T.EXACT, "-"), "sw")[0])
    values = [m for series, _ in panels.values() for pts in series.values() for _, m, _ in pts if m > 0]
    nfes = [smp.nfe for smp in samplers]
    if not values:
        return digits
    xr = (math.log10(min(nfes)) - 0.1, math.log10(max(nfes)) + 0.1)
    yr = (math.log10(min(values)) - 0.2, math.log10(max(values)) + 0.2)
    w, h = 300, 220
    image = Image.new("RGB", (w * len(t.sdes), h * len(t.dims) + 24), "white")
    draw = ImageDraw.Draw(image)
    x = 4
    for name, color in COLORS.items():
        draw.text((x, 6), ROW_LABELS[name], fill=color)
        x += 7 * len(ROW_LABELS[name]) + 14
    for i, dim in enumerate(t.dims):
        for j, s in enumerate(t.sdes):
            series, floor = panels[(dim, s)]
            _panel(draw, (j * w + 2, 24 + i * h + 2, (j + 1) * w - 2, 24 + (i + 1) * h - 2), series, floor,
                   f"{dim}-D {SDE_LABELS[s]}: sliced W1 vs NFE", xr, yr)
    paths = digits + [os.path.join(workdir, "sampler_error.png")]
    image.save(paths[-1])
    if 2 in t.dims:
        paths.append(_samples_plot(config, store, workdir))
    if "trained_sampler" in t.which and 2 in t.trained_dims:
        paths.append(_samples_plot(config, store, workdir, "trained_sampler"))
    return paths


def _samples_plot(config, store: dict, workdir: str, table: str = "sampler") -> str:
    """2-D samples (first seed) of the exact sampler and each predictor at P<N> and PC<N>, per SDE.

    ``table='trained_sampler'``: with the trained score, to ``samples_2d_trained.png``.
    """
    t = config.tables
    g = _grid(config, t.trained_samplers if table == "trained_sampler" else None)
    columns = [(T.EXACT, "-")] + [(p, n) for p in t.predictors for n in (g["P"], g["PC"]) if n]
    columns += [(T.CORRECTOR_ONLY, g["C2"])] if g["C2"] else []
    size = 170
    image = Image.new("RGB", (size * len(columns), size * len(t.sdes)), "white")
    draw = ImageDraw.Draw(image)
    for i, s in enumerate(t.sdes):
        for j, (p, n) in enumerate(columns):
            x0, y0 = j * size, i * size
            draw.rectangle((x0 + 1, y0 + 1, x0 + size - 2, y0 + size - 2), outline=(0, 0, 0))
            draw.text((x0 + 4, y0 + 3), f"{SDE_LABELS[s]} {ROW_LABELS[p]} {n if n != '-' else ''}", fill=(0, 0, 0))
            cell = _cell(store, 2, s, p, n, table)
            for px, py in (cell or {}).get("preview", []):
                u, v = x0 + size / 2 + px * size / 11, y0 + size / 2 - py * size / 11
                if x0 < u < x0 + size and y0 < v < y0 + size:
                    draw.point((u, v), fill=COLORS[p])
    path = os.path.join(workdir, "samples_2d_trained.png" if table == "trained_sampler" else "samples_2d.png")
    image.save(path)
    return path


def _digits_plot(config, store: dict, workdir: str, scale: int = 4) -> str:
    """``digits_samples.png``: per row the first samples of one digits-FD cell (the floor first), labelled."""
    fd = store["digits"]["fd"]
    keys = [k for k in ["real_digits"] if k in fd] + sorted(k for k in fd if k != "real_digits")
    side, label_w = 8 * scale, 260
    image = Image.new("L", (label_w + (side + 2) * PREVIEW_DIGITS, (side + 2) * len(keys)), 255)
    draw = ImageDraw.Draw(image)
    for i, key in enumerate(keys):
        y = i * (side + 2)
        draw.text((2, y + side // 3), f"{key}: {fd[key]['fd']:.1f}", fill=0)
        for j, pixels in enumerate(fd[key]["preview"][:PREVIEW_DIGITS]):
            digit = Image.fromarray(np.asarray(pixels, np.uint8).reshape(8, 8)).resize((side, side), Image.NEAREST)
            image.paste(digit, (label_w + j * (side + 2), y))
    path = os.path.join(workdir, "digits_samples.png")
    image.save(path)
    return path
