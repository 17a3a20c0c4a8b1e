"""The digits stage of ``--mode tables`` (``'digits'`` in ``config.tables.which``): Table 2 and an FID column.

On the embedded 8×8 digits (``config.data.dataset = 'DIGITS'``, uniformly dequantised: the paper's
setting), with small score models trained by ``run_lib.train``:

* **models** — ``configs/{ve,vp,subvp}/digits.py`` with the network replaced by ``models/mlp.py`` (a
  residual MLP on the flattened 64 pixels; the DDPM++ of those configs costs ~50x more CPU per step),
  ``digits_train_steps`` steps on dequantised training digits, with λ = std² (``plain``) or likelihood
  weighting λ = g² (``likelihood``). Each is a ``run_lib`` workdir ``workdir/digits/<sde>_<weighting>/``,
  so a killed run resumes its training from the last preemption checkpoint.
* **bits/dim** (Table 2) — probability-flow ODE bits/dim (``likelihood.get_likelihood_fn``, the function of
  ``--mode eval``) on the first ``digits_nll_points`` test digits, each dequantised once with fixed noise:
  per point the mean over ``digits_nll_probes`` Rademacher probes at the first of ``digits_nll_tolerances``;
  the data-set mean of each probe (their spread: the Hutchinson error) and at each tolerance with the first
  probe (their spread: the solver error). There is no exact NLL of the digits to set beside them.
* **digits-FD** (the FID column; :mod:`score_sde.digits_fd`, not FID) — ``digits_num_samples`` samples of the
  ``plain`` models with each predictor of ``digits_predictors`` × sampler of ``digits_samplers`` (Table 1's
  names, :func:`score_sde.tables.parse_sampler`) against the 297 test digits, with a 95 % bootstrap interval
  (``digits_bootstrap`` resamples; every cell resamples the test digits with the same indices, so differences
  are paired); the floor: as many real training digits against the same test digits.

Cells live in ``tables.json`` under ``'digits'`` (``train`` / ``nll`` / ``fd``), each group with its own
fingerprint of the settings that change its numbers (:data:`FINGERPRINT_FIELDS`), checked only once it holds
cells: the mixture tables' store and this stage's never invalidate each other.
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np

import likelihood
import run_lib
import sampling
import sde_lib
from configs.subvp import digits as subvp_digits
from configs.ve import digits as ve_digits
from configs.vp import digits as vp_digits
from models import utils as mutils
from score_sde import datasets, digits_fd, eval_records, parallel, reporting
from score_sde import tables as T
from score_sde.paper_results import TablesError

TABLE = "digits"
CONFIGS = {"vesde": ve_digits, "vpsde": vp_digits, "subvpsde": subvp_digits}
FLOOR = "real_digits"
PREVIEW = 8  # samples kept per cell for the plot
FINGERPRINT_FIELDS = {
    "train": ("digits_train_steps", "digits_batch_size", "digits_width", "digits_blocks", "digits_lr"),
    "nll": ("digits_nll_points", "digits_nll_probes", "digits_nll_tolerances"),
    "fd": ("digits_num_samples", "digits_bootstrap", "snr")}


def check_config(config) -> list[str]:
    """Problems of the ``config.tables.digits_*`` fields (empty when fine, or when the stage is off)."""
    t = config.tables
    if TABLE not in t.which:
        return []
    problems = [f"config.tables.digits_sdes: unknown SDE {s!r}; use some of {tuple(CONFIGS)}"
                for s in t.digits_sdes if s not in CONFIGS]
    problems += [f"config.tables.digits_predictors: unknown predictor {p!r}; use some of {tuple(T.PREDICTORS)}"
                 for p in t.digits_predictors if p not in T.PREDICTORS]
    for name in t.digits_samplers:
        try:
            T.parse_sampler(name)
        except TablesError as err:
            problems.append(str(err).replace("config.tables.samplers", "config.tables.digits_samplers"))
    if t.digits_train_steps <= 0 or t.digits_train_steps % 5:
        problems.append(f"config.tables.digits_train_steps = {t.digits_train_steps}: use a positive multiple of 5 "
                        "(the digits configs fuse 5 steps per call)")
    if not 2 <= t.digits_nll_points <= datasets.DIGITS_NUM_EVAL:
        problems.append(f"config.tables.digits_nll_points = {t.digits_nll_points}: use 2 to "
                        f"{datasets.DIGITS_NUM_EVAL} (the test digits)")
    if t.digits_nll_probes < 2:
        problems.append(f"config.tables.digits_nll_probes = {t.digits_nll_probes}: the Hutchinson error needs "
                        "at least 2 probes")
    if not t.digits_nll_tolerances:
        problems.append("config.tables.digits_nll_tolerances is empty: give the ODE tolerances, the main one first")
    if t.digits_num_samples < 2 or t.digits_bootstrap < 10:
        problems.append(f"config.tables.digits_num_samples = {t.digits_num_samples}, digits_bootstrap = "
                        f"{t.digits_bootstrap}: use at least 2 samples and 10 bootstrap resamples")
    return problems


# ---------------------------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------------------------
def _fingerprint(config, group: str) -> dict:
    fp = {f: config.tables[f] for f in FINGERPRINT_FIELDS[group]}
    return json.loads(json.dumps({**fp, "seed": config.seed}))


def prepare_store(config, store: dict, path: str) -> None:
    """Add the digits groups to ``store`` (in place); refuse a store whose digits cells used other settings.

    Raises:
        TablesError: naming the differing fields; nothing is written.
    """
    cells = store.setdefault(TABLE, {})
    stored = store.setdefault("digits_fingerprints", {})
    for group in FINGERPRINT_FIELDS:
        now = _fingerprint(config, group)
        # The models feed every other group: their settings are checked whenever any digits cell exists.
        dependent = any(cells.get(g) for g in FINGERPRINT_FIELDS) if group == "train" else cells.get(group)
        if dependent and stored.get(group) != now:
            old = stored.get(group, {})
            diffs = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in now.items() if old.get(k) != v]
            raise TablesError(f"{path} holds digits cells computed with other config.tables settings "
                              f"({'; '.join(diffs)}). Use another --workdir, or delete that file's 'digits' entry "
                              "to recompute them; nothing was overwritten.")
        stored[group] = now
        cells.setdefault(group, {})


def model_key(sde_name: str, weighting: str) -> str:
    return f"{sde_name}/{weighting}"


def fd_key(sde_name: str, predictor: str, sampler: str) -> str:
    return f"{sde_name}/{predictor}/{sampler}"


def planned_cells(config) -> list[tuple]:
    """Every ``(group, key, args)``: the models, their bits/dim, the real-digits floor, the sampled cells."""
    t = config.tables
    sdes = list(t.digits_sdes)
    cells = [("train", model_key(s, w), (s, w)) for s in sdes for w in T.WEIGHTINGS]
    cells += [("nll", model_key(s, w), (s, w)) for s in sdes for w in T.WEIGHTINGS]
    cells.append(("fd", FLOOR, ()))
    for s in sdes:
        for name in t.digits_samplers:
            sampler = T.parse_sampler(name)
            predictors = [T.CORRECTOR_ONLY] if not sampler.predictor else list(t.digits_predictors)
            cells += [("fd", fd_key(s, p, name), (s, p, sampler)) for p in predictors
                      if not (p == "ancestral_sampling" and s == "subvpsde")]
    return cells


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def model_config(config, sde_name: str, weighting: str):
    """``configs/<sde>/digits.py`` with the ``mlp`` network and ``config.tables.digits_*``'s training settings."""
    t = config.tables
    mc = CONFIGS[sde_name].get_config()
    mc.seed = config.seed
    mc.model.name = "mlp"
    mc.model.nf, mc.model.num_res_blocks = t.digits_width, t.digits_blocks
    tr = mc.training
    tr.n_iters = tr.snapshot_freq = t.digits_train_steps
    # The committed tables were trained with 5 fused steps per call (the digits default until 2026-12); the
    # step order of the random keys depends on it, so it stays fixed here.
    tr.n_jitted_steps = 5
    # A preemption checkpoint every quarter of the run (a multiple of the 5 fused steps); no evaluation
    # loss during training (its compilation would cost more than the training of a small model).
    tr.snapshot_freq_for_preemption = max(5, t.digits_train_steps // 20 * 5)
    tr.log_freq = tr.snapshot_freq_for_preemption
    tr.eval_freq = 10 ** 9
    tr.snapshot_sampling = False
    tr.batch_size = t.digits_batch_size
    tr.likelihood_weighting = weighting == "likelihood"
    mc.data.uniform_dequantization = True
    mc.optim.lr = t.digits_lr
    return mc


def model_dir(workdir: str, sde_name: str, weighting: str) -> str:
    return os.path.join(workdir, TABLE, f"{sde_name}_{weighting}")


def train_model(config, workdir: str, sde_name: str, weighting: str):
    """``(model config, model, state)`` after ``run_lib.train`` (resumes; trains nothing once finished)."""
    mc = model_config(config, sde_name, weighting)
    state = run_lib.train(mc, model_dir(workdir, sde_name, weighting))
    model = mutils.create_model(mc)
    return mc, model, state


def train_cell(mc, state) -> dict:
    return {"steps": int(state.step), "parameters": int(sum(np.size(p) for p in jax.tree_util.tree_leaves(
        state.params_ema))), "network": f"mlp (width {mc.model.nf}, {mc.model.num_res_blocks} blocks)",
        "sde": {k: mc.model[k] for k in ("sigma_min", "sigma_max", "beta_min", "beta_max")}}


# ---------------------------------------------------------------------------------------------
# Bits/dim
# ---------------------------------------------------------------------------------------------
def _test_images() -> np.ndarray:
    """The held-out digits ``(297, 8, 8, 1)`` uint8 (``datasets.get_dataset``'s test split)."""
    return datasets.load_digits()[0][-datasets.DIGITS_NUM_EVAL:]


def nll_cell(config, mc, model, state, cache: dict) -> dict:
    """Bits/dim of one model on ``digits_nll_points`` dequantised test digits, with its three error bars.

    ``ode`` per point (mean over probes, first tolerance); ``probe_means`` the data-set mean of each probe;
    ``tol_means`` the data-set mean at each tolerance (first probe); ``nfe`` per tolerance. Bits/dim of
    8-bit data (the dequantisation offset included), as ``--mode eval``.
    """
    t = config.tables
    sde, _ = sde_lib.get_sde(mc)
    x = eval_records.dequantize(_test_images()[:t.digits_nll_points], (config.seed, 7))
    batch = datasets.get_data_scaler(mc)(x)[None]
    pstate = parallel.replicate(state)
    rng = jax.random.PRNGKey(config.seed + 7)
    per_probe, tol_means, nfes = [], [], []
    for i, tol in enumerate(t.digits_nll_tolerances):
        key = (mc.training.sde, tol)  # the parameters are an argument: both weightings share one compilation
        if key not in cache:
            cache[key] = likelihood.get_likelihood_fn(sde, model, datasets.get_data_inverse_scaler(mc),
                                                      rtol=tol, atol=tol, solver="jax")
        for probe in range(t.digits_nll_probes if i == 0 else 1):
            keys = jax.random.split(jax.random.fold_in(rng, probe), parallel.local_device_count())
            bpd, _, nfe = cache[key](keys, pstate, batch)
            bpd = np.asarray(bpd, np.float64).reshape(-1)
            if i == 0:
                per_probe.append(bpd)
            if probe == 0:
                tol_means.append(float(bpd.mean()))
                nfes.append(int(nfe))
    per_probe = np.stack(per_probe)
    return {"ode": per_probe.mean(0).tolist(), "probe_means": per_probe.mean(1).tolist(),
            "tolerances": list(t.digits_nll_tolerances), "tol_means": tol_means, "nfe": nfes}


# ---------------------------------------------------------------------------------------------
# digits-FD
# ---------------------------------------------------------------------------------------------
class Reference:
    """Features of the test digits and the test-set resample indices shared by every cell."""

    def __init__(self, config):
        t = config.tables
        self.features = digits_fd.features(_test_images().astype(np.float32) / 255.0)
        self.test_idx = np.random.RandomState(config.seed).randint(
            0, len(self.features), (t.digits_bootstrap, len(self.features)))
        self.bootstrap = t.digits_bootstrap

    def cell(self, images: np.ndarray, key: str, nfe: int, seconds: float) -> dict:
        """digits-FD of ``images`` ``(N, 8, 8, 1)`` in [0, 1] against the test digits, with its interval."""
        rs = np.random.RandomState(sum(map(ord, key)))
        fd, lo, hi, boot = digits_fd.bootstrap_fd(digits_fd.features(images), self.features, rs, self.bootstrap,
                                                  self.test_idx)
        preview = np.round(np.asarray(images[:PREVIEW]).reshape(-1, 64) * 255).astype(int).tolist()
        return {"fd": float(fd), "ci95": [lo, hi], "boot": np.round(boot, 4).tolist(), "nfe": int(nfe),
                "num_samples": int(len(images)), "seconds": round(seconds, 1), "preview": preview}


def floor_cell(config, reference: Reference) -> dict:
    """``digits_num_samples`` real training digits against the test digits: the floor at this sample size."""
    images = datasets.load_digits()[0][:-datasets.DIGITS_NUM_EVAL]
    pick = np.random.RandomState(config.seed).choice(len(images), config.tables.digits_num_samples, replace=False)
    return reference.cell(images[pick].astype(np.float32) / 255.0, FLOOR, 0, 0.0)


def fd_cell(config, mc, model, state, predictor: str, sampler: T.Sampler, reference: Reference, key: str) -> dict:
    """digits-FD of ``digits_num_samples`` samples of one sampler (Table 1's names) from a trained model."""
    mc = mc.copy_and_resolve_references()
    mc.model.num_scales = sampler.num_scales
    sde, eps = sde_lib.get_sde(mc)
    score = mutils.get_score_fn(sde, model, state.params_ema, state.model_state, train=False, continuous=True)
    pred_name, probability_flow = T.PREDICTORS.get(predictor, (None, False))
    shape = (config.tables.digits_num_samples, 8, 8, 1)
    fn = sampling.get_score_pc_sampler(
        sde, score, shape, sampling.get_predictor(pred_name) if sampler.predictor else None,
        sampling.get_corrector("langevin") if sampler.corrector_steps else None,
        datasets.get_data_inverse_scaler(mc), snr=config.tables.snr, n_steps=max(sampler.corrector_steps, 1),
        probability_flow=probability_flow, denoise=True, eps=eps)
    start = time.perf_counter()
    x, nfe = fn(jax.random.fold_in(jax.random.PRNGKey(config.seed + 8), sum(map(ord, key))))
    x = np.asarray(x)
    seconds = time.perf_counter() - start
    diverged = int(np.sum(~np.all(np.isfinite(x.reshape(len(x), -1)), axis=1)))
    x = np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0)  # non-finite samples count as blank, and are reported
    return {**reference.cell(x, key, nfe, seconds), "diverged": diverged}


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def compute(config, store: dict, save, workdir: str) -> None:
    """Compute the missing digits cells of ``store`` (saved after each with ``save(store)``)."""
    cells = store[TABLE]
    plan = planned_cells(config)
    todo = [c for c in plan if c[1] not in cells[c[0]]]
    done = len(plan) - len(todo)
    logging.info("tables digits: %d cells, %d stored, %d to compute", len(plan), done, len(todo))
    progress = reporting.Progress(done, len(plan))
    models: dict = {}
    nll_fns: dict = {}
    reference = None

    def trained(sde_name, weighting):
        if (sde_name, weighting) not in models:
            models[sde_name, weighting] = train_model(config, workdir, sde_name, weighting)
        return models[sde_name, weighting]

    for group, key, args in todo:
        start = time.perf_counter()
        if group == "train":
            mc, _, state = trained(*args)
            cells[group][key] = {**train_cell(mc, state), "seconds": round(time.perf_counter() - start, 1)}
        elif group == "nll":
            cells[group][key] = nll_cell(config, *trained(*args), cache=nll_fns)
        else:
            reference = reference or Reference(config)
            if key == FLOOR:
                cells[group][key] = floor_cell(config, reference)
            else:
                sde_name, predictor, sampler = args
                cells[group][key] = fd_cell(config, *trained(sde_name, "plain"), predictor, sampler, reference, key)
        save(store)
        done += 1
        progress.update(done)
        logging.info("%s | digits %s %s done in %.1fs", progress.line(done), group, key, time.perf_counter() - start)
