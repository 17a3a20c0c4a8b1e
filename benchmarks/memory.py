"""Memory of one training step, with and without ``config.model.remat`` (and in bfloat16), per device.

Two measures:

* ``--method residuals`` (default; tracing only, about a minute per model on a CPU): the bytes the
  forward pass saves for the backward pass (``saved_residuals`` of the training loss as a function of the
  parameters; the parameters themselves not counted), and the estimate
  ``peak ≈ 5·P + residuals``, ``P`` the parameter bytes: parameters, Adam's two moments and the EMA
  (the state, donated, so the new state reuses it) plus the gradients. It leaves out XLA's scratch and the
  transient buffers of the backward pass (with remat: one block's activations, recomputed at a time), and
  counts every saved array as a buffer where XLA fuses and recomputes elementwise chains: an estimate, not a
  bound (docs/performance.md compares it with XLA's figure).
* ``--method xla``: XLA's compiled memory analysis of the pmapped train step that ``run_lib.train`` runs
  (``score_sde.train_steps``; ``compiled.memory_analysis()``: ``peak = argument + output - alias + temp``, an
  aliased buffer counted once). Exact for the backend it compiles for, but compiling a full-size train step takes
  many minutes on a CPU (see docs/performance.md).

Each measure is taken at per-device batches 1 and 2; the largest batch that fits ``--budget-gib`` (80 by
default) is extrapolated linearly, ``peak(b) = fixed + b·per_image``.

    python benchmarks/memory.py [--configs vp/cifar10_ddpmpp_deep_continuous,...] [--method residuals|xla]
                                [--variants float32,remat,remat-bf16] [--batches 1,2]
                                [--budget-gib 80] [--out results.json]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = ("vp/cifar10_ddpmpp_deep_continuous", "ve/celebahq_256_ncsnpp_continuous",
                   "ve/ffhq_ncsnpp_continuous")
# (model.remat, model.dtype) per row, by the names --variants takes
VARIANTS = {"float32": (False, "float32"), "remat": (True, "float32"), "remat-bf16": (True, "bfloat16")}
GIB = 2.0 ** 30


def _nbytes(tree) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def residual_memory(config, batch_size: int) -> dict:
    """Bytes of the parameters and of the residuals the training loss saves for its gradient, at ``batch_size``."""
    import jax
    import jax.numpy as jnp
    from jax._src.ad_checkpoint import saved_residuals  # public only as print_saved_residuals

    import losses
    import sde_lib
    from models import utils as mutils

    model = mutils.create_model(config)
    params = jax.eval_shape(lambda: mutils.init_model(jax.random.PRNGKey(0), config)[2])
    sde, _ = sde_lib.get_sde(config)
    loss_fn = losses.get_sde_loss_fn(sde, model, train=True, reduce_mean=config.training.reduce_mean,
                                     continuous=config.training.continuous,
                                     likelihood_weighting=config.training.likelihood_weighting)
    batch = {"image": jnp.zeros(mutils.model_input_shape(config, batch_size))}
    residuals = saved_residuals(lambda p: loss_fn(jax.random.PRNGKey(0), p, {}, batch)[0], params)
    saved = [aval for aval, origin in residuals if "argument" not in origin]  # parameters: counted in the state
    result = {"batch": batch_size, "params": _nbytes(params), "residuals": _nbytes(saved)}
    result["peak"] = 5 * result["params"] + result["residuals"]
    return result


def xla_memory(config, batch_size: int) -> dict:
    """XLA's memory analysis (bytes) of ``config``'s pmapped train step at ``batch_size``, compiled, not run."""
    import jax
    import jax.numpy as jnp

    import losses
    import sde_lib
    from models import utils as mutils
    from score_sde import train_steps

    state = jax.eval_shape(lambda key: losses.init_train_state(key, config)[1], jax.random.PRNGKey(0))
    sde, _ = sde_lib.get_sde(config)
    p_train_step, _ = train_steps.make_train_and_eval_steps(config, sde, mutils.create_model(config))

    def per_device(x):  # one device: a leading device axis of 1
        return jax.ShapeDtypeStruct((1,) + tuple(x.shape), x.dtype)

    batch = {"image": jax.ShapeDtypeStruct((1, 1) + mutils.model_input_shape(config, batch_size), jnp.float32)}
    rng = jax.ShapeDtypeStruct((1, 2), jnp.uint32)
    stats = p_train_step.lower((rng, jax.tree_util.tree_map(per_device, state)), batch).compile().memory_analysis()
    result = {"batch": batch_size, "argument": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
              "alias": stats.alias_size_in_bytes, "temp": stats.temp_size_in_bytes}
    result["peak"] = result["argument"] + result["output"] - result["alias"] + result["temp"]
    return result


def measure(name: str, remat: bool, dtype: str, method: str, batches: tuple[int, ...] = (1, 2)) -> dict:
    """One table row: ``configs/<name>.py`` with ``model.remat`` / ``model.dtype`` at ``batches``."""
    config = importlib.import_module("configs." + name.replace("/", ".")).get_config()
    config.model.remat = remat
    config.model.dtype = dtype
    config.training.n_jitted_steps = 1
    t0 = time.perf_counter()
    fn = residual_memory if method == "residuals" else xla_memory
    rows = [fn(config, b) for b in batches]
    return {"config": name, "remat": remat, "dtype": dtype, "method": method, "rows": rows,
            "seconds": round(time.perf_counter() - t0, 1)}


def largest_batch(rows: list[dict], budget: float) -> tuple[int, float]:
    """``(batch, per_image)``: the largest batch under ``budget`` bytes on the line through batches 1 and 2."""
    per_image = rows[1]["peak"] - rows[0]["peak"]
    fixed = rows[0]["peak"] - per_image
    return int((budget - fixed) // per_image), per_image


def table(results: list[dict], budget_gib: float) -> str:
    """A markdown table of ``results`` (from :func:`measure`)."""
    lines = ["| config | remat | dtype | parameters (GiB) | peak b=1 (GiB) | peak b=2 (GiB) | per image (GiB) | "
             f"largest batch in {budget_gib:g} GiB (linear) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if len(r["rows"]) != 2:
            continue  # the line needs batches 1 and 2
        b1, b2 = r["rows"]
        batch, per_image = largest_batch(r["rows"], budget_gib * GIB)
        params = f"{b1['params'] / GIB:.3f}" if "params" in b1 else ""
        lines.append(f"| {r['config']} | {r['remat']} | {r['dtype']} | {params} | {b1['peak'] / GIB:.3f} | "
                     f"{b2['peak'] / GIB:.3f} | {per_image / GIB:.3f} | {batch} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated names under configs/")
    parser.add_argument("--method", choices=("residuals", "xla"), default="residuals")
    parser.add_argument("--budget-gib", type=float, default=80.0, help="device memory for the largest batch")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated rows per config, of {', '.join(VARIANTS)}")
    parser.add_argument("--batches", default="1,2",
                        help="per-device batches; the table's line needs exactly 1,2 (others: JSON only)")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    batches = tuple(int(b) for b in args.batches.split(","))
    sys.path.insert(0, ROOT)
    from benchmarks import common

    common.print_backend()
    print(f"train step memory per device ({args.method})", flush=True)
    results = []
    for name in args.configs.split(","):
        for variant in args.variants.split(","):
            remat, dtype = VARIANTS[variant]
            results.append(measure(name, remat, dtype, args.method, batches))
            print(json.dumps(results[-1]), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)
    print(table(results, args.budget_gib))


if __name__ == "__main__":
    main()
