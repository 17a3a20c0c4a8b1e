"""sde_lib: golden numbers of the original code and closed-form checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sde_lib
from tests.helpers import SDE_NAMES, make_sde

MU, S0 = 0.3, 0.5  # the golden data distribution: iid N(0.3, 0.5²) per dimension


def exact_gaussian_score(name, sde):
    """Score of N(MU, S0²) data diffused by ``sde`` (the golden README's formula)."""

    def score(x, t):
        if name == "vesde":
            m = MU * jnp.ones_like(t)
            v = S0 ** 2 + sde.sigma(t) ** 2 - sde.sigma_min ** 2
        else:
            a = jnp.exp(sde.log_mean_coeff(t))
            m = a * MU
            v = a ** 2 * S0 ** 2 + ((1 - a ** 2) if name == "vpsde" else (1 - a ** 2) ** 2)
        return -sde_lib.batch_mul(1.0 / v, x - m[:, None, None, None])

    return score


@pytest.fixture(scope="module")
def golden(golden_dir):
    return np.load(golden_dir / "sde_sampling_likelihood.npz")


@pytest.mark.parametrize("name", SDE_NAMES)
def test_sde_quantities_match_golden(name, golden):
    sde = make_sde(name)
    x, t = jnp.asarray(golden["sde_x"]), jnp.asarray(golden["sde_t"])
    drift, diffusion = sde.sde(x, t)
    mean, std = sde.marginal_prob(x, t)
    f, G = sde.discretize(x, t)
    got = {
        "sde_drift": drift, "sde_diffusion": diffusion, "marginal_mean": mean, "marginal_std": std,
        "prior_logp": sde.prior_logp(x), "discretize_f": f, "discretize_G": G,
    }
    score = exact_gaussian_score(name, sde)
    for pf in (0, 1):
        rsde = sde.reverse(score, probability_flow=bool(pf))
        got[f"reverse_pf{pf}_drift"], got[f"reverse_pf{pf}_diffusion"] = rsde.sde(x, t)
        got[f"rdiscretize_pf{pf}_f"], got[f"rdiscretize_pf{pf}_G"] = rsde.discretize(x, t)
    for key, value in got.items():
        want = golden[f"{name}/{key}"]
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(np.asarray(value), want, rtol=1e-5, atol=1e-5 * scale, err_msg=key)


@pytest.mark.parametrize("name", SDE_NAMES)
def test_euler_maruyama_forward_simulation_matches_marginal(name):
    """Simulate the forward SDE from N(MU, S0²) and compare moments with marginal_prob."""
    sde = make_sde(name)
    n_paths, n_steps = 20000, 1000
    t_end = 0.6
    dt = t_end / n_steps
    key = jax.random.PRNGKey(0)
    k0, key = jax.random.split(key)
    x0 = MU + S0 * jax.random.normal(k0, (n_paths, 1))

    def step(x, inputs):
        i, k = inputs
        t = jnp.full((n_paths,), i * dt)
        drift, diffusion = sde.sde(x, t)
        noise = jax.random.normal(k, x.shape)
        return x + drift * dt + diffusion[:, None] * jnp.sqrt(dt) * noise, None

    keys = jax.random.split(key, n_steps)
    x_end, _ = jax.lax.scan(step, x0, (jnp.arange(n_steps), keys))
    t = jnp.full((1,), t_end)
    mean_coeff, std = sde.marginal_prob(jnp.ones((1, 1)), t)
    mean_coeff, std = float(mean_coeff[0, 0]), float(std[0])
    # The marginal of N(MU, S0²) data: mean c·MU, variance c²S0² + std² (c = mean coefficient).
    want_mean = mean_coeff * MU
    want_var = mean_coeff ** 2 * S0 ** 2 + std ** 2
    got = np.asarray(x_end[:, 0], np.float64)
    mc_mean_err = 5 * np.sqrt(want_var / n_paths)
    mc_var_err = 5 * want_var * np.sqrt(2.0 / n_paths)
    # Euler–Maruyama adds O(dt) bias; with 1000 steps it is far below the MC error.
    assert abs(got.mean() - want_mean) < mc_mean_err
    assert abs(got.var() - want_var) < mc_var_err


@pytest.mark.parametrize("name", SDE_NAMES)
def test_prior_logp_is_closed_form_gaussian(name):
    sde = make_sde(name)
    z = jax.random.normal(jax.random.PRNGKey(3), (4, 3, 5, 2)) * 7.0
    sigma = sde.sigma_max if name == "vesde" else 1.0
    flat = np.asarray(z, np.float64).reshape(4, -1)
    want = (-0.5 * flat.shape[1] * np.log(2 * np.pi * sigma ** 2) - (flat ** 2).sum(1) / (2 * sigma ** 2))
    np.testing.assert_allclose(np.asarray(sde.prior_logp(z)), want, rtol=1e-5)
    samples = sde.prior_sampling(jax.random.PRNGKey(1), (20000, 2))
    assert abs(float(samples.std()) / sigma - 1) < 0.02


def test_vp_discretize_is_ddpm_update():
    """x_{i+1} = sqrt(1-β_i) x_i + sqrt(β_i) z, with β_i linear from β_min/N to β_max/N."""
    N = 1000
    sde = sde_lib.VPSDE(0.1, 20, N=N)
    betas = np.linspace(0.1 / N, 20 / N, N)
    x = jax.random.normal(jax.random.PRNGKey(2), (5, 4, 4, 3))
    idx = np.array([0, 10, 500, 998, 999])
    t = jnp.asarray(idx / (N - 1), jnp.float32)
    f, G = sde.discretize(x, t)
    got_idx = np.asarray((t * (N - 1)).astype(jnp.int32))
    want_f = (np.sqrt(1 - betas[got_idx]) - 1)[:, None, None, None] * np.asarray(x)
    np.testing.assert_allclose(np.asarray(f), want_f, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(G), np.sqrt(betas[got_idx]), rtol=1e-5)


def test_subvp_has_vp_discrete_schedule_and_validity_flag():
    vp, sub = sde_lib.VPSDE(0.1, 20, 1000), sde_lib.subVPSDE(0.1, 20, 1000)
    np.testing.assert_array_equal(np.asarray(vp.alphas), np.asarray(sub.alphas))
    assert vp.discrete_schedule_is_valid and sub.discrete_schedule_is_valid
    # β_max/N = 2 > 1: DDPM's sqrt(1 - β) is undefined; samplers must refuse it.
    assert not sde_lib.VPSDE(0.1, 20, N=10).discrete_schedule_is_valid


def test_reverse_probability_flow_drift_is_half_score_term():
    sde = sde_lib.VPSDE()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3))
    t = jnp.array([0.2, 0.7])
    score = lambda x, t: -x  # noqa: E731
    f, g = sde.sde(x, t)
    d_sde, g_sde = sde.reverse(score).sde(x, t)
    d_ode, g_ode = sde.reverse(score, probability_flow=True).sde(x, t)
    np.testing.assert_allclose(d_sde, f + g[:, None] ** 2 * x, rtol=1e-6)
    np.testing.assert_allclose(d_ode, f + 0.5 * g[:, None] ** 2 * x, rtol=1e-6)
    np.testing.assert_array_equal(g_ode, 0.0)
    np.testing.assert_allclose(g_sde, g)


def test_get_sde_rejects_unknown_name():
    import ml_collections

    config = ml_collections.ConfigDict({"training": {"sde": "bogus"}})
    with pytest.raises(ValueError, match="training.sde"):
        sde_lib.get_sde(config)


def test_get_sde_sampling_eps_from_score_flow_configs():
    """The original's 1e-3 (VP, sub-VP) / 1e-5 (VE), unless the config sets sampling.smallest_time (score_flow)."""
    from configs.score_flow.subvp import cifar10_ddpmpp_continuous as score_flow_subvp
    from configs.ve import cifar10_ncsnpp_continuous
    from configs.vp import cifar10_ddpmpp_continuous

    assert sde_lib.get_sde(cifar10_ddpmpp_continuous.get_config())[1] == 1e-3
    assert sde_lib.get_sde(cifar10_ncsnpp_continuous.get_config())[1] == 1e-5
    sde, eps = sde_lib.get_sde(score_flow_subvp.get_config())
    assert isinstance(sde, sde_lib.subVPSDE) and eps == 0.01
