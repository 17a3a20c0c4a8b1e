"""One home for solving ODEs: the probability-flow sampler (``sampling``) and the likelihood (``likelihood``)
call :func:`solve_jax` or :func:`solve_scipy`, as ``solver`` ('jax' or 'scipy', :data:`DEFAULT_SOLVER`
'jax') says.

Two solvers with one calling convention (``fn(t, y)`` in, ``(y1, nfe)`` out), both adaptive explicit Runge–Kutta pairs with the same
step-size control (Hairer, Nørsett & Wanner, *Solving ODEs I*, II.4, as ``scipy.integrate``
implements it):

* ``solver='scipy'`` — :func:`solve_scipy`: ``scipy.integrate.solve_ivp`` on the host, state
  flattened to one float64 vector, ``fn`` called once per evaluation. This is the original
  score_sde's path and reproduces its numbers; any ``solve_ivp`` method works.
* ``solver='jax'`` — :func:`solve_jax`: the whole solve is one traceable program
  (``lax.while_loop`` over attempted steps, ``lax.scan`` over the stages of a step), usable
  under ``jit`` and ``pmap`` with no host round trip per step. It uses scipy's own Butcher
  tableaus and mirrors scipy's controller (initial step, safety factor 0.9, growth limits
  0.2..10, RMS error norm, no growth right after a rejection), so at the same method and
  tolerance it takes the same steps up to float32 round-off: the same NFE, or one step more or
  fewer where an error norm within round-off of 1 is accepted by one and rejected by the other
  (``tests/test_ode.py``, ``tests/test_sampling.py``).

Choosing the method (``rtol = atol = 1e-5``, Gaussian test data of ``tests/golden``, bits/dim
error against the exact flow for VP / subVP / VE, with NFE):

* ``'dopri5'`` (= scipy ``'RK45'``, Dormand–Prince 5(4), 6 evaluations per step with FSAL) with
  scipy's RMS error norm is the default of :func:`solve_jax` and of the ODE sampler: it takes the
  same steps as the original's scipy RK45 (44 / 62 / 116 NFE; error 1.3e-5 / 9.5e-6 / 3.8e-5).
* ``'dop853'`` (= scipy ``'DOP853'``, Hairer's 8(5,3), 12 evaluations per step with FSAL) is more
  accurate per NFE at these tolerances. With ``norm='max'`` (every component of the state, e.g. the
  accumulated log-density, must meet the tolerance on its own instead of on average) it is the
  likelihood's JAX default: 3.8e-6 / 3.8e-6 / 9.5e-6 with 62 / 98 / 74 NFE.
* ``'bosh3'`` (= scipy ``'RK23'``, Bogacki–Shampine 3(2)) for loose tolerances.

What no local error control can promise: the *global* error. The tolerance is relative to
``|y|`` plus ``atol``; when the data's spread is small against its mean or against ``atol`` (e.g.
std 0.1 around mean -0.5), relative errors of the order ``atol/std + rtol·|mean|/std`` enter the
flow early and are carried to the end. Tighten ``rtol``/``atol`` for such data.

Time may run either way (``t1 < t0`` for sampling from ``T`` to ``eps``).

Why the default is 'jax' (:data:`DEFAULT_SOLVER`; ``config.sampling.ode_solver``, the samplers' and
the likelihood's ``solver`` argument): at the original's tolerances it is more accurate for bits/dim
(above), it runs under ``pmap`` with no host round trip per step, and on the benchmark DDPM++ on CPU
(``benchmarks/sampling.py``, rtol = atol = 1e-3) it takes scipy's 38 evaluations at 0.183 CPU
seconds each against scipy's 0.190. ``--config.sampling.ode_solver=scipy`` ('RK45') reproduces the
original's numbers.

diffrax 0.7.2 (Dopri5, Dopri8, Tsit5; PID controller, its default I-control) was measured in place
of :func:`solve_jax` and not adopted, as it measured slower: bits/dim of the benchmark DDPM++
(``benchmarks/likelihood.py``, 1e-3) took 105 NFE with Dopri8 and 55 with Tsit5 against DOP853's 50
here, at the same CPU time per NFE, and compiled in 66-97 s against 22 s; the ODE sampler took 43 NFE
with Dopri5 against 38. On the golden Gaussians (1e-5, max norm) its accuracy was comparable
(Tsit5: 3.8e-6 / 2.9e-6 / 4.8e-6 bits/dim with 61 / 85 / 121 NFE, against DOP853's table above).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

SOLVERS = ("jax", "scipy")
DEFAULT_SOLVER = "jax"

# Step-size controller constants, as in scipy.integrate (rk.py).
_SAFETY = 0.9
_MIN_FACTOR = 0.2
_MAX_FACTOR = 10.0

# Status codes of the JAX solver's loop.
_RUNNING, _DONE, _STEP_TOO_SMALL, _TOO_MANY_STEPS = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class _Tableau:
    """An explicit embedded RK pair with the FSAL stage appended.

    ``a`` is ``(S+1, S+1)``: rows ``0..S-1`` the method's stages, row ``S`` the weights ``b``
    (so stage ``S`` is ``f(t + h, y_new)``, reused as stage 0 of the next step). ``c`` is ``(S+1,)``.
    ``e`` is ``(S+1,)`` (single error estimate) or ``None`` with ``e5``/``e3`` for DOP853's
    combined estimate. ``error_order`` is the order of the error estimator.
    """

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    e: np.ndarray | None
    e5: np.ndarray | None
    e3: np.ndarray | None
    error_order: int

    @property
    def n_stages(self) -> int:
        """Evaluations per attempted step (FSAL: stage 0 comes from the previous step)."""
        return len(self.b)


def _tableau_from_scipy(cls) -> _Tableau:
    """Read the Butcher tableau of a ``scipy.integrate`` RK class (RK23, RK45, DOP853)."""
    n = cls.n_stages
    a = np.zeros((n + 1, n + 1))
    a_cls = np.asarray(cls.A, dtype=np.float64)[:n]
    a[:n, :a_cls.shape[1]] = a_cls
    a[n, :n] = cls.B
    c = np.concatenate([np.asarray(cls.C, dtype=np.float64)[:n], [1.0]])
    if hasattr(cls, "E5"):
        return _Tableau(a=a, b=np.asarray(cls.B, np.float64), c=c, e=None, e5=np.asarray(cls.E5, np.float64),
                        e3=np.asarray(cls.E3, np.float64), error_order=cls.error_estimator_order)
    return _Tableau(a=a, b=np.asarray(cls.B, np.float64), c=c, e=np.asarray(cls.E, np.float64), e5=None, e3=None,
                    error_order=cls.error_estimator_order)


# Our name of each pair -> the scipy.integrate class holding its tableau.
_SCIPY_CLASSES = {"bosh3": "RK23", "dopri5": "RK45", "dop853": "DOP853"}
# scipy's names for the same pairs.
_JAX_ALIASES = {"RK23": "bosh3", "RK45": "dopri5", "DOP853": "dop853"}
JAX_METHODS = tuple(_SCIPY_CLASSES) + tuple(_JAX_ALIASES)


@functools.cache
def _tableau(name: str) -> _Tableau:
    """The tableau of one of :data:`_SCIPY_CLASSES`, read once. scipy.integrate is imported here, not at module
    level, because importing it takes ~0.35 s and every job imports this module (through sampling)."""
    from scipy import integrate  # noqa: PLC0415

    return _tableau_from_scipy(getattr(integrate, _SCIPY_CLASSES[name]))


def _jax_method(method: str) -> str:
    name = _JAX_ALIASES.get(method, method)
    if name not in _SCIPY_CLASSES:
        raise ValueError(f"Unknown method {method!r} for the JAX ODE solver; choose one of {list(JAX_METHODS)} "
                         f"(or solver='scipy' for any scipy.integrate.solve_ivp method).")
    return name


def check_solver(solver: str) -> None:
    """Raise a ValueError naming ``config.sampling.ode_solver`` unless ``solver`` is one of :data:`SOLVERS`."""
    if solver not in SOLVERS:
        raise ValueError(f"Unknown ODE solver {solver!r} (config.sampling.ode_solver); choose one of {list(SOLVERS)}.")


# --------------------------------------------------------------------------- scipy (host) solver


def solve_scipy(fn: Callable[[float, Any], Any], y0: Any, t0: float, t1: float, *, method: str = "RK45",
                rtol: float = 1e-5, atol: float = 1e-5) -> tuple[Any, int]:
    """Solve ``dy/dt = fn(t, y)`` from ``t0`` to ``t1`` with ``scipy.integrate.solve_ivp``.

    The state is flattened to one float64 numpy vector for scipy (leaves concatenated in pytree
    order) and converted back to JAX arrays of the original shapes and dtypes before each call of
    ``fn``, exactly as the original score_sde did, so its numbers are reproduced.

    Args:
        fn: ``fn(t, y) -> dy/dt`` with ``t`` a python float and ``y`` a JAX array or pytree of
            arrays (any shapes, e.g. with a leading device axis when ``fn`` is pmapped); returns
            the same structure and shapes. Called on the host once per evaluation.
        y0: initial state at ``t0`` (array or pytree).
        t0, t1: start and end times; ``t1 < t0`` integrates backwards.
        method: any ``solve_ivp`` method ('RK45', 'DOP853', 'RK23', 'Radau', ...).
        rtol, atol: tolerances of ``solve_ivp``.

    Returns:
        ``(y1, nfe)``: the state at ``t1`` (same structure, shapes and dtypes as ``y0``) and the
        number of evaluations of ``fn`` (``solution.nfev``).
    """
    from scipy import integrate  # noqa: PLC0415 (see _tableau)

    leaves, treedef = jax.tree_util.tree_flatten(y0)
    shapes = [np.shape(leaf) for leaf in leaves]
    dtypes = [jnp.asarray(leaf).dtype for leaf in leaves]
    sizes = [int(np.prod(s)) for s in shapes]
    splits = np.cumsum(sizes)[:-1]

    def to_tree(flat: np.ndarray) -> Any:
        parts = np.split(flat, splits)
        return treedef.unflatten([jnp.asarray(p, dtype=d).reshape(s) for p, s, d in zip(parts, shapes, dtypes)])

    def to_flat(tree: Any) -> np.ndarray:
        return np.concatenate([np.asarray(leaf, dtype=np.float64).reshape(-1)
                               for leaf in jax.tree_util.tree_leaves(tree)])

    def ode_func(t: float, y: np.ndarray) -> np.ndarray:
        return to_flat(fn(float(t), to_tree(y)))

    solution = integrate.solve_ivp(ode_func, (float(t0), float(t1)), to_flat(y0), method=method, rtol=rtol, atol=atol)
    if not solution.success:
        raise RuntimeError(f"scipy.integrate.solve_ivp({method}) failed between t={t0} and t={t1}: "
                           f"{solution.message} Loosen rtol/atol or try another method.")
    return to_tree(solution.y[:, -1]), int(solution.nfev)


# --------------------------------------------------------------------------- JAX-native solver


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def _error_norm(tab: _Tableau, k: jax.Array, h: jax.Array, scale: jax.Array, norm: str) -> jax.Array:
    """Scaled error norm of one step (scipy's definition for each pair); ``< 1`` accepts.

    ``norm='rms'`` is scipy's (mean over components); ``'max'`` takes the largest component instead.
    """
    reduce = jnp.mean if norm == "rms" else jnp.max
    if tab.e is not None:
        return jnp.sqrt(reduce(jnp.square(h * (jnp.asarray(tab.e, k.dtype) @ k) / scale)))
    n5 = reduce(jnp.square((jnp.asarray(tab.e5, k.dtype) @ k) / scale))
    n3 = reduce(jnp.square((jnp.asarray(tab.e3, k.dtype) @ k) / scale))
    denom = n5 + 0.01 * n3
    safe = jnp.where(denom > 0, denom, 1.0)
    return jnp.where(denom > 0, jnp.abs(h) * n5 / jnp.sqrt(safe), 0.0)


def solve_jax(fn: Callable[[jax.Array, Any], Any], y0: Any, t0, t1, *, rtol: float = 1e-5, atol: float = 1e-5,
              method: str = "dopri5", max_steps: int = 100_000, norm: str = "rms") -> tuple[Any, jax.Array]:
    """Solve ``dy/dt = fn(t, y)`` from ``t0`` to ``t1`` with an adaptive embedded RK pair, in JAX.

    Traceable: call it inside ``jit``/``pmap``; the solve compiles to one ``lax.while_loop``
    (one iteration per attempted step) whose body runs the stages with ``lax.scan``, so ``fn`` is
    traced once for the stages plus once for the initial-step heuristic. FSAL: each attempted step
    costs ``n_stages`` evaluations (6 for dopri5, 12 for dop853, 3 for bosh3), the start 2 (the
    initial derivative and scipy's initial-step probe). The error norm is the RMS over every
    component of the state, as in scipy, so the whole state shares one step sequence.

    Args:
        fn: ``fn(t, y) -> dy/dt``; ``t`` a scalar array (dtype of the state), ``y`` an array or
            pytree shaped like ``y0``; must be traceable and return the same structure.
        y0: initial state at ``t0`` (array or pytree of floating arrays).
        t0, t1: start and end time (python floats or scalars; ``t1 < t0`` runs backwards).
        rtol, atol: relative and absolute tolerance.
        method: 'dopri5' (alias 'RK45'), 'dop853' (alias 'DOP853') or 'bosh3' (alias 'RK23').
        max_steps: limit on attempted steps.
        norm: 'rms' (scipy's: root mean square over components of the scaled error) or 'max'
            (largest component; stricter, a few more steps).

    Returns:
        ``(y1, nfe)``: the state at ``t1`` (structure of ``y0``) and the number of evaluations of
        ``fn`` (int32 scalar). If the solver fails (more than ``max_steps`` attempts, or the step
        size falls below 10 ulp of t), every leaf of ``y1`` is NaN: callers outside ``jit`` should
        check ``jnp.isfinite`` and report (see :func:`check_finite`).
    """
    tab = _tableau(_jax_method(method))
    if norm not in ("rms", "max"):
        raise ValueError(f"norm={norm!r}; choose 'rms' (scipy's) or 'max'.")
    flat0, unravel = ravel_pytree(y0)
    dtype = flat0.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"solve_jax needs a floating-point state, got dtype {dtype}.")
    t0 = jnp.asarray(t0, dtype)
    t1 = jnp.asarray(t1, dtype)
    direction = jnp.where(t1 >= t0, 1.0, -1.0).astype(dtype)
    interval = jnp.abs(t1 - t0)
    n = flat0.size
    exponent = -1.0 / (tab.error_order + 1)

    def f(t, y):
        return ravel_pytree(fn(t, unravel(y)))[0].astype(dtype)

    # Initial derivative and scipy's initial step (Hairer et al. II.4), two evaluations through
    # one call site: iteration 0 evaluates f(t0, y0), iteration 1 f(t0 + h0, y0 + h0 f0).
    scale0 = atol + jnp.abs(flat0) * rtol
    d0 = _rms(flat0 / scale0)

    def init_body(i, carry):
        f0, _, h0 = carry
        t_in = t0 + jnp.where(i == 1, h0 * direction, 0.0)
        y_in = flat0 + jnp.where(i == 1, h0 * direction, 0.0) * f0
        out = f(t_in, y_in)
        d1 = _rms(out / scale0)
        h0_new = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.where(d1 > 0, d1, 1.0))
        h0_new = jnp.minimum(h0_new, interval).astype(dtype)
        return (jnp.where(i == 0, out, f0), jnp.where(i == 1, out, f0), jnp.where(i == 0, h0_new, h0))

    zeros = jnp.zeros_like(flat0)
    f0, f1, h0 = jax.lax.fori_loop(0, 2, init_body, (zeros, zeros, jnp.zeros((), dtype)))
    d1 = _rms(f0 / scale0)
    d2 = _rms((f1 - f0) / scale0) / jnp.where(h0 > 0, h0, 1.0)
    small = (d1 <= 1e-15) & (d2 <= 1e-15)
    h1 = jnp.where(small, jnp.maximum(1e-6, h0 * 1e-3),
                   (0.01 / jnp.where(small, 1.0, jnp.maximum(d1, d2))) ** (1.0 / (tab.error_order + 1)))
    h_abs0 = jnp.minimum(jnp.minimum(100 * h0, h1), interval).astype(dtype)

    a = jnp.asarray(tab.a, dtype)
    c = jnp.asarray(tab.c, dtype)
    s = tab.n_stages

    def rk_step(t, y, fy, h):
        """One attempted step: all stages; returns y_new, f(t+h, y_new) and the stage matrix."""
        k0 = jnp.zeros((s + 1, n), dtype).at[0].set(fy)

        def stage(k, idx):
            y_stage = y + h * (a[idx] @ k)
            return k.at[idx].set(f(t + c[idx] * h, y_stage)), None

        k, _ = jax.lax.scan(stage, k0, jnp.arange(1, s + 1))
        y_new = y + h * (a[s] @ k)
        return y_new, k[s], k

    def cond(state):
        return state["status"] == _RUNNING

    def body(state):
        t, y, fy, h_abs = state["t"], state["y"], state["f"], state["h_abs"]
        min_step = 10 * jnp.abs(jnp.nextafter(t, t + direction) - t)
        h_abs = jnp.maximum(h_abs, jnp.where(state["rejected"], 0.0, min_step))
        too_small = h_abs < min_step
        t_new = t + h_abs * direction
        t_new = jnp.where(direction * (t_new - t1) > 0, t1, t_new)
        h = t_new - t
        y_new, f_new, k = rk_step(t, y, fy, h)
        scale = atol + jnp.maximum(jnp.abs(y), jnp.abs(y_new)) * rtol
        err = _error_norm(tab, k, h, scale, norm)
        accept = (err < 1) & jnp.isfinite(err)
        safe_err = jnp.where(err > 0, err, 1.0)
        grow = jnp.where(err == 0, _MAX_FACTOR, jnp.minimum(_MAX_FACTOR, _SAFETY * safe_err ** exponent))
        grow = jnp.where(state["rejected"], jnp.minimum(1.0, grow), grow)
        shrink = jnp.maximum(_MIN_FACTOR, _SAFETY * jnp.where(jnp.isfinite(err), safe_err, 1e10) ** exponent)
        h_next = jnp.abs(h) * jnp.where(accept, grow, shrink)
        n_steps = state["n_steps"] + 1
        status = jnp.where(too_small, _STEP_TOO_SMALL,
                           jnp.where(accept & (t_new == t1), _DONE,
                                     jnp.where(n_steps >= max_steps, _TOO_MANY_STEPS, _RUNNING)))
        keep = accept & ~too_small
        return {
            "t": jnp.where(keep, t_new, t),
            "y": jnp.where(keep, y_new, y),
            "f": jnp.where(keep, f_new, fy),
            "h_abs": h_next.astype(dtype),
            "rejected": ~accept,
            "n_steps": n_steps,
            "nfe": state["nfe"] + jnp.where(too_small, 0, s),
            "status": status.astype(jnp.int32),
        }

    init = {
        "t": t0,
        "y": flat0,
        "f": f0,
        "h_abs": h_abs0,
        "rejected": jnp.asarray(False),
        "n_steps": jnp.asarray(0, jnp.int32),
        "nfe": jnp.asarray(2, jnp.int32),
        "status": jnp.where(interval > 0, _RUNNING, _DONE).astype(jnp.int32),
    }
    final = jax.lax.while_loop(cond, body, init)
    y1 = jnp.where(final["status"] == _DONE, final["y"], jnp.nan)
    return unravel(y1), final["nfe"]


def check_finite(tree: Any, what: str = "ODE solution") -> None:
    """Raise a clear error when the JAX solver signalled failure (NaN state). Host-side only."""
    if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(tree)):
        raise FloatingPointError(
            f"The {what} is not finite: the JAX ODE solver stopped before the end time (more than max_steps "
            f"attempted steps, or the step size fell below float resolution), or the vector field returned NaN/Inf. "
            f"Loosen rtol/atol, raise max_steps, or check the model's outputs.")
