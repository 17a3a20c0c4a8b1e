"""likelihood: the original's bits/dim (golden), the exact flow's value (closed form), divergence estimators."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import likelihood
import sde_lib
from models import utils as mutils
from score_sde import parallel, toy
from tests.helpers import SDE_NAMES, make_sde
GOLDEN_DATA = toy.IsotropicGaussian(0.3, 0.5, (4, 4, 1))
EPS = 1e-5


@pytest.fixture(scope="module")
def golden(golden_dir):
    npz = np.load(golden_dir / "sde_sampling_likelihood.npz")
    meta = json.loads((golden_dir / "sde_sampling_likelihood.json").read_text())
    return npz, meta


def exact_ode_bpd(dist, sde, x, eps=EPS, offset=8.0):
    """What an exact solve returns for Gaussian data: log p_eps(x) - log p_T(z) + log prior(z), in bits/dim."""
    batch = x.shape[0]
    t_eps, t_end = jnp.full((batch,), eps), jnp.full((batch,), sde.T)
    z = dist.flow_map(sde, x, t_eps, t_end)
    logp = dist.log_prob(sde, x, t_eps) - dist.log_prob(sde, z, t_end) + sde.prior_logp(z)
    return np.asarray(-logp / (dist.dim * np.log(2)) + offset, np.float64), z


# ----------------------------------------------------------------------------- golden: the original's numbers


@pytest.mark.parametrize("name", SDE_NAMES)
@pytest.mark.parametrize("hutchinson_type", ["Rademacher", "Gaussian"])
def test_scipy_path_reproduces_original(golden, name, hutchinson_type):
    npz, meta = golden
    sde = make_sde(name)
    lf = likelihood.get_likelihood_fn_from_score(sde, GOLDEN_DATA.score_fn(sde), hutchinson_type=hutchinson_type,
                                                 solver="scipy")
    bpd, z, nfe = lf(jax.random.PRNGKey(6), jnp.asarray(npz[f"{name}/bpd_data"]))
    # The golden README's 1e-5 for SDE math, and the very same steps (measured: <= 3.8e-6, equal NFE).
    np.testing.assert_allclose(np.asarray(bpd), npz[f"{name}/bpd_{hutchinson_type}"], rtol=0, atol=1e-5)
    assert z.shape == (4, 4, 4, 1)
    assert nfe == meta["bpd_nfe"][f"{name}/{hutchinson_type}"]


MODEL_CALLS = []  # one entry per evaluation of GaussianScoreNet at run time


class GaussianScoreNet(nn.Module):
    """A stand-in score "network" whose only parameter is the data mean: with the right mean, and
    read through ``get_score_fn`` (VP: output · (-1/std), label 999 t; VE: label sigma(t)), it is the
    exact score of N(mean, std0²) data."""

    std0: float
    ve: bool

    @nn.compact
    def __call__(self, x, labels, train=False):
        jax.debug.callback(lambda: MODEL_CALLS.append(1))
        mean = self.param("mean", nn.initializers.zeros, ())
        if self.ve:
            sigma = labels
            var = self.std0 ** 2 + sigma ** 2 - 0.01 ** 2
            return -sde_lib.batch_mul(1.0 / var, x - mean)
        sde = sde_lib.VPSDE(0.1, 20, 1000)
        t = labels / 999.0
        a = jnp.exp(sde.log_mean_coeff(t))
        var = a ** 2 * self.std0 ** 2 + 1 - a ** 2
        std = jnp.sqrt(1 - a ** 2)
        return sde_lib.batch_mul(std / var, x - sde_lib.batch_mul(a, jnp.ones_like(x)) * mean)


class AnisotropicScoreNet(nn.Module):
    """A parameter-free "network" whose score through ``get_score_fn`` (VP, continuous) is the exact score of
    ``_anisotropic()`` data: output = -std(t) · score, label 999 t."""

    @nn.compact
    def __call__(self, x, labels, train=False):
        sde = make_sde("vpsde")
        t = labels / 999.0
        std = sde.marginal_prob(x, t)[1]
        return -sde_lib.batch_mul(std, _anisotropic().score_fn(sde)(x, t))


def _pstate(good_mean: float, bad_mean: float):
    state = mutils.State(step=0, params={"mean": jnp.asarray(bad_mean)}, opt_state={}, lr=0.0, model_state={},
                         ema_rate=0.999, params_ema={"mean": jnp.asarray(good_mean)}, rng=jax.random.PRNGKey(0))
    return parallel.replicate(state)


@pytest.mark.parametrize("name", ["vpsde", "vesde"])
def test_model_level_api_uses_params_ema_and_matches_golden(golden, name):
    npz, meta = golden
    sde = make_sde(name)
    model = GaussianScoreNet(std0=0.5, ve=name == "vesde")
    pstate = _pstate(0.3, -1.0)  # only params_ema holds the data mean
    data = jnp.asarray(npz[f"{name}/bpd_data"])[None]
    prng = jnp.asarray([jax.random.PRNGKey(6)])
    MODEL_CALLS.clear()
    bpd, z, nfe = likelihood.get_likelihood_fn(sde, model, lambda v: v, solver="scipy")(prng, pstate, data)
    jax.effects_barrier()
    assert nfe == len(MODEL_CALLS)
    assert bpd.shape == (1, 4) and z.shape == data.shape and isinstance(nfe, int)
    np.testing.assert_allclose(np.asarray(bpd[0]), npz[f"{name}/bpd_Rademacher"], rtol=0, atol=1e-5)
    # Within one RK45 step (6 evaluations): the stand-in network's score rounds differently in float32 from the
    # golden's formula, and an error norm near 1 may accept or reject one step (the score-level test is exact).
    assert abs(nfe - meta["bpd_nfe"][f"{name}/Rademacher"]) <= 6
    # The JAX solver runs the whole solve inside the pmapped function: the same solve as the score-level one.
    MODEL_CALLS.clear()
    bpd_j, z_j, nfe_j = likelihood.get_likelihood_fn(sde, model, lambda v: v, solver="jax")(prng, pstate, data)
    jax.effects_barrier()
    assert isinstance(nfe_j, int) and nfe_j == len(MODEL_CALLS)
    np.testing.assert_allclose(np.asarray(bpd_j[0]), npz[f"{name}/bpd_exact_ode"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(z_j[0]), npz[f"{name}/ode_exact_z"], rtol=1e-3, atol=1e-3)
    # The dequantisation offset follows the inverse scaler: centred data ([-1, 1]) gets 7 instead of 8.
    bpd_c, _, _ = likelihood.get_likelihood_fn(sde, model, lambda v: (v + 1.0) / 2.0, solver="jax")(
        prng, pstate, data)
    np.testing.assert_allclose(np.asarray(bpd_c), np.asarray(bpd_j) - 1.0, atol=1e-5)


@pytest.mark.parametrize("solver", ["scipy", "jax"])
def test_model_level_exact_divergence_matches_closed_form(solver):
    """get_likelihood_fn(hutchinson_type='exact') through a model: the closed-form bits/dim of the exact flow."""
    sde = make_sde("vpsde")
    dist = _anisotropic()  # a Jacobian far from isotropic: single Hutchinson probes miss by > 1e-3 here
    data = dist.sample(jax.random.PRNGKey(8), 3)
    expected, z_exact = exact_ode_bpd(dist, sde, data)
    lf = likelihood.get_likelihood_fn(sde, AnisotropicScoreNet(), lambda v: v, hutchinson_type="exact", solver=solver)
    bpd, z, _ = lf(jnp.asarray([jax.random.PRNGKey(6)]), _pstate(0.3, -1.0), data[None])
    np.testing.assert_allclose(np.asarray(bpd[0]), expected, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(z[0]), np.asarray(z_exact), rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- exact math


@pytest.mark.parametrize("name", SDE_NAMES)
def test_both_solvers_reach_the_exact_flow(golden, name):
    """|bpd - bpd_exact_ode| <= 2e-5 at rtol = atol = 1e-5 (the original's RK45 gets 3.8e-5 on VE)."""
    npz, _ = golden
    sde = make_sde(name)
    data = jnp.asarray(npz[f"{name}/bpd_data"])
    expected = npz[f"{name}/bpd_exact_ode"]
    ours, _ = exact_ode_bpd(GOLDEN_DATA, sde, data)
    np.testing.assert_allclose(ours, expected, atol=2e-6)  # the closed form used below agrees with the golden
    calls = {"scipy": [], "jax": []}
    score_fn = lambda solver: _counting(GOLDEN_DATA.score_fn(sde), calls[solver])  # noqa: E731
    bpd_s, _, nfe_s = likelihood.get_likelihood_fn_from_score(sde, score_fn("scipy"), solver="scipy",
                                                              method="DOP853")(jax.random.PRNGKey(6), data)
    bpd_j, _, nfe_j = jax.jit(likelihood.get_likelihood_fn_from_score(sde, score_fn("jax"), solver="jax"))(
        jax.random.PRNGKey(6), data)
    jax.block_until_ready(bpd_j)
    jax.effects_barrier()
    np.testing.assert_allclose(np.asarray(bpd_s), expected, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(bpd_j), expected, rtol=0, atol=2e-5)
    # The method's error (prior instead of p_T) separates it from the true likelihood at eps, well above 2e-5.
    gap = npz[f"{name}/bpd_exact_ode"] - npz[f"{name}/bpd_exact_at_eps"]
    assert np.all(np.abs(gap) > 5e-4)
    # NFE is what was evaluated: one score evaluation per evaluation of drift + divergence.
    assert nfe_s == len(calls["scipy"]) and int(nfe_j) == len(calls["jax"])


def _counting(score_fn, calls: list):
    """``score_fn`` that appends to ``calls`` whenever it is evaluated (at run time, inside jit and loops)."""

    def counted(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return score_fn(x, t)

    return counted


@pytest.mark.parametrize("mean,std,shape,batch,name", [
    (0.0, 1.0, (4, 4, 1), 3, "vesde"),
    (-0.5, 0.1, (8, 8, 1), 2, "subvpsde"),
    (-0.5, 0.1, (8, 8, 1), 2, "vesde"),
    (0.3, 0.5, (4, 4, 3), 2, "vpsde"),
])
def test_other_gaussians_against_closed_form(mean, std, shape, batch, name):
    sde = make_sde(name)
    dist = toy.IsotropicGaussian(mean, std, shape)
    x = dist.sample(jax.random.PRNGKey(1), batch)
    expected, z_exact = exact_ode_bpd(dist, sde, x)
    lf = jax.jit(likelihood.get_likelihood_fn_from_score(sde, dist.score_fn(sde), solver="jax"))
    bpd, z, _ = lf(jax.random.PRNGKey(2), x)
    np.testing.assert_allclose(np.asarray(bpd), expected, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(z), np.asarray(z_exact), rtol=1e-3, atol=1e-3)


def test_tighter_tolerance_converges_on_hard_data():
    """Two dimensions, spread small against the mean: 1e-5 is not enough, 1e-7 is (no bias left)."""
    sde = make_sde("vesde")
    dist = toy.IsotropicGaussian(0.8, 0.3, (2,))
    x = dist.sample(jax.random.PRNGKey(5), 8)
    expected, _ = exact_ode_bpd(dist, sde, x)
    errors = []
    for tol in (1e-4, 1e-7):
        lf = jax.jit(likelihood.get_likelihood_fn_from_score(sde, dist.score_fn(sde), solver="jax", rtol=tol,
                                                             atol=tol))
        errors.append(np.abs(np.asarray(lf(jax.random.PRNGKey(2), x)[0]) - expected).max())
    assert errors[1] < 2e-5 and errors[1] < errors[0]


# ----------------------------------------------------------------------------- divergence estimators


def _anisotropic():
    cov = np.array([[1.0, 0.6, 0.0, 0.2], [0.6, 0.8, 0.1, 0.0], [0.0, 0.1, 0.3, 0.05], [0.2, 0.0, 0.05, 0.5]])
    return toy.Gaussian(np.array([0.2, -0.4, 0.0, 0.5]), cov, event_shape=(2, 2, 1))


def test_exact_trace_matches_closed_form_and_hutchinson_mean():
    sde = make_sde("vpsde")
    dist = _anisotropic()
    drift = likelihood._probability_flow_drift(sde, dist.score_fn(sde))
    x = dist.sample(jax.random.PRNGKey(0), 3)
    t = jnp.full((3,), 0.3)
    drift_e, div_e = likelihood.get_drift_div_fn(drift, "exact")(x, t, None)
    # Closed form: J = f(t) I + ½ g² cov_t⁻¹, so tr J = D f(t) + ½ g² tr(cov_t⁻¹).
    beta = sde.beta_0 + 0.3 * (sde.beta_1 - sde.beta_0)
    cov_t = np.asarray(dist.covariance_at(sde, 0.3), np.float64)
    expected = -0.5 * beta * 4 + 0.5 * beta * np.trace(np.linalg.inv(cov_t))
    np.testing.assert_allclose(np.asarray(div_e), expected, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(drift_e), np.asarray(drift(x, t)), rtol=1e-6, atol=1e-6)
    # Hutchinson: single probes differ from the trace (non-isotropic Jacobian) but average to it.
    estimator = jax.jit(jax.vmap(likelihood.get_drift_div_fn(drift, "Rademacher"), in_axes=(None, None, 0)))
    probes = likelihood.sample_probe(jax.random.PRNGKey(1), (4000,) + x.shape, "Rademacher")
    drifts, divs = estimator(x, t, probes)
    np.testing.assert_allclose(np.asarray(drifts[0]), np.asarray(drift_e), rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(np.asarray(divs) - np.asarray(div_e))) > 0.1
    stderr = np.std(np.asarray(divs), axis=0) / np.sqrt(len(probes))
    np.testing.assert_array_less(np.abs(np.mean(np.asarray(divs), axis=0) - np.asarray(div_e)), 5 * stderr + 1e-6)


def test_exact_likelihood_non_isotropic_and_hutchinson_expectation():
    """bpd with the exact trace equals the closed form; Rademacher bpd average over probes equals it."""
    sde = make_sde("subvpsde")
    dist = _anisotropic()
    x = dist.sample(jax.random.PRNGKey(3), 2)
    expected, _ = exact_ode_bpd(dist, sde, x)
    exact_fn = jax.jit(likelihood.get_likelihood_fn_from_score(sde, dist.score_fn(sde), hutchinson_type="exact"))
    bpd_exact, _, _ = exact_fn(jax.random.PRNGKey(0), x)
    np.testing.assert_allclose(np.asarray(bpd_exact), expected, rtol=0, atol=2e-5)
    hutch_fn = likelihood.get_likelihood_fn_from_score(sde, dist.score_fn(sde), hutchinson_type="Rademacher",
                                                       rtol=1e-4, atol=1e-4)
    bpds = np.asarray(jax.jit(jax.vmap(lambda k: hutch_fn(k, x)[0]))(jax.random.split(jax.random.PRNGKey(9), 256)))
    assert np.max(np.abs(bpds - expected)) > 1e-3  # single probes are noisy here
    stderr = bpds.std(axis=0) / np.sqrt(len(bpds))
    np.testing.assert_array_less(np.abs(bpds.mean(axis=0) - expected), 5 * stderr + 1e-4)


def test_exact_equals_rademacher_when_jacobian_is_isotropic(golden):
    npz, _ = golden
    sde = make_sde("vpsde")
    data = jnp.asarray(npz["vpsde/bpd_data"])
    results = [jax.jit(likelihood.get_likelihood_fn_from_score(sde, GOLDEN_DATA.score_fn(sde), hutchinson_type=h))(
        jax.random.PRNGKey(6), data)[0] for h in ("exact", "Rademacher")]
    np.testing.assert_allclose(np.asarray(results[0]), np.asarray(results[1]), atol=2e-6)


def test_get_div_fn_is_hutchinson_on_a_linear_map():
    a = jnp.asarray(np.random.default_rng(0).normal(size=(6, 6)), jnp.float32)
    fn = lambda x, t: x @ a.T
    x = jnp.ones((2, 6))
    v = likelihood.sample_probe(jax.random.PRNGKey(0), x.shape, "Gaussian")
    div = likelihood.get_div_fn(fn)(x, jnp.zeros((2,)), v)
    np.testing.assert_allclose(np.asarray(div), np.einsum("bi,ij,bj->b", v, a, v), rtol=1e-5)


def test_one_forward_pass_per_evaluation():
    """Drift and divergence come from one jvp: the forward computation appears once in the program."""
    fn = lambda x, t: jnp.sin(x) * t[:, None]
    jaxpr = jax.make_jaxpr(likelihood.get_drift_div_fn(fn))(jnp.ones((2, 3)), jnp.ones((2,)), jnp.ones((2, 3)))
    assert str(jaxpr).count(" sin ") == 1


def test_errors_name_the_choices():
    sde = make_sde("vpsde")
    score_fn = GOLDEN_DATA.score_fn(sde)
    with pytest.raises(NotImplementedError, match="Rademacher"):
        likelihood.get_likelihood_fn_from_score(sde, score_fn, hutchinson_type="Bernoulli")
    with pytest.raises(ValueError, match="'jax', 'scipy'"):
        likelihood.get_likelihood_fn_from_score(sde, score_fn, solver="diffrax")
    big = likelihood.get_drift_div_fn(lambda x, t: x, "exact")
    with pytest.raises(ValueError, match="EXACT_TRACE_MAX_DIM"):
        big(jnp.ones((1, 64, 64, 3)), jnp.ones((1,)), None)


def test_prior_mismatch_explains_the_bias(golden):
    """prior_mismatch_bpd recovers bpd_exact_ode - bpd_exact_at_eps (the method's error) from data samples."""
    npz, _ = golden
    for name in ("vpsde", "vesde"):
        sde = make_sde(name)
        data = jnp.asarray(npz[f"{name}/bpd_data"])
        z = jnp.asarray(npz[f"{name}/ode_exact_z"])
        reference = GOLDEN_DATA.sample(jax.random.PRNGKey(11), 20000)
        bias = np.asarray(likelihood.prior_mismatch_bpd(sde, z, reference))
        expected = npz[f"{name}/bpd_exact_ode"] - npz[f"{name}/bpd_exact_at_eps"]
        np.testing.assert_allclose(bias, expected, rtol=0.05, atol=5e-5)
        assert data.shape == z.shape
