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

Two more add the learning error of small trained networks (``models/mlp.py``, trained through
``run_lib``'s train step by :mod:`score_sde.mixture_training`), one per dimension × SDE × weighting
(λ = std², or likelihood weighting λ = g²):

* **trained_likelihood** — Table 2: bits/dim of each trained model beside the exact NLL of the same
  points, with a 95% interval over points, the Hutchinson probes' standard error and the spread over
  ODE tolerances.
* **trained_sampler** — Table 1's grid sampled with the trained (λ = std²) score.

The **paper** table puts the published CIFAR-10 numbers beside ours (:mod:`score_sde.paper_results`).
The **digits** stage (:mod:`score_sde.tables_digits`) adds Table 2's bits/dim and a digits-FD column on the
embedded digits, uniformly dequantised, with small models trained by ``run_lib.train``.

Resumable: every finished cell is stored in ``workdir/tables.json`` at once and never computed
again; a rerun (after a kill) computes only the missing cells. Files written::

    workdir/tables.json      every cell (per-seed values), the config it was made with, the claims
    workdir/tables.md        the tables, the claims section, the paper's tables with commands
    workdir/sampler_error.png, workdir/samples_2d.png, workdir/samples_2d_trained.png
    workdir/models/*.msgpack the trained models' EMA parameters
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

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

import likelihood
import sampling
import sde_lib
from configs.vp import gmm as gmm_config
from models import utils as mutils
from score_sde import mixture_training, paper_results, reporting
from score_sde.mixtures import make_mixture  # noqa: F401 (tables.make_mixture is public)
from score_sde.paper_results import TablesError

TABLES = ("sampler", "likelihood", "trained_sampler", "trained_likelihood", "paper", "digits")
TRAINED = ("trained_sampler", "trained_likelihood")
# Training weightings of the small models: λ = std² (the paper's default) and λ = g² (likelihood weighting).
WEIGHTINGS = ("plain", "likelihood")
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
# Fields of the trained tables, one fingerprint per group of cells they change: stores made before these
# tables existed stay usable, and new likelihood settings do not discard the trained models.
TRAINED_FINGERPRINT_FIELDS = {
    "train": ("train_steps", "train_batch_size", "train_width", "train_blocks", "train_lr"),
    "trained_sampler": ("trained_num_samples", "trained_seeds"),
    "trained_likelihood": ("nll_points", "nll_probes", "nll_tolerances")}
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
    for field in ("samplers", "trained_samplers"):
        for name in t[field]:
            try:
                parse_sampler(name)
            except ValueError as err:
                problems.append(str(err).replace("config.tables.samplers", f"config.tables.{field}"))
    problems += [f"config.tables.{field}: {d!r} is not a dimension >= 1"
                 for field in ("dims", "trained_dims") for d in t[field] if int(d) < 1]
    for field in ("seeds", "trained_seeds"):
        if t[field] < 2:
            problems.append(f"config.tables.{field} = {t[field]}: a confidence interval needs at least 2 seeds")
    if set(TRAINED) & set(t.which):
        if t.train_steps <= 0:
            problems.append(f"config.tables.train_steps = {t.train_steps}: use a positive number of steps")
        if t.nll_probes < 2:
            problems.append(f"config.tables.nll_probes = {t.nll_probes}: the Hutchinson error needs at least 2 probes")
        if not t.nll_tolerances:
            problems.append("config.tables.nll_tolerances is empty: give the ODE tolerances, the main one first")
    from score_sde import tables_digits  # it reads this module's names

    problems += tables_digits.check_config(config)
    if problems:
        raise TablesError("Invalid tables config:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------
# Data and SDEs
# ---------------------------------------------------------------------------------------------
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

    def __init__(self, config, dim: int, trained: bool = False):
        """``trained``: sized for the trained-score table (``trained_num_samples``, ``trained_seeds``)."""
        self.dim, self.dist = dim, make_mixture(dim)
        base = jax.random.fold_in(jax.random.PRNGKey(config.seed), dim)
        t = config.tables
        n, seeds = (t.trained_num_samples, t.trained_seeds) if trained else (t.num_samples, t.seeds)
        self.num_samples = n
        self.sample_keys = [jax.random.fold_in(base, 2 * s) for s in range(seeds)]
        self.references = [self.dist.sample(jax.random.fold_in(base, 2 * s + 1), n) for s in range(seeds)]
        direction_key = jax.random.fold_in(base, 2 * seeds)
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


def sampler_cell(config, truth: Truth, sde_name: str, predictor: str, sampler: Sampler,
                 score_for=None) -> dict:
    """One Table 1 cell: per-seed distances of ``truth.num_samples`` samples (see the module docstring).

    ``score_for(sde) -> score_fn(x (n, d), t (n,))``: the score to sample with; the exact one by default.
    """
    sde, eps = make_sde(config, sde_name, sampler.num_scales)
    n = truth.num_samples
    if predictor == EXACT:
        draws = [truth.dist.sample(key, n) for key in truth.sample_keys]
    else:
        pred_name, probability_flow = PREDICTORS.get(predictor, (None, False))
        sampler_fn = sampling.get_score_pc_sampler(
            sde, (score_for or truth.dist.score_fn)(sde), (n, truth.dim),
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
# Trained score models (the learning error)
# ---------------------------------------------------------------------------------------------
def model_config(config, dim: int, sde_name: str, weighting: str):
    """The GMM training config (``configs/vp/gmm.py``) of one small model, sized by ``config.tables``.

    Its SDE has ``config.model``'s parameters, the same as the exact-score cells.
    """
    t = config.tables
    mc = gmm_config.get_config(sde_name)
    mc.seed = config.seed
    mc.data.dim = mc.data.num_channels = dim
    for key in ("sigma_min", "sigma_max", "beta_min", "beta_max"):
        mc.model[key] = config.model[key]
    mc.model.nf, mc.model.num_res_blocks = t.train_width, t.train_blocks
    mc.training.batch_size = t.train_batch_size
    # One step per call: for a network this small, compiling 10 fused steps costs more than it saves.
    mc.training.n_jitted_steps = 1
    mc.training.likelihood_weighting = weighting == "likelihood"
    mc.optim.lr = t.train_lr
    return mc


def train_key(dim: int, sde_name: str, weighting: str) -> str:
    return f"d{dim}/{sde_name}/{weighting}"


def _model_file(workdir: str, key: str) -> str:
    return os.path.join(workdir, "models", key.replace("/", "_") + ".msgpack")


def train_cell(config, workdir: str, dim: int, sde_name: str, weighting: str) -> dict:
    """Train one small model (``mixture_training.train``), save its EMA parameters; the loss curve."""
    mc = model_config(config, dim, sde_name, weighting)
    key = train_key(dim, sde_name, weighting)
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed + 2), len(key) * 1000 + sum(map(ord, key)))
    _, params, history = mixture_training.train(mc, config.tables.train_steps, rng)
    path = _model_file(workdir, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(flax.serialization.to_bytes(params))
    os.replace(path + ".tmp", path)
    tail = max(1, len(history) // 10)
    return {"file": os.path.relpath(path, workdir), "steps": len(history),
            "loss_first": float(np.mean(history[:tail])), "loss_last": float(np.mean(history[-tail:])),
            "parameters": int(sum(np.size(p) for p in jax.tree_util.tree_leaves(params)))}


def load_trained(config, workdir: str, store: dict, dim: int, sde_name: str, weighting: str):
    """``(model, params)`` of a stored trained model."""
    mc = model_config(config, dim, sde_name, weighting)
    model, _, template = mutils.init_model(jax.random.PRNGKey(0), mc)
    with open(os.path.join(workdir, store["train"][train_key(dim, sde_name, weighting)]["file"]), "rb") as f:
        return model, flax.serialization.from_bytes(template, f.read())


def _likelihood_fn(cache: dict, config, model, dim: int, sde_name: str, tol: float):
    """``fn(params, rng, x) -> (bpd, z, nfe)``, compiled once per architecture, SDE and tolerance (the
    parameters are an argument, so both weightings' models share it)."""
    key = (dim, sde_name, tol)
    if key not in cache:
        sde, _ = make_sde(config, sde_name, 1000)

        def fn(params, rng, x):
            score = mixture_training.score_fn(sde, model, params, dim)
            # The constructor computes a constant (the dequantisation offset) with jnp: keep it out of the trace.
            with jax.ensure_compile_time_eval():
                solve = likelihood.get_likelihood_fn_from_score(
                    sde, score, hutchinson_type="Rademacher", rtol=tol, atol=tol, eps=1e-5, solver="jax")
            return solve(rng, x)

        cache[key] = jax.jit(fn)
    return cache[key]


def trained_likelihood_cell(config, model, params, dim: int, sde_name: str, cache: dict | None = None) -> dict:
    """Bits/dim of a trained model through the probability-flow ODE, with its three error bars.

    On ``nll_points`` fresh mixture points (the same for every model): ``ode`` per point, the mean
    over ``nll_probes`` Rademacher probes at the first tolerance of ``nll_tolerances``;
    ``probe_means`` the data-set mean of each probe (their spread is the Hutchinson error of the
    mean); ``tol_means`` the data-set mean at each tolerance (rtol = atol) with the first probe
    (their spread is the solver error); ``exact`` = ``-log2 p_0(x) / D`` of the same points.
    Continuous data: no dequantisation offset.
    """
    t = config.tables
    dist = make_mixture(dim)
    sde, _ = make_sde(config, sde_name, 1000)
    cache = {} if cache is None else cache
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 3), dim)
    x = dist.sample(key, t.nll_points)
    offset = likelihood.bpd_offset(lambda v: v)
    per_probe, tol_means, nfes = [], [], []
    for i, tol in enumerate(t.nll_tolerances):
        fn = _likelihood_fn(cache, config, model, dim, sde_name, tol)
        for probe in range(t.nll_probes if i == 0 else 1):
            bpd, _, nfe = fn(params, jax.random.fold_in(key, 1 + probe), x)
            bpd = np.asarray(bpd, np.float64) - offset
            if i == 0:
                per_probe.append(bpd)
            if probe == 0:
                tol_means.append(float(np.mean(bpd)))
                nfes.append(int(nfe))
    per_probe = np.stack(per_probe)
    exact = -np.asarray(dist.log_prob(sde, x, jnp.zeros(x.shape[0])), np.float64) / (dim * math.log(2))
    return {"ode": per_probe.mean(0).tolist(), "probe_means": per_probe.mean(1).tolist(),
            "probe_sd_per_point": float(np.mean(per_probe.std(0, ddof=1))) if len(per_probe) > 1 else float("nan"),
            "tolerances": list(t.nll_tolerances), "tol_means": tol_means, "nfe": nfes, "exact": exact.tolist()}


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------
def _fingerprint(config) -> dict:
    fp = {f: config.tables[f] for f in FINGERPRINT_FIELDS}
    fp.update(seed=config.seed, model={k: config.model[k] for k in ("sigma_min", "sigma_max", "beta_min", "beta_max")})
    return json.loads(json.dumps(fp))


def _trained_fingerprint(config, group: str) -> dict:
    return json.loads(json.dumps({f: config.tables[f] for f in TRAINED_FINGERPRINT_FIELDS[group]}))


def _refuse_if_different(path: str, stored: dict, fingerprint: dict) -> None:
    if stored != fingerprint:
        diffs = [f"{k}: {stored.get(k)!r} there, {v!r} now" for k, v in fingerprint.items() if stored.get(k) != v]
        raise TablesError(f"{path} holds cells computed with another config ({'; '.join(diffs)}). Use another "
                          "--workdir, or delete that file to recompute; nothing was overwritten.")


def _load_store(path: str, config) -> dict:
    """The stored cells, or an empty store; a store made with settings that change the numbers is refused.

    The trained tables' settings are checked per group (:data:`TRAINED_FINGERPRINT_FIELDS`) only when
    the config asks for a trained table and the store holds cells that depend on the group (the
    models: every trained cell), so a store made before those tables existed keeps its cells.
    """
    fingerprint = _fingerprint(config)
    store = {"fingerprint": fingerprint}
    if os.path.exists(path):
        with open(path) as f:
            store = json.load(f)
        _refuse_if_different(path, store.get("fingerprint", {}), fingerprint)
    if set(TRAINED) & set(config.tables.which):
        stored = store.setdefault("trained_fingerprints", {})
        for group in TRAINED_FINGERPRINT_FIELDS:
            dependent = ("train",) + TRAINED if group == "train" else (group,)
            if any(store.get(table) for table in dependent):
                _refuse_if_different(path, stored.get(group, {}), _trained_fingerprint(config, group))
            stored[group] = _trained_fingerprint(config, group)
    for table in ("sampler", "likelihood", "train") + TRAINED:
        store.setdefault(table, {})
    return store


def _save_store(path: str, store: dict) -> None:
    """Write atomically, so that a kill never leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(store, f)
    os.replace(tmp, path)


def sampler_key(dim: int, sde_name: str, predictor: str, sampler: str) -> str:
    return f"d{dim}/{sde_name}/{predictor}/{sampler}"


def _grid_cells(config, table: str, sampler_names, dims) -> list[tuple]:
    """Table 1's grid of ``table`` (``'sampler'`` or ``'trained_sampler'``): the exact-samples floor and every cell."""
    t = config.tables
    samplers = [parse_sampler(s) for s in sampler_names]
    cells = []
    for dim in dims:
        for sde_name in t.sdes:
            cells.append((table, sampler_key(dim, sde_name, EXACT, "-"), (dim, sde_name, EXACT, samplers[0])))
            for s in samplers:
                predictors = [CORRECTOR_ONLY] if not s.predictor else list(t.predictors)
                for p in predictors:
                    if p == "ancestral_sampling" and sde_name == "subvpsde":
                        continue  # not defined for sub-VP (sampling.AncestralSamplingPredictor)
                    cells.append((table, sampler_key(dim, sde_name, p, s.name), (dim, sde_name, p, s)))
    return cells


def planned_cells(config) -> list[tuple]:
    """Every ``(table, key, args)`` the config asks for, in the order they are computed.

    The trained models come first (``'train'`` cells: the trained-score sampler grid needs the
    ``plain`` ones, the trained likelihood table both weightings), then Table 2 before the
    trained sampler grid, the longest part.
    """
    t = config.tables
    cells = []
    if "sampler" in t.which:
        cells += _grid_cells(config, "sampler", t.samplers, t.dims)
    if "likelihood" in t.which:
        cells += [("likelihood", f"d{dim}/{s}", (dim, s)) for dim in t.dims for s in t.sdes]
    weightings = WEIGHTINGS if "trained_likelihood" in t.which else ("plain",) if "trained_sampler" in t.which else ()
    dims = t.trained_dims
    cells += [("train", train_key(dim, s, w), (dim, s, w)) for dim in dims for s in t.sdes for w in weightings]
    if "trained_likelihood" in t.which:
        cells += [("trained_likelihood", train_key(dim, s, w), (dim, s, w))
                  for dim in dims for s in t.sdes for w in WEIGHTINGS]
    if "trained_sampler" in t.which:
        cells += _grid_cells(config, "trained_sampler", t.trained_samplers, dims)
    return cells


def run(config, workdir: str) -> dict:
    """Compute the missing cells, then write ``tables.json``, ``tables.md`` and the plots; returns the store.

    Everything that can fail for a bad config, a foreign ``tables.json`` or an evaluation
    workdir of another model fails before anything is written.
    """
    from score_sde import tables_digits, tables_report  # they read this module's names

    check_config(config)
    paper = paper_results.load_paper() if "paper" in config.tables.which else None
    ours = paper_results.measure_all(paper, config.tables.eval_root) if paper else {}
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "tables.json")
    store = _load_store(path, config)
    if "digits" in config.tables.which:
        tables_digits.prepare_store(config, store, path)
    handler = reporting.add_log_file(os.path.join(workdir, "tables_log.txt"))
    try:
        _compute(config, store, path, workdir)
        if "digits" in config.tables.which:
            tables_digits.compute(config, store, lambda s: _save_store(path, s), workdir)
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


def _compute(config, store: dict, path: str, workdir: str) -> None:
    todo = [c for c in planned_cells(config) if c[1] not in store[c[0]]]
    total = len(planned_cells(config))
    done = total - len(todo)
    logging.info("tables: %d cells, %d stored, %d to compute", total, done, len(todo))
    progress = reporting.Progress(done, total)
    truths: dict = {}
    models: dict = {}
    likelihood_fns: dict = {}

    def trained(dim, sde_name, weighting):
        if (dim, sde_name, weighting) not in models:
            models[dim, sde_name, weighting] = load_trained(config, workdir, store, dim, sde_name, weighting)
        return models[dim, sde_name, weighting]

    for table, key, args in todo:
        start = time.perf_counter()
        if table in ("sampler", "trained_sampler"):
            dim, sde_name = args[:2]
            is_trained = table == "trained_sampler"
            if (dim, is_trained) not in truths:
                truths[dim, is_trained] = Truth(config, dim, trained=is_trained)
            kwargs = {}
            if is_trained:
                model, params = trained(dim, sde_name, "plain")
                kwargs["score_for"] = lambda sde, m=model, p=params, d=dim: mixture_training.score_fn(sde, m, p, d)
            store[table][key] = sampler_cell(config, truths[dim, is_trained], *args[1:], **kwargs)
        elif table == "train":
            store[table][key] = train_cell(config, workdir, *args)
        elif table == "trained_likelihood":
            store[table][key] = trained_likelihood_cell(config, *trained(*args), *args[:2], cache=likelihood_fns)
        else:
            store[table][key] = likelihood_cell(config, *args)
        _save_store(path, store)
        done += 1
        progress.update(done)
        logging.info("%s | %s %s done in %.1fs", progress.line(done), table, key, time.perf_counter() - start)
