"""What a training loop does around its checkpoints: resume from the newest, save only finite states.

:func:`restore_newest` resumes from the newest readable checkpoint of ``checkpoints-meta/`` and
``checkpoints/`` (by the step in each file's footer, :func:`resume_candidates`); a state whose loss
or parameters are NaN / infinite is never saved, the loop stops with :func:`divergence_error`
instead; :func:`eval_state_template` is the zero state a checkpoint is restored into for evaluation and
sampling. Used by ``run_lib``, ``score_sde.eval_job``, ``score_sde.sample_job`` and ``score_sde.dequantizer_train``.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

import losses
from models import utils as mutils
from score_sde import checkpoints, parallel


class TrainingDivergedError(FloatingPointError):
    """The training loss (or the parameters) became NaN or infinite; training stopped."""


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of ``tree`` (any pytree of arrays) holds finite values only."""
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.floating))


def checkpoint_state(pstate, rng) -> Any:
    """The first replica of ``pstate`` on the host, carrying the host loop's ``rng`` (as the original)."""
    return parallel.unreplicate_to_host(pstate).replace(rng=jax.device_get(rng))


def eval_state_template(config, rng: jax.Array):
    """``(model, state)``: the model of ``config`` and a zero State with its structure, shapes and dtypes.

    Enough to restore a checkpoint into (ours or the original's); the initialisation is only
    traced (``jax.eval_shape``), which is much faster than running it. The model computes in float32
    whatever ``config.model.dtype`` (the training compute dtype): evaluation and sampling stay float32.
    """
    shapes = jax.eval_shape(lambda key: losses.init_train_state(key, config)[1], rng)
    model = mutils.float32_model(mutils.create_model(config))
    return model, zeros_like_shapes(shapes)


def zeros_like_shapes(shapes: Any) -> Any:
    """Host zeros with the structure, shapes and dtypes of ``shapes`` (a pytree of ``jax.ShapeDtypeStruct``, e.g.
    a State from ``jax.eval_shape``): a template to restore a checkpoint into, which gives every value."""
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def resume_candidates(checkpoint_meta_dir: str, checkpoint_dir: str) -> list[str]:
    """Every checkpoint of the two folders, the one to resume from first.

    Newest training step first (the step in each file's footer); at equal steps the meta
    checkpoint first. Files without a footer (the original code's, or an older version's) come
    after those with one, meta before numbered and the highest number first, as before.
    """
    found = []
    for is_meta, folder in ((1, checkpoint_meta_dir), (0, checkpoint_dir)):
        for number, path in checkpoints.numbered_checkpoints(folder):
            step = checkpoints.checkpoint_step(path)
            found.append(((step is not None, -1 if step is None else step, is_meta, number), path))
    return [path for _, path in sorted(found, reverse=True)]


def resume_step(candidates: list[str]) -> int:
    """The step a run resumes at, as the footer of the first of its :func:`resume_candidates` says (0: none)."""
    return (checkpoints.checkpoint_step(candidates[0]) or 0) if candidates else 0


def restore_newest(template, checkpoint_meta_dir: str, checkpoint_dir: str):
    """``template`` restored from the newest readable checkpoint of the two folders (``template`` if none).

    A corrupt file is skipped with a warning naming it (e.g. a damaged meta checkpoint falls back
    to the numbered checkpoint of the same step); if every checkpoint is corrupt, the first error.
    """
    first_error = None
    for path in resume_candidates(checkpoint_meta_dir, checkpoint_dir):
        try:
            state = checkpoints.restore_checkpoint(path, template)
        except checkpoints.CorruptCheckpointError as err:
            if parallel.is_main_process():
                logging.warning("%s Trying the next newest checkpoint.", err)
            first_error = first_error or err
            continue
        if first_error is not None and parallel.is_main_process():
            logging.warning("Resuming from %s (step %d) instead.", path, int(state.step))
        return state
    if first_error is not None:
        raise first_error
    return template


def use_config_rates(state, config):
    """``state`` with ``config.optim.lr`` and ``config.model.ema_rate``: the command line wins over a checkpoint.

    The original kept both in the state, so a restart silently went on with the checkpoint's values
    whatever the config said; here each value that changes is logged.
    """
    for field, name, value in (("optim.lr", "lr", config.optim.lr), ("model.ema_rate", "ema_rate",
                                                                     config.model.ema_rate)):
        old = float(np.asarray(getattr(state, name)))
        # Compared as stored: a checkpoint holds them in float32.
        if np.float32(old) != np.float32(value) and parallel.is_main_process():
            logging.info("config.%s = %g replaces the checkpoint's %g from step %d on.", field, value, old,
                         int(state.step))
    return state.replace(lr=config.optim.lr, ema_rate=config.model.ema_rate)


def divergence_error(step: int, what: str, config, checkpoint_meta_dir: str,
                     checkpoint_dir: str) -> TrainingDivergedError:
    """The error to raise when ``what`` (e.g. ``'the training loss'``) is NaN / infinite after ``step``.

    It names the checkpoint a rerun would resume from and what to change (``config.optim.lr``, ...).
    """
    candidates = resume_candidates(checkpoint_meta_dir, checkpoint_dir)
    kept = f"the last good checkpoint is kept at {candidates[0]}" if candidates else "no checkpoint had been written yet"
    return TrainingDivergedError(
        f"Training diverged: {what} is NaN or infinite after step {step}; stopped without saving it, {kept}. "
        f"Run the same command again with a lower learning rate, e.g. --config.optim.lr={config.optim.lr / 2:g} "
        "(on a restart the config's optim.lr and model.ema_rate replace the checkpoint's); also keep "
        "config.optim.grad_clip >= 0 and check the data scaling (config.data.centered).")
