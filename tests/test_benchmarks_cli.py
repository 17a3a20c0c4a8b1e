"""The timing scripts' options that benchmarks/gpu_suite.sh uses, run on the CPU with the tiny model (no timings
asserted): the backend line printed first, ``--config`` / ``--batch`` honoured, the ``--out`` JSON fields, and the
table benchmarks/gpu_summary.py makes of each file; and which parts gpu_suite.sh picks (run with no time to spend, so
it runs none). Each test runs one script (the tests stay independent under pytest-xdist)."""
import argparse
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

from benchmarks import common, gpu_summary, likelihood, memory, sampling, train_step
from tests.test_compile_count import counting_compiles

BATCH = 4


def run(main, stem: str, folder, *extra: str):
    """``(printed lines, JSON written, gpu_summary's text of the folder)`` of ``main --config tiny --batch 4``."""
    path = folder / f"{stem}.json"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(["--config", "tiny", "--batch", str(BATCH), "--out", str(path), *extra])
    data = json.loads(path.read_text())
    lines = buffer.getvalue().splitlines()
    assert lines[0].startswith("backend platform=cpu device_kind="), lines[0]
    assert "devices=1" in lines[0] and "jax=" in lines[0]
    assert data["backend"]["platform"] == "cpu"
    assert data["backend"]["device_count"] >= 1 and data["backend"]["device_kind"]
    assert data["settings"]["config"] == "tiny" and data["settings"]["batch"] == BATCH
    text = gpu_summary.summary(gpu_summary.load(str(folder)))
    assert "### tiny: --config tiny, batch 4" in text
    return lines, data, text


def test_configs_by_name():
    config = common.load_config("tiny")
    assert (config.model.name, config.data.image_size, config.model.nf) == ("ncsnpp", 8, 8)
    assert common.load_config("benchmark").model.ch_mult == (1, 2, 2)
    assert common.load_config("vp/cifar10_ddpmpp_continuous").model.nf == 128  # the full size, unchanged
    with pytest.raises(ValueError, match="--config"):
        common.load_config("vp/no_such_config")


def test_train_step_cli(tmp_path):
    with counting_compiles() as compiles:
        lines, data, text = run(train_step.main, "train_step_tiny", tmp_path, "--reps", "1", "--fused", "1",
                                "--devices", "1")
    # The step compiles at its first call only: the second call once recompiled it (on an H200 that doubled the
    # 50 s before the first figure), because it was fed the keys the first call returned, sharded differently.
    step_compiles = [c for c in compiles if c.site == "benchmarks/train_step.py:call"]
    assert len(step_compiles) == 1, "\n".join(map(str, step_compiles))
    assert data["script"] == "train_step"
    assert any(f"global batch {BATCH} | 8x8x3" in line for line in lines)
    step = data["results"]["devices"]["1"]["steps"]["1"]
    assert 0 < step["min_s_per_step"] <= step["median_s_per_step"]
    assert 0 < step["second_call_s"] < step["first_call_s"]
    assert data["results"]["devices"]["1"]["fusion"] == "unroll"  # 'auto' on a CPU
    assert data["results"]["devices"]["1"]["init_s"] > 0
    assert f"| train step, s (median, 1 per call) | {step['median_s_per_step']:.4f} | — | — |" in text  # no port


def test_fused_counts_and_their_table_rows():
    assert train_step._step_counts("5") == [5] and train_step._step_counts("1,5,1") == [1, 5]
    for bad in ("0", "1,x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="--fused"):
            train_step._step_counts(bad)

    def train_run(steps, fusion):
        return {"backend": {"platform": "gpu"}, "settings": {"config": "benchmark", "batch": 128},
                "results": {"devices": {"1": {"fusion": fusion, "steps": {n: {"median_s_per_step": s}
                                                                          for n, s in steps.items()}}}}}

    # The suite times one step per call early and fused steps in later parts: one table shows them all.
    text = gpu_summary.model_table({"train_step_benchmark": train_run({"1": 0.03}, "scan"),
                                    "train_step_fused_benchmark": train_run({"5": 0.02}, "scan"),
                                    "train_step_unrolled_benchmark": train_run({"5": 0.025}, "unroll"),
                                    "pytorch_benchmark": {"results": {"train_step": {"median_s_per_step": 0.09}}}},
                                   "benchmark")
    assert "| train step, s (median, 1 per call) | 0.0300 | 0.0900 | 0.33 |" in text
    assert "| train step, s (median, 5 fused per call, scan) | 0.0200 | — | 0.22 |" in text
    assert "| train step, s (median, 5 fused per call, unroll) | 0.0250 | — | 0.28 |" in text


def test_summary_joins_the_merged_results_of_two_runs(tmp_path):
    def run_file(script, figures):
        return {"script": script, "backend": {"platform": "gpu"}, "settings": {"config": "benchmark", "batch": 128},
                "results": figures}

    first = {"pytorch_benchmark": run_file("pytorch_port", {"score_eval": {"wall_s": 0.02}})}
    second = {"sampling_benchmark": run_file("sampling", {"score_eval": {"wall_s": 0.004}})}
    (tmp_path / "results_1.json").write_text(json.dumps(first))
    (tmp_path / "results_2.json").write_text(json.dumps(second))
    runs = gpu_summary.load(str(tmp_path))
    assert sorted(runs) == ["pytorch_benchmark", "sampling_benchmark"]
    assert "| one score evaluation, s (min) | 0.0040 | 0.0200 | 0.20 |" in gpu_summary.summary(runs)


def test_sampling_cli(tmp_path):
    lines, data, text = run(sampling.main, "sampling_tiny", tmp_path, "--reps", "1", "--n", "25", "--skip_ode",
                            "--skip_fast")
    assert data["script"] == "sampling"
    assert any(f"batch {BATCH} of (8, 8, 3)" in line for line in lines)
    pc = data["results"]["pc_N25"]
    assert pc["nfe"] == 50 and pc["steps"] == 25
    assert pc["per_step_s"] == pytest.approx(2 * pc["per_eval_s"])
    assert pc["ratio_to_score_eval"] == pytest.approx(pc["per_eval_s"] / data["results"]["score_eval"]["wall_s"])
    assert f"| PC s per evaluation / one score evaluation (goal ≤ 1.05) | {pc['ratio_to_score_eval']:.3f} |" in text


def test_likelihood_cli(tmp_path):
    # scipy: the same loop of likelihood.py as the suite's JAX solver, with the cheaper program to compile.
    lines, data, text = run(likelihood.main, "likelihood_tiny", tmp_path, "--solvers", "scipy", "--rtol", "1e-2",
                            "--atol", "1e-2", "--floor_reps", "1")
    assert data["script"] == "likelihood"
    assert any(f"batch {BATCH} of (8, 8, 3)" in line for line in lines)
    solve = data["results"]["scipy_RK45"]
    assert solve["nfe"] > 0 and solve["per_nfe_s"] == pytest.approx(solve["total_s"] / solve["nfe"])
    assert solve["ratio_to_floor"] == pytest.approx(solve["per_nfe_s"] / data["results"]["floor_drift_div"]["median_s"])
    assert solve["bpd_mean"] > 0
    assert f"| likelihood NFE | {solve['nfe']} |" in text


def test_memory_cli_variants_and_batches(tmp_path):
    """gpu_suite.sh's memory part: only the rows and batches asked for (the traced method here: no compilation)."""
    path = tmp_path / "memory.json"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        memory.main(["--configs", "vp/digits", "--method", "residuals", "--variants", "remat", "--batches", "1",
                     "--out", str(path)])
    data = json.loads(path.read_text())
    assert [(r["config"], r["remat"], r["dtype"]) for r in data] == [("vp/digits", True, "float32")]
    assert [row["batch"] for row in data[0]["rows"]] == [1]
    assert data[0]["rows"][0]["peak"] > 5 * data[0]["rows"][0]["params"] > 0
    assert buffer.getvalue().splitlines()[0].startswith("backend platform=cpu")
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        memory.main(["--configs", "vp/digits", "--variants", "float32,fp8"])
    assert "unknown ['fp8']" in err.getvalue()


def _suite(tmp_path, **env):
    """``(exit status, printed text)`` of benchmarks/gpu_suite.sh in its GPU mode with no time to spend: every part
    asked for is named and skipped, so the selection shows without running a benchmark."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(["bash", "benchmarks/gpu_suite.sh"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no_wheels"),
                               "OUT": str(tmp_path / "out"), "SUITE_SECONDS": "0", **env})
    return done.returncode, done.stdout + done.stderr


def test_gpu_suite_models_pick_the_per_model_parts(tmp_path):
    status, text = _suite(tmp_path, MODELS="full", PARTS="train likelihood fast fused")
    skipped = [line.removeprefix("=== ").split(":")[0] for line in text.splitlines() if line.endswith("are spent")]
    assert status == 0, text
    assert skipped == ["ours, train step, full", "ours, likelihood, full", "ours, fast samplers, benchmark",
                       "ours, 5 fused train steps (scan), benchmark"]
    status, text = _suite(tmp_path, PARTS="train")
    assert [line for line in text.splitlines() if line.endswith("are spent")] == [
        "=== ours, train step, benchmark: skipped, the suite's 0 s are spent",
        "=== ours, train step, full: skipped, the suite's 0 s are spent"]


@pytest.mark.parametrize("env, message", [({"MODELS": "full tiny"}, "MODELS: no model 'tiny'"),
                                          ({"PARTS": "train sample"}, "PARTS: no part 'sample'")])
def test_gpu_suite_refuses_unknown_names(tmp_path, env, message):
    status, text = _suite(tmp_path, **env)
    assert status == 2 and message in text, text
    assert "=== " not in text  # nothing ran
