"""Samplers of score-based models: predictor–corrector (PC) and the probability-flow ODE.

Two levels:

* **score level** — :func:`pc_sample`, :func:`ode_sample` and the jitted
  :func:`get_score_pc_sampler` / :func:`get_score_ode_sampler` take any ``score_fn(x, t)``
  (an analytic score from :mod:`score_sde.toy`, a toy network, a trained model's wrapper);
* **model level** — :func:`get_pc_sampler`, :func:`get_ode_sampler` and :func:`get_sampling_fn`
  keep the original's API: they take a Flax model and a replicated training state and run
  data parallel over the local devices (axis ``'batch'``, see :mod:`score_sde.parallel`).

Shapes: ``shape`` is the shape of one device's batch, ``(batch, H, W, C)``; model-level samplers
take a replicated state and per-device keys ``(n_devices, 2)`` and return ``(n_devices, *shape)``.
Times ``t`` passed to predictors/correctors are ``(batch,)``.

Random numbers are consumed exactly as in the original implementation, so the same key gives
the same samples (``tests/golden``).
"""
from __future__ import annotations

import abc
import functools
from typing import Callable, Optional, Tuple, Type

import jax
import jax.numpy as jnp

import fast_sampling
import sde_lib
from models import utils as mutils
from score_sde import ode, parallel, registry
from sde_lib import ScoreFn, batch_mul

UpdateFn = Callable[[jax.Array, jax.Array, jax.Array], Tuple[jax.Array, jax.Array]]

_PREDICTORS = registry.Registry("predictor", "config.sampling.predictor")
_CORRECTORS = registry.Registry("corrector", "config.sampling.corrector")
register_predictor = _PREDICTORS.register
register_corrector = _CORRECTORS.register


def registered_predictors() -> list[str]:
    """Names accepted by :func:`get_predictor` (``config.sampling.predictor``)."""
    return _PREDICTORS.names()


def registered_correctors() -> list[str]:
    """Names accepted by :func:`get_corrector` (``config.sampling.corrector``)."""
    return _CORRECTORS.names()


def get_predictor(name: str) -> Type["Predictor"]:
    """The predictor class registered as ``name``."""
    return _PREDICTORS.get(name)


def get_corrector(name: str) -> Type["Corrector"]:
    """The corrector class registered as ``name``."""
    return _CORRECTORS.get(name)


def _timestep_index(sde: sde_lib.SDE, t: jax.Array) -> jax.Array:
    """Index ``i = int(t (N-1) / T)`` of the discrete schedule, (batch,) int32."""
    return (t * (sde.N - 1) / sde.T).astype(jnp.int32)


def _require_valid_discrete_schedule(sde: sde_lib.SDE, who: str) -> None:
    """Raise if ``sde``'s discrete DDPM schedule has ``beta_i >= 1`` (then ``sqrt(1 - beta_i)`` is NaN)."""
    if getattr(sde, "discrete_schedule_is_valid", True):
        return
    raise ValueError(
        f"{who} uses the discrete schedule beta_i = beta(i/(N-1))/N of {type(sde).__name__}, but with "
        f"N={sde.N} and beta_max={sde.beta_1} the largest beta_i is {sde.beta_1 / sde.N:.3g} >= 1, so "
        f"1 - beta_i is not positive and the samples would be NaN. Use a larger N (config.model.num_scales "
        f"> beta_max, e.g. 1000), or the euler_maruyama predictor with the none corrector.")


class Predictor(abc.ABC):
    """One step of a numerical solver of the reverse-time SDE (or probability-flow ODE).

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t)``, x (batch, ...), t (batch,).
        probability_flow: step the probability-flow ODE instead of the reverse SDE.
    """

    # Evaluations of score_fn per update_fn call (every predictor here takes one).
    score_evals_per_call = 1

    def __init__(self, sde: sde_lib.SDE, score_fn: ScoreFn, probability_flow: bool = False):
        super().__init__()
        self.sde = sde
        self.rsde = sde.reverse(score_fn, probability_flow)
        self.score_fn = score_fn

    @abc.abstractmethod
    def update_fn(self, rng: jax.Array, x: jax.Array, t: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """One predictor step from time ``t`` (batch,) to ``t - T/N``.

        Returns ``(x, x_mean)``: the next state and the same without the injected noise.
        """


class Corrector(abc.ABC):
    """MCMC steps at fixed time ``t`` towards ``p_t`` (score-based Langevin dynamics).

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t)``.
        snr: signal-to-noise ratio that sets the step size.
        n_steps: number of MCMC steps per call.
    """

    # Evaluations of score_fn per MCMC step (one for the Langevin-type correctors here).
    score_evals_per_step = 1

    def __init__(self, sde: sde_lib.SDE, score_fn: ScoreFn, snr: float, n_steps: int):
        super().__init__()
        self.sde = sde
        self.score_fn = score_fn
        self.snr = snr
        self.n_steps = n_steps

    @abc.abstractmethod
    def update_fn(self, rng: jax.Array, x: jax.Array, t: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """``n_steps`` corrector steps at time ``t`` (batch,); returns ``(x, x_mean)``."""


@register_predictor(name="euler_maruyama")
class EulerMaruyamaPredictor(Predictor):
    """Euler–Maruyama step of the reverse SDE (or ODE) with ``dt = -1/N``."""

    def update_fn(self, rng, x, t):
        dt = -1.0 / self.rsde.N
        z = jax.random.normal(rng, x.shape)
        drift, diffusion = self.rsde.sde(x, t)
        x_mean = x + drift * dt
        return x_mean + batch_mul(diffusion, jnp.sqrt(-dt) * z), x_mean


@register_predictor(name="reverse_diffusion")
class ReverseDiffusionPredictor(Predictor):
    """Reverse of the SDE's own discretisation (DDPM's for VP, SMLD's for VE)."""

    def __init__(self, sde, score_fn, probability_flow=False):
        if isinstance(sde, sde_lib.VPSDE):
            _require_valid_discrete_schedule(sde, "The reverse_diffusion predictor")
        super().__init__(sde, score_fn, probability_flow)

    def update_fn(self, rng, x, t):
        f, G = self.rsde.discretize(x, t)
        z = jax.random.normal(rng, x.shape)
        x_mean = x - f
        return x_mean + batch_mul(G, z), x_mean


@register_predictor(name="ancestral_sampling")
class AncestralSamplingPredictor(Predictor):
    """Ancestral sampling of DDPM (VP) and SMLD (VE); not defined for sub-VP."""

    def __init__(self, sde, score_fn, probability_flow=False):
        if not isinstance(sde, (sde_lib.VPSDE, sde_lib.VESDE)):
            raise NotImplementedError(
                f"The ancestral_sampling predictor is defined only for VPSDE (DDPM) and VESDE (SMLD), not "
                f"{type(sde).__name__}; use config.sampling.predictor='reverse_diffusion' or 'euler_maruyama'.")
        if probability_flow:
            raise ValueError("The ancestral_sampling predictor has no probability-flow version; "
                             "set config.sampling.probability_flow=False or use another predictor.")
        if isinstance(sde, sde_lib.VPSDE):
            _require_valid_discrete_schedule(sde, "The ancestral_sampling predictor")
        super().__init__(sde, score_fn, probability_flow)

    def _vesde_update(self, rng, x, t):
        sde = self.sde
        timestep = _timestep_index(sde, t)
        sigma = sde.discrete_sigmas[timestep]
        adjacent_sigma = jnp.where(timestep == 0, jnp.zeros(t.shape), sde.discrete_sigmas[timestep - 1])
        score = self.score_fn(x, t)
        x_mean = x + batch_mul(score, sigma ** 2 - adjacent_sigma ** 2)
        std = jnp.sqrt((adjacent_sigma ** 2 * (sigma ** 2 - adjacent_sigma ** 2)) / (sigma ** 2))
        noise = jax.random.normal(rng, x.shape)
        return x_mean + batch_mul(std, noise), x_mean

    def _vpsde_update(self, rng, x, t):
        sde = self.sde
        beta = sde.discrete_betas[_timestep_index(sde, t)]
        score = self.score_fn(x, t)
        x_mean = batch_mul(x + batch_mul(beta, score), 1.0 / jnp.sqrt(1.0 - beta))
        noise = jax.random.normal(rng, x.shape)
        return x_mean + batch_mul(jnp.sqrt(beta), noise), x_mean

    def update_fn(self, rng, x, t):
        if isinstance(self.sde, sde_lib.VESDE):
            return self._vesde_update(rng, x, t)
        return self._vpsde_update(rng, x, t)


@register_predictor(name="none")
class NonePredictor(Predictor):
    """No predictor: a corrector-only sampler."""

    score_evals_per_call = 0

    def __init__(self, sde, score_fn, probability_flow=False):  # noqa: D107 - needs no reverse SDE
        self.sde = sde
        self.score_fn = score_fn

    def update_fn(self, rng, x, t):
        return x, x


def _langevin_alpha(sde: sde_lib.SDE, t: jax.Array) -> jax.Array:
    """The factor ``alpha_i`` of the Langevin step size: DDPM's ``1 - beta_i`` for VP/sub-VP, else 1."""
    if isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE)):
        return sde.alphas[_timestep_index(sde, t)]
    return jnp.ones_like(t)


class _LangevinBase(Corrector):
    """Shared checks and loop of the Langevin-type correctors."""

    name = ""

    def __init__(self, sde, score_fn, snr, n_steps):
        if not isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE, sde_lib.VESDE)):
            raise NotImplementedError(f"The {self.name} corrector does not support SDE class {type(sde).__name__}.")
        if isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE)):
            _require_valid_discrete_schedule(sde, f"The {self.name} corrector (its step size)")
        super().__init__(sde, score_fn, snr, n_steps)

    def _step_size(self, grad: jax.Array, noise: jax.Array, t: jax.Array, alpha: jax.Array) -> jax.Array:
        """Per-example step size (batch,)."""
        raise NotImplementedError

    def update_fn(self, rng, x, t):
        alpha = _langevin_alpha(self.sde, t)

        def loop_body(_, val):
            rng, x, _ = val
            grad = self.score_fn(x, t)
            rng, step_rng = jax.random.split(rng)
            noise = jax.random.normal(step_rng, x.shape)
            step_size = self._step_size(grad, noise, t, alpha)
            x_mean = x + batch_mul(step_size, grad)
            return rng, x_mean + batch_mul(noise, jnp.sqrt(step_size * 2)), x_mean

        _, x, x_mean = jax.lax.fori_loop(0, self.n_steps, loop_body, (rng, x, x))
        return x, x_mean


def _mean_norm(v: jax.Array) -> jax.Array:
    """Mean of ``||v_i||`` over the batch, and over the devices as ``parallel.pmean_over_devices`` says."""
    norm = jnp.linalg.norm(v.reshape((v.shape[0], -1)), axis=-1).mean()
    return parallel.pmean_over_devices(norm)


@register_corrector(name="langevin")
class LangevinCorrector(_LangevinBase):
    """Langevin MCMC with step size ``2 alpha (snr ||z|| / ||score||)²`` (norms averaged over the batch)."""

    name = "langevin"

    def _step_size(self, grad, noise, t, alpha):
        return (self.snr * _mean_norm(noise) / _mean_norm(grad)) ** 2 * 2 * alpha


@register_corrector(name="ald")
class AnnealedLangevinDynamics(_LangevinBase):
    """Annealed Langevin dynamics of NCSN/NCSNv2: step size ``2 alpha (snr std(t))²``.

    Included for completeness; the paper did not use it.
    """

    name = "ald"

    def _step_size(self, grad, noise, t, alpha):
        std = self.sde.marginal_prob(jnp.zeros_like(grad), t)[1]
        return (self.snr * std) ** 2 * 2 * alpha


@register_corrector(name="none")
class NoneCorrector(Corrector):
    """No corrector: a predictor-only sampler."""

    score_evals_per_step = 0

    def update_fn(self, rng, x, t):
        return x, x


def _unused_score(x, t):
    raise RuntimeError("placeholder score_fn used only to validate a predictor/corrector configuration")


def validate_pc(sde: sde_lib.SDE, predictor: Optional[type], corrector: Optional[type],
                probability_flow: bool = False, snr: float = 0.16, n_steps: int = 1) -> None:
    """Build the predictor and corrector once so that a bad combination fails before any tracing."""
    (predictor or NonePredictor)(sde, _unused_score, probability_flow)
    (corrector or NoneCorrector)(sde, _unused_score, snr, n_steps)


def pc_update_fns(sde: sde_lib.SDE, score_fn: ScoreFn, predictor: Optional[type], corrector: Optional[type],
                  snr: float, n_steps: int = 1, probability_flow: bool = False) -> Tuple[UpdateFn, UpdateFn]:
    """``(corrector_update, predictor_update)``, each ``update(rng, x, t) -> (x, x_mean)``.

    ``None`` for a predictor/corrector means "none", as in the original.
    """
    predictor_obj = (predictor or NonePredictor)(sde, score_fn, probability_flow)
    corrector_obj = (corrector or NoneCorrector)(sde, score_fn, snr, n_steps)
    return corrector_obj.update_fn, predictor_obj.update_fn


def pc_loop(rng: jax.Array, x: jax.Array, sde: sde_lib.SDE, eps: float, corrector_update: UpdateFn,
            predictor_update: UpdateFn, record: Optional[fast_sampling.Recording] = None) -> Tuple[jax.Array, ...]:
    """The PC loop over ``N`` times from ``T`` down to ``eps`` (``fast_sampling.recorded_fori_loop``).

    Each iteration splits ``rng`` for the corrector, then for the predictor (the original's order).
    Returns the final ``(x, x_mean)``; with ``record`` also the recorded states of ``x``
    (:class:`fast_sampling.Recording`), which leave ``x`` and ``x_mean`` bit for bit unchanged.
    """
    timesteps = jnp.linspace(sde.T, eps, sde.N)
    batch = x.shape[0]

    def loop_body(i, val):
        rng, x, _ = val
        vec_t = jnp.ones(batch) * timesteps[i]
        rng, step_rng = jax.random.split(rng)
        x, x_mean = corrector_update(step_rng, x, vec_t)
        rng, step_rng = jax.random.split(rng)
        x, x_mean = predictor_update(step_rng, x, vec_t)
        return rng, x, x_mean

    (_, x, x_mean), path = fast_sampling.recorded_fori_loop(sde.N, loop_body, (rng, x, x), record,
                                                            lambda val: val[1])
    return (x, x_mean) if record is None else (x, x_mean, path)


def pc_nfe(sde: sde_lib.SDE, predictor: Optional[type], corrector: Optional[type], n_steps: int = 1) -> int:
    """Score evaluations of a PC sampler: ``N`` times those of one predictor and one corrector call.

    ``N (1 + n_steps)`` with both, ``N`` predictor-only, ``N n_steps`` corrector-only. (The original
    reports ``N (n_steps + 1)`` whatever the predictor and corrector are, so it counts a
    predictor-only or corrector-only sampler's evaluations twice or more.)
    """
    predictor_evals = (predictor or NonePredictor).score_evals_per_call
    corrector_evals = (corrector or NoneCorrector).score_evals_per_step * n_steps
    return sde.N * (predictor_evals + corrector_evals)


def pc_sample(rng: jax.Array, score_fn: ScoreFn, sde: sde_lib.SDE, shape, predictor: Optional[type],
              corrector: Optional[type], snr: float, n_steps: int = 1, probability_flow: bool = False,
              denoise: bool = True, eps: float = 1e-3, record: Optional[fast_sampling.Recording] = None):
    """PC sampling with a plain ``score_fn``; pure and traceable (jit or pmap it).

    Args:
        rng: PRNG key.
        score_fn: ``score_fn(x, t)``.
        sde: forward SDE; its ``N`` sets the number of steps.
        shape: ``(batch, ...)`` of the samples.
        predictor, corrector: classes (see :func:`get_predictor`) or ``None``.
        snr, n_steps: corrector settings.
        probability_flow: predictor steps the probability-flow ODE.
        denoise: return the last step's noise-free mean.
        eps: the last time.
        record: also return the path from the latent to the samples (:class:`fast_sampling.Recording`).

    Returns:
        Samples of ``shape``; with ``record`` ``(samples, path)``.
    """
    corrector_update, predictor_update = pc_update_fns(sde, score_fn, predictor, corrector, snr, n_steps,
                                                       probability_flow)
    rng, step_rng = jax.random.split(rng)
    x = sde.prior_sampling(step_rng, shape)
    x, x_mean, *path = pc_loop(rng, x, sde, eps, corrector_update, predictor_update, record)
    samples = x_mean if denoise else x
    return samples if record is None else (samples, fast_sampling.path_with_samples(path[0], samples, record))


def _identity(x):
    return x


def get_score_pc_sampler(sde: sde_lib.SDE, score_fn: ScoreFn, shape, predictor: Optional[type],
                         corrector: Optional[type], inverse_scaler: Callable = _identity, snr: float = 0.16,
                         n_steps: int = 1, probability_flow: bool = False, denoise: bool = True,
                         eps: float = 1e-3) -> Callable[[jax.Array], Tuple[jax.Array, int]]:
    """A jitted PC sampler ``sampler(rng) -> (samples, nfe)`` for a fixed ``score_fn`` (no devices axis).

    Arguments as :func:`get_pc_sampler`; correctors average their step-size norms over this batch only.
    """
    validate_pc(sde, predictor, corrector, probability_flow, snr, n_steps)

    @jax.jit
    def run(rng):
        return inverse_scaler(pc_sample(rng, score_fn, sde, shape, predictor, corrector, snr, n_steps,
                                        probability_flow, denoise, eps))

    nfe = pc_nfe(sde, predictor, corrector, n_steps)
    return lambda rng: (run(rng), nfe)


def _model_score_fn(sde, model, state, continuous: bool) -> ScoreFn:
    """Score of the EMA parameters of ``state`` (what evaluation and sampling use)."""
    return mutils.get_score_fn(sde, model, state.params_ema, state.model_state, train=False, continuous=continuous)


def shared_predictor_update_fn(rng, state, x, t, sde, model, predictor, probability_flow, continuous):
    """One predictor step with the model of ``state`` (the original's helper)."""
    score_fn = _model_score_fn(sde, model, state, continuous)
    return (predictor or NonePredictor)(sde, score_fn, probability_flow).update_fn(rng, x, t)


def shared_corrector_update_fn(rng, state, x, t, sde, model, corrector, continuous, snr, n_steps):
    """One corrector call with the model of ``state`` (the original's helper)."""
    score_fn = _model_score_fn(sde, model, state, continuous)
    return (corrector or NoneCorrector)(sde, score_fn, snr, n_steps).update_fn(rng, x, t)


def get_pc_sampler(sde, model, shape, predictor, corrector, inverse_scaler, snr,
                   n_steps=1, probability_flow=False, continuous=False,
                   denoise=True, eps=1e-3, record=None):
    """Create a predictor–corrector sampler running data parallel over the local devices.

    Args:
        sde: forward SDE.
        model: Flax module of the score model.
        shape: one device's sample batch, ``(batch, H, W, C)``.
        predictor: a :class:`Predictor` subclass, or ``None``.
        corrector: a :class:`Corrector` subclass, or ``None``.
        inverse_scaler: maps model space back to data space.
        snr: corrector signal-to-noise ratio.
        n_steps: corrector steps per predictor step.
        probability_flow: predictor steps the probability-flow ODE.
        continuous: the model was trained with continuous time.
        denoise: return the last step's noise-free mean.
        eps: last time of the reverse integration.
        record: also return each device's path (:class:`fast_sampling.Recording`), through ``inverse_scaler``.

    Returns:
        ``sampler(rng, pstate) -> (samples, nfe)``: ``rng`` per-device keys ``(n_devices, 2)``,
        ``pstate`` a replicated :class:`models.utils.State`; samples ``(n_devices, *shape)``;
        ``nfe`` the number of score evaluations (int). With ``record`` ``(samples, nfe, path)``.
    """
    validate_pc(sde, predictor, corrector, probability_flow, snr, n_steps)

    def pc_sampler(rng, state):
        score_fn = _model_score_fn(sde, model, state, continuous)
        out = pc_sample(rng, score_fn, sde, shape, predictor, corrector, snr, n_steps, probability_flow, denoise, eps,
                        record)
        return inverse_scaler(out) if record is None else tuple(inverse_scaler(v) for v in out)

    run = parallel.pmap(pc_sampler)
    nfe = pc_nfe(sde, predictor, corrector, n_steps)

    def sampler(rng, state):
        if record is None:
            return run(rng, state), nfe
        samples, path = run(rng, state)
        return samples, nfe, path

    return sampler


# --------------------------------------------------------------------------- probability-flow ODE


def probability_flow_drift(sde: sde_lib.SDE, score_fn: ScoreFn) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``drift(t, x)`` of the probability-flow ODE for a scalar time ``t`` and x (batch, ...)."""
    rsde = sde.reverse(score_fn, probability_flow=True)

    def drift(t, x):
        return rsde.sde(x, jnp.ones(x.shape[0]) * t)[0]

    return drift


def denoise_update(rng: jax.Array, score_fn: ScoreFn, sde: sde_lib.SDE, x: jax.Array, eps: float) -> jax.Array:
    """One noise-free reverse-diffusion step at ``t = eps`` (the ODE sampler's denoising)."""
    predictor = ReverseDiffusionPredictor(sde, score_fn, probability_flow=False)
    return predictor.update_fn(rng, x, jnp.ones(x.shape[0]) * eps)[1]


def _check_solver(solver: str, denoise: bool, sde: sde_lib.SDE) -> None:
    ode.check_solver(solver)
    if denoise and isinstance(sde, sde_lib.VPSDE):
        _require_valid_discrete_schedule(sde, "Denoising (config.sampling.noise_removal) with reverse diffusion")


def ode_sample_jax(score_fn: ScoreFn, sde: sde_lib.SDE, x: jax.Array, rng: Optional[jax.Array] = None, *,
                   denoise: bool = False, rtol: float = 1e-5, atol: float = 1e-5, method: str = "RK45",
                   eps: float = 1e-3) -> Tuple[jax.Array, jax.Array]:
    """Integrate the probability-flow ODE from ``x`` at ``T`` to ``eps`` with the JAX solver; traceable.

    Args:
        score_fn: ``score_fn(x, t)``.
        sde: forward SDE.
        x: latent ``(batch, ...)`` at time ``T``.
        rng: key for the denoising step (its noise is not used; only needed if ``denoise``).
        denoise, rtol, atol, method, eps: see :func:`get_ode_sampler`.

    Returns:
        ``(samples, nfe)`` with ``nfe`` an int32 scalar: the solve's score evaluations, plus one if
        ``denoise``.
    """
    x, nfe = ode.solve_jax(probability_flow_drift(sde, score_fn), x, sde.T, eps, rtol=rtol, atol=atol,
                           method=method)
    if denoise:
        x = denoise_update(rng, score_fn, sde, x, eps)
    return x, nfe + int(denoise)


def get_score_ode_sampler(sde: sde_lib.SDE, score_fn: ScoreFn, shape, inverse_scaler: Callable = _identity,
                          denoise: bool = False, rtol: float = 1e-5, atol: float = 1e-5, method: str = "RK45",
                          eps: float = 1e-3, solver: str = ode.DEFAULT_SOLVER) -> Callable:
    """A probability-flow ODE sampler for a fixed ``score_fn`` (no devices axis).

    Returns ``sampler(rng, z=None) -> (samples, nfe)``: ``z`` (``shape``) is an optional latent
    at time ``T`` (otherwise drawn from the prior with ``rng``); ``nfe`` is an int. Other
    arguments as :func:`get_ode_sampler`.
    """
    _check_solver(solver, denoise, sde)
    drift = jax.jit(probability_flow_drift(sde, score_fn))
    run_jax = jax.jit(functools.partial(ode_sample_jax, score_fn, sde, denoise=denoise, rtol=rtol, atol=atol,
                                        method=method, eps=eps))
    denoise_fn = jax.jit(lambda rng, x: denoise_update(rng, score_fn, sde, x, eps))

    def sampler(rng, z=None):
        rng, step_rng = jax.random.split(rng)
        x = sde.prior_sampling(step_rng, shape) if z is None else jnp.asarray(z)
        rng, step_rng = jax.random.split(rng)
        if solver == "jax":
            x, nfe = run_jax(x, step_rng)
            ode.check_finite(x, "probability-flow ODE sample")
        else:
            x, nfe = ode.solve_scipy(drift, x, sde.T, eps, method=method, rtol=rtol, atol=atol)
            if denoise:
                x = denoise_fn(step_rng, x)
            nfe += int(denoise)
        return inverse_scaler(x), int(nfe)

    return sampler


def get_ode_sampler(sde, model, shape, inverse_scaler, denoise=False, rtol=1e-5, atol=1e-5, method="RK45",
                    eps=1e-3, solver=ode.DEFAULT_SOLVER):
    """Create a probability-flow ODE sampler with an adaptive black-box solver.

    Args:
        sde: forward SDE.
        model: Flax module of the score model (evaluated as continuous-time).
        shape: one device's sample batch, ``(batch, H, W, C)``.
        inverse_scaler: maps model space back to data space.
        denoise: finish with one noise-free reverse-diffusion step at ``eps``.
        rtol, atol: solver tolerances.
        method: Runge–Kutta pair. scipy: any ``solve_ivp`` method; JAX: 'RK45'/'dopri5',
            'DOP853'/'dop853', 'RK23'/'bosh3' (see :mod:`score_sde.ode`).
        eps: end time of the integration.
        solver: 'jax' (the default, ``score_sde.ode.DEFAULT_SOLVER``: the whole solve in one compiled
            program per device, no host round trip per step) or 'scipy' (``scipy.integrate.solve_ivp`` over all devices' states at once, one
            pmapped drift evaluation per step: the original's path and numbers).

    Returns:
        ``sampler(prng, pstate, z=None) -> (samples, nfe)``: ``prng`` per-device keys
        ``(n_devices, 2)``, ``pstate`` a replicated state, ``z`` an optional latent
        ``(n_devices, *shape)`` (encode/decode, interpolation); samples ``(n_devices, *shape)``;
        ``nfe`` (int) the score evaluations of the solve (largest over devices for 'jax'), plus one
        if ``denoise`` (the original reported the solve's alone).
    """
    _check_solver(solver, denoise, sde)

    def score_of(state):
        return _model_score_fn(sde, model, state, continuous=True)

    def drift_fn(state, x, t):
        return probability_flow_drift(sde, score_of(state))(t, x)

    def denoise_fn(rng, state, x):
        return denoise_update(rng, score_of(state), sde, x, eps)

    def solve_fn(rng, state, x):
        return ode_sample_jax(score_of(state), sde, x, rng, denoise=denoise, rtol=rtol, atol=atol, method=method,
                              eps=eps)

    p_drift = parallel.pmap(drift_fn)
    p_denoise = parallel.pmap(denoise_fn)
    p_solve = parallel.pmap(solve_fn)

    def ode_sampler(prng, pstate, z=None):
        n_dev = parallel.local_device_count()
        rng = parallel.unreplicate(prng)
        rng, step_rng = jax.random.split(rng)
        x = sde.prior_sampling(step_rng, (n_dev,) + tuple(shape)) if z is None else jnp.asarray(z)
        rng, *step_rngs = jax.random.split(rng, n_dev + 1)
        step_rngs = jnp.asarray(step_rngs)
        if solver == "jax":
            x, nfe = p_solve(step_rngs, pstate, x)
            ode.check_finite(x, "probability-flow ODE sample")
            nfe = int(jnp.max(nfe))
        else:
            def ode_func(t, x):
                return p_drift(pstate, x, jnp.full((n_dev,), t, jnp.float32))

            x, nfe = ode.solve_scipy(ode_func, x, sde.T, eps, method=method, rtol=rtol, atol=atol)
            if denoise:
                x = p_denoise(step_rngs, pstate, x)
            nfe += int(denoise)
        return inverse_scaler(x), nfe

    return ode_sampler


def get_sampling_fn(config, sde, model, shape, inverse_scaler, eps, record=None):
    """The sampler named by ``config.sampling.method`` ('pc', 'ode' or a fast sampler) for a model.

    Args:
        config: ``ml_collections.ConfigDict``; reads ``sampling.{method, predictor, corrector, snr,
            n_steps_each, probability_flow, noise_removal, ode_solver, ode_rtol, ode_atol}`` and
            ``training.continuous``.
        sde: forward SDE.
        model: Flax score model.
        shape: one device's sample batch ``(batch, H, W, C)``.
        inverse_scaler: maps model space back to data space.
        eps: end time of the reverse integration.
        record: a :class:`fast_sampling.Recording`: the sampler also returns the path from noise to
            the samples (every method but 'ode', see :func:`records_path`).

    Returns:
        ``sampling_fn(rng, pstate) -> (samples, nfe)``, see :func:`get_pc_sampler` / :func:`get_ode_sampler`
        and, for 'ddim', 'heun', 'dpm_solver', 'dpm_solver_pp' and 'adaptive_sde' (options
        ``sampling.steps``, ``order``, ``eta``, ...), ``fast_sampling.get_fast_sampler``; with
        ``record`` ``(samples, nfe, path)``, ``path`` ``(n_devices, frames, first, *shape[1:])``.
    """
    sampler_name = config.sampling.method.lower()
    if record is not None and not records_path(sampler_name):
        raise ValueError(f"config.sampling.method={sampler_name!r} records no path from noise to data; "
                         f"the methods that do: {[m for m in sampling_methods() if records_path(m)]}.")
    if sampler_name == "ode":
        return get_ode_sampler(sde=sde, model=model, shape=shape, inverse_scaler=inverse_scaler,
                               denoise=config.sampling.noise_removal, eps=eps,
                               rtol=config.sampling.get("ode_rtol", 1e-5), atol=config.sampling.get("ode_atol", 1e-5),
                               solver=config.sampling.get("ode_solver", ode.DEFAULT_SOLVER))
    if sampler_name == "pc":
        return get_pc_sampler(sde=sde, model=model, shape=shape,
                              predictor=get_predictor(config.sampling.predictor.lower()),
                              corrector=get_corrector(config.sampling.corrector.lower()),
                              inverse_scaler=inverse_scaler, snr=config.sampling.snr,
                              n_steps=config.sampling.n_steps_each, probability_flow=config.sampling.probability_flow,
                              continuous=config.training.continuous, denoise=config.sampling.noise_removal, eps=eps,
                              record=record)
    if sampler_name in fast_sampling.registered_fast_samplers():
        return fast_sampling.get_fast_sampler(config, sde, model, shape, inverse_scaler, eps, record=record)
    raise ValueError(f"config.sampling.method={config.sampling.method!r} is unknown; use one of "
                     f"{', '.join(sampling_methods())}.")


def records_path(method: str) -> bool:
    """Whether ``get_sampling_fn(..., record=...)`` can return the path of ``method`` (a sampling method name).

    All but 'ode': its adaptive solver (``score_sde.ode.solve_jax``) keeps no intermediate states, and
    solving to each frame time instead would change its steps, hence its samples.
    """
    return method.lower() != "ode"


def sampling_methods() -> list[str]:
    """Every name ``config.sampling.method`` accepts: 'pc', 'ode' and the fast samplers of ``fast_sampling``."""
    return ["pc", "ode"] + fast_sampling.registered_fast_samplers()
