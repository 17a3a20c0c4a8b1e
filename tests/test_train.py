"""run_lib.train and score_sde.checkpoints: checkpoints, data parallelism, kill/resume, NaN, multi-process."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses
import run_lib
import sde_lib
from configs.vp import digits
from models import utils as mutils
from score_sde import checkpoints, parallel, reporting
from score_sde.config_checks import validate_config

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A tiny DDPM++ on the embedded digits: compiles and steps in seconds on a CPU.
TINY_OVERRIDES = {
    "training.batch_size": 8,
    "training.n_jitted_steps": 1,
    "training.log_freq": 2,
    "training.eval_freq": 4,
    "training.snapshot_freq_for_preemption": 4,
    "training.snapshot_freq": 8,
    "training.n_iters": 8,
    "training.snapshot_sampling": False,
    "model.nf": 8,
    "model.ch_mult": (1, 2),
    "model.num_res_blocks": 1,
    "model.attn_resolutions": (4,),
    "model.num_scales": 10,
    "model.ema_rate": 0.9,
    "optim.warmup": 0,
}


def tiny_config(**overrides):
    """configs/vp/digits.py with :data:`TINY_OVERRIDES` and ``overrides`` ('section__field': value)."""
    config = digits.get_config()
    for key, value in {**TINY_OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
        section, field = key.split(".")
        setattr(config[section], field, value)
    return config


def tiny_flags(**overrides) -> list[str]:
    """The same config as command-line flags for ``main.py``."""
    values = {**TINY_OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}" for k, v in values.items()]


def _env(**extra) -> dict:
    """This environment (with conftest's compilation cache) for a subprocess on the CPU, the repository importable."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------

def _small_state(seed=0):
    params = {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3) + seed, "bias": jnp.ones(3)}}
    config = tiny_config()
    return mutils.State(step=seed, params=params, opt_state=losses.get_optimizer(config).init(params), lr=1e-3,
                        model_state={}, ema_rate=0.9, params_ema=params, rng=jax.random.PRNGKey(seed))


def test_checkpoint_roundtrip_keep_and_latest(tmp_path):
    template = _small_state(0)
    assert checkpoints.restore_checkpoint(str(tmp_path), template) is template
    assert checkpoints.latest_checkpoint(str(tmp_path)) is None
    for n in (1, 2, 10, 3):
        checkpoints.save_checkpoint(str(tmp_path), _small_state(n), step=n, keep=2)
    # keep=2 keeps the two highest numbers, whatever the order of writing.
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_10", "checkpoint_3"]
    assert checkpoints.latest_checkpoint(str(tmp_path)).endswith("checkpoint_10")
    restored = checkpoints.restore_checkpoint(str(tmp_path), template)
    expected = _small_state(10)
    for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert type(restored.opt_state) is type(template.opt_state)
    # A single file can be named directly.
    assert int(checkpoints.restore_checkpoint(str(tmp_path / "checkpoint_3"), template).step) == 3


def test_checkpoint_errors_name_the_problem(tmp_path):
    template = _small_state(0)
    checkpoints.save_checkpoint(str(tmp_path), template, step=1)
    wrong = template.replace(params={"dense": {"kernel": jnp.zeros((3, 3)), "bias": jnp.ones(3)}})
    with pytest.raises(ValueError, match=r"dense.*kernel.*\(2, 3\).*\(3, 3\)"):
        checkpoints.restore_checkpoint(str(tmp_path), wrong)
    (tmp_path / "checkpoint_2").write_bytes(b"\x00not msgpack")
    with pytest.raises(ValueError, match="checkpoint_2 is not a readable"):
        checkpoints.restore_checkpoint(str(tmp_path), template)
    with pytest.raises(FileNotFoundError):
        checkpoints.restore_checkpoint(str(tmp_path / "nowhere"), template)


def test_temporary_files_are_never_taken_for_checkpoints(tmp_path):
    template = _small_state(0)
    checkpoints.save_checkpoint(str(tmp_path), template, step=4)
    # What a write killed half-way leaves behind.
    (tmp_path / ".checkpoint_5.abc.tmp").write_bytes(b"partial")
    assert checkpoints.latest_checkpoint(str(tmp_path)).endswith("checkpoint_4")
    assert int(checkpoints.restore_checkpoint(str(tmp_path), template).step) == 0


# ------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------

def test_image_grid_layout_and_png(tmp_path):
    images = np.stack([np.full((2, 3, 1), v) for v in (0.0, 0.5, 1.0)])
    grid = reporting.make_grid(images, nrow=2, padding=1, pad_value=0.25)
    assert grid.shape == (2 * 3 + 1, 2 * 4 + 1, 1)
    np.testing.assert_array_equal(grid[1:3, 5:8, 0], 0.5)
    np.testing.assert_array_equal(grid[4:6, 1:4, 0], 1.0)
    assert grid[0, 0, 0] == 0.25 and grid[4, 5, 0] == 0.25  # padding and the empty fourth cell
    from PIL import Image

    reporting.save_image(images, str(tmp_path / "g.png"), nrow=2, padding=1, upscale=2)
    png = np.asarray(Image.open(tmp_path / "g.png"))
    assert png.shape == (2 * (2 * 3 + 1), 2 * (2 * 4 + 1))
    assert png.max() == 255 and png[2 * 1, 2 * 5] == 128


def test_progress_line_rate_and_eta():
    clock = iter([0.0, 100.0, 101.0, 102.0]).__next__
    progress = reporting.Progress(0, 100, clock=clock)
    progress.update(10)  # the first interval includes compilation and is ignored
    progress.update(20)
    progress.update(30)
    assert progress.steps_per_second() == pytest.approx(10.0)
    assert progress.line(30, loss=0.5) == "step 30/100 (30%) | loss 5.0000e-01 | 10.00 steps/s | ETA 7s"
    assert reporting.format_duration(3725) == "1h02m05s"


# ------------------------------------------------------------------------------------------
# training in this process
# ------------------------------------------------------------------------------------------

def _steps_in_log(workdir) -> list[int]:
    text = (pathlib.Path(workdir) / "stdout.txt").read_text()
    return [int(line.split("step ")[1].split("/")[0]) for line in text.splitlines() if "| training_loss" in line]


def _losses_in_log(workdir) -> dict[int, str]:
    """``{step: 'training_loss 1.0021e+00'}`` from the progress lines of ``workdir/stdout.txt``."""
    text = (pathlib.Path(workdir) / "stdout.txt").read_text()
    lines = [line for line in text.splitlines() if "| training_loss" in line]
    return {int(line.split("step ")[1].split("/")[0]): line.split(" | ")[1] for line in lines}


def test_replicated_state_has_the_sharding_pmap_returns():
    """Otherwise the train step's first call (replicated state) and later calls (its own outputs) compile twice."""
    step = parallel.pmap(lambda tree: jax.tree_util.tree_map(lambda x: x + 1, tree))
    replicated = parallel.replicate({"w": jnp.ones(3), "step": 0})
    out = step(replicated)
    for before, after in zip(jax.tree_util.tree_leaves(replicated), jax.tree_util.tree_leaves(out)):
        assert before.sharding == after.sharding


@pytest.mark.parametrize("how", ["unroll", "scan"])
def test_fused_steps_equal_the_steps_one_after_another(how):
    """run_lib.fuse_steps: n steps in one call give the carries and losses of n single calls, unrolled or scanned."""

    def step_fn(carry, batch):
        rng, w = carry
        rng, noise_rng = jax.random.split(rng)
        x = batch["image"] + jax.random.normal(noise_rng, batch["image"].shape)
        loss = jnp.mean((x * w) ** 2)
        return (rng, w - 0.1 * jax.grad(lambda v: jnp.mean((x * v) ** 2))(w)), loss

    batches = {"image": jax.random.normal(jax.random.PRNGKey(1), (3, 4, 2))}
    carry = (jax.random.PRNGKey(0), jnp.ones(2))
    fused_carry, fused_losses = jax.jit(run_lib.fuse_steps(step_fn, how))(carry, batches)
    one_by_one = []
    for i in range(3):
        carry, loss = step_fn(carry, {"image": batches["image"][i]})
        one_by_one.append(loss)
    assert fused_losses.shape == (3,)
    np.testing.assert_allclose(np.asarray(fused_losses), np.asarray(one_by_one), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(fused_carry[0]), np.asarray(carry[0]))
    np.testing.assert_allclose(np.asarray(fused_carry[1]), np.asarray(carry[1]), rtol=1e-6)


def test_fusion_unrolls_on_a_cpu_and_scans_elsewhere():
    from score_sde import train_steps

    assert [train_steps.fusion("auto", b) for b in ("cpu", "gpu", "tpu")] == ["unroll", "scan", "scan"]
    assert train_steps.fusion("scan", "cpu") == "scan" and train_steps.fusion("unroll", "gpu") == "unroll"
    with pytest.raises(ValueError, match="fuse_steps_with='loop'.*'auto', 'unroll', 'scan'"):
        train_steps.fusion("loop")
    with pytest.raises(ValueError, match="config.training.fuse_steps_with='loop' is not allowed"):
        validate_config(tiny_config(training__fuse_steps_with="loop"))


def test_the_config_picks_how_the_train_step_fuses_its_steps():
    """``training.fuse_steps_with`` reaches the pmapped step: a ``scan`` in its program, or none (traced, not
    compiled)."""
    from score_sde import train_steps

    programs = {}
    for how in ("unroll", "scan"):
        config = tiny_config(training__fuse_steps_with=how)
        model, state = losses.init_train_state(jax.random.PRNGKey(0), config)
        p_train_step, p_eval_step = train_steps.make_train_and_eval_steps(config, sde_lib.get_sde(config)[0], model)
        keys = jax.random.split(jax.random.PRNGKey(1), parallel.local_device_count())
        image = (config.data.image_size, config.data.image_size, config.data.num_channels)
        batch = {"image": np.zeros(tuple(parallel.batch_dims(8, 2)) + image, np.float32)}
        programs[how] = [str(jax.make_jaxpr(step)((keys, parallel.replicate(state)), batch))
                         for step in (p_train_step, p_eval_step)]
    assert all("scan[" in text for text in programs["scan"])
    assert not any("scan[" in text for text in programs["unroll"])


def test_train_writes_checkpoints_summaries_config_and_resumes(tmp_path):
    workdir = tmp_path / "run"
    run_lib.train(tiny_config(), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["checkpoint_1"]
    assert sorted(os.listdir(workdir / "checkpoints-meta")) == ["checkpoint_2"]
    assert json.loads((workdir / "config.json").read_text())["model"]["nf"] == 8
    assert os.listdir(workdir / "tensorboard")
    assert _steps_in_log(workdir) == [2, 4, 6, 8]
    model, template = losses.init_train_state(jax.random.PRNGKey(0), tiny_config())
    state = checkpoints.restore_checkpoint(str(workdir / "checkpoints"), template)
    assert int(state.step) == 8  # the EMA of these steps: test_train_ema_follows_its_recurrence_on_every_leaf

    # Longer n_iters: resumes from the meta checkpoint at step 8, not from 0.
    run_lib.train(tiny_config(training__n_iters=12), str(workdir))
    assert _steps_in_log(workdir) == [2, 4, 6, 8, 10, 12]
    text = (workdir / "stdout.txt").read_text()
    assert "Starting training loop at step 8 of 12" in text
    state = checkpoints.restore_checkpoint(str(workdir / "checkpoints"), template)
    assert int(state.step) == 12


def test_a_restarted_run_ends_bit_for_bit_where_an_uninterrupted_one_does(tmp_path):
    """8 steps in one go, and 4 steps then a restart to 8, give the same State to the last bit: the restart
    reads the batches (with their flips and dequantisation noise) and draws the keys the one-go run did."""
    overrides = {"data__random_flip": True, "data__uniform_dequantization": True}
    run_lib.train(tiny_config(**overrides), str(tmp_path / "one_go"))
    run_lib.train(tiny_config(training__n_iters=4, **overrides), str(tmp_path / "restarted"))
    run_lib.train(tiny_config(**overrides), str(tmp_path / "restarted"))
    assert "Starting training loop at step 4 of 8" in (tmp_path / "restarted" / "stdout.txt").read_text()
    _, template = losses.init_train_state(jax.random.PRNGKey(0), tiny_config())
    one_go, restarted = (checkpoints.restore_checkpoint(str(tmp_path / run / "checkpoints-meta"), template)
                         for run in ("one_go", "restarted"))
    assert int(one_go.step) == int(restarted.step) == 8
    for a, b in zip(jax.tree_util.tree_leaves(one_go), jax.tree_util.tree_leaves(restarted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _losses_in_log(tmp_path / "one_go") == _losses_in_log(tmp_path / "restarted")


def test_train_ema_follows_its_recurrence_on_every_leaf(tmp_path):
    """A checkpoint after every step: ``ema_k = rate·ema_(k-1) + (1 - rate)·params_k`` from ``ema_0 = params_0``
    holds on every leaf, and every leaf of both moved."""
    config = tiny_config(training__n_iters=3, training__snapshot_freq=1, training__log_freq=1)
    run_lib.train(config, str(tmp_path))
    _, initial = losses.init_train_state(jax.random.PRNGKey(config.seed), config)
    leaves = lambda tree: [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]  # noqa: E731
    rate = np.float32(config.model.ema_rate)
    ema = leaves(initial.params)
    for k in (1, 2, 3):
        state = checkpoints.restore_checkpoint(str(tmp_path / "checkpoints" / f"checkpoint_{k}"), initial)
        assert int(state.step) == k
        ema = [e * rate + p * (np.float32(1) - rate) for e, p in zip(ema, leaves(state.params))]
        for got, want in zip(leaves(state.params_ema), ema):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    for first, param, average in zip(leaves(initial.params), leaves(state.params), leaves(state.params_ema)):
        # Exactly: a bias in front of a normalisation gets gradients near 1e-10 and moves by as little.
        assert not np.array_equal(average, first) and not np.array_equal(average, param)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_batches = run_lib.numpy_batches

    def poisoned(ds, scaler):
        for i, batch in enumerate(real_batches(ds, scaler)):
            if i == 5:  # step 6, after the meta checkpoint at step 4
                batch = {"image": np.full_like(batch["image"], np.nan)}
            yield batch

    monkeypatch.setattr(run_lib, "numpy_batches", poisoned)
    workdir = tmp_path / "run"
    with pytest.raises(run_lib.TrainingDivergedError, match=r"loss is NaN or infinite after step 6.*checkpoint_1"):
        run_lib.train(tiny_config(training__n_iters=20), str(workdir))
    assert os.listdir(workdir / "checkpoints-meta") == ["checkpoint_1"]
    _, template = losses.init_train_state(jax.random.PRNGKey(0), tiny_config())
    state = checkpoints.restore_checkpoint(str(workdir / "checkpoints-meta"), template)
    assert int(state.step) == 4
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(state.params))


# ------------------------------------------------------------------------------------------
# data parallelism, 2 devices in a subprocess
# ------------------------------------------------------------------------------------------

DATA_PARALLEL_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, 'tests')
    import losses, run_lib, sde_lib
    from score_sde import parallel
    from test_train import tiny_config

    assert parallel.local_device_count() == 2, jax.devices()
    config = tiny_config()
    model, state = losses.init_train_state(jax.random.PRNGKey(0), config)
    sde, _ = sde_lib.get_sde(config)
    p_train_step, _ = run_lib.make_train_and_eval_steps(config, sde, model)
    # Two calls of one step each (config.training.n_jitted_steps = 1: the program run_lib.train
    # compiles, so the compilation cache serves it; fuse_steps has its own test above).
    n_steps, per_device = 2, 4
    images = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (2, n_steps, per_device, 8, 8, 1)) * 2 - 1)
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    carry, ploss = (keys.copy(), parallel.replicate(state)), []  # a copy: the carry is donated
    for s in range(n_steps):
        carry, step_loss = p_train_step(carry, {'image': images[:, s:s + 1]})
        ploss.append(np.asarray(step_loss)[:, 0])
    ploss = np.stack(ploss, axis=1)
    replicas_equal = all(bool(np.array_equal(np.asarray(x)[0], np.asarray(x)[1]))
                         for x in jax.tree_util.tree_leaves(carry[1]))

    # The same two steps on ONE device: each half of the global batch with its device's key,
    # gradients averaged, then the optimizer and EMA (what data parallelism must compute).
    loss_fn = losses.get_sde_loss_fn(sde, model, train=True, reduce_mean=config.training.reduce_mean,
                                     continuous=True, likelihood_weighting=False)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=1, has_aux=True))
    optimize_fn = jax.jit(losses.optimization_manager(config))
    ref, dev_keys, ref_losses = state, list(keys), []
    for s in range(n_steps):
        grads, step_losses = [], []
        for d in range(2):
            dev_keys[d], step_rng = jax.random.split(dev_keys[d])
            (loss, _), g = grad_fn(step_rng, ref.params, {}, {'image': jnp.asarray(images[d, s])})
            grads.append(g); step_losses.append(float(loss))
        grad = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, *grads)
        params, opt_state = optimize_fn(ref, grad)
        ema = jax.tree_util.tree_map(lambda e, p: e * ref.ema_rate + p * (1 - ref.ema_rate), ref.params_ema, params)
        ref = ref.replace(step=ref.step + 1, params=params, opt_state=opt_state, params_ema=ema)
        ref_losses.append(np.mean(step_losses))
    got = parallel.unreplicate(carry[1])
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree_util.tree_leaves((got.params, got.params_ema)),
                               jax.tree_util.tree_leaves((ref.params, ref.params_ema))))
    scale = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree_util.tree_leaves(ref.params))
    print(json.dumps(dict(replicas_equal=replicas_equal, max_abs_diff=diff, scale=scale, step=int(got.step),
                          loss=np.asarray(ploss)[0].tolist(), ref_loss=ref_losses)))
""")


@pytest.mark.slow
def test_two_devices_equal_one_device_on_the_same_global_batch():
    out = subprocess.run([sys.executable, "-c", DATA_PARALLEL_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"), timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["replicas_equal"]
    assert result["step"] == 2
    np.testing.assert_allclose(result["loss"], result["ref_loss"], rtol=1e-5)
    assert result["max_abs_diff"] <= 1e-5 * max(result["scale"], 1.0), result


# ------------------------------------------------------------------------------------------
# kill -9 and resume through main.py
# ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_then_resume_reaches_n_iters_without_corrupt_checkpoints(tmp_path):
    workdir = tmp_path / "run"
    n_iters = 400
    cmd = [sys.executable, "main.py", "--config", "configs/vp/digits.py", "--workdir", str(workdir), "--mode",
           "train"] + tiny_flags(training__n_iters=n_iters, training__log_freq=20, training__eval_freq=100,
                                 training__snapshot_freq=200, training__snapshot_freq_for_preemption=10)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    meta_dir = workdir / "checkpoints-meta"
    deadline = time.time() + 1200
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.latest_checkpoint(str(meta_dir)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, template = losses.init_train_state(jax.random.PRNGKey(0), tiny_config())
    killed_at = int(checkpoints.restore_checkpoint(str(meta_dir), template).step)
    assert 10 <= killed_at < n_iters

    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    log = (workdir / "stdout.txt").read_text()
    resumed_from = [int(line.split("at step ")[1].split()[0]) for line in log.splitlines()
                    if "Starting training loop at step" in line]
    assert resumed_from[0] == 0 and resumed_from[-1] >= killed_at > 0
    for folder in ("checkpoints", "checkpoints-meta"):
        for name in os.listdir(workdir / folder):
            if name.startswith("checkpoint_"):
                checkpoints.restore_checkpoint(str(workdir / folder / name), template)  # raises if corrupt
    final = checkpoints.restore_checkpoint(str(workdir / "checkpoints"), template)
    assert int(final.step) == n_iters
    assert sorted(os.listdir(workdir / "checkpoints")) == ["checkpoint_1", "checkpoint_2"]


# ------------------------------------------------------------------------------------------
# two processes on localhost
# ------------------------------------------------------------------------------------------

MULTI_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    process_id, num_processes, port, workdir, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    sys.path.insert(0, 'tests')
    from score_sde import parallel
    if int(num_processes) > 1:
        parallel.maybe_initialize_distributed(f'localhost:{port}', int(num_processes), int(process_id))
    import jax, numpy as np
    import losses, run_lib, sde_lib
    from test_train import tiny_config

    # 1) Two train steps on a fixed global batch of 2 x 4 examples, device d gets half d.
    config = tiny_config()
    model, state = losses.init_train_state(jax.random.PRNGKey(0), config)
    sde, _ = sde_lib.get_sde(config)
    p_train_step, _ = run_lib.make_train_and_eval_steps(config, sde, model)
    images = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (2, 2, 4, 8, 8, 1)) * 2 - 1)
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(2), 2))
    first = parallel.process_index() * parallel.local_device_count()
    mine = slice(first, first + parallel.local_device_count())
    carry = (keys[mine], parallel.replicate(state))
    for s in range(2):  # one step per call, as run_lib.train below (one compilation serves both)
        carry, _ = p_train_step(carry, {'image': images[mine, s:s + 1]})
    pstate = carry[1]
    step_params = [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(parallel.unreplicate(pstate).params)]

    # 2) run_lib.train with real data: every process its own workdir, to see who writes.
    final = run_lib.train(tiny_config(), workdir)
    train_params = [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(final.params)]
    json.dump(dict(devices=jax.device_count(), step_params=step_params, train_params=train_params), open(out, 'w'))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together_and_equal_one_process_with_two_devices(tmp_path):
    port = _free_port()
    # Without the compilation cache: a process served by the cache while the other compiles would
    # reach the first cross-process collective > 30 s earlier, gloo's fixed setup deadline.
    uncached = _env()
    uncached.pop("JAX_COMPILATION_CACHE_DIR", None)
    procs = [subprocess.Popen([sys.executable, "-c", MULTI_PROCESS_SCRIPT, str(i), "2", str(port),
                               str(tmp_path / f"work{i}"), str(tmp_path / f"out{i}.json")],
                              cwd=ROOT, env=uncached, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    single = subprocess.run([sys.executable, "-c", MULTI_PROCESS_SCRIPT, "0", "1", "0", str(tmp_path / "single"),
                             str(tmp_path / "single.json")], cwd=ROOT, capture_output=True, text=True, timeout=1800,
                            env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    for p in procs:
        _, err = p.communicate(timeout=1800)
        assert p.returncode == 0, err[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    reference = json.loads((tmp_path / "single.json").read_text())
    assert results[0]["devices"] == results[1]["devices"] == reference["devices"] == 2
    for a, b, c in zip(results[0]["step_params"], results[1]["step_params"], reference["step_params"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0]["train_params"], results[1]["train_params"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Only process 0 wrote checkpoints, the config and the log.
    assert os.listdir(tmp_path / "work0" / "checkpoints") == ["checkpoint_1"]
    assert os.listdir(tmp_path / "work0" / "checkpoints-meta") == ["checkpoint_2"]
    assert (tmp_path / "work0" / "stdout.txt").exists() and (tmp_path / "work0" / "config.json").exists()
    assert os.listdir(tmp_path / "work1" / "checkpoints") == []
    assert os.listdir(tmp_path / "work1" / "checkpoints-meta") == []
    assert not (tmp_path / "work1" / "stdout.txt").exists() and not (tmp_path / "work1" / "config.json").exists()
