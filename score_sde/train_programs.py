"""A training run's two big programs, the model's initialisation and the train step, compiled in the background.

Compiling (or, with a warm cache, loading) them is C++ work that leaves Python free. ``main.py --mode
train`` traces and lowers both before it imports TensorFlow and builds the data pipeline (the init only
for a fresh run: a resumed one restores into a State of zeros), then hands them to two worker threads;
``run_lib.train`` waits for each only where it first runs it. Measured on the README's digits run:
docs/performance.md, "Compiling in the background while TensorFlow imports".
A job that stops with an error exits once the compilations under way are done (they cannot be
cancelled); ``run_lib.train`` therefore starts the train step only after the checkpoint is restored.

Nothing here imports TensorFlow. The programs are lowered for the shapes the run will call them
with (:func:`models.utils.init_inputs`, :func:`score_sde.parallel.replicated_shapes`, the data
pipeline's batch shape), and the run calls the compiled programs themselves (``jax.stages.Compiled``): the
train step is compiled once per run (``tests/test_compile_count.py``).

Where the program cache is on (:mod:`score_sde.program_cache`: ``main.py`` with JAX's compilation cache, single
process), a run whose programs are stored there loads them in the worker threads and traces neither; a run
that compiles them stores them there afterwards, in the same threads.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
from typing import Callable

import jax
import numpy as np

import losses
import sde_lib
from models import utils as mutils
from score_sde import job_lock, parallel, program_cache
from score_sde.train_checkpoints import resume_candidates, zeros_like_shapes
from score_sde.train_steps import make_train_and_eval_steps
from score_sde.workdir_config import WorkdirConfigError, check_workdir_config

# Data sets that are always present (shipped, or drawn from a formula), so a run on them cannot stop at
# loading its data after the programs started compiling (a missing tfds set must stop first; run_lib.train).
ALWAYS_AVAILABLE_DATASETS = frozenset({"DIGITS", "GMM"})


def batch_shape(config) -> tuple[int, ...]:
    """The train pipeline's batch of images: ``(local_devices, n_jitted_steps, batch // devices, H, W, C)``.

    As ``score_sde.datasets.get_dataset(config, additional_dim=config.training.n_jitted_steps)`` makes it.
    """
    return (*parallel.batch_dims(config.training.batch_size, config.training.n_jitted_steps),
            config.data.image_size, config.data.image_size, config.data.num_channels)


# Two named functions, not one: a compilation is attributed to the function that asks for it (the listener of
# tests/test_compile_count.py reads the worker's stack), so the init and the train step stay told apart.
def _compile_init(init_lowered):
    return init_lowered.compile()


def _compile_train_step(train_step_lowered):
    return train_step_lowered.compile()


COMPILERS = {"init": _compile_init, "train_step": _compile_train_step}


def _compile_and_store(cache: program_cache.ProgramCache, key: str, program: str, lowered: jax.stages.Lowered,
                       extras: dict, done: concurrent.futures.Future | None = None) -> jax.stages.Compiled | None:
    """Compile ``lowered`` and store it in ``cache`` if XLA compiled it here (:func:`program_cache.compile_storable`).

    ``done``, if given, receives the program (or the compilation's error) as soon as it is compiled, before it is
    stored: the run need not wait for the write.
    """
    try:
        compiled, storable = program_cache.compile_storable(COMPILERS[program], lowered)
    except BaseException as err:
        if done is None:
            raise
        done.set_exception(err)
        return None
    if done is not None:
        done.set_result(compiled)
    if storable:
        cache.store(key, program, compiled, extras)
    else:
        logging.info("Program cache: the %s came from JAX's compilation cache and cannot be stored from there; it "
                     "is stored the next time XLA compiles it (to have that happen on the next run, at the cost of "
                     "one cold start, delete %s).", program.replace("_", " "), os.path.dirname(cache.folder))
    return compiled


def _load_or_compile(cache: program_cache.ProgramCache, key: str, program: str, entry: program_cache.Entry,
                     lower: Callable[[], jax.stages.Lowered]) -> jax.stages.Compiled:
    """``entry`` loaded; if it cannot be, the program traced, compiled and stored again (in this worker thread)."""
    compiled = cache.load(key, program, entry)
    if compiled is None:
        compiled = _compile_and_store(cache, key, program, lower(), entry.extras)
    return compiled


def _in_worker(function, *args) -> concurrent.futures.Future:
    """``function(*args)`` in a worker thread of its own.

    Not a daemon thread: a process that ends while XLA compiles in a daemon thread aborts (measured: SIGABRT at
    exit), so a job that stops with an error exits once its running compilations (and cache writes) are done.
    """
    worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile")
    future = worker.submit(function, *args)
    worker.shutdown(wait=False)
    return future


class TrainPrograms:
    """The model, SDE and pmapped steps of ``config``, with the init and train step compiling in worker threads.

    The init starts compiling at once, or with ``start_init=False`` at :meth:`start_init` or :meth:`initial_state`
    (a resumed run restores into :meth:`state_template` and never needs it); the train step when
    :meth:`start_train_step` is called (``run_lib.train`` calls it once the State is restored, so a damaged
    checkpoint stops the job without waiting for it; :func:`start_before_data` at once).

    Attributes:
        model: the Flax module (:func:`models.utils.create_model`).
        sde, sampling_eps: :func:`sde_lib.get_sde` of the config.
        p_eval_step: the pmapped eval step (compiled at its first call, as before).

    Use :meth:`initial_state` for the fresh State and :meth:`train_step` for the pmapped train step;
    each waits for its program. A compilation error is raised there, in the calling thread.
    """

    def __init__(self, config, start_init: bool = True):
        self.config = config
        self.model = mutils.create_model(config)
        self._init_fn = mutils.jitted_init(self.model)
        self.sde, self.sampling_eps = sde_lib.get_sde(config)
        self._p_train_step, self.p_eval_step = make_train_and_eval_steps(config, self.sde, self.model)
        self._rng = jax.eval_shape(jax.random.PRNGKey, 0)
        self._cache = program_cache.active()
        self._key = self._cache.key(config) if self._cache is not None else None
        self._entries = {}
        self._writes = []
        self._init = None
        self._train_step = None
        self._state_shapes = None
        if start_init:
            self.start_init()

    def _stored(self, program: str) -> program_cache.Entry | None:
        """The program cache's entry for ``program`` of this run (read once), or None."""
        if self._cache is None:
            return None
        if program not in self._entries:
            self._entries[program] = self._cache.read(self._key, program)
            if self._entries[program] is not None:
                logging.info("Loading the %s from the program cache (%s).", program.replace("_", " "),
                             self._cache.folder)
        return self._entries[program]

    def _start(self, program: str, lower: Callable[[], jax.stages.Lowered], extras: dict) -> concurrent.futures.Future:
        """Load ``program`` from the program cache, or lower it here and compile (and store) it, in a worker thread."""
        entry = self._stored(program)
        if entry is not None:
            loading = _in_worker(_load_or_compile, self._cache, self._key, program, entry, lower)
            # Keep the extras only: the executable's bytes (megabytes) are the worker's until loaded.
            self._entries[program] = dataclasses.replace(entry, executable=b"")
            return loading
        if self._cache is None:
            return _in_worker(COMPILERS[program], lower())
        compiled = concurrent.futures.Future()
        self._writes.append(_in_worker(_compile_and_store, self._cache, self._key, program, lower(), extras, compiled))
        return compiled

    def wait_for_cache_writes(self) -> None:
        """Return once the programs this run compiled are in the program cache (they are written after compiling)."""
        for write in self._writes:
            write.result()

    def start_init(self) -> None:
        """Start loading or compiling the model's initialisation (once; later calls do nothing)."""
        if self._init is None:
            self._init = self._start("init", self._lower_init, {})

    def _lower_init(self) -> jax.stages.Lowered:
        return self._init_fn.lower(*jax.eval_shape(functools.partial(mutils.init_inputs, config=self.config),
                                                   self._rng))

    def state_shapes(self):
        """The State's structure, shapes and dtypes (``jax.ShapeDtypeStruct`` leaves): stored with the train step in
        the program cache, else traced once (never run)."""
        if self._state_shapes is None:
            entry = self._stored("train_step")
            if entry is not None and "state_shapes" in entry.extras:
                self._state_shapes = entry.extras["state_shapes"]
            else:
                # Traces the init (_lower_init reuses this trace, or this reuses its) and the optimizer's.
                self._state_shapes = jax.eval_shape(
                    lambda r: losses.init_train_state(r, self.config, model=self.model, init_fn=self._init_fn)[1],
                    self._rng)
        return self._state_shapes

    def state_template(self):
        """A State of zeros shaped like :meth:`initial_state`'s, to restore a checkpoint into.

        A checkpoint gives every value of the State (ours and the original's alike), so a resumed run needs
        the shapes only, and the init is then never compiled or run.
        """
        return zeros_like_shapes(self.state_shapes())

    def start_train_step(self) -> None:
        """Start loading or compiling the train step for the run's shapes (once; later calls do nothing).

        Several processes: pmap lowers host-local arrays, not shapes (jax 0.10.2 fails on them), so there the
        train step compiles at its first call, as it always did.
        """
        if self._train_step is not None or parallel.process_count() > 1:
            return
        state = self.state_shapes()
        self._train_step = self._start("train_step", self._lower_train_step, {"state_shapes": state})

    def _lower_train_step(self) -> jax.stages.Lowered:
        keys = jax.eval_shape(parallel.split_per_device, self._rng)[1]
        batch = {"image": jax.ShapeDtypeStruct(batch_shape(self.config), np.float32)}
        return self._p_train_step.lower((keys, parallel.replicated_shapes(self.state_shapes())), batch)

    def initial_state(self, rng: jax.Array):
        """The fresh training State of :func:`losses.init_train_state` for ``rng``, once the init is compiled."""
        self.start_init()
        return losses.init_train_state(rng, self.config, model=self.model, init_fn=self._init.result())[1]

    def train_step(self):
        """The pmapped train step (:func:`score_sde.train_steps.make_train_and_eval_steps`), once compiled: the
        compiled program itself where it was started (:meth:`start_train_step`), else the pmapped function."""
        if self._train_step is not None:
            return self._train_step.result()
        return self._p_train_step


def start_before_data(config, workdir: str) -> TrainPrograms | None:
    """:class:`TrainPrograms` for ``main.py --mode train``, or None where the job must check its data first.

    None (``run_lib.train`` then starts them itself, after loading the data) unless the data set is one
    of :data:`ALWAYS_AVAILABLE_DATASETS`, the workdir accepts the config and the workdir can be created:
    a refused config, an unwritable workdir or one that another training job holds stops the job in
    ``run_lib.train`` before anything compiles.
    """
    if config.data.dataset not in ALWAYS_AVAILABLE_DATASETS:
        return None
    has_checkpoints = bool(resume_candidates(os.path.join(workdir, "checkpoints-meta"),
                                             os.path.join(workdir, "checkpoints")))
    try:
        check_workdir_config(config, workdir, has_checkpoints)
        os.makedirs(workdir, exist_ok=True)  # as run_lib.train does next
        if parallel.is_main_process():
            job_lock.ensure_free(workdir)  # run_lib.train takes it
    except (WorkdirConfigError, OSError, job_lock.FolderInUseError):
        return None
    logging.info("Compiling (or loading) the model's initialisation and train step in the background while the "
                 "data load.")
    programs = TrainPrograms(config, start_init=not has_checkpoints)
    programs.start_train_step()
    return programs
