"""score_flow's ImageNet 32×32 Flow++ dequantiser (models/flowpp/dequantizer_imagenet32) against score_flow's, and
its choice by ``config.deq.arch``.

Golden files (tests/golden/README.md): ``flowpp_imagenet32_shapes.json`` holds score_flow's parameter shapes at
its ImageNet 32×32 defaults and of a small dequantiser, ``flowpp_imagenet32_small.npz`` that small one's
parameters from its data-dependent initialisation on fixed data, and its outputs.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.score_flow import default_cifar10_configs, default_imagenet32_configs
from configs.score_flow.vp import imagenet32_ddpmpp_continuous
from models.flowpp import dequantizer as dq
from models.flowpp import dequantizer_imagenet32 as dq32
from score_sde import dequantizer_train
from score_sde.config_checks import validate_config
from tests.helpers import assert_close_within_float32_rounding, flatten_tree, unflatten_tree


@pytest.fixture(scope="module")
def golden(golden_dir):
    with open(golden_dir / "flowpp_imagenet32_shapes.json") as f:
        meta = json.load(f)
    arrays = dict(np.load(golden_dir / "flowpp_imagenet32_small.npz"))
    params = unflatten_tree({k[len("params/"):]: v for k, v in arrays.items() if k.startswith("params/")})
    return meta, arrays, params


def _shapes(tree) -> dict:
    return {k: list(v.shape) for k, v in flatten_tree(tree).items()}


def test_imagenet32_parameter_tree_matches_score_flow(golden):
    meta, _, _ = golden
    config = default_imagenet32_configs.get_default_configs()
    model = dq.create_dequantizer(config)
    assert isinstance(model, dq32.Dequantizer)
    # The state that --mode train_deq / eval.dequantizer restore into, score_flow's checkpoints included.
    template = dequantizer_train.state_template(config)
    shapes = _shapes(template.params)
    assert shapes == meta["imagenet32_param_shapes"]
    assert sum(int(np.prod(s)) for s in shapes.values()) == meta["imagenet32_param_count"]
    assert _shapes(template.params_ema) == shapes


def test_outputs_match_score_flow_with_its_parameters(golden):
    meta, g, params = golden
    model = dq32.Dequantizer(**meta["small"])
    assert _shapes(params) == meta["small_param_shapes"]
    apply = jax.jit(model.apply)
    for suffix, variables in (("", {"params": params}),
                              ("_moved", jax.tree_util.tree_map(lambda p: p * 1.1 + 0.01, {"params": params}))):
        args = (jnp.asarray(g["eps"]), jnp.asarray(g["x"]))
        # -log q is a sum of ~10^3 terms of size ~1: its tolerance is relative to its scale.
        assert_close_within_float32_rounding(
            apply, variables, args, (g["u" + suffix], g["neg_logq" + suffix]),
            tolerances=((1e-4, 1e-5), (0.0, 1e-4 * np.abs(g["neg_logq" + suffix]).max())))


def test_data_dependent_init_matches_score_flow(golden):
    """Same keys and data as score_flow's ``data_dependent_init_of_dequantizer``: the same parameters, which also
    makes the initialisation deterministic."""
    meta, g, params = golden
    ours = flatten_tree(dq.init_dequantizer(jax.random.PRNGKey(0), dq32.Dequantizer(**meta["small"]),
                                            g["x"][None])["params"])
    expected = flatten_tree(params)
    assert ours.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(ours[key], expected[key], rtol=2e-4, atol=2e-5, err_msg=key)


def test_config_selects_the_architecture():
    cifar10 = default_cifar10_configs.get_default_configs()
    assert type(dq.create_dequantizer(cifar10)) is dq.Dequantizer
    del cifar10.deq["arch"]  # configs written before the field: CIFAR-10's, as before
    assert type(dq.create_dequantizer(cifar10)) is dq.Dequantizer
    imagenet32 = dq.create_dequantizer(default_imagenet32_configs.get_default_configs())
    assert (type(imagenet32), imagenet32.filters, imagenet32.blocks) == (dq32.Dequantizer, 128, 8)


def test_unknown_architecture_is_refused_naming_the_field():
    config = imagenet32_ddpmpp_continuous.get_config()
    validate_config(config, "train")
    config.deq.arch = "imagenet64"
    with pytest.raises(ValueError, match=r"<value>\):\n  config\.deq\.arch='imagenet64' is not allowed; allowed "
                                         r"values: 'cifar10', 'imagenet32'$"):
        validate_config(config, "train")
    with pytest.raises(ValueError, match=r"config\.deq\.arch = 'imagenet64' is not a dequantiser architecture"):
        dq.create_dequantizer(config)
