"""The original PyTorch port (github ``yang-song/score_sde_pytorch``) timed as ``train_step.py`` / ``sampling.py`` /
``likelihood.py`` time ours: train step, one score evaluation, PC sampler and likelihood per NFE.

Needs a runnable copy of the port (its ``.py`` files; the CUDA extensions of its ``op/`` are not used by DDPM++,
whose ``model.fir`` is False) at ``--port DIR``, and torch, numpy, scipy and ml_collections. The port's own code
runs unchanged; this script only builds its objects and times them (``torch.cuda.synchronize`` after each call).

* ``--config`` as ours (``benchmarks/common.py``): ``benchmark`` / ``tiny`` resize the port's
  ``configs/vp/cifar10_ddpmpp_continuous.py`` the same way; any other name is one of the port's configs, unchanged.
* ``train_step`` — the port's ``losses.get_step_fn`` (the config's loss, Adam with warm-up and gradient clipping,
  then the EMA update), one step per call on ``--batch`` images, min / median seconds;
* ``score_eval`` — ``mutils.get_score_fn`` at t = 0.5 without gradients;
* ``pc_N<N>`` — ``sampling.get_pc_sampler`` with reverse diffusion + Langevin (snr 0.16, one corrector step), as
  ``sampling.py`` runs ours: seconds per step and per evaluation (2N evaluations), ratio to ``score_eval``;
* ``likelihood_RK45`` — ``likelihood.get_likelihood_fn`` (scipy RK45, the port's only solver): NFE, seconds per NFE.

    python benchmarks/pytorch_port.py --port DIR [--device cuda] [--config benchmark] [--batch 8] [--reps 10]
                                     [--n 100] [--tol 1e-3] [--threads N] [--skip_pc] [--skip_likelihood]
                                     [--out results.json]

The first line printed is the torch device (``backend platform=...``), as the JAX scripts print theirs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_backend(device: str) -> dict:
    """The torch device timed: platform, device kind, device count, torch version, TF32 settings."""
    import torch

    cuda = device.startswith("cuda")
    return {"platform": "cuda" if cuda else "cpu", "device_kind": torch.cuda.get_device_name(device) if cuda else "cpu",
            "device_count": torch.cuda.device_count() if cuda else 1, "torch": torch.__version__,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32, "threads": torch.get_num_threads()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", required=True, help="folder of a runnable copy of the PyTorch port")
    parser.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    parser.add_argument("--config", default="benchmark")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--n", type=int, default=100, help="PC sampler steps N")
    parser.add_argument("--tol", type=float, default=1e-3, help="likelihood rtol = atol")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default torch's)")
    parser.add_argument("--skip_pc", action="store_true")
    parser.add_argument("--skip_likelihood", action="store_true")
    parser.add_argument("--out", help="also write the settings, the backend and every figure as JSON to this file")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.port, "models", "ncsnpp.py")):
        raise FileNotFoundError(f"--port {args.port}: no models/ncsnpp.py there; pass the folder of a runnable copy "
                                "of github yang-song/score_sde_pytorch.")
    # The port's packages (configs, models, losses, ...) first; ours only for benchmarks.common.
    sys.path[:0] = [os.path.abspath(args.port), ROOT]
    import numpy as np
    import torch

    import losses
    import sampling
    import likelihood
    import sde_lib
    from benchmarks import common
    from models import ncsnpp  # noqa: F401  (registers the model)
    from models import utils as mutils
    from models.ema import ExponentialMovingAverage

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = torch_backend(device)
    print(f"backend platform={backend['platform']} device_kind={backend['device_kind']!r} "
          f"devices={backend['device_count']} torch={backend['torch']} (PyTorch port)", flush=True)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn, reps: int) -> tuple[float, float]:
        """(min, median) seconds of ``reps`` calls after one warm-up call."""
        fn()
        sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times), float(np.median(times))

    config = common.load_config(args.config)
    config.device = torch.device(device)
    torch.manual_seed(0)
    model = mutils.get_model(config.model.name)(config).to(config.device)
    num_params = sum(p.numel() for p in model.parameters())
    size = config.data.image_size
    shape = (args.batch, config.data.num_channels, size, size)
    print(f"config {args.config} | params {num_params:,} | batch {args.batch} of {shape[1:]}", flush=True)
    x = torch.randn(*shape, device=device)
    sde = sde_lib.VPSDE(config.model.beta_min, config.model.beta_max, config.model.num_scales)
    results = {}

    ema = ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate)
    state = dict(optimizer=losses.get_optimizer(config, model.parameters()), model=model, ema=ema, step=0)
    step_fn = losses.get_step_fn(sde, train=True, optimize_fn=losses.optimization_manager(config),
                                 reduce_mean=config.training.reduce_mean, continuous=config.training.continuous,
                                 likelihood_weighting=config.training.likelihood_weighting)
    model.train()
    lo, med = timed(lambda: step_fn(state, x), args.reps)
    print(f"train_step {lo:.4f} min / {med:.4f} median s per step", flush=True)
    results["train_step"] = {"min_s_per_step": lo, "median_s_per_step": med}

    model.eval()
    score_fn = mutils.get_score_fn(sde, model, train=False, continuous=True)
    t_half = torch.full((args.batch,), 0.5, device=device)
    with torch.no_grad():
        one, one_med = timed(lambda: score_fn(x, t_half), max(5, args.reps))
    print(f"score_eval {one:.4f} min / {one_med:.4f} median s", flush=True)
    results["score_eval"] = {"wall_s": one, "median_s": one_med}

    if not args.skip_pc:
        sde_n = sde_lib.VPSDE(config.model.beta_min, config.model.beta_max, args.n)
        pc = sampling.get_pc_sampler(sde_n, shape, sampling.get_predictor("reverse_diffusion"),
                                     sampling.get_corrector("langevin"), lambda v: v, 0.16, n_steps=1,
                                     probability_flow=False, continuous=True, denoise=True, eps=1e-3, device=device)
        total, _ = timed(lambda: pc(model), max(1, args.reps // 5))
        nfe = 2 * args.n
        print(f"pc_N{args.n} total {total:.2f} s nfe {nfe} per_step {total / args.n:.4f} s per_eval "
              f"{total / nfe:.4f} s ratio_to_score_eval {total / nfe / one:.3f}", flush=True)
        results[f"pc_N{args.n}"] = {"total_s": total, "nfe": nfe, "steps": args.n, "per_step_s": total / args.n,
                                    "per_eval_s": total / nfe, "ratio_to_score_eval": total / nfe / one,
                                    "score_eval_s": one}

    if not args.skip_likelihood:
        lf = likelihood.get_likelihood_fn(sde, lambda v: v, rtol=args.tol, atol=args.tol)
        data = 0.5 * x
        lf(model, data)  # warm-up (cuDNN's first calls)
        sync()
        t0 = time.perf_counter()
        bpd, _, nfe = lf(model, data)
        sync()
        total = time.perf_counter() - t0
        print(f"likelihood_RK45 rtol {args.tol:g} atol {args.tol:g} total {total:.2f} s nfe {nfe} per_nfe "
              f"{total / nfe:.4f} s bpd_mean {float(bpd.mean()):.6f}", flush=True)
        results["likelihood_RK45"] = {"total_s": total, "nfe": int(nfe), "per_nfe_s": total / nfe,
                                      "bpd_mean": float(bpd.mean())}

    settings = {"config": args.config, "batch": args.batch, "params": num_params, "reps": args.reps, "n": args.n,
                "tol": args.tol, "device": device}
    common.write_json(args.out, "pytorch_port", backend, settings, results)


if __name__ == "__main__":
    main()
