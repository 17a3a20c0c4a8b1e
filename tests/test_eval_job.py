"""The evaluation job (run_lib.evaluate / fid_stats) end to end on the embedded digits, with a stand-in feature network.

The slow tests share one briefly trained workdir (module fixture). Numbers from the stand-in
network are never called FID; the real Inception is not needed (nor available offline).
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.linalg
import scipy.special

from score_sde import eval_records, inception

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny_digits_config(tmp_root: pathlib.Path):
    """test_train's tiny digits DDPM++ (the same compiled train step), 2 numbered checkpoints after 10 steps."""
    from test_train import tiny_config

    c = tiny_config()
    c.training.n_iters = 10
    c.training.snapshot_freq = 5
    c.training.snapshot_freq_for_preemption = 5
    c.training.eval_freq = 1000  # no eval step to compile during training
    c.model.num_scales = 20
    # The digits EMA rate (the State carries it, so the train step is still the same program):
    # params_ema stay near the initial ones, whose probability-flow ODE needs few steps.
    c.model.ema_rate = 0.995
    c.sampling.ode_solver = "scipy"
    c.eval.begin_ckpt = 2
    c.eval.end_ckpt = 2
    c.eval.batch_size = 148  # test split: 297 digits = 2 batches
    c.eval.num_samples = 60
    c.eval.stats_dir = str(tmp_root / "stats")
    return c


def test_missing_inception_fails_before_anything(tmp_path):
    """Offline without config.eval.inception_path: a clear message at once, no waiting for checkpoints."""
    import run_lib

    config = _tiny_digits_config(tmp_path)
    config.eval.enable_sampling = True
    with pytest.raises(inception.InceptionUnavailableError, match="config.eval.inception_path"):
        run_lib.evaluate(config, str(tmp_path / "no_checkpoints_here"))
    assert not (tmp_path / "no_checkpoints_here" / "eval").exists()


def test_missing_inception_message_through_main(tmp_path):
    """``main.py --mode eval`` prints the message, not a traceback."""
    if not (REPO / "main.py").exists():
        pytest.fail("main.py is missing (the training pipeline's entry point)")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "main.py", "--config", "configs/vp/digits.py", "--workdir", str(tmp_path / "wd"),
         "--mode", "eval", "--config.eval.enable_sampling=True"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode != 0
    assert "inception_path" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_missing_checkpoints_through_main(tmp_path):
    """A workdir without checkpoints: one line at once (no waiting), nothing created."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    workdir = tmp_path / "mistyped"
    proc = subprocess.run(
        [sys.executable, "main.py", "--config", "configs/vp/digits.py", "--workdir", str(workdir), "--mode", "eval"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1
    assert "error: Checkpoint(s) 1 of config.eval.begin_ckpt..end_ckpt = 1..1 are not in" in proc.stderr
    assert "config.eval.wait_for_checkpoints_s" in proc.stderr and "Traceback" not in proc.stderr
    assert not workdir.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir with checkpoints 1 and 2 of a 10-step digits run, the stand-in network and its statistics."""
    import run_lib

    root = tmp_path_factory.mktemp("eval_job")
    config = _tiny_digits_config(root)
    workdir = root / "workdir"
    run_lib.train(config, str(workdir))
    assert (workdir / "checkpoints" / "checkpoint_2").exists()
    stand_in = root / "stand_in"
    inception.save_stand_in_extractor(str(stand_in))
    config.eval.inception_path = str(stand_in)
    return config, workdir


@pytest.mark.slow
def test_fid_stats_file(trained):
    import run_lib

    config, workdir = trained
    path = run_lib.fid_stats(config, str(workdir))
    stats = eval_records.load_dataset_stats(path)
    assert path == os.path.join(config.eval.stats_dir, "digits_stats.npz")
    assert stats["pool_3"].shape == (1500, 16)  # every training digit, none dropped
    assert stats["logits"].shape == (1500, 10)
    note = json.loads((workdir / "fid_stats.json").read_text())
    assert note["num_images"] == 1500 and note["stand_in"] is True
    # uint8 inputs without dequantisation: the features of the raw training digits, in some order.
    from score_sde import datasets

    images, _ = datasets.load_digits()
    extractor = inception.load_feature_extractor(config)
    direct = inception.run_inception(images[:1500], extractor)["pool_3"]
    np.testing.assert_allclose(np.sort(stats["pool_3"][:, 0]), np.sort(direct[:, 0]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_evaluate_end_to_end(trained):
    """Loss + bits/dim + sampling with stand-in features: every report written, labelled honestly."""
    import run_lib

    config, workdir = trained
    config = config.copy_and_resolve_references()
    run_lib.fid_stats(config, str(workdir))
    config.eval.enable_loss = True
    config.eval.enable_bpd = True
    config.eval.bpd_dataset = "test"
    config.eval.batch_size = 297  # the whole test split: 1 loss batch, 5 bits/dim rounds, 1 sampling round
    config.eval.enable_sampling = True
    summary = run_lib.evaluate(config, str(workdir), "eval_e2e")
    eval_dir = workdir / "eval_e2e"
    loss = np.load(eval_dir / "ckpt_2_loss.npz")
    assert loss["all_losses"].shape == (1,) and np.isfinite(loss["mean_loss"])
    bpd = np.concatenate([np.load(eval_dir / f"test_ckpt_2_bpd_{r}.npz")["arr_0"] for r in range(5)])
    assert bpd.shape == (5 * 297,) and np.all(np.isfinite(bpd))
    assert 0.0 < bpd.mean() < 30  # a barely trained model: finite, positive, not absurd
    samples = np.load(eval_dir / "ckpt_2_host_0" / "samples_0.npz")["samples"]
    assert samples.dtype == np.uint8 and samples.shape == (297, 8, 8, 1)
    report = np.load(eval_dir / "report_2.npz")
    assert int(report["num_samples"]) == 60  # config.eval.num_samples of the 297 drawn
    _check_report_against_statistics(config, eval_dir, report)
    _check_bpd_round_against_likelihood_fn(config, workdir, eval_dir)
    row = summary["checkpoints"]["2"]
    assert "FID (stand-in features)" in row and "FID" not in row
    assert row["FID (stand-in features)"] == pytest.approx(float(report["fid"]))
    assert row["bits/dim (test)"] == pytest.approx(bpd.mean(), rel=1e-6)
    written = json.loads((eval_dir / "summary.json").read_text())
    assert written["checkpoints"]["2"]["eval loss"] == pytest.approx(float(loss["mean_loss"]))
    markdown = (eval_dir / "summary.md").read_text()
    assert "FID (stand-in features)" in markdown and "| FID |" not in markdown
    assert not (eval_dir / "meta_0.json").exists()  # finished: the meta file is removed, as the original


def _check_report_against_statistics(config, eval_dir, report):
    """IS / FID / KID recomputed here, by the textbook formulas, from the written features and the stats file."""
    stats = np.load(eval_dir / "ckpt_2_host_0" / "statistics_0.npz")
    samples = np.load(eval_dir / "ckpt_2_host_0" / "samples_0.npz")["samples"]
    # The statistics are the stand-in network's features of the written samples.
    features = inception.run_inception(samples, inception.load_feature_extractor(config))
    np.testing.assert_allclose(stats["pool_3"], features["pool_3"], rtol=1e-5, atol=1e-6)
    gen = stats["pool_3"][:60].astype(np.float64)
    real = eval_records.load_dataset_stats(config)["pool_3"].astype(np.float64)
    root = scipy.linalg.sqrtm(np.cov(real, rowvar=False) @ np.cov(gen, rowvar=False)).real
    fid = (np.sum((real.mean(0) - gen.mean(0)) ** 2) + np.trace(np.cov(real, rowvar=False))
           + np.trace(np.cov(gen, rowvar=False)) - 2 * np.trace(root))
    assert float(report["fid"]) == pytest.approx(fid, rel=1e-6)
    # KID: 1500 real and 60 generated features in 2 blocks (at most 1024 each) of 750 / 30.
    kernel = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
    blocks = []
    for r, g in ((real[:750], gen[:30]), (real[750:], gen[30:])):
        k_rr, k_gg = kernel(r, r), kernel(g, g)
        blocks.append((k_rr.sum() - np.trace(k_rr)) / (len(r) * (len(r) - 1))
                      + (k_gg.sum() - np.trace(k_gg)) / (len(g) * (len(g) - 1)) - 2 * kernel(r, g).mean())
    assert float(report["kid"]) == pytest.approx(np.mean(blocks), rel=1e-6)
    p = scipy.special.softmax(stats["logits"][:60].astype(np.float64), axis=1)
    inception_score = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), axis=1)))
    assert float(report["IS"]) == pytest.approx(inception_score, rel=1e-6)


def _check_bpd_round_against_likelihood_fn(config, workdir, eval_dir):
    """Bits/dim round 1 (repeat 1 of the test split) recomputed with likelihood_fn on the same batch and keys."""
    import jax

    import likelihood
    import run_lib
    import sde_lib
    from score_sde import checkpoints, datasets, eval_job, parallel

    seed, n = config.seed, 297
    # The batch: the test digits in canonical order, permuted by repeat 1's seed, dequantised with its noise.
    images = eval_job.eval_images(config, "test")
    batch = images[np.random.default_rng([seed, 1]).permutation(n)].astype(np.float32) / 255.0
    noise = np.random.default_rng([seed, 1, 1, 0]).random(batch.shape, dtype=np.float32)
    batch = datasets.get_data_scaler(config)((noise + batch * 255.0) / 256.0)[None]
    # The keys: PRNGKey(seed + 1), split off the model key, fold in process 0, one split for the loss
    # batch, one for bits/dim round 0, one for round 1.
    rng = jax.random.fold_in(jax.random.split(jax.random.PRNGKey(seed + 1))[0], 0)
    for _ in range(3):
        rng, keys = parallel.split_per_device(rng)
    model, template = run_lib.eval_state_template(config, jax.random.PRNGKey(0))
    state = checkpoints.restore_checkpoint(str(workdir / "checkpoints" / "checkpoint_2"), template)
    sde, _ = sde_lib.get_sde(config)
    likelihood_fn = likelihood.get_likelihood_fn(sde, model, datasets.get_data_inverse_scaler(config),
                                                 rtol=config.sampling.ode_rtol, atol=config.sampling.ode_atol,
                                                 solver=config.sampling.ode_solver)
    bpd = np.asarray(likelihood_fn(keys, parallel.replicate(state), batch)[0]).reshape(-1)
    np.testing.assert_allclose(np.load(eval_dir / "test_ckpt_2_bpd_1.npz")["arr_0"], bpd, rtol=1e-6)


_DRIVER = """
import json, logging, sys
sys.path[:0] = [{repo!r}, {tests!r}]
logging.basicConfig(level=logging.INFO)
import pathlib
from test_eval_job import _tiny_digits_config
import run_lib
config = _tiny_digits_config(pathlib.Path({root!r}))
config.update_from_flattened_dict(json.loads({overrides!r}))
run_lib.evaluate(config, {workdir!r}, {folder!r})
"""


def _eval_command(workdir: pathlib.Path, folder: str, overrides: dict) -> list:
    """A python command evaluating the tiny digits workdir into ``folder`` (a separate process, killable)."""
    code = _DRIVER.format(repo=str(REPO), tests=str(REPO / "tests"), root=str(workdir.parent),
                          overrides=json.dumps(overrides), workdir=str(workdir), folder=folder)
    return [sys.executable, "-c", code]


@pytest.mark.slow
def test_eval_kill_and_resume(trained):
    """kill -9 during the bits/dim rounds; the rerun resumes at the next round; the result equals an uninterrupted run."""
    _, workdir = trained
    overrides = {"eval.enable_loss": False, "eval.enable_bpd": True, "eval.enable_sampling": False,
                 "eval.bpd_dataset": "test", "eval.batch_size": 148}  # 2 batches x 5 repeats = 10 rounds
    num_rounds = 10
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = _eval_command(workdir, "eval_killed", overrides)
    eval_dir = workdir / "eval_killed"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 1500
        meta_file = eval_dir / "meta_0.json"
        while not (meta_file.exists() and json.loads(meta_file.read_text())["bpd_rounds_done"] >= 2):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    meta = json.loads((eval_dir / "meta_0.json").read_text())
    done = meta["bpd_rounds_done"]
    assert 2 <= done < num_rounds
    first_rounds = {r: (eval_dir / f"test_ckpt_2_bpd_{r}.npz").stat().st_mtime_ns for r in range(done)}

    # Resuming with another ODE tolerance would average rounds of two settings: refused, nothing on disk changes.
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in eval_dir.rglob("*") if p.is_file()}
    changed = subprocess.run(_eval_command(workdir, "eval_killed", dict(overrides, **{"sampling.ode_rtol": 1e-3})),
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert changed.returncode != 0
    assert "holds results computed with other settings (sampling.ode_rtol: 1e-05 -> 0.001)" in changed.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in eval_dir.rglob("*") if p.is_file()} == before

    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"bits/dim rounds done: {done}" in resumed.stderr
    for r, mtime in first_rounds.items():  # rounds finished before the kill were not redone
        assert (eval_dir / f"test_ckpt_2_bpd_{r}.npz").stat().st_mtime_ns == mtime

    straight = subprocess.run(_eval_command(workdir, "eval_straight", overrides), cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=1800)
    assert straight.returncode == 0, straight.stderr[-3000:]
    for r in range(num_rounds):
        a = np.load(eval_dir / f"test_ckpt_2_bpd_{r}.npz")["arr_0"]
        b = np.load(workdir / "eval_straight" / f"test_ckpt_2_bpd_{r}.npz")["arr_0"]
        np.testing.assert_array_equal(a, b)
    assert not (workdir / "eval_straight" / f"test_ckpt_2_bpd_{num_rounds}.npz").exists()
    killed_summary = json.loads((eval_dir / "summary.json").read_text())["checkpoints"]
    straight_summary = json.loads((workdir / "eval_straight" / "summary.json").read_text())["checkpoints"]
    assert killed_summary == straight_summary


def _write_cifar10_tarball(path: pathlib.Path, n_train: int = 40, n_test: int = 10) -> None:
    """A tiny cifar-10-binary.tar.gz (random records in the real binary layout)."""
    import io
    import tarfile

    rng = np.random.default_rng(0)

    def records(n):
        labels = rng.integers(0, 10, size=(n, 1), dtype=np.uint8)
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        return np.concatenate([labels, pixels], axis=1).tobytes()

    members = {f"data_batch_{i}.bin": records(n_train // 5) for i in range(1, 6)}
    members["test_batch.bin"] = records(n_test)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


_TRAIN_DRIVER = """
import logging, sys
sys.path[:0] = [{repo!r}, {tests!r}]
logging.basicConfig(level=logging.INFO)
import pathlib
from test_legacy_checkpoint import _golden_config
import run_lib
config = _golden_config(pathlib.Path({golden!r}))  # the checkpoint's model: ddpmpp_vp_cont (16x16x3)
config.data.data_dir = {tarball!r}
config.training.batch_size = 2
config.training.n_jitted_steps = 1
config.training.n_iters = 260001
config.training.snapshot_sampling = False
config.eval.batch_size = 2
run_lib.train(config, {workdir!r})
"""


@pytest.mark.slow
@pytest.mark.parametrize("folder", [
    "checkpoints-meta",
    "checkpoints",
])
def test_train_resumes_from_original_checkpoint(golden_dir, tmp_path, folder):
    """A workdir holding the original's checkpoint_26: training continues from step 260000 with its Adam moments."""
    from score_sde import checkpoints

    tarball = tmp_path / "cifar-10-binary.tar.gz"
    _write_cifar10_tarball(tarball)
    workdir = tmp_path / "workdir"
    (workdir / folder).mkdir(parents=True)
    shutil.copy(golden_dir / "legacy_checkpoint" / "checkpoints" / "checkpoint_26", workdir / folder)
    code = _TRAIN_DRIVER.format(repo=str(REPO), tests=str(REPO / "tests"), golden=str(golden_dir),
                                tarball=str(tarball), workdir=str(workdir))
    log = tmp_path / "train.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 1800
        while proc.poll() is None and time.time() < deadline:
            text = log.read_text()
            if "Starting training loop at step" in text and "Starting training loop at step 260000 " not in text:
                break  # started from scratch: it would train 260001 steps
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    stderr = log.read_text()
    assert "Starting training loop at step 260000 " in stderr, stderr[-3000:]
    assert proc.returncode == 0, stderr[-3000:]
    latest = checkpoints.latest_checkpoint(str(workdir / "checkpoints-meta"))
    raw = checkpoints.read_raw(latest)
    assert int(raw["step"]) == 260001
    # Adam continued from the original's moments: its count went on from 260000.
    assert int(raw["opt_state"]["0"]["count"]) == 260001
