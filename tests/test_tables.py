"""The tables job (``score_sde.tables``) and the published numbers it shows (``configs/tables/paper.json``)."""
from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.tables import quick
from score_sde import paper_results, tables
from tests.helpers import SDE_NAMES, make_sde


def tiny_config(**changes):
    """The quick config cut to one SDE, two samplers, 2 seeds of 200 samples (seconds to run)."""
    config = quick.get_config()
    t = config.tables
    t.which = ("sampler", "likelihood", "paper")
    t.sdes = ("vpsde",)
    t.predictors = ("reverse_diffusion",)
    t.samplers = ("P30", "PC30")
    t.dims = (2,)
    t.seeds = 2
    t.num_samples = 200
    t.projections = 16
    t.likelihood_points = 8
    for key, value in changes.items():
        t[key] = value
    return config


# ---------------------------------------------------------------------------------------------
# The published numbers
# ---------------------------------------------------------------------------------------------
def test_paper_file_has_the_papers_shape_and_every_cell_a_source():
    paper = paper_results.load_paper()
    shapes = {name: (len(paper[name]["rows"]), len(paper[name]["columns"])) for name in paper_results.TABLE_NAMES}
    assert shapes == {"table1": (3, 8), "table5": (3, 8), "table2": (16, 2), "table3": (14, 2),
                      "checkpoints": (11, 4)}
    for name in paper_results.TABLE_NAMES:
        for row, column, cell in paper_results.iter_cells(paper, name):
            assert cell["source"].strip(), (name, row, column)
            assert cell["value"] is not None or cell["note"].strip(), (name, row, column)
    for checkpoint, model in paper["checkpoints"]["models"].items():
        assert os.path.exists(os.path.join(paper_results.REPO_ROOT, model["config"])), checkpoint
        for key in ("table2_row", "table3_row"):
            assert model[key] is None or model[key] in paper[key[:6]]["rows"], (checkpoint, key)


def test_paper_file_check_names_a_cell_without_source():
    paper = paper_results.load_paper()
    broken = copy.deepcopy(paper)
    del broken["table1"]["cells"]["reverse diffusion"]["VP PC1000"]["source"]
    with pytest.raises(ValueError, match="table1, row 'reverse diffusion', column 'VP PC1000': no source"):
        paper_results.check_paper(broken)
    broken = copy.deepcopy(paper)
    del broken["table2"]["cells"]["Glow"]["FID (ODE)"]["note"]
    with pytest.raises(ValueError, match="empty without a note"):
        paper_results.check_paper(broken)


def test_readme_and_paper_agree_where_they_report_the_same_model():
    """Two sources transcribed separately: the README's cells equal the paper's rows for the same model."""
    paper = paper_results.load_paper()
    for checkpoint, model in paper["checkpoints"]["models"].items():
        cells = paper["checkpoints"]["cells"][checkpoint]
        if model["table2_row"]:
            row = paper["table2"]["cells"][model["table2_row"]]
            for column in ("NLL", "FID (ODE)"):
                assert cells[column]["value"] == row[column]["value"], (checkpoint, column)
        if model["table3_row"]:
            row = paper["table3"]["cells"][model["table3_row"]]
            assert (cells["FID"]["value"], cells["IS"]["value"]) == (row["FID"]["value"], row["IS"]["value"])


# ---------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [2, 16])
def test_fast_mixture_is_toys_mixture(dim):
    mixture = tables.make_mixture(dim)
    reference = mixture.as_toy()
    x = 1.3 * mixture.sample(jax.random.PRNGKey(0), 32)
    for name in SDE_NAMES:
        sde = make_sde(name)
        for t in (0.0, 1e-3, 0.5, 1.0):
            vec_t = jnp.full(32, t)
            np.testing.assert_allclose(mixture.score(sde, x, vec_t), reference.score(sde, x, vec_t),
                                       rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(mixture.log_prob(sde, x, vec_t), reference.log_prob(sde, x, vec_t), rtol=1e-5)


def test_exact_score_sampler_error_shrinks_with_steps():
    """With the exact score only discretisation is left: 30 steps are far worse than 300, which reach the floor."""
    config = tiny_config(num_samples=2000, seeds=2, projections=64)
    truth = tables.Truth(config, 2)
    sw = {name: np.mean(tables.sampler_cell(config, truth, "vesde", "reverse_diffusion",
                                            tables.parse_sampler(name))["sw"])
          for name in ("P10", "P300")}
    floor = np.mean(tables.sampler_cell(config, truth, "vesde", tables.EXACT, tables.parse_sampler("P10"))["sw"])
    assert sw["P10"] > 2 * sw["P300"], sw
    assert sw["P300"] < 1.5 * floor, (sw, floor)


def test_parse_sampler_follows_the_papers_names():
    assert tables.parse_sampler("C2000") == tables.Sampler("C2000", 1000, False, 2)
    assert tables.parse_sampler("PC1000").nfe == tables.parse_sampler("P2000").nfe == 2000
    with pytest.raises(ValueError, match="config.tables.samplers"):
        tables.parse_sampler("Q100")


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------
def test_tiny_job_writes_tables_and_checks_itself(tmp_path):
    store = tables.run(tiny_config(), str(tmp_path))
    for name in ("tables.json", "tables.md", "sampler_error.png", "samples_2d.png", "tables_log.txt"):
        assert (tmp_path / name).exists(), name
    text = (tmp_path / "tables.md").read_text()
    assert "Which of the paper's claims hold" in text and "Table 1: Comparing" in text
    assert set(store["sampler"]) == {"d2/vpsde/exact_samples/-", "d2/vpsde/reverse_diffusion/P30",
                                     "d2/vpsde/reverse_diffusion/PC30"}
    cell = store["likelihood"]["d2/vpsde"]
    # The exact model's bits/dim equal the exact NLL of p_eps up to the prior term, within the solver's error.
    assert np.max(np.abs(cell["solver"])) < 1e-3
    assert json.loads((tmp_path / "tables.json").read_text())["claims"] == store["claims"]


def test_killed_run_resumes_without_recomputing(tmp_path, monkeypatch):
    config = tiny_config(which=("sampler",))
    calls = []
    real = tables.sampler_cell

    def counted(*args):
        calls.append(args[4].name if args[3] != tables.EXACT else "exact")
        if len(calls) == 2 and kill:
            raise KeyboardInterrupt  # the job is killed inside its second cell
        return real(*args)

    monkeypatch.setattr(tables, "sampler_cell", counted)
    kill = True
    with pytest.raises(KeyboardInterrupt):
        tables.run(config, str(tmp_path))
    assert len(json.loads((tmp_path / "tables.json").read_text())["sampler"]) == 1
    kill, calls[:] = False, []
    tables.run(config, str(tmp_path))
    assert calls == ["P30", "PC30"]  # the stored exact-samples cell is not computed again
    calls[:] = []
    tables.run(config, str(tmp_path))
    assert calls == []


def test_bad_input_fails_before_writing(tmp_path):
    with pytest.raises(ValueError, match="config.tables.which: unknown table 'table9'"):
        tables.run(tiny_config(which=("table9",)), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="config.tables.samplers"):
        tables.run(tiny_config(samplers=("P30", "X2")), str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    workdir = tmp_path / "c"
    tables.run(tiny_config(which=("sampler",), samplers=("P30",)), str(workdir))
    before = (workdir / "tables.json").read_text()
    with pytest.raises(ValueError, match="num_samples: 200 there, 300 now"):
        tables.run(tiny_config(which=("sampler",), samplers=("P30",), num_samples=300), str(workdir))
    assert (workdir / "tables.json").read_text() == before


def _write_summary(folder, checkpoints: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump({"title": "test", "checkpoints": checkpoints}, f)


def test_our_numbers_come_from_eval_summaries(tmp_path):
    root = tmp_path / "runs"
    run = root / "vp" / "cifar10_ddpmpp_continuous"
    _write_summary(run / "eval_pc", {"8": {"FID": 3.1, "IS": 9.2}, "9": {"FID": 2.7, "IS": 9.5}, "12": {"FID": 2.9}})
    _write_summary(run / "eval_bpd", {"9": {"bits/dim (test)": 3.4}, "26": {"bits/dim (test)": 3.17}})
    _write_summary(root / "vp" / "cifar10_ddpm" / "eval_ode", {"5": {"FID (stand-in features)": 40.0}})
    _write_summary(root / "vp" / "cifar10_ddpm" / paper_results.table1_folder("reverse diffusion", "VP PC1000"),
                   {"1": {"FID": 3.3}})
    paper = paper_results.load_paper()
    ours = paper_results.measure_all(paper, str(root))
    got = ours["vp/cifar10_ddpmpp_continuous"]
    assert (got["FID"]["value"], got["FID"]["ckpt"], got["IS"]["value"]) == (2.7, "9", 9.5)  # smallest FID
    assert (got["NLL"]["value"], got["NLL"]["ckpt"]) == (3.17, "26")  # the last checkpoint
    text = paper_results.markdown(paper, ours)
    assert "| DDPM++ cont. (VP) | vp/cifar10_ddpmpp_continuous | 2.55 | 2.70 (ckpt 9) | 9.58 | 9.50 (ckpt 9) |" in text
    assert "40.00 (FID (stand-in features)) (ckpt 5)" in text  # never shown as a plain FID
    assert "- reverse diffusion, VP PC1000: paper 3.18 ± 0.01, ours 3.30 (ckpt 1): `python main.py" in text


def test_eval_workdir_of_another_config_is_refused(tmp_path):
    run = tmp_path / "runs" / "vp" / "cifar10_ddpmpp_continuous"
    _write_summary(run / "eval_pc", {"1": {"FID": 3.0, "IS": 9.0}})
    with open(run / "config.json", "w") as f:
        json.dump({"training": {"sde": "vesde", "continuous": True}, "model": {"name": "ncsnpp", "num_res_blocks": 4},
                   "data": {"dataset": "CIFAR10"}}, f)
    config = tiny_config(which=("paper",), eval_root=str(tmp_path / "runs"))
    expected = "training.sde is 'vesde' there, 'vpsde' in configs/vp/cifar10_ddpmpp_continuous.py"
    with pytest.raises(ValueError, match=expected):
        tables.run(config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_main_runs_the_tables_mode_and_a_bad_tables_config_is_one_line(tmp_path):
    """``--mode tables`` reaches score_sde.tables.run; its config errors end as one ``error:`` line, nothing written."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = tmp_path / "w"
    proc = subprocess.run([sys.executable, "main.py", "--config", "configs/tables/quick.py", "--mode", "tables",
                           "--workdir", str(workdir), "--config.tables.seeds=1"],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-2:] == [
        "error: Invalid tables config:", "  config.tables.seeds = 1: a confidence interval needs at least 2 seeds"]
    assert not workdir.exists()


# ---------------------------------------------------------------------------------------------
# Trained models (the learning error)
# ---------------------------------------------------------------------------------------------
def trained_config(**changes):
    """Trained tables only: one SDE in 2-D, a tiny network trained 20 steps (seconds to run)."""
    config = tiny_config(which=("likelihood",), sdes=("vpsde",), trained_dims=(2,), train_steps=20, train_width=16,
                         train_blocks=1, train_batch_size=64, trained_samplers=("P30",), trained_num_samples=100,
                         trained_seeds=2, nll_points=8, nll_probes=2, nll_tolerances=(1e-3, 1e-2))
    for key, value in changes.items():
        config.tables[key] = value
    return config


def test_trained_tables_extend_a_stored_run_and_resume(tmp_path, monkeypatch):
    tables.run(trained_config(), str(tmp_path))  # a store made without the trained tables
    config = trained_config(which=("likelihood", "trained_likelihood", "trained_sampler"))
    store = tables.run(config, str(tmp_path))
    assert set(store["train"]) == {"d2/vpsde/plain", "d2/vpsde/likelihood"}
    for cell in store["train"].values():
        assert (tmp_path / cell["file"]).exists() and cell["steps"] == 20
    cell = store["trained_likelihood"]["d2/vpsde/likelihood"]
    assert len(cell["ode"]) == 8 and np.all(np.isfinite(cell["ode"]))
    assert len(cell["probe_means"]) == 2 and len(cell["tol_means"]) == 2
    # The per-point value is the mean over the probes.
    np.testing.assert_allclose(np.mean(cell["ode"]), np.mean(cell["probe_means"]), rtol=1e-6)
    # The exact NLL column is -log2 p_0(x) / D of the mixture at those points.
    mixture = tables.make_mixture(2)
    x = mixture.sample(jax.random.fold_in(jax.random.PRNGKey(config.seed + 3), 2), 8)
    np.testing.assert_allclose(cell["exact"], -np.asarray(mixture.log_prob(make_sde("vpsde"), x, jnp.zeros(8)))
                               / (2 * np.log(2)), rtol=1e-5)
    assert set(store["trained_sampler"]) == {"d2/vpsde/exact_samples/-", "d2/vpsde/reverse_diffusion/P30"}
    text = (tmp_path / "tables.md").read_text()
    assert "bits/dim of trained small models" in text and "2-D mixture, trained score: sliced W1" in text
    claims = {c["claim"].split(" (")[0]: c for c in store["claims"]}
    assert [i["where"] for i in claims["likelihood weighting"]["instances"]] == ["2-D VP"]

    def no_training(*args):
        raise AssertionError("a stored model was trained again")

    monkeypatch.setattr(tables.mixture_training, "train", no_training)
    tables.run(config, str(tmp_path))
    before = (tmp_path / "tables.json").read_text()
    with pytest.raises(ValueError, match="train_steps: 20 there, 30 now"):
        tables.run(trained_config(which=("trained_likelihood",), train_steps=30), str(tmp_path))
    assert (tmp_path / "tables.json").read_text() == before


def _bpd_cell(values, tol_means=(0.0,)):
    return {"ode": list(values), "tol_means": list(tol_means)}


def test_bits_per_dim_claims_use_every_error_bar():
    """Holds when the paired interval is above 0; the solver-tolerance spread widens it into 'inconclusive'."""
    from score_sde import tables_report

    rng = np.random.default_rng(0)
    better = rng.normal(3.0, 0.5, 64)
    worse = better + 0.1 + rng.normal(0.0, 0.01, 64)
    holds = tables_report._bpd_claim("c", "p", [("here", _bpd_cell(worse), _bpd_cell(better))])
    assert holds["overall"]["bits/dim"] == "holds"
    wide = tables_report._bpd_claim("c", "p", [("here", _bpd_cell(worse, (3.0, 3.2)), _bpd_cell(better))])
    assert wide["overall"]["bits/dim"] == "inconclusive"
    reverse = tables_report._bpd_claim("c", "p", [("here", _bpd_cell(better), _bpd_cell(worse))])
    assert reverse["overall"]["bits/dim"] == "does not hold"
