"""score_sde/program_cache.py: compiled training programs stored by what they are traced from, loaded untraced.

A second run of the same config loads its init and train step and compiles neither, and the loaded programs
compute exactly what the compiled ones do; anything the trace depends on changes the key; a damaged entry is
deleted and the program compiled instead; the folder stays within its size.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import pathlib
import pickle
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import utils as mutils
from score_sde import compile_cache, program_cache, train_programs
from tests.test_compile_count import counting_compiles
from tests.test_train import ROOT, tiny_config

WORKER_SITES = ("score_sde/train_programs.py:_compile_init", "score_sde/train_programs.py:_compile_train_step")


@pytest.fixture
def cache_folder(tmp_path):
    """The program cache on in ``tmp_path/programs`` for the test, off again afterwards."""
    program_cache.configure(str(tmp_path))
    yield tmp_path / program_cache.FOLDER_NAME
    program_cache.configure(None)


def _assert_trees_equal(a, b):
    leaves, tree = jax.tree_util.tree_flatten(a)
    other_leaves, other_tree = jax.tree_util.tree_flatten(b)
    assert tree == other_tree
    for leaf, other in zip(leaves, other_leaves):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(other))


# One run's programs up to its first train step, in a process of its own with the program cache (and JAX's) in
# the folder argv[1]: what it compiled (in the worker threads), a digest of the fresh State and of the State and
# losses after one step on a fixed batch, the State's shapes.
RUN_SCRIPT = """
import hashlib, json, logging, sys
import jax, numpy as np
from score_sde import compile_cache, parallel, train_programs
from tests.test_compile_count import counting_compiles
from tests.test_train import tiny_config

def digest(tree):
    return hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree))).hexdigest()

logging.basicConfig(level=logging.INFO)
compile_cache.enable(sys.argv[1])
config, rng = tiny_config(), jax.random.PRNGKey(5)
with counting_compiles() as compiles:
    programs = train_programs.TrainPrograms(config)
    state = programs.initial_state(rng)
    programs.start_train_step()
    step = programs.train_step()
    batch = {"image": np.random.default_rng(0).uniform(size=train_programs.batch_shape(config)).astype(np.float32)}
    (_, new_state), losses = step((parallel.split_per_device(rng)[1], parallel.replicate(state)), batch)
    losses = np.asarray(losses)
programs.wait_for_cache_writes()
print(json.dumps({"compiled": [c.site for c in compiles if c.site.startswith("score_sde/train_programs.py")],
                  "compiled_type": type(step).__name__, "state": digest(state), "stepped": digest((new_state, losses)),
                  "step": int(np.asarray(new_state.step)[0]), "losses": losses.tolist(),
                  "shapes": [[list(x.shape), str(x.dtype)] for x in jax.tree_util.tree_leaves(programs.state_shapes())],
                  "tree": str(jax.tree_util.tree_structure(programs.state_shapes()))}))
"""


def _run(folder: pathlib.Path) -> tuple[dict, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", RUN_SCRIPT, str(folder)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_a_second_run_loads_its_programs_compiles_neither_and_they_compute_the_same(tmp_path):
    """The first run (empty caches) compiles the init and train step and stores them; the second loads them,
    traces and compiles neither (the State's shapes come from the entry), and computes the same bits."""
    first, _ = _run(tmp_path)
    assert first["compiled"] == list(WORKER_SITES), first["compiled"]
    entries = sorted(p.name for p in (tmp_path / program_cache.FOLDER_NAME).iterdir())
    assert [name.split("-", 1)[1] for name in entries] == ["init.pkl", "train_step.pkl"], entries

    second, log = _run(tmp_path)
    assert second["compiled"] == [], second["compiled"]
    assert "Loading the init from the program cache" in log and "Loading the train step from the program cache" in log
    assert first["compiled_type"] == second["compiled_type"] == "Compiled"
    assert first["step"] == second["step"] == 1 and np.all(np.isfinite(first["losses"]))
    for field in ("state", "stepped", "losses", "shapes", "tree"):
        assert second[field] == first[field], field

    # Without the entries but with JAX's cache: the programs come from JAX's cache, which cannot be stored again.
    for entry in (tmp_path / program_cache.FOLDER_NAME).iterdir():
        entry.unlink()
    third, log = _run(tmp_path)
    assert third["compiled"] == list(WORKER_SITES)  # (JAX's compile event fires on its cache hits too)
    assert "came from JAX's compilation cache and cannot be stored" in log
    assert list((tmp_path / program_cache.FOLDER_NAME).iterdir()) == []
    assert third["stepped"] == first["stepped"]


def test_the_key_changes_with_everything_the_programs_are_made_from(cache_folder, monkeypatch):
    config = tiny_config()
    key = program_cache.ProgramCache(str(cache_folder)).key(config)
    assert program_cache.ProgramCache(str(cache_folder)).key(tiny_config()) == key  # stable
    assert program_cache.ProgramCache(str(cache_folder)).key(tiny_config(model__nf=16)) != key
    assert program_cache.ProgramCache(str(cache_folder)).key(tiny_config(optim__grad_clip=2.0)) != key
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1" if name == "jaxlib" else real_version(name))
    assert program_cache.ProgramCache(str(cache_folder)).key(config) != key
    monkeypatch.undo()
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=false")
    assert program_cache.ProgramCache(str(cache_folder)).key(config) != key
    monkeypatch.undo()
    precision = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest" if precision != "highest" else "default")
    try:
        assert program_cache.ProgramCache(str(cache_folder)).key(config) != key
    finally:
        jax.config.update("jax_default_matmul_precision", precision)
    assert program_cache.ProgramCache(str(cache_folder)).key(config) == key


def test_the_source_digest_covers_the_project_modules_only(tmp_path):
    for name in ("losses.py", "models/ncsnpp.py", "score_sde/sub/deep.py", "tests/test_x.py", "benchmarks/b.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"# {name}\n")
    digest = program_cache.source_digest(tmp_path)
    for name in ("tests/test_x.py", "benchmarks/b.py"):
        (tmp_path / name).write_text("changed\n")
    assert program_cache.source_digest(tmp_path) == digest
    for name in ("losses.py", "models/ncsnpp.py", "score_sde/sub/deep.py"):
        (tmp_path / name).write_text((tmp_path / name).read_text() + "x = 1\n")
        changed = program_cache.source_digest(tmp_path)
        assert changed != digest, name
        digest = changed
    (tmp_path / "models" / "new.py").write_text("")
    assert program_cache.source_digest(tmp_path) != digest


def test_a_damaged_entry_is_deleted_and_the_program_compiled_instead(cache_folder, caplog):
    config = tiny_config()
    rng = jax.random.PRNGKey(1)
    expected = train_programs.TrainPrograms(config).initial_state(rng)
    cache = program_cache.active()
    init_entry = cache_folder / f"{cache.key(config)}-init.pkl"
    lowered = mutils.jitted_init(mutils.create_model(config)).lower(*mutils.init_inputs(rng, config))
    assert cache.store(cache.key(config), "init", lowered.compile())
    good = init_entry.read_bytes()

    # A file cut short: unreadable, so deleted at once, and the init compiled as without a cache.
    init_entry.write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING), counting_compiles() as compiles:
        programs = train_programs.TrainPrograms(config)
        assert not init_entry.exists()
        _assert_trees_equal(programs.initial_state(rng), expected)
    assert "ignoring and deleting" in caplog.text
    assert [c.site for c in compiles if c.site in WORKER_SITES] == [WORKER_SITES[0]]

    # A readable file whose executable does not load: deleted, and the init compiled in the worker instead.
    stored = pickle.loads(good)
    stored["executable"] = b"not an executable"
    init_entry.write_bytes(pickle.dumps(stored))
    caplog.clear()
    with caplog.at_level(logging.WARNING), counting_compiles() as compiles:
        _assert_trees_equal(train_programs.TrainPrograms(config).initial_state(rng), expected)
    assert "cannot load" in caplog.text
    assert [c.site for c in compiles if c.site in WORKER_SITES] == [WORKER_SITES[0]]
    assert not init_entry.exists() or pickle.loads(init_entry.read_bytes())["executable"] != b"not an executable"


def test_an_executable_jax_already_held_is_not_stored():
    """XLA:CPU serializes an executable it loaded (from JAX's persistent cache) again without part of its code, and
    the copy fails when run; one JAX already holds in memory may be such a one. (The persistent cache's case:
    the third run of test_a_second_run_loads_its_programs_compiles_neither_and_they_compute_the_same.)"""
    lowered = jax.jit(lambda x: jnp.sin(x[1:] + x[:-1]).sum()).lower(jnp.arange(7.0))
    lowered.compile()
    held, storable = program_cache.compile_storable(lambda low: low.compile(), lowered)
    assert storable is False
    assert float(held(jnp.arange(7.0))) == pytest.approx(float(np.sin(np.arange(6) * 2 + 1).sum()), rel=1e-6)


def test_an_entry_that_cannot_be_written_is_logged_and_the_job_goes_on(tmp_path, caplog):
    (tmp_path / "file").write_text("")
    cache = program_cache.ProgramCache(str(tmp_path / "file" / "programs"))
    compiled = jax.jit(lambda x: x + 1).lower(np.float32(1)).compile()
    with caplog.at_level(logging.WARNING):
        assert cache.store("k", "init", compiled) is False
    assert "cannot store" in caplog.text
    assert cache.read("k", "init") is None


def test_the_least_recently_used_entries_and_stale_partial_writes_go(tmp_path):
    cache = program_cache.ProgramCache(str(tmp_path), max_bytes=250)
    for age, name in enumerate(["new", "recent", "old", "oldest"]):
        path = tmp_path / f"{name}-init.pkl"
        path.write_bytes(b"x" * 100)
        os.utime(path, (1e9 - age * 100, 1e9 - age * 100))
    (tmp_path / "unrelated.txt").write_bytes(b"y" * 1000)
    for name, age in (("tmpold.tmp", program_cache.STALE_WRITE_SECONDS + 60), ("tmpnew.tmp", 10)):
        (tmp_path / name).write_bytes(b"z" * 1000)  # writes under way or killed; not counted in the size
        os.utime(tmp_path / name, (time.time() - age, time.time() - age))
    cache.prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new-init.pkl", "recent-init.pkl", "tmpnew.tmp",
                                                          "unrelated.txt"]


def test_the_cache_follows_the_jax_cache_switch_and_is_off_for_several_processes(tmp_path, monkeypatch):
    try:
        compile_cache.enable(str(tmp_path / "jax"))
        assert program_cache.active().folder == str(tmp_path / "jax" / "programs")
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        assert program_cache.active() is None
        monkeypatch.undo()
        compile_cache.enable(None)
        assert program_cache.active() is None
    finally:
        program_cache.configure(None)
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
