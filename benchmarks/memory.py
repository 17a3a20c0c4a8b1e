"""Memory of one training step, with and without ``config.model.remat``, from XLA's compiled memory analysis.

For each config the train step that ``run_lib.train`` runs (``run_lib.make_train_and_eval_steps``: forward,
backward, Adam, EMA; one step per call, one device) is lowered and compiled for per-device batches 1 and 2,
never run: parameters and optimizer state are only traced (``jax.eval_shape``). From
``compiled.memory_analysis()`` it reports, in bytes:

* ``argument``: the step's inputs (state: params, Adam moments, EMA; the batch; the rng);
* ``output``: its outputs (the new state, the loss);
* ``alias``: outputs written into donated inputs (the state is donated, so the new state reuses it);
* ``temp``: XLA's scratch buffers (activations kept for the backward pass, gradients, ...);
* ``peak = argument + output - alias + temp``: everything live at once, counting an aliased buffer once.

The largest batch per device that fits a budget (default 80 GiB) is extrapolated linearly from batches 1
and 2: ``peak(b) = fixed + b * per_image``. The figures are XLA:CPU's buffer assignment for the
default backend; another backend's compiler fuses and schedules differently, so treat them as estimates.

    python benchmarks/memory.py [--configs vp/cifar10_ddpmpp_deep_continuous,...] [--timeout 1200]
                                [--budget-gib 80] [--out results.json]

Each (config, remat) pair compiles in its own process; one that exceeds ``--timeout`` seconds is reported
as such.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = ("vp/cifar10_ddpmpp_deep_continuous", "ve/celebahq_256_ncsnpp_continuous",
                   "ve/ffhq_ncsnpp_continuous")
FIELDS = ("argument", "output", "alias", "temp")


def step_memory(config, batch_size: int) -> dict:
    """XLA's memory analysis (bytes, see the module docstring) of ``config``'s train step at ``batch_size``."""
    import jax
    import jax.numpy as jnp

    import losses
    import run_lib
    import sde_lib
    from models import utils as mutils

    model = mutils.create_model(config)
    state = jax.eval_shape(lambda key: losses.init_train_state(key, config)[1], jax.random.PRNGKey(0))
    sde, _ = sde_lib.get_sde(config)
    p_train_step, _ = run_lib.make_train_and_eval_steps(config, sde, model)

    def per_device(x):  # one device: a leading device axis of 1
        return jax.ShapeDtypeStruct((1,) + tuple(x.shape), x.dtype)

    image = (config.data.image_size, config.data.image_size, config.data.num_channels)
    batch = {"image": jax.ShapeDtypeStruct((1, 1, batch_size) + image, jnp.float32)}
    rng = jax.ShapeDtypeStruct((1, 2), jnp.uint32)
    t0 = time.perf_counter()
    stats = p_train_step.lower((rng, jax.tree_util.tree_map(per_device, state)), batch).compile().memory_analysis()
    result = {"batch": batch_size, "compile_s": round(time.perf_counter() - t0, 1),
              "argument": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
              "alias": stats.alias_size_in_bytes, "temp": stats.temp_size_in_bytes}
    result["peak"] = result["argument"] + result["output"] - result["alias"] + result["temp"]
    return result


def child(name: str, remat: bool) -> None:
    """Print one JSON line: the memory of ``configs/<name>.py`` at batches 1 and 2."""
    sys.path.insert(0, ROOT)
    import jax

    config = importlib.import_module("configs." + name.replace("/", ".")).get_config()
    config.model.remat = remat
    config.training.n_jitted_steps = 1
    rows = [step_memory(config, b) for b in (1, 2)]
    print(json.dumps({"config": name, "remat": remat, "backend": jax.default_backend(), "rows": rows}), flush=True)


def largest_batch(rows: list[dict], budget: float) -> tuple[int, float, float]:
    """``(batch, fixed, per_image)``: the linear fit through batches 1 and 2, and the largest batch under budget."""
    per_image = rows[1]["peak"] - rows[0]["peak"]
    fixed = rows[0]["peak"] - per_image
    return int((budget - fixed) // per_image), fixed, per_image


def table(results: list[dict], budget_gib: float) -> str:
    """A markdown table of ``results`` (child lines, or ``{"config", "remat", "error"}``)."""
    gib = 2.0 ** 30
    lines = ["| config | remat | peak b=1 (GiB) | temp b=1 | argument b=1 | peak b=2 | per image | "
             f"largest batch in {budget_gib:g} GiB (linear) | compile s (b=1) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['remat']} | {r['error']} | | | | | | |")
            continue
        b1, b2 = r["rows"]
        batch, _, per_image = largest_batch(r["rows"], budget_gib * gib)
        lines.append(f"| {r['config']} | {r['remat']} | {b1['peak'] / gib:.3f} | {b1['temp'] / gib:.3f} | "
                     f"{b1['argument'] / gib:.3f} | {b2['peak'] / gib:.3f} | {per_image / gib:.3f} | {batch} | "
                     f"{b1['compile_s']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated names under configs/")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per (config, remat) pair")
    parser.add_argument("--budget-gib", type=float, default=80.0, help="device memory for the largest batch")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "REMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1] == "True")
        return
    results = []
    print("train step memory, XLA's compiled memory analysis on the default backend "
          f"({os.environ.get('JAX_PLATFORMS') or 'default'}; each line names the one used)", flush=True)
    for name in args.configs.split(","):
        for remat in (False, True):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", name, str(remat)]
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
            try:
                done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=args.timeout)
                result = json.loads(done.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                result = {"config": name, "remat": remat, "error": f"not compiled within {args.timeout:g} s"}
            except subprocess.CalledProcessError as err:
                result = {"config": name, "remat": remat, "error": f"failed: {err.stderr.strip().splitlines()[-1]}"}
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)
    print(table(results, args.budget_gib))


if __name__ == "__main__":
    main()
