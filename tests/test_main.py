"""main.py: flag errors are one clear line; the README's main job writes samples and TensorBoard events."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_train import _env, tiny_flags  # noqa: E402


def _main(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = _env()
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--config", "configs/vp/digits.py", "--workdir", "w", "--mode", "smaple"],
     "error: --mode='smaple' is not a mode; use one of train, eval, fid_stats, sample, tables, train_deq."),
    (["--config", "configs/vp/digits.py", "--mode", "train"],
     "error: --workdir is required: the folder for checkpoints, samples and logs."),
    (["--workdir", "w", "--mode", "train"],
     "error: --config is required, e.g. --config configs/vp/digits.py."),
])
def test_flag_errors_are_one_line(args, message, tmp_path):
    out = _main(*args)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in out.stderr


def test_invalid_config_is_reported_before_any_work(tmp_path):
    out = _main("--config", "configs/vp/digits.py", "--workdir", str(tmp_path / "w"), "--mode", "train",
                "--config.training.sde=vpsde_typo")
    assert out.returncode == 2
    assert "training.sde" in out.stderr and "vpsde_typo" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "w").exists()


def test_workdir_that_is_a_file_or_cannot_be_made_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for workdir, mode, message in [
            (blocker, "train", f"error: --workdir={blocker} is a file, not a folder; choose another --workdir."),
            (blocker, "eval", f"error: --workdir={blocker} is a file, not a folder; choose another --workdir."),
            (blocker / "run", "train", f"error: cannot create --workdir={blocker / 'run'}: Not a directory; choose "
                                       "another --workdir.")]:
        out = _main("--config", "configs/vp/digits.py", "--workdir", str(workdir), "--mode", mode,
                    "--config.training.n_iters=1", timeout=120)
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().splitlines()[-1] == message
        assert "Traceback" not in out.stderr
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_write_samples_refuses_non_finite_values(tmp_path, bad):
    """A NaN would become 0 in the uint8 grid and pass unseen: one clear error instead, and nothing written."""
    import run_lib

    samples = np.random.default_rng(0).uniform(size=(2, 3, 8, 8, 1))
    samples[1, 2, 4, 5, 0] = bad
    with pytest.raises(ValueError, match=r"^snapshot samples at step 7: 1 of 384 values are NaN or infinite, "
                                         r"nothing written to .*sampling\.\* settings"):
        run_lib.write_samples(samples, str(tmp_path), step=7)
    assert list(tmp_path.iterdir()) == []


def test_write_samples_stores_what_it_was_given(tmp_path):
    import run_lib

    samples = np.random.default_rng(0).uniform(size=(2, 3, 8, 8, 1))
    assert run_lib.write_samples(samples, str(tmp_path), step=7) == str(tmp_path / "iter_7.png")
    stored = np.load(tmp_path / "iter_7.npy")
    np.testing.assert_array_equal(stored, np.floor(samples.reshape(6, 8, 8, 1) * 255 + 0.5).astype(np.uint8))


def test_write_samples_keeps_mixture_points_as_coordinates(tmp_path):
    """Snapshots of GMM points ((..., 1, 1, dim) in data space, not [0, 1]) stay float32 coordinates, plus a scatter."""
    import run_lib
    from PIL import Image

    samples = np.random.default_rng(0).normal(scale=3.0, size=(2, 3, 1, 1, 16)).astype(np.float32)
    assert run_lib.write_samples(samples, str(tmp_path), step=7) == str(tmp_path / "iter_7.png")
    stored = np.load(tmp_path / "iter_7.npy")
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(stored, samples.reshape(6, 16))
    plot = np.asarray(Image.open(tmp_path / "iter_7.png"))
    assert plot.ndim == 3 and min(plot.shape[:2]) > 100 and np.ptp(plot) > 0


def test_train_job_leaves_the_slow_optional_imports_out():
    """What main.py --mode train imports for the embedded data leaves out scipy.integrate (0.35 s; only the scipy ODE
    solver needs it) and tensorflow_datasets (0.25 s; only the tfds data sets): every start would pay for them."""
    code = ("import sys, main, run_lib, sampling, likelihood\n"
            "from score_sde import datasets, train_programs\n"
            "print([m for m in ('scipy.integrate', 'tensorflow_datasets') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_main_job_writes_sample_grids_and_tensorboard_events(tmp_path):
    """The README's command, on a tiny network and few steps: PNG grids of 8×8 digits and event files."""
    from PIL import Image

    workdir = tmp_path / "digits"
    out = _main("--config", "configs/vp/digits.py", "--workdir", str(workdir), "--mode", "train",
                *tiny_flags(training__snapshot_sampling=True), timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    # The digits are always present, so main.py compiled the init and train step before loading them.
    assert "Compiling (or loading) the model's initialisation and train step in the background" in out.stderr
    pngs = sorted(p.name for p in (workdir / "samples").glob("*.png"))
    assert pngs == ["iter_8.png"]
    grid = np.asarray(Image.open(workdir / "samples" / "iter_8.png"))
    # 8 samples of 8×8 in rows of floor(sqrt(8)) = 2 (4 rows), 2 pixels of padding, enlarged 4×.
    assert grid.ndim == 2 and grid.shape == (4 * (4 * 10 + 2), 4 * (2 * 10 + 2))
    samples = np.load(workdir / "samples" / "iter_8.npy")
    assert samples.shape == (8, 8, 8, 1) and samples.dtype == np.uint8
    # Finite before the cast: write_samples refuses NaN and inf (test_write_samples_refuses_non_finite_values),
    # and the run succeeded. Not constant: the pixels of each sample vary, and the samples differ from each other.
    assert all(np.ptp(sample) > 0 for sample in samples)
    assert np.ptp(samples.astype(np.int16), axis=0).max() > 0
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    log = (workdir / "stdout.txt").read_text()
    assert "steps/s" in log and "ETA" in log and "wrote" in log
