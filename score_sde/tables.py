"""The paper's tables at CPU scale, against ground truth: ``run(config, workdir)``.

Two tables are measured on Gaussian mixtures whose score and density are exact at every
diffusion time (:mod:`score_sde.toy`), so what they show is the error of the numerical method
alone, with no learning error:

* **sampler** — Table 1's grid: predictors (ancestral sampling, reverse diffusion, probability
  flow) × samplers ``P<N>`` (N predictor steps), ``P<2N>``, ``C<2N>`` (corrector only: N noise
  scales × 2 Langevin steps, as the paper's C2000), ``PC<N>`` (N predictor + N corrector steps),
  for VE, VP and sub-VP, in every dimension of ``config.tables.dims``. Each cell draws
  ``num_samples`` samples per seed and reports, with a 95% confidence interval over seeds:
  the sliced 1-Wasserstein distance to exact samples (``SW``), the kernel MMD² to them, and
  ``Δlog p``, the mean exact log-density of the samples minus that of exact samples (nats;
  negative: mass in low-density regions; positive: mass piled on the modes). The row
  "exact samples" measures the same distances between two independent exact samples: the
  noise floor below which no sampler can be told apart from the truth.
* **likelihood** — Table 2's method: bits/dim through the probability-flow ODE with the exact
  score and the exact divergence, beside the exact NLL of the mixture. The difference splits
  into the prior mismatch ``log p_T(z) - log π(z)`` (known here) and the solver error.

The **paper** table puts the published CIFAR-10 numbers beside ours (:mod:`score_sde.paper_results`).

Resumable: every finished cell is stored in ``workdir/tables.json`` at once and never computed
again; a rerun (after a kill) computes only the missing cells. Files written::

    workdir/tables.json      every cell (per-seed values), the config it was made with, the claims
    workdir/tables.md        the tables, the claims section, the paper's tables with commands
    workdir/sampler_error.png, workdir/samples_2d.png
    workdir/tables_log.txt   the log (progress, ETA)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

import likelihood
import sampling
import sde_lib
from score_sde import paper_results, reporting, toy
from score_sde.paper_results import TablesError

TABLES = ("sampler", "likelihood", "paper")
SDE_NAMES = ("vesde", "vpsde", "subvpsde")
# Table 1's rows: (sampling.py predictor, probability_flow).
PREDICTORS = {"ancestral_sampling": ("ancestral_sampling", False),
              "reverse_diffusion": ("reverse_diffusion", False),
              "probability_flow": ("reverse_diffusion", True)}
CORRECTOR_ONLY = "corrector_only"
EXACT = "exact_samples"
# Fields of config that change a stored cell's numbers: a stored file made with others is refused.
FINGERPRINT_FIELDS = ("num_samples", "seeds", "snr", "projections", "mmd_points", "likelihood_points",
                      "likelihood_rtol", "likelihood_atol")
PREVIEW_POINTS = 400


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One column of Table 1: ``N`` noise scales, a predictor step or not, corrector steps per scale."""
    name: str
    num_scales: int
    predictor: bool
    corrector_steps: int

    @property
    def nfe(self) -> int:
        """Score evaluations: one per predictor step and one per corrector step."""
        return self.num_scales * (int(self.predictor) + self.corrector_steps)


def parse_sampler(name: str) -> Sampler:
    """``'P1000'`` / ``'C2000'`` / ``'PC1000'`` -> :class:`Sampler` (C<n>: n/2 scales × 2 steps, the paper's)."""
    match = re.fullmatch(r"(PC|P|C)(\d+)", name)
    if not match or int(match.group(2)) < 2:
        raise TablesError(f"config.tables.samplers: {name!r} is not a sampler name; use P<steps>, C<steps> or "
                          "PC<steps>, e.g. P1000, P2000, C2000, PC1000.")
    kind, steps = match.group(1), int(match.group(2))
    if kind == "C":
        if steps % 2:
            raise TablesError(f"config.tables.samplers: {name!r}: corrector-only samplers take 2 steps per noise "
                              "scale (the paper's C2000), so the step count must be even.")
        return Sampler(name, steps // 2, False, 2)
    return Sampler(name, steps, True, int(kind == "PC"))


def check_config(config) -> None:
    """Raise ``ValueError`` naming every bad ``config.tables`` field (before anything is written)."""
    t = config.tables
    problems = [f"config.tables.which: unknown table {w!r}; use some of {TABLES}" for w in t.which if w not in TABLES]
    problems += [f"config.tables.sdes: unknown SDE {s!r}; use some of {SDE_NAMES}"
                 for s in t.sdes if s not in SDE_NAMES]
    problems += [f"config.tables.predictors: unknown predictor {p!r}; use some of {tuple(PREDICTORS)}"
                 for p in t.predictors if p not in PREDICTORS]
    for name in t.samplers:
        try:
            parse_sampler(name)
        except ValueError as err:
            problems.append(str(err))
    problems += [f"config.tables.dims: {d!r} is not a dimension >= 1" for d in t.dims if int(d) < 1]
    if t.seeds < 2:
        problems.append(f"config.tables.seeds = {t.seeds}: a confidence interval needs at least 2 seeds")
    if problems:
        raise TablesError("Invalid tables config:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------
# Data and SDEs
# ---------------------------------------------------------------------------------------------
class IsotropicMixture(toy.Distribution):
    """``Σ_k w_k N(mean_k, std_k² I)``: the exact score and log-density of ``p_t``, vectorised over components.

    The same distribution as ``toy.GaussianMixture(weights, means, stds)`` (:meth:`as_toy`; the tests
    check that both give the same score and density), in one fused computation over the K
    components instead of one per component: the sampler grid evaluates the score millions of times.

    Args:
        weights: ``(K,)`` non-negative, normalised here.
        means: ``(K, d)``.
        stds: ``(K,)`` standard deviations.
    """

    def __init__(self, weights, means, stds):
        weights = np.asarray(weights, np.float64)
        self.weights = jnp.asarray(weights / weights.sum(), jnp.float32)
        self.means = jnp.asarray(means, jnp.float32)
        self.stds = jnp.asarray(stds, jnp.float32)
        self.event_shape = (self.means.shape[1],)

    def as_toy(self) -> toy.GaussianMixture:
        return toy.GaussianMixture(np.asarray(self.weights), np.asarray(self.means), np.asarray(self.stds))

    def sample(self, rng, n):
        label_rng, noise_rng = jax.random.split(rng)
        labels = jax.random.categorical(label_rng, jnp.log(self.weights), shape=(n,))
        return self.means[labels] + self.stds[labels, None] * jax.random.normal(noise_rng, (n, self.dim))

    def _terms(self, sde, x, t):
        """Per-component ``log w_k + log N_k,t(x)`` ``(n, K)``, ``x - a mean_k`` ``(n, K, d)``, variances ``(n, K)``."""
        a, var = toy.transition_coefficients(sde, t)
        v = a[:, None] ** 2 * self.stds ** 2 + var[:, None]
        diff = x[:, None, :] - a[:, None, None] * self.means
        logits = (jnp.log(self.weights) - 0.5 * self.dim * jnp.log(2 * math.pi * v)
                  - 0.5 * jnp.sum(diff ** 2, axis=-1) / v)
        return logits, diff, v

    def log_prob(self, sde, x, t):
        return jax.scipy.special.logsumexp(self._terms(sde, x, t)[0], axis=1)

    def score(self, sde, x, t):
        logits, diff, v = self._terms(sde, x, t)
        post = jax.nn.softmax(logits, axis=1)
        return -jnp.einsum("nk,nkd->nd", post / v, diff)


def make_mixture(dim: int) -> IsotropicMixture:
    """The test distribution in ``dim`` dimensions, fixed (no config seed: cells stay comparable).

    2-D: 8 components on a circle of radius 3, std 0.3, unequal weights. Higher: 6 components with
    means drawn N(0, 2² I) and stds in [0.3, 0.7], unequal weights (a sampler that gets the weights
    wrong shows in ``Δlog p``).
    """
    rng = np.random.default_rng(1234 + dim)
    if dim == 2:
        angles = 2 * np.pi * np.arange(8) / 8
        means = 3.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        return IsotropicMixture(np.linspace(1.0, 2.0, 8), means, np.full(8, 0.3))
    return IsotropicMixture(rng.uniform(1.0, 2.0, 6), rng.normal(0.0, 2.0, (6, dim)), rng.uniform(0.3, 0.7, 6))


def make_sde(config, name: str, num_scales: int) -> tuple[sde_lib.SDE, float]:
    """``(sde, sampling eps)`` with ``config.model``'s parameters and ``num_scales`` steps."""
    m = config.model
    if name == "vesde":
        return sde_lib.VESDE(sigma_min=m.sigma_min, sigma_max=m.sigma_max, N=num_scales), 1e-5
    cls = sde_lib.VPSDE if name == "vpsde" else sde_lib.subVPSDE
    return cls(beta_min=m.beta_min, beta_max=m.beta_max, N=num_scales), 1e-3


# ---------------------------------------------------------------------------------------------
# Distances to the truth
# ---------------------------------------------------------------------------------------------
def random_directions(rng: jax.Array, n: int, dim: int) -> jax.Array:
    """``n`` unit vectors, ``(n, dim)``."""
    v = jax.random.normal(rng, (n, dim))
    return v / jnp.linalg.norm(v, axis=1, keepdims=True)


@jax.jit
def sliced_wasserstein(x: jax.Array, y: jax.Array, directions: jax.Array) -> jax.Array:
    """Mean over ``directions`` of the 1-Wasserstein distance of the projections of ``x`` and ``y``.

    ``x``, ``y``: ``(n, dim)`` with the same ``n``; in data units.
    """
    px = jnp.sort(x @ directions.T, axis=0)
    py = jnp.sort(y @ directions.T, axis=0)
    return jnp.mean(jnp.abs(px - py))


@jax.jit
def mmd2(x: jax.Array, y: jax.Array, bandwidth: jax.Array) -> jax.Array:
    """Unbiased MMD² with the Gaussian kernel ``exp(-|a-b|² / (2 bandwidth²))``; ``x``, ``y`` ``(n, dim)``."""
    def gram(a, b):
        sq = jnp.sum(a ** 2, 1)[:, None] + jnp.sum(b ** 2, 1)[None, :] - 2 * a @ b.T
        return jnp.exp(-jnp.maximum(sq, 0.0) / (2 * bandwidth ** 2))

    n, m = x.shape[0], y.shape[0]
    kxx, kyy = gram(x, x), gram(y, y)
    off = lambda k, size: (jnp.sum(k) - jnp.trace(k)) / (size * (size - 1))
    return off(kxx, n) + off(kyy, m) - 2 * jnp.mean(gram(x, y))


def median_bandwidth(x: np.ndarray) -> float:
    """The median pairwise distance of (at most 1000 of) the points ``x`` ``(n, dim)``."""
    x = np.asarray(x[:1000], np.float64)
    d = np.sqrt(np.maximum(((x[:, None] - x[None]) ** 2).sum(-1), 0.0))
    return float(np.median(d[np.triu_indices(len(x), 1)]))


def mean_ci(values, level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t confidence interval."""
    v = np.asarray(values, np.float64)
    if v.size < 2:
        return float(v.mean()), float("nan")
    half = stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean()), float(half)


# ---------------------------------------------------------------------------------------------
# The cells
# ---------------------------------------------------------------------------------------------
# At t = 0 every SDE's marginal is the data distribution; any SDE serves to evaluate log p_0.
_ANY_SDE = sde_lib.VPSDE()


class Truth:
    """Exact reference samples per seed, projection directions and the MMD bandwidth of one dimension."""

    def __init__(self, config, dim: int):
        self.dim, self.dist = dim, make_mixture(dim)
        base = jax.random.fold_in(jax.random.PRNGKey(config.seed), dim)
        n = config.tables.num_samples
        self.sample_keys = [jax.random.fold_in(base, 2 * s) for s in range(config.tables.seeds)]
        self.references = [self.dist.sample(jax.random.fold_in(base, 2 * s + 1), n) for s in range(config.tables.seeds)]
        direction_key = jax.random.fold_in(base, 2 * config.tables.seeds)
        self.directions = random_directions(direction_key, config.tables.projections, dim)
        self.bandwidth = median_bandwidth(np.asarray(self.references[0]))
        self.mmd_points = config.tables.mmd_points
        zero = jnp.zeros(n)
        self.ref_logp = [float(jnp.mean(self.dist.log_prob(_ANY_SDE, r, zero))) for r in self.references]

    def distances(self, seed: int, samples: jax.Array) -> dict:
        """SW, MMD² and Δlog p of ``samples`` ``(n, dim)`` against seed ``seed``'s exact sample."""
        ref = self.references[seed]
        logp = self.dist.log_prob(_ANY_SDE, samples, jnp.zeros(samples.shape[0]))
        # MMD² costs n² kernel evaluations: on the first mmd_points of each set only.
        k = self.mmd_points
        return {"sw": float(sliced_wasserstein(samples, ref, self.directions)),
                "mmd2": float(mmd2(samples[:k], ref[:k], jnp.float32(self.bandwidth))),
                "dlogp": float(jnp.mean(logp)) - self.ref_logp[seed]}


def _finite(x: jax.Array) -> bool:
    return bool(jnp.all(jnp.isfinite(x)))


def sampler_cell(config, truth: Truth, sde_name: str, predictor: str, sampler: Sampler) -> dict:
    """One Table 1 cell: per-seed distances of ``num_samples`` samples (see the module docstring)."""
    sde, eps = make_sde(config, sde_name, sampler.num_scales)
    n = config.tables.num_samples
    if predictor == EXACT:
        draws = [truth.dist.sample(key, n) for key in truth.sample_keys]
    else:
        pred_name, probability_flow = PREDICTORS.get(predictor, (None, False))
        sampler_fn = sampling.get_score_pc_sampler(
            sde, truth.dist.score_fn(sde), (n, truth.dim),
            sampling.get_predictor(pred_name) if sampler.predictor else None,
            sampling.get_corrector("langevin") if sampler.corrector_steps else None,
            snr=config.tables.snr, n_steps=max(sampler.corrector_steps, 1),
            probability_flow=probability_flow, denoise=True, eps=eps)
        draws = [sampler_fn(key)[0] for key in truth.sample_keys]
    per_seed = {"sw": [], "mmd2": [], "dlogp": [], "diverged": 0}
    for seed, x in enumerate(draws):
        if not _finite(x):
            per_seed["diverged"] += 1
            continue
        for key, value in truth.distances(seed, x).items():
            per_seed[key].append(value)
    cell = {"nfe": 0 if predictor == EXACT else sampler.nfe, **per_seed}
    if truth.dim == 2 and _finite(draws[0]):
        cell["preview"] = np.round(np.asarray(draws[0][:PREVIEW_POINTS]), 3).tolist()
    return cell


def likelihood_cell(config, dim: int, sde_name: str) -> dict:
    """Bits/dim of the exact-score probability-flow ODE beside the exact NLL, per data point.

    All in bits/dim of the continuous data (no dequantisation offset): ``ode`` the ODE's value,
    ``exact`` = ``-log2 p_0(x) / D``, ``exact_eps`` = ``-log2 p_eps(x) / D`` (what the flow from
    ``eps`` computes), ``prior`` the prior-mismatch term ``(log π(z) - log p_T(z)) / (D ln 2)``
    that the ODE adds, and ``solver`` = ``ode - exact_eps - prior`` (zero but for the solver).
    """
    dist = make_mixture(dim)
    sde, _ = make_sde(config, sde_name, 1000)
    t = config.tables
    eps = 1e-5
    fn = jax.jit(likelihood.get_likelihood_fn_from_score(
        sde, dist.score_fn(sde), hutchinson_type="exact", rtol=t.likelihood_rtol, atol=t.likelihood_atol,
        eps=eps, solver="jax"))
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), dim)
    x = dist.sample(key, t.likelihood_points)
    bpd, z, nfe = fn(key, x)
    offset = likelihood.bpd_offset(lambda v: v)
    per_dim = dim * math.log(2)
    n = x.shape[0]
    ode = np.asarray(bpd) - offset
    exact = -np.asarray(dist.log_prob(sde, x, jnp.zeros(n))) / per_dim
    exact_eps = -np.asarray(dist.log_prob(sde, x, jnp.full(n, eps))) / per_dim
    prior = (np.asarray(dist.log_prob(sde, z, jnp.full(n, sde.T))) - np.asarray(sde.prior_logp(z))) / per_dim
    return {"ode": ode.tolist(), "exact": exact.tolist(), "exact_eps": exact_eps.tolist(),
            "prior": prior.tolist(), "solver": (ode - exact_eps - prior).tolist(), "nfe": int(nfe)}


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------
def _fingerprint(config) -> dict:
    fp = {f: config.tables[f] for f in FINGERPRINT_FIELDS}
    fp.update(seed=config.seed, model={k: config.model[k] for k in ("sigma_min", "sigma_max", "beta_min", "beta_max")})
    return json.loads(json.dumps(fp))


def _load_store(path: str, fingerprint: dict) -> dict:
    if not os.path.exists(path):
        return {"fingerprint": fingerprint, "sampler": {}, "likelihood": {}}
    with open(path) as f:
        store = json.load(f)
    if store.get("fingerprint") != fingerprint:
        diffs = [f"{k}: {store.get('fingerprint', {}).get(k)!r} there, {v!r} now" for k, v in fingerprint.items()
                 if store.get("fingerprint", {}).get(k) != v]
        raise TablesError(f"{path} holds cells computed with another config ({'; '.join(diffs)}). Use another "
                          "--workdir, or delete that file to recompute; nothing was overwritten.")
    return store


def _save_store(path: str, store: dict) -> None:
    """Write atomically, so that a kill never leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(store, f)
    os.replace(tmp, path)


def sampler_key(dim: int, sde_name: str, predictor: str, sampler: str) -> str:
    return f"d{dim}/{sde_name}/{predictor}/{sampler}"


def planned_cells(config) -> list[tuple]:
    """Every ``(table, key, args)`` the config asks for, in the order they are computed."""
    t = config.tables
    cells = []
    if "sampler" in t.which:
        samplers = [parse_sampler(s) for s in t.samplers]
        for dim in t.dims:
            for sde_name in t.sdes:
                cells.append(("sampler", sampler_key(dim, sde_name, EXACT, "-"), (dim, sde_name, EXACT, samplers[0])))
                for s in samplers:
                    predictors = [CORRECTOR_ONLY] if not s.predictor else list(t.predictors)
                    for p in predictors:
                        if p == "ancestral_sampling" and sde_name == "subvpsde":
                            continue  # not defined for sub-VP (sampling.AncestralSamplingPredictor)
                        cells.append(("sampler", sampler_key(dim, sde_name, p, s.name), (dim, sde_name, p, s)))
    if "likelihood" in t.which:
        for dim in t.dims:
            for sde_name in t.sdes:
                cells.append(("likelihood", f"d{dim}/{sde_name}", (dim, sde_name)))
    return cells


def run(config, workdir: str) -> dict:
    """Compute the missing cells, then write ``tables.json``, ``tables.md`` and the plots; returns the store.

    Everything that can fail for a bad config, a foreign ``tables.json`` or an evaluation
    workdir of another model fails before anything is written.
    """
    from score_sde import tables_report  # it reads this module's names

    check_config(config)
    paper = paper_results.load_paper() if "paper" in config.tables.which else None
    ours = paper_results.measure_all(paper, config.tables.eval_root) if paper else {}
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "tables.json")
    store = _load_store(path, _fingerprint(config))
    handler = reporting.add_log_file(os.path.join(workdir, "tables_log.txt"))
    try:
        _compute(config, store, path)
        store["claims"] = tables_report.claims(config, store)
        _save_store(path, store)
        text = tables_report.markdown(config, store, paper, ours)
        with open(os.path.join(workdir, "tables.md"), "w") as f:
            f.write(text)
        tables_report.plots(config, store, workdir)
        print(text)
    finally:
        logging.getLogger().removeHandler(handler)
    return store


def _compute(config, store: dict, path: str) -> None:
    todo = [c for c in planned_cells(config) if c[1] not in store[c[0]]]
    total = len(planned_cells(config))
    done = total - len(todo)
    logging.info("tables: %d cells, %d stored, %d to compute", total, done, len(todo))
    progress = reporting.Progress(done, total)
    truths: dict = {}
    for table, key, args in todo:
        start = time.perf_counter()
        if table == "sampler":
            dim = args[0]
            if dim not in truths:
                truths[dim] = Truth(config, dim)
            store[table][key] = sampler_cell(config, truths[dim], *args[1:])
        else:
            store[table][key] = likelihood_cell(config, *args)
        _save_store(path, store)
        done += 1
        progress.update(done)
        logging.info("%s | %s %s done in %.1fs", progress.line(done), table, key, time.perf_counter() - start)
