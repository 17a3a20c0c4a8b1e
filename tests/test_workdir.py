"""A training workdir is a record (issue 12): changed settings between runs, damaged checkpoints, one-line failures.

Each test reproduces one case of the issue on the tiny digits config of test_train.py.
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import losses
import run_lib
from configs.subvp import digits as subvp_digits
from score_sde import checkpoints, datasets

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_train import ROOT, TINY_OVERRIDES, _env, tiny_config  # noqa: E402


def _numbered_steps(folder: pathlib.Path) -> dict[int, int]:
    """``{n: training step}`` of the files ``checkpoint_<n>`` in ``folder``."""
    return {int(p.name.split("_")[1]): int(checkpoints.read_raw(str(p))["step"])
            for p in folder.iterdir() if p.name.startswith("checkpoint_")}


def _log(workdir: pathlib.Path) -> str:
    return (workdir / "stdout.txt").read_text()


def _tree_snapshot(folder: pathlib.Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _saved_state(config, step: int):
    """A freshly initialised State of ``config``, host arrays, marked as trained to ``step``."""
    _, state = losses.init_train_state(jax.random.PRNGKey(config.seed), config)
    return jax.device_get(state).replace(step=step)


def _flip_byte_in_the_middle(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------
# 1. Changing the checkpoint frequencies when extending a run
# ------------------------------------------------------------------------------------------

def test_1_extending_a_run_with_other_frequencies_keeps_every_state_and_resumes_from_the_newest(tmp_path):
    workdir = tmp_path / "run"
    run_lib.train(tiny_config(training__n_iters=6, training__snapshot_freq_for_preemption=1,
                              training__snapshot_freq=2), str(workdir))
    assert _numbered_steps(workdir / "checkpoints") == {1: 2, 2: 4, 3: 6}
    assert _numbered_steps(workdir / "checkpoints-meta") == {6: 6}

    # Extended with lower-numbering frequencies: step 8 is checkpoint_2 of the new numbering.
    extended = tiny_config(training__n_iters=8, training__snapshot_freq_for_preemption=4, training__snapshot_freq=4)
    run_lib.train(extended, str(workdir))
    numbered = _numbered_steps(workdir / "checkpoints")
    assert {n: numbered[n] for n in (1, 2, 3)} == {1: 2, 2: 4, 3: 6}, "a checkpoint of another step was replaced"
    assert sorted(numbered.values()) == [2, 4, 6, 8] and max(numbered) == 4 and numbered[4] == 8
    assert list(_numbered_steps(workdir / "checkpoints-meta").values()) == [8], "the newest state was deleted"

    # The safe changes are logged and recorded: config.json says what ran, the history keeps both configs.
    log = _log(workdir)
    assert "config.training.n_iters changed since the last run of this workdir: 6 -> 8" in log
    assert "saved as checkpoint_4" in log
    assert "replaces the checkpoint's" not in log  # lr and ema_rate did not change (float32 in the checkpoint)
    assert json.loads((workdir / "config.json").read_text())["training"]["snapshot_freq"] == 4
    history = [json.loads(line) for line in (workdir / run_lib.CONFIG_HISTORY).read_text().splitlines()]
    assert [h["config"]["training"]["n_iters"] for h in history] == [6, 8]
    assert [h["step"] for h in history] == [0, 6]
    assert history[1]["changes"]["training.snapshot_freq"] == [2, 4]

    # A restart of the finished run resumes at step 8, not at the older meta state of step 6.
    run_lib.train(extended, str(workdir))
    starts = [line for line in _log(workdir).splitlines() if "Starting training loop" in line]
    assert len(starts) == 3 and "Starting training loop at step 8 of 8" in starts[-1]


def test_numbers_grow_with_the_step_and_a_step_redone_replaces_its_own_file(tmp_path):
    folder = str(tmp_path)
    for step in (2, 4, 6):
        checkpoints.save_checkpoint(folder, {"step": step}, step=checkpoints.number_for_step(folder, step, 2))
    assert checkpoints.number_for_step(folder, 8, 2) == 4       # the original's ceil(step / freq)
    assert checkpoints.number_for_step(folder, 8, 4) == 4       # checkpoint_2 holds step 4: the next number
    assert checkpoints.number_for_step(folder, 100, 20) == 5    # above every number, as the original
    assert checkpoints.number_for_step(folder, 6, 2) == 3       # the same step again: its own file
    assert checkpoints.number_for_step(folder, 5, 2) == 4       # checkpoint_3 holds step 6, not 5


# ------------------------------------------------------------------------------------------
# 2. The divergence advice can be followed: the command line's lr and EMA rate win on resume
# ------------------------------------------------------------------------------------------

def test_2_divergence_advice_lowers_the_learning_rate_that_runs(tmp_path, monkeypatch):
    real_batches = run_lib.numpy_batches

    def poisoned(ds, scaler):
        for i, batch in enumerate(real_batches(ds, scaler)):
            if i == 2:  # step 3, after the meta checkpoint of step 2
                batch = {"image": np.full_like(batch["image"], np.nan)}
            yield batch

    workdir = tmp_path / "run"
    config = tiny_config(training__n_iters=8, training__snapshot_freq_for_preemption=2)
    monkeypatch.setattr(run_lib, "numpy_batches", poisoned)
    with pytest.raises(run_lib.TrainingDivergedError) as info:
        run_lib.train(config, str(workdir))
    monkeypatch.setattr(run_lib, "numpy_batches", real_batches)
    advice = re.search(r"--config\.optim\.lr=(\S+)", str(info.value))
    assert advice, str(info.value)
    lower_lr = float(advice.group(1))
    assert lower_lr < config.optim.lr

    final = run_lib.train(tiny_config(training__n_iters=4, training__snapshot_freq_for_preemption=2,
                                      optim__lr=lower_lr, model__ema_rate=0.5), str(workdir))
    assert "Starting training loop at step 2 of 4" in _log(workdir)
    as_run = lambda value: float(np.float32(value))  # noqa: E731 (the state holds float32)
    assert (as_run(final.lr), as_run(final.ema_rate)) == (as_run(lower_lr), 0.5)
    saved = checkpoints.read_raw(str(workdir / "checkpoints" / "checkpoint_1"))
    assert (int(saved["step"]), as_run(saved["lr"]), as_run(saved["ema_rate"])) == (4, as_run(lower_lr), 0.5)
    recorded = json.loads((workdir / "config.json").read_text())
    assert recorded["optim"]["lr"] == lower_lr and recorded["model"]["ema_rate"] == 0.5
    assert f"config.optim.lr = {lower_lr:g} replaces the checkpoint's {config.optim.lr:g}" in _log(workdir)


# ------------------------------------------------------------------------------------------
# 3. A config that does not match the workdir's is refused before anything is written
# ------------------------------------------------------------------------------------------

def _subvp_tiny_config():
    config = subvp_digits.get_config()
    for key, value in TINY_OVERRIDES.items():
        section, field = key.split(".")
        setattr(config[section], field, value)
    return config


def test_3_another_model_or_sde_on_an_existing_workdir_is_refused_and_changes_nothing(tmp_path):
    workdir = tmp_path / "run"
    config = tiny_config()
    workdir.mkdir()
    run_lib.save_config(config, str(workdir))
    checkpoints.save_checkpoint(str(workdir / "checkpoints-meta"), {"step": 4}, step=1)
    before = _tree_snapshot(workdir)

    with pytest.raises(run_lib.WorkdirConfigError, match=r"model\.nf: 8 -> 16") as info:
        run_lib.train(tiny_config(model__nf=16), str(workdir))
    assert "\n" not in str(info.value)
    with pytest.raises(run_lib.WorkdirConfigError, match=r"training\.sde: 'vpsde' -> 'subvpsde'"):
        run_lib.train(_subvp_tiny_config(), str(workdir))
    assert _tree_snapshot(workdir) == before

    # Safe fields may change; without a checkpoint (nothing to resume) any field may.
    safe = run_lib.check_workdir_config(tiny_config(training__n_iters=99, optim__lr=1e-5), str(workdir), True)
    assert safe == {"training.n_iters": (8, 99), "optim.lr": (config.optim.lr, 1e-5)}
    assert "model.nf" in run_lib.check_workdir_config(tiny_config(model__nf=16), str(workdir), False)
    # A field the code gained since config.json was written is no conflict (a workdir of an older version).
    newer_code = tiny_config()
    newer_code.model.new_field = 1
    assert run_lib.check_workdir_config(newer_code, str(workdir), True) == {"model.new_field": ("(absent)", 1)}


# ------------------------------------------------------------------------------------------
# 6. Damaged checkpoints: found at restore, one line, no retry; resume falls back
# ------------------------------------------------------------------------------------------

def test_6_a_damaged_checkpoint_is_reported_at_restore_naming_the_file(tmp_path):
    state = {"step": 3, "params": np.linspace(-1.0, 1.0, 4096, dtype=np.float32)}
    path = pathlib.Path(checkpoints.save_checkpoint(str(tmp_path), state, step=1))
    assert int(checkpoints.restore_checkpoint(str(path), state)["step"]) == 3
    _flip_byte_in_the_middle(path)  # one bit of one parameter: still valid msgpack
    with pytest.raises(checkpoints.CorruptCheckpointError, match=re.escape(str(path)) + ".*checksum.*delete or move it"):
        checkpoints.restore_checkpoint(str(path), state)
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(checkpoints.CorruptCheckpointError, match=re.escape(str(path))):
        checkpoints.restore_checkpoint(str(path), state)


def test_6_a_damaged_meta_checkpoint_falls_back_to_the_numbered_one_of_the_same_step(tmp_path):
    workdir = tmp_path / "run"
    config = tiny_config()
    good = _saved_state(config, step=8)
    checkpoints.save_checkpoint(str(workdir / "checkpoints"), good, step=1)
    meta = pathlib.Path(checkpoints.save_checkpoint(str(workdir / "checkpoints-meta"), good, step=2))
    _flip_byte_in_the_middle(meta)

    final = run_lib.train(config, str(workdir))
    log = _log(workdir)
    assert f"Checkpoint file {meta} is not a readable checkpoint" in log
    assert f"Resuming from {workdir / 'checkpoints' / 'checkpoint_1'} (step 8) instead" in log
    assert "Starting training loop at step 8 of 8" in log
    for got, want in zip(jax.tree_util.tree_leaves(final.params), jax.tree_util.tree_leaves(good.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ------------------------------------------------------------------------------------------
# 7. One line for: a config path or field that does not exist, missing data, a read-only or full disk
# ------------------------------------------------------------------------------------------

# main.py with os.mkdir failing as on a read-only file system for paths under argv's --workdir.
READ_ONLY_MAIN = """
import errno, os, runpy, sys
workdir = os.path.abspath(sys.argv[sys.argv.index('--workdir') + 1])
real_mkdir = os.mkdir
def mkdir(path, *args, **kwargs):
    if os.path.abspath(path).startswith(workdir):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    return real_mkdir(path, *args, **kwargs)
os.mkdir = mkdir
sys.argv[0] = 'main.py'
runpy.run_path('main.py', run_name='__main__')
"""


def test_7_main_reports_each_failure_in_one_line(tmp_path):
    workdir = tmp_path / "w"

    def main(*args, code="", **env):
        cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "main.py", *args]
        out = subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=600)
        assert "Traceback" not in out.stderr, out.stderr[-3000:]
        return out.returncode, out.stderr.strip().splitlines()[-1]

    common = ["--workdir", str(workdir), "--mode", "train"]
    assert main("--config", "configs/vp/digits_typo.py", *common) == (
        2, "error: --config=configs/vp/digits_typo.py: no such config file (looked for "
           f"{ROOT / 'configs/vp/digits_typo.py'}); give the path of a file under configs/, e.g. --config "
           "configs/vp/digits.py.")
    assert main("--config", "configs/vp/digits.py", *common, "--config.model.nff=1") == (
        2, "error: --config.model.nff: the config has no field 'nff'; did you mean 'nf'?")
    assert not workdir.exists()

    code, line = main("--config", "configs/vp/digits.py", *common, code=READ_ONLY_MAIN)
    assert (code, line) == (1, f"error: cannot write {workdir}: Read-only file system. Make it writable or free "
                               "disk space, or choose another --workdir.")

    # The paper's CIFAR-10 command offline (a proxy that refuses connections): the data are checked first.
    code, line = main("--config", "configs/vp/cifar10_ddpmpp_continuous.py", *common,
                      f"--config.data.data_dir={tmp_path / 'no_data'}", https_proxy="http://127.0.0.1:9")
    assert code == 1 and "Dataset CIFAR10" in (workdir / "stdout.txt").read_text()
    assert "parameters" not in (workdir / "stdout.txt").read_text()  # no model was built


def test_7_missing_data_stops_before_the_model_is_built_and_lands_in_the_log(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data were checked")

    monkeypatch.setattr(losses, "init_train_state", no_model)
    workdir = tmp_path / "run"
    config = tiny_config(data__dataset="FASHION_MNIST", data__data_dir=str(tmp_path / "empty"))
    with pytest.raises(datasets.DatasetUnavailableError, match="Fashion-MNIST") as info:
        run_lib.train(config, str(workdir))
    assert f"Stopped: {info.value}" in _log(workdir)
    assert not (workdir / "config.json").exists()


def test_7_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch):
    previous = pathlib.Path(checkpoints.save_checkpoint(str(tmp_path), {"step": 2}, step=1))
    before = previous.read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as info:
        checkpoints.save_checkpoint(str(tmp_path), {"step": 4}, step=2, keep=1)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "checkpoint_2")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_1"] and previous.read_bytes() == before
