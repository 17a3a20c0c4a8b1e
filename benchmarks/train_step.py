"""Seconds per training step (forward, backward, Adam, EMA) on the default backend's devices.

The model is ``--config`` (``benchmarks/common.py``): by default the benchmark DDPM++
(``configs/vp/cifar10_ddpmpp_continuous.py`` with ``nf=32``, ``ch_mult=(1, 2, 2)``, ``num_res_blocks=2``,
``attn_resolutions=(16,)``, 1,754,147 parameters; 32×32×3 images, VP SDE); ``--config
vp/cifar10_ddpmpp_continuous`` is the full DDPM++. Each figure is min / median over repeated calls after
compilation, for the pmapped train step as ``run_lib.train`` runs it (``score_sde.train_steps``, which imports
no TensorFlow), for each number of steps per call in ``--fused`` (``n_jitted_steps``; ``n > 1`` are fused into one
call by ``fuse_steps``, unrolled or in ``lax.scan``: ``--fuse_with``), per step. Each count compiles its own program
once; the first call's time, compilation included, is recorded as ``first_call_s``.

On a CPU backend ``--devices 1,2`` (the default there) runs once per device count; counts other than this
process's run in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (the same cores, so
this shows the cost of data parallelism, not a speed-up). On an accelerator the step runs on the machine's
devices, global batch split across them.

    python benchmarks/train_step.py [--config benchmark] [--batch 8] [--reps 10] [--fused 1,5]
                                    [--fuse_with auto|unroll|scan] [--devices 1,2]
                                    [--out results.json]

Anchors (this kind of 2-core CPU, see docs/performance.md): PyTorch port full step 0.253 s min /
0.296 s median; original JAX code forward+backward alone 0.331 s min.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402

ANCHORS = ("anchors (same CPU kind, docs/performance.md): PyTorch port full step 0.253 min / 0.296 median s; "
           "original JAX forward+backward only 0.331 min / 0.360 median s")


def _time(fn, reps: int) -> tuple[float, float]:
    import numpy as np

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.min(times)), float(np.median(times))


def run(config_name: str, batch_size: int, reps: int, fused: Sequence[int], fuse_with: str = "auto") -> dict:
    """Time this process's devices; prints one line per figure and returns them (seconds per step)."""
    import jax
    import numpy as np

    import losses
    import sde_lib
    from score_sde import parallel, train_steps

    config = common.load_config(config_name)
    config.training.fuse_steps_with = fuse_with
    n_dev = parallel.local_device_count()
    if batch_size % n_dev:
        raise ValueError(f"--batch {batch_size} is not divisible by the {n_dev} local devices.")
    t0 = time.perf_counter()
    model, state = losses.init_train_state(jax.random.PRNGKey(0), config)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0  # the model's jitted initialisation, compilation included
    num_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(state.params))
    sde, _ = sde_lib.get_sde(config)
    p_train_step, _ = train_steps.make_train_and_eval_steps(config, sde, model)
    shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    per_device = batch_size // n_dev
    rng = np.random.default_rng(0)
    print(f"devices {n_dev} | params {num_params:,} | global batch {per_device * n_dev} | "
          f"{config.data.image_size}x{config.data.image_size}x{config.data.num_channels} | initialisation incl. "
          f"compilation {init_s:.1f} s", flush=True)
    result = {"devices": n_dev, "params": num_params, "fusion": train_steps.config_fusion(config), "init_s": init_s,
              "steps": {}}

    for n_steps in fused:
        images = rng.uniform(-1, 1, (n_dev, n_steps, per_device) + shape).astype(np.float32)
        batch = {"image": jax.device_put(images)}
        carry = [jax.random.PRNGKey(1), parallel.replicate(state)]

        def call():
            # Fresh per-device keys every call, as run_lib.train draws them: the keys a step returns carry pmap's
            # output sharding, not the split's, and feeding them back made the second call compile the step again.
            carry[0], keys = train_steps.device_keys(carry[0])
            (_, carry[1]), loss = p_train_step((keys, carry[1]), batch)
            jax.block_until_ready(loss)

        t0 = time.perf_counter()
        call()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        call()
        second_s = time.perf_counter() - t0
        lo, med = _time(call, max(reps // n_steps, 3))
        how = "" if n_steps == 1 else f" ({result['fusion']})"
        print(f"train step, {n_steps} fused per call{how}: {lo / n_steps:.4f} min / {med / n_steps:.4f} median s "
              f"per step ({n_steps / med:.2f} steps/s; first call incl. compilation {compile_s:.1f} s, second call "
              f"{second_s:.3f} s)", flush=True)
        result["steps"][str(n_steps)] = {"min_s_per_step": lo / n_steps, "median_s_per_step": med / n_steps,
                                         "first_call_s": compile_s, "second_call_s": second_s}
    return result


def run_in_subprocess(n: int, args) -> dict:
    """:func:`run` in a CPU subprocess with ``n`` host-platform devices; its figures."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "child.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child_out", out, "--config", args.config, "--batch",
               str(args.batch), "--reps", str(args.reps), "--fused", ",".join(map(str, args.fused)),
               "--fuse_with", args.fuse_with]
        subprocess.run(cmd, env=env, check=True)
        with open(out) as f:
            return json.load(f)


def _step_counts(text: str) -> list[int]:
    """``'1,5'`` -> ``[1, 5]``: distinct positive counts, in order."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--fused {text!r}: give positive step counts separated by commas, e.g. 1,5")
    return list(dict.fromkeys(counts))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_arguments(parser)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--fused", type=_step_counts, default="1,5",
                        help="comma-separated steps per call (n_jitted_steps) to time, each its own program")
    parser.add_argument("--fuse_with", default="auto", choices=("auto", "unroll", "scan"),
                        help="config.training.fuse_steps_with: how fused steps become one program (auto: unrolled "
                             "on a CPU, lax.scan elsewhere)")
    parser.add_argument("--devices", help="CPU only: comma-separated device counts to run (default 1,2 on a CPU; "
                                          "on an accelerator the machine's devices)")
    parser.add_argument("--child_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_out:
        with open(args.child_out, "w") as f:
            json.dump(run(args.config, args.batch, args.reps, args.fused, args.fuse_with), f)
        return
    backend = common.print_backend()
    on_cpu = backend["platform"] == "cpu"
    if on_cpu:
        print(ANCHORS, flush=True)
    if args.devices and not on_cpu:
        raise ValueError(f"--devices is for CPU runs (host-platform devices); the default backend is "
                         f"{backend['platform']}: leave --devices out to use its "
                         f"{backend['local_device_count']} devices.")
    counts = [int(d) for d in (args.devices or ("1,2" if on_cpu else str(backend["local_device_count"]))).split(",")]
    results = {}
    for n in counts:
        same = n == backend["local_device_count"]
        results[str(n)] = (run(args.config, args.batch, args.reps, args.fused, args.fuse_with) if same
                           else run_in_subprocess(n, args))
    settings = {"config": args.config, "batch": args.batch, "reps": args.reps, "fused": args.fused,
                "fuse_with": args.fuse_with}
    common.write_json(args.out, "train_step", backend, settings, {"devices": results})


if __name__ == "__main__":
    main()
