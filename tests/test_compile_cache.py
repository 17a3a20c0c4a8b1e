"""The persistent compilation cache of the command-line jobs (score_sde/compile_cache.py, main.py --jax_cache_dir)."""
import os
import subprocess
import sys

import pytest

from score_sde import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_cache_env(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def test_default_folder_is_per_user_and_on(no_cache_env, tmp_path):
    assert compile_cache.resolve(None, multi_process_cpu=False)[0] == str(tmp_path / "xdg" / "score_sde" / "jax")


def test_multi_process_cpu_runs_start_without_a_cache_unless_told(no_cache_env, monkeypatch, tmp_path):
    assert compile_cache.resolve(None, multi_process_cpu=True)[0] is None
    assert compile_cache.resolve(str(tmp_path / "shared"), multi_process_cpu=True)[0] == str(tmp_path / "shared")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert compile_cache.resolve(None, multi_process_cpu=True)[0] == str(tmp_path / "env")


@pytest.mark.parametrize("value", ["none", "None", ""])
def test_the_flag_turns_it_off(no_cache_env, monkeypatch, tmp_path, value):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert compile_cache.resolve(value, multi_process_cpu=False)[0] is None


def test_the_flag_wins_over_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert compile_cache.resolve("~/x", multi_process_cpu=False)[0] == os.path.expanduser("~/x")


COMPILE_ONE = """
import sys, jax, jax.numpy as jnp
from score_sde import compile_cache
compile_cache.enable(None if sys.argv[1] == '-' else sys.argv[1])
jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + 1.5)(jnp.ones((3, 3))).block_until_ready()
"""


def test_enable_stores_compiled_programs_in_the_folder_and_none_stores_nothing(tmp_path):
    env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    folder = tmp_path / "cache"
    subprocess.run([sys.executable, "-c", COMPILE_ONE, str(folder)], cwd=ROOT, env=env, check=True, timeout=300)
    assert any(folder.iterdir()), "no compiled program was stored"
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    subprocess.run([sys.executable, "-c", COMPILE_ONE, "-"], cwd=ROOT, env=env, check=True, timeout=300)
    assert not (tmp_path / "xdg").exists()


def test_programs_that_compile_in_milliseconds_are_stored_too(tmp_path):
    # JAX's own threshold (1 s) would leave a job's small programs (keys, SDE tables) out of the cache.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(name, None)
    folder = tmp_path / "cache"
    subprocess.run([sys.executable, "-c", COMPILE_ONE, str(folder)], cwd=ROOT, env=env, check=True, timeout=300)
    assert [p.name for p in folder.iterdir() if p.name.startswith("jit_")], "the small program was not stored"


def test_main_names_an_unusable_cache_folder_in_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "main.py", "--config", "configs/vp/digits.py", "--mode", "train",
                           "--workdir", str(tmp_path / "w"), f"--jax_cache_dir={blocker}/cache"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot use {blocker}/cache:")
    assert "Traceback" not in proc.stderr and not (tmp_path / "w").exists()
