"""score_sde.toy: exact scores and densities of diffused Gaussians and mixtures."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from score_sde import toy
from tests.helpers import SDE_NAMES, make_sde

COV = np.array([[1.0, 0.6, 0.2], [0.6, 0.8, -0.3], [0.2, -0.3, 0.5]])


def _dists():
    return {
        "iso": toy.IsotropicGaussian(0.3, 0.5, (3,)),
        "full": toy.Gaussian([0.5, -1.0, 0.2], COV),
        "mix": toy.GaussianMixture([0.3, 0.7], [[-1.0, 0.5, 0.0], [1.5, 0.0, -0.5]],
                                   [COV * 0.3, np.diag([0.2, 0.1, 0.4])]),
    }


def _scipy_log_prob(dist, sde, x, t):
    """Reference log p_t from scipy: the data law pushed through N(a x0, s² I)."""
    a, var = (float(v) for v in toy.transition_coefficients(sde, jnp.asarray(t)))
    if isinstance(dist, toy.IsotropicGaussian):
        comps = [(1.0, np.asarray(dist.mean).reshape(-1), dist.std ** 2 * np.eye(dist.dim))]
    elif isinstance(dist, toy.Gaussian):
        comps = [(1.0, np.asarray(dist.mean_flat), np.asarray(dist.cov))]
    else:
        comps = [(float(w), np.asarray(c.mean_flat), np.asarray(c.cov)) for w, c in zip(dist.weights, dist.components)]
    dens = sum(w * stats.multivariate_normal(a * m, a * a * c + var * np.eye(len(m))).pdf(x) for w, m, c in comps)
    return np.log(dens)


@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("dist_name", ["iso", "full", "mix"])
def test_log_prob_and_score_are_exact(sde_name, dist_name):
    sde, dist = make_sde(sde_name), _dists()[dist_name]
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 3)) * 1.5
    for t in (1e-3, 0.3, 1.0):
        tv = jnp.full((5,), t)
        lp = dist.log_prob(sde, x, tv)
        np.testing.assert_allclose(np.asarray(lp), _scipy_log_prob(dist, sde, np.asarray(x), t), rtol=1e-4, atol=1e-4)
        auto = jax.grad(lambda y: dist.log_prob(sde, y, tv).sum())(x)
        np.testing.assert_allclose(np.asarray(dist.score(sde, x, tv)), np.asarray(auto), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("sde_name", SDE_NAMES)
def test_transition_kernel_matches_closed_form(sde_name):
    """a(t) is marginal_prob's mean factor; s(t)² is the float64 closed form (VE: σ(t)² − σ_min²)."""
    sde = make_sde(sde_name)
    t64 = np.array([1e-3, 0.4, 1.0])
    a, var = toy.transition_coefficients(sde, jnp.asarray(t64))
    mean, _ = sde.marginal_prob(jnp.ones((3, 1)), jnp.asarray(t64))
    np.testing.assert_allclose(np.asarray(a), np.asarray(mean[:, 0]), rtol=1e-6)
    if sde_name == "vesde":
        want = (0.01 * 5000.0 ** t64) ** 2 - 0.01 ** 2
    else:
        a2 = np.exp(-0.5 * t64 ** 2 * 19.9 - t64 * 0.1)
        want = (1 - a2) if sde_name == "vpsde" else (1 - a2) ** 2
    np.testing.assert_allclose(np.asarray(var), want, rtol=2e-5)


def test_golden_data_score_matches_readme_formula(golden_dir):
    """IsotropicGaussian(0.3, 0.5) is the golden README's data: same score as its formula."""
    g = np.load(golden_dir / "sde_sampling_likelihood.npz")
    x, t = jnp.asarray(g["sde_x"]), jnp.asarray(g["sde_t"])
    dist = toy.IsotropicGaussian(0.3, 0.5, x.shape[1:])
    for name in SDE_NAMES:
        sde = make_sde(name)
        score = dist.score_fn(sde)
        got = sde.reverse(score, probability_flow=False).sde(x, t)[0]
        np.testing.assert_allclose(np.asarray(got), g[f"{name}/reverse_pf0_drift"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("dist_name", ["iso", "full"])
def test_flow_map_solves_probability_flow_ode(sde_name, dist_name):
    """d/dt of the affine flow map (forward-mode autodiff, exact) is the probability-flow ODE's drift there."""
    sde, dist = make_sde(sde_name), _dists()[dist_name]
    x0 = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    t0 = jnp.full((4,), 0.2)
    rsde = sde.reverse(dist.score_fn(sde), probability_flow=True)
    for t in (0.05, 0.3, 0.7, 1.0):
        tv = jnp.full((4,), t)
        xt, deriv = jax.jvp(lambda s: dist.flow_map(sde, x0, t0, s), (tv,), (jnp.ones_like(tv),))
        drift = rsde.sde(xt, tv)[0]
        # float32 round-off only, relative to the largest of the terms whose difference the drift is
        # (f and g²·score / 2, the score mixing all coordinates of an example).
        f, g = sde.sde(xt, tv)
        terms = np.abs(np.asarray(f)) + 0.5 * np.asarray(g ** 2)[:, None] * np.abs(np.asarray(dist.score(sde, xt, tv)))
        err = np.abs(np.asarray(deriv) - np.asarray(drift))
        assert np.all(err <= 1e-5 * terms.max(axis=1, keepdims=True)), (t, err, terms)
    back = dist.flow_map(sde, dist.flow_map(sde, x0, t0, jnp.full((4,), 0.9)), jnp.full((4,), 0.9), t0)
    np.testing.assert_allclose(np.asarray(back), np.asarray(x0), rtol=1e-4, atol=1e-4)


def test_sampling_and_classifier():
    dist = _dists()["mix"]
    n = 20000
    x, labels = jax.jit(dist.sample_with_labels, static_argnums=1)(jax.random.PRNGKey(2), n)
    assert x.shape == (n, 3)
    frac = float(labels.mean())
    assert abs(frac - 0.7) < 4 * np.sqrt(0.21 / n)
    for k, comp in enumerate(dist.components):
        xk = np.asarray(x[labels == k])
        np.testing.assert_allclose(xk.mean(0), np.asarray(comp.mean_flat), atol=0.04)
        np.testing.assert_allclose(np.cov(xk.T), np.asarray(comp.cov), atol=0.05)
    sde = make_sde("vpsde")
    t = jnp.full((6,), 0.3)
    post = jnp.exp(dist.log_posterior(sde, x[:6], t))
    np.testing.assert_allclose(np.asarray(post.sum(1)), 1.0, rtol=1e-5)
    lab = jnp.asarray([0, 1, 0, 1, 1, 0])
    auto = jax.grad(lambda y: dist.log_posterior(sde, y, t)[jnp.arange(6), lab].sum())(x[:6])
    np.testing.assert_allclose(np.asarray(dist.classifier_grad(sde, x[:6], t, lab)), np.asarray(auto),
                               rtol=1e-3, atol=1e-4)


def test_image_shaped_events_and_shape_errors():
    dist = toy.Gaussian(np.zeros(4), np.eye(4) + 0.5, event_shape=(2, 2, 1))
    x = dist.sample(jax.random.PRNGKey(3), 7)
    assert x.shape == (7, 2, 2, 1)
    sde = make_sde("vesde")
    assert dist.score(sde, x, jnp.full((7,), 0.5)).shape == (7, 2, 2, 1)
    assert dist.log_prob(sde, x, jnp.full((7,), 0.5)).shape == (7,)
    with pytest.raises(ValueError, match="expected"):
        dist.score(sde, jnp.zeros((7, 4)), jnp.full((7,), 0.5))
