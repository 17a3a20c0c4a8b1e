"""Every device- and process-parallel detail in one place.

score_sde runs data parallel with ``jax.pmap`` over the local devices, the way the
original did. ``pmap`` is in maintenance mode since JAX 0.8 but supported; all other
modules call the helpers here (never ``jax.pmap`` / ``jax.device_put_replicated``
directly), so moving to ``jit`` + sharding later touches this file only.

Conventions: a *replicated* pytree has a leading axis of size ``local_device_count()``;
a *sharded* batch has shape ``(local_device_count(), per_device_batch, ...)``.
The collective axis is always named ``'batch'`` (the original's name, which the train
step uses in ``lax.pmean``).

Code that runs both under :func:`pmap` and on its own (the Langevin corrector's batch-averaged
norms) averages with :func:`pmean_over_devices`, over the axis declared by :func:`device_axis`.
:func:`pmap` declares its own axis while tracing; under any other mapping (``jax.pmap`` or
``jax.vmap`` with another ``axis_name``) declare it with ``device_axis(name)``, or the average
is over one call's batch only. Nothing is guessed: an undeclared axis is never averaged over and
a declared one that is not bound raises JAX's unbound-axis ``NameError``. A declaration acts
when a function is traced: a function that ``jax.jit`` already traced outside the block keeps
that trace (the samplers build their functions afresh inside :func:`pmap`).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

AXIS_NAME = "batch"


def local_device_count() -> int:
    """Number of devices attached to this process."""
    return jax.local_device_count()


def device_count() -> int:
    """Number of devices over all processes."""
    return jax.device_count()


def process_index() -> int:
    """Index of this process (host) among ``process_count()``; 0 writes files."""
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main_process() -> bool:
    """True on the process that writes checkpoints, summaries and samples."""
    return jax.process_index() == 0


# The axis pmean_over_devices averages over, per thread (JAX traces a function in the calling thread).
_declared = threading.local()


@contextlib.contextmanager
def device_axis(name: str | None) -> Iterator[None]:
    """Declare ``name`` as the mapped axis that :func:`pmean_over_devices` averages over, for code traced inside
    this block (``None``: no device axis, averages are over one call's batch)."""
    previous = getattr(_declared, "axis", None)
    _declared.axis = name
    try:
        yield
    finally:
        _declared.axis = previous


def pmean_over_devices(x: Any) -> Any:
    """Mean over the axis declared by :func:`device_axis` (inside :func:`pmap`: ``'batch'``); identity where none is
    declared."""
    name = getattr(_declared, "axis", None)
    return x if name is None else jax.lax.pmean(x, axis_name=name)


def pmap(fn: Callable, *, static_broadcasted_argnums: Sequence[int] = (), donate_argnums: Sequence[int] = ()) -> Callable:
    """``jax.pmap`` over local devices with the collective axis named ``'batch'``, declared for
    :func:`pmean_over_devices` while ``fn`` is traced."""

    @functools.wraps(fn)
    def declared(*args, **kwargs):
        with device_axis(AXIS_NAME):
            return fn(*args, **kwargs)

    return jax.pmap(declared, axis_name=AXIS_NAME, static_broadcasted_argnums=tuple(static_broadcasted_argnums),
                    donate_argnums=tuple(donate_argnums))


def pmean(x: Any) -> Any:
    """Mean over the ``'batch'`` axis inside a :func:`pmap`-ed function."""
    return jax.lax.pmean(x, axis_name=AXIS_NAME)


def replicate(tree: Any) -> Any:
    """Copy a pytree to every local device (adds the leading device axis)."""
    # jax.device_put_replicated is removed in jax 0.10; this is its documented replacement. The
    # sharding is the one pmap gives its outputs (a mesh axis named like the collective axis):
    # with any other, the first call's inputs differ from later calls' and the step compiles twice.
    sharding = _replicated_sharding()
    n = local_device_count()
    return jax.tree_util.tree_map(lambda x: jax.device_put(np.stack([np.asarray(x)] * n), sharding), tree)


def replicated_shapes(tree: Any) -> Any:
    """What :func:`replicate` makes of a pytree of arrays or ``jax.ShapeDtypeStruct`` s, as ``ShapeDtypeStruct`` s.

    The leading device axis, the canonical dtype (a Python scalar's ``float64`` becomes ``float32``, and no weak
    type) and the sharding are those of :func:`replicate`'s arrays, so a function lowered for these shapes
    (ahead of time, ``score_sde.train_programs``) is the one later called with the replicated arrays.
    """
    sharding = _replicated_sharding()
    n = local_device_count()

    def shape(x):
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        return jax.ShapeDtypeStruct((n,) + tuple(np.shape(x)), jax.dtypes.canonicalize_dtype(dtype), sharding=sharding)

    return jax.tree_util.tree_map(shape, tree)


def _replicated_sharding() -> jax.sharding.Sharding:
    return jax.NamedSharding(jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS_NAME,)), jax.P(AXIS_NAME))


def unreplicate(tree: Any) -> Any:
    """The first replica of a replicated pytree (removes the leading device axis)."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def unreplicate_to_host(tree: Any) -> Any:
    """One replica of a replicated pytree as host numpy arrays (the leading device axis removed).

    Copies the first local device's shard of each leaf: unlike ``device_get(unreplicate(tree))``
    this compiles nothing (``x[0]`` compiles a slicing program for every distinct leaf shape, some
    thirty for a State) and transfers one replica, not all of them.
    """

    def first(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)[0]
        return np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:])

    return jax.tree_util.tree_map(first, tree)


def batch_dims(batch_size: int, additional_dim: int | None = None) -> list[int]:
    """The leading axes of a global batch of ``batch_size`` on this host: ``[local_devices, [additional_dim,]
    batch_size // device_count()]`` (the data pipelines batch this way; the caller checks divisibility)."""
    dims = [local_device_count()] + ([additional_dim] if additional_dim is not None else [])
    return dims + [batch_size // device_count()]


def shard(batch: Any) -> Any:
    """Reshape arrays ``(global_local_batch, ...)`` to ``(local_devices, per_device, ...)``."""
    n = local_device_count()

    def _reshape(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.shape[0] % n:
            raise ValueError(f"Batch of {x.shape[0]} examples does not split over {n} local devices; "
                             f"make the batch size a multiple of the device count.")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return jax.tree_util.tree_map(_reshape, batch)


def unshard(batch: Any) -> Any:
    """Inverse of :func:`shard`: merge the device axis into the batch axis."""
    return jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)


def split_per_device(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split ``rng`` into a new carry key and one key per local device, ``(n, 2)``."""
    keys = jax.random.split(rng, local_device_count() + 1)
    return keys[0], keys[1:]


def fold_in_process(rng: jax.Array) -> jax.Array:
    """Make the key differ between processes (hosts), as the original's ``fold_in(rng, host_id)``."""
    return jax.random.fold_in(rng, process_index())


def training_loop_key(rng: jax.Array, resumed: bool) -> jax.Array:
    """This process's key for a training loop that starts from ``rng`` (the seed's key or a checkpoint's).

    A fresh run folds in the process index, as the original. A resumed run continues the checkpoint's
    key, which process 0 saved: process 0 goes on with it unchanged and so draws the keys an
    uninterrupted run would; the other processes fold in their index. (The original folded again at
    every restart, so its resumed runs left the interrupted run's key stream.)
    """
    if resumed and is_main_process():
        return rng
    return fold_in_process(rng)


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
    """Join a multi-process run when a coordinator is given (flags or environment).

    Reads ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` when the
    arguments are None. On CPU, cross-process collectives use gloo. Returns True if
    ``jax.distributed.initialize`` was called.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator_address:
        return False
    num_processes = num_processes if num_processes is not None else int(os.environ["JAX_NUM_PROCESSES"])
    process_id = process_id if process_id is not None else int(os.environ["JAX_PROCESS_ID"])
    # Only affects the CPU backend; must be set before any backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True

