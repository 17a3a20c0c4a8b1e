"""The digits stage of ``--mode tables`` (``score_sde.tables_digits``): cells, intervals, resume, bad input."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from configs.tables import quick
from score_sde import tables, tables_digits, tables_report
from score_sde.paper_results import TablesError


def tiny_config(**changes):
    """One SDE, two 5-step models of width 16, 8 test digits, one sampler of 64 samples: seconds of work."""
    config = quick.get_config()
    t = config.tables
    t.which = ("digits",)
    t.digits_sdes = ("vpsde",)
    t.digits_train_steps = 5
    t.digits_batch_size = 16
    t.digits_width = 16
    t.digits_blocks = 1
    t.digits_nll_points = 8
    t.digits_nll_probes = 2
    t.digits_nll_tolerances = (1e-2,)
    t.digits_predictors = ("reverse_diffusion",)
    t.digits_samplers = ("P25",)
    t.digits_num_samples = 64
    t.digits_bootstrap = 20
    for key, value in changes.items():
        t[key] = value
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("tables_digits"))
    return workdir, tables.run(tiny_config(), workdir)


def test_cells_present_with_intervals(run):
    workdir, store = run
    cells = store["digits"]
    assert sorted(cells["train"]) == ["vpsde/likelihood", "vpsde/plain"]
    assert all(c["steps"] == 5 for c in cells["train"].values())
    for key in ("vpsde/likelihood", "vpsde/plain"):
        c = cells["nll"][key]
        assert len(c["ode"]) == 8 and len(c["probe_means"]) == 2
        mean, half = tables.mean_ci(c["ode"])
        assert np.all(np.isfinite(c["ode"])) and mean > 0 and math.isfinite(half) and half > 0
        assert tables_report.hutchinson_error(c) > 0  # two probes that differ
    assert sorted(cells["fd"]) == ["real_digits", "vpsde/reverse_diffusion/P25"]
    for c in cells["fd"].values():
        assert c["ci95"][0] <= c["fd"] <= c["ci95"][1] and len(c["boot"]) == 20
    assert cells["fd"]["vpsde/reverse_diffusion/P25"]["nfe"] == 25
    text = open(os.path.join(workdir, "tables.md")).read()
    assert "## Digits: Table 2 (bits/dim) and a digits-FD column" in text and "There is no exact NLL" in text
    assert any(c["claim"].startswith("digits: likelihood weighting") for c in store["claims"])
    assert os.path.exists(os.path.join(workdir, "digits_samples.png"))


def test_real_digits_floor_is_below_untrained_samples(run):
    fd = run[1]["digits"]["fd"]
    assert fd["real_digits"]["ci95"][1] < fd["vpsde/reverse_diffusion/P25"]["ci95"][0]


def test_resume_computes_only_missing_cells(run, monkeypatch):
    workdir, _ = run
    calls = []
    for name in ("train_model", "nll_cell", "fd_cell", "floor_cell"):
        original = getattr(tables_digits, name)
        monkeypatch.setattr(tables_digits, name, lambda *a, _n=name, _f=original, **k: calls.append(_n) or _f(*a, **k))
    tables.run(tiny_config(), workdir)
    assert calls == []
    path = os.path.join(workdir, "tables.json")
    with open(path) as f:
        store = json.load(f)
    del store["digits"]["fd"]["vpsde/reverse_diffusion/P25"]
    with open(path, "w") as f:
        json.dump(store, f)
    again = tables.run(tiny_config(), workdir)
    # the model is restored (run_lib.train, finished: no step), only the missing cell sampled
    assert calls == ["train_model", "fd_cell"]
    assert again["digits"]["train"]["vpsde/plain"]["steps"] == 5


def test_other_settings_are_refused_and_nothing_overwritten(run):
    workdir, _ = run
    path = os.path.join(workdir, "tables.json")
    before = open(path, "rb").read()
    with pytest.raises(TablesError, match="digits_nll_points: 8 there, 9 now"):
        tables.run(tiny_config(digits_nll_points=9), workdir)
    assert open(path, "rb").read() == before


@pytest.mark.parametrize("changes, message", [
    ({"digits_sdes": ("vpsde", "edm")}, "digits_sdes: unknown SDE 'edm'"),
    ({"digits_samplers": ("Q25",)}, "digits_samplers: 'Q25' is not a sampler name"),
    ({"digits_predictors": ("euler",)}, "digits_predictors: unknown predictor 'euler'"),
    ({"digits_train_steps": 7}, "digits_train_steps = 7"),
    ({"digits_nll_points": 300}, "digits_nll_points = 300"),
    ({"which": ("digitz",)}, "unknown table 'digitz'"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, changes, message):
    workdir = str(tmp_path / "w")
    with pytest.raises(TablesError, match=message):
        tables.run(tiny_config(**changes), workdir)
    assert not os.path.exists(workdir)
