"""Helpers shared by the tests: the SDEs they are run on and the golden comparison criterion."""
from __future__ import annotations

import numpy as np

import sde_lib


def make_sde(name: str, n: int = 1000) -> sde_lib.SDE:
    """The paper's CIFAR-10 SDE ``name`` (``'vpsde'``, ``'subvpsde'`` or ``'vesde'``) with ``n`` discretisation steps."""
    if name == "vpsde":
        return sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=n)
    if name == "subvpsde":
        return sde_lib.subVPSDE(beta_min=0.1, beta_max=20.0, N=n)
    if name == "vesde":
        return sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=n)
    raise ValueError(f"unknown SDE {name!r}; use one of {SDE_NAMES}")


SDE_NAMES = ("vpsde", "subvpsde", "vesde")


def assert_close_scaled(actual, expected, rtol: float = 1e-4) -> None:
    """|actual - expected| <= rtol·max|expected| everywhere (the golden README's criterion)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    scale = np.abs(expected).max()
    err = np.abs(actual - expected).max()
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol}·{scale:.3g}"


def flatten_tree(tree) -> dict:
    """``{'a/b/c': leaf}`` of a nested dict of arrays (a parameter tree), the keys of the golden files."""
    import jax

    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten_tree(flat: dict) -> dict:
    """Inverse of :func:`flatten_tree`, leaves as numpy arrays."""
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = np.asarray(value)
    return tree


def assert_close_within_float32_rounding(apply, variables, args, expected, tolerances, trials: int = 3) -> None:
    """Each output of ``apply(variables, *args)`` equals its ``expected`` up to its ``(rtol, atol)`` of
    ``tolerances`` plus twice what float32
    rounding alone moves it: the largest change seen when every parameter is multiplied by ``1 + 2^-23·N(0, 1)``
    (``trials`` draws, fixed seed).

    For ill-conditioned networks (the Flow++ dequantisers: one ulp of noise on the parameters moves their outputs
    by up to ~3e-3) a fixed tolerance only holds where the convolutions sum in the same order as the golden run's;
    XLA:CPU's own convolutions (score_sde/xla_defaults.py) sum differently. That floor is as large as what a 1%
    change of one weight does, so the strong check is the other one: under XLA's defaults (the flag not in
    ``$XLA_FLAGS``) no floor is added and the outputs must match the golden files to the plain tolerance; they do
    exactly (tests/test_xla_defaults.py runs the Flow++ tests that way).
    """
    import os

    import jax

    from score_sde import xla_defaults

    given = os.environ.get("XLA_FLAGS", "").split()
    if not all(f"{name}={value}" in given for name, value in xla_defaults.FLAGS.items()):
        trials = 0  # XLA's defaults: the golden run's summation order, so the outputs must match to the tolerance
    outputs = [np.asarray(o) for o in apply(variables, *args)]
    rng = np.random.default_rng(0)
    moved = [np.zeros_like(o) for o in outputs]
    for _ in range(trials):
        noisy = jax.tree_util.tree_map(
            lambda a: (np.asarray(a, np.float64) * (1 + 2.0 ** -23 * rng.standard_normal(np.shape(a)))).astype(
                np.float32), variables)
        for i, o in enumerate(apply(noisy, *args)):
            moved[i] = np.maximum(moved[i], np.abs(np.asarray(o) - outputs[i]).max())
    assert len(outputs) == len(expected) == len(tolerances)
    for out, exp, floor, (rtol, atol) in zip(outputs, expected, moved, tolerances):
        assert out.shape == np.shape(exp), f"shape {out.shape} != {np.shape(exp)}"
        np.testing.assert_allclose(out, exp, rtol=rtol, atol=atol + 2 * floor.max())
