"""Seconds per training step of the benchmark DDPM++ (forward, backward, Adam, EMA), 1 and 2 devices.

The benchmark model: ``configs/vp/cifar10_ddpmpp_continuous.py`` with ``nf=32``, ``ch_mult=(1, 2, 2)``,
``num_res_blocks=2``, ``attn_resolutions=(16,)`` (1,754,147 parameters), 32×32×3 images, global batch 8,
VP SDE. Each figure is min / median over repeated calls after compilation, for the pmapped train
step as ``run_lib.train`` runs it: one step per call (``n_jitted_steps=1``) and ``n`` steps fused into one call
(``run_lib.fuse_steps``; ``--fused``, per step). Two devices are CPU "devices" made by
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` in a subprocess (the same two cores, so
this shows the cost of data parallelism, not a speed-up).

    python benchmarks/train_step.py [--reps 10] [--fused 5] [--devices 1,2] [--config PATH] [--batch 8]

Anchors (this kind of 2-core CPU, see docs/performance.md): PyTorch port full step 0.253 s min /
0.296 s median; original JAX code forward+backward alone 0.331 s min.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANCHORS = ("anchors (same CPU kind, docs/performance.md): PyTorch port full step 0.253 min / 0.296 median s; "
           "original JAX forward+backward only 0.331 min / 0.360 median s")


def benchmark_config(path: str):
    """The benchmark DDPM++ config (or ``path``'s config unchanged when it is not the CIFAR-10 DDPM++ one)."""
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if os.path.basename(path) == "cifar10_ddpmpp_continuous.py":
        from benchmarks.common import shrink

        config = shrink(config)
    return config


def _time(fn, reps: int) -> tuple[float, float]:
    import numpy as np

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.min(times)), float(np.median(times))


def run(config_path: str, batch_size: int, reps: int, fused: int) -> None:
    """Time this process's devices; prints one line per figure."""
    sys.path.insert(0, ROOT)
    import jax
    import numpy as np

    import losses
    import run_lib
    import sde_lib
    from score_sde import parallel

    config = benchmark_config(config_path)
    n_dev = parallel.local_device_count()
    model, state = losses.init_train_state(jax.random.PRNGKey(0), config)
    num_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(state.params))
    sde, _ = sde_lib.get_sde(config)
    p_train_step, _ = run_lib.make_train_and_eval_steps(config, sde, model)
    shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    rng = np.random.default_rng(0)
    print(f"devices {n_dev} | params {num_params:,} | global batch {batch_size} | "
          f"{config.data.image_size}x{config.data.image_size}x{config.data.num_channels}", flush=True)

    for n_steps in sorted({1, fused}):
        images = rng.uniform(-1, 1, (n_dev, n_steps, batch_size // n_dev) + shape).astype(np.float32)
        batch = {"image": jax.device_put(images)}
        carry = [parallel.split_per_device(jax.random.PRNGKey(1))[1], parallel.replicate(state)]

        def call():
            (carry[0], carry[1]), loss = p_train_step((carry[0], carry[1]), batch)
            jax.block_until_ready(loss)

        t0 = time.perf_counter()
        call()
        compile_s = time.perf_counter() - t0
        call()
        lo, med = _time(call, max(reps // n_steps, 3))
        print(f"train step, {n_steps} fused per call: {lo / n_steps:.4f} min / {med / n_steps:.4f} median s per step "
              f"({n_steps / med:.2f} steps/s; first call incl. compilation {compile_s:.1f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs/vp/cifar10_ddpmpp_continuous.py"))
    parser.add_argument("--batch", type=int, default=8, help="global batch size")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--fused", type=int, default=5, help="steps fused per call (n_jitted_steps)")
    parser.add_argument("--devices", default="1,2", help="comma-separated device counts to run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run(args.config, args.batch, args.reps, args.fused)
        return
    print(ANCHORS, flush=True)
    for n in (int(d) for d in args.devices.split(",")):
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), TF_CPP_MIN_LOG_LEVEL="2")
        if n > 1:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--config", args.config, "--batch",
               str(args.batch), "--reps", str(args.reps), "--fused", str(args.fused)]
        subprocess.run(cmd, env=env, check=True)


if __name__ == "__main__":
    main()
