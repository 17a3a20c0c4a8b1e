"""Fast samplers (2020–2022): DDIM, EDM's Heun, DPM-Solver / DPM-Solver++ and an adaptive SDE solver.

They sample the same score models as :mod:`sampling` in 10–50 score evaluations instead of
1,000–2,000. Two levels, as in :mod:`sampling`:

* **score level** — the registered functions (:func:`ddim`, :func:`heun`, :func:`dpm_solver`,
  :func:`dpm_solver_pp`, :func:`adaptive_sde`) take any ``score_fn(x, t)`` and a latent ``x`` at
  time ``T`` and are traceable; :func:`get_score_fast_sampler` jits one for a fixed ``score_fn``;
* **model level** — :func:`get_fast_sampler` reads ``config.sampling`` and runs data parallel over
  the local devices with the original's ``sampler(rng, pstate) -> (samples, nfe)`` API.

Every sampler writes the forward kernel as ``x(t) = α(t) x(0) + σ(t) z`` (:class:`NoiseSchedule`:
``σ`` is ``sde.marginal_prob``'s std, the one trained models are conditioned on) and works with the
noise prediction ``ε(x, t) = -σ(t) score(x, t)`` or the data prediction ``(x - σ ε) / α``, in the
log-SNR time ``λ(t) = log(α/σ)``. Each returns ``(samples, nfe)``: ``nfe`` (int32 scalar) counts the
batched score evaluations the loop made. Given ``record=Recording(...)`` they also return the path
from noise to the samples (:class:`Recording`; the reverse-process GIF of ``--mode sample``), with
the same samples bit for bit.

Shapes: ``x`` is ``(batch, ...)``; score functions receive ``t`` as ``(batch,)``.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

import sde_lib
from models import utils as mutils
from score_sde import parallel
from score_sde.registry import Registry
from sde_lib import batch_mul

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]

_SAMPLERS = Registry("fast sampler", "config.sampling.method")
TIME_SCHEDULES = ("time_uniform", "logsnr", "edm")


def registered_fast_samplers() -> list[str]:
    """Names accepted by :func:`get_fast_sampler` (``config.sampling.method``)."""
    return _SAMPLERS.names()


def fast_sampler_fn(name: str) -> Callable:
    """The score-level sampler registered as ``name``: ``fn(rng, score_fn, sde, x, *, eps, **options)``."""
    return _SAMPLERS.get(name)


# --------------------------------------------------------------------------- noise schedule


class NoiseSchedule:
    """``α(t)``, ``σ(t)`` and log-SNR ``λ(t) = log(α/σ)`` of a forward SDE, and ``t(λ)``.

    VP: ``σ² = 1 - α²``; sub-VP: ``σ = 1 - α²``; VE: ``α = 1``, ``σ = σ(t)``. All satisfy
    ``g² = dσ²/dt - 2 (d log α/dt) σ²``, which makes the probability-flow ODE semi-linear in ``λ``.
    All functions take and return arrays of any shape.
    """

    def __init__(self, sde: sde_lib.SDE):
        if not isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE, sde_lib.VESDE)):
            raise NotImplementedError(f"Fast samplers support VPSDE, subVPSDE and VESDE, not {type(sde).__name__}.")
        self.sde = sde

    def log_alpha(self, t):
        if isinstance(self.sde, sde_lib.VESDE):
            return jnp.zeros_like(t)
        return self.sde.log_mean_coeff(t)

    def log_sigma(self, t):
        sde = self.sde
        if isinstance(sde, sde_lib.VESDE):
            return math.log(sde.sigma_min) + t * math.log(sde.sigma_max / sde.sigma_min)
        one_minus_a2 = -jnp.expm1(2.0 * sde.log_mean_coeff(t))  # accurate near t = 0
        log_var = jnp.log(one_minus_a2)
        return 0.5 * log_var if isinstance(sde, sde_lib.VPSDE) else log_var

    def alpha(self, t):
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t):
        return jnp.exp(self.log_sigma(t))

    def lam(self, t):
        return self.log_alpha(t) - self.log_sigma(t)

    def t_of_lam(self, lam):
        """Inverse of :meth:`lam` (exact, in closed form)."""
        sde = self.sde
        if isinstance(sde, sde_lib.VESDE):
            return (-lam - math.log(sde.sigma_min)) / math.log(sde.sigma_max / sde.sigma_min)
        if isinstance(sde, sde_lib.VPSDE):
            neg_log_alpha = 0.5 * jax.nn.softplus(-2.0 * lam)  # α² = sigmoid(2λ)
        else:
            neg_log_alpha = jnp.arcsinh(0.5 * jnp.exp(-lam))  # α / (1 - α²) = e^λ
        # Root of ¼ Δβ t² + ½ β_min t = -log α, written without cancellation.
        delta = sde.beta_1 - sde.beta_0
        return 4.0 * neg_log_alpha / (sde.beta_0 + jnp.sqrt(sde.beta_0 ** 2 + 4.0 * delta * neg_log_alpha))


def time_at(schedule: str, ns: NoiseSchedule, t_start: float, t_end: float, u, rho: float = 7.0):
    """The time a fraction ``u ∈ [0, 1]`` along a step schedule from ``t_start`` to ``t_end``.

    ``'time_uniform'``: uniform in t (DDIM's); ``'logsnr'``: uniform in λ (DPM-Solver's);
    ``'edm'``: uniform in ``σ̂^{1/ρ}`` with ``σ̂ = σ/α = e^{-λ}`` (Karras et al. 2022). The endpoints
    are returned exactly.
    """
    u = jnp.asarray(u, jnp.float32)
    if schedule == "time_uniform":
        t = t_start + u * (t_end - t_start)
    elif schedule == "logsnr":
        lam0, lam1 = ns.lam(jnp.float32(t_start)), ns.lam(jnp.float32(t_end))
        t = ns.t_of_lam(lam0 + u * (lam1 - lam0))
    elif schedule == "edm":
        s0 = jnp.exp(-ns.lam(jnp.float32(t_start)) / rho)
        s1 = jnp.exp(-ns.lam(jnp.float32(t_end)) / rho)
        t = ns.t_of_lam(-rho * jnp.log(s0 + u * (s1 - s0)))
    else:
        raise ValueError(f"Unknown time schedule {schedule!r} (config.sampling.time_schedule); "
                         f"choose one of {list(TIME_SCHEDULES)}.")
    return jnp.where(u <= 0, t_start, jnp.where(u >= 1, t_end, t))


class _Grid(NamedTuple):
    """Times ``t`` and the schedule's ``α, σ, λ, log α, log σ`` at them, arrays of one shape."""

    t: jax.Array
    alpha: jax.Array
    sigma: jax.Array
    lam: jax.Array
    log_alpha: jax.Array
    log_sigma: jax.Array


def _grid(ns: NoiseSchedule, t) -> _Grid:
    t = jnp.asarray(t, jnp.float32)
    log_alpha, log_sigma = ns.log_alpha(t), ns.log_sigma(t)
    return _Grid(t, jnp.exp(log_alpha), jnp.exp(log_sigma), log_alpha - log_sigma, log_alpha, log_sigma)


def _schedule_grid(schedule: str, ns: NoiseSchedule, t_start: float, t_end: float, steps, rho: float):
    """``at(k)``: the :class:`_Grid` at step boundaries ``k`` (an int array) of a ``steps``-step schedule.

    ``k = 0`` is ``t_start``, ``k = steps`` is ``t_end``, ``k < 0`` clamps to ``t_start`` (:func:`time_at`).
    """
    return lambda k: _grid(ns, time_at(schedule, ns, t_start, t_end, k / steps, rho))


def _per_step(coefficients: Callable, steps):
    """``get(i)``: the pytree ``coefficients(i)`` of step ``i`` (a function elementwise in the index array ``i``).

    With ``steps`` an int they are computed for all steps once, before the loop, which then only
    indexes them: the loop holds the score evaluations and a few multiply-adds on ``x``, no per-step
    scalar work beside the network, and no scalar arithmetic that the compiler could fuse
    differently in the plain and the recorded loop. With ``steps`` traced (one compilation for
    every step count) each step computes its own.
    """
    if not isinstance(steps, int):
        return coefficients
    table = coefficients(jnp.arange(steps))
    return lambda i: jax.tree_util.tree_map(lambda v: v[i], table)


def _noise_fn(score_fn: ScoreFn):
    """``ε(x, t, σ) = -σ score(x, t)`` for a scalar time ``t`` and its ``σ(t)``."""

    def eps_fn(x, t, sigma):
        return -sigma * score_fn(x, jnp.broadcast_to(t, (x.shape[0],)))

    return eps_fn


def _denoise(score_fn, ns, x, eps):
    """Tweedie's denoiser at ``eps``: the data prediction ``(x - σ ε) / α``, one more score evaluation."""
    g = _grid(ns, eps)
    return (x - g.sigma * _noise_fn(score_fn)(x, g.t, g.sigma)) / g.alpha


def _per_example(v, x):
    """``v`` (batch,) reshaped to broadcast against ``x`` (batch, ...)."""
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


# --------------------------------------------------------------------------- recording the path


class Recording(NamedTuple):
    """Which states of its path from noise to data a sampler returns besides the samples.

    A fixed-step sampler of ``N`` steps records its state after ``0, k, 2k, ... < N`` steps,
    ``k = max(N // frames, 1)``; :func:`adaptive_sde` the state of each example at its first
    accepted time ``<= T + (j / frames)(eps - T)``, ``j < frames``. The returned samples come last.
    Only the first ``first`` examples of the batch are kept (None: all), so that a GIF of a few
    images costs next to no memory. The path is ``(frames', first, ...)`` in model space.
    """

    frames: int = 16
    first: Optional[int] = None


def _head(x, record: Recording):
    return x if record.first is None else x[:record.first]


def _opaque(n):
    """The int32 ``n`` through an ``optimization_barrier``: a loop bound the compiler cannot read."""
    return jax.lax.optimization_barrier(jnp.asarray(n, jnp.int32))


def recorded_fori_loop(steps: int, body, init, record: Optional[Recording], state_of=lambda carry: carry):
    """``lax.fori_loop(0, steps, body, init)`` and, with ``record``, the recorded states (else None).

    ``steps`` a Python int (a traced one: a plain ``fori_loop``, and no recording).

    The loop runs in chunks of ``k`` iterations (``k`` of :class:`Recording`, the default one
    without ``record``) inside a ``lax.scan`` whose outputs are ``state_of(carry)`` before each
    chunk: ``(ceil(steps / k), first, ...)``. Recording or not, ``body`` sees the same indices and
    values in the same order and is compiled in the same loop nest, with loop bounds the compiler
    cannot read (``optimization_barrier``): so its fusions, and the samples, are the same bit for
    bit. (A plain ``fori_loop`` beside the recorded nest compiled differently and moved the samples
    by an ulp.)
    """
    if not isinstance(steps, int):
        if record is not None:
            raise ValueError("Recording a sampler's path needs a Python int number of steps, not a traced one.")
        return jax.lax.fori_loop(0, steps, body, init), None
    every = max(steps // (record or Recording()).frames, 1)

    def chunk(carry, j):
        start = j * every
        state = None if record is None else _head(state_of(carry), record)
        return jax.lax.fori_loop(_opaque(start), _opaque(jnp.minimum(start + every, steps)), body, carry), state

    return jax.lax.scan(chunk, init, jnp.arange(-(-steps // every)))


def path_with_samples(path, x, record: Recording):
    """The recorded ``path`` ``(frames, first, ...)`` with the samples ``x`` (batch, ...) as its last frame."""
    return jnp.concatenate([path, _head(x, record)[None]])


def _returned(x, nfe, path, record: Optional[Recording]):
    """``(x, nfe)``, or ``(x, nfe, path)`` with the samples ``x`` appended to the recorded ``path``."""
    if record is None:
        return x, nfe
    return x, nfe, path_with_samples(path, x, record)


def _check_steps(steps):
    if isinstance(steps, int) and steps < 1:
        raise ValueError(f"config.sampling.steps={steps}: the number of solver steps must be >= 1.")


# --------------------------------------------------------------------------- DDIM


@_SAMPLERS.register(name="ddim")
def ddim(rng, score_fn: ScoreFn, sde: sde_lib.SDE, x, *, eps: float = 1e-3, steps: int = 50, eta: float = 0.0,
         time_schedule: str = "time_uniform", rho: float = 7.0, denoise_to_zero: bool = False,
         record: Optional[Recording] = None):
    """DDIM (Song, Meng & Ermon 2021) from ``T`` to ``eps`` in ``steps`` steps.

    Step ``s -> t``: ``x0 = (x - σ_s ε)/α_s``; ``x_t = α_t x0 + sqrt(σ_t² - c²) ε + c z`` with
    ``c = η σ_t sqrt(1 - e^{2(λ_s - λ_t)})``. ``η = 0`` is the deterministic DDIM (the first-order
    DPM-Solver); ``η = 1`` is ancestral sampling (DDPM / SMLD posterior with the predicted x0).

    Returns ``(x, nfe)`` with ``nfe = steps (+1 if denoise_to_zero)``; ``(x, nfe, path)`` with ``record``.
    """
    _check_steps(steps)
    ns = NoiseSchedule(sde)
    eps_fn = _noise_fn(score_fn)
    at = _schedule_grid(time_schedule, ns, sde.T, eps, steps, rho)

    def coefficients(i):
        s, t = at(i), at(i + 1)
        c = eta * t.sigma * jnp.sqrt(-jnp.expm1(2.0 * (s.lam - t.lam)))
        return s, t.alpha, jnp.sqrt(t.sigma ** 2 - c ** 2), c

    coefficients = _per_step(coefficients, steps)

    def body(i, val):
        rng, x = val
        s, alpha_t, e_coef, c = coefficients(i)
        e = eps_fn(x, s.t, s.sigma)
        x = alpha_t * ((x - s.sigma * e) / s.alpha) + e_coef * e
        if eta != 0:  # η = 0 draws no noise: c = 0 adds exactly nothing, and the draw costs time each step
            rng, step_rng = jax.random.split(rng)
            x = x + c * jax.random.normal(step_rng, x.shape)
        return rng, x

    (_, x), path = recorded_fori_loop(steps, body, (rng, x), record, lambda val: val[1])
    nfe = jnp.asarray(steps, jnp.int32)
    if denoise_to_zero:
        x, nfe = _denoise(score_fn, ns, x, eps), nfe + 1
    return _returned(x, nfe, path, record)


# --------------------------------------------------------------------------- Heun (EDM)


@_SAMPLERS.register(name="heun")
def heun(rng, score_fn: ScoreFn, sde: sde_lib.SDE, x, *, eps: float = 1e-3, steps: int = 18, churn: float = 0.0,
         time_schedule: str = "edm", rho: float = 7.0, denoise_to_zero: bool = False,
         record: Optional[Recording] = None):
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithms 1–2).

    Integrates ``dx̂/dσ̂ = ε`` in the scaled variable ``x̂ = x/α`` and noise level ``σ̂ = σ/α`` over the
    ``'edm'`` (ρ = 7) schedule by default. Every step, including the last (which ends at ``eps``,
    ``σ̂ > 0``), is a Heun step. With ``churn > 0`` (``S_churn``), each step first raises the noise
    level to ``σ̂ (1 + γ)``, ``γ = min(churn/steps, √2 - 1)``, adding the matching fresh noise (as in
    EDM, also on the first step: the score is then evaluated slightly beyond ``T``).

    Returns ``(x, nfe)`` with ``nfe = 2 steps (+1 if denoise_to_zero)``; ``(x, nfe, path)`` with ``record``.
    """
    _check_steps(steps)
    ns = NoiseSchedule(sde)
    eps_fn = _noise_fn(score_fn)
    at = _schedule_grid(time_schedule, ns, sde.T, eps, steps, rho)

    def coefficients(i):
        cur, nxt = at(i), at(i + 1)
        churn_std, hat = jnp.zeros_like(cur.t), cur
        if churn > 0:  # the raised noise level σ̂ (1 + γ), its time and the noise that reaches it
            gamma = jnp.minimum(churn / steps, math.sqrt(2.0) - 1.0)
            s_cur = jnp.exp(-cur.lam)
            s_hat = s_cur * (1.0 + gamma)
            churn_std, hat = jnp.sqrt(s_hat ** 2 - s_cur ** 2), _grid(ns, ns.t_of_lam(-jnp.log(s_hat)))
        return cur.alpha, churn_std, hat, nxt, jnp.exp(-nxt.lam) - jnp.exp(-hat.lam)  # the last: σ̂_next - σ̂_cur

    coefficients = _per_step(coefficients, steps)

    def body(i, val):
        rng, x = val
        alpha_cur, churn_std, hat, nxt, ds = coefficients(i)
        xs = x / alpha_cur
        if churn > 0:
            rng, step_rng = jax.random.split(rng)
            xs = xs + churn_std * jax.random.normal(step_rng, x.shape)
        d = eps_fn(hat.alpha * xs, hat.t, hat.sigma)
        xs_euler = xs + ds * d
        d_next = eps_fn(nxt.alpha * xs_euler, nxt.t, nxt.sigma)
        xs = xs + ds * 0.5 * (d + d_next)
        return rng, nxt.alpha * xs

    (_, x), path = recorded_fori_loop(steps, body, (rng, x), record, lambda val: val[1])
    nfe = jnp.asarray(2 * steps, jnp.int32)
    if denoise_to_zero:
        x, nfe = _denoise(score_fn, ns, x, eps), nfe + 1
    return _returned(x, nfe, path, record)


# --------------------------------------------------------------------------- DPM-Solver


def _toward(ns: NoiseSchedule, s: _Grid, t: _Grid, r: float):
    """The point at ``λ_s + r h`` of the step ``s -> t`` and the map ``(x_s, ε_s) ↦ a x_s - b ε_s`` that reaches
    it with the frozen ``ε_s`` (the first-order DPM-Solver step): ``(grid there, a, b)``."""
    h = t.lam - s.lam
    u = _grid(ns, ns.t_of_lam(s.lam + r * h))
    return u, jnp.exp(u.log_alpha - s.log_alpha), u.sigma * jnp.expm1(r * h)


def _dpm_solver_body(eps_fn, ns: NoiseSchedule, at: Callable, steps, order: int):
    """``body(i, x)``: singlestep DPM-Solver-``order`` step ``i`` of the schedule ``at`` (Lu et al. 2022,
    Algorithms 1–2, noise prediction)."""
    r1, r2 = (0.5, None) if order == 2 else (1.0 / 3.0, 2.0 / 3.0)

    def coefficients(i):
        s, t = at(i), at(i + 1)
        h = t.lam - s.lam
        _, a, b = _toward(ns, s, t, 1.0)  # the step's end through t(λ_t), as the paper's code
        mid1, a1, b1 = _toward(ns, s, t, r1)
        c = {"s": s, "a": a, "b": b, "mid1": mid1, "a1": a1, "b1": b1,
             "d1_coef": t.sigma / (2.0 * r1) * jnp.expm1(h)}
        if order == 3:
            mid2, a2, b2 = _toward(ns, s, t, r2)
            c.update(mid2=mid2, a2=a2, b2=b2, u2_coef=mid2.sigma * (r2 / r1) * (jnp.expm1(r2 * h) / (r2 * h) - 1.0),
                     d2_coef=t.sigma / r2 * (jnp.expm1(h) / h - 1.0))
        return c

    coefficients = _per_step(coefficients, steps)

    def body(i, x):
        c = coefficients(i)
        e_s = eps_fn(x, c["s"].t, c["s"].sigma)
        x_t = c["a"] * x - c["b"] * e_s
        if order == 1:
            return x_t
        d1 = eps_fn(c["a1"] * x - c["b1"] * e_s, c["mid1"].t, c["mid1"].sigma) - e_s
        if order == 2:
            return x_t - c["d1_coef"] * d1
        u2 = c["a2"] * x - c["b2"] * e_s - c["u2_coef"] * d1
        d2 = eps_fn(u2, c["mid2"].t, c["mid2"].sigma) - e_s
        return x_t - c["d2_coef"] * d2

    return body


@_SAMPLERS.register(name="dpm_solver")
def dpm_solver(rng, score_fn: ScoreFn, sde: sde_lib.SDE, x, *, eps: float = 1e-3, steps: int = 10,
               order: int = 3, time_schedule: str = "logsnr", rho: float = 7.0, denoise_to_zero: bool = False,
               record: Optional[Recording] = None):
    """Singlestep DPM-Solver of order 1, 2 or 3 (Lu et al. 2022) on the probability-flow ODE.

    Solves ``x_t = (α_t/α_s) x_s - α_t ∫ e^{-λ} ε dλ`` exactly in its linear part and with a
    Taylor expansion of ``ε`` in ``λ`` (intermediate points at ``r = ½``, resp. ``⅓, ⅔`` of each
    step). Order 1 is DDIM (η = 0). ``rng`` is unused (deterministic).

    Returns ``(x, nfe)`` with ``nfe = order · steps (+1 if denoise_to_zero)``; ``(x, nfe, path)`` with
    ``record``.
    """
    _check_steps(steps)
    if order not in (1, 2, 3):
        raise ValueError(f"config.sampling.order={order}: DPM-Solver has orders 1, 2 and 3.")
    ns = NoiseSchedule(sde)
    body = _dpm_solver_body(_noise_fn(score_fn), ns, _schedule_grid(time_schedule, ns, sde.T, eps, steps, rho), steps,
                            order)
    x, path = recorded_fori_loop(steps, body, x, record)
    nfe = jnp.asarray(order * steps, jnp.int32)
    if denoise_to_zero:
        x, nfe = _denoise(score_fn, ns, x, eps), nfe + 1
    return _returned(x, nfe, path, record)


@_SAMPLERS.register(name="dpm_solver_pp")
def dpm_solver_pp(rng, score_fn: ScoreFn, sde: sde_lib.SDE, x, *, eps: float = 1e-3, steps: int = 20,
                  lower_order_final: bool = True, time_schedule: str = "logsnr", rho: float = 7.0,
                  denoise_to_zero: bool = False, record: Optional[Recording] = None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): multistep, 2nd order, data prediction ``x̂0``.

    Step ``i``: ``x_i = (σ_i/σ_{i-1}) x_{i-1} - α_i (e^{-h_i} - 1) D_i`` with
    ``D_i = x̂0_{i-1} + (x̂0_{i-1} - x̂0_{i-2}) / (2 r_i)``, ``r_i = h_{i-1}/h_i``; the first step
    (and, with ``lower_order_final`` and fewer than 15 steps, the last) uses ``D_i = x̂0_{i-1}``, which
    the paper found more stable at few steps. ``rng`` is unused (deterministic).

    Returns ``(x, nfe)`` with ``nfe = steps (+1 if denoise_to_zero)``; ``(x, nfe, path)`` with ``record``.
    """
    _check_steps(steps)
    ns = NoiseSchedule(sde)
    eps_fn = _noise_fn(score_fn)
    at = _schedule_grid(time_schedule, ns, sde.T, eps, steps, rho)

    def coefficients(i):
        prev, s, t = at(i - 1), at(i), at(i + 1)
        h, h_prev = t.lam - s.lam, s.lam - prev.lam
        first = (i == 0) | (lower_order_final & (i == steps - 1) & (steps < 15))
        correction = jnp.where(first, 0.0, h / (2.0 * jnp.where(first, 1.0, h_prev)))  # 1/(2 r_i)
        return s, jnp.exp(t.log_sigma - s.log_sigma), t.alpha * jnp.expm1(-h), correction

    coefficients = _per_step(coefficients, steps)

    def body(i, val):
        x, x0_prev = val
        s, x_coef, d_coef, correction = coefficients(i)
        x0 = (x - s.sigma * eps_fn(x, s.t, s.sigma)) / s.alpha
        d = x0 + correction * (x0 - x0_prev)
        return x_coef * x - d_coef * d, x0

    (x, _), path = recorded_fori_loop(steps, body, (x, jnp.zeros_like(x)), record, lambda val: val[0])
    nfe = jnp.asarray(steps, jnp.int32)
    if denoise_to_zero:
        x, nfe = _denoise(score_fn, ns, x, eps), nfe + 1
    return _returned(x, nfe, path, record)


# --------------------------------------------------------------------------- adaptive SDE solver


@_SAMPLERS.register(name="adaptive_sde")
def adaptive_sde(rng, score_fn: ScoreFn, sde: sde_lib.SDE, x, *, eps: float = 1e-3, adaptive_rtol: float = 0.01,
                 adaptive_atol: float = 0.0078, h_init: float = 0.01, safety: float = 0.9, exponent: float = 0.9,
                 max_iters: int = 10_000, denoise_to_zero: bool = False, record: Optional[Recording] = None):
    """Adaptive-step reverse-SDE solver of Jolicoeur-Martineau et al. 2021 ("Gotta Go Fast"), Algorithm 1.

    Each attempt from ``t`` to ``t - h`` draws one ``z`` and takes an Euler–Maruyama step ``x'`` and
    an improved-Euler step ``x''`` (the mean of ``x'`` and an EM step from ``x'`` with the drift and
    diffusion at ``t - h``), both with the same noise. The error
    ``E = RMS((x' - x'') / δ)``, ``δ = max(atol, rtol · max(|x'|, |x'_prev|))``, accepts the step
    (keeping ``x''``) when ``E ≤ 1``; the next ``h = min(t - eps, safety · h · E^{-exponent})``. Every
    example has its own ``t`` and ``h``; the loop runs until all reach ``eps``.

    Rejected attempts redraw ``z``, and ``E`` depends on ``z``: accepted steps favour small noise, which
    biases the samples when the RMS runs over few components (2-D data: variance +40 % at the default
    tolerances); with ≥ 64 components the norm concentrates and the bias falls to about 1 %.

    Returns ``(x, nfe)`` with ``nfe = 2 · attempts (+1 if denoise_to_zero)``, data dependent. Where
    ``max_iters`` attempts do not reach ``eps`` the samples are NaN. With ``record`` also the path:
    frame ``j`` holds each example's state at its first accepted time ``<= T + (j/frames)(eps - T)``.
    """
    ns = NoiseSchedule(sde)
    batch = x.shape[0]
    rsde = sde.reverse(score_fn)

    def em(x, x_eval, t, h, z):
        """Euler–Maruyama step of the reverse SDE from ``x`` at ``t`` to ``t - h`` (both (batch,)), with
        drift and diffusion evaluated at ``(x_eval, t)``."""
        drift, diffusion = rsde.sde(x_eval, t)
        return x - batch_mul(h, drift) + batch_mul(diffusion * jnp.sqrt(h), z)

    def rms(v):
        return jnp.sqrt(jnp.mean(v.reshape(batch, -1) ** 2, axis=1))

    def cond(val):
        _, _, _, t, _, iters, _ = val
        return jnp.any(t > eps) & (iters < max_iters)

    frames = 1 if record is None else record.frames
    frame_times = sde.T + jnp.arange(frames, dtype=jnp.float32) / frames * (eps - sde.T)

    def body(val):
        rng, x, x_prev, t, h, iters, path = val
        rng, step_rng = jax.random.split(rng)
        z = jax.random.normal(step_rng, x.shape)
        x1 = em(x, x, t, h, z)
        x2 = 0.5 * (x1 + em(x, x1, t - h, h, z))  # improved Euler, the same noise
        delta = jnp.maximum(adaptive_atol, adaptive_rtol * jnp.maximum(jnp.abs(x1), jnp.abs(x_prev)))
        err = jnp.maximum(rms((x1 - x2) / delta), 1e-8)  # floor: examples already at eps have h = 0
        accept = err <= 1.0
        keep = _per_example(accept, x)
        x = jnp.where(keep, x2, x)
        x_prev = jnp.where(keep, x1, x_prev)
        t_new = jnp.where(accept, jnp.where(h >= t - eps, eps, t - h), t)
        h = jnp.minimum(t_new - eps, safety * h * err ** (-exponent))
        if record is not None:  # (frames, first): the examples whose accepted step crossed a frame time
            tau = frame_times[:, None]
            crossed = (_head(t, record)[None] > tau) & (_head(t_new, record)[None] <= tau)
            path = jnp.where(crossed.reshape(crossed.shape + (1,) * (x.ndim - 1)), _head(x, record)[None], path)
        return rng, x, x_prev, t_new, h, iters + 1, path

    t0 = jnp.full((batch,), sde.T, jnp.float32)
    h0 = jnp.full((batch,), min(h_init, sde.T - eps), jnp.float32)
    path0 = None if record is None else jnp.repeat(_head(x, record)[None], frames, axis=0)  # frame 0: the latent
    _, x, _, t, _, iters, path = jax.lax.while_loop(cond, body, (rng, x, x, t0, h0, jnp.int32(0), path0))
    x = jnp.where(_per_example(t <= eps, x), x, jnp.nan)
    nfe = 2 * iters
    if denoise_to_zero:
        x, nfe = _denoise(score_fn, ns, x, eps), nfe + 1
    return _returned(x, nfe, path, record)


# --------------------------------------------------------------------------- options and factories


def _check_option(name: str, value) -> None:
    """Raise a one-line error for a value that no sampler can use, naming the config field."""
    bad = {
        "steps": lambda v: not isinstance(v, int) or isinstance(v, bool) or v < 1,
        "order": lambda v: v not in (1, 2, 3),
        "eta": lambda v: not v >= 0,
        "churn": lambda v: not v >= 0,
        "rho": lambda v: not v > 0,
        "adaptive_rtol": lambda v: not v > 0,
        "adaptive_atol": lambda v: not v > 0,
        "time_schedule": lambda v: v not in TIME_SCHEDULES,
    }.get(name, lambda v: False)
    if bad(value):
        hint = {"steps": "an integer >= 1", "order": "1, 2 or 3", "time_schedule": f"one of {list(TIME_SCHEDULES)}",
                "eta": "a number >= 0", "churn": "a number >= 0"}
        raise ValueError(f"config.sampling.{name}={value!r} is invalid; use {hint.get(name, 'a positive number')}.")


def _option_names(fn: Callable) -> list[str]:
    """The keyword options of a registered sampler (all keyword-only parameters but ``eps`` and ``record``)."""
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("eps", "record")]


def sampler_options(name: str, sampling_config) -> dict:
    """Keyword options of the sampler ``name`` taken from ``sampling_config`` (``config.sampling``).

    A sampler's keyword parameter ``p`` is read from ``config.sampling.p`` when that field exists
    and is not None or ``''``; otherwise the sampler's default applies. Values are validated here,
    before any tracing.
    """
    fn = fast_sampler_fn(name)
    defaults = inspect.signature(fn).parameters
    options = {}
    for option in _option_names(fn):
        value = sampling_config.get(option, None)
        if value is None or value == "":
            value = defaults[option].default
        _check_option(option, value)
        options[option] = value
    return options


def _identity(x):
    return x


def get_score_fast_sampler(name: str, sde: sde_lib.SDE, score_fn: ScoreFn, shape,
                           inverse_scaler: Callable = _identity, eps: float = 1e-3, **options) -> Callable:
    """A jitted fast sampler for a fixed ``score_fn`` (no devices axis).

    Args:
        name: a registered name (:func:`registered_fast_samplers`).
        sde, score_fn: forward SDE and ``score_fn(x, t)``.
        shape: ``(batch, ...)`` of the samples.
        inverse_scaler: maps model space back to data space.
        eps: last time of the reverse integration.
        options: the sampler's keyword options (``steps``, ``order``, ``eta``, ...); validated.

    Returns:
        ``sampler(rng, z=None) -> (samples, nfe)``: ``z`` an optional latent at ``T`` of ``shape``
        (else drawn from the prior); samples of ``shape``; ``nfe`` an int.
    """
    fn = fast_sampler_fn(name)
    unknown = sorted(set(options) - set(_option_names(fn)))
    if unknown:
        raise ValueError(f"The fast sampler {name!r} has no options {unknown}; it takes {_option_names(fn)}.")
    for key, value in options.items():
        _check_option(key, value)
    NoiseSchedule(sde)  # unsupported SDE: fail before tracing
    fn = functools.partial(fn, score_fn=score_fn, sde=sde, eps=eps, **options)

    @jax.jit
    def run(rng, z):
        x, nfe = fn(rng, x=z)
        return inverse_scaler(x), nfe

    def sampler(rng, z=None):
        rng, step_rng = jax.random.split(rng)
        z = sde.prior_sampling(step_rng, tuple(shape)) if z is None else jnp.asarray(z)
        x, nfe = run(rng, z)
        return x, int(nfe)

    return sampler


def get_fast_sampler(config, sde: sde_lib.SDE, model, shape, inverse_scaler: Callable, eps: float,
                     record: Optional[Recording] = None) -> Callable:
    """The fast sampler named by ``config.sampling.method`` for a model, data parallel.

    Reads ``config.sampling.method`` (one of :func:`registered_fast_samplers`), the sampler's own
    options from ``config.sampling`` (:func:`sampler_options`: ``steps``, ``order``, ``eta``,
    ``churn``, ``time_schedule``, ``rho``, ``lower_order_final``, ``adaptive_rtol``,
    ``adaptive_atol``, ``denoise_to_zero``) and ``config.training.continuous``.

    Args:
        sde: forward SDE.
        model: Flax score model.
        shape: one device's sample batch ``(batch, H, W, C)``.
        inverse_scaler: maps model space back to data space.
        eps: end time of the reverse integration.
        record: also return each device's path (:class:`Recording`), through ``inverse_scaler``.

    Returns:
        ``sampler(rng, pstate) -> (samples, nfe)``: ``rng`` per-device keys ``(n_devices, 2)``,
        ``pstate`` a replicated :class:`models.utils.State`; samples ``(n_devices, *shape)``;
        ``nfe`` (int) the score evaluations made (largest over devices). With ``record``
        ``(samples, nfe, path)``, ``path`` ``(n_devices, frames', first, *shape[1:])``.
    """
    name = config.sampling.method.lower()
    fn = fast_sampler_fn(name)
    options = sampler_options(name, config.sampling)
    NoiseSchedule(sde)  # unsupported SDE: fail before tracing

    def run(rng, state):
        score_fn = mutils.get_score_fn(sde, model, state.params_ema, state.model_state, train=False,
                                       continuous=config.training.continuous)
        rng, step_rng = jax.random.split(rng)
        x = sde.prior_sampling(step_rng, tuple(shape))
        out = fn(rng, score_fn, sde, x, eps=eps, record=record, **options)
        return (inverse_scaler(out[0]), out[1]) + tuple(inverse_scaler(path) for path in out[2:])

    p_run = parallel.pmap(run)

    def sampler(rng, state):
        x, nfe, *path = p_run(rng, state)
        return (x, int(jnp.max(nfe)), *path)

    return sampler
