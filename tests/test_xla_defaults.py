"""The project's XLA settings (score_sde/xla_defaults.py): added to $XLA_FLAGS on import, never over the user's."""
import os
import subprocess
import sys

import pytest

from score_sde import xla_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_the_flag_is_added_after_the_users_other_flags():
    assert xla_defaults.with_defaults("") == f"{FLAG}=-individual_convolution"
    assert xla_defaults.with_defaults(" --xla_force_host_platform_device_count=2 ") == (
        f"--xla_force_host_platform_device_count=2 {FLAG}=-individual_convolution")


@pytest.mark.parametrize("given", [f"{FLAG}=+individual_convolution", f"{FLAG}=", f"--xla_dump_to=/tmp/d {FLAG}=dot"])
def test_a_value_the_user_gave_is_kept(given):
    assert xla_defaults.with_defaults(given) == given


def test_opting_out_leaves_xla_flags_alone():
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/d", "SCORE_SDE_XLA_DEFAULTS": "off"}
    assert xla_defaults.apply(environ) == "--xla_dump_to=/tmp/d"
    assert environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/d"
    environ = {}
    assert xla_defaults.apply(environ, "0.10.2") == f"{FLAG}=-individual_convolution" == environ["XLA_FLAGS"]


@pytest.mark.parametrize("version", ["0.11.2", "0.9.2", "1.0.10"])
def test_jaxlib_versions_not_measured_keep_xlas_defaults(version):
    # XLA aborts on a flag it does not know; a release without this one must still start.
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/d"}
    assert xla_defaults.apply(environ, version) == "--xla_dump_to=/tmp/d" == environ["XLA_FLAGS"]
    assert xla_defaults.apply({}, version) == ""


def test_the_installed_jaxlib_is_one_the_flags_were_measured_on():
    # requirements.txt pins jaxlib; moving the pin means measuring again (docs/performance.md) and updating
    # VERIFIED_JAXLIB, or the project silently loses the setting.
    assert xla_defaults.installed_jaxlib().startswith(xla_defaults.VERIFIED_JAXLIB)


# Compiles a convolution after importing a top-level module, as a user's script would; prints whether XLA:CPU
# handed it to a YNNPACK library fusion (the backend config XLA writes on such a fusion).
_COMPILE_A_CONVOLUTION = r"""
import sampling  # imports score_sde, which sets the flags before the backend starts
import jax, jax.numpy as jnp
def layer(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y) + 1.0
text = jax.jit(layer).lower(jnp.ones((8, 32, 32, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()
print("ynn_fusion" if "__ynn_fusion" in text else "xla_convolution")
"""


def _compiled_with(**env_changes) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SCORE_SDE_XLA_DEFAULTS")}
    env.update(env_changes, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _COMPILE_A_CONVOLUTION], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()[-1]


def test_importing_the_project_changes_how_xla_cpu_compiles_a_convolution():
    assert _compiled_with() == "xla_convolution"
    # XLA's own default (jax 0.10.2), reached by either way of opting out.
    assert _compiled_with(SCORE_SDE_XLA_DEFAULTS="off") == "ynn_fusion"
    assert _compiled_with(XLA_FLAGS=f"{FLAG}=+individual_convolution") == "ynn_fusion"


def test_a_benchmark_script_starts_its_backend_with_the_flags():
    # train_step.py starts the backend through benchmarks.common.print_backend before importing the model code.
    script = "from benchmarks import common; import os, jax; common.backend_info(); print(os.environ['XLA_FLAGS'])"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SCORE_SDE_XLA_DEFAULTS")}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(env, JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == f"{FLAG}=-individual_convolution"


def test_flowpp_outputs_match_score_flow_exactly_under_xlas_defaults():
    # The Flow++ golden tests allow for float32 rounding under the project's flag (tests/helpers.py); under
    # XLA's defaults, where the convolutions sum as in the golden run, they must pass with no allowance.
    tests = ["tests/test_flowpp.py::test_outputs_match_score_flow_with_its_parameters",
             "tests/test_flowpp_imagenet.py::test_outputs_match_score_flow_with_its_parameters"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                         env=dict(env, SCORE_SDE_XLA_DEFAULTS="off", JAX_PLATFORMS="cpu"), capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0 and "2 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
