"""The paper's published numbers beside ours, and the commands that measure ours at full scale.

The numbers live in ``configs/tables/paper.json`` (transcribed from arXiv 2011.13456 and the
released checkpoints' README; every cell names its table, row and column). This module checks
that file's shape, reads the numbers a workdir's evaluation measured (``summary.json`` of
``run_lib.evaluate``) and writes the paper's tables in markdown with our column beside them.

Layout of measured runs (``config.tables.eval_root``)::

    <eval_root>/<checkpoint>/            e.g. runs/vp/cifar10_ddpmpp_continuous (the README's name)
        checkpoints/checkpoint_<n>       the released checkpoint(s)
        eval_pc/summary.json             Table 3: FID / IS with the config's PC sampler
        eval_ode/summary.json            Table 2: FID of probability-flow ODE samples
        eval_bpd/summary.json            Table 2: bits/dim on the test split
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Iterator


class TablesError(ValueError):
    """A tables job cannot run as configured (bad config, data file or workdir); nothing was written."""

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_FILE = os.path.join(REPO_ROOT, "configs", "tables", "paper.json")
TABLE_NAMES = ("table1", "table5", "table2", "table3", "checkpoints")
EVAL_FOLDERS = {"FID": "eval_pc", "IS": "eval_pc", "FID (ODE)": "eval_ode", "NLL": "eval_bpd"}
# Fields that identify a model: a workdir trained with other values is another model.
IDENTITY_FIELDS = (("training", "sde"), ("training", "continuous"), ("model", "name"),
                   ("model", "num_res_blocks"), ("data", "dataset"))
# Table 1's models: the DDPM architecture trained with the discrete SMLD / DDPM objectives (Appendix G).
TABLE1_CONFIGS = {"VE": "configs/ve/cifar10_ddpm.py", "VP": "configs/vp/ddpm/cifar10.py"}
TABLE1_CHECKPOINTS = {"VE": None, "VP": "vp/cifar10_ddpm"}  # the README releases no VE one
TABLE1_PREDICTORS = {"ancestral sampling": ("ancestral_sampling", False),
                     "reverse diffusion": ("reverse_diffusion", False),
                     "probability flow": ("reverse_diffusion", True)}


def load_paper(path: str = PAPER_FILE) -> dict:
    """The published numbers (see the module docstring), checked by :func:`check_paper`."""
    with open(path) as f:
        paper = json.load(f)
    check_paper(paper, path)
    return paper


def check_paper(paper: dict, path: str = PAPER_FILE) -> None:
    """Raise ``ValueError`` listing every cell without a source, every missing or extra cell,
    and every empty cell without a note saying why it is empty."""
    problems = []
    for name in TABLE_NAMES:
        table = paper.get(name)
        if table is None:
            problems.append(f"table {name!r} is missing")
            continue
        rows, columns, cells = table.get("rows", []), table.get("columns", []), table.get("cells", {})
        if set(cells) != set(rows):
            problems.append(f"{name}: rows {sorted(set(cells) ^ set(rows))} are in only one of 'rows' and 'cells'")
        for row in rows:
            row_cells = cells.get(row, {})
            if set(row_cells) != set(columns):
                problems.append(f"{name}, row {row!r}: columns {sorted(row_cells)} != {columns}")
            for column, cell in row_cells.items():
                where = f"{name}, row {row!r}, column {column!r}"
                if not str(cell.get("source", "")).strip():
                    problems.append(f"{where}: no source")
                value = cell.get("value")
                if value is None and not str(cell.get("note", "")).strip():
                    problems.append(f"{where}: empty without a note saying why")
                if value is not None and not isinstance(value, (int, float)):
                    problems.append(f"{where}: value {value!r} is not a number")
    if problems:
        raise TablesError(f"{path} is malformed:\n  " + "\n  ".join(problems))


def iter_cells(paper: dict, name: str) -> Iterator[tuple[str, str, dict]]:
    """``(row, column, cell)`` of table ``name`` in the paper's order."""
    table = paper[name]
    for row in table["rows"]:
        for column in table["columns"]:
            yield row, column, table["cells"][row][column]


def format_cell(cell: dict | None) -> str:
    """``'4.98 ± 0.06'``, ``'≤ 3.70'``, or ``'–'`` for an empty cell."""
    if cell is None or cell.get("value") is None:
        return "–"
    text = f"{cell['value']:.2f}"
    if cell.get("std") is not None:
        text += f" ± {cell['std']:.2f}"
    if cell.get("bound"):
        text = "≤ " + text
    return text


# ---------------------------------------------------------------------------------------------
# Commands that measure our numbers
# ---------------------------------------------------------------------------------------------
def eval_command(checkpoint: str, config_path: str, column: str, root: str = "RUNS") -> str:
    """The ``main.py --mode eval`` command that measures ``column`` of a released checkpoint.

    ``FIRST`` / ``LAST`` stand for the checkpoint numbers in the released folder: the README's
    first (smaller) one is behind FID / IS (Table 3), the last one behind FID (ODE) / NLL (Table 2).
    """
    base = (f"python main.py --config {config_path} --mode eval --workdir {root}/{checkpoint} "
            f"--eval_folder {EVAL_FOLDERS[column]} --config.eval.enable_loss=False")
    if column in ("FID", "IS"):
        return (base + " --config.eval.enable_sampling=True --config.eval.enable_bpd=False"
                " --config.eval.num_samples=50000 --config.eval.begin_ckpt=FIRST --config.eval.end_ckpt=FIRST")
    if column == "FID (ODE)":
        return (base + " --config.sampling.method=ode --config.eval.enable_sampling=True"
                " --config.eval.enable_bpd=False --config.eval.num_samples=50000"
                " --config.eval.begin_ckpt=LAST --config.eval.end_ckpt=LAST")
    if column == "NLL":
        return (base + " --config.eval.enable_sampling=False --config.eval.enable_bpd=True"
                " --config.eval.bpd_dataset=test --config.eval.begin_ckpt=LAST --config.eval.end_ckpt=LAST")
    raise ValueError(f"no evaluation measures column {column!r}; use one of {list(EVAL_FOLDERS)}")


def table1_folder(row: str, column: str) -> str:
    """The eval folder of one Table 1 cell, e.g. ``eval_t1_vp_pc1000_reverse_diffusion``."""
    sde, sampler = column.split()
    return f"eval_t1_{sde}_{sampler}_{row.replace(' ', '_')}".lower()


def table1_command(row: str, column: str, snr: float | None, root: str = "RUNS") -> str | None:
    """The command for one cell of Table 1 (``column`` like ``'VP PC1000'``), or None for P2000.

    P2000 needs the paper's interpolation between the 1000 trained noise scales (Appendix G),
    which ``models.utils.get_score_fn`` does not do: a discrete model run with 2000 scales
    would be fed time labels it was never trained on.
    """
    sde, sampler = column.split()
    if sampler == "P2000":
        return None
    predictor, probability_flow = TABLE1_PREDICTORS[row]
    workdir = f"{root}/{TABLE1_CHECKPOINTS[sde] or 've/cifar10_ddpm'}"
    flags = [f"--config.sampling.predictor={predictor}",
             f"--config.sampling.probability_flow={probability_flow}"]
    if sampler == "P1000":
        flags.append("--config.sampling.corrector=none")
    elif sampler == "PC1000":
        flags += ["--config.sampling.corrector=langevin", f"--config.sampling.snr={snr}",
                  "--config.sampling.n_steps_each=1"]
    elif sampler == "C2000":
        flags = ["--config.sampling.predictor=none", "--config.sampling.corrector=langevin",
                 f"--config.sampling.snr={snr}", "--config.sampling.n_steps_each=2"]
    folder = table1_folder(row, column)
    return (f"python main.py --config {TABLE1_CONFIGS[sde]} --mode eval --workdir {workdir} "
            f"--eval_folder {folder} --config.eval.enable_loss=False --config.eval.enable_bpd=False "
            f"--config.eval.enable_sampling=True --config.eval.num_samples=50000 " + " ".join(flags))


# ---------------------------------------------------------------------------------------------
# Our measured numbers
# ---------------------------------------------------------------------------------------------
def _config_module(config_path: str):
    module = config_path[:-3].replace("/", ".") if config_path.endswith(".py") else config_path
    return importlib.import_module(module).get_config()


def check_workdir_config(workdir: str, config_path: str) -> None:
    """Raise ``ValueError`` if ``workdir/config.json`` (written by training) names another model.

    A workdir without ``config.json`` (a released checkpoint copied in) is taken on its name.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        theirs = json.load(f)
    ours = _config_module(config_path)
    diffs = []
    for section, field in IDENTITY_FIELDS:
        there = theirs.get(section, {}).get(field)
        here = ours[section].get(field) if section in ours else None
        if there != here:
            diffs.append(f"{section}.{field} is {there!r} there, {here!r} in {config_path}")
    if diffs:
        raise TablesError(f"{path} was written by a different config than {config_path}: " + "; ".join(diffs)
                          + ". Point config.tables.eval_root at the folder that holds this checkpoint's own run "
                          "(or move the run); nothing was written.")


def _read_summary(workdir: str, folder: str) -> dict | None:
    path = os.path.join(workdir, folder, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _fid_key(row: dict) -> str | None:
    """The FID column of a summary row: 'FID', else a labelled stand-in (never shown as FID)."""
    keys = [k for k in row if k.startswith("FID")]
    return "FID" if "FID" in keys else (keys[0] if keys else None)


def measured(eval_root: str, checkpoint: str, config_path: str) -> dict:
    """Our numbers for a released checkpoint: ``{column: {'value', 'label', 'ckpt', 'file'}}``.

    FID / IS: the checkpoint with the smallest FID in ``eval_pc`` (the paper's Table 3 rule);
    FID (ODE) and NLL: the last checkpoint in ``eval_ode`` / ``eval_bpd`` (Table 2's rule).
    Columns without a summary are absent.
    """
    workdir = os.path.join(eval_root, checkpoint)
    check_workdir_config(workdir, config_path)
    out = {}
    pc = _read_summary(workdir, EVAL_FOLDERS["FID"])
    if pc and pc.get("checkpoints"):
        scored = [(ck, row) for ck, row in pc["checkpoints"].items()
                  if _fid_key(row) and row[_fid_key(row)] is not None]
        if scored:
            ckpt, row = min(scored, key=lambda kv: kv[1][_fid_key(kv[1])])
            fid_key = _fid_key(row)
            file = os.path.join(workdir, EVAL_FOLDERS["FID"], "summary.json")
            out["FID"] = {"value": row[fid_key], "label": fid_key, "ckpt": ckpt, "file": file}
            is_key = fid_key.replace("FID", "IS")
            if row.get(is_key) is not None:
                out["IS"] = {"value": row[is_key], "label": is_key, "ckpt": ckpt, "file": file}
    nll_key = lambda r: "bits/dim (test)" if "bits/dim (test)" in r else None  # noqa: E731
    for column, key_of in (("FID (ODE)", _fid_key), ("NLL", nll_key)):
        summary = _read_summary(workdir, EVAL_FOLDERS[column])
        if not summary or not summary.get("checkpoints"):
            continue
        ckpt = max(summary["checkpoints"], key=int)
        row = summary["checkpoints"][ckpt]
        key = key_of(row)
        if key and row[key] is not None:
            out[column] = {"value": row[key], "label": key, "ckpt": ckpt,
                           "file": os.path.join(workdir, EVAL_FOLDERS[column], "summary.json")}
    return out


def measure_all(paper: dict, eval_root: str) -> dict:
    """:func:`measured` for every released checkpoint, and under ``'table1'`` the FID of every Table 1
    cell evaluated with its command (``{(row, column): measured}``); empty without ``eval_root``."""
    if not eval_root:
        return {}
    ours = {ck: measured(eval_root, ck, model["config"]) for ck, model in paper["checkpoints"]["models"].items()}
    ours["table1"] = {}
    for row, column, _ in iter_cells(paper, "table1"):
        sde = column.split()[0]
        workdir = os.path.join(eval_root, TABLE1_CHECKPOINTS[sde] or "ve/cifar10_ddpm")
        check_workdir_config(workdir, TABLE1_CONFIGS[sde])
        summary = _read_summary(workdir, table1_folder(row, column))
        if summary and summary.get("checkpoints"):
            ckpt = max(summary["checkpoints"], key=int)
            key = _fid_key(summary["checkpoints"][ckpt])
            if key:
                ours["table1"][(row, column)] = {"value": summary["checkpoints"][ckpt][key], "label": key, "ckpt": ckpt}
    return ours


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def _ours(value: dict | None) -> str:
    if not value:
        return "not measured"
    label = "" if value["label"] in ("FID", "IS", "bits/dim (test)") else f" ({value['label']})"
    return f"{value['value']:.2f}{label} (ckpt {value['ckpt']})"


def markdown(paper: dict, ours: dict) -> str:
    """The paper's Tables 1-3 and the checkpoint list, our numbers and commands beside them."""
    lines = ["## The paper's tables (CIFAR-10, published) beside ours", "",
             f"Published numbers from {paper['sources']['paper']['url']} and "
             f"{paper['sources']['readme']['url']}; each cell's source is in `configs/tables/paper.json`. "
             "Our column is read from `<eval_root>/<checkpoint>/eval_*/summary.json` when `config.tables.eval_root` "
             "points at evaluated runs; `RUNS` in the commands stands for that folder.", ""]
    t1, t5 = paper["table1"], paper["table5"]
    lines += [f"### {t1['title']}", "", t1["caption"], "",
              "| predictor | " + " | ".join(t1["columns"]) + " |", "|---" * (len(t1["columns"]) + 1) + "|"]
    for row in t1["rows"]:
        lines.append(f"| {row} | " + " | ".join(format_cell(t1["cells"][row][c]) for c in t1["columns"]) + " |")
    lines += ["", "Commands for Table 1 cells (snr from the paper's Table 5; one sampling run each, the paper "
              "reports mean ± std over five, e.g. with `--config.seed=1..5`):", ""]
    for row, column, cell in iter_cells(paper, "table1"):
        if cell.get("value") is None:
            continue
        command = table1_command(row, column, t5["cells"][row][column].get("value"))
        ours_t1 = ours.get("table1", {}).get((row, column))
        head = f"- {row}, {column}: paper {format_cell(cell)}, ours {_ours(ours_t1)}: "
        lines.append(head + (f"`{command}`" if command else
                     "not measurable as is: P2000 needs the paper's interpolation between trained noise scales "
                     "(Appendix G), which this port's score function does not do"))
    lines += ["", "The VE model of Table 1 (DDPM architecture, discrete SMLD objective) has no released checkpoint: "
              "train it first with `python main.py --config configs/ve/cifar10_ddpm.py --mode train "
              "--workdir RUNS/ve/cifar10_ddpm`.", ""]
    for name, columns in (("table2", ("NLL", "FID (ODE)")), ("table3", ("FID", "IS"))):
        table = paper[name]
        by_row = {m[f"{name}_row"]: ck for ck, m in paper["checkpoints"]["models"].items() if m[f"{name}_row"]}
        header = " | ".join(f"{c} (paper) | {c} (ours)" for c in columns)
        lines += [f"### {table['title']}", "", table["caption"], "",
                  f"| model | checkpoint | {header} |", "|---" * (2 + 2 * len(columns)) + "|"]
        for row in table["rows"]:
            ck = by_row.get(row)
            cells = []
            for column in columns:
                cells.append(format_cell(table["cells"][row][column]))
                cells.append(_ours(ours.get(ck, {}).get(column)) if ck else "no released checkpoint")
            lines.append(f"| {row} | {ck or '–'} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### Commands that measure our column (GPU; see docs/tables.md for the recipe)", ""]
    for ck, model in paper["checkpoints"]["models"].items():
        for column in paper["checkpoints"]["columns"]:
            if paper["checkpoints"]["cells"][ck][column].get("value") is not None:
                lines.append(f"- {ck}, {column} (README: {format_cell(paper['checkpoints']['cells'][ck][column])}): "
                             f"`{eval_command(ck, model['config'], column)}`")
    lines.append("")
    return "\n".join(lines)
