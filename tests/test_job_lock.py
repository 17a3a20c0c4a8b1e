"""score_sde.job_lock: a second training or evaluation job on a folder in use is refused before it writes or compiles
anything, the refusal names the holder, and the lock goes with the holding process however it ends."""
from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys

import pytest

import run_lib
from score_sde import checkpoints, eval_job, job_lock, train_programs
from tests.test_compile_count import counting_compiles
from tests.test_eval_checks import _config as eval_config
from tests.test_train import _env, tiny_config, tiny_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
_HOLD = ("import sys, time\nfrom score_sde import job_lock\njob_lock.acquire(sys.argv[1], sys.argv[2])\n"
         "print('held', flush=True)\ntime.sleep(600)")
_PROBE = ("import sys\nfrom score_sde import job_lock\ntry:\n    job_lock.ensure_free(sys.argv[1])\n"
          "except job_lock.FolderInUseError as err:\n    sys.exit(str(err))")


@contextlib.contextmanager
def held_elsewhere(folder: pathlib.Path, name: str = job_lock.TRAIN_LOCK):
    """Another process holding the lock ``name`` of ``folder`` until the block ends (then killed)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder), name], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _free_for_another_process(folder: pathlib.Path) -> tuple[bool, str]:
    probe = subprocess.run([sys.executable, "-c", _PROBE, str(folder)], cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=60)
    return probe.returncode == 0, probe.stderr


def test_a_held_folder_is_refused_naming_its_holder_until_the_holder_is_killed(tmp_path):
    with held_elsewhere(tmp_path) as holder:
        with pytest.raises(job_lock.FolderInUseError) as info:
            job_lock.acquire(str(tmp_path))
        assert f"{tmp_path} is in use by process {holder.pid} on " in str(info.value)
        assert "the lock goes with its process" in str(info.value)
        holder.kill()  # as kill -9: no clean-up runs
        holder.wait()
    job_lock.acquire(str(tmp_path))
    try:
        assert (tmp_path / job_lock.TRAIN_LOCK).read_text().startswith(f"process {os.getpid()} on ")
    finally:
        job_lock.release(str(tmp_path))
    assert _free_for_another_process(tmp_path)[0]


def test_holding_is_reentrant_within_a_process(tmp_path):
    with job_lock.hold(str(tmp_path)):
        with job_lock.hold(str(tmp_path)):
            pass
        free, message = _free_for_another_process(tmp_path)
        assert not free and "is in use by process" in message  # still held by the outer block
    assert _free_for_another_process(tmp_path)[0]
    with job_lock.hold(str(tmp_path), enabled=False):
        assert _free_for_another_process(tmp_path)[0]


def test_training_on_a_held_workdir_stops_before_writing_or_compiling(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with held_elsewhere(workdir) as holder:
        assert train_programs.start_before_data(tiny_config(), str(workdir)) is None
        with counting_compiles() as compiles, pytest.raises(job_lock.FolderInUseError,
                                                            match=f"in use by process {holder.pid}"):
            run_lib.train(tiny_config(), str(workdir))
    assert compiles == []
    assert not (workdir / "stdout.txt").exists() and not (workdir / "config.json").exists()
    assert [p for p in workdir.rglob("*") if p.is_file()] == [workdir / job_lock.TRAIN_LOCK]


def test_main_refuses_a_second_training_job_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with held_elsewhere(workdir) as holder:
        out = subprocess.run([sys.executable, "main.py", "--config", "configs/vp/digits.py", "--workdir", str(workdir),
                              "--mode", "train", *tiny_flags()], cwd=ROOT, env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {workdir} is in use by process {holder.pid} on ")
    assert "Traceback" not in out.stderr


def test_a_second_evaluation_of_one_folder_is_refused_before_it_writes(tmp_path, monkeypatch):
    config = eval_config()
    config.eval.enable_sampling = False
    checkpoints.save_checkpoint(str(tmp_path / "checkpoints"), {"step": 1}, step=1)
    monkeypatch.setattr(eval_job, "build_job", lambda *args, **kwargs: None)  # no model, no data
    (tmp_path / "eval").mkdir()
    with held_elsewhere(tmp_path / "eval", job_lock.eval_lock(0)) as holder:
        with pytest.raises(job_lock.FolderInUseError, match=f"in use by process {holder.pid}"):
            run_lib.evaluate(config, str(tmp_path))
    assert [p.name for p in (tmp_path / "eval").iterdir()] == [job_lock.eval_lock(0)]


def test_a_second_dequantiser_training_is_refused_before_it_writes(tmp_path, monkeypatch):
    from score_sde import dequantizer_train  # noqa: PLC0415 (Flow++ code, only this test needs it)
    from tests.test_train_deq import deq_config  # noqa: PLC0415

    monkeypatch.setattr(dequantizer_train, "_load_score_model", lambda *args: (None, None, None, "stand-in"))
    deq_dir = tmp_path / dequantizer_train.DEQ_FOLDER
    with held_elsewhere(deq_dir) as holder:
        with pytest.raises(job_lock.FolderInUseError, match=f"in use by process {holder.pid}"):
            run_lib.train_deq(deq_config(), str(tmp_path))
    assert [p.name for p in deq_dir.rglob("*") if p.is_file()] == [job_lock.TRAIN_LOCK]
