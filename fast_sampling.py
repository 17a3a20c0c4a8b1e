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
batched score evaluations the loop made.

Shapes: ``x`` is ``(batch, ...)``; score functions receive ``t`` as ``(batch,)``.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Tuple

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


def _noise_fn(score_fn: ScoreFn, ns: NoiseSchedule):
    """``ε(x, t) = -σ(t) score(x, t)`` for a scalar (or (batch,)) time ``t``."""

    def eps_fn(x, t):
        vec_t = jnp.broadcast_to(t, (x.shape[0],))
        return -batch_mul(ns.sigma(vec_t), score_fn(x, vec_t))

    return eps_fn


def _data_from_noise(ns: NoiseSchedule, x, e, t):
    """Data prediction ``(x - σ ε) / α`` at scalar time ``t``."""
    return (x - ns.sigma(t) * e) / ns.alpha(t)


def _denoise(score_fn, ns, x, eps):
    """Tweedie's denoiser at ``eps``: the data prediction, one more score evaluation."""
    return _data_from_noise(ns, x, _noise_fn(score_fn, ns)(x, eps), eps)


def _per_example(v, x):
    """``v`` (batch,) reshaped to broadcast against ``x`` (batch, ...)."""
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _check_steps(steps):
    if isinstance(steps, int) and steps < 1:
        raise ValueError(f"config.sampling.steps={steps}: the number of solver steps must be >= 1.")


# --------------------------------------------------------------------------- DDIM


@_SAMPLERS.register(name="ddim")
def ddim(rng, score_fn: ScoreFn, sde: sde_lib.SDE, x, *, eps: float = 1e-3, steps: int = 50, eta: float = 0.0,
         time_schedule: str = "time_uniform", rho: float = 7.0, denoise_to_zero: bool = False):
    """DDIM (Song, Meng & Ermon 2021) from ``T`` to ``eps`` in ``steps`` steps.

    Step ``s -> t``: ``x0 = (x - σ_s ε)/α_s``; ``x_t = α_t x0 + sqrt(σ_t² - c²) ε + c z`` with
    ``c = η σ_t sqrt(1 - e^{2(λ_s - λ_t)})``. ``η = 0`` is the deterministic DDIM (the first-order
    DPM-Solver); ``η = 1`` is ancestral sampling (DDPM / SMLD posterior with the predicted x0).

    Returns ``(x, nfe)`` with ``nfe = steps (+1 if denoise_to_zero)``.
    """
    _check_steps(steps)
    ns = NoiseSchedule(sde)
    eps_fn = _noise_fn(score_fn, ns)

    def body(i, val):
        rng, x = val
        s = time_at(time_schedule, ns, sde.T, eps, i / steps, rho)
        t = time_at(time_schedule, ns, sde.T, eps, (i + 1) / steps, rho)
        e = eps_fn(x, s)
        x0 = _data_from_noise(ns, x, e, s)
        sigma_t = ns.sigma(t)
        c = eta * sigma_t * jnp.sqrt(-jnp.expm1(2.0 * (ns.lam(s) - ns.lam(t))))
        rng, step_rng = jax.random.split(rng)
        noise = jax.random.normal(step_rng, x.shape)
        x = ns.alpha(t) * x0 + jnp.sqrt(sigma_t ** 2 - c ** 2) * e + c * noise
        return rng, x

    _, x = jax.lax.fori_loop(0, steps, body, (rng, x))
    nfe = jnp.asarray(steps, jnp.int32)
    if denoise_to_zero:
        x, nfe = _denoise(score_fn, ns, x, eps), nfe + 1
    return x, nfe


# --------------------------------------------------------------------------- Heun (EDM)


@_SAMPLERS.register(name="heun")
def heun(rng, score_fn: ScoreFn, sde: sde_lib.SDE, x, *, eps: float = 1e-3, steps: int = 18, churn: float = 0.0,
         time_schedule: str = "edm", rho: float = 7.0, denoise_to_zero: bool = False):
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithms 1–2).

    Integrates ``dx̂/dσ̂ = ε`` in the scaled variable ``x̂ = x/α`` and noise level ``σ̂ = σ/α`` over the
    ``'edm'`` (ρ = 7) schedule by default. Every step, including the last (which ends at ``eps``,
    ``σ̂ > 0``), is a Heun step. With ``churn > 0`` (``S_churn``), each step first raises the noise
    level to ``σ̂ (1 + γ)``, ``γ = min(churn/steps, √2 - 1)``, adding the matching fresh noise (as in
    EDM, also on the first step: the score is then evaluated slightly beyond ``T``).

    Returns ``(x, nfe)`` with ``nfe = 2 steps (+1 if denoise_to_zero)``.
    """
    _check_steps(steps)
    ns = NoiseSchedule(sde)
    eps_fn = _noise_fn(score_fn, ns)
    gamma = jnp.minimum(churn / steps, math.sqrt(2.0) - 1.0)

    def body(i, val):
        rng, x = val
        t_cur = time_at(time_schedule, ns, sde.T, eps, i / steps, rho)
        t_next = time_at(time_schedule, ns, sde.T, eps, (i + 1) / steps, rho)
        xs = x / ns.alpha(t_cur)
        if churn > 0:
            rng, step_rng = jax.random.split(rng)
            s_cur = jnp.exp(-ns.lam(t_cur))
            s_hat = s_cur * (1.0 + gamma)
            xs = xs + jnp.sqrt(s_hat ** 2 - s_cur ** 2) * jax.random.normal(step_rng, x.shape)
            t_cur = ns.t_of_lam(-jnp.log(s_hat))
        s_cur, s_next = jnp.exp(-ns.lam(t_cur)), jnp.exp(-ns.lam(t_next))
        d = eps_fn(ns.alpha(t_cur) * xs, t_cur)
        xs_euler = xs + (s_next - s_cur) * d
        d_next = eps_fn(ns.alpha(t_next) * xs_euler, t_next)
        xs = xs + (s_next - s_cur) * 0.5 * (d + d_next)
        return rng, ns.alpha(t_next) * xs

    _, x = jax.lax.fori_loop(0, steps, body, (rng, x))
    nfe = jnp.asarray(2 * steps, jnp.int32)
    if denoise_to_zero:
        x, nfe = _denoise(score_fn, ns, x, eps), nfe + 1
    return x, nfe


# --------------------------------------------------------------------------- DPM-Solver


def _dpm_solver_step(eps_fn, ns, x, s, t, order: int):
    """One singlestep DPM-Solver-``order`` step ``s -> t`` (Lu et al. 2022, Algorithms 1–2, noise prediction)."""
    lam_s, lam_t = ns.lam(s), ns.lam(t)
    h = lam_t - lam_s
    e_s = eps_fn(x, s)

    def first_order(r):
        """``x`` propagated to ``λ_s + r h`` with the frozen ``ε_s``, and that time."""
        u_t = ns.t_of_lam(lam_s + r * h)
        return jnp.exp(ns.log_alpha(u_t) - ns.log_alpha(s)) * x - ns.sigma(u_t) * jnp.expm1(r * h) * e_s, u_t

    x_t, _ = first_order(1.0)
    if order == 1:
        return x_t
    sigma_t, phi = ns.sigma(t), jnp.expm1(h)
    if order == 2:
        r1 = 0.5
        u1, s1 = first_order(r1)
        return x_t - sigma_t / (2.0 * r1) * phi * (eps_fn(u1, s1) - e_s)
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    u1, s1 = first_order(r1)
    d1 = eps_fn(u1, s1) - e_s
    u2, s2 = first_order(r2)
    u2 = u2 - ns.sigma(s2) * (r2 / r1) * (jnp.expm1(r2 * h) / (r2 * h) - 1.0) * d1
    d2 = eps_fn(u2, s2) - e_s
    return x_t - sigma_t / r2 * (phi / h - 1.0) * d2


@_SAMPLERS.register(name="dpm_solver")
def dpm_solver(rng, score_fn: ScoreFn, sde: sde_lib.SDE, x, *, eps: float = 1e-3, steps: int = 10,
               order: int = 3, time_schedule: str = "logsnr", rho: float = 7.0, denoise_to_zero: bool = False):
    """Singlestep DPM-Solver of order 1, 2 or 3 (Lu et al. 2022) on the probability-flow ODE.

    Solves ``x_t = (α_t/α_s) x_s - α_t ∫ e^{-λ} ε dλ`` exactly in its linear part and with a
    Taylor expansion of ``ε`` in ``λ`` (intermediate points at ``r = ½``, resp. ``⅓, ⅔`` of each
    step). Order 1 is DDIM (η = 0). ``rng`` is unused (deterministic).

    Returns ``(x, nfe)`` with ``nfe = order · steps (+1 if denoise_to_zero)``.
    """
    _check_steps(steps)
    if order not in (1, 2, 3):
        raise ValueError(f"config.sampling.order={order}: DPM-Solver has orders 1, 2 and 3.")
    ns = NoiseSchedule(sde)
    eps_fn = _noise_fn(score_fn, ns)

    def body(i, x):
        s = time_at(time_schedule, ns, sde.T, eps, i / steps, rho)
        t = time_at(time_schedule, ns, sde.T, eps, (i + 1) / steps, rho)
        return _dpm_solver_step(eps_fn, ns, x, s, t, order)

    x = jax.lax.fori_loop(0, steps, body, x)
    nfe = jnp.asarray(order * steps, jnp.int32)
    if denoise_to_zero:
        x, nfe = _denoise(score_fn, ns, x, eps), nfe + 1
    return x, nfe


@_SAMPLERS.register(name="dpm_solver_pp")
def dpm_solver_pp(rng, score_fn: ScoreFn, sde: sde_lib.SDE, x, *, eps: float = 1e-3, steps: int = 20,
                  lower_order_final: bool = True, time_schedule: str = "logsnr", rho: float = 7.0,
                  denoise_to_zero: bool = False):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): multistep, 2nd order, data prediction ``x̂0``.

    Step ``i``: ``x_i = (σ_i/σ_{i-1}) x_{i-1} - α_i (e^{-h_i} - 1) D_i`` with
    ``D_i = x̂0_{i-1} + (x̂0_{i-1} - x̂0_{i-2}) / (2 r_i)``, ``r_i = h_{i-1}/h_i``; the first step
    (and, with ``lower_order_final`` and fewer than 15 steps, the last) uses ``D_i = x̂0_{i-1}``, which
    the paper found more stable at few steps. ``rng`` is unused (deterministic).

    Returns ``(x, nfe)`` with ``nfe = steps (+1 if denoise_to_zero)``.
    """
    _check_steps(steps)
    ns = NoiseSchedule(sde)
    eps_fn = _noise_fn(score_fn, ns)

    def body(i, val):
        x, x0_prev, h_prev = val
        s = time_at(time_schedule, ns, sde.T, eps, i / steps, rho)
        t = time_at(time_schedule, ns, sde.T, eps, (i + 1) / steps, rho)
        h = ns.lam(t) - ns.lam(s)
        x0 = _data_from_noise(ns, x, eps_fn(x, s), s)
        first = (i == 0) | (lower_order_final & (i == steps - 1) & (steps < 15))
        correction = jnp.where(first, 0.0, h / (2.0 * h_prev))  # 1/(2 r_i)
        d = x0 + correction * (x0 - x0_prev)
        x = jnp.exp(ns.log_sigma(t) - ns.log_sigma(s)) * x - ns.alpha(t) * jnp.expm1(-h) * d
        return x, x0, h

    x, _, _ = jax.lax.fori_loop(0, steps, body, (x, jnp.zeros_like(x), jnp.float32(1.0)))
    nfe = jnp.asarray(steps, jnp.int32)
    if denoise_to_zero:
        x, nfe = _denoise(score_fn, ns, x, eps), nfe + 1
    return x, nfe


# --------------------------------------------------------------------------- adaptive SDE solver


@_SAMPLERS.register(name="adaptive_sde")
def adaptive_sde(rng, score_fn: ScoreFn, sde: sde_lib.SDE, x, *, eps: float = 1e-3, adaptive_rtol: float = 0.01,
                 adaptive_atol: float = 0.0078, h_init: float = 0.01, safety: float = 0.9, exponent: float = 0.9,
                 max_iters: int = 10_000, denoise_to_zero: bool = False):
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
    ``max_iters`` attempts do not reach ``eps`` the samples are NaN.
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
        _, _, _, t, _, iters = val
        return jnp.any(t > eps) & (iters < max_iters)

    def body(val):
        rng, x, x_prev, t, h, iters = val
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
        t = jnp.where(accept, jnp.where(h >= t - eps, eps, t - h), t)
        h = jnp.minimum(t - eps, safety * h * err ** (-exponent))
        return rng, x, x_prev, t, h, iters + 1

    t0 = jnp.full((batch,), sde.T, jnp.float32)
    h0 = jnp.full((batch,), min(h_init, sde.T - eps), jnp.float32)
    _, x, _, t, _, iters = jax.lax.while_loop(cond, body, (rng, x, x, t0, h0, jnp.int32(0)))
    x = jnp.where(_per_example(t <= eps, x), x, jnp.nan)
    nfe = 2 * iters
    if denoise_to_zero:
        x, nfe = _denoise(score_fn, ns, x, eps), nfe + 1
    return x, nfe


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
    """The keyword options of a registered sampler (all keyword-only parameters but ``eps``)."""
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "eps"]


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


def get_fast_sampler(config, sde: sde_lib.SDE, model, shape, inverse_scaler: Callable, eps: float) -> Callable:
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

    Returns:
        ``sampler(rng, pstate) -> (samples, nfe)``: ``rng`` per-device keys ``(n_devices, 2)``,
        ``pstate`` a replicated :class:`models.utils.State`; samples ``(n_devices, *shape)``;
        ``nfe`` (int) the score evaluations made (largest over devices).
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
        x, nfe = fn(rng, score_fn, sde, x, eps=eps, **options)
        return inverse_scaler(x), nfe

    p_run = parallel.pmap(run)

    def sampler(rng, state):
        x, nfe = p_run(rng, state)
        return x, int(jnp.max(nfe))

    return sampler
