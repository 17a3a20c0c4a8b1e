"""``--mode sample`` (run_lib.sample): samples from a checkpoint with a configured sampler, files, NFE, no overwrite.

The workdir holds two checkpoints of an initialised tiny digits model (no training: sampling only
needs weights). Their ``params`` are NaN and only ``params_ema`` are finite, so samples from the
wrong weights would be NaN and stop the job.
"""
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image, ImageSequence

import losses
import run_lib
from score_sde import checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(**sampling):
    """test_train's tiny digits DDPM++, 4 samples per batch, DDIM in 3 steps unless ``sampling`` says otherwise."""
    from test_train import tiny_config

    config = tiny_config()
    config.eval.batch_size = 4
    config.sampling.method = "ddim"
    config.sampling.steps = 3
    for field, value in sampling.items():
        setattr(config.sampling, field, value)
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """checkpoint_1 (step 5) and checkpoint_2 (step 10): NaN ``params``, finite (different) ``params_ema``."""
    root = tmp_path_factory.mktemp("sample_job") / "workdir"
    _, state = losses.init_train_state(jax.random.PRNGKey(0), _config())
    nan_params = jax.tree_util.tree_map(lambda p: np.full(np.shape(p), np.nan, np.float32), state.params)
    for number, step in ((1, 5), (2, 10)):
        noise = np.random.default_rng(number)  # also makes the zero-initialised output layer differ
        ema = jax.tree_util.tree_map(lambda p: np.asarray(p) + 0.05 * noise.standard_normal(np.shape(p), np.float32),
                                     state.params)
        saved = state.replace(step=step, params=nan_params, params_ema=ema)
        checkpoints.save_checkpoint(str(root / "checkpoints"), saved, step=number, keep=np.inf)
    return root


def _folder_contents(folder: pathlib.Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_samples_files_and_nfe(workdir, caplog):
    """Newest checkpoint, params_ema: grid, uint8 npz (finite, varied), NFE = DDIM's steps, progress logged."""
    with caplog.at_level(logging.INFO):
        info = run_lib.sample(_config(), str(workdir))
    folder = pathlib.Path(info["folder"])  # samples_ddim_ckpt_2, or _<k> after another test's run
    assert folder.parent == workdir and folder.name.startswith("samples_ddim_ckpt_2")
    assert sorted(p.name for p in folder.iterdir()) == ["grid_0.png", "reverse_process.gif", "sample_info.json",
                                                         "samples.npz"]
    samples = np.load(folder / "samples.npz")["samples"]
    assert samples.dtype == np.uint8 and samples.shape == (4, 8, 8, 1)
    assert samples.std() > 0 and len({s.tobytes() for s in samples}) == 4  # not constant, not one image repeated
    written = json.loads((folder / "sample_info.json").read_text())
    assert written["nfe"] == 3 and written["nfe_per_batch"] == [3]  # DDIM: one score evaluation per step
    assert written["ckpt"] == 2 and written["step"] == 10 and written["checkpoint"] == "checkpoints/checkpoint_2"
    assert written["sampler_options"]["steps"] == 3 and written["sampler_options"]["eta"] == 0.0
    assert "sampling batch 1/1 | 3 score evaluations per sample | ETA" in caplog.text
    # A GIF of the path: noise (k = 0) and after each of the 3 steps, all 4 images; the last frame is the grid.
    frames = _gif_frames(folder)
    assert len(frames) == 4 and frames[0].shape == Image.open(folder / "grid_0.png").size[::-1]
    assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:]))
    np.testing.assert_array_equal(frames[-1], np.asarray(Image.open(folder / "grid_0.png").convert("L")))


def _gif_frames(folder: pathlib.Path) -> list[np.ndarray]:
    with Image.open(folder / "reverse_process.gif") as gif:
        return [np.asarray(f.convert("L")) for f in ImageSequence.Iterator(gif)]


def test_gif_for_a_second_sampler(workdir):
    """DPM-Solver-2 (6 steps, 12 NFE): a GIF from noise to the samples; frames change; the last is grid_0."""
    info = run_lib.sample(_config(method="dpm_solver", order=2, steps=6), str(workdir))
    folder = pathlib.Path(info["folder"])
    assert info["nfe"] == 12
    # The latent and the state after each of the 6 steps (PIL merges frames that round to the same pixels).
    frames = _gif_frames(folder)
    assert 3 <= len(frames) <= 7
    assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:]))
    assert np.mean(frames[0] != frames[-1]) > 0.3  # noise became something else
    np.testing.assert_array_equal(frames[-1], np.asarray(Image.open(folder / "grid_0.png").convert("L")))


def test_chosen_checkpoint_and_batches(workdir):
    """sampling.ckpt picks checkpoint_1; 5 samples in batches of 4 are 2 batches, 2 grids, 5 samples."""
    info = run_lib.sample(_config(ckpt=1, num_samples=5, steps=2), str(workdir))
    folder = workdir / "samples_ddim_ckpt_1"
    assert info["folder"] == str(folder) and info["step"] == 5 and info["nfe_per_batch"] == [2, 2]
    samples = np.load(folder / "samples.npz")["samples"]
    assert samples.shape == (5, 8, 8, 1)
    assert {"grid_0.png", "grid_1.png"} <= set(os.listdir(folder))
    # The newest checkpoint's DDIM from the same seed and steps differs: another params_ema was used.
    other = run_lib.sample(_config(num_samples=5, steps=2), str(workdir))
    assert not np.array_equal(np.load(pathlib.Path(other["folder"]) / "samples.npz")["samples"], samples)


def test_rerun_does_not_overwrite(workdir):
    """Same settings: nothing drawn, the folder untouched; other settings: a new folder, the first one untouched."""
    first = pathlib.Path(run_lib.sample(_config(), str(workdir))["folder"])  # or a no-op after another test
    before, listing = _folder_contents(first), sorted(os.listdir(workdir))
    again = run_lib.sample(_config(), str(workdir))
    assert again["folder"] == str(first) and _folder_contents(first) == before
    assert sorted(os.listdir(workdir)) == listing
    changed = run_lib.sample(_config(eta=1.0), str(workdir))
    assert os.path.basename(changed["folder"]) not in listing
    assert changed["folder"].startswith(str(workdir / "samples_ddim_ckpt_2_"))
    assert changed["sampler_options"]["eta"] == 1.0
    assert "reverse_process.gif" in os.listdir(changed["folder"])  # stochastic DDIM records its path too
    assert _folder_contents(first) == before
    assert not [name for name in os.listdir(workdir) if ".partial-" in name]


def test_rewritten_checkpoint_gets_a_new_folder(workdir, tmp_path):
    """A resumed training run that redoes checkpoint_2 at another step: its samples go to a new folder."""
    copy = tmp_path / "workdir"
    (copy / "checkpoints").mkdir(parents=True)
    (copy / "checkpoints" / "checkpoint_2").write_bytes((workdir / "checkpoints" / "checkpoint_2").read_bytes())
    first = run_lib.sample(_config(), str(copy))
    template = run_lib.eval_state_template(_config(), jax.random.PRNGKey(0))[1]
    state = checkpoints.restore_checkpoint(str(copy / "checkpoints" / "checkpoint_2"), template)
    checkpoints.save_checkpoint(str(copy / "checkpoints"), state.replace(step=11), step=2)
    second = run_lib.sample(_config(), str(copy))
    assert first["step"] == 10 and second["step"] == 11 and second["folder"] != first["folder"]


def test_bad_input_fails_before_compiling(workdir, tmp_path):
    """A missing chosen checkpoint, steps < 1, a sampler unfit for the SDE: one SamplingError, nothing written."""
    listing = sorted(os.listdir(workdir))
    with pytest.raises(run_lib.SamplingError, match=r"config.sampling.ckpt = 7: .* holds 1-2"):
        run_lib.sample(_config(ckpt=7), str(workdir))
    with pytest.raises(run_lib.SamplingError, match=r"config.sampling.steps=0"):
        run_lib.sample(_config(steps=0), str(workdir))
    # The reverse-diffusion denoiser of a VP SDE needs num_scales > beta_max (20); the tiny model has 10.
    with pytest.raises(run_lib.SamplingError, match=r"config.model.num_scales > beta_max"):
        run_lib.sample(_config(method="ode", noise_removal=True), str(workdir))
    with pytest.raises(run_lib.SamplingError, match="No checkpoint to sample from"):
        run_lib.sample(_config(), str(tmp_path / "empty"))
    assert sorted(os.listdir(workdir)) == listing and not (tmp_path / "empty").exists()


def test_missing_checkpoint_through_main(tmp_path):
    """``main.py --mode sample`` on a workdir without checkpoints: one line, exit 1, nothing created."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    workdir = tmp_path / "mistyped"
    proc = subprocess.run(
        [sys.executable, "main.py", "--config", "configs/vp/digits.py", "--workdir", str(workdir), "--mode", "sample",
         "--config.sampling.method=ddim"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "No checkpoint to sample from" in error_lines[0]
    assert "--mode train" in error_lines[0] and "Traceback" not in proc.stderr
    assert not workdir.exists()


def test_main_samples_without_tensorflow(workdir, tmp_path):
    """``main.py --mode sample`` writes its folder and never imports TensorFlow (seconds of startup saved)."""
    from test_train import tiny_flags

    shutil.copytree(workdir / "checkpoints", tmp_path / "run" / "checkpoints")
    report_tf = ("import atexit, runpy, sys; "
                 "atexit.register(lambda: print('tensorflow imported:', 'tensorflow' in sys.modules)); "
                 "sys.argv = ['main.py'] + sys.argv[1:]; runpy.run_path('main.py', run_name='__main__')")
    proc = subprocess.run(
        [sys.executable, "-c", report_tf, "--config", "configs/vp/digits.py", "--workdir", str(tmp_path / "run"),
         "--mode", "sample", *tiny_flags(), "--config.eval.batch_size=4", "--config.sampling.method=ddim",
         "--config.sampling.steps=3"],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tensorflow imported: False" in proc.stdout, proc.stdout[-2000:]
    info = json.loads((tmp_path / "run" / "samples_ddim_ckpt_2" / "sample_info.json").read_text())
    assert info["nfe"] == 3
    assert (tmp_path / "run" / "samples_ddim_ckpt_2" / "grid_0.png").stat().st_size > 0


def _sampler_and_state(workdir, config, record=None):
    """The model-level sampler of ``config`` (4 images of 8×8×1) and checkpoint_2's replicated state."""
    import sampling
    import sde_lib
    from score_sde import datasets, parallel

    sde, eps = sde_lib.get_sde(config)
    model, template = run_lib.eval_state_template(config, jax.random.PRNGKey(0))
    state = checkpoints.restore_checkpoint(str(workdir / "checkpoints" / "checkpoint_2"), template)
    sampler = sampling.get_sampling_fn(config, sde, model, (4, 8, 8, 1), datasets.get_data_inverse_scaler(config),
                                       eps, record=record)
    keys = jax.random.split(jax.random.PRNGKey(3), parallel.local_device_count())
    return sampler, keys, parallel.replicate(state), state, model, sde, eps


def test_gif_frames_lie_on_the_ddim_path(workdir):
    """Each recorded frame is the state of the N-step DDIM path after k steps (recomputed here step by step)."""
    import fast_sampling
    from models import utils as mutils
    from score_sde import datasets

    config = _config(steps=4)
    sampler, keys, pstate, state, model, sde, eps = _sampler_and_state(workdir, config,
                                                                       fast_sampling.Recording(frames=4, first=4))
    _, nfe, path = sampler(keys, pstate)
    frames = np.asarray(path[0])  # device 0: (5, 4, 8, 8, 1), in [0, 1]
    score_fn = mutils.get_score_fn(sde, model, state.params_ema, state.model_state, train=False, continuous=True)
    scaler, inverse_scaler = datasets.get_data_scaler(config), datasets.get_data_inverse_scaler(config)
    x = scaler(frames[0])  # the latent
    states = [frames[0]]
    for i in range(4):  # deterministic DDIM on the uniform time grid from T to eps
        s, t = (np.full((4,), sde.T + j / 4 * (eps - sde.T), np.float32) for j in (i, i + 1))
        mean_s, std_s = sde.marginal_prob(np.ones((4, 1, 1, 1), np.float32), s)
        mean_t, std_t = sde.marginal_prob(np.ones((4, 1, 1, 1), np.float32), t)
        noise = -std_s[:, None, None, None] * score_fn(x, s)
        x = mean_t * (x - std_s[:, None, None, None] * noise) / mean_s + std_t[:, None, None, None] * noise
        states.append(inverse_scaler(x))
    assert nfe == 4 and frames.shape == (5, 4, 8, 8, 1)
    for k, (frame, state_k) in enumerate(zip(frames, states)):
        np.testing.assert_allclose(frame, state_k, rtol=1e-4, atol=1e-4, err_msg=f"frame {k}")


@pytest.mark.parametrize("sampling_options", [{"method": "heun", "churn": 2.0},
                                              {"method": "pc", "predictor": "euler_maruyama", "corrector": "none"}],
                         ids=["heun_churn", "pc"])
def test_recording_leaves_the_model_samples_bit_for_bit(workdir, sampling_options):
    """The model-level sampler with and without recording its path: the same samples, bit for bit."""
    import fast_sampling

    config = _config(steps=3, **sampling_options)
    sampler, keys, pstate, *_ = _sampler_and_state(workdir, config)
    recording, *_ = _sampler_and_state(workdir, config, fast_sampling.Recording(frames=2, first=3))
    plain, nfe = sampler(keys, pstate)
    samples, nfe_recorded, path = recording(keys, pstate)
    np.testing.assert_array_equal(np.asarray(samples), np.asarray(plain))
    assert nfe == nfe_recorded and path.shape[2:] == (3, 8, 8, 1)


def test_ode_records_no_path(workdir):
    """'ode' has no GIF: asking its sampler for a path is refused, naming the methods that record one."""
    import fast_sampling
    import sampling

    assert not sampling.records_path("ode") and sampling.records_path("pc") and sampling.records_path("ddim")
    with pytest.raises(ValueError, match=r"'ode' records no path.*'pc'.*'ddim'"):
        _sampler_and_state(workdir, _config(method="ode"), fast_sampling.Recording())
