"""The long-running jobs: ``train``, ``evaluate``, ``fid_stats``, ``sample``, ``train_deq`` and ``tables``.

Their machinery lives in ``score_sde/``: ``workdir_config`` (the config a workdir runs with),
``train_steps`` (the pmapped steps), ``train_checkpoints`` (resuming, never saving a diverged state),
``eval_checks`` / ``eval_job`` (the evaluation's checks and per-checkpoint work), ``sample_job`` (``--mode
sample``), ``dequantizer_train``, ``tables``.

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

import json
import logging
import os
from collections.abc import Iterator

import jax
import numpy as np
from clu import metric_writers

from models import utils as mutils
from score_sde import checkpoints, datasets, eval_checks, eval_job, eval_records, inception, parallel, reporting
from score_sde import job_lock, sample_job, sample_plots, train_programs
from score_sde.eval_checks import EvaluationError
from score_sde.sample_job import SamplingError
from score_sde.train_checkpoints import (TrainingDivergedError, all_finite, checkpoint_state, divergence_error,
                                         eval_state_template, restore_newest, resume_candidates, resume_step,
                                         use_config_rates)
from score_sde.train_steps import device_keys, fuse_steps, make_train_and_eval_steps, numpy_batches
from score_sde.workdir_config import CONFIG_HISTORY, WorkdirConfigError, check_workdir_config, save_config

# The jobs, and the names of their machinery that main.py, tests, benchmarks and notebooks import from here (each
# lives in its module under score_sde/; the polling constants live in score_sde/eval_checks.py).
__all__ = [
    "train", "train_deq", "evaluate", "fid_stats", "sample", "tables", "write_samples",
    "CONFIG_HISTORY", "WorkdirConfigError", "check_workdir_config", "save_config",
    "TrainingDivergedError", "device_keys", "fuse_steps", "make_train_and_eval_steps", "numpy_batches",
    "EvaluationError", "eval_state_template", "SamplingError",
]


def write_samples(samples: np.ndarray, sample_dir: str, step: int) -> str:
    """Save snapshot samples ``(..., H, W, C)``; returns the PNG path.

    Images (in [0, 1]): a PNG grid plus a uint8 ``.npy``. Mixture points (``H = W = 1``, ``C = dim``
    coordinates in data space, the ``GMM`` data set): a float32 ``.npy`` ``(n, dim)`` and a scatter plot
    of the first two coordinates (grey levels would destroy them).

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
    if images.shape[1:3] == (1, 1) and images.shape[3] >= 2:
        points = images.reshape(images.shape[0], -1).astype(np.float32)
        np.save(stem + ".npy", points)
        sample_plots.plot_points(stem + ".png", points, title=f"samples at step {step}")
        return stem + ".png"
    np.save(stem + ".npy", np.clip(images * 255.0 + 0.5, 0, 255).astype(np.uint8))
    nrow = max(int(np.sqrt(images.shape[0])), 1)
    # Small images are enlarged so that the grid is legible (8×8 digits become 32×32).
    upscale = max(1, 32 // images.shape[1])
    reporting.save_image(images, stem + ".png", nrow=nrow, padding=2, upscale=upscale)
    return stem + ".png"


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def train(config, workdir: str, programs: train_programs.TrainPrograms | None = None):
    """Train the score model of ``config``, resuming from the newest checkpoint of ``workdir`` if any.

    Order of work: the config is compared with the workdir's ``config.json``
    (:func:`check_workdir_config`: a refused change stops here, nothing written); then the log
    file is opened, the data are loaded (a missing data set stops before the model is built), then
    the newest readable checkpoint of ``checkpoints-meta/`` and ``checkpoints/`` is restored (by step,
    see :func:`~score_sde.train_checkpoints.resume_candidates`; into a State of zeros, so a resumed run
    never compiles or runs the model's initialisation) or, without one, the model is initialised;
    ``config.optim.lr`` and ``config.model.ema_rate`` replace the checkpoint's, and the config is
    recorded (:func:`save_config`). The model's initialisation and, once the State is restored, the train
    step compile in worker threads (:class:`~score_sde.train_programs.TrainPrograms`); ``programs``, if
    given, started them earlier (``main.py`` does, for data sets that are always present, before it
    imports TensorFlow).

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
        job_lock.FolderInUseError: another training job holds ``workdir`` (nothing written).
    """
    sample_dir = os.path.join(workdir, "samples")
    tb_dir = os.path.join(workdir, "tensorboard")
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    checkpoint_meta_dir = os.path.join(workdir, "checkpoints-meta")
    changes = check_workdir_config(config, workdir, bool(resume_candidates(checkpoint_meta_dir, checkpoint_dir)))
    for d in (workdir, sample_dir, tb_dir, checkpoint_dir, checkpoint_meta_dir):
        os.makedirs(d, exist_ok=True)
    is_main = parallel.is_main_process()
    with job_lock.hold(workdir, enabled=is_main):  # a second training job on this workdir stops here
        log_handler = reporting.add_log_file(os.path.join(workdir, "stdout.txt")) if is_main else None
        try:
            return _train(config, workdir, changes, sample_dir, tb_dir, checkpoint_dir, checkpoint_meta_dir, programs)
        except (TrainingDivergedError, datasets.DatasetUnavailableError, checkpoints.CorruptCheckpointError,
                OSError) as err:
            if log_handler is not None:  # the file only: the caller reports it on the console
                log_handler.handle(logging.makeLogRecord({"levelno": logging.ERROR, "levelname": "ERROR", "msg":
                                                          "Stopped: %s", "args": (err,), "filename": "run_lib.py"}))
            raise
        finally:
            if log_handler is not None:
                logging.getLogger().removeHandler(log_handler)
                log_handler.close()


def _train(config, workdir, changes, sample_dir, tb_dir, checkpoint_dir, checkpoint_meta_dir, programs):
    is_main = parallel.is_main_process()
    if is_main:
        for field, (old, new) in changes.items():
            logging.info("config.%s changed since the last run of this workdir: %r -> %r", field, old, new)

    # The data first: a data set that is missing stops the run before the model is built. The streams
    # start where the run resumes (the step in the newest checkpoint's footer).
    n_jitted = config.training.n_jitted_steps
    candidates = resume_candidates(checkpoint_meta_dir, checkpoint_dir)
    data_step = resume_step(candidates)

    def training_batches(start_step: int) -> tuple[Iterator[dict], Iterator[dict]]:
        train_ds, eval_ds, _ = datasets.get_dataset(config, additional_dim=n_jitted, start_step=start_step,
                                                    uniform_dequantization=config.data.uniform_dequantization)
        return numpy_batches(train_ds, scaler), numpy_batches(eval_ds, scaler)

    scaler = datasets.get_data_scaler(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    train_iter, eval_iter = training_batches(data_step)

    # Model, optimizer and state; resume from the newest checkpoint, meta or numbered (a workdir
    # of the original code's released runs has numbered ones only).
    programs = programs or train_programs.TrainPrograms(config, start_init=not candidates)
    model, sde, sampling_eps = programs.model, programs.sde, programs.sampling_eps
    if candidates:  # every value comes from the checkpoint (or every one is damaged: raised), so no init runs
        state = restore_newest(programs.state_template(), checkpoint_meta_dir, checkpoint_dir)
    else:
        state = programs.initial_state(jax.random.PRNGKey(config.seed))
    state = use_config_rates(state, config)
    programs.start_train_step()
    initial_step = int(state.step)
    if initial_step != data_step:  # the newest checkpoint was damaged or has no footer: start the data here
        train_iter, eval_iter = training_batches(initial_step)
    rng = state.rng
    save_config(config, workdir, initial_step, changes)
    writer = metric_writers.create_default_writer(tb_dir, just_logging=not is_main)

    p_eval_step = programs.p_eval_step
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
    p_train_step = programs.train_step()
    del state
    num_train_steps = config.training.n_iters
    if is_main:
        logging.info("Starting training loop at step %d of %d (%s parameters, %d local device(s), %d process(es)).",
                     initial_step, num_train_steps, f"{num_params:,}", parallel.local_device_count(),
                     parallel.process_count())
    rng = parallel.training_loop_key(rng, resumed=initial_step > 0)
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
        evaluating = step % config.training.eval_freq == 0
        snapshot = step % config.training.snapshot_freq == 0 or at_end
        # The keys of this step's eval loss and samples first (in the original's order), so that the
        # checkpoints hold the key the loop goes on with: a restart continues the uninterrupted key stream.
        if evaluating:
            rng, eval_keys = device_keys(rng)
        if snapshot and sampling_fn is not None:
            rng, sample_keys = device_keys(rng)
        preemption_freq = config.training.snapshot_freq_for_preemption
        if (step % preemption_freq == 0 or at_end) and is_main:
            saved = checkpoint_state(pstate, rng)
            if not all_finite(saved.params):
                raise divergence_error(step, "a parameter", config, checkpoint_meta_dir, checkpoint_dir)
            # At the end too, so that restarting a finished run does not train again.
            number = checkpoints.number_for_step(checkpoint_meta_dir, step, preemption_freq)
            checkpoints.save_checkpoint(checkpoint_meta_dir, saved, step=number, keep=1)

        if evaluating:
            _, peval_loss = p_eval_step((eval_keys, pstate), next(eval_iter))
            eval_loss = float(np.asarray(peval_loss).mean())
            if is_main:
                logging.info("step: %d, eval_loss: %.5e", step, eval_loss)
            writer.write_scalars(step, {"eval_loss": eval_loss})

        if snapshot:
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
                samples, nfe = sampling_fn(sample_keys, pstate)
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
    from score_sde import dequantizer_train  # noqa: PLC0415 (only this mode and eval.dequantizer need Flow++)

    return dequantizer_train.train_deq(config, workdir)


# ----------------------------------------------------------------------------------------------
# Evaluation (--mode eval) and dataset statistics (--mode fid_stats)
# ----------------------------------------------------------------------------------------------

def evaluate(config, workdir: str, eval_folder: str = "eval", feature_extractor=None) -> dict:
    """Evaluate the checkpoints ``config.eval.begin_ckpt .. end_ckpt`` of ``workdir``, as the original.

    For each checkpoint: the loss on the evaluation split (``eval.enable_loss``), bits/dim
    through the probability-flow ODE on ``eval.bpd_dataset`` (``'test'`` is gone over 5 times;
    ``eval.enable_bpd``), the likelihood bound in bits/dim on the same batches (``eval.enable_bound``,
    :func:`score_sde.eval_job.likelihood_bound_fn`), and ``eval.num_samples`` samples with their
    Inception features and IS / FID / KID against the dataset statistics (``eval.enable_sampling``;
    per-host folders ``ckpt_<n>_host_<h>``). Evaluation and sampling use ``params_ema``. Checkpoints
    written by the original code are read too. The work of each checkpoint is
    :func:`score_sde.eval_job.evaluate_checkpoint`; the checks before it, ``score_sde.eval_checks``.

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
        job_lock.FolderInUseError: another process evaluates into ``eval_folder`` for this host.
    """
    eval_checks.check_eval_config(config)
    sample_metrics = (eval_job.load_sample_metric_inputs(config, feature_extractor) if config.eval.enable_sampling
                      else None)
    eval_dir = os.path.join(workdir, eval_folder)
    host = parallel.process_index()
    settings = eval_records.result_settings(config, parallel.device_count())
    if config.eval.get("dequantizer", False) and (config.eval.enable_bpd or config.eval.get("enable_bound", False)):
        from score_sde import dequantizer_train  # noqa: PLC0415 (only eval.dequantizer and train_deq need Flow++)

        settings["dequantizer_checkpoint"] = dequantizer_train.checkpoint_identity(workdir)
    settings = eval_checks.check_result_settings(eval_dir, settings)
    meta = eval_records.load_eval_meta(eval_dir, host)
    begin, end = config.eval.begin_ckpt, config.eval.end_ckpt
    first = max(begin, meta.ckpt_id) if meta is not None else begin
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    eval_checks.check_checkpoints_present(checkpoint_dir, first, end, eval_checks.wait_seconds(config))

    rng, model_rng = jax.random.split(jax.random.PRNGKey(config.seed + 1))
    job = eval_job.build_job(config, eval_dir, checkpoint_dir, model_rng, sample_metrics)  # reads the data: can fail
    os.makedirs(eval_dir, exist_ok=True)
    with job_lock.hold(eval_dir, job_lock.eval_lock(host)):  # a second evaluation of this folder stops here
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
            meta = eval_job.evaluate_checkpoint(job, ckpt, meta)
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
    images = eval_job.eval_images(config, "train")
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

def sample(config, workdir: str) -> dict:
    """Draw ``config.sampling.num_samples`` samples from a checkpoint of ``workdir`` (``--mode sample``).

    The checkpoint is ``checkpoints/checkpoint_<config.sampling.ckpt>``, or the newest one; the sampler is
    ``config.sampling.method`` with its options. Writes ``workdir/samples_<method>_ckpt_<n>/`` (``samples.npz``,
    grids, ``sample_info.json``, the reverse-process GIF or, for 2-D data, ``score_field.png``), complete or
    not at all; a rerun with the same settings draws nothing. See :func:`score_sde.sample_job.sample`.

    Returns:
        The contents of ``sample_info.json`` plus ``folder``.

    Raises:
        SamplingError: no such checkpoint, a bad ``sampling.*`` value, an unreadable checkpoint, NaN samples.
    """
    return sample_job.sample(config, workdir)


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

