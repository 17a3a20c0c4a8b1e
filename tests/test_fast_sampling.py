"""fast_sampling against exact math: Gaussian data, whose score and probability-flow map are closed form."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import fast_sampling
import sampling
import sde_lib
from score_sde import parallel, toy
from models import utils as mutils
from tests.helpers import SDE_NAMES, assert_close_scaled, make_sde

EPS = {"vpsde": 1e-3, "subvpsde": 1e-3, "vesde": 1e-5}


def _gaussian(d: int, seed: int = 0) -> toy.Gaussian:
    """A d-dim Gaussian with a rotated covariance (eigenvalues 0.1 ... 1) and a non-zero mean."""
    rs = np.random.RandomState(seed)
    q = np.linalg.qr(rs.randn(d, d))[0]
    return toy.Gaussian(0.5 * rs.randn(d), q @ np.diag(np.linspace(0.1, 1.0, d)) @ q.T)


def _run(name, sde_name, dist, z, rng=jax.random.PRNGKey(1), **options):
    sde = make_sde(sde_name)
    return fast_sampling.fast_sampler_fn(name)(rng, dist.score_fn(sde), sde, z, eps=EPS[sde_name], **options)


# --------------------------------------------------------------------------- noise schedule


@pytest.mark.parametrize("sde_name", SDE_NAMES)
def test_noise_schedule_matches_the_sde(sde_name):
    """α, σ are marginal_prob's; t(λ) inverts λ(t); g² = dσ²/dt - 2 (dlogα/dt) σ² (the semi-linear ODE)."""
    sde = make_sde(sde_name)
    ns = fast_sampling.NoiseSchedule(sde)
    t = jnp.array([EPS[sde_name], 0.01, 0.3, 0.7, 1.0])
    mean, std = sde.marginal_prob(jnp.ones((5, 1)), t)
    np.testing.assert_allclose(ns.alpha(t), mean[:, 0], rtol=1e-5)
    np.testing.assert_allclose(ns.sigma(t), std, rtol=3e-4)  # marginal_prob's 1 - exp(·) loses digits at t = eps
    # VE's λ = -log σ(t) cancels to a few float32 digits of t near t = 0: absolute tolerance
    np.testing.assert_allclose(ns.t_of_lam(ns.lam(t)), t, rtol=1e-4, atol=1e-6)
    dt = 1e-3
    ts = jnp.array([0.2, 0.5, 0.9])
    dvar = (ns.sigma(ts + dt) ** 2 - ns.sigma(ts - dt) ** 2) / (2 * dt)
    dlog_alpha = (ns.log_alpha(ts + dt) - ns.log_alpha(ts - dt)) / (2 * dt)
    g2 = sde.sde(jnp.zeros((3, 1)), ts)[1] ** 2
    np.testing.assert_allclose(dvar - 2 * dlog_alpha * ns.sigma(ts) ** 2, g2, rtol=1e-3)


@pytest.mark.parametrize("schedule", fast_sampling.TIME_SCHEDULES)
def test_time_schedules_run_from_T_to_eps_monotonically(schedule):
    sde = make_sde("vpsde")
    ns = fast_sampling.NoiseSchedule(sde)
    ts = fast_sampling.time_at(schedule, ns, 1.0, 1e-3, jnp.linspace(0, 1, 11))
    assert float(ts[0]) == 1.0 and float(ts[-1]) == pytest.approx(1e-3, rel=1e-7)
    assert np.all(np.diff(np.asarray(ts)) < 0)


# --------------------------------------------------------------------------- ODE samplers: order


# (sampler, options, theoretical order, step counts in the asymptotic range and above the float32 floor of ~5e-6;
# DPM-Solver++ needs more steps: its first, first-order step dominates at few steps)
ODE_CASES = [
    ("ddim", {}, 1, (16, 32, 64)),
    ("dpm_solver", {"order": 1}, 1, (16, 32, 64)),
    ("heun", {}, 2, (16, 32, 64)),
    ("dpm_solver", {"order": 2}, 2, (16, 32, 64)),
    ("dpm_solver_pp", {"lower_order_final": False}, 2, (24, 48, 96)),
    ("dpm_solver_pp", {"lower_order_final": False, "time_schedule": "time_uniform"}, 2, (24, 48, 96)),
    ("dpm_solver", {"order": 3}, 3, (8, 12, 16)),
]


@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("name,options,order,steps_list", ODE_CASES,
                         ids=[f"{c[0]}{c[1].get('order', '')}-{c[1].get('time_schedule', '')}" for c in ODE_CASES])
def test_ode_sampler_converges_to_the_exact_flow_map_at_its_order(sde_name, name, options, order, steps_list):
    """RMS endpoint error against toy.Gaussian.flow_map(T -> eps) falls like steps^-order.

    The slope of log error vs log steps must lie in (order - 0.3, order + 0.6): the error approaches its
    asymptote from above (order 3 measures 3.2-3.5 before float32 rounding takes over), and a lost order
    drops the slope by about 1.
    """
    sde = make_sde(sde_name)
    dist = _gaussian(3)
    z = sde.prior_sampling(jax.random.PRNGKey(0), (32, 3))
    exact = dist.flow_map(sde, z, jnp.full((32,), sde.T), jnp.full((32,), EPS[sde_name]))
    # steps traced: one compilation for every step count
    run = jax.jit(lambda steps: _run(name, sde_name, dist, z, steps=steps, **options)[0])
    errors = [float(jnp.sqrt(jnp.mean((run(s) - exact) ** 2))) for s in steps_list]
    slope = -np.polyfit(np.log(steps_list), np.log(errors), 1)[0]
    assert order - 0.3 < slope < order + 0.6, f"errors {errors} at steps {steps_list}: slope {slope:.2f}, expected {order}"


@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("schedule", ["time_uniform", "logsnr"])
def test_ddim_eta0_equals_first_order_dpm_solver(sde_name, schedule):
    """DDIM (η = 0) and DPM-Solver-1 are the same update (Lu et al. 2022, Sec. 4.1), to float32 precision."""
    sde = make_sde(sde_name)
    dist = _gaussian(3)
    z = sde.prior_sampling(jax.random.PRNGKey(0), (32, 3))
    x_ddim, _ = _run("ddim", sde_name, dist, z, steps=7, eta=0.0, time_schedule=schedule)
    x_dpm, _ = _run("dpm_solver", sde_name, dist, z, steps=7, order=1, time_schedule=schedule)
    assert_close_scaled(x_ddim, x_dpm, rtol=1e-5)


# --------------------------------------------------------------------------- stochastic samplers: moments


STOCHASTIC_CASES = [
    ("ddim", {"eta": 1.0, "steps": 200}),
    ("ddim", {"eta": 0.5, "steps": 200}),
    ("heun", {"churn": 10.0, "steps": 50}),
    ("adaptive_sde", {}),
]


@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("name,options", STOCHASTIC_CASES, ids=[f"{c[0]}-{c[1]}" for c in STOCHASTIC_CASES])
def test_stochastic_sampler_matches_the_mean_and_covariance(sde_name, name, options):
    """Whitened by the exact p_eps, every mean entry and covariance entry is within 5 standard errors.

    For n samples the whitened mean has standard error 1/sqrt(n) per entry and the whitened
    covariance sqrt(2/n) on the diagonal, 1/sqrt(n) off it; 5 s.e. over 64 + 2080 entries is exceeded by
    chance with probability < 1e-3. 64-D data: the adaptive solver's noise-dependent error norm needs
    many components (see its docstring). The step counts make DDIM's and Heun's discretisation bias
    (O(1/steps) for ancestral sampling) smaller than the Monte-Carlo error.
    """
    d, n = 64, 4000
    sde = make_sde(sde_name)
    dist = _gaussian(d, seed=1)
    z = sde.prior_sampling(jax.random.PRNGKey(2), (n, d))
    x, _ = jax.jit(lambda z: _run(name, sde_name, dist, z, rng=jax.random.PRNGKey(3), **options))(z)
    x = np.asarray(x, np.float64)
    assert np.all(np.isfinite(x))
    eps = EPS[sde_name]
    chol = np.linalg.cholesky(np.asarray(dist.covariance_at(sde, eps), np.float64))
    w = np.linalg.solve(chol, (x - np.asarray(dist.mean_at(sde, eps))).T).T
    mean_z = np.abs(w.mean(0)) * np.sqrt(n)
    se = np.where(np.eye(d) > 0, np.sqrt(2.0 / n), np.sqrt(1.0 / n))
    cov_z = np.abs(np.cov(w.T) - np.eye(d)) / se
    assert mean_z.max() < 5, f"mean off by {mean_z.max():.1f} s.e."
    assert cov_z.max() < 5, f"covariance off by {cov_z.max():.1f} s.e."


# --------------------------------------------------------------------------- NFE


NFE_CASES = [
    ("ddim", {"steps": 4, "eta": 1.0}, 4),
    ("heun", {"steps": 4, "churn": 1.0}, 8),
    ("dpm_solver", {"steps": 4, "order": 1}, 4),
    ("dpm_solver", {"steps": 4, "order": 2}, 8),
    ("dpm_solver", {"steps": 4, "order": 3}, 12),
    ("dpm_solver_pp", {"steps": 4}, 4),
    ("adaptive_sde", {}, None),  # data dependent: counted
]


@pytest.mark.parametrize("denoise", [False, True])
@pytest.mark.parametrize("name,options,documented", NFE_CASES, ids=[f"{c[0]}{c[1].get('order', '')}" for c in NFE_CASES])
def test_nfe_is_the_number_of_score_evaluations_made(name, options, documented, denoise):
    """A host callback in the score counts the batched evaluations the compiled loop really runs."""
    calls = []
    dist = _gaussian(2)
    sde = make_sde("vpsde")

    def counting_score(x, t):
        jax.debug.callback(lambda: calls.append(1), ordered=True)
        return dist.score(sde, x, t)

    z = sde.prior_sampling(jax.random.PRNGKey(0), (8, 2))
    fn = fast_sampling.fast_sampler_fn(name)
    x, nfe = jax.jit(lambda z: fn(jax.random.PRNGKey(1), counting_score, sde, z, eps=1e-3,
                                  denoise_to_zero=denoise, **options))(z)
    jax.effects_barrier()
    assert int(nfe) == len(calls)
    if documented is not None:
        assert int(nfe) == documented + int(denoise)
    assert np.all(np.isfinite(np.asarray(x)))


# --------------------------------------------------------------------------- config and model level


def _config(**sampling):
    config = ml_collections.ConfigDict()
    config.training = ml_collections.ConfigDict({"continuous": True})
    config.sampling = ml_collections.ConfigDict({"method": "pc", "noise_removal": True, "snr": 0.16})
    config.sampling.update(sampling)
    return config


def test_options_default_when_the_config_lacks_the_new_fields():
    assert fast_sampling.sampler_options("dpm_solver", _config().sampling) == {
        "steps": 10, "order": 3, "time_schedule": "logsnr", "rho": 7.0, "denoise_to_zero": False}
    assert fast_sampling.sampler_options("ddim", _config(steps=7, eta=0.3, order=2).sampling)["eta"] == 0.3


@pytest.mark.parametrize("field,value", [("steps", 0), ("steps", 2.5), ("order", 4), ("eta", -1.0),
                                         ("time_schedule", "cosine"), ("method", "plms")])
def test_bad_options_fail_with_the_config_field_named(field, value):
    config = _config(**{"method": "ddim" if field == "eta" else "dpm_solver", field: value})
    with pytest.raises(ValueError, match=f"config.sampling.{field}"):
        fast_sampling.get_fast_sampler(config, make_sde("vpsde"), None, (2, 2, 2, 1), lambda x: x, 1e-3)


class _ExactGaussianModel(nn.Module):
    """Parameter-free 'network' whose continuous score (through get_score_fn) is the exact Gaussian score."""

    sde_name: str

    @nn.compact
    def __call__(self, x, labels, train=False):
        sde = make_sde(self.sde_name)
        if self.sde_name == "vesde":  # label = σ(t), output = score
            t = jnp.log(labels / sde.sigma_min) / np.log(sde.sigma_max / sde.sigma_min)
            return _GAUSS.score(sde, x, t)
        t = labels / 999.0
        return -sde_lib.batch_mul(sde.marginal_prob(x, t)[1], _GAUSS.score(sde, x, t))


_GAUSS = toy.Gaussian(np.arange(4) * 0.1, np.diag([0.2, 0.4, 0.6, 0.8]), event_shape=(2, 2, 1))


@pytest.mark.parametrize("sde_name", ["vpsde", "vesde"])
def test_model_level_sampler_equals_the_score_level_one(sde_name):
    """get_fast_sampler (pmapped, replicated State, config) draws what the score-level sampler draws."""
    sde = make_sde(sde_name)
    config = _config(method="ddim", steps=5, eta=1.0)
    shape = (3, 2, 2, 1)
    model = _ExactGaussianModel(sde_name)
    state = mutils.State(step=0, params={}, opt_state={}, lr=0.0, model_state={}, ema_rate=0.999, params_ema={},
                         rng=jax.random.PRNGKey(0))
    sampler = fast_sampling.get_fast_sampler(config, sde, model, shape, lambda x: x * 2.0, EPS[sde_name])
    n_dev = parallel.local_device_count()
    keys = jax.random.split(jax.random.PRNGKey(5), n_dev)
    x, nfe = sampler(keys, parallel.replicate(state))
    want, want_nfe = fast_sampling.get_score_fast_sampler("ddim", sde, _GAUSS.score_fn(sde), shape,
                                                          lambda x: x * 2.0, EPS[sde_name], steps=5, eta=1.0)(keys[0])
    assert x.shape == (n_dev,) + shape and nfe == want_nfe == 5
    assert_close_scaled(x[0], want, rtol=1e-5)


def test_score_level_factory_rejects_options_the_sampler_does_not_take():
    sde = make_sde("vpsde")
    with pytest.raises(ValueError, match="no options \\['order'\\]"):
        fast_sampling.get_score_fast_sampler("ddim", sde, _GAUSS.score_fn(sde), (2, 2, 2, 1), order=2)


def test_get_sampling_fn_dispatches_the_fast_samplers_by_config_sampling_method():
    """``config.sampling.method='dpm_solver_pp'`` through sampling.get_sampling_fn draws what get_fast_sampler draws."""
    sde = make_sde("vpsde")
    config = _config(method="DPM_Solver_PP", steps=4)
    shape = (2, 2, 2, 1)
    model = _ExactGaussianModel("vpsde")
    state = mutils.State(step=0, params={}, opt_state={}, lr=0.0, model_state={}, ema_rate=0.999, params_ema={},
                         rng=jax.random.PRNGKey(0))
    keys = jax.random.split(jax.random.PRNGKey(3), parallel.local_device_count())
    x, nfe = sampling.get_sampling_fn(config, sde, model, shape, lambda x: x, EPS["vpsde"])(
        keys, parallel.replicate(state))
    want, want_nfe = fast_sampling.get_score_fast_sampler("dpm_solver_pp", sde, _GAUSS.score_fn(sde), shape,
                                                          lambda x: x, EPS["vpsde"], steps=4)(keys[0])
    assert nfe == want_nfe == 4
    assert_close_scaled(x[0], want, rtol=1e-5)  # float32: the pmapped program fuses differently
    with pytest.raises(ValueError, match="pc, ode, .*dpm_solver_pp"):
        sampling.get_sampling_fn(_config(method="ddpm_magic"), sde, model, shape, lambda x: x, EPS["vpsde"])


# --------------------------------------------------------------------------- recording the path

# Sampler, options, frames with Recording(frames=3): N steps are recorded every k = max(N // 3, 1) steps,
# ceil(N / k) states, then the samples; the adaptive solver at 3 times, then the samples.
RECORD_CASES = [("ddim", {"steps": 7}, 5), ("ddim", {"steps": 5, "eta": 1.0, "time_schedule": "logsnr"}, 6),
                ("heun", {"steps": 5, "churn": 1.0}, 6), ("dpm_solver", {"steps": 4, "order": 3}, 5),
                ("dpm_solver_pp", {"steps": 9}, 4), ("adaptive_sde", {"adaptive_rtol": 0.05, "adaptive_atol": 0.05}, 4)]


@pytest.mark.parametrize("name,options,frames", RECORD_CASES, ids=[f"{c[0]}-{len(c[1])}" for c in RECORD_CASES])
def test_recording_the_path_leaves_the_samples_bit_for_bit(name, options, frames):
    """With ``record`` a sampler returns the same samples and NFE bit for bit, and a path from the latent to them.

    The toy 2-D mixture's exact score (sub-VP). Frames: the first 5 examples; the first frame is the
    latent, the last the samples, and consecutive frames differ.
    """
    sde = make_sde("subvpsde")
    mixture = toy.GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.5]], [0.3, 0.2])
    z = jax.random.normal(jax.random.PRNGKey(0), (16, 2))
    fn = functools.partial(fast_sampling.fast_sampler_fn(name), score_fn=mixture.score_fn(sde), sde=sde,
                           **options)
    plain, plain_nfe = jax.jit(lambda rng, z: fn(rng, x=z))(jax.random.PRNGKey(1), z)
    record = fast_sampling.Recording(frames=3, first=5)
    x, nfe, path = jax.jit(lambda rng, z: fn(rng, x=z, record=record))(jax.random.PRNGKey(1), z)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(plain))
    assert int(nfe) == int(plain_nfe)
    assert path.shape == (frames, 5, 2)
    np.testing.assert_array_equal(path[0], z[:5])
    np.testing.assert_array_equal(path[-1], x[:5])
    assert all(not np.array_equal(a, b) for a, b in zip(path, path[1:]))


def test_recorded_frames_are_the_states_after_every_k_steps():
    """DDIM (η = 0, 6 steps, frames=3: every 2 steps): frame j is the state after 2j steps, recomputed step by step."""
    sde = make_sde("vpsde")
    dist = _gaussian(3)
    z = sde.prior_sampling(jax.random.PRNGKey(0), (8, 3))
    _, _, path = fast_sampling.ddim(None, dist.score_fn(sde), sde, z, eps=EPS["vpsde"], steps=6,
                                    record=fast_sampling.Recording(frames=3))
    ns = fast_sampling.NoiseSchedule(sde)
    x, states = z, [z]
    for i in range(6):
        s, t = (jnp.float32(sde.T + k / 6 * (EPS["vpsde"] - sde.T)) for k in (i, i + 1))
        e = -ns.sigma(s) * dist.score_fn(sde)(x, jnp.full((8,), s))
        x = ns.alpha(t) * (x - ns.sigma(s) * e) / ns.alpha(s) + ns.sigma(t) * e
        states.append(x)
    assert path.shape == (4, 8, 3)
    for j, k in enumerate((0, 2, 4, 6)):
        assert_close_scaled(path[j], states[k], rtol=1e-5)


def test_pc_sampler_records_its_path_without_changing_the_samples():
    """sampling.pc_sample (reverse diffusion + Langevin) with ``record``: the same samples, bit for bit."""
    sde = make_sde("vpsde", 24)  # the reverse-diffusion and Langevin steps of a VP SDE need N > beta_max = 20
    score = _gaussian(2).score_fn(sde)
    args = (score, sde, (6, 2), sampling.get_predictor("reverse_diffusion"), sampling.get_corrector("langevin"), 0.16)
    plain = jax.jit(lambda rng: sampling.pc_sample(rng, *args))(jax.random.PRNGKey(2))
    x, path = jax.jit(lambda rng: sampling.pc_sample(rng, *args, record=fast_sampling.Recording(frames=4)))(
        jax.random.PRNGKey(2))
    np.testing.assert_array_equal(np.asarray(x), np.asarray(plain))
    assert path.shape == (5, 6, 2)  # after 0, 6, 12, 18 of the 24 steps, then the denoised samples
    np.testing.assert_array_equal(path[-1], x)
