"""Variational dequantisation (score_flow's ``--mode train_deq``, and bits/dim under it in ``--mode eval``).

The Flow++ dequantiser ``q(u | x)`` (``models/flowpp``) is trained against a fixed, trained score model by
minimising the variational bound on the negative log-likelihood of 8-bit images ``x`` (values k / 255):

    -log P(x) <= E_q[-log p((255 x + u) / 256) + log q(u | x)] + D log 256,

with ``-log p`` itself replaced by the score model's bound (``bound_likelihood``, one importance-sampled
time per image as score_flow; ``config.deq.offset``: its ``p_eps -> p_0`` term). Uniform noise
``u ~ U[0, 1)^D`` is the special case ``log q = 0``, the default everywhere.

Files: ``<workdir>/flowpp_dequantizer/checkpoints/checkpoint_<n>`` and ``.../checkpoints-meta/`` (score_flow's
folder names), the score model read from ``<workdir>/checkpoints/checkpoint_<config.deq.score_ckpt>``.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers

import bound_likelihood
import losses
import sde_lib
from models import utils as mutils
from models.flowpp import dequantizer as flowpp
from score_sde import checkpoints, datasets, job_lock, parallel, reporting, train_checkpoints, train_steps
from score_sde import workdir_config

# score_flow's --deq_folder default.
DEQ_FOLDER = "flowpp_dequantizer"


class DequantizerError(ValueError):
    """The dequantiser cannot be trained or used; the message says what is missing and what to do."""


def _check_config(config) -> None:
    if "deq" not in config:
        raise DequantizerError("The config has no deq section (the Flow++ dequantiser's fields): use a config "
                               "built on configs/score_flow/default_cifar10_configs.py or configs/vp/digits.py.")


def score_checkpoint(config, workdir: str) -> str:
    """The score model's checkpoint: number ``config.deq.score_ckpt``, or the newest numbered one if that is 0."""
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    number = config.deq.score_ckpt
    path = (os.path.join(checkpoint_dir, f"{checkpoints.PREFIX}{number}") if number
            else checkpoints.latest_checkpoint(checkpoint_dir))
    if path is None or not os.path.exists(path):
        which = f"checkpoint_{number}" if number else "numbered checkpoint"
        raise DequantizerError(
            f"The dequantiser is trained against a trained score model, but {checkpoint_dir} has no {which}. Train "
            "the score model first (--mode train with the same --workdir), or set config.deq.score_ckpt to the "
            "number of one of its checkpoints (0: the newest).")
    return path


def _load_score_model(config, workdir: str):
    """``(sde, score_model, state, path)``: the score model of ``workdir`` restored from :func:`score_checkpoint`."""
    path = score_checkpoint(config, workdir)
    score_model, template = train_checkpoints.eval_state_template(config, jax.random.PRNGKey(config.seed))
    state = checkpoints.restore_checkpoint(path, template)
    return sde_lib.get_sde(config)[0], score_model, state, path


def get_dequantized_bpd_fn(config, sde: sde_lib.SDE, score_model, deq_model: nn.Module,
                           train: bool) -> Callable:
    """``bpd_fn(rng, deq_params, score_state, images) -> (batch,)``: the bound on bits/dim under ``q``.

    ``images`` (B, H, W, C) in [0, 1] (k / 255). One sample of ``u ~ q(· | x)`` and of the score bound
    per image (dropout in ``q`` when ``train``); ``E[bpd_fn]`` upper-bounds -log2 P(x) / D.
    """
    scaler = datasets.get_data_scaler(config)
    offset_bpd = bound_likelihood.bpd_offset(datasets.get_data_inverse_scaler(config))
    eps = config.training.get("smallest_time", 1e-5)
    importance = hasattr(sde, "sample_importance_weighted_time_for_likelihood")  # VE has none: uniform time

    def bpd_fn(rng, deq_params, score_state, images):
        score_fn = mutils.get_score_fn(sde, score_model, score_state.params_ema, score_state.model_state,
                                       train=False, continuous=True)
        # The bound's nats, built here because the score function depends on the traced score state.
        nats_fn = bound_likelihood._bound_nats_fn(sde, score_fn, "Rademacher", True, eps, 1, importance,  # noqa: SLF001
                                                  config.deq.offset)
        rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        u, neg_log_q = deq_model.apply({"params": deq_params}, jax.random.normal(noise_rng, images.shape), images,
                                       train=train, rngs={"dropout": dropout_rng})
        nats = nats_fn(rng, scaler((images * 255.0 + u) / 256.0)) - neg_log_q
        return nats / (np.log(2) * np.prod(images.shape[1:])) + offset_bpd

    return bpd_fn


def _make_steps(config, sde, score_model, deq_model) -> tuple[Callable, Callable]:
    """Pmapped ``p_step((keys, deq_pstate), score_pstate, batch) -> ((keys, deq_pstate), (devices, n, 2))``.

    ``batch['image']`` (devices, n, B, H, W, C) in [0, 1]; ``n`` steps fused (``train_steps.fuse_steps``); each
    returns ``(loss, bpd)``, the loss being the bits/dim in nats per image (the scale score_flow optimises,
    which its gradient clipping acts on). The train step updates ``params`` and their EMA (rate
    ``config.deq.ema_rate``); the eval step scores ``params_ema`` and changes nothing.
    """
    optimize_fn = losses.optimization_manager(config)
    dim = config.data.image_size ** 2 * config.data.num_channels

    bpd_fns = {train: get_dequantized_bpd_fn(config, sde, score_model, deq_model, train) for train in (True, False)}

    def make_step(score_state, train):
        bpd_fn = bpd_fns[train]

        def loss_fn(rng, params, images):
            bpd = jnp.mean(bpd_fn(rng, params, score_state, images))
            return bpd * np.log(2) * dim, bpd

        def step_fn(carry, batch):
            rng, state = carry
            rng, step_rng = jax.random.split(rng)
            if train:
                (loss, bpd), grad = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
                    step_rng, state.params, batch["image"])
                new_params, new_opt_state = optimize_fn(state, parallel.pmean(grad))
                new_ema = jax.tree_util.tree_map(lambda e, p: e * state.ema_rate + p * (1.0 - state.ema_rate),
                                                 state.params_ema, new_params)
                state = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state,
                                      params_ema=new_ema)
            else:
                loss, bpd = loss_fn(step_rng, state.params_ema, batch["image"])
            return (rng, state), parallel.pmean(jnp.stack([loss, bpd]))

        return step_fn

    how = train_steps.config_fusion(config)

    def p_step(train):
        return lambda carry, score_state, batch: train_steps.fuse_steps(make_step(score_state, train), how)(carry,
                                                                                                            batch)

    return (parallel.pmap(p_step(True), donate_argnums=(0,)), parallel.pmap(p_step(False)))


def _state(config, params, rng) -> mutils.State:
    """A fresh training state of the dequantiser (``model_state`` empty, EMA rate ``config.deq.ema_rate``)."""
    return mutils.State(step=0, params=params, opt_state=losses.get_optimizer(config).init(params), lr=config.optim.lr,
                        model_state={}, ema_rate=config.deq.ema_rate, params_ema=params, rng=rng)


def state_template(config) -> mutils.State:
    """Zeros shaped like the dequantiser state of ``config`` (traced only, nothing compiled): the target that
    ``checkpoints.restore_checkpoint`` fills, from our checkpoints or score_flow's ``DeqState`` files."""
    model = flowpp.create_dequantizer(config)
    zeros = jnp.zeros((1, config.data.image_size, config.data.image_size, config.data.num_channels))
    shapes = jax.eval_shape(lambda: _state(config, model.init(jax.random.PRNGKey(0), zeros, zeros)["params"],
                                           jax.random.PRNGKey(0)))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def train_deq(config, workdir: str) -> mutils.State:
    """Train the Flow++ dequantiser of ``config.deq`` against the score model of ``workdir`` (score_flow's train_deq).

    Resumes from the newest checkpoint of ``<workdir>/flowpp_dequantizer/checkpoints{,-meta}``. Runs
    ``config.deq.n_iters`` steps of batch ``config.training.batch_size``, ``training.n_jitted_steps`` per call;
    logs at ``training.log_freq``, the test-batch bits/dim at ``training.eval_freq``, meta checkpoints at
    ``training.snapshot_freq_for_preemption`` and numbered ones at ``training.snapshot_freq`` and at the end.

    Returns:
        The final state (host arrays).

    Raises:
        DequantizerError: no deq section in the config, or no score checkpoint in ``workdir``.
        job_lock.FolderInUseError: another process is training this workdir's dequantiser.
        train_checkpoints.TrainingDivergedError: the loss or the parameters became NaN/inf (nothing of that state
            saved).
    """
    _check_config(config)
    deq_dir = os.path.join(workdir, DEQ_FOLDER)
    checkpoint_dir = os.path.join(deq_dir, "checkpoints")
    checkpoint_meta_dir = os.path.join(deq_dir, "checkpoints-meta")
    # As --mode train: a dequantiser is resumed only with the config it was trained with (safe fields aside).
    has_checkpoints = any(checkpoints.latest_checkpoint(d) for d in (checkpoint_dir, checkpoint_meta_dir)
                          if os.path.isdir(d))
    config_changes = workdir_config.check_workdir_config(config, deq_dir, has_checkpoints)
    sde, score_model, score_state, score_path = _load_score_model(config, workdir)
    for d in (checkpoint_dir, checkpoint_meta_dir):
        os.makedirs(d, exist_ok=True)
    with job_lock.hold(deq_dir, enabled=parallel.is_main_process()):  # one dequantiser training per workdir
        return _train_deq(config, deq_dir, config_changes, sde, score_model, score_state, score_path)


def _train_deq(config, deq_dir: str, config_changes: dict, sde, score_model, score_state, score_path: str
               ) -> mutils.State:
    """The work of :func:`train_deq` once its checks have passed and the folder is this process's."""
    checkpoint_dir = os.path.join(deq_dir, "checkpoints")
    checkpoint_meta_dir = os.path.join(deq_dir, "checkpoints-meta")
    is_main = parallel.is_main_process()
    n_jitted = config.training.n_jitted_steps
    train_ds, eval_ds, _ = datasets.get_dataset(
        config, additional_dim=n_jitted, uniform_dequantization=False,
        start_step=train_checkpoints.resume_step(train_checkpoints.resume_candidates(checkpoint_meta_dir,
                                                                                     checkpoint_dir)))
    # Images stay in [0, 1]: the dequantiser reads them there, the loss scales them after adding the noise.
    train_iter = train_steps.numpy_batches(train_ds, lambda x: x)
    eval_iter = train_steps.numpy_batches(eval_ds, lambda x: x)

    # Data-dependent initialisation on the first batch, as score_flow (also the template to resume into).
    deq_model = flowpp.create_dequantizer(config)
    rng, init_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    params = flowpp.init_dequantizer(init_rng, deq_model, next(train_iter)["image"][:, 0])["params"]
    state = train_checkpoints.restore_newest(_state(config, params, rng), checkpoint_meta_dir, checkpoint_dir)
    state = state.replace(lr=config.optim.lr, ema_rate=config.deq.ema_rate)
    step, rng = int(state.step), state.rng
    workdir_config.save_config(config, deq_dir, step, config_changes)
    p_train_step, p_eval_step = _make_steps(config, sde, score_model, deq_model)
    pstate, score_pstate = parallel.replicate(state), parallel.replicate(score_state)
    del state
    num_steps = config.deq.n_iters
    writer = metric_writers.create_default_writer(os.path.join(deq_dir, "tensorboard"), just_logging=not is_main)
    if is_main:
        logging.info("Training the dequantiser against %s from step %d of %d.", score_path, step, num_steps)
    rng = parallel.training_loop_key(rng, resumed=step > 0)
    progress = reporting.Progress(step, num_steps)
    while step < num_steps:
        rng, keys = train_steps.device_keys(rng)
        (_, pstate), metrics = p_train_step((keys, pstate), score_pstate, next(train_iter))
        step += n_jitted
        metrics = np.asarray(metrics)
        if not np.all(np.isfinite(metrics)):
            raise train_checkpoints.divergence_error(step, "the dequantiser's loss", config, checkpoint_meta_dir,
                                                     checkpoint_dir)
        progress.update(step)
        loss, bpd = metrics.reshape(-1, 2).mean(axis=0)
        if step % config.training.log_freq == 0:
            if is_main:
                logging.info(progress.line(step, training_loss=float(loss), training_bpd=float(bpd)))
            writer.write_scalars(step, {"training_loss": loss, "training_bpd": bpd})
        at_end = step >= num_steps
        evaluating = step % config.training.eval_freq == 0
        if evaluating:  # before the checkpoints, which then hold the key the loop goes on with (as run_lib)
            rng, eval_keys = train_steps.device_keys(rng)
        for folder, freq, keep in ((checkpoint_meta_dir, config.training.snapshot_freq_for_preemption, 1),
                                   (checkpoint_dir, config.training.snapshot_freq, np.inf)):
            if (step % freq == 0 or at_end) and is_main:
                saved = train_checkpoints.checkpoint_state(pstate, rng)
                if not train_checkpoints.all_finite(saved.params):
                    raise train_checkpoints.divergence_error(step, "a dequantiser parameter", config,
                                                             checkpoint_meta_dir, checkpoint_dir)
                checkpoints.save_checkpoint(folder, saved, step=checkpoints.number_for_step(folder, step, freq),
                                            keep=keep)
        if evaluating:
            _, eval_metrics = p_eval_step((eval_keys, pstate), score_pstate, next(eval_iter))
            eval_bpd = float(np.asarray(eval_metrics).reshape(-1, 2)[:, 1].mean())
            if is_main:
                logging.info("step: %d, eval_bpd: %.5f", step, eval_bpd)
            writer.write_scalars(step, {"eval_bpd": eval_bpd})
        writer.flush()
    writer.close()
    return jax.device_get(parallel.unreplicate(pstate))


def checkpoint_identity(workdir: str) -> str | None:
    """``'checkpoint_<n> sha256:<hex>'`` of the dequantiser that :func:`load_eval_dequantizer` would use, or None
    when there is none. The eval job records it with its settings, so that bits/dim computed under one trained
    dequantiser are never mixed with rounds computed under another (retrained or replaced)."""
    path = checkpoints.latest_checkpoint(os.path.join(workdir, DEQ_FOLDER, "checkpoints"))
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return f"{os.path.basename(path)} sha256:{digest.hexdigest()}"


def load_eval_dequantizer(config, workdir: str) -> Callable:
    """The trained dequantiser of ``workdir`` for bits/dim (``config.eval.dequantizer``).

    Restores the newest numbered checkpoint of ``<workdir>/flowpp_dequantizer/checkpoints`` (its EMA
    parameters). Returns ``dequantize(keys, images) -> (data, bpd_q)``: ``keys`` (devices, 2) (folded with 1,
    so that the caller may use them for other draws), ``images`` (devices, B, H, W, C) in [0, 1] (k / 255); ``data`` the
    dequantised images ``(x + u) / 256`` after the config's scaler, ``bpd_q`` (devices · B,) numpy the bits/dim
    ``log2 q(u | x) / D`` to add to the bits/dim of ``data``.

    Raises:
        DequantizerError: no deq section, or no trained dequantiser in ``workdir``.
    """
    _check_config(config)
    checkpoint_dir = os.path.join(workdir, DEQ_FOLDER, "checkpoints")
    path = checkpoints.latest_checkpoint(checkpoint_dir)
    if path is None:
        raise DequantizerError(f"config.eval.dequantizer = True, but {checkpoint_dir} holds no checkpoint: train "
                               "the dequantiser first (--mode train_deq with the same --workdir), or set "
                               "config.eval.dequantizer = False (uniform dequantisation).")
    model = flowpp.create_dequantizer(config)
    params = parallel.replicate(checkpoints.restore_checkpoint(path, state_template(config)).params_ema)
    scaler = datasets.get_data_scaler(config)
    size, channels = config.data.image_size, config.data.num_channels
    dim = size * size * channels
    if parallel.is_main_process():
        logging.info("Bits/dim under the variational dequantiser of %s.", path)

    def one_device(key, params, x):
        eps = jax.random.normal(jax.random.fold_in(key, 1), x.shape)
        u, neg_log_q = model.apply({"params": params}, eps, x, train=False)
        return scaler((x * 255.0 + u) / 256.0), -neg_log_q / (np.log(2) * dim)

    p_dequantize = parallel.pmap(one_device)

    def dequantize(keys, images):
        data, bpd_q = p_dequantize(keys, params, jnp.asarray(images))
        return data, np.asarray(bpd_q).reshape(-1)

    return dequantize
