"""``--mode sample``: samples from a checkpoint with the configured sampler, with their grids and reverse-process GIF.

:func:`sample` is ``run_lib.sample``'s work: it picks the checkpoint, draws the samples in batches and
writes them, complete or not at all, to a folder named after the method and checkpoint (see its docstring
for the files). 2-D data get ``score_field.png`` (``score_sde.sample_plots``) instead of the GIF.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
import numpy as np

import sampling
import sde_lib
from models import utils as mutils
from score_sde import checkpoints, data_scaling, eval_checks, ode, parallel, reporting, sample_plots
from score_sde.train_checkpoints import eval_state_template
from score_sde.train_steps import device_keys


class SamplingError(eval_checks.EvaluationError):
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
                            f"{eval_checks.number_ranges(sorted(found))}. Leave the field unset for the newest.")
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
    scaler = data_scaling.get_data_scaler(config)  # the score is taken in model space; the scalers scale by > 0
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
        sampling_fn = sampling.get_sampling_fn(config, sde, model, shape, data_scaling.get_data_inverse_scaler(config),
                                               sampling_eps, record=_recording(config, shape))
    except (ValueError, NotImplementedError) as err:
        raise SamplingError(eval_checks.one_line(err)) from err
    try:
        state = checkpoints.restore_checkpoint(ckpt_path, template)
    except (ValueError, OSError) as err:  # checkpoints.CorruptCheckpointError is a ValueError
        raise SamplingError(f"Cannot sample from {ckpt_path}: {eval_checks.one_line(err)}") from err
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
