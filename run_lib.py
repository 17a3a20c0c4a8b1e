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

import functools
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


def make_train_and_eval_steps(config, sde: sde_lib.SDE, model) -> tuple[Callable, Callable]:
    """The pmapped multi-step train and eval functions of ``config``.

    ``p_train_step((keys, pstate), batch) -> ((keys, pstate), losses)`` runs
    ``n = batch['image'].shape[1]`` training steps per device fused with ``lax.scan``
    (``batch['image']``: ``(local_devices, n, per_device_batch, H, W, C)``); ``losses`` is
    ``(local_devices, n)``. The input state is donated (do not reuse it).
    ``p_eval_step`` has the same signature, scores ``params_ema`` and changes nothing.
    """
    kwargs = dict(reduce_mean=config.training.reduce_mean, continuous=config.training.continuous,
                  likelihood_weighting=config.training.likelihood_weighting)
    train_step = losses.get_step_fn(sde, model, train=True, optimize_fn=losses.optimization_manager(config), **kwargs)
    eval_step = losses.get_step_fn(sde, model, train=False, **kwargs)
    p_train_step = parallel.pmap(functools.partial(jax.lax.scan, train_step), donate_argnums=(0,))
    p_eval_step = parallel.pmap(functools.partial(jax.lax.scan, eval_step))
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
    """Save snapshot samples ``(..., H, W, C)`` in [0, 1] as a PNG grid plus a uint8 ``.npy``; returns the PNG path."""
    images = np.asarray(samples).reshape((-1,) + np.asarray(samples).shape[-3:])
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

def train(config, workdir: str) -> None:
    """Train the score model of ``config``, resuming from ``workdir/checkpoints-meta`` if present.

    Every ``training.n_jitted_steps`` steps run as one pmapped ``lax.scan`` call. After a
    call that ends at step ``s``: the loss is logged when ``s % log_freq == 0``; a meta
    checkpoint is written when ``s % snapshot_freq_for_preemption == 0``; the evaluation
    loss when ``s % eval_freq == 0``; a numbered checkpoint (and snapshot samples if
    ``training.snapshot_sampling``) when ``s % snapshot_freq == 0`` and at the end.
    Training ends at the first multiple of ``n_jitted_steps`` that reaches ``training.n_iters``.

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
        _train(config, workdir, sample_dir, tb_dir, checkpoint_dir, checkpoint_meta_dir)
    finally:
        if log_handler is not None:
            logging.getLogger().removeHandler(log_handler)
            log_handler.close()


def _train(config, workdir, sample_dir, tb_dir, checkpoint_dir, checkpoint_meta_dir) -> None:
    save_config(config, workdir)
    is_main = parallel.is_main_process()
    writer = metric_writers.create_default_writer(tb_dir, just_logging=not is_main)

    # Model, optimizer and state; resume from the latest meta checkpoint when there is one.
    model, state = losses.init_train_state(jax.random.PRNGKey(config.seed), config)
    state = checkpoints.restore_checkpoint(checkpoint_meta_dir, state)
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
