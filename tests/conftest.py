"""Test-wide settings: CPU only, float32, the repository root importable."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Many tests (and the main.py / run_lib subprocesses they start, which inherit this environment)
# compile the same small train, eval and sampling programs; JAX's persistent compilation cache
# compiles each once per machine. Entries are keyed by the program's fingerprint, the jax
# version, the devices and the XLA flags, so a stale or foreign entry is never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "score_sde_tests_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pathlib  # noqa: E402

import pytest  # noqa: E402

# The project's XLA flags (score_sde/xla_defaults.py), set before any test starts JAX's backend.
import score_sde  # noqa: E402,F401

GOLDEN = pathlib.Path(__file__).parent / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    """Folder of the numbers produced by the original code (see tests/golden/README.md)."""
    return GOLDEN
