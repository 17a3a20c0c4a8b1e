"""The pmapped train and eval steps of a config, with the host-side batch and key helpers that feed them.

Used by ``run_lib.train``, the evaluation loss (``score_sde.eval_job``), the dequantiser's training
and the mixture models of ``score_sde.mixture_training``.
"""
from __future__ import annotations

from typing import Callable, Iterator

import jax
import numpy as np

import losses
import sde_lib
from score_sde import parallel


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
    into straight-line code: on XLA:CPU (jax 0.10.2, 2 cores) a train step of the digits DDPM++
    inside ``lax.scan``'s while loop ran 5.5 s against 0.23 s unrolled (2026-12-03). Unrolling
    costs compile and cache-load time, which grow faster than the number of fused steps
    (docs/performance.md, "Compilation"); on a CPU fusing buys little per step, hence the digits
    configs' one step per call.
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
    # importance_weighting / smallest_time: score_flow's fields (configs/score_flow); absent from the original's.
    kwargs = dict(reduce_mean=config.training.reduce_mean, continuous=config.training.continuous,
                  likelihood_weighting=config.training.likelihood_weighting,
                  importance_weighting=config.training.get("importance_weighting", False),
                  smallest_time=config.training.get("smallest_time", 1e-5))
    train_step = losses.get_step_fn(sde, model, train=True, optimize_fn=losses.optimization_manager(config), **kwargs)
    eval_step = losses.get_step_fn(sde, model, train=False, **kwargs)
    p_train_step = parallel.pmap(fuse_steps(train_step), donate_argnums=(0,))
    p_eval_step = parallel.pmap(fuse_steps(eval_step))
    return p_train_step, p_eval_step
