"""Controllable generation against closed-form conditionals of Gaussian and mixture data."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sampling
from models import utils as mutils
from score_sde import controllable_generation as cg
from score_sde import parallel, toy
from tests.helpers import make_sde

RD, LANGEVIN = sampling.get_predictor("reverse_diffusion"), sampling.get_corrector("langevin")


def _conditional_gaussian(mean, cov, known, values):
    """Mean and covariance of the unknown coordinates given ``x[known] = values``."""
    k, u = known, ~known
    gain = cov[np.ix_(u, k)] @ np.linalg.inv(cov[np.ix_(k, k)])
    return mean[u] + gain @ (values - mean[k]), cov[np.ix_(u, u)] - gain @ cov[np.ix_(k, u)]


def _check_moments(samples, want_mean, want_cov, extra=0.0):
    """Sample mean / covariance within 4 standard errors (+ ``extra``) of the closed form."""
    n = samples.shape[0]
    var = np.diag(want_cov).max()
    np.testing.assert_allclose(samples.mean(0), want_mean, atol=4 * np.sqrt(var / n) + extra)
    np.testing.assert_allclose(np.cov(samples.T), want_cov, atol=4 * var * np.sqrt(2.0 / n) + extra)


INPAINT_COV = 0.3 * np.array([[1.0, 0.6, 0.5, 0.3], [0.6, 1.0, 0.4, 0.5], [0.5, 0.4, 1.0, 0.6],
                              [0.3, 0.5, 0.6, 1.0]])
INPAINT_MEAN = np.array([0.2, -0.1, 0.3, 0.0])


def test_inpainting_samples_the_conditional_gaussian():
    """Correlated 2×2 Gaussian images, top row known: the bottom row follows N(cond. mean, cond. cov).

    The replacement method is exact only in the limit where the Langevin corrector mixes the unknown
    pixels at each noise level (predictor-only replacement is biased towards the prior mean); with
    reverse diffusion + Langevin and N=1000 the error is within MC noise plus the corrector's
    step-size bias (a few per cent of the variance).
    """
    sde = make_sde("vesde", 1000)
    dist = toy.Gaussian(INPAINT_MEAN, INPAINT_COV, event_shape=(2, 2, 1))
    known = np.array([True, True, False, False])
    values = np.array([0.8, 0.5])
    n = 8000
    data = jnp.broadcast_to(jnp.asarray([0.8, 0.5, 0.0, 0.0]).reshape(1, 2, 2, 1), (n, 2, 2, 1))
    mask = jnp.broadcast_to(jnp.asarray(known, jnp.float32).reshape(1, 2, 2, 1), (n, 2, 2, 1))
    inpainter = cg.get_score_pc_inpainter(sde, dist.score_fn(sde), RD, LANGEVIN, snr=0.16, eps=1e-5)
    x = np.asarray(inpainter(jax.random.PRNGKey(0), data, mask)).reshape(n, 4)
    np.testing.assert_allclose(x[:, known], np.broadcast_to(values, (n, 2)), atol=1e-3)
    want_mean, want_cov = _conditional_gaussian(INPAINT_MEAN, INPAINT_COV, known, values)
    _check_moments(x[:, ~known], want_mean, want_cov, extra=0.01)


def test_colorization_samples_the_conditional_gaussian():
    """RGB Gaussian pixels; the grey level (r+g+b)/√3 is given: chroma follows the closed-form conditional.

    Run on sub-VP (inpainting runs on VE), so that both SDE families are covered.
    """
    rgb_cov = 0.2 * np.array([[1.0, 0.7, 0.4], [0.7, 1.0, 0.6], [0.4, 0.6, 1.0]])
    rgb_mean = np.array([0.3, 0.1, -0.2])
    m = np.asarray(cg.colour_decoupling_matrix(), np.float64)
    np.testing.assert_allclose(m.T @ m, np.eye(3), atol=1e-6)
    x_rgb = jnp.asarray([[0.1, 0.5, -0.3]])
    np.testing.assert_allclose(np.asarray(cg.couple(cg.decouple(x_rgb))), np.asarray(x_rgb), atol=1e-6)
    grey = 0.25
    sde = make_sde("subvpsde", 1000)
    dist = toy.Gaussian(rgb_mean, rgb_cov, event_shape=(1, 1, 3))
    n = 8000
    grey_img = jnp.full((n, 1, 1, 3), grey)
    colorizer = cg.get_score_pc_colorizer(sde, dist.score_fn(sde), RD, LANGEVIN, snr=0.16, eps=1e-3)
    x = colorizer(jax.random.PRNGKey(1), grey_img)
    u = np.asarray(cg.decouple(x)).reshape(n, 3)
    np.testing.assert_allclose(u[:, 0], np.sqrt(3.0) * grey, atol=1e-3)
    # In decoupled coordinates the data is N(Mᵀ mean, Mᵀ cov M); condition on coordinate 0.
    want_mean, want_cov = _conditional_gaussian(m.T @ rgb_mean, m.T @ rgb_cov @ m, np.array([True, False, False]),
                                                np.array([np.sqrt(3.0) * grey]))
    _check_moments(u[:, 1:], want_mean, want_cov, extra=0.01)


MIX = toy.GaussianMixture([0.5, 0.5], [[-0.8, 0.3, 0.1], [0.8, -0.4, 0.5]], [0.25, 0.3], event_shape=(1, 1, 3))
VE = make_sde("vesde", 400)


def test_class_conditional_sampling_with_exact_classifier():
    """2-class mixture: adding ∇ log p_t(y|x) of the exact classifier gives samples of component y."""
    n = 6000
    labels = (jnp.arange(n) % 2).astype(jnp.int32)
    sampler = cg.get_score_pc_conditional_sampler(
        VE, MIX.score_fn(VE), lambda x, t, y: MIX.classifier_grad(VE, x, t, y), (n, 1, 1, 3), RD, LANGEVIN,
        snr=0.16, eps=1e-5)
    x = sampler(jax.random.PRNGKey(2), labels)
    got = np.asarray(jnp.argmax(MIX.log_posterior(VE, x, jnp.zeros(n)), axis=1))
    assert np.mean(got == np.asarray(labels)) > 0.99
    for k, comp in enumerate(MIX.components):
        xk = np.asarray(x).reshape(n, 3)[np.asarray(labels) == k]
        _check_moments(xk, np.asarray(comp.mean_flat), np.asarray(comp.cov), extra=0.02)


VE_SMALL = make_sde("vesde", 100)


def _t_of_sigma(sigma):
    """Inverse of VE's σ(t) = σ_min (σ_max/σ_min)^t."""
    return jnp.log(sigma / VE.sigma_min) / jnp.log(VE.sigma_max / VE.sigma_min)


class MixtureScoreModel(nn.Module):
    """VE continuous 'network': label σ(t) -> the mixture's exact score."""

    @nn.compact
    def __call__(self, x, labels, train=False):
        return MIX.score(VE, x, _t_of_sigma(labels))


class MixtureClassifier(nn.Module):
    """Noise-conditional 'classifier' (CIFAR-10-normalised input, noise scale σ) with exact logits."""

    @nn.compact
    def __call__(self, x, noise_scale, train=False):
        x = x * jnp.asarray(mutils._CIFAR10_STD) + jnp.asarray(mutils._CIFAR10_MEAN)
        return MIX.log_posterior(VE, x, _t_of_sigma(noise_scale))


def test_model_level_controllable_generation_runs_on_devices():
    """The original's entry points (pmapped, replicated state) on the mixture: conditional samples land in
    their class, inpainting keeps known pixels, colorization keeps the grey level."""
    n_dev, n = parallel.local_device_count(), 64
    state = mutils.State(step=0, params={}, opt_state={}, lr=0.0, model_state={}, ema_rate=0.999, params_ema={},
                         rng=jax.random.PRNGKey(0))
    pstate = parallel.replicate(state)
    keys = jax.random.split(jax.random.PRNGKey(3), n_dev)
    labels = jnp.tile((jnp.arange(n) % 2).astype(jnp.int32), (n_dev, 1))
    sampler = cg.get_pc_conditional_sampler(VE_SMALL, MixtureScoreModel(), MixtureClassifier(), {}, (n, 1, 1, 3), RD,
                                            LANGEVIN, lambda x: x, 0.16, continuous=True)
    x = sampler(keys, pstate, labels)
    assert x.shape == (n_dev, n, 1, 1, 3)
    got = jnp.argmax(MIX.log_posterior(VE, x.reshape(-1, 1, 1, 3), jnp.zeros(n_dev * n)), axis=1)
    assert float(jnp.mean(got == labels.reshape(-1))) > 0.95

    data = MIX.sample(jax.random.PRNGKey(4), n_dev * n).reshape(n_dev, n, 1, 1, 3)
    mask = jnp.zeros_like(data).at[..., 0].set(1.0)
    out = cg.get_pc_inpainter(VE_SMALL, MixtureScoreModel(), RD, LANGEVIN, lambda x: x, 0.16, continuous=True)(
        keys, pstate, data, mask)
    np.testing.assert_allclose(np.asarray(out[..., 0]), np.asarray(data[..., 0]), atol=1e-3)
    assert np.isfinite(np.asarray(out)).all()
    grey = jnp.repeat(data.mean(-1, keepdims=True), 3, axis=-1)
    out = cg.get_pc_colorizer(VE_SMALL, MixtureScoreModel(), RD, LANGEVIN, lambda x: x, 0.16, continuous=True)(
        keys, pstate, grey)
    np.testing.assert_allclose(np.asarray(out.sum(-1)), np.asarray(grey.sum(-1)), atol=2e-3)


def test_invalid_configuration_fails_before_tracing():
    sde = make_sde("subvpsde", 1000)
    with pytest.raises(NotImplementedError, match="subVPSDE"):
        cg.get_score_pc_inpainter(sde, MIX.score_fn(sde), sampling.get_predictor("ancestral_sampling"), None)
    with pytest.raises(ValueError, match="num_scales"):
        cg.get_pc_colorizer(make_sde("vpsde", 10), None, RD, None, lambda x: x, 0.16)
