"""What the benchmark scripts share: the benchmark configs, the backend line every script prints, the JSON results.

Configs (``--config`` of ``train_step.py``, ``sampling.py``, ``likelihood.py``):

* ``benchmark`` — the benchmark DDPM++ of ``docs/performance.md`` (anchors):
  ``configs/vp/cifar10_ddpmpp_continuous.py`` with ``nf=32, ch_mult=(1, 2, 2), num_res_blocks=2,
  attn_resolutions=(16,)`` (1,754,147 parameters);
* ``tiny`` — the same family at a smoke-test size (8×8 images, ``nf=8``, one resolution): exercises every code path
  in seconds on a CPU, times nothing worth reading;
* any config under ``configs/`` by name, unchanged, e.g. ``vp/cifar10_ddpmpp_continuous`` (the full DDPM++, 61,804,419
  parameters), or a path to a config file.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os

# The project's XLA settings (score_sde/xla_defaults.py) go into $XLA_FLAGS on this import: it must come before
# print_backend() starts JAX's backend, which is the first thing a benchmark script does with JAX.
import score_sde  # noqa: E402,F401

BENCHMARK_DDPMPP_PARAMS = 1_754_147
# The base of both sizes: configs/vp/cifar10_ddpmpp_continuous.py (here and in the PyTorch port alike).
BASE_CONFIG = "vp/cifar10_ddpmpp_continuous"
# Fields changed from the base config, per size. Tiny: 8×8 images, one resolution of one residual block (the fewest
# layers, hence the shortest compilation); the middle block's attention is DDPM++'s own, always there.
SIZES = {
    "benchmark": {"model.nf": 32, "model.ch_mult": (1, 2, 2), "model.num_res_blocks": 2,
                  "model.attn_resolutions": (16,)},
    "tiny": {"data.image_size": 8, "model.nf": 8, "model.ch_mult": (1,), "model.num_res_blocks": 1,
             "model.attn_resolutions": ()},
}


def resize(config, size: str):
    """``config`` with the fields of ``SIZES[size]`` set (a config of this repository or of the PyTorch port)."""
    for path, value in SIZES[size].items():
        group, field = path.split(".")
        setattr(getattr(config, group), field, value)
    return config


def shrink(config):
    """The benchmark size: ``nf=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,)``."""
    return resize(config, "benchmark")


def benchmark_config():
    """``configs/vp/cifar10_ddpmpp_continuous.py`` shrunk to the benchmark DDPM++ (1,754,147 parameters)."""
    return load_config("benchmark")


def load_config(name: str):
    """The config ``--config name`` names: ``benchmark``, ``tiny``, ``<family>/<config>`` under configs/, or a path.

    Configs are imported from the ``configs`` package first on ``sys.path`` (the PyTorch port's own, in
    ``pytorch_port.py``).
    """
    if name in SIZES:
        return resize(load_config(BASE_CONFIG), name)
    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"--config {name}: no such config file.")
        spec = importlib.util.spec_from_file_location("benchmark_config_file", name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()
    try:
        module = importlib.import_module("configs." + name.replace("/", "."))
    except ModuleNotFoundError as err:
        raise ValueError(f"--config {name}: not 'benchmark', 'tiny', a config under configs/ (e.g. "
                         f"vp/cifar10_ddpmpp_continuous) or a .py file ({err}).") from err
    return module.get_config()


def add_arguments(parser, batch: int = 8) -> None:
    """The options shared by the timing scripts: ``--config``, ``--batch``, ``--out``."""
    parser.add_argument("--config", default="benchmark",
                        help="benchmark (default), tiny, a config under configs/ such as vp/cifar10_ddpmpp_continuous "
                             "(full size), or a config file")
    parser.add_argument("--batch", type=int, default=batch, help=f"global batch size (default {batch})")
    parser.add_argument("--out", help="also write the settings, the backend and every figure as JSON to this file")


def backend_info() -> dict:
    """The default JAX backend: platform, device kind, device counts, jax version."""
    import jax

    devices = jax.devices()
    return {"platform": jax.default_backend(), "device_kind": devices[0].device_kind, "device_count": len(devices),
            "local_device_count": jax.local_device_count(), "jax": jax.__version__}


def print_backend() -> dict:
    """Print the default backend as the first line of a benchmark's output (``backend platform=... ``); return it."""
    info = backend_info()
    print(f"backend platform={info['platform']} device_kind={info['device_kind']!r} "
          f"devices={info['device_count']} local_devices={info['local_device_count']} jax={info['jax']}", flush=True)
    return info


def write_json(path: str | None, script: str, backend: dict, settings: dict, results: dict) -> None:
    """Write ``{script, backend, settings, results}`` to ``path`` (nothing when ``path`` is None)."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"script": script, "backend": backend, "settings": settings, "results": results}, f, indent=1)


def init_params(config):
    """``(model, params)``: ``config``'s network with the weights the timings use (PRNGKey(1) for the parameters,
    PRNGKey(2) for dropout, as the original code was timed), initialised as one compiled program."""
    import jax
    import jax.numpy as jnp

    from models import utils as mutils

    model = mutils.create_model(config)
    x = jnp.zeros(mutils.model_input_shape(config, 1))
    init = jax.jit(lambda x, t: model.init({"params": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)}, x, t,
                                           train=False)["params"])
    return model, init(x, jnp.zeros((1,)))
