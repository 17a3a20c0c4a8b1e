"""The Flow++ dequantiser (models/flowpp) against score_flow's: parameter tree, initialisation and outputs.

Golden files (tests/golden/README.md): ``flowpp_small.npz`` holds score_flow's parameters of a small
dequantiser initialised on fixed data and its outputs; ``flowpp_shapes.json`` its parameter shapes at
the CIFAR-10 defaults too.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.flowpp import dequantizer as dq
from tests.helpers import assert_close_within_float32_rounding, flatten_tree, unflatten_tree

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(GOLDEN, "flowpp_shapes.json")) as f:
        meta = json.load(f)
    return meta, dict(np.load(os.path.join(GOLDEN, "flowpp_small.npz")))


@pytest.fixture(scope="module")
def small(golden):
    meta, arrays = golden
    model = dq.Dequantizer(**meta["small"])
    params = unflatten_tree({k[len("params/"):]: v for k, v in arrays.items() if k.startswith("params/")})
    return model, params, arrays


def test_cifar10_parameter_tree_matches_score_flow(golden):
    meta, _ = golden
    z = jnp.zeros((1, 32, 32, 3))
    shapes = jax.eval_shape(lambda: dq.Dequantizer().init({"params": jax.random.PRNGKey(0)}, z, z))["params"]
    assert {k: list(v.shape) for k, v in flatten_tree(shapes).items()} == meta["cifar10_param_shapes"]


def test_outputs_match_score_flow_with_its_parameters(small):
    model, params, g = small
    apply = jax.jit(model.apply)
    for suffix, variables in (("", {"params": params}),
                              ("_moved", jax.tree_util.tree_map(lambda p: p * 1.1 + 0.01, {"params": params}))):
        args = (jnp.asarray(g["eps"]), jnp.asarray(g["x"]))
        # -log q is a sum of ~10^3 terms of size ~1: its tolerance is relative to its scale.
        assert_close_within_float32_rounding(
            apply, variables, args, (g["u" + suffix], g["neg_logq" + suffix]),
            tolerances=((1e-4, 1e-5), (0.0, 1e-4 * np.abs(g["neg_logq" + suffix]).max())))


def test_data_dependent_init_matches_score_flow(small):
    model, params, g = small
    ours = dq.init_dequantizer(jax.random.PRNGKey(0), model, g["x"][None])
    expected = flatten_tree(params)
    got = flatten_tree(ours["params"])
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=2e-4, atol=2e-5, err_msg=key)
