"""The long-running jobs: training (and, added by the evaluation pipeline, ``evaluate`` / ``fid_stats``).

This is the only module that owns a working directory. A training workdir holds::

    workdir/
      config.json             the resolved config of the run
      stdout.txt              the log (appended to on every (re)start)
      checkpoints/            numbered checkpoints  checkpoint_<step // snapshot_freq>
      checkpoints-meta/       the latest preemption checkpoint; a restart resumes from it
      samples/                iter_<step>.png (+ .npy, uint8) snapshot sample grids
      tensorboard/            TensorBoard event files (training_loss, eval_loss, steps_per_sec)

Multi-process runs: every process trains its replicas (gradients are averaged over all
devices of all processes); only process 0 writes checkpoints, summaries and the log file,
and every process writes its own snapshot samples (``iter_<step>_host_<p>.png`` for p > 0).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterator

import jax
import numpy as np
from clu import metric_writers

import losses
import sde_lib
from models import utils as mutils
from score_sde import checkpoints, datasets, parallel, reporting


class TrainingDivergedError(FloatingPointError):
    """The training loss (or the parameters) became NaN or infinite; training stopped."""


# ---------------------------------------------------------------------------------------------
# Small helpers shared by the jobs
# ---------------------------------------------------------------------------------------------

def save_config(config, workdir: str) -> str:
    """Write the resolved ``config`` as ``workdir/config.json`` (process 0 only); returns the path."""
    path = os.path.join(workdir, "config.json")
    if parallel.is_main_process():
        with open(path, "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
            f.write("\n")
    return path


def numpy_batches(ds, scaler: Callable) -> Iterator[dict]:
    """Iterate a ``tf.data`` pipeline of ``{'image': ...}`` as ``{'image': scaler(numpy array)}``.

    Only the image is kept (the score losses use nothing else); shapes are unchanged,
    ``(local_devices, [n_jitted_steps,] per_device_batch, H, W, C)``.
    """
    for example in ds.as_numpy_iterator():
        yield {"image": scaler(np.asarray(example["image"], dtype=np.float32))}


def device_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(new_rng, keys)`` with one fresh key per local device, ``keys`` of shape ``(local_devices, 2)``.

    The same split as the original (``rng, *keys = split(rng, local_devices + 1)``).
    """
    return parallel.split_per_device(rng)


def fuse_steps(step_fn: Callable) -> Callable:
    """``fused((rng, state), batch) -> ((rng, state), losses)``: ``step_fn`` applied to each ``batch['image'][i]``.

    Semantically ``functools.partial(jax.lax.scan, step_fn)`` as in the original, but unrolled
    into straight-line code. Measured on XLA:CPU (jax 0.10.2, 2 cores), a train step inside
    ``lax.scan``'s while loop runs ~25× slower than the same step outside one (13 s vs 0.36 s
    per step for the digits DDPM++), while the unrolled form makes ``n_jitted_steps`` pay off
    (0.36 s vs 0.56 s per step for one step per call). The cost is compile time, which grows
    with the number of fused steps.
    """

    def fused(carry, batch):
        n = batch["image"].shape[0]
        step_losses = []
        for i in range(n):
            carry, loss = step_fn(carry, jax.tree_util.tree_map(lambda x: x[i], batch))
            step_losses.append(loss)
        return carry, jax.numpy.stack(step_losses)

    return fused


def make_train_and_eval_steps(config, sde: sde_lib.SDE, model) -> tuple[Callable, Callable]:
    """The pmapped multi-step train and eval functions of ``config``.

    ``p_train_step((keys, pstate), batch) -> ((keys, pstate), losses)`` runs
    ``n = batch['image'].shape[1]`` training steps per device fused into one call (see
    :func:`fuse_steps`; ``batch['image']``: ``(local_devices, n, per_device_batch, H, W, C)``);
    ``losses`` is ``(local_devices, n)``. The input state is donated (do not reuse it).
    ``p_eval_step`` has the same signature, scores ``params_ema`` and changes nothing.
    """
    kwargs = dict(reduce_mean=config.training.reduce_mean, continuous=config.training.continuous,
                  likelihood_weighting=config.training.likelihood_weighting)
    train_step = losses.get_step_fn(sde, model, train=True, optimize_fn=losses.optimization_manager(config), **kwargs)
    eval_step = losses.get_step_fn(sde, model, train=False, **kwargs)
    p_train_step = parallel.pmap(fuse_steps(train_step), donate_argnums=(0,))
    p_eval_step = parallel.pmap(fuse_steps(eval_step))
    return p_train_step, p_eval_step


def _all_finite(tree: Any) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.floating))


def _checkpoint_state(pstate, rng) -> Any:
    """The first replica of ``pstate`` on the host, carrying the host loop's ``rng`` (as the original)."""
    return jax.device_get(parallel.unreplicate(pstate)).replace(rng=jax.device_get(rng))


def _diverged(step: int, what: str, checkpoint_meta_dir: str, checkpoint_dir: str) -> TrainingDivergedError:
    last = checkpoints.latest_checkpoint(checkpoint_meta_dir) or checkpoints.latest_checkpoint(checkpoint_dir)
    kept = f"the last good checkpoint is kept at {last}" if last else "no checkpoint had been written yet"
    return TrainingDivergedError(
        f"Training diverged: {what} is NaN or infinite after step {step}; stopped without saving it, {kept}. "
        "Lower config.optim.lr, keep config.optim.grad_clip >= 0 or check the data scaling (config.data.centered).")


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
    """Train the score model of ``config``, resuming from ``workdir/checkpoints-meta`` if present.

    Every ``training.n_jitted_steps`` steps run as one pmapped call (:func:`fuse_steps`). After a
    call that ends at step ``s``: the loss is logged when ``s % log_freq == 0``; a meta
    checkpoint is written when ``s % snapshot_freq_for_preemption == 0``; the evaluation
    loss when ``s % eval_freq == 0``; a numbered checkpoint (and snapshot samples if
    ``training.snapshot_sampling``) when ``s % snapshot_freq == 0`` and at the end.
    Training ends at the first multiple of ``n_jitted_steps`` that reaches ``training.n_iters``.

    Returns:
        The final training State (this process's first replica, host arrays).

    Raises:
        TrainingDivergedError: the loss or the parameters became NaN/inf; nothing of that
            state is saved and the last good checkpoint stays.
    """
    os.makedirs(workdir, exist_ok=True)
    sample_dir = os.path.join(workdir, "samples")
    tb_dir = os.path.join(workdir, "tensorboard")
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    checkpoint_meta_dir = os.path.join(workdir, "checkpoints-meta")
    for d in (sample_dir, tb_dir, checkpoint_dir, checkpoint_meta_dir):
        os.makedirs(d, exist_ok=True)
    log_handler = reporting.add_log_file(os.path.join(workdir, "stdout.txt")) if parallel.is_main_process() else None
    try:
        return _train(config, workdir, sample_dir, tb_dir, checkpoint_dir, checkpoint_meta_dir)
    finally:
        if log_handler is not None:
            logging.getLogger().removeHandler(log_handler)
            log_handler.close()


def _train(config, workdir, sample_dir, tb_dir, checkpoint_dir, checkpoint_meta_dir):
    save_config(config, workdir)
    is_main = parallel.is_main_process()
    writer = metric_writers.create_default_writer(tb_dir, just_logging=not is_main)

    # Model, optimizer and state; resume from the latest meta checkpoint when there is one, else
    # from the latest numbered checkpoint (e.g. a workdir of the original code's released runs).
    model, state = losses.init_train_state(jax.random.PRNGKey(config.seed), config)
    resume_dir = checkpoint_meta_dir if checkpoints.latest_checkpoint(checkpoint_meta_dir) else checkpoint_dir
    state = checkpoints.restore_checkpoint(resume_dir, state)
    initial_step = int(state.step)
    rng = state.rng

    n_jitted = config.training.n_jitted_steps
    train_ds, eval_ds, _ = datasets.get_dataset(config, additional_dim=n_jitted,
                                                uniform_dequantization=config.data.uniform_dequantization)
    scaler = datasets.get_data_scaler(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    train_iter = numpy_batches(train_ds, scaler)
    eval_iter = numpy_batches(eval_ds, scaler)

    sde, sampling_eps = sde_lib.get_sde(config)
    p_train_step, p_eval_step = make_train_and_eval_steps(config, sde, model)
    sampling_fn = None
    if config.training.snapshot_sampling:
        import sampling  # noqa: PLC0415 (only needed with snapshot sampling)

        sampling_shape = (config.training.batch_size // parallel.device_count(), config.data.image_size,
                          config.data.image_size, config.data.num_channels)
        sampling_fn = sampling.get_sampling_fn(config, sde, model, sampling_shape, inverse_scaler, sampling_eps)

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
            raise _diverged(step, "the training loss", checkpoint_meta_dir, checkpoint_dir)
        loss = float(ploss.mean())
        progress.update(step)

        if step % config.training.log_freq == 0:
            if is_main:
                logging.info(progress.line(step, training_loss=loss))
            writer.write_scalars(step, {"training_loss": loss, "steps_per_sec": progress.steps_per_second()})

        at_end = step >= num_train_steps
        preemption_freq = config.training.snapshot_freq_for_preemption
        if (step % preemption_freq == 0 or at_end) and is_main:
            saved = _checkpoint_state(pstate, rng)
            if not _all_finite(saved.params):
                raise _diverged(step, "a parameter", checkpoint_meta_dir, checkpoint_dir)
            # At the end too, so that restarting a finished run does not train again.
            checkpoints.save_checkpoint(checkpoint_meta_dir, saved, step=-(-step // preemption_freq), keep=1)

        if step % config.training.eval_freq == 0:
            rng, keys = device_keys(rng)
            _, peval_loss = p_eval_step((keys, pstate), next(eval_iter))
            eval_loss = float(np.asarray(peval_loss).mean())
            if is_main:
                logging.info("step: %d, eval_loss: %.5e", step, eval_loss)
            writer.write_scalars(step, {"eval_loss": eval_loss})

        if step % config.training.snapshot_freq == 0 or at_end:
            ckpt_number = -(-step // config.training.snapshot_freq)  # ceil: the end step gets its own file
            if is_main:
                saved = _checkpoint_state(pstate, rng)
                if not _all_finite(saved.params):
                    raise _diverged(step, "a parameter", checkpoint_meta_dir, checkpoint_dir)
                checkpoints.save_checkpoint(checkpoint_dir, saved, step=ckpt_number, keep=np.inf)
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
    return jax.device_get(parallel.unreplicate(pstate))


# ----------------------------------------------------------------------------------------------
# Evaluation (--mode eval) and dataset statistics (--mode fid_stats)
# ----------------------------------------------------------------------------------------------

# Seconds between looks for a checkpoint that has not arrived yet (the original waited 60 s).
CHECKPOINT_POLL_S = 60.0


def _eval_images(config, split: str) -> np.ndarray:
    """Every image of the ``'train'`` or ``'test'`` split of ``config.data``, undequantised, in canonical order.

    Read once through ``datasets.get_dataset`` (so every dataset's preprocessing applies) with
    one image per device: nothing is dropped on one device; with D devices the pipeline's
    ``drop_remainder`` can leave out up to D - 1 images (run on one device to avoid even that).
    """
    from score_sde import evaluation as evaluation_lib

    one_per_device = config.copy_and_resolve_references()
    one_per_device.eval.batch_size = parallel.device_count()
    train_ds, eval_ds, _ = datasets.get_dataset(one_per_device, additional_dim=None, uniform_dequantization=False,
                                                evaluation=True)
    images = evaluation_lib.collect_images(train_ds if split == "train" else eval_ds)
    return evaluation_lib.canonical_order(images)


def _host_rows(global_batch: np.ndarray, per_device: int) -> np.ndarray:
    """This host's part of a global batch, shaped ``(local_devices, per_device, ...)``."""
    local = parallel.local_device_count()
    start = parallel.process_index() * local * per_device
    rows = global_batch[start:start + local * per_device]
    return rows.reshape((local, per_device) + rows.shape[1:])


def eval_state_template(config, rng: jax.Array):
    """``(model, state)``: the model of ``config`` and a zero State with its structure, shapes and dtypes.

    Enough to restore a checkpoint into (ours or the original's); the initialisation is only
    traced (``jax.eval_shape``), which is much faster than running it.
    """
    shapes = jax.eval_shape(lambda key: losses.init_train_state(key, config)[1], rng)
    return mutils.create_model(config), jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _wait_and_restore(checkpoint_dir: str, ckpt: int, template):
    """Restore ``checkpoint_<ckpt>``, waiting for it to appear (and retrying a partly written file)."""
    import time

    path = os.path.join(checkpoint_dir, f"checkpoint_{ckpt}")
    waited = False
    while not os.path.exists(path):
        if not waited and parallel.is_main_process():
            logging.warning("Waiting for the arrival of checkpoint_%d in %s", ckpt, checkpoint_dir)
            waited = True
        time.sleep(CHECKPOINT_POLL_S)
    for delay in (CHECKPOINT_POLL_S, 2 * CHECKPOINT_POLL_S, None):
        try:
            return checkpoints.restore_checkpoint(path, template)
        except (ValueError, OSError) as err:
            if delay is None:
                raise
            logging.warning("checkpoint_%d is not readable yet (%s); retrying in %.0f s", ckpt, err, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def evaluate(config, workdir: str, eval_folder: str = "eval", feature_extractor=None) -> dict:
    """Evaluate the checkpoints ``config.eval.begin_ckpt .. end_ckpt`` of ``workdir``, as the original.

    For each checkpoint (waiting for missing ones): the loss on the evaluation split
    (``eval.enable_loss``), bits/dim through the probability-flow ODE on ``eval.bpd_dataset``
    (``'test'`` is gone over 5 times; ``eval.enable_bpd``), and ``eval.num_samples`` samples
    with their Inception features and IS / FID / KID against the dataset statistics
    (``eval.enable_sampling``; per-host folders ``ckpt_<n>_host_<h>``). Evaluation and sampling
    use ``params_ema``. Checkpoints written by the original code are read too.

    Resumable: a meta file per host (``meta_<h>.json``) is written after every round, and a
    rerun continues at the next round with the same random numbers. The evaluation data are
    read in a canonical order (see ``evaluation.canonical_order``) and dequantised with
    seeded noise, so a resumed evaluation gives the numbers of an uninterrupted one.

    Files in ``workdir/eval_folder`` (the original's names): ``ckpt_<n>_loss.npz`` (``all_losses``,
    ``mean_loss``), ``<bpd_dataset>_ckpt_<n>_bpd_<round>.npz``, ``ckpt_<n>_host_<h>/samples_<r>.npz`` and
    ``statistics_<r>.npz`` (``pool_3``, ``logits``), ``report_<n>.npz`` (``IS``, ``fid``, ``kid``), plus
    ``summary.json`` / ``summary.md``. Numbers from a feature network other than the 2048-d
    Inception are labelled "(stand-in features)".

    Args:
        config: the training config (``eval.*`` fields select what is computed).
        workdir: the training run's folder (``checkpoints/`` inside).
        eval_folder: subfolder for the results.
        feature_extractor: an ``evaluation.FeatureExtractor`` to use instead of loading the
            Inception network (tests, offline smoke runs).

    Returns:
        The summary dict (also written as ``summary.json``).
    """
    import time

    import likelihood
    import sampling
    from score_sde import evaluation as evaluation_lib

    # Everything that can fail for want of a file fails here, before any long computation.
    names = None
    if config.eval.enable_sampling:
        extractor = feature_extractor or evaluation_lib.load_feature_extractor(config)
        stats_path = evaluation_lib.dataset_stats_path(config)
        data_stats = evaluation_lib.load_dataset_stats(stats_path)
        names = evaluation_lib.metric_names(extractor.is_inception, int(np.shape(data_stats["pool_3"])[1]))

    eval_dir = os.path.join(workdir, eval_folder)
    os.makedirs(eval_dir, exist_ok=True)
    host = parallel.process_index()
    rng = jax.random.PRNGKey(config.seed + 1)
    scaler = datasets.get_data_scaler(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    rng, model_rng = jax.random.split(rng)
    score_model, template = eval_state_template(config, model_rng)
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    sde, sampling_eps = sde_lib.get_sde(config)
    n_local = parallel.local_device_count()
    per_device = config.eval.batch_size // parallel.device_count()
    if per_device * parallel.device_count() != config.eval.batch_size or per_device == 0:
        raise ValueError(f"config.eval.batch_size = {config.eval.batch_size} must be a positive multiple of the "
                         f"number of devices ({parallel.device_count()}).")
    global_batch = config.eval.batch_size

    if config.eval.enable_loss:
        p_eval_step = make_train_and_eval_steps(config, sde, score_model)[1]
        loss_images = _eval_images(config, "test")
        num_loss_batches = len(loss_images) // global_batch
        if num_loss_batches == 0:
            raise ValueError(f"The evaluation split has {len(loss_images)} images, fewer than one batch "
                             f"(config.eval.batch_size = {global_batch}).")

    bpd_dataset = config.eval.bpd_dataset.lower()
    if bpd_dataset not in ("train", "test"):
        raise ValueError(f"config.eval.bpd_dataset = {config.eval.bpd_dataset!r}; use 'train' or 'test'.")
    bpd_num_repeats = 5 if bpd_dataset == "test" else 1
    if config.eval.enable_bpd:
        # The ODE solver and tolerances of config.sampling (new fields; the original's values by default).
        likelihood_fn = likelihood.get_likelihood_fn(
            sde, score_model, inverse_scaler, rtol=config.sampling.get("ode_rtol", 1e-5),
            atol=config.sampling.get("ode_atol", 1e-5), solver=config.sampling.get("ode_solver", "scipy"))
        bpd_images = _eval_images(config, bpd_dataset)
        bpd_batches_per_repeat = len(bpd_images) // global_batch
        if bpd_batches_per_repeat == 0:
            raise ValueError(f"The {bpd_dataset} split has {len(bpd_images)} images, fewer than one batch "
                             f"(config.eval.batch_size = {global_batch}).")
        num_bpd_rounds = bpd_batches_per_repeat * bpd_num_repeats
    else:
        num_bpd_rounds = 0

    if config.eval.enable_sampling:
        sampling_shape = (config.eval.batch_size // n_local, config.data.image_size, config.data.image_size,
                          config.data.num_channels)
        sampling_fn = sampling.get_sampling_fn(config, sde, score_model, sampling_shape, inverse_scaler,
                                               sampling_eps)
        num_sampling_rounds = -(-config.eval.num_samples // config.eval.batch_size)

    rng = parallel.fold_in_process(rng)
    meta = evaluation_lib.load_eval_meta(eval_dir, host)
    if meta is None:
        meta = evaluation_lib.EvalMeta(ckpt_id=config.eval.begin_ckpt, rng=evaluation_lib.key_to_list(rng))
    else:
        logging.info("Resuming the evaluation at checkpoint %d (loss done: %s, bits/dim rounds done: %d, "
                     "sampling rounds done: %d)", meta.ckpt_id, meta.loss_done, meta.bpd_rounds_done,
                     meta.sampling_rounds_done)

    def save_meta(**changes):
        nonlocal meta
        meta = meta.replace(**changes)
        evaluation_lib.save_eval_meta(eval_dir, host, meta)

    summary = {"title": f"Evaluation of {workdir}", "eval_dir": eval_dir, "checkpoints": {}}
    if config.eval.enable_sampling:
        summary["feature_extractor"] = extractor.name
        summary["dataset statistics"] = stats_path
    for ckpt in range(meta.ckpt_id, config.eval.end_ckpt + 1):
        if ckpt != meta.ckpt_id:
            save_meta(ckpt_id=ckpt, loss_done=False, bpd_rounds_done=0, sampling_rounds_done=0, metrics_done=False)
        rng = jax.numpy.asarray(np.asarray(meta.rng, np.uint32))
        state = _wait_and_restore(checkpoint_dir, ckpt, template)
        pstate = parallel.replicate(state)

        if config.eval.enable_loss and not meta.loss_done:
            all_losses = []
            for i in range(num_loss_batches):
                batch = loss_images[i * global_batch:(i + 1) * global_batch]
                if config.data.uniform_dequantization:
                    batch = evaluation_lib.dequantize(batch, (config.seed, 0, i))
                else:
                    batch = evaluation_lib.to_unit_float(batch)
                batch = _host_rows(scaler(batch), per_device)[:, None]
                rng, keys = device_keys(rng)
                (_, _), p_eval_loss = p_eval_step((keys, pstate), {"image": batch})
                all_losses.extend(np.asarray(parallel.unreplicate(p_eval_loss)).reshape(-1))
            all_losses = np.asarray(all_losses)
            if parallel.is_main_process():
                evaluation_lib.write_npz(os.path.join(eval_dir, f"ckpt_{ckpt}_loss.npz"), all_losses=all_losses,
                                         mean_loss=all_losses.mean())
            logging.info("ckpt: %d, eval loss: %.6e", ckpt, all_losses.mean())
            save_meta(loss_done=True, rng=evaluation_lib.key_to_list(rng))

        for bpd_round in range(meta.bpd_rounds_done, num_bpd_rounds):
            repeat, batch_id = divmod(bpd_round, bpd_batches_per_repeat)
            order = np.random.default_rng([config.seed, repeat]).permutation(len(bpd_images))
            batch = bpd_images[order[batch_id * global_batch:(batch_id + 1) * global_batch]]
            batch = _host_rows(scaler(evaluation_lib.dequantize(batch, (config.seed, 1, repeat, batch_id))),
                               per_device)
            rng, keys = device_keys(rng)
            bpd = np.asarray(likelihood_fn(keys, pstate, batch)[0]).reshape(-1)
            suffix = "" if parallel.process_count() == 1 else f"_host_{host}"
            evaluation_lib.write_npz(
                os.path.join(eval_dir, f"{bpd_dataset}_ckpt_{ckpt}_bpd_{bpd_round}{suffix}.npz"), bpd)
            logging.info("ckpt: %d, repeat: %d, batch: %d, mean bpd: %.6f", ckpt, repeat, batch_id, bpd.mean())
            save_meta(bpd_rounds_done=bpd_round + 1, rng=evaluation_lib.key_to_list(rng))

        if config.eval.enable_sampling:
            sample_dir = os.path.join(eval_dir, f"ckpt_{ckpt}_host_{host}")
            os.makedirs(sample_dir, exist_ok=True)
            for r in range(meta.sampling_rounds_done, num_sampling_rounds):
                logging.info("sampling -- ckpt: %d, round: %d of %d", ckpt, r + 1, num_sampling_rounds)
                rng, keys = device_keys(rng)
                samples, _ = sampling_fn(keys, pstate)
                samples = np.clip(np.asarray(samples) * 255.0, 0, 255).astype(np.uint8)
                samples = samples.reshape((-1, config.data.image_size, config.data.image_size,
                                           config.data.num_channels))
                evaluation_lib.write_npz(os.path.join(sample_dir, f"samples_{r}.npz"), samples=samples)
                latents = evaluation_lib.run_inception(samples, extractor)
                stats = {"pool_3": latents["pool_3"]}
                if latents["logits"] is not None:
                    stats["logits"] = latents["logits"]
                evaluation_lib.write_npz(os.path.join(sample_dir, f"statistics_{r}.npz"), **stats)
                save_meta(sampling_rounds_done=r + 1, rng=evaluation_lib.key_to_list(rng))

            report_file = os.path.join(eval_dir, f"report_{ckpt}.npz")
            if parallel.is_main_process() and not meta.metrics_done:
                pools, logits = [], []
                for h in range(parallel.process_count()):
                    host_dir = os.path.join(eval_dir, f"ckpt_{ckpt}_host_{h}")
                    files = [os.path.join(host_dir, f"statistics_{r}.npz") for r in range(num_sampling_rounds)]
                    waited = False
                    while not all(os.path.exists(f) for f in files):
                        if not waited:
                            logging.warning("Waiting for the sample statistics of host %d", h)
                            waited = True
                        time.sleep(30)
                    for f in files:
                        stat = evaluation_lib.read_npz(f)
                        pools.append(stat["pool_3"])
                        if "logits" in stat:
                            logits.append(stat["logits"])
                all_pools = np.concatenate(pools)[:config.eval.num_samples]
                all_logits = np.concatenate(logits)[:config.eval.num_samples] if logits else None
                evaluation_lib.check_stats_extractor(data_stats, extractor, stats_path, all_pools.shape[1])
                metrics = evaluation_lib.compute_metrics(all_pools, all_logits, data_stats["pool_3"])
                inception_score = metrics["IS"] if all_logits is not None else -1.0
                logging.info("ckpt-%d --- %s: %.6e, %s: %.6e, %s: %.6e", ckpt, names["IS"], inception_score,
                             names["fid"], metrics["fid"], names["kid"], metrics["kid"])
                evaluation_lib.write_npz(report_file, IS=inception_score, fid=metrics["fid"], kid=metrics["kid"],
                                         num_samples=len(all_pools), feature_extractor=np.asarray(extractor.name))
            else:
                while not os.path.exists(report_file):
                    time.sleep(1.0)
            save_meta(metrics_done=True)

        summary["checkpoints"][str(ckpt)] = evaluation_lib.summarize_checkpoint(eval_dir, ckpt, bpd_dataset, names)
        if parallel.is_main_process():
            evaluation_lib.write_summary(os.path.join(eval_dir, "summary"), summary)
        save_meta(ckpt_id=ckpt + 1, loss_done=False, bpd_rounds_done=0, sampling_rounds_done=0, metrics_done=False,
                  rng=evaluation_lib.key_to_list(rng))

    for ckpt in range(config.eval.begin_ckpt, config.eval.end_ckpt + 1):
        row = evaluation_lib.summarize_checkpoint(eval_dir, ckpt, bpd_dataset, names)
        if row:
            summary["checkpoints"][str(ckpt)] = row
    if parallel.is_main_process():
        evaluation_lib.write_summary(os.path.join(eval_dir, "summary"), summary)
    os.remove(evaluation_lib.eval_meta_path(eval_dir, host))
    return summary


def fid_stats(config, workdir: str, feature_extractor=None) -> str:
    """Compute the dataset statistics file used by FID / KID (``--mode fid_stats``).

    As the original's users were told to: every image of the training split, as uint8
    (no dequantisation, no dropped last batch), through the same feature network as
    :func:`evaluate`. Written to ``evaluation.dataset_stats_path(config)``
    (``config.eval.stats_dir``, default ``assets/stats/<dataset>_stats.npz``) with ``pool_3``,
    ``mu``, ``sigma``, ``logits`` and the network's name; a short JSON note goes to ``workdir``.

    Returns:
        The path of the statistics file.
    """
    from score_sde import evaluation as evaluation_lib

    extractor = feature_extractor or evaluation_lib.load_feature_extractor(config)
    images = _eval_images(config, "train")
    if images.dtype != np.uint8:
        images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
    logging.info("Computing features of %d training images with %s", len(images), extractor.name)
    latents = evaluation_lib.run_inception(images, extractor)
    path = evaluation_lib.dataset_stats_path(config)
    if parallel.is_main_process():
        evaluation_lib.save_dataset_stats(path, latents["pool_3"], extractor.name, logits=latents["logits"])
        os.makedirs(workdir, exist_ok=True)
        note = {"stats_file": os.path.abspath(path), "num_images": int(len(images)), "dataset": config.data.dataset,
                "image_size": int(config.data.image_size), "feature_extractor": extractor.name,
                "feature_dim": int(latents["pool_3"].shape[1]),
                "stand_in": evaluation_lib.metric_names(extractor.is_inception,
                                                        latents["pool_3"].shape[1])["fid"] != "FID"}
        with open(os.path.join(workdir, "fid_stats.json"), "w") as fout:
            json.dump(note, fout, indent=2)
        logging.info("Wrote %s (%d images, %d-d features)", path, len(images), latents["pool_3"].shape[1])
    return path
