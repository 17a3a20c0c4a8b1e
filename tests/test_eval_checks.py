"""run_lib.evaluate's checks before any work, and the waiting / restoring of checkpoints (no model is run).

Every refusal must come at once, in one line naming the field or file, with nothing written:
no ``WORKDIR/eval`` folder, no change to an existing one.
"""
import logging
import pathlib

import numpy as np
import pytest

import run_lib
from configs.vp import digits
from score_sde import checkpoints, eval_checks, eval_job, eval_records


def _config(begin=1, end=1, wait_s=0.0):
    config = digits.get_config()
    config.eval.begin_ckpt = begin
    config.eval.end_ckpt = end
    config.eval.wait_for_checkpoints_s = wait_s
    return config


@pytest.fixture
def no_work(monkeypatch):
    """Building the evaluation (models, data, compiled functions) fails the test: a refusal must come before."""

    def fail(*args, **kwargs):
        raise AssertionError("evaluate started its work before refusing")

    monkeypatch.setattr(eval_job, "build_job", fail)


def _refused(config, workdir: pathlib.Path, match: str) -> str:
    with pytest.raises(run_lib.EvaluationError, match=match) as info:
        run_lib.evaluate(config, str(workdir))
    message = str(info.value)
    assert "\n" not in message
    return message


def _snapshot(folder: pathlib.Path) -> dict:
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- before any work

def test_begin_after_end_is_refused(tmp_path, no_work):
    _refused(_config(begin=3, end=2), tmp_path, r"config.eval.begin_ckpt = 3 is after config.eval.end_ckpt = 2")
    assert not (tmp_path / "eval").exists()


def test_negative_wait_is_refused(tmp_path, no_work):
    _refused(_config(wait_s=-1.0), tmp_path, "config.eval.wait_for_checkpoints_s = -1.0")


def test_mistyped_workdir_is_refused_not_waited_for(tmp_path, no_work):
    message = _refused(_config(), tmp_path / "mistyped", r"Checkpoint\(s\) 1 of .* are not in")
    assert "the folder does not exist" in message and "config.eval.wait_for_checkpoints_s" in message
    assert not (tmp_path / "mistyped").exists()


def test_end_past_the_last_checkpoint_is_refused(tmp_path, no_work):
    (tmp_path / "checkpoints").mkdir()
    for n in (1, 2, 5):
        (tmp_path / "checkpoints" / f"checkpoint_{n}").write_bytes(b"")  # only their presence is checked
    message = _refused(_config(begin=1, end=7), tmp_path, r"Checkpoint\(s\) 3-4, 6-7 of config.eval.begin_ckpt")
    assert "the highest there is checkpoint_5" in message
    assert not (tmp_path / "eval").exists()


def test_waiting_is_announced_not_refused(tmp_path, caplog):
    (tmp_path / "checkpoints").mkdir()
    with caplog.at_level(logging.INFO):
        eval_checks.check_checkpoints_present(str(tmp_path / "checkpoints"), 1, 3, wait_s=600)
    assert "Checkpoint(s) 1-3 are not in" in caplog.text and "waiting up to 600 s" in caplog.text


def _all_parts(config):
    config.eval.enable_loss = config.eval.enable_bpd = config.eval.enable_sampling = True
    return config


@pytest.mark.parametrize("field, value", [
    ("sampling.ode_rtol", 1e-3), ("sampling.ode_solver", "scipy"), ("eval.bpd_dataset", "train"),
    ("eval.batch_size", 32), ("eval.num_samples", 100), ("data.uniform_dequantization", True),
    ("sampling.predictor", "reverse_diffusion"), ("seed", 7), ("model.num_scales", 100),
    ("training.continuous", False), ("eval.inception_path", "/another/network"),
])
def test_resuming_with_other_result_settings_is_refused(tmp_path, no_work, monkeypatch, field, value):
    """An evaluation folder whose recorded settings differ: refused naming the field; the folder is left as it was."""
    monkeypatch.setattr(eval_job, "load_sample_metric_inputs", lambda config, extractor: {})  # no Inception here
    recorded = _all_parts(_config())
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    eval_records.save_settings(str(eval_dir), eval_records.result_settings(recorded, 1))
    eval_records.save_eval_meta(str(eval_dir), 0, eval_records.EvalMeta(ckpt_id=1, rng=[0, 42], bpd_rounds_done=3))
    before = _snapshot(eval_dir)
    changed = _all_parts(_config())
    changed.update_from_flattened_dict({field: value})
    message = _refused(changed, tmp_path, "holds results computed with other settings")
    assert f"{field}: " in message and "--eval_folder" in message
    assert _snapshot(eval_dir) == before


def test_bits_per_dim_under_another_trained_dequantizer_are_refused(tmp_path, no_work, monkeypatch):
    """eval.dequantizer: the dequantiser checkpoint is part of the settings; rounds computed under one are not
    continued under a retrained or replaced one (refused naming it, the folder unchanged); the same one passes."""
    from score_sde import dequantizer_train

    monkeypatch.setattr(eval_job, "load_sample_metric_inputs", lambda config, extractor: {})
    config = _all_parts(_config())
    config.eval.dequantizer = True
    deq_file = tmp_path / dequantizer_train.DEQ_FOLDER / "checkpoints" / "checkpoint_4"
    deq_file.parent.mkdir(parents=True)
    deq_file.write_bytes(b"first dequantiser")
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    recorded = {**eval_records.result_settings(config, 1),
                "dequantizer_checkpoint": dequantizer_train.checkpoint_identity(str(tmp_path))}
    eval_records.save_settings(str(eval_dir), recorded)
    before = _snapshot(eval_dir)
    # The same dequantiser: past the settings check, stopped by the missing score checkpoint instead.
    _refused(config, tmp_path, r"Checkpoint\(s\) 1 of config.eval.begin_ckpt")
    deq_file.write_bytes(b"retrained dequantiser")
    message = _refused(config, tmp_path, "holds results computed with other settings")
    assert "dequantizer_checkpoint: 'checkpoint_4 sha256:" in message
    assert _snapshot(eval_dir) == before


def test_free_fields_do_not_change_the_settings():
    """Which checkpoints, how long to wait, where the data are: the same results, so the same settings."""
    a, b = _all_parts(_config(begin=1, end=1)), _all_parts(_config(begin=2, end=9, wait_s=60))
    b.data.data_dir = "/elsewhere"
    b.model.ema_rate = 0.5
    settings_a, settings_b = eval_records.result_settings(a, 1), eval_records.result_settings(b, 1)
    assert eval_records.settings_differences(settings_a, settings_b) == []
    assert eval_records.settings_differences(eval_records.result_settings(a, 1),
                                             eval_records.result_settings(a, 2)) == ["devices: 1 -> 2"]


def test_a_part_switched_on_later_records_its_settings():
    """Bits/dim at rtol 1e-3, then the loss only (no conflict; both recorded), then bits/dim at 1e-5: refused."""
    bpd_only = _config()
    bpd_only.eval.enable_loss, bpd_only.eval.enable_bpd = False, True
    bpd_only.sampling.ode_rtol = 1e-3
    loss_only = _config()
    loss_only.eval.enable_loss, loss_only.eval.enable_bpd = True, False
    loss_only.sampling.ode_rtol = 1e-5
    first, second = eval_records.result_settings(bpd_only, 1), eval_records.result_settings(loss_only, 1)
    assert "training.continuous" not in first and "sampling.ode_rtol" not in second
    assert eval_records.settings_differences(first, second) == []
    recorded = eval_records.merged_settings(first, second)
    bpd_only.sampling.ode_rtol = 1e-5
    assert eval_records.settings_differences(recorded, eval_records.result_settings(bpd_only, 1)) == [
        "sampling.ode_rtol: 0.001 -> 1e-05"]


def test_same_settings_pass_on_to_the_checkpoint_check(tmp_path, no_work):
    config = _config()
    (tmp_path / "eval").mkdir()
    eval_records.save_settings(str(tmp_path / "eval"), eval_records.result_settings(config, 1))
    _refused(config, tmp_path, r"Checkpoint\(s\) 1 of")


# ---------------------------------------------------------------- wait_and_restore

TEMPLATE = {"w": np.zeros((3, 2), np.float32), "step": np.zeros((), np.int32)}


def _state(value: float) -> dict:
    return {"w": np.full((3, 2), value, np.float32), "step": np.asarray(7, np.int32)}


class FakeTime:
    """``time`` for score_sde.eval_checks with a virtual clock: ``sleep`` advances it and runs ``on_sleep``."""

    def __init__(self, on_sleep=None):
        self.now = 1000.0
        self.sleeps = []
        self.on_sleep = on_sleep

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep()


def test_restore_of_a_present_checkpoint_does_not_wait(tmp_path, monkeypatch):
    checkpoints.save_checkpoint(str(tmp_path), _state(1.5), step=2, keep=np.inf)
    fake = FakeTime()
    monkeypatch.setattr(eval_checks, "time", fake)
    restored = eval_checks.wait_and_restore(str(tmp_path), 2, TEMPLATE, wait_s=0)
    np.testing.assert_array_equal(restored["w"], _state(1.5)["w"])
    assert fake.sleeps == []


def test_missing_checkpoint_without_waiting_fails_at_once(tmp_path, monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(eval_checks, "time", fake)
    with pytest.raises(run_lib.EvaluationError, match=r"checkpoint_2 did not appear within "
                                                      r"config.eval.wait_for_checkpoints_s = 0 s"):
        eval_checks.wait_and_restore(str(tmp_path), 2, TEMPLATE, wait_s=0)
    assert fake.sleeps == []


def test_checkpoint_arriving_during_the_wait_is_restored(tmp_path, monkeypatch, caplog):
    fake = FakeTime(on_sleep=lambda: checkpoints.save_checkpoint(str(tmp_path), _state(2.5), step=3, keep=np.inf))
    monkeypatch.setattr(eval_checks, "time", fake)
    with caplog.at_level(logging.INFO):
        restored = eval_checks.wait_and_restore(str(tmp_path), 3, TEMPLATE, wait_s=600)
    np.testing.assert_array_equal(restored["w"], _state(2.5)["w"])
    assert fake.sleeps == [eval_checks.CHECKPOINT_POLL_S]
    assert f"Waiting up to 600 s for {tmp_path / 'checkpoint_3'}" in caplog.text


def test_wait_ends_with_an_error_at_the_timeout(tmp_path, monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(eval_checks, "time", fake)
    with pytest.raises(run_lib.EvaluationError, match="config.eval.wait_for_checkpoints_s = 150 s") as info:
        eval_checks.wait_and_restore(str(tmp_path), 4, TEMPLATE, wait_s=150)
    assert str(tmp_path / "checkpoint_4") in str(info.value)
    poll = eval_checks.CHECKPOINT_POLL_S
    assert fake.sleeps == [poll, poll, 150 - 2 * poll]  # never past the deadline


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped byte", "other model"])
def test_unreadable_checkpoint_fails_at_once_naming_the_file(tmp_path, monkeypatch, damage):
    path = pathlib.Path(checkpoints.save_checkpoint(str(tmp_path), _state(1.0), step=5, keep=np.inf))
    data = bytearray(path.read_bytes())
    if damage == "garbage":
        path.write_bytes(b"\x00\xffnot a checkpoint" * 10)
    elif damage == "truncated":
        path.write_bytes(data[:20])
    elif damage == "flipped byte":
        data[len(data) // 3] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        checkpoints.save_checkpoint(str(tmp_path), {"w": np.zeros((4, 4), np.float32), "step": np.int32(1)}, step=5)

    def no_retry(seconds):
        raise AssertionError(f"slept {seconds} s: a bad checkpoint must not be retried")

    monkeypatch.setattr(eval_checks.time, "sleep", no_retry)
    with pytest.raises(run_lib.EvaluationError, match=f"Cannot evaluate {path}") as info:
        eval_checks.wait_and_restore(str(tmp_path), 5, TEMPLATE, wait_s=600)
    assert "\n" not in str(info.value)
    if damage != "other model":
        assert isinstance(info.value.__cause__, checkpoints.CorruptCheckpointError)


# ---------------------------------------------------------------- wait_for_host_files (multi-host eval)

def test_host_files_arriving_during_the_wait_end_it(tmp_path, monkeypatch):
    target = tmp_path / "host_1_stats.npz"
    fake = FakeTime(on_sleep=lambda: target.write_bytes(b"x"))
    monkeypatch.setattr(eval_checks, "time", fake)
    eval_checks.wait_for_host_files([str(target)], "the statistics of host 1")
    assert fake.sleeps == [eval_checks.HOST_FILES_POLL_S]


def test_host_files_that_never_arrive_end_with_an_error_naming_them(tmp_path, monkeypatch):
    present, missing = tmp_path / "host_0.npz", tmp_path / "host_1.npz"
    present.write_bytes(b"x")
    fake = FakeTime()
    monkeypatch.setattr(eval_checks, "time", fake)
    monkeypatch.setattr(eval_checks, "HOST_FILES_TIMEOUT_S", 12.0)
    with pytest.raises(run_lib.EvaluationError, match="did that process die") as info:
        eval_checks.wait_for_host_files([str(present), str(missing)], "the statistics of host 1")
    assert str(missing) in str(info.value) and "1 file(s)" in str(info.value)
    assert sum(fake.sleeps) <= 12.0 + eval_checks.HOST_FILES_POLL_S
