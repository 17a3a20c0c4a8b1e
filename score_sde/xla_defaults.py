"""XLA settings this project changes from XLA's defaults, set through ``$XLA_FLAGS`` before JAX's backend starts.

One setting today, for XLA:CPU: ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``. By default
XLA:CPU (jax 0.10) hands every convolution on its own to a YNNPACK library fusion. On the score networks the
convolutions it generates itself are faster: the benchmark DDPM++'s forward pass 1.6-1.8x, its training step
1.5-1.8x, the small NCSN++ alike, and the first call of a program builds fewer YNNPACK runtimes (the digits
train step's: ~0.6 s instead of ~0.95; docs/performance.md, "XLA:CPU library fusions"). The golden-number tests
pass under it; the Flow++ dequantisers' outputs, ill-conditioned in float32, only within float32 rounding. Other backends do not read the flag.

XLA reads ``$XLA_FLAGS`` once, when the first computation starts its backend; later changes are ignored. So the
flags are added when ``score_sde`` is first imported, which ``main.py``, ``run_lib`` and the top-level modules
(``sampling``, ``likelihood``, ...) do before any computation. A process that ran a computation before importing
them keeps XLA's defaults.

The flags are only added under the jaxlib versions they were measured on (``VERIFIED_JAXLIB``): XLA aborts the
process on a flag it does not know, and experimental flags come and go between releases. Under any other jaxlib
(for example a newer one on a GPU machine) ``$XLA_FLAGS`` is left as it is.

To keep XLA's own choice, either set the flag yourself (a value you give is never changed), e.g.
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution``, or set
``SCORE_SDE_XLA_DEFAULTS=off``.
"""
from __future__ import annotations

import importlib.metadata
import os

# flag name -> the value this project uses when the user gave none.
FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"}
OPT_OUT_VARIABLE = "SCORE_SDE_XLA_DEFAULTS"
OPT_OUT_VALUES = ("off", "0", "false", "no")
# Version prefixes of jaxlib whose XLA knows FLAGS and was measured faster with them (docs/performance.md).
VERIFIED_JAXLIB = ("0.10.",)


def installed_jaxlib() -> str | None:
    """The installed jaxlib's version, read from its metadata (importing jaxlib is not needed), or None."""
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def with_defaults(xla_flags: str) -> str:
    """``xla_flags`` (a ``$XLA_FLAGS`` value) with each flag of ``FLAGS`` appended that it does not already set."""
    given = {token.split("=", 1)[0] for token in xla_flags.split()}
    added = [f"{name}={value}" for name, value in FLAGS.items() if name not in given]
    return " ".join([xla_flags.strip(), *added]).strip()


def apply(environ=os.environ, jaxlib_version: str | None = None) -> str:
    """Set ``environ["XLA_FLAGS"]`` to :func:`with_defaults` of its value.

    Nothing changes when ``SCORE_SDE_XLA_DEFAULTS=off`` or when ``jaxlib_version`` (default: the installed one)
    is not one of ``VERIFIED_JAXLIB``. Returns the value ``XLA_FLAGS`` has afterwards ('' when unset). Only takes
    effect if JAX's backend has not started yet in this process.
    """
    current = environ.get("XLA_FLAGS", "")
    if environ.get(OPT_OUT_VARIABLE, "").strip().lower() in OPT_OUT_VALUES:
        return current
    version = jaxlib_version if jaxlib_version is not None else installed_jaxlib()
    if version is None or not version.startswith(VERIFIED_JAXLIB):
        return current
    environ["XLA_FLAGS"] = with_defaults(current)
    return environ["XLA_FLAGS"]
