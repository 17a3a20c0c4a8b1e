"""Log-likelihoods in bits/dim through the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D.2).

For data ``x`` at time ``eps`` the probability-flow ODE ``dx/dt = f(x, t) - ½ g(t)² ∇ log p_t(x)``
carries ``x`` to a latent ``z = x(T)``, and the instantaneous change of variables gives

    log p_eps(x) = log p_T(z) + ∫_eps^T div f̃(x(t), t) dt,

where ``f̃`` is the ODE's drift. The divergence is estimated with the Hutchinson–Skilling trace
estimator ``E_v[vᵀ J v]`` (Rademacher or Gaussian ``v``, one probe per example, held fixed over the
solve so the ODE stays deterministic), or computed exactly for small dimensions. Drift and
divergence come from ONE ``jax.jvp`` of the drift: its primal output is the drift, its tangent
``J v`` gives the estimate ``v · (J v)`` — one forward-mode pass of the network per evaluation of
the ODE's right-hand side (the original ran the forward pass, then forward and backward again
inside a VJP). Forward mode rather than a VJP because it is cheaper on CPU (no stored
activations) and because XLA:CPU runs the transposed convolutions of a VJP several times slower
inside a ``while`` loop (the JAX solver's body) than at top level; the JVP's convolutions keep
their fast form there.

The error of the method that no tolerance removes (compare before quoting published NLLs):
``log p_T(z)`` is unknown and replaced by the prior ``log π(z)`` (``sde.prior_logp``). Each returned
value differs from the exact flow's ``-log2 p_eps(x) / D`` by ``(log p_T(z) - log π(z)) / (D ln 2)``
bits/dim. Per example this has either sign; averaged over the data it is
``KL(p_T ‖ π) / (D ln 2) ≥ 0``, the bias of the dataset's mean bits/dim. Tightening rtol/atol
does not move it. On the golden data (every dimension N(0.3, 0.5²), D = 16) the per-example term is
about 1e-3 bits/dim for VP and subVP (the marginal at T keeps a 6.6e-3 fraction of the data mean)
and 3e-3 for VE (it keeps the whole mean 0.3 against sigma_max = 50), while the averages are far
smaller. Measure it for your data with :func:`prior_mismatch_bpd`, which estimates
``log p_T(z)`` by averaging the SDE's Gaussian transition kernel over a reference sample of data
(accurate because at ``T`` the kernel is wide against the spread of its means); the exact value
for Gaussian data comes from ``score_sde.toy``. Separately, ``p_eps`` is the data convolved with
the transition kernel to ``eps`` (``eps = 1e-5`` by default), not the data distribution itself.

Units: bits/dim of discrete 8-bit data with uniform dequantisation, as the original. The
returned value is ``-log2 p(x) / D`` in the model's input space plus the offset
``log2(inverse_scaler'(0)) + 8``: +8 for data already in ``[0, 1]`` (identity inverse scaler),
+7 for data centred to ``[-1, 1]``.

Solvers (see ``score_sde.ode``): ``solver='scipy'`` runs ``scipy.integrate.solve_ivp`` on the host
and evaluates drift + divergence through a pmapped function per evaluation, as the original
(reproduces its numbers); ``solver='jax'``, the default (``score_sde.ode.DEFAULT_SOLVER``, why
there), runs the whole adaptive solve inside the pmapped function. With ``method=None`` the scipy
path uses the original's 'RK45' and the JAX path 'dop853' with the max error norm, which at
``rtol = atol = 1e-5`` stays within 1e-5 bits/dim of the exact flow on the golden data (3.8e-6 /
3.8e-6 / 9.5e-6 for VP / subVP / VE), where RK45's error reaches 3.8e-5 (VE); pass ``method='DOP853'`` for scipy's version of that pair (RMS norm,
1.4e-5 on VE). Global error is not bounded by the tolerances: for data whose spread is small
against its mean or against ``atol``, tighten them (see ``score_sde.ode``).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import sde_lib
from models import utils as mutils
from score_sde import ode, parallel

HUTCHINSON_TYPES = ("Rademacher", "Gaussian", "exact")

# Exact traces cost one JVP per dimension of an example; beyond this, refuse with a clear message.
EXACT_TRACE_MAX_DIM = 4096

DriftFn = Callable[[jax.Array, jax.Array], jax.Array]


def get_div_fn(fn: DriftFn) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """Hutchinson–Skilling divergence estimate of ``fn`` (the original's API).

    Args:
        fn: ``fn(x, t)`` with x ``(batch, ...)``, t ``(batch,)``, output shaped like x.

    Returns:
        ``div_fn(x, t, eps) -> (batch,)``: ``Σ_i eps_i (∂fn/∂x · eps)_i`` per example, an unbiased
        estimate of ``tr(∂fn/∂x)`` when ``eps`` has zero mean and identity covariance.
    """

    def div_fn(x, t, eps):
        return get_drift_div_fn(fn)(x, t, eps)[1]

    return div_fn


def get_drift_div_fn(fn: DriftFn, hutchinson_type: str = "Rademacher"):
    """Drift and divergence of ``fn`` from one linearisation.

    Args:
        fn: ``fn(x, t)`` with x ``(batch, ...)``, t ``(batch,)``, output shaped like x. Examples must
            not interact (no cross-batch statistics), which holds for score models in eval mode.
        hutchinson_type: 'Rademacher' or 'Gaussian' (one ``jax.jvp``: the primal is the drift,
            ``v·(J v)`` the estimate), or 'exact' (``jax.linearize`` then one JVP per dimension,
            vmapped: the exact trace for ``D`` times the compute and activation memory of one
            JVP). Affordable for analytic scores up to thousands of dimensions and for networks
            on tiny inputs (a few hundred dimensions, e.g. 2-D toys or 8×8 images); a CIFAR-10
            network (D = 3072) would need ~3072 JVPs and ~3072× the activation memory per NFE —
            use 'Rademacher' there. Refused above ``EXACT_TRACE_MAX_DIM`` = 4096.

    Returns:
        ``drift_div(x, t, noise) -> (drift (batch, ...), div (batch,))``; ``noise`` is the probe
        ``v`` shaped like x (ignored for 'exact').
    """
    if hutchinson_type not in HUTCHINSON_TYPES:
        raise NotImplementedError(f"Hutchinson type {hutchinson_type!r} unknown; choose one of {list(HUTCHINSON_TYPES)}.")

    if hutchinson_type != "exact":
        def drift_div(x, t, noise):
            drift, jv = jax.jvp(lambda y: fn(y, t), (x,), (noise.astype(x.dtype),))
            return drift, jnp.sum(jv * noise, axis=tuple(range(1, x.ndim)))

        return drift_div

    def exact_drift_div(x, t, noise=None):
        del noise
        dim = int(np.prod(x.shape[1:]))
        if dim > EXACT_TRACE_MAX_DIM:
            raise ValueError(f"hutchinson_type='exact' needs one JVP per dimension; {dim} dimensions per example "
                             f"exceed EXACT_TRACE_MAX_DIM={EXACT_TRACE_MAX_DIM}. Use 'Rademacher' or 'Gaussian'.")
        drift, jvp_fn = jax.linearize(lambda y: fn(y, t), x)
        basis = jnp.eye(dim, dtype=x.dtype).reshape((dim, 1) + x.shape[1:])
        # Tangent i is the unit vector e_i in every example at once; examples do not interact,
        # so row i of the result holds J_b e_i for each example b.
        columns = jax.vmap(lambda e: jvp_fn(jnp.broadcast_to(e, x.shape)))(basis)
        columns = columns.reshape((dim, x.shape[0], dim))
        return drift, jnp.einsum("ibi->b", columns)

    return exact_drift_div


def sample_probe(rng: jax.Array, shape, hutchinson_type: str) -> jax.Array | None:
    """The Hutchinson probe ``v`` of ``shape`` (float32), as the original draws it; None for 'exact'."""
    if hutchinson_type == "Gaussian":
        return jax.random.normal(rng, shape)
    if hutchinson_type == "Rademacher":
        return jax.random.randint(rng, shape, minval=0, maxval=2).astype(jnp.float32) * 2 - 1
    if hutchinson_type == "exact":
        return None
    raise NotImplementedError(f"Hutchinson type {hutchinson_type!r} unknown; choose one of {list(HUTCHINSON_TYPES)}.")


def bpd_offset(inverse_scaler: Callable) -> float:
    """Bits/dim added for 8-bit dequantisation, ``log2(inverse_scaler'(0)) + 8`` (the original's)."""
    return float(jnp.log2(jax.grad(lambda v: jnp.asarray(inverse_scaler(v), jnp.float32))(0.0)) + 8.0)


def _probability_flow_drift(sde: sde_lib.SDE, score_fn: Callable) -> DriftFn:
    rsde = sde.reverse(score_fn, probability_flow=True)
    return lambda x, t: rsde.sde(x, t)[0]


def _default_method(solver: str, method: str | None) -> str:
    if method is not None:
        return method
    return "dop853" if solver == "jax" else "RK45"


def _bits_per_dim(sde, z, delta_logp, batch_ndim: int, offset: float) -> jax.Array:
    prior_logp = sde.prior_logp
    for _ in range(batch_ndim - 1):
        prior_logp = jax.vmap(prior_logp)
    dim = int(np.prod(z.shape[batch_ndim:]))
    return -(prior_logp(z) + delta_logp) / np.log(2) / dim + offset


def _solve_flow(drift_div, data, noise, batch_ndim: int, *, t0: float, t1: float, solver: str, method: str,
                rtol: float, atol: float, max_steps: int | None = None):
    """Integrate ``(x, logp)`` from ``t0`` to ``t1``; returns ``((z, delta_logp), nfe)``."""
    batch_shape = data.shape[:batch_ndim]

    def fn(t, state):
        x, _ = state
        vec_t = jnp.full(batch_shape, t, dtype=x.dtype)
        return drift_div(x, vec_t, noise)

    init = (data, jnp.zeros(batch_shape, data.dtype))
    if solver == "jax":
        kwargs = {} if max_steps is None else {"max_steps": max_steps}
        return ode.solve_jax(fn, init, t0, t1, rtol=rtol, atol=atol, method=method, norm="max", **kwargs)
    return ode.solve_scipy(fn, init, t0, t1, rtol=rtol, atol=atol, method=method)


def get_likelihood_fn_from_score(sde: sde_lib.SDE, score_fn: Callable, inverse_scaler: Callable = lambda v: v,
                                 hutchinson_type: str = "Rademacher", rtol: float = 1e-5, atol: float = 1e-5,
                                 method: str | None = None, eps: float = 1e-5, solver: str = ode.DEFAULT_SOLVER,
                                 max_steps: int | None = None):
    """Bits/dim for a plain ``score_fn(x, t)`` on one device (the level tests and toy data use).

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t) -> ∇_x log p_t(x)``, x ``(batch, ...)``, t ``(batch,)``.
        inverse_scaler: maps model inputs back to data in [0, 1] (sets the dequantisation offset).
        hutchinson_type: 'Rademacher', 'Gaussian' or 'exact' (see :func:`get_drift_div_fn`).
        rtol, atol: ODE solver tolerances.
        method: the solver's method; None picks 'RK45' (scipy) or 'dop853' (jax).
        eps: start time of the flow (the likelihood is that of ``p_eps``).
        solver: 'jax' (the default, ``score_sde.ode.DEFAULT_SOLVER``: the whole solve traceable, the
            returned function may be jitted) or 'scipy' (the original's).
        max_steps: step limit of the JAX solver (default of ``score_sde.ode.solve_jax``).

    Returns:
        ``likelihood_fn(rng, data) -> (bpd (batch,), z (batch, ...), nfe)``: ``rng`` a PRNG key
        (split once, the second half draws the probe, as the original); ``data`` ``(batch, ...)``
        in the model's input space; ``z`` the latent at ``sde.T``; ``nfe`` the number of
        evaluations of drift + divergence (an int for scipy, an int32 array for jax). A failed
        JAX solve returns NaN (check with ``score_sde.ode.check_finite``).
    """
    ode.check_solver(solver)
    method = _default_method(solver, method)
    drift_div = get_drift_div_fn(_probability_flow_drift(sde, score_fn), hutchinson_type)
    offset = bpd_offset(inverse_scaler)
    if solver == "scipy":
        drift_div = jax.jit(drift_div)

    def likelihood_fn(rng, data):
        _, step_rng = jax.random.split(rng)
        noise = sample_probe(step_rng, data.shape, hutchinson_type)
        (z, delta_logp), nfe = _solve_flow(drift_div, data, noise, 1, t0=eps, t1=sde.T, solver=solver,
                                           method=method, rtol=rtol, atol=atol, max_steps=max_steps)
        return _bits_per_dim(sde, z, delta_logp, 1, offset), z, nfe

    return likelihood_fn


def get_likelihood_fn(sde: sde_lib.SDE, model, inverse_scaler: Callable, hutchinson_type: str = "Rademacher",
                      rtol: float = 1e-5, atol: float = 1e-5, method: str | None = None, eps: float = 1e-5,
                      solver: str = ode.DEFAULT_SOLVER, max_steps: int | None = None):
    """Bits/dim of data under a score model through the probability-flow ODE (the original's API).

    Args:
        sde: the forward SDE the model was trained with (continuous time conditioning).
        model: a Flax score model (``models.utils.get_model``); evaluated with ``state.params_ema``
            and ``state.model_state``.
        inverse_scaler: the inverse data normaliser (``score_sde.datasets.get_data_inverse_scaler``).
        hutchinson_type: 'Rademacher', 'Gaussian' or 'exact'.
        rtol, atol: ODE tolerances.
        method: solver method; None -> 'RK45' for scipy (the original's), 'dop853' for jax.
        eps: the flow starts at ``eps`` for numerical stability.
        solver: 'jax' (the default, ``score_sde.ode.DEFAULT_SOLVER``: the whole solve on device, per
            device) or 'scipy' (the original's host loop and numbers).
        max_steps: step limit of the JAX solver.

    Returns:
        ``likelihood_fn(prng, pstate, data) -> (bpd, z, nfe)``: ``prng`` ``(n_devices, 2)`` keys (the
        first one draws the probes for the whole batch, as the original); ``pstate`` the replicated
        :class:`models.utils.State`; ``data`` ``(n_devices, batch, H, W, C)`` in model input space.
        ``bpd`` ``(n_devices, batch)``, ``z`` like ``data``, ``nfe`` a python int (the most any
        device needed with the JAX solver).
    """
    ode.check_solver(solver)
    method = _default_method(solver, method)
    offset = bpd_offset(inverse_scaler)

    def state_drift_div(state):
        score_fn = mutils.get_score_fn(sde, model, state.params_ema, state.model_state, train=False, continuous=True)
        return get_drift_div_fn(_probability_flow_drift(sde, score_fn), hutchinson_type)

    if solver == "scipy":
        p_drift_div = parallel.pmap(lambda state, x, t, noise: state_drift_div(state)(x, t, noise))
    else:
        def solve_one_device(state, data, noise):
            (z, delta_logp), nfe = _solve_flow(state_drift_div(state), data, noise, 1, t0=eps, t1=sde.T,
                                               solver="jax", method=method, rtol=rtol, atol=atol,
                                               max_steps=max_steps)
            return _bits_per_dim(sde, z, delta_logp, 1, offset), z, nfe

        p_solve = parallel.pmap(solve_one_device)

    def likelihood_fn(prng, pstate, data):
        _, step_rng = jax.random.split(parallel.unreplicate(prng))
        noise = sample_probe(step_rng, data.shape, hutchinson_type)
        if noise is None:  # exact trace: a placeholder that pmap can split
            noise = jnp.zeros(data.shape[:2], data.dtype)
        if solver == "scipy":
            drift_div = lambda x, t, v: p_drift_div(pstate, x, t, v)
            (z, delta_logp), nfe = _solve_flow(drift_div, data, noise, 2, t0=eps, t1=sde.T, solver="scipy",
                                               method=method, rtol=rtol, atol=atol)
            return _bits_per_dim(sde, z, delta_logp, 2, offset), z, nfe
        bpd, z, nfe = p_solve(pstate, data, noise)
        ode.check_finite((bpd, z), "bits/dim solve")
        return bpd, z, int(jnp.max(nfe))

    return likelihood_fn


def prior_mismatch_bpd(sde: sde_lib.SDE, z: jax.Array, reference_data: jax.Array, chunk: int = 4096) -> jax.Array:
    """Estimate the method's bias per example, ``(log p_T(z) - log π(z)) / (D ln 2)`` bits/dim.

    ``p_T`` is the data distribution diffused to ``sde.T``; it is estimated by averaging the SDE's
    Gaussian transition kernel ``N(z; mean_T(x0), std_T² I)`` (``sde.marginal_prob``) over
    ``reference_data`` (e.g. a few thousand training examples). Add the (negated) result to the
    returned bits/dim to remove the bias: ``bpd - prior_mismatch_bpd(...)`` approximates
    ``-log2 p_eps(x)/D + offset``.

    Args:
        sde: the forward SDE.
        z: latents ``(batch, ...)`` returned by a likelihood function.
        reference_data: ``(M, ...)`` samples of the data in model input space.
        chunk: reference examples processed at once.

    Returns:
        ``(batch,)`` bits/dim.
    """
    z = jnp.asarray(z)
    ref = jnp.asarray(reference_data, z.dtype)
    dim = int(np.prod(z.shape[1:]))
    t_end = jnp.full((ref.shape[0],), sde.T, z.dtype)
    means, std = sde.marginal_prob(ref, t_end)
    var = std[0] ** 2
    zf = z.reshape(z.shape[0], -1)
    parts = []
    for start in range(0, ref.shape[0], chunk):
        mf = means[start:start + chunk].reshape(-1, dim)
        sq = jnp.sum(zf ** 2, 1)[:, None] - 2 * zf @ mf.T + jnp.sum(mf ** 2, 1)[None, :]
        parts.append(-0.5 * sq / var)
    log_kernel = jnp.concatenate(parts, axis=1) - 0.5 * dim * jnp.log(2 * math.pi * var)
    log_pt = jax.scipy.special.logsumexp(log_kernel, axis=1) - np.log(ref.shape[0])
    return (log_pt - sde.prior_logp(z)) / (dim * np.log(2))


__all__ = ["get_div_fn", "get_drift_div_fn", "get_likelihood_fn", "get_likelihood_fn_from_score", "sample_probe",
           "bpd_offset", "prior_mismatch_bpd", "HUTCHINSON_TYPES", "EXACT_TRACE_MAX_DIM"]
