"""The tables of ``docs/performance.md``'s GPU figures from the JSON files of ``benchmarks/gpu_suite.sh``.

Reads every ``*.json`` a benchmark wrote with ``--out`` into ``FOLDER`` (named ``<script>_<label>.json`` by the
suite, ``label`` the model: ``benchmark`` or ``full``), writes them merged into one file and prints, per model, our
figures beside the PyTorch port's with their ratios:

* train step: median seconds per step, one step per call (and ``n`` fused per call, ours only, from
  ``train_step_fused_<label>.json`` and ``train_step_unrolled_<label>.json`` too, with their fusion); ours / PyTorch
  < 1 means ours is faster (the goal: ≤ 1);
* one score evaluation: seconds;
* PC sampler: seconds per step (two score evaluations) and per evaluation / one score evaluation (the goal: ≤ 1.05);
* likelihood: NFE and seconds per NFE (ours: the JAX solver, one compiled program; the port: scipy RK45), and ours per
  NFE / our floor (one drift + divergence evaluation);
* fast samplers (``fastsamplers_<label>.json``): NFE, seconds per evaluation and its ratio to one score evaluation.

This script runs nothing on a device: the backend line it prints is the one the benchmarks recorded. ``FOLDER`` may
also hold ``results.json`` files of earlier runs (renamed apart): their parts join the tables.

    python benchmarks/gpu_summary.py FOLDER [--merged results.json] [--markdown summary.md]
"""
from __future__ import annotations

import argparse
import glob
import json
import os


def load(folder: str) -> dict:
    """``{part: contents}`` of the JSON files in ``folder``, by file stem.

    A file written with ``--merged`` (``results.json``: ``{part: contents}``) adds its parts, so the results of two
    suite runs (the second with ``PARTS`` of what the first left out) make one table; files are read in name order,
    and a later file's part replaces an earlier one's.
    """
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        if "script" not in data and data and all(isinstance(v, dict) and "script" in v for v in data.values()):
            runs.update(data)
        else:
            runs[os.path.splitext(os.path.basename(path))[0]] = data
    return runs


def _fmt(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ratio(a, b) -> str:
    return "—" if a is None or b is None else f"{a / b:.2f}"


def _get(run: dict | None, *keys):
    """``run['results'][keys[0]][keys[1]]...``, or None where any is missing (a part that did not run)."""
    node = run and run.get("results")
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _first(run: dict | None, prefix: str) -> str | None:
    """The first results key of ``run`` starting with ``prefix`` (``pc_N50``, ``jax_dop853``...)."""
    return next((k for k in (_get(run) or {}) if k.startswith(prefix)), None) if run else None


def model_table(runs: dict, label: str) -> str:
    """The markdown table of one model (``label``) from the runs present; absent parts show as —."""
    train, sampling, lik, torch = (runs.get(f"{s}_{label}") for s in ("train_step", "sampling", "likelihood",
                                                                        "pytorch"))
    settings = next((r["settings"] for r in (train, sampling, lik, torch) if r), {})
    lines = [f"### {label}: --config {settings.get('config', '?')}, batch {settings.get('batch', '?')}", "",
             "| figure | ours | PyTorch port | ours / PyTorch |", "|---|---|---|---|"]
    steps = {}  # {row name: figures}; the suite times fused steps in later parts, scanned and unrolled
    for run in (train, runs.get(f"train_step_fused_{label}"), runs.get(f"train_step_unrolled_{label}")):
        devices = _get(run, "devices") or {}
        first = next(iter(devices.values()), {}) if devices else {}
        for n, figures in first.get("steps", {}).items():
            how = f", {first['fusion']}" if n != "1" and "fusion" in first else ""
            steps[f"{n} fused per call{how}" if n != "1" else "1 per call"] = figures
    ours_step = steps.get("1 per call", {}).get("median_s_per_step")
    torch_step = _get(torch, "train_step", "median_s_per_step")
    lines.append(f"| train step, s (median, 1 per call) | {_fmt(ours_step)} | {_fmt(torch_step)} | "
                 f"{_ratio(ours_step, torch_step)} |")
    for row, figures in steps.items():
        if row != "1 per call":
            lines.append(f"| train step, s (median, {row}) | {_fmt(figures['median_s_per_step'])} | — | "
                         f"{_ratio(figures['median_s_per_step'], torch_step)} |")
    ours_eval, torch_eval = _get(sampling, "score_eval", "wall_s"), _get(torch, "score_eval", "wall_s")
    lines.append(f"| one score evaluation, s (min) | {_fmt(ours_eval)} | {_fmt(torch_eval)} | "
                 f"{_ratio(ours_eval, torch_eval)} |")
    ours_pc, torch_pc = _first(sampling, "pc_N"), _first(torch, "pc_N")
    ours_step_s, torch_step_s = _get(sampling, ours_pc, "per_step_s"), _get(torch, torch_pc, "per_step_s")
    lines.append(f"| PC sampler ({ours_pc or torch_pc or 'pc'}), s per step (2 evaluations) | {_fmt(ours_step_s)} | "
                 f"{_fmt(torch_step_s)} | {_ratio(ours_step_s, torch_step_s)} |")
    lines.append(f"| PC s per evaluation / one score evaluation (goal ≤ 1.05) | "
                 f"{_fmt(_get(sampling, ours_pc, 'ratio_to_score_eval'), 3)} | "
                 f"{_fmt(_get(torch, torch_pc, 'ratio_to_score_eval'), 3)} | |")
    ours_lik = _first(lik, "jax_") or _first(lik, "scipy_")
    ours_nfe, torch_nfe = _get(lik, ours_lik, "per_nfe_s"), _get(torch, "likelihood_RK45", "per_nfe_s")
    lines.append(f"| likelihood ({ours_lik or '—'} / scipy RK45), s per NFE | {_fmt(ours_nfe)} | {_fmt(torch_nfe)} | "
                 f"{_ratio(ours_nfe, torch_nfe)} |")
    lines.append(f"| likelihood NFE | {_get(lik, ours_lik, 'nfe') or '—'} | "
                 f"{_get(torch, 'likelihood_RK45', 'nfe') or '—'} | |")
    lines.append(f"| likelihood s per NFE / floor (one drift + divergence) | "
                 f"{_fmt(_get(lik, ours_lik, 'ratio_to_floor'), 3)} | | |")
    return "\n".join(lines)


def fast_table(name: str, run: dict) -> str:
    """The fast samplers of one ``sampling.py --skip_pc`` run: NFE, seconds per evaluation, ratio (goal ≤ 1.05)."""
    lines = [f"### {name}: --config {run['settings']['config']}, batch {run['settings']['batch']}", "",
             "| sampler | NFE | s per evaluation | / one score evaluation measured right after (goal ≤ 1.05) |",
             "|---|---|---|---|"]
    for key, figures in run["results"].items():
        if key.startswith("fast_"):
            lines.append(f"| {key[5:]} | {figures['nfe']} | {_fmt(figures['per_eval_s'])} | "
                         f"{_fmt(figures['ratio_to_score_eval'], 3)} |")
    return "\n".join(lines)


def summary(runs: dict) -> str:
    """Backend lines, one table per model label found in ``runs`` and one per fast-sampler run."""
    backends = sorted({json.dumps(r["backend"], sort_keys=True) for r in runs.values()})
    labels = sorted({name.split("_")[-1] for name in runs if not name.startswith("fastsamplers_")})
    parts = ["backends recorded: " + "; ".join(backends) if backends else "no results found"]
    parts += [model_table(runs, label) for label in labels]
    parts += [fast_table(name, run) for name, run in runs.items() if name.startswith("fastsamplers_")]
    return "\n\n".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--merged", help="write every run, keyed by file name, into this JSON file")
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args(argv)
    runs = load(args.folder)
    text = summary(runs)
    print(text)
    if args.merged:
        with open(args.merged, "w") as f:
            json.dump(runs, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
