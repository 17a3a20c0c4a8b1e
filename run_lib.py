"""The long-running jobs: training (and, added by the evaluation pipeline, ``evaluate`` / ``fid_stats``).

This is the only module that owns a working directory. A training workdir holds::

    workdir/
      config.json             the resolved config the run goes on with (rewritten on every (re)start)
      config_history.jsonl    one line per config the workdir has run with: time, step, changes, config
      stdout.txt              the log (appended to on every (re)start)
      checkpoints/            numbered checkpoints  checkpoint_<ceil(step / snapshot_freq)>
      checkpoints-meta/       the newest preemption checkpoint; a restart resumes from the newest state
      samples/                iter_<step>.png (+ .npy, uint8) snapshot sample grids
      tensorboard/            TensorBoard event files (training_loss, eval_loss, steps_per_sec)

A restart compares its config with ``config.json`` before it writes anything: only the fields of
``config_checks.SAFE_TO_CHANGE`` may differ (logged); any other difference stops it with
:class:`WorkdirConfigError`, the workdir untouched.

Multi-process runs: every process trains its replicas (gradients are averaged over all
devices of all processes); only process 0 writes checkpoints, summaries and the log file,
and every process writes its own snapshot samples (``iter_<step>_host_<p>.png`` for p > 0).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from clu import metric_writers

import bound_likelihood
import likelihood
import losses
import sampling
import sde_lib
from models import utils as mutils
from score_sde import checkpoints, datasets, eval_records, inception, metrics, ode, parallel, reporting
from score_sde import sample_plots
from score_sde.train_checkpoints import (TrainingDivergedError, all_finite, checkpoint_state, divergence_error,
                                         restore_newest, resume_candidates, use_config_rates)
from score_sde.train_steps import device_keys, fuse_steps, make_train_and_eval_steps, numpy_batches
from score_sde.workdir_config import CONFIG_HISTORY, WorkdirConfigError, check_workdir_config, save_config

# The jobs, and the names of their machinery that main.py, tests, benchmarks and notebooks import from here (each
# lives in its module under score_sde/).
__all__ = [
    "train", "train_deq", "evaluate", "fid_stats", "sample", "tables", "write_samples",
    "CONFIG_HISTORY", "WorkdirConfigError", "check_workdir_config", "save_config",
    "TrainingDivergedError", "device_keys", "fuse_steps", "make_train_and_eval_steps", "numpy_batches",
    "CHECKPOINT_POLL_S", "HOST_FILES_POLL_S", "EvaluationError", "eval_state_template", "SamplingError",
]


def write_samples(samples: np.ndarray, sample_dir: str, step: int) -> str:
    """Save snapshot samples ``(..., H, W, C)`` in [0, 1] as a PNG grid plus a uint8 ``.npy``; returns the PNG path.

    Raises:
        ValueError: some sample value is NaN or infinite (the uint8 cast would turn NaN into 0 without a trace).
    """
    images = np.asarray(samples).reshape((-1,) + np.asarray(samples).shape[-3:])
    n_bad = int(np.count_nonzero(~np.isfinite(images)))
    if n_bad:
        raise ValueError(f"snapshot samples at step {step}: {n_bad} of {images.size} values are NaN or infinite, "
                         f"nothing written to {sample_dir}; the sampler diverged: try other sampling.* settings "
                         "(predictor, corrector, snr) or a larger model.num_scales, or check the model for divergence")
    suffix = "" if parallel.process_index() == 0 else f"_host_{parallel.process_index()}"
    stem = os.path.join(sample_dir, f"iter_{step}{suffix}")
    np.save(stem + ".npy", np.clip(images * 255.0 + 0.5, 0, 255).astype(np.uint8))
    nrow = max(int(np.sqrt(images.shape[0])), 1)
    # Small images are enlarged so that the grid is legible (8×8 digits become 32×32).
    upscale = max(1, 32 // images.shape[1])
    reporting.save_image(images, stem + ".png", nrow=nrow, padding=2, upscale=upscale)
    return stem + ".png"


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def train(config, workdir: str):
    """Train the score model of ``config``, resuming from the newest checkpoint of ``workdir`` if any.

    Order of work: the config is compared with the workdir's ``config.json``
    (:func:`check_workdir_config`: a refused change stops here, nothing written); then the log
    file is opened, the data are loaded (a missing data set stops before the model is built), the
    model is initialised and the newest readable checkpoint of ``checkpoints-meta/`` and
    ``checkpoints/`` restored (by step, see :func:`~score_sde.train_checkpoints.resume_candidates`),
    ``config.optim.lr`` and ``config.model.ema_rate`` replace the checkpoint's, and the config is
    recorded (:func:`save_config`).

    Every ``training.n_jitted_steps`` steps run as one pmapped call (:func:`fuse_steps`). After a
    call that ends at step ``s``: the loss is logged when ``s % log_freq == 0``; a meta
    checkpoint is written when ``s % snapshot_freq_for_preemption == 0``; the evaluation
    loss when ``s % eval_freq == 0``; a numbered checkpoint (and snapshot samples if
    ``training.snapshot_sampling``) when ``s % snapshot_freq == 0`` and at the end. Files are
    numbered by ``checkpoints.number_for_step``. Training ends at the first multiple of
    ``n_jitted_steps`` that reaches ``training.n_iters``.

    Returns:
        The final training State (this process's first replica, host arrays).

    Raises:
        WorkdirConfigError: the workdir's checkpoints were trained with another SDE, model, data, ...
        TrainingDivergedError: the loss or the parameters became NaN/inf; nothing of that
            state is saved and the last good checkpoint stays.
        datasets.DatasetUnavailableError, checkpoints.CorruptCheckpointError (every checkpoint is
            damaged), OSError (workdir not writable, disk full): also logged to ``stdout.txt``.
    """
    sample_dir = os.path.join(workdir, "samples")
    tb_dir = os.path.join(workdir, "tensorboard")
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    checkpoint_meta_dir = os.path.join(workdir, "checkpoints-meta")
    changes = check_workdir_config(config, workdir, bool(resume_candidates(checkpoint_meta_dir, checkpoint_dir)))
    for d in (workdir, sample_dir, tb_dir, checkpoint_dir, checkpoint_meta_dir):
        os.makedirs(d, exist_ok=True)
    log_handler = reporting.add_log_file(os.path.join(workdir, "stdout.txt")) if parallel.is_main_process() else None
    try:
        return _train(config, workdir, changes, sample_dir, tb_dir, checkpoint_dir, checkpoint_meta_dir)
    except (TrainingDivergedError, datasets.DatasetUnavailableError, checkpoints.CorruptCheckpointError,
            OSError) as err:
        if log_handler is not None:  # the file only: the caller reports it on the console
            log_handler.handle(logging.makeLogRecord({"levelno": logging.ERROR, "levelname": "ERROR",
                                                      "msg": "Stopped: %s", "args": (err,), "filename": "run_lib.py"}))
        raise
    finally:
        if log_handler is not None:
            logging.getLogger().removeHandler(log_handler)
            log_handler.close()


def _train(config, workdir, changes, sample_dir, tb_dir, checkpoint_dir, checkpoint_meta_dir):
    is_main = parallel.is_main_process()
    if is_main:
        for field, (old, new) in changes.items():
            logging.info("config.%s changed since the last run of this workdir: %r -> %r", field, old, new)

    # The data first: a data set that is missing stops the run before the model is built.
    n_jitted = config.training.n_jitted_steps
    train_ds, eval_ds, _ = datasets.get_dataset(config, additional_dim=n_jitted,
                                                uniform_dequantization=config.data.uniform_dequantization)
    scaler = datasets.get_data_scaler(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    train_iter = numpy_batches(train_ds, scaler)
    eval_iter = numpy_batches(eval_ds, scaler)

    # Model, optimizer and state; resume from the newest checkpoint, meta or numbered (a workdir
    # of the original code's released runs has numbered ones only).
    model, state = losses.init_train_state(jax.random.PRNGKey(config.seed), config)
    state = use_config_rates(restore_newest(state, checkpoint_meta_dir, checkpoint_dir), config)
    initial_step = int(state.step)
    rng = state.rng
    save_config(config, workdir, initial_step, changes)
    writer = metric_writers.create_default_writer(tb_dir, just_logging=not is_main)

    sde, sampling_eps = sde_lib.get_sde(config)
    p_train_step, p_eval_step = make_train_and_eval_steps(config, sde, model)
    sampling_fn = None
    if config.training.snapshot_sampling:
        import sampling  # noqa: PLC0415 (only needed with snapshot sampling)

        sampling_shape = (config.training.batch_size // parallel.device_count(), config.data.image_size,
                          config.data.image_size, config.data.num_channels)
        # Snapshots sample in float32 even when training computes in bfloat16 (config.model.dtype).
        sampling_fn = sampling.get_sampling_fn(config, sde, mutils.float32_model(model), sampling_shape,
                                               inverse_scaler, sampling_eps)

    num_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(state.params))
    pstate = parallel.replicate(state)
    del state
    num_train_steps = config.training.n_iters
    if is_main:
        logging.info("Starting training loop at step %d of %d (%s parameters, %d local device(s), %d process(es)).",
                     initial_step, num_train_steps, f"{num_params:,}", parallel.local_device_count(),
                     parallel.process_count())
    rng = parallel.fold_in_process(rng)
    progress = reporting.Progress(initial_step, num_train_steps)

    step = initial_step
    while step < num_train_steps:
        batch = next(train_iter)
        rng, keys = device_keys(rng)
        (_, pstate), ploss = p_train_step((keys, pstate), batch)
        step += n_jitted
        ploss = np.asarray(ploss)
        if not np.all(np.isfinite(ploss)):
            raise divergence_error(step, "the training loss", config, checkpoint_meta_dir, checkpoint_dir)
        loss = float(ploss.mean())
        progress.update(step)

        if step % config.training.log_freq == 0:
            if is_main:
                logging.info(progress.line(step, training_loss=loss))
            writer.write_scalars(step, {"training_loss": loss, "steps_per_sec": progress.steps_per_second()})

        at_end = step >= num_train_steps
        preemption_freq = config.training.snapshot_freq_for_preemption
        if (step % preemption_freq == 0 or at_end) and is_main:
            saved = checkpoint_state(pstate, rng)
            if not all_finite(saved.params):
                raise divergence_error(step, "a parameter", config, checkpoint_meta_dir, checkpoint_dir)
            # At the end too, so that restarting a finished run does not train again.
            number = checkpoints.number_for_step(checkpoint_meta_dir, step, preemption_freq)
            checkpoints.save_checkpoint(checkpoint_meta_dir, saved, step=number, keep=1)

        if step % config.training.eval_freq == 0:
            rng, keys = device_keys(rng)
            _, peval_loss = p_eval_step((keys, pstate), next(eval_iter))
            eval_loss = float(np.asarray(peval_loss).mean())
            if is_main:
                logging.info("step: %d, eval_loss: %.5e", step, eval_loss)
            writer.write_scalars(step, {"eval_loss": eval_loss})

        if step % config.training.snapshot_freq == 0 or at_end:
            if is_main:
                saved = checkpoint_state(pstate, rng)
                if not all_finite(saved.params):
                    raise divergence_error(step, "a parameter", config, checkpoint_meta_dir, checkpoint_dir)
                # ceil(step / snapshot_freq), the end step getting its own file; above the existing
                # numbers if snapshot_freq changed since they were written.
                number = checkpoints.number_for_step(checkpoint_dir, step, config.training.snapshot_freq)
                if number != -(-step // config.training.snapshot_freq):
                    logging.info("step: %d, saved as checkpoint_%d: snapshot_freq changed since checkpoint_%d was "
                                 "written", step, number, -(-step // config.training.snapshot_freq))
                checkpoints.save_checkpoint(checkpoint_dir, saved, step=number, keep=np.inf)
            if sampling_fn is not None:
                rng, keys = device_keys(rng)
                samples, nfe = sampling_fn(keys, pstate)
                path = write_samples(jax.device_get(samples), sample_dir, step)
                if is_main:
                    logging.info("step: %d, wrote %s (%d score evaluations per sample)", step, path, int(nfe))
        writer.flush()

    if is_main:
        logging.info("Training finished at step %d.", step)
    writer.close()
    return parallel.unreplicate_to_host(pstate)


def train_deq(config, workdir: str):
    """score_flow's ``--mode train_deq``: train the Flow++ variational dequantiser against the score model of
    ``workdir`` (see :func:`score_sde.dequantizer_train.train_deq`)."""
    from score_sde import dequantizer_train  # noqa: PLC0415 (it imports this module)

    return dequantizer_train.train_deq(config, workdir)


# ----------------------------------------------------------------------------------------------
# Evaluation (--mode eval) and dataset statistics (--mode fid_stats)
# ----------------------------------------------------------------------------------------------

# Seconds between looks for a checkpoint that has not arrived yet (the original waited 60 s).
CHECKPOINT_POLL_S = 60.0
# Seconds between looks for the files the other processes of a multi-host evaluation write.
HOST_FILES_POLL_S = 5.0
# Seconds to wait for them before concluding that a process died (sampling one checkpoint's share takes minutes to
# an hour on the released configs; a process that has not written its files after this is not coming back).
HOST_FILES_TIMEOUT_S = 4 * 3600.0


class EvaluationError(ValueError):
    """Evaluation cannot start or go on; the one-line message says why and what to do."""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _eval_images(config, split: str) -> np.ndarray:
    """Every image of the ``'train'`` or ``'test'`` split of ``config.data``, undequantised, in canonical order.

    Read once through ``datasets.get_dataset`` (so every dataset's preprocessing applies) with
    one image per device: nothing is dropped on one device; with D devices the pipeline's
    ``drop_remainder`` can leave out up to D - 1 images (run on one device to avoid even that).
    Returns ``(N, H, W, C)``, uint8 for undequantised unresized data (see ``eval_records.collect_images``).
    """
    one_per_device = config.copy_and_resolve_references()
    one_per_device.eval.batch_size = parallel.device_count()
    train_ds, eval_ds, _ = datasets.get_dataset(one_per_device, additional_dim=None, uniform_dequantization=False,
                                                evaluation=True)
    images = eval_records.collect_images(train_ds if split == "train" else eval_ds)
    return eval_records.canonical_order(images)


def _host_rows(global_batch: np.ndarray, per_device: int) -> np.ndarray:
    """This host's part of a global batch, shaped ``(local_devices, per_device, ...)``."""
    local = parallel.local_device_count()
    start = parallel.process_index() * local * per_device
    rows = global_batch[start:start + local * per_device]
    return rows.reshape((local, per_device) + rows.shape[1:])


def eval_state_template(config, rng: jax.Array):
    """``(model, state)``: the model of ``config`` and a zero State with its structure, shapes and dtypes.

    Enough to restore a checkpoint into (ours or the original's); the initialisation is only
    traced (``jax.eval_shape``), which is much faster than running it. The model computes in float32
    whatever ``config.model.dtype`` (the training compute dtype): evaluation and sampling stay float32.
    """
    shapes = jax.eval_shape(lambda key: losses.init_train_state(key, config)[1], rng)
    model = mutils.float32_model(mutils.create_model(config))
    return model, jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


# ---- checks made before anything is computed or written ----------------------------------------

def _check_eval_config(config) -> None:
    """Reject ``eval.*`` values that would otherwise fail late (the checkpoint range, batch size, bpd split)."""
    begin, end = config.eval.begin_ckpt, config.eval.end_ckpt
    if begin > end:
        raise EvaluationError(f"config.eval.begin_ckpt = {begin} is after config.eval.end_ckpt = {end}: there is "
                              "no checkpoint to evaluate. Set begin_ckpt <= end_ckpt.")
    wait_s = _wait_seconds(config)
    if not wait_s >= 0:
        raise EvaluationError(f"config.eval.wait_for_checkpoints_s = {wait_s!r}; use 0 (do not wait) or a number "
                              "of seconds to wait for each checkpoint a running training has still to write.")
    devices = parallel.device_count()
    if config.eval.batch_size % devices != 0 or config.eval.batch_size < devices:
        raise EvaluationError(f"config.eval.batch_size = {config.eval.batch_size} must be a positive multiple of "
                              f"the number of devices ({devices}).")
    if config.eval.bpd_dataset.lower() not in ("train", "test"):
        raise EvaluationError(f"config.eval.bpd_dataset = {config.eval.bpd_dataset!r}; use 'train' or 'test'.")
    _check_bound_config(config)


def _check_bound_config(config) -> None:
    """The bound's fields (``eval.enable_bound``, ``eval.bound_num_times``), and score_flow's ``eval.bound`` refused."""
    if config.eval.get("bound", False):
        # score_flow's switch replaced the ODE bits/dim by the bound; silently ignoring it would report the ODE only.
        raise EvaluationError("config.eval.bound = True is score_flow's switch and is not read here: set "
                              "config.eval.enable_bound = True (the bound is reported beside the ODE bits/dim; "
                              "config.eval.enable_bpd = False skips the ODE) and config.eval.bound = False.")
    if not config.eval.get("enable_bound", False):
        return
    num_times = config.eval.get("bound_num_times", 1000)
    if not isinstance(num_times, int) or num_times < 1:
        raise EvaluationError(f"config.eval.bound_num_times = {num_times!r}; use a positive integer (Monte-Carlo "
                              "times per example for the likelihood bound; score_flow used 1000).")


def _wait_seconds(config) -> float:
    # .get: configs written before the field existed (a workdir's config.json) do not wait.
    return config.eval.get("wait_for_checkpoints_s", 0)


def _checkpoint_path(checkpoint_dir: str, ckpt: int) -> str:
    return os.path.join(checkpoint_dir, f"{checkpoints.PREFIX}{ckpt}")


def _number_ranges(numbers: list[int]) -> str:
    """Increasing ``[1, 2, 3, 5]`` -> ``'1-3, 5'``."""
    spans = [[numbers[0], numbers[0]]]
    for n in numbers[1:]:
        if n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _check_checkpoints_present(checkpoint_dir: str, first: int, last: int, wait_s: float) -> None:
    """Fail at once when a checkpoint ``first..last`` is missing and waiting for it is not allowed.

    With ``wait_s > 0`` (``config.eval.wait_for_checkpoints_s``) the missing ones are logged and
    :func:`_wait_for_checkpoint` waits for each in turn.
    """
    missing = [n for n in range(first, last + 1) if not os.path.exists(_checkpoint_path(checkpoint_dir, n))]
    if not missing:
        return
    if wait_s > 0:
        if parallel.is_main_process():
            logging.info("Checkpoint(s) %s are not in %s yet; waiting up to %g s for each as it comes "
                         "(config.eval.wait_for_checkpoints_s).", _number_ranges(missing), checkpoint_dir, wait_s)
        return
    if not os.path.isdir(checkpoint_dir):
        found = "the folder does not exist"
    else:
        latest = checkpoints.latest_checkpoint(checkpoint_dir)
        found = f"the highest there is {os.path.basename(latest)}" if latest else "it holds no checkpoint"
    raise EvaluationError(
        f"Checkpoint(s) {_number_ranges(missing)} of config.eval.begin_ckpt..end_ckpt = {first}..{last} are not in "
        f"{checkpoint_dir} ({found}). Check --workdir and the range; to wait for checkpoints that a running "
        "`--mode train` will still write, set config.eval.wait_for_checkpoints_s (seconds).")


def _check_result_settings(eval_dir: str, settings: dict) -> dict:
    """Refuse to add results to ``eval_dir`` when they were computed with other settings; returns what to record."""
    recorded = eval_records.load_settings(eval_dir)
    differences = eval_records.settings_differences(recorded, settings) if recorded is not None else []
    if differences:
        raise EvaluationError(
            f"{eval_dir} holds results computed with other settings ({'; '.join(differences)}); new rounds would "
            "be mixed with them. Evaluate into another folder (--eval_folder) or with the settings recorded in "
            f"{eval_records.settings_path(eval_dir)}.")
    return eval_records.merged_settings(recorded, settings)


# ---- checkpoints --------------------------------------------------------------------------------

def _wait_for_checkpoint(path: str, wait_s: float) -> None:
    """Return once ``path`` exists, looking every ``CHECKPOINT_POLL_S`` for at most ``wait_s`` seconds."""
    if os.path.exists(path):
        return
    deadline = time.monotonic() + wait_s
    if parallel.is_main_process():
        logging.info("Waiting up to %g s for %s, which a running `--mode train` on this workdir would write "
                     "(config.eval.wait_for_checkpoints_s).", wait_s, path)
    while not os.path.exists(path):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise EvaluationError(
                f"{path} did not appear within config.eval.wait_for_checkpoints_s = {wait_s:g} s. Is `--mode train` "
                "still running on this workdir? Rerun later (the evaluation resumes where it stopped) or wait longer.")
        time.sleep(min(CHECKPOINT_POLL_S, remaining))


def _wait_and_restore(checkpoint_dir: str, ckpt: int, template, wait_s: float = 0.0):
    """Restore ``checkpoint_<ckpt>`` into ``template``, first waiting up to ``wait_s`` seconds for it to appear.

    A checkpoint that cannot be read is not retried: checkpoints are written atomically, so a
    file under its final name is complete and a read error will not go away by itself (and an
    interrupted evaluation resumes where it stopped).

    Raises:
        EvaluationError: the file did not appear in time, or cannot be read (corrupt, truncated,
            unreadable, or of another model); the message names the file.
    """
    path = _checkpoint_path(checkpoint_dir, ckpt)
    _wait_for_checkpoint(path, wait_s)
    try:
        return checkpoints.restore_checkpoint(path, template)
    except (ValueError, OSError) as err:  # checkpoints.CorruptCheckpointError is a ValueError
        raise EvaluationError(f"Cannot evaluate {path}: {_one_line(err)}") from err


def _wait_for_host_files(paths: list[str], what: str) -> None:
    """Return once every file of ``paths`` exists (written by other processes of this evaluation)."""
    if all(os.path.exists(p) for p in paths):
        return
    logging.info("Waiting for %s from the other processes of this evaluation.", what)
    deadline = time.monotonic() + HOST_FILES_TIMEOUT_S
    while not all(os.path.exists(p) for p in paths):
        if time.monotonic() > deadline:
            missing = [p for p in paths if not os.path.exists(p)]
            raise EvaluationError(
                f"Waited {HOST_FILES_TIMEOUT_S:.0f} s for {what} and {len(missing)} file(s) never appeared (first: "
                f"{missing[0]}): did that process die? Restart every process of the evaluation; finished parts "
                "are kept and are not recomputed.")
        time.sleep(HOST_FILES_POLL_S)


# ---- the job ------------------------------------------------------------------------------------

@dataclasses.dataclass
class _EvalJob:
    """What :func:`evaluate` computes for every checkpoint, prepared once.

    A part that is off (``eval.enable_*``) has its functions set to None.
    """

    config: Any
    eval_dir: str
    checkpoint_dir: str
    template: Any
    global_batch: int
    per_device: int
    scaler: Callable
    # eval loss
    p_eval_step: Callable | None = None
    loss_images: np.ndarray | None = None
    # bits/dim
    likelihood_fn: Callable | None = None
    bpd_dataset: str = "test"
    bpd_images: np.ndarray | None = None
    bpd_batches_per_repeat: int = 0
    num_bpd_rounds: int = 0
    # the likelihood bound, on the bits/dim batches
    bound_fn: Callable | None = None
    # eval.dequantizer: (keys, images in [0, 1]) -> (model inputs, bits/dim of log q(u | x)); None: uniform noise
    dequantizer: Callable | None = None
    # samples and IS / FID / KID
    sampling_fn: Callable | None = None
    num_sampling_rounds: int = 0
    extractor: Any = None
    stats_path: str | None = None
    data_stats: dict | None = None
    names: dict | None = None

    @property
    def host(self) -> int:
        return parallel.process_index()

    def save_meta(self, meta: eval_records.EvalMeta, **changes) -> eval_records.EvalMeta:
        return eval_records.update_eval_meta(self.eval_dir, self.host, meta, **changes)


def _images_for_batches(config, split: str, global_batch: int) -> np.ndarray:
    images = _eval_images(config, split)
    if len(images) < global_batch:
        raise EvaluationError(f"The {split} split has {len(images)} images, fewer than one batch "
                              f"(config.eval.batch_size = {global_batch}).")
    return images


def _build_job(config, eval_dir: str, checkpoint_dir: str, model_rng: jax.Array, sample_metrics: dict | None):
    """Models, data and compiled functions of the parts ``config.eval.enable_*`` asks for."""
    score_model, template = eval_state_template(config, model_rng)
    sde, sampling_eps = sde_lib.get_sde(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    global_batch = config.eval.batch_size
    job = _EvalJob(config=config, eval_dir=eval_dir, checkpoint_dir=checkpoint_dir, template=template,
                   global_batch=global_batch, per_device=global_batch // parallel.device_count(),
                   scaler=datasets.get_data_scaler(config), bpd_dataset=config.eval.bpd_dataset.lower())
    if config.eval.enable_loss:
        job.p_eval_step = make_train_and_eval_steps(config, sde, score_model)[1]
        job.loss_images = _images_for_batches(config, "test", global_batch)
    if config.eval.enable_bpd:
        # The ODE solver and tolerances of config.sampling, as the samplers use them (ode.DEFAULT_SOLVER).
        job.likelihood_fn = likelihood.get_likelihood_fn(
            sde, score_model, inverse_scaler, rtol=config.sampling.get("ode_rtol", 1e-5),
            atol=config.sampling.get("ode_atol", 1e-5), solver=config.sampling.get("ode_solver", ode.DEFAULT_SOLVER))
    if config.eval.get("enable_bound", False):
        job.bound_fn = _bound_fn(config, sde, score_model, inverse_scaler)
    if job.likelihood_fn is not None or job.bound_fn is not None:
        if config.eval.get("dequantizer", False):
            from score_sde import dequantizer_train  # noqa: PLC0415 (it imports this module)

            job.dequantizer = dequantizer_train.load_eval_dequantizer(config, os.path.dirname(checkpoint_dir))
        job.bpd_images = _images_for_batches(config, job.bpd_dataset, global_batch)
        job.bpd_batches_per_repeat = len(job.bpd_images) // global_batch
        # The test split is gone over 5 times with fresh dequantisation noise, as the original.
        job.num_bpd_rounds = job.bpd_batches_per_repeat * (5 if job.bpd_dataset == "test" else 1)
    if config.eval.enable_sampling:
        sampling_shape = (global_batch // parallel.local_device_count(), config.data.image_size,
                          config.data.image_size, config.data.num_channels)
        job.sampling_fn = sampling.get_sampling_fn(config, sde, score_model, sampling_shape, inverse_scaler,
                                                   sampling_eps)
        job.num_sampling_rounds = -(-config.eval.num_samples // global_batch)
        job = dataclasses.replace(job, **sample_metrics)
    return job


def _bound_fn(config, sde, score_model, inverse_scaler) -> Callable:
    """score_flow's evaluation bound: importance-sampled time on VP / sub-VP (uniform on VE, which has none)."""
    return bound_likelihood.get_likelihood_bound_fn(
        sde, score_model, inverse_scaler, dsm=config.eval.get("dsm", True),
        eps=config.training.get("smallest_time", 1e-5), N=config.eval.get("bound_num_times", 1000),
        importance_weighting=hasattr(sde, "sample_importance_weighted_time_for_likelihood"),
        eps_offset=config.eval.get("offset", True))


def _load_sample_metric_inputs(config, feature_extractor) -> dict:
    """The feature network, the dataset statistics and the metric names (fails before any long work)."""
    extractor = feature_extractor or inception.load_feature_extractor(config)
    stats_path = eval_records.dataset_stats_path(config)
    data_stats = eval_records.load_dataset_stats(stats_path)
    names = inception.metric_names(extractor.is_inception, int(np.shape(data_stats["pool_3"])[1]))
    return {"extractor": extractor, "stats_path": stats_path, "data_stats": data_stats, "names": names}


def _meta_key(meta: eval_records.EvalMeta) -> jax.Array:
    return jax.numpy.asarray(np.asarray(meta.rng, np.uint32))


def _eval_loss(job: _EvalJob, ckpt: int, pstate, meta):
    """The loss of every full batch of the (canonically ordered) test split -> ``ckpt_<n>_loss.npz``."""
    config, rng = job.config, _meta_key(meta)
    all_losses = []
    for i in range(len(job.loss_images) // job.global_batch):
        batch = job.loss_images[i * job.global_batch:(i + 1) * job.global_batch]
        if config.data.uniform_dequantization:
            batch = eval_records.dequantize(batch, (config.seed, 0, i))
        else:
            batch = eval_records.to_unit_float(batch)
        batch = _host_rows(job.scaler(batch), job.per_device)[:, None]
        rng, keys = device_keys(rng)
        _, p_eval_loss = job.p_eval_step((keys, pstate), {"image": batch})
        all_losses.extend(parallel.unreplicate_to_host(p_eval_loss).reshape(-1))
    all_losses = np.asarray(all_losses)
    if parallel.is_main_process():
        eval_records.write_npz(os.path.join(job.eval_dir, f"ckpt_{ckpt}_loss.npz"), all_losses=all_losses,
                               mean_loss=all_losses.mean())
    logging.info("ckpt: %d, eval loss: %.6e", ckpt, all_losses.mean())
    return job.save_meta(meta, loss_done=True, rng=eval_records.key_to_list(rng))


def _bpd_batch(job: _EvalJob, bpd_round: int) -> np.ndarray:
    """The dequantised, scaled images of bits/dim round ``bpd_round``: ``(local_devices, per_device, H, W, C)``.

    Repeat ``r`` of the split goes through it in the order of a permutation seeded by
    ``(seed, r)``, with dequantisation noise seeded by ``(seed, 1, r, batch)``.
    """
    seed = job.config.seed
    repeat, batch_id = divmod(bpd_round, job.bpd_batches_per_repeat)
    batch = eval_records.dequantize(_bpd_images(job, bpd_round), (seed, 1, repeat, batch_id))
    return _host_rows(job.scaler(batch), job.per_device)


def _bpd_images(job: _EvalJob, bpd_round: int) -> np.ndarray:
    """The undequantised images of bits/dim round ``bpd_round`` (all hosts'), in the order of :func:`_bpd_batch`."""
    repeat, batch_id = divmod(bpd_round, job.bpd_batches_per_repeat)
    order = np.random.default_rng([job.config.seed, repeat]).permutation(len(job.bpd_images))
    return job.bpd_images[order[batch_id * job.global_batch:(batch_id + 1) * job.global_batch]]


def _bpd_data(job: _EvalJob, bpd_round: int, keys: jax.Array) -> tuple[Any, Any]:
    """``(data, extra_bpd)``: the model inputs of round ``bpd_round`` and the bits/dim their dequantisation adds.

    Uniform noise adds 0; under ``eval.dequantizer`` the noise ``u ~ q(u | x)`` of the trained Flow++
    dequantiser (drawn from ``keys``) adds ``log2 q(u | x) / D`` per example, (local_devices · per_device,).
    """
    if job.dequantizer is None:
        return _bpd_batch(job, bpd_round), 0.0
    images = eval_records.to_unit_float(_bpd_images(job, bpd_round))
    return job.dequantizer(keys, _host_rows(images, job.per_device))


def _eval_bpd_rounds(job: _EvalJob, ckpt: int, pstate, meta, kind: str):
    """The rounds not done yet of ``kind``: ``'bpd'`` (the ODE bits/dim, ``job.likelihood_fn``) or ``'bound'`` (the
    likelihood bound, ``job.bound_fn``), on the bits/dim batches, one file each:
    ``<bpd_dataset>_ckpt_<n>_<kind>_<round>.npz``. Progress is ``meta.<kind>_rounds_done``."""
    value_fn = {"bpd": job.likelihood_fn, "bound": job.bound_fn}[kind]
    done_field = f"{kind}_rounds_done"
    suffix = "" if parallel.process_count() == 1 else f"_host_{job.host}"
    for bpd_round in range(getattr(meta, done_field), job.num_bpd_rounds):
        rng, keys = device_keys(_meta_key(meta))
        data, extra_bpd = _bpd_data(job, bpd_round, keys)
        values = np.asarray(value_fn(keys, pstate, data)[0]).reshape(-1) + extra_bpd
        eval_records.write_npz(
            os.path.join(job.eval_dir, f"{job.bpd_dataset}_ckpt_{ckpt}_{kind}_{bpd_round}{suffix}.npz"), values)
        repeat, batch_id = divmod(bpd_round, job.bpd_batches_per_repeat)
        logging.info("ckpt: %d, repeat: %d, batch: %d, mean %s bpd: %.6f", ckpt, repeat, batch_id,
                     "ODE" if kind == "bpd" else kind, values.mean())
        meta = job.save_meta(meta, **{done_field: bpd_round + 1}, rng=eval_records.key_to_list(rng))
    return meta


def _sampling_rounds(job: _EvalJob, ckpt: int, pstate, meta):
    """The sampling rounds not done yet: ``ckpt_<n>_host_<h>/samples_<r>.npz`` and ``statistics_<r>.npz``."""
    config = job.config
    sample_dir = os.path.join(job.eval_dir, f"ckpt_{ckpt}_host_{job.host}")
    os.makedirs(sample_dir, exist_ok=True)
    for r in range(meta.sampling_rounds_done, job.num_sampling_rounds):
        logging.info("sampling -- ckpt: %d, round: %d of %d", ckpt, r + 1, job.num_sampling_rounds)
        rng, keys = device_keys(_meta_key(meta))
        samples, _ = job.sampling_fn(keys, pstate)
        samples = np.clip(np.asarray(samples) * 255.0, 0, 255).astype(np.uint8)
        samples = samples.reshape((-1, config.data.image_size, config.data.image_size, config.data.num_channels))
        eval_records.write_npz(os.path.join(sample_dir, f"samples_{r}.npz"), samples=samples)
        latents = inception.run_inception(samples, job.extractor)
        stats = {"pool_3": latents["pool_3"]}
        if latents["logits"] is not None:
            stats["logits"] = latents["logits"]
        eval_records.write_npz(os.path.join(sample_dir, f"statistics_{r}.npz"), **stats)
        meta = job.save_meta(meta, sampling_rounds_done=r + 1, rng=eval_records.key_to_list(rng))
    return meta


def _sample_metrics(job: _EvalJob, ckpt: int) -> None:
    """IS / FID / KID of the first ``eval.num_samples`` samples of all hosts -> ``report_<n>.npz`` (process 0)."""
    num_samples = job.config.eval.num_samples
    pools, logits = [], []
    for h in range(parallel.process_count()):
        host_dir = os.path.join(job.eval_dir, f"ckpt_{ckpt}_host_{h}")
        files = [os.path.join(host_dir, f"statistics_{r}.npz") for r in range(job.num_sampling_rounds)]
        _wait_for_host_files(files, f"the sample statistics of host {h}")
        for f in files:
            stat = eval_records.read_npz(f)
            pools.append(stat["pool_3"])
            if "logits" in stat:
                logits.append(stat["logits"])
    all_pools = np.concatenate(pools)[:num_samples]
    all_logits = np.concatenate(logits)[:num_samples] if logits else None
    eval_records.check_stats_extractor(job.data_stats, job.extractor, job.stats_path, all_pools.shape[1])
    scores = metrics.compute_metrics(all_pools, all_logits, job.data_stats["pool_3"])
    inception_score = scores["IS"] if all_logits is not None else -1.0
    names = job.names
    logging.info("ckpt-%d --- %s: %.6e, %s: %.6e, %s: %.6e", ckpt, names["IS"], inception_score,
                 names["fid"], scores["fid"], names["kid"], scores["kid"])
    eval_records.write_npz(os.path.join(job.eval_dir, f"report_{ckpt}.npz"), IS=inception_score, fid=scores["fid"],
                           kid=scores["kid"], num_samples=len(all_pools),
                           feature_extractor=np.asarray(job.extractor.name))


def _evaluate_checkpoint(job: _EvalJob, ckpt: int, meta):
    """Every part not done yet for checkpoint ``ckpt`` (the meta says what is); returns the updated meta."""
    state = _wait_and_restore(job.checkpoint_dir, ckpt, job.template, _wait_seconds(job.config))
    pstate = parallel.replicate(state)
    if job.p_eval_step is not None and not meta.loss_done:
        meta = _eval_loss(job, ckpt, pstate, meta)
    if job.likelihood_fn is not None:
        meta = _eval_bpd_rounds(job, ckpt, pstate, meta, "bpd")
    if job.bound_fn is not None:
        meta = _eval_bpd_rounds(job, ckpt, pstate, meta, "bound")
    if job.sampling_fn is not None:
        meta = _sampling_rounds(job, ckpt, pstate, meta)
        if not meta.metrics_done:
            if parallel.is_main_process():
                _sample_metrics(job, ckpt)
            else:
                _wait_for_host_files([os.path.join(job.eval_dir, f"report_{ckpt}.npz")], "the metrics of process 0")
            meta = job.save_meta(meta, metrics_done=True)
    return meta


def evaluate(config, workdir: str, eval_folder: str = "eval", feature_extractor=None) -> dict:
    """Evaluate the checkpoints ``config.eval.begin_ckpt .. end_ckpt`` of ``workdir``, as the original.

    For each checkpoint: the loss on the evaluation split (``eval.enable_loss``), bits/dim
    through the probability-flow ODE on ``eval.bpd_dataset`` (``'test'`` is gone over 5 times;
    ``eval.enable_bpd``), the likelihood bound in bits/dim on the same batches (``eval.enable_bound``,
    :func:`_bound_fn`), and ``eval.num_samples`` samples with their Inception features and
    IS / FID / KID against the dataset statistics (``eval.enable_sampling``; per-host folders
    ``ckpt_<n>_host_<h>``). Evaluation and sampling use ``params_ema``. Checkpoints written by
    the original code are read too.

    Before anything is computed or written (no ``workdir/eval_folder`` is created): the range
    is checked, the feature network and statistics are loaded, the settings are compared with
    those recorded in ``eval_folder``, and every checkpoint of the range must exist, unless
    ``eval.wait_for_checkpoints_s > 0``: then each missing one is waited for, up to that many
    seconds. A checkpoint that cannot be read stops the evaluation at once.

    Resumable: a meta file per host (``meta_<h>.json``) is written after every round, and a
    rerun continues at the next round with the same random numbers. The evaluation data are
    read in a canonical order (see ``eval_records.canonical_order``) and dequantised with
    seeded noise, so a resumed evaluation gives the numbers of an uninterrupted one. The
    settings that define the numbers (``eval_records.result_settings``) are recorded in
    ``settings.json``; rerunning into the same folder with other settings is refused.

    Files in ``workdir/eval_folder`` (the original's names): ``ckpt_<n>_loss.npz`` (``all_losses``,
    ``mean_loss``), ``<bpd_dataset>_ckpt_<n>_bpd_<round>.npz``, ``<bpd_dataset>_ckpt_<n>_bound_<round>.npz``
    (the bound per example), ``ckpt_<n>_host_<h>/samples_<r>.npz`` and ``statistics_<r>.npz``
    (``pool_3``, ``logits``), ``report_<n>.npz`` (``IS``, ``fid``, ``kid``), plus
    ``summary.json`` / ``summary.md`` and ``settings.json``. Numbers from a feature network other than
    the 2048-d Inception are labelled "(stand-in features)".

    Args:
        config: the training config (``eval.*`` fields select what is computed).
        workdir: the training run's folder (``checkpoints/`` inside).
        eval_folder: subfolder for the results.
        feature_extractor: an ``inception.FeatureExtractor`` to use instead of loading the
            Inception network (tests, offline smoke runs).

    Returns:
        The summary dict (also written as ``summary.json``).

    Raises:
        EvaluationError: a bad range or batch size, missing checkpoints, other settings than
            the folder's results, an unreadable checkpoint; one line naming the field or file.
    """
    _check_eval_config(config)
    sample_metrics = _load_sample_metric_inputs(config, feature_extractor) if config.eval.enable_sampling else None
    eval_dir = os.path.join(workdir, eval_folder)
    host = parallel.process_index()
    settings = eval_records.result_settings(config, parallel.device_count())
    if config.eval.get("dequantizer", False) and (config.eval.enable_bpd or config.eval.get("enable_bound", False)):
        from score_sde import dequantizer_train  # noqa: PLC0415 (it imports this module)

        settings["dequantizer_checkpoint"] = dequantizer_train.checkpoint_identity(workdir)
    settings = _check_result_settings(eval_dir, settings)
    meta = eval_records.load_eval_meta(eval_dir, host)
    begin, end = config.eval.begin_ckpt, config.eval.end_ckpt
    first = max(begin, meta.ckpt_id) if meta is not None else begin
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    _check_checkpoints_present(checkpoint_dir, first, end, _wait_seconds(config))

    rng, model_rng = jax.random.split(jax.random.PRNGKey(config.seed + 1))
    job = _build_job(config, eval_dir, checkpoint_dir, model_rng, sample_metrics)  # reads the data: can fail
    os.makedirs(eval_dir, exist_ok=True)
    if parallel.is_main_process():
        eval_records.save_settings(eval_dir, settings)
    if meta is None:
        meta = eval_records.EvalMeta(ckpt_id=begin, rng=eval_records.key_to_list(parallel.fold_in_process(rng)))
    else:
        logging.info("Resuming the evaluation at checkpoint %d (loss done: %s, bits/dim rounds done: %d, "
                     "bound rounds done: %d, sampling rounds done: %d)", meta.ckpt_id, meta.loss_done,
                     meta.bpd_rounds_done, meta.bound_rounds_done, meta.sampling_rounds_done)

    summary = {"title": f"Evaluation of {workdir}", "eval_dir": eval_dir, "checkpoints": {}}
    if sample_metrics is not None:
        summary["feature_extractor"] = job.extractor.name
        summary["dataset statistics"] = job.stats_path
    for ckpt in range(first, end + 1):
        if ckpt != meta.ckpt_id:  # a new checkpoint (or one after a changed eval.begin_ckpt): nothing done yet
            meta = job.save_meta(meta, ckpt_id=ckpt, loss_done=False, bpd_rounds_done=0, bound_rounds_done=0,
                                 sampling_rounds_done=0, metrics_done=False)
        meta = _evaluate_checkpoint(job, ckpt, meta)
        summary["checkpoints"][str(ckpt)] = eval_records.summarize_checkpoint(eval_dir, ckpt, job.bpd_dataset,
                                                                              job.names)
        if parallel.is_main_process():
            eval_records.write_summary(os.path.join(eval_dir, "summary"), summary)
        meta = job.save_meta(meta, ckpt_id=ckpt + 1, loss_done=False, bpd_rounds_done=0, bound_rounds_done=0,
                             sampling_rounds_done=0, metrics_done=False)

    for ckpt in range(begin, end + 1):
        row = eval_records.summarize_checkpoint(eval_dir, ckpt, job.bpd_dataset, job.names)
        if row:
            summary["checkpoints"][str(ckpt)] = row
    if parallel.is_main_process():
        eval_records.write_summary(os.path.join(eval_dir, "summary"), summary)
    os.remove(eval_records.eval_meta_path(eval_dir, host))
    return summary


def fid_stats(config, workdir: str, feature_extractor=None) -> str:
    """Compute the dataset statistics file used by FID / KID (``--mode fid_stats``).

    As the original's users were told to: every image of the training split, as uint8
    (no dequantisation, no dropped last batch), through the same feature network as
    :func:`evaluate`. Written to ``eval_records.dataset_stats_path(config)``
    (``config.eval.stats_dir``, default ``assets/stats/<dataset>_stats.npz``) with ``pool_3``,
    ``mu``, ``sigma``, ``logits`` and the network's name; a short JSON note goes to ``workdir``.

    Returns:
        The path of the statistics file.
    """
    extractor = feature_extractor or inception.load_feature_extractor(config)
    images = _eval_images(config, "train")
    if images.dtype != np.uint8:
        images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
    logging.info("Computing features of %d training images with %s", len(images), extractor.name)
    latents = inception.run_inception(images, extractor)
    path = eval_records.dataset_stats_path(config)
    if parallel.is_main_process():
        eval_records.save_dataset_stats(path, latents["pool_3"], extractor.name, logits=latents["logits"])
        os.makedirs(workdir, exist_ok=True)
        note = {"stats_file": os.path.abspath(path), "num_images": int(len(images)), "dataset": config.data.dataset,
                "image_size": int(config.data.image_size), "feature_extractor": extractor.name,
                "feature_dim": int(latents["pool_3"].shape[1]),
                "stand_in": inception.metric_names(extractor.is_inception,
                                                   latents["pool_3"].shape[1])["fid"] != "FID"}
        with open(os.path.join(workdir, "fid_stats.json"), "w") as fout:
            json.dump(note, fout, indent=2)
        logging.info("Wrote %s (%d images, %d-d features)", path, len(images), latents["pool_3"].shape[1])
    return path


# ----------------------------------------------------------------------------------------------
# Samples from a checkpoint (--mode sample)
# ----------------------------------------------------------------------------------------------

class SamplingError(EvaluationError):
    """``--mode sample`` cannot start or go on: no such checkpoint, a bad ``sampling.*`` value, NaN samples."""


def _sample_checkpoint(config, checkpoint_dir: str) -> tuple[int, str]:
    """``(n, path)`` of ``checkpoint_<n>`` to sample from: ``config.sampling.ckpt``, else the highest number.

    Numbers grow with the training step (``checkpoints.number_for_step``), so the highest is the newest.
    """
    found = dict(checkpoints.numbered_checkpoints(checkpoint_dir))
    chosen = config.sampling.get("ckpt", None)
    if not found:
        where = "the folder does not exist" if not os.path.isdir(checkpoint_dir) else "it holds no checkpoint_<n>"
        raise SamplingError(f"No checkpoint to sample from in {checkpoint_dir} ({where}). Check --workdir, or train "
                            "first with --mode train (a numbered checkpoint is written every training.snapshot_freq "
                            "steps and at the end).")
    if chosen is None:
        number = max(found)
    elif chosen not in found:
        raise SamplingError(f"config.sampling.ckpt = {chosen}: {checkpoint_dir} has no checkpoint_{chosen}; it holds "
                            f"{_number_ranges(sorted(found))}. Leave the field unset for the newest.")
    else:
        number = chosen
    return number, found[number]


def _sampler_settings(config) -> dict:
    """The ``config.sampling`` fields that shape the samples of ``config.sampling.method`` (defaults filled in)."""
    method = config.sampling.method.lower()
    if method in sampling.fast_sampling.registered_fast_samplers():
        return sampling.fast_sampling.sampler_options(method, config.sampling)  # validates: fails before tracing
    if method == "ode":
        return {"ode_solver": config.sampling.get("ode_solver", ode.DEFAULT_SOLVER),
                "ode_rtol": config.sampling.get("ode_rtol", 1e-5), "ode_atol": config.sampling.get("ode_atol", 1e-5),
                "noise_removal": config.sampling.noise_removal}
    settings = {field: config.sampling[field] for field in ("predictor", "corrector", "snr", "n_steps_each",
                                                             "probability_flow", "noise_removal")}
    return {**settings, "num_scales": config.model.num_scales}  # PC takes one step per discretisation step


def _sample_folder(workdir: str, method: str, ckpt: int, settings: dict) -> tuple[str, dict | None]:
    """``(folder, info)``: the finished folder of these ``settings`` (its ``sample_info.json``), or a free name.

    ``samples_<method>_ckpt_<n>``, then ``..._2``, ``..._3``, ... for other settings: a folder once
    written is never written again.
    """
    suffix = "" if parallel.process_index() == 0 else f"_host_{parallel.process_index()}"
    base = os.path.join(workdir, f"samples_{method}_ckpt_{ckpt}")
    k = 1
    while True:
        folder = (base if k == 1 else f"{base}_{k}") + suffix
        if not os.path.exists(folder):
            return folder, None
        info_path = os.path.join(folder, "sample_info.json")
        if os.path.exists(info_path):
            with open(info_path) as f:
                info = json.load(f)
            if info.get("settings") == settings:
                return folder, info
        k += 1


# The reverse-process GIF: at most this many images, about this many frames (plus the first and the last).
GIF_IMAGES = 16
GIF_FRAMES = 10
# 2-D data: the paths of this many samples in score_field.png.
PLOT_PATHS = 64


def _recording(config, shape):
    """What the sampler records of its path (``fast_sampling.Recording``): the GIF's first images, or
    for 2-D data the plotted paths; None for 'ode', whose adaptive solver keeps no intermediate states."""
    if not sampling.records_path(config.sampling.method):
        logging.info("No reverse_process.gif: config.sampling.method = %r records no path.", config.sampling.method)
        return None
    return sampling.fast_sampling.Recording(frames=GIF_FRAMES, first=PLOT_PATHS if sample_plots.is_2d(shape)
                                            else GIF_IMAGES)


def _plot_score_field(config, sde, model, state, sampling_eps: float, shape, path: np.ndarray, file: str) -> None:
    """``score_field.png`` of 2-D data: the model's score at a few times and the recorded paths (data space)."""
    score_fn = mutils.get_score_fn(sde, model, state.params_ema, state.model_state, train=False,
                                   continuous=config.training.continuous)
    scaler = datasets.get_data_scaler(config)  # the score is taken in model space; the scalers scale by > 0
    batched = jax.jit(lambda points, t: score_fn(scaler(points).reshape((-1,) + tuple(shape[1:])), t).reshape(-1, 2))

    def field(points, t):
        return np.asarray(batched(points, np.full(len(points), t, np.float32)))

    sample_plots.plot_score_field(file, field, sample_plots.panel_times(sampling_eps, sde.T),
                                  path.reshape(path.shape[:2] + (2,)),
                                  title=f"{config.sampling.method}: score field and sample paths")


def _write_gif(frames: list[np.ndarray], path: str, upscale: int) -> None:
    """``frames`` (images in [0, 1]) as grids in an animated GIF, 0.2 s a frame, the last held 2 s, looping."""
    from PIL import Image  # noqa: PLC0415 (only the GIF needs it here)

    images = []
    for batch in frames:
        grid = reporting.make_grid(np.clip(batch, 0.0, 1.0), nrow=max(int(np.sqrt(len(batch))), 1))
        pixels = np.clip(grid * 255.0 + 0.5, 0, 255).astype(np.uint8).repeat(upscale, 0).repeat(upscale, 1)
        images.append(Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))
    images[0].save(path, save_all=True, append_images=images[1:], duration=[200] * (len(images) - 1) + [2000],
                   loop=0)


def sample(config, workdir: str) -> dict:
    """Draw ``config.sampling.num_samples`` samples from a checkpoint of ``workdir`` (``--mode sample``).

    The checkpoint is ``checkpoints/checkpoint_<config.sampling.ckpt>``, or the highest-numbered
    one (the newest) when the field is unset; ``params_ema`` are sampled with the sampler of
    ``config.sampling.method`` and its options. ``num_samples`` unset: one batch of
    ``config.eval.batch_size``; the samples come in batches of that size (one sampler call each,
    split over the devices), each logged with its score evaluations and the time left.

    Writes ``workdir/samples_<method>_ckpt_<n>/`` (``_2``, ``_3``, ... when a folder of that name holds
    samples of other settings): ``samples.npz`` (``samples``: ``(num_samples, H, W, C)`` uint8,
    rounded as the PNGs; for mixture points, ``(num_samples, dim)`` float32 in data space and no grids),
    ``grid_<b>.png`` (batch ``b``), ``sample_info.json`` (``nfe``: the score
    evaluations per sample the sampler reported, the largest over batches, and ``nfe_per_batch``;
    ``sampler_options``, ``ckpt``, ``step``, ``settings``, ...); for every method but 'ode' also
    ``reverse_process.gif``: the first 16 images of the first batch on their way from noise to data,
    the states the sampler recorded in its compiled loop (``fast_sampling.Recording``: about 10
    frames, every k steps, then the samples; recording leaves the samples bit for bit unchanged), or
    for 2-D data (two numbers per example) ``score_field.png`` instead: the model's score field at a
    few times with the paths of 64 samples (``score_sde.sample_plots``). The folder is filled under a
    temporary name and renamed when complete, so it never holds a partial result; a rerun with the
    same settings (seed included: the same samples) finds it and draws nothing. With several
    processes each writes its own folder (suffix ``_host_<p>``) with the samples it drew.

    Returns:
        The contents of ``sample_info.json`` plus ``folder``.

    Raises:
        SamplingError: before any model is built or compiled: no checkpoint, no ``checkpoint_<sampling.ckpt>``,
            ``sampling.num_samples`` < 1, a bad sampler option; before compiling: a sampler unfit for the SDE;
            then an unreadable checkpoint, or samples that are NaN / infinite. One line each.
    """
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    ckpt, ckpt_path = _sample_checkpoint(config, checkpoint_dir)
    global_batch = config.eval.batch_size
    num_samples = config.sampling.get("num_samples", None)
    num_samples = global_batch if num_samples is None else num_samples
    if num_samples < 1 or global_batch < 1:
        raise SamplingError(f"config.sampling.num_samples = {num_samples}, config.eval.batch_size = {global_batch}: "
                            "both must be >= 1.")
    method = config.sampling.method.lower()
    try:
        options = _sampler_settings(config)
    except ValueError as err:  # a bad sampler option (steps < 1, order not 1-3, ...): before any tracing
        raise SamplingError(str(err)) from err
    step = checkpoints.checkpoint_step(ckpt_path)  # None for a file without our footer: read from the state below
    sde, sampling_eps = sde_lib.get_sde(config)
    # The step too: a resumed training run that redoes a step rewrites that step's checkpoint.
    settings = {"method": method, "sampler_options": options, "ckpt": ckpt, "step": step,
                "num_samples": int(num_samples),
                "batch_size": int(global_batch), "seed": int(config.seed), "devices": parallel.device_count(),
                "sampling_eps": float(sampling_eps)}
    folder, done = _sample_folder(workdir, method, ckpt, settings)
    if done is not None:
        logging.info("%s holds these samples already (same checkpoint, sampler, settings and seed); nothing to do. "
                     "Change --config.seed for new ones.", folder)
        return {**done, "folder": folder}

    model, template = eval_state_template(config, jax.random.PRNGKey(config.seed + 1))
    shape = (global_batch // parallel.device_count(), config.data.image_size, config.data.image_size,
             config.data.num_channels)
    try:  # the samplers check their settings against the SDE here, before anything is compiled
        sampling_fn = sampling.get_sampling_fn(config, sde, model, shape, datasets.get_data_inverse_scaler(config),
                                               sampling_eps, record=_recording(config, shape))
    except (ValueError, NotImplementedError) as err:
        raise SamplingError(_one_line(err)) from err
    try:
        state = checkpoints.restore_checkpoint(ckpt_path, template)
    except (ValueError, OSError) as err:  # checkpoints.CorruptCheckpointError is a ValueError
        raise SamplingError(f"Cannot sample from {ckpt_path}: {_one_line(err)}") from err
    step = int(state.step) if step is None else step
    pstate = parallel.replicate(state)
    del state

    rounds = -(-num_samples // global_batch)
    logging.info("Sampling %d images from %s (step %d) with %s %s: %d batch(es) of %d, into %s", num_samples,
                 ckpt_path, step, method, options, rounds, global_batch, folder)
    rng = parallel.fold_in_process(jax.random.PRNGKey(config.seed))
    progress = reporting.Progress(0, rounds)
    batches, nfes, path = [], [], None
    start = time.perf_counter()
    for r in range(rounds):
        rng, keys = device_keys(rng)
        batch, nfe, *recorded = sampling_fn(keys, pstate)
        if r == 0 and recorded:  # the first device's path: (frames, first, H, W, C)
            path = np.asarray(jax.device_get(recorded[0][0]), np.float32)
        batch = np.asarray(jax.device_get(batch), np.float32).reshape((-1,) + shape[1:])
        n_bad = int(np.count_nonzero(~np.isfinite(batch)))
        if n_bad:
            raise SamplingError(f"batch {r}: {n_bad} of {batch.size} sample values are NaN or infinite; nothing "
                                f"written to {folder}. The sampler diverged: try other config.sampling settings "
                                "(more steps, another method) or another checkpoint.")
        batches.append(batch)
        nfes.append(int(nfe))
        progress.update(r + 1)
        rate = progress.steps_per_second()
        eta = f" | ETA {reporting.format_duration((rounds - r - 1) / rate)}" if rate > 0 else ""
        logging.info("sampling batch %d/%d | %d score evaluations per sample%s", r + 1, rounds, nfes[-1], eta)
    seconds = time.perf_counter() - start

    # Written under a temporary name, then renamed: the folder is complete or absent.
    tmp_folder = f"{folder}.partial-{os.getpid()}"
    os.makedirs(tmp_folder, exist_ok=True)
    points = tuple(shape[1:3]) == (1, 1)  # mixture data: (batch, 1, 1, dim) points, not images
    for r, batch in enumerate(batches if not points else []):
        # Small images are enlarged so that the grid is legible (8×8 digits become 32×32).
        reporting.save_image(batch, os.path.join(tmp_folder, f"grid_{r}.png"),
                             nrow=max(int(np.sqrt(len(batch))), 1), upscale=max(1, 32 // shape[1]))
    if path is not None and sample_plots.is_2d(shape):
        _plot_score_field(config, sde, model, parallel.unreplicate(pstate), sampling_eps, shape, path,
                          os.path.join(tmp_folder, "score_field.png"))
    elif path is not None:
        _write_gif(path, os.path.join(tmp_folder, "reverse_process.gif"), upscale=max(1, 32 // shape[1]))
    if points:  # coordinates keep their values: rounding to 256 levels in [0, 1] would destroy them
        all_images = np.concatenate(batches).reshape(-1, math.prod(shape[1:])).astype(np.float32)
    else:
        all_images = np.clip(np.concatenate(batches) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if parallel.process_count() == 1:
        all_images = all_images[:num_samples]
    np.savez_compressed(os.path.join(tmp_folder, "samples.npz"), samples=all_images)
    info = {"method": method, "nfe": max(nfes), "nfe_per_batch": nfes, "sampler_options": options, "ckpt": ckpt,
            "checkpoint": os.path.relpath(ckpt_path, workdir), "step": step, "num_samples": int(len(all_images)),
            "shape": list(all_images.shape), "seconds": round(seconds, 3), "settings": settings}
    with open(os.path.join(tmp_folder, "sample_info.json"), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    os.rename(tmp_folder, folder)  # fails rather than replace a folder that another run finished meanwhile
    logging.info("Wrote %d samples to %s (%d score evaluations per sample).", len(all_images), folder, max(nfes))
    return {**info, "folder": folder}


# ----------------------------------------------------------------------------------------------
# The paper's tables at CPU scale (--mode tables)
# ----------------------------------------------------------------------------------------------

def tables(config, workdir: str) -> dict:
    """The paper's tables beside ours (``--mode tables``): ``workdir/tables.md``, ``tables.json``, plots.

    Resumable: finished cells stored in ``tables.json`` are not recomputed. See ``score_sde.tables``
    and docs/tables.md.
    """
    # Imported here: score_sde.tables builds an SDE when imported, which compiles four programs in every job.
    from score_sde import tables as tables_lib  # noqa: PLC0415

    return tables_lib.run(config, workdir)

