"""Quality vs score evaluations (NFE) of the fast samplers on Gaussian mixtures with the exact score.

For a 2-D and a 16-D Gaussian mixture (:class:`score_sde.toy.GaussianMixture`, exact diffused score)
and one SDE, prints two tables with a column per NFE budget in {5, 10, 20, 50, 100}:

* ``SW`` — sliced Wasserstein-2 distance (``--projections`` random directions) between the samples
  and as many exact draws of ``p_eps`` (the distribution every sampler targets at its end time
  ``eps``); the first line gives its Monte-Carlo floor, the distance between two exact sets;
* ``flow`` — for the deterministic (probability-flow ODE) samplers, the median over samples of the
  RMS per coordinate of the endpoint minus a tight-tolerance solve of the same ODE from the same
  latent (dopri5, rtol = atol = 1e-6, :func:`sampling.ode_sample_jax`). The median, because a latent
  near the boundary between two modes' basins may land in the other mode after a small error, and
  those few O(1) errors would dominate a mean.

Every sampler starts from the same latents, drawn from the exact ``p_T`` of the mixture rather than
the SDE's prior, so that the exact flow maps them to exact samples of ``p_eps`` and only the samplers'
errors remain; the row ``ode rk45, prior latents`` starts from the prior instead. SW differences
smaller than about twice the floor's distance from zero are Monte-Carlo noise (the deterministic
samplers share latents, so their converged values agree with each other more closely than that).

Each fast sampler gets the largest step count whose documented NFE fits the budget (``heun`` costs 2
per step, ``dpm_solver`` of order k costs k); a cell shows the metric and, in brackets, the NFE used
where it differs from the budget. The adaptive SDE solver picks its own steps; it runs at three
tolerances and its rows show the NFE it used. Beside them, the paper's samplers at N = 1000:
PC1000 (reverse diffusion + Langevin, snr 0.16; 2000 evaluations), Euler–Maruyama (1000) and the
probability-flow ODE (RK45 at the paper's 1e-5 tolerances).

Usage (repository root): ``python benchmarks/fast_samplers.py [--sde vpsde] [--n 20000] [--seed 0]``.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import fast_sampling  # noqa: E402
import sampling  # noqa: E402
import sde_lib  # noqa: E402
from benchmarks import common  # noqa: E402
from score_sde import toy  # noqa: E402

BUDGETS = (5, 10, 20, 50, 100)
EPS = {"vpsde": 1e-3, "subvpsde": 1e-3, "vesde": 1e-5}
# (row label, registered name, options, NFE per step); deterministic samplers first
FIXED = [
    ("ddim", "ddim", {}, 1),
    ("heun (edm)", "heun", {}, 2),
    ("dpm_solver-1", "dpm_solver", {"order": 1}, 1),
    ("dpm_solver-2", "dpm_solver", {"order": 2}, 2),
    ("dpm_solver-3", "dpm_solver", {"order": 3}, 3),
    ("dpm_solver_pp-2m", "dpm_solver_pp", {}, 1),
    ("ddim eta=1", "ddim", {"eta": 1.0}, 1),
    ("heun churn=5", "heun", {"churn": 5.0}, 2),
]
DETERMINISTIC = {"ddim", "heun (edm)", "dpm_solver-1", "dpm_solver-2", "dpm_solver-3", "dpm_solver_pp-2m"}
ADAPTIVE_RTOLS = (0.1, 0.05, 0.01)


def make_sde(name: str) -> sde_lib.SDE:
    """The paper's CIFAR-10 SDEs with N = 1000."""
    return {"vpsde": lambda: sde_lib.VPSDE(0.1, 20.0, 1000), "subvpsde": lambda: sde_lib.subVPSDE(0.1, 20.0, 1000),
            "vesde": lambda: sde_lib.VESDE(0.01, 50.0, 1000)}[name]()


def mixture_2d() -> toy.GaussianMixture:
    """Eight isotropic Gaussians (std 0.1) on a circle of radius 2: well separated modes."""
    angles = np.arange(8) * 2 * np.pi / 8
    return toy.GaussianMixture(np.ones(8), 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1), 0.1 * np.ones(8))


def mixture_nd(d: int, k: int, seed: int) -> toy.GaussianMixture:
    """``k`` components in ``d`` dimensions: random means (std 1.5), random covariances (eigenvalues
    0.01-0.25), unequal weights."""
    rs = np.random.RandomState(seed)
    covs = []
    for _ in range(k):
        q = np.linalg.qr(rs.randn(d, d))[0]
        covs.append(q @ np.diag(rs.uniform(0.01, 0.25, d)) @ q.T)
    return toy.GaussianMixture(rs.uniform(0.5, 1.5, k), 1.5 * rs.randn(k, d), np.stack(covs))


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, rng: np.random.RandomState, projections: int) -> float:
    """SW2 between equal-size sample sets ``x``, ``y`` (n, d): RMS over random unit directions of the
    1-D Wasserstein-2 distance of the projections (sorted-sample coupling)."""
    dirs = rng.randn(x.shape[1], projections)
    dirs /= np.linalg.norm(dirs, axis=0)
    px, py = np.sort(x @ dirs, axis=0), np.sort(y @ dirs, axis=0)
    return float(np.sqrt(np.mean((px - py) ** 2)))


def flow_error(x, reference) -> float:
    """Median over samples of the per-sample RMS (over coordinates) of ``x - reference`` (n, d)."""
    return float(np.median(np.sqrt(np.mean((np.asarray(x) - np.asarray(reference)) ** 2, axis=1))))


def fmt(value: float, nfe: int, budget: int | None) -> str:
    cell = f"{value:.4f}"
    return cell + (f" [{nfe}]" if budget is None or nfe != budget else "")


def run_dataset(label: str, dist: toy.GaussianMixture, sde: sde_lib.SDE, eps: float, n: int, seed: int,
                projections: int) -> None:
    score_fn = dist.score_fn(sde)
    key = jax.random.PRNGKey(seed)
    z = dist.marginal_sample(jax.random.fold_in(key, 1), sde, sde.T, n)
    truth = np.asarray(dist.marginal_sample(jax.random.fold_in(key, 2), sde, eps, n))
    floor = np.asarray(dist.marginal_sample(jax.random.fold_in(key, 3), sde, eps, n))
    reference, ref_nfe = jax.jit(lambda z: sampling.ode_sample_jax(score_fn, sde, z, rtol=1e-6, atol=1e-6, eps=eps))(z)

    def sw(x):
        return sliced_wasserstein(np.asarray(x, np.float64), truth, np.random.RandomState(seed), projections)

    print(f"\n## {label}: d={dist.dim}, {dist.num_components} components, {type(sde).__name__}, eps={eps}, n={n}")
    print(f"SW floor (exact vs exact samples): {sw(floor):.4f}; flow reference: dopri5 1e-6, {int(ref_nfe)} NFE")
    sw_rows, flow_rows = [], []
    for row, name, options, per_step in FIXED:
        fn = fast_sampling.fast_sampler_fn(name)
        # steps is traced: one compilation per sampler for all budgets
        run = jax.jit(lambda steps, fn=fn, options=options: fn(jax.random.fold_in(key, 4), score_fn, sde, z, eps=eps,
                                                                 steps=steps, **options))
        sw_cells, flow_cells = [], []
        for budget in BUDGETS:
            steps = max(1, budget // per_step)
            x, nfe = run(steps)
            sw_cells.append(fmt(sw(x), int(nfe), budget))
            flow_cells.append(fmt(flow_error(x, reference), int(nfe), budget))
        sw_rows.append((row, sw_cells))
        if row in DETERMINISTIC:
            flow_rows.append((row, flow_cells))
    for rtol in ADAPTIVE_RTOLS:
        x, nfe = jax.jit(lambda z, rtol=rtol: fast_sampling.adaptive_sde(jax.random.fold_in(key, 5), score_fn, sde, z,
                                                                         eps=eps, adaptive_rtol=rtol))(z)
        sw_rows.append((f"adaptive_sde rtol={rtol}", [fmt(sw(x), int(nfe), None)]))
    baselines = [
        ("pc1000 rd+langevin", "reverse_diffusion", "langevin"),
        ("em1000", "euler_maruyama", "none"),
    ]
    for row, predictor, corrector in baselines:
        updates = sampling.pc_update_fns(sde, score_fn, sampling.get_predictor(predictor),
                                         sampling.get_corrector(corrector), snr=0.16)
        _, x = jax.jit(lambda z, updates=updates: sampling.pc_loop(jax.random.fold_in(key, 6), z, sde, eps, *updates))(z)
        sw_rows.append((row, [fmt(sw(x), sde.N * (1 + (corrector != "none")), None)]))
    ode = jax.jit(lambda z: sampling.ode_sample_jax(score_fn, sde, z, rtol=1e-5, atol=1e-5, eps=eps))
    x, nfe = ode(z)
    sw_rows.append(("ode rk45 1e-5", [fmt(sw(x), int(nfe), None)]))
    flow_rows.append(("ode rk45 1e-5", [fmt(flow_error(x, reference), int(nfe), None)]))
    x, nfe = ode(sde.prior_sampling(jax.random.fold_in(key, 7), (n, dist.dim)))
    sw_rows.append(("ode rk45, prior latents", [fmt(sw(x), int(nfe), None)]))

    header = f"{'sampler':<24}" + "".join(f"{'NFE ' + str(b):>16}" for b in BUDGETS)
    for title, rows in (("SW to exact samples", sw_rows), ("flow-map error, median over samples (ODE samplers)", flow_rows)):
        print(f"\n{title}\n{header}")
        for row, cells in rows:
            print(f"{row:<24}" + "".join(f"{c:>16}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sde", default="vpsde", choices=sorted(EPS))
    parser.add_argument("--n", type=int, default=20000, help="samples per sampler")
    parser.add_argument("--dim", type=int, default=16, help="dimension of the second mixture (>= 16)")
    parser.add_argument("--projections", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    common.print_backend()
    sde = make_sde(args.sde)
    eps = EPS[args.sde]
    run_dataset("2-D mixture", mixture_2d(), sde, eps, args.n, args.seed, args.projections)
    run_dataset(f"{args.dim}-D mixture", mixture_nd(args.dim, 6, args.seed), sde, eps, args.n, args.seed,
                args.projections)


if __name__ == "__main__":
    main()
