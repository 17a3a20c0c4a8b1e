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
