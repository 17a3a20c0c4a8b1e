"""Importance-sampled time for likelihood weighting (sde_lib) and the loss that uses it (losses).

Against exact math: the cumulative weight is the integral of g²/std² (float64 quadrature), the
sampler inverts it and its draws have that density (Kolmogorov-Smirnov), and the importance-weighted
loss, rescaled by Z / (T - eps), has the likelihood-weighted loss's expectation (Monte-Carlo).
Against score_flow: its cumulative weights, sampled times and loss values (tests/golden/README.md).
"""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import integrate, stats

import losses
from configs.vp import digits as vp_digits
from models import utils as mutils
from score_sde.config_checks import validate_config
from tests.helpers import assert_close_scaled, make_sde

IW_SDES = ("vpsde", "subvpsde")
EPS = 1e-5


def _weight64(name: str, t):
    """g(t)² / std(t)² in float64 from the SDE definitions (beta 0.1..20)."""
    t = np.asarray(t, np.float64)
    beta = 0.1 + t * 19.9
    integrated = 0.1 * t + 0.5 * 19.9 * t ** 2  # B(t) = ∫_0^t β, std² = 1 - e^{-B} (VP), (1 - e^{-B})² (sub-VP)
    if name == "vpsde":
        return beta / -np.expm1(-integrated)
    diffusion2 = beta * -np.expm1(-2 * integrated)
    return diffusion2 / np.expm1(-integrated) ** 2


def _cum_weight64(name: str, t: float) -> float:
    # The integrand grows like 1/s near eps: integrate in log s.
    value, _ = integrate.quad(lambda u: _weight64(name, np.exp(u)) * np.exp(u), np.log(EPS), np.log(t),
                              epsabs=1e-12, epsrel=1e-12, limit=200)
    return value


def _original_taylor_error(t):
    """Bound on score_flow's deviation from exact: below B(t) = 1e-3 it replaces expm1(B) by B
    (log error B/2, counted twice for sub-VP); ours is exact there (tests/golden/README.md)."""
    integrated = 0.1 * t + 0.5 * 19.9 * t ** 2
    return np.where(integrated <= 1e-3, integrated, 0.0)


@pytest.mark.parametrize("name", IW_SDES)
def test_weight_is_g2_over_std2_and_the_cum_weight_its_integral(name):
    sde = make_sde(name)
    t = np.array([2e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0])
    np.testing.assert_allclose(sde.likelihood_importance_weight(jnp.asarray(t, jnp.float32)), _weight64(name, t),
                               rtol=2e-5)
    # Where float32 1 - exp has no cancellation, the weight is the SDE's own g² / std².
    mid = jnp.asarray([0.2, 0.6, 1.0])
    g = sde.sde(jnp.zeros((3, 1)), mid)[1]
    std = sde.marginal_prob(jnp.zeros((3, 1)), mid)[1]
    np.testing.assert_allclose(sde.likelihood_importance_weight(mid), g ** 2 / std ** 2, rtol=1e-5)
    cum = sde.likelihood_importance_cum_weight(jnp.asarray(t, jnp.float32), eps=EPS)
    np.testing.assert_allclose(cum, [_cum_weight64(name, s) for s in t], rtol=1e-5, atol=1e-5)
    assert float(sde.likelihood_importance_cum_weight(EPS, eps=EPS)) == 0.0


@pytest.mark.parametrize("name", IW_SDES)
def test_sampler_inverts_the_cum_weight(name):
    sde = make_sde(name)
    total = float(sde.likelihood_importance_cum_weight(sde.T, eps=EPS))
    u = jnp.linspace(0.0, 1.0, 101) * total
    t = sde.sample_importance_weighted_time_for_likelihood(None, None, quantile=u, eps=EPS)
    assert float(t.min()) >= np.float32(EPS) and float(t.max()) <= sde.T
    np.testing.assert_allclose(sde.likelihood_importance_cum_weight(t, eps=EPS), u, atol=2e-5 * total)


@pytest.mark.parametrize("name", IW_SDES)
def test_sampled_times_have_density_g2_over_std2(name):
    sde = make_sde(name)
    n = 20000
    t = np.asarray(sde.sample_importance_weighted_time_for_likelihood(jax.random.PRNGKey(3), (n,), eps=EPS),
                   np.float64)
    total = _cum_weight64(name, 1.0)
    cdf = np.vectorize(lambda s: _cum_weight64(name, min(max(s, EPS), 1.0)) / total)
    # KS against the exact CDF, on a subsample (the quadrature per point is the slow part).
    result = stats.kstest(t[:2000], cdf)
    assert result.pvalue > 1e-3, result
    # Uniform times would put ~0.1% of the draws below 1e-3; this density about 30% (VP).
    assert abs(np.mean(t < 1e-3) - cdf(1e-3)) < 5 * np.sqrt(cdf(1e-3) * (1 - cdf(1e-3)) / n)


# --------------------------------------------------------------------------- the loss

SHAPE = (4, 4, 4, 1)


class ToyScoreNet(nn.Module):
    """A linear, time-conditional network: cheap enough to draw the loss thousands of times."""

    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x, labels, train: bool = False):
        scale = nn.Dense(1)(jnp.log1p(labels.astype(jnp.float32))[:, None])[:, None, None, :]
        return 0.8 * x * nn.sigmoid(scale) + self.param("bias", nn.initializers.constant(0.1), (x.shape[-1],))


def _toy_model():
    model = ToyScoreNet(config=ml_collections.ConfigDict())
    params = model.init(jax.random.PRNGKey(0), jnp.zeros(SHAPE), jnp.zeros(SHAPE[:1]))["params"]
    return model, params


def _toy_expected_std2_loss(name, params, data, t):
    """E_z[½ Σ (std·s + z)²] of the toy network at times t (float64, closed form): with
    s·std = -c(t) x_t - bias and x_t = α x0 + std z, each coordinate is -(c α x0 + bias) + (1 - c std) z."""
    t = np.asarray(t, np.float64)
    dense = params["Dense_0"]
    pre = np.log1p(999 * t) * float(dense["kernel"][0, 0]) + float(dense["bias"][0])
    c = 0.8 / (1 + np.exp(-pre))
    integrated = 0.1 * t + 0.5 * 19.9 * t ** 2
    alpha = np.exp(-integrated / 2)
    std = np.sqrt(-np.expm1(-integrated)) if name == "vpsde" else -np.expm1(-integrated)
    x0 = np.asarray(data, np.float64).reshape(data.shape[0], -1)
    bias = float(params["bias"][0])
    mean_sq = (c[:, None, None] * alpha[:, None, None] * x0[None] + bias) ** 2 + (1 - c * std)[:, None, None] ** 2
    return 0.5 * mean_sq.sum(-1).mean(-1)  # half-sum over dimensions, mean over the batch


@pytest.mark.parametrize("name", IW_SDES)
def test_importance_weighted_loss_estimates_the_likelihood_weighted_one(name):
    sde = make_sde(name)
    model, params = _toy_model()
    data = 0.3 + 0.5 * jax.random.normal(jax.random.PRNGKey(5), SHAPE)
    draws = 4000
    keys = jax.random.split(jax.random.PRNGKey(7), draws)

    def draw(importance_weighting):
        loss_fn = losses.get_sde_loss_fn(sde, model, train=False, reduce_mean=False, likelihood_weighting=True,
                                         eps=EPS, importance_weighting=importance_weighting)
        return np.asarray(jax.jit(jax.vmap(lambda k: loss_fn(k, params, {}, {"image": data})[0]))(keys), np.float64)

    # The likelihood-weighted loss's expectation, E_{t~U}[w(t) E_z ℓ(t)], by quadrature in log t.
    expected_lw = integrate.quad(lambda u: _weight64(name, np.exp(u)) * np.exp(u)
                                 * _toy_expected_std2_loss(name, params, data, [np.exp(u)])[0],
                                 np.log(EPS), 0.0, epsrel=1e-10, limit=200)[0] / (1 - EPS)
    total = float(sde.likelihood_importance_cum_weight(sde.T, eps=EPS))
    iw = draw(True) * total / (sde.T - EPS)
    assert abs(iw.mean() - expected_lw) < 4 * iw.std() / np.sqrt(draws), (iw.mean(), expected_lw)
    assert iw.std() / np.sqrt(draws) < 0.01 * expected_lw  # a test with teeth
    # The point of the importance sampling: a far smaller variance than uniform times (ratio in the report).
    lw = draw(False)
    assert abs(lw.mean() - expected_lw) < 4 * lw.std() / np.sqrt(draws), (lw.mean(), expected_lw)
    assert iw.var() < 0.5 * lw.var(), (iw.var(), lw.var())


def test_importance_weighted_loss_formula():
    """The loss draws t from the sampler with the key score_flow uses and returns mean ‖s·std + z‖²."""
    sde = make_sde("subvpsde")
    model, params = _toy_model()
    # 64 examples: several times fall below 1e-4, where std must be the cancellation-free one.
    data = 0.5 * jax.random.normal(jax.random.PRNGKey(5), (64,) + SHAPE[1:])
    rng = jax.random.PRNGKey(1)
    loss = losses.get_sde_loss_fn(sde, model, train=False, reduce_mean=True, likelihood_weighting=True,
                                  eps=EPS, importance_weighting=True)(rng, params, {}, {"image": data})[0]
    rng, t_rng = jax.random.split(rng)
    rng, z_rng = jax.random.split(rng)
    t = sde.sample_importance_weighted_time_for_likelihood(t_rng, (64,), eps=EPS)
    assert np.sum(np.asarray(t) < 1e-4) >= 3
    z = jax.random.normal(z_rng, data.shape)
    lmc = np.asarray(sde.log_mean_coeff(t), np.float64)
    std = -np.expm1(2 * lmc)  # sub-VP
    x_t = np.exp(lmc)[:, None, None, None] * np.asarray(data) + std[:, None, None, None] * np.asarray(z)
    out = np.asarray(model.apply({"params": params}, jnp.asarray(x_t, jnp.float32), t * 999), np.float64)
    expected = np.mean((-out + np.asarray(z)) ** 2)  # s · std = -model output
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)


@pytest.mark.parametrize("name", IW_SDES)
def test_scores_and_marginals_are_exact_at_small_times(name):
    """Importance-sampled times cluster near eps: std(t) there must not lose digits to 1 - exp."""
    sde = make_sde(name)
    t = np.array([1e-5, 3e-5, 1e-4, 1e-3, 0.5])
    integrated = 0.1 * t + 0.5 * 19.9 * t ** 2
    exact = np.sqrt(-np.expm1(-integrated)) if name == "vpsde" else -np.expm1(-integrated)
    std = sde.marginal_prob_high_precision(jnp.zeros((5, 1)), jnp.asarray(t, jnp.float32))[1]
    np.testing.assert_allclose(std, exact, rtol=1e-6)
    model, params = _toy_model()
    x = jnp.ones((5,) + SHAPE[1:])
    score = mutils.get_score_fn(sde, model, params, {}, train=False, continuous=True)(x, jnp.asarray(t, jnp.float32))
    out = np.asarray(model.apply({"params": params}, x, jnp.asarray(t, jnp.float32) * 999), np.float64)
    np.testing.assert_allclose(score, -out / exact[:, None, None, None], rtol=1e-5)


@pytest.mark.parametrize("kwargs, words", [
    (dict(sde="vpsde", likelihood_weighting=False, continuous=True), "likelihood_weighting"),
    (dict(sde="vesde", likelihood_weighting=True, continuous=True), "subvpsde"),
    (dict(sde="vpsde", likelihood_weighting=True, continuous=False), "continuous"),
])
def test_unsupported_importance_weighting_is_refused(kwargs, words):
    sde = make_sde(kwargs["sde"])
    model, _ = _toy_model()
    with pytest.raises(ValueError, match="importance_weighting") as info:
        losses.get_step_fn(sde, model, train=False, continuous=kwargs["continuous"],
                           likelihood_weighting=kwargs["likelihood_weighting"], importance_weighting=True)
    assert words in str(info.value)
    config = vp_digits.get_config()
    config.training.sde = kwargs["sde"]
    config.training.likelihood_weighting = kwargs["likelihood_weighting"]
    config.training.continuous = kwargs["continuous"]
    config.training.importance_weighting = True
    with pytest.raises(ValueError, match="training.importance_weighting") as info:
        validate_config(config, mode="train")
    assert words in str(info.value)


# --------------------------------------------------------------------------- score_flow's numbers


@pytest.fixture(scope="module")
def flow_golden(golden_dir):
    meta = json.loads((golden_dir / "score_flow_likelihood.json").read_text())
    return np.load(golden_dir / "score_flow_likelihood.npz"), meta


@pytest.mark.parametrize("name", IW_SDES)
def test_cum_weight_and_times_match_score_flow(name, flow_golden):
    npz, meta = flow_golden
    sde = make_sde(name)
    t = npz["t_grid"]
    ours = np.asarray(sde.likelihood_importance_cum_weight(jnp.asarray(t), eps=EPS))
    golden = npz[f"{name}/cum_weight"]
    assert np.all(np.abs(ours - golden) <= 1e-5 * np.abs(golden).max() + _original_taylor_error(t)), ours - golden
    # Times: compared through our CDF (a CDF error of δ moves t by δ / density).
    total = float(sde.likelihood_importance_cum_weight(sde.T, eps=EPS))
    assert abs(total - meta[f"{name}/Z"]) <= 1e-5 * total
    for times, u in ((npz[f"{name}/time_at_quantile"], npz["u_grid"] * total),
                     (npz[f"{name}/time_key0"], jax.random.uniform(jax.random.PRNGKey(0), (8,), maxval=total))):
        at = np.asarray(sde.likelihood_importance_cum_weight(jnp.asarray(times), eps=EPS))
        assert np.all(np.abs(at - u) <= 2e-5 * total + _original_taylor_error(times)), at - u
        ours = sde.sample_importance_weighted_time_for_likelihood(None, None, quantile=jnp.asarray(u), eps=EPS)
        np.testing.assert_allclose(ours, times, rtol=2e-3)


def _golden_model(golden_dir):
    """The golden tiny NCSN++ (DDPM++ VP continuous, 16x16x3) with its perturbed parameters."""
    case = json.loads((golden_dir / "models.json").read_text())["ddpmpp_vp_cont"]
    config = ml_collections.ConfigDict(case["config"])
    config.model.ch_mult = tuple(config.model.ch_mult)
    config.model.attn_resolutions = tuple(config.model.attn_resolutions)
    npz = np.load(golden_dir / "model_ddpmpp_vp_cont.npz")
    params = {}
    for key in npz.files:
        if key.startswith("var/params/"):
            *path, leaf = key[len("var/params/"):].split("/")
            node = params
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = jnp.asarray(npz[key])
    return mutils.create_model(config), params


@pytest.mark.parametrize("name, reduce_mean, train", [("vpsde", True, False), ("vpsde", False, True),
                                                     ("subvpsde", False, False), ("subvpsde", True, True)])
def test_importance_weighted_loss_matches_score_flow(name, reduce_mean, train, flow_golden, golden_dir):
    npz, _ = flow_golden
    model, params = _golden_model(golden_dir)
    loss_fn = losses.get_sde_loss_fn(make_sde(name), model, train=train, reduce_mean=reduce_mean,
                                     likelihood_weighting=True, eps=EPS, importance_weighting=True)
    loss, _ = jax.jit(loss_fn)(jax.random.PRNGKey(1), params, {}, {"image": jnp.asarray(npz["x"])})
    assert_close_scaled(loss, npz[f"{name}/loss_iw_mean{int(reduce_mean)}_train{int(train)}"])


# --------------------------------------------------------------------------- score_flow's configs
# Fields of score_flow's configs this port leaves out (see configs/score_flow/default_cifar10_configs.py).
NOT_CARRIED = ("eval.ckpt_id", "model.data_init", "model.trainable_embedding")


def _flat_config(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat_config(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", {"tuple": list(value)} if isinstance(value, tuple) else value


@pytest.mark.parametrize("relpath", ["default_cifar10_configs.py", "vp/cifar10_ddpmpp_continuous.py",
                                     "vp/cifar10_ddpmpp_deep_continuous.py", "subvp/cifar10_ddpmpp_continuous.py",
                                     "subvp/cifar10_ddpmpp_deep_continuous.py"])
def test_score_flow_configs_match_the_original(relpath, golden_dir):
    original = json.loads((golden_dir / "score_flow_configs.json").read_text())[relpath]
    module = __import__("configs.score_flow." + relpath[:-3].replace("/", "."), fromlist=["_"])
    ours = dict(_flat_config((getattr(module, "get_config", None) or module.get_default_configs)().to_dict()))
    for field, value in original.items():
        if field.startswith(NOT_CARRIED):
            continue
        assert field in ours, field
        assert ours[field] == value and type(ours[field]) is type(value), (field, ours[field], value)


def test_training_job_passes_the_score_flow_loss_fields(monkeypatch):
    """run_lib's train and eval steps are built with the config's importance weighting and smallest time."""
    import run_lib
    from configs.score_flow.subvp import cifar10_ddpmpp_continuous as score_flow_subvp

    config = score_flow_subvp.get_config()
    config.training.likelihood_weighting = config.training.importance_weighting = True
    seen = []
    monkeypatch.setattr(losses, "get_step_fn", lambda *args, **kwargs: seen.append(kwargs) or (lambda c, b: (c, 0.0)))
    run_lib.make_train_and_eval_steps(config, make_sde("subvpsde"), model=None)
    assert [kw["train"] for kw in seen] == [True, False]
    for kwargs in seen:
        assert kwargs["importance_weighting"] is True and kwargs["likelihood_weighting"] is True
        assert kwargs["smallest_time"] == config.training.smallest_time != 1e-5
