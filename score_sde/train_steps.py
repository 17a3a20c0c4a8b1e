"""The pmapped train and eval steps of a config, with the host-side batch and key helpers that feed them.

Used by ``run_lib.train``, the evaluation loss (``score_sde.eval_job``), the dequantiser's training
and the mixture models of ``score_sde.mixture_training``.
"""
from __future__ import annotations

import functools
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


FUSIONS = ("auto", "unroll", "scan")
"""Values of ``config.training.fuse_steps_with`` (absent: ``'auto'``); see :func:`fusion`."""


def fusion(choice: str = "auto", backend: str | None = None) -> str:
    """How ``n_jitted_steps`` steps are fused into one program: ``'unroll'`` or ``'scan'``.

    ``'auto'`` unrolls on a CPU backend and scans elsewhere. On XLA:CPU (jax 0.10.2, 2 cores) a train step of the
    digits DDPM++ inside ``lax.scan``'s while loop ran 5.5 s against 0.23 s unrolled (2026-12-03). Unrolling
    compiles one copy of the step per fused step, and compile time grows faster than that: 94.8 s for 5 fused
    digits steps against 20.6 s for one (docs/performance.md, "Compilation"); on an H200 one step of the benchmark
    DDPM++ compiled in 50 s. GPUs and TPUs run ``lax.scan`` as the original did (its ``lax.scan`` over
    ``n_jitted_steps``), which compiles about one step (on the CPU: ~27 s for 5 scanned digits steps, 20 s for one,
    80 s for 5 unrolled). ``backend``: default ``jax.default_backend()``.
    """
    if choice not in FUSIONS:
        raise ValueError(f"config.training.fuse_steps_with={choice!r} is not allowed; allowed values: "
                         f"{', '.join(map(repr, FUSIONS))}")
    if choice != "auto":
        return choice
    return "unroll" if (backend or jax.default_backend()) == "cpu" else "scan"


def config_fusion(config) -> str:
    """:func:`fusion` of ``config.training.fuse_steps_with`` (absent from the original's configs: ``'auto'``)."""
    return fusion(config.training.get("fuse_steps_with", "auto"))


def fuse_steps(step_fn: Callable, how: str = "unroll") -> Callable:
    """``fused((rng, state), batch) -> ((rng, state), losses)``: ``step_fn`` applied to each ``batch['image'][i]``.

    ``how='scan'``: ``functools.partial(jax.lax.scan, step_fn)``, the original's fusion; ``'unroll'``: the same
    steps as straight-line code, one copy of the step per fused step (XLA:CPU runs ``lax.scan``'s loop slowly;
    :func:`fusion` says which to use where).
    """
    if how == "scan":
        return functools.partial(jax.lax.scan, step_fn)
    if how != "unroll":
        raise ValueError(f"fuse_steps(how={how!r}): 'unroll' or 'scan'")

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
    :func:`fuse_steps`, unrolled or scanned as :func:`config_fusion` says; ``batch['image']``:
    ``(local_devices, n, per_device_batch, H, W, C)``);
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
    how = config_fusion(config)
    p_train_step = parallel.pmap(fuse_steps(train_step, how), donate_argnums=(0,))
    p_eval_step = parallel.pmap(fuse_steps(eval_step, how))
    return p_train_step, p_eval_step
