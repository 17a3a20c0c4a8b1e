"""sampling: the original's golden numbers, and closed-form truth for Gaussian / mixture data."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import sampling
from models import utils as mutils
from score_sde import parallel, toy
from test_sde_lib import MU, S0, exact_gaussian_score
from tests.helpers import SDE_NAMES, assert_close_scaled, make_sde
EPS = {"vpsde": 1e-3, "subvpsde": 1e-3, "vesde": 1e-5}
PC_CASES = [("euler_maruyama", "none"), ("reverse_diffusion", "langevin"), ("none", "ald")]
CORRECTOR_CASES = [("langevin", 0.16, 1), ("langevin", 0.075, 2), ("ald", 0.16, 1)]


@pytest.fixture(scope="module")
def golden(golden_dir):
    return np.load(golden_dir / "sde_sampling_likelihood.npz")


@pytest.fixture(scope="module")
def golden_json(golden_dir):
    import json
    return json.loads((golden_dir / "sde_sampling_likelihood.json").read_text())


def _close(got, want, what):
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


# --------------------------------------------------------------------------- registry


def test_registry_names_and_unknown_names():
    assert sampling.registered_predictors() == ["ancestral_sampling", "euler_maruyama", "none", "reverse_diffusion"]
    assert sampling.registered_correctors() == ["ald", "langevin", "none"]
    with pytest.raises(ValueError, match="euler_maruyama"):
        sampling.get_predictor("heun")
    with pytest.raises(ValueError, match="langevin"):
        sampling.get_corrector("hmc")
    with pytest.raises(ValueError, match="already registered"):
        sampling.register_predictor(sampling.NonePredictor, name="none")


# --------------------------------------------------------------------------- goldens


@pytest.mark.parametrize("name", SDE_NAMES)
def test_predictor_and_corrector_steps_match_golden(name, golden):
    sde = make_sde(name)
    x, t = jnp.asarray(golden["sde_x"]), jnp.asarray(golden["sde_t"])
    score = exact_gaussian_score(name, sde)
    key = jax.random.PRNGKey(1)
    for pred in ("euler_maruyama", "reverse_diffusion", "ancestral_sampling"):
        if name == "subvpsde" and pred == "ancestral_sampling":
            with pytest.raises(NotImplementedError, match="subVPSDE"):
                sampling.get_predictor(pred)(sde, score, False)
            continue
        out, mean = sampling.get_predictor(pred)(sde, score, False).update_fn(key, x, t)
        _close(out, golden[f"{name}/predictor_{pred}_x"], pred)
        _close(mean, golden[f"{name}/predictor_{pred}_xmean"], pred)
    for corr, snr, n in CORRECTOR_CASES:
        out, mean = jax.jit(sampling.get_corrector(corr)(sde, score, snr, n).update_fn)(key, x, t)
        tag = f"{name}/corrector_{corr}_snr{snr}_n{n}"
        if name == "subvpsde":  # the original crashed here (no golden): against the formulas instead
            want_x, want_mean = _corrector_by_hand(sde, score, corr, snr, n, key, x, t)
            assert_close_scaled(out, want_x, rtol=1e-5)
            assert_close_scaled(mean, want_mean, rtol=1e-5)
            continue
        _close(out, golden[tag + "_x"], tag)
        _close(mean, golden[tag + "_xmean"], tag)


def _corrector_by_hand(sde, score, corr, snr, n_steps, key, x, t):
    """sub-VP's Langevin / ALD corrector (the paper's Alg. 4 with DDPM's alpha_i) in float64 numpy.

    alpha_i = 1 - beta_i with beta_i = (beta_min + i/(N-1) (beta_max - beta_min)) / N, i = int(t (N-1));
    ALD's std(t) = 1 - exp(-½ t² (beta_max - beta_min) - t beta_min), sub-VP's kernel std.
    """
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    i = (np.asarray(t, np.float32) * (sde.N - 1)).astype(np.int32)  # the float32 index of the code
    alpha = 1 - (0.1 + i / (sde.N - 1) * (20.0 - 0.1)) / sde.N
    std = 1 - np.exp(-0.5 * t ** 2 * (20.0 - 0.1) - t * 0.1)
    per_example = lambda v: v[:, None, None, None]  # noqa: E731
    norm = lambda v: np.linalg.norm(v.reshape(len(v), -1), axis=1).mean()  # noqa: E731
    rng, x_mean = key, x
    for _ in range(n_steps):
        grad = np.asarray(score(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32)), np.float64)
        rng, step_rng = jax.random.split(rng)
        noise = np.asarray(jax.random.normal(step_rng, x.shape), np.float64)
        if corr == "langevin":
            step = 2 * alpha * (snr * norm(noise) / norm(grad)) ** 2
        else:
            step = 2 * alpha * (snr * std) ** 2
        x_mean = x + per_example(step) * grad
        x = x_mean + per_example(np.sqrt(2 * step)) * noise
    return x, x_mean


@pytest.mark.parametrize("name", SDE_NAMES)
def test_pc_sampler_matches_golden_or_refuses(name, golden, golden_json):
    """N=10 PC samples and NFE of the original; where it returned NaN we raise a clear error."""
    sde = make_sde(name, 10)
    score = exact_gaussian_score(name, sde)
    for pred, corr in PC_CASES:
        tag = f"{name}/pc_N10_{pred}_{corr}"
        make = lambda: sampling.get_score_pc_sampler(  # noqa: E731
            sde, score, (4, 4, 4, 1), sampling.get_predictor(pred), sampling.get_corrector(corr), snr=0.16,
            n_steps=1, probability_flow=False, denoise=True, eps=EPS[name])
        if name != "vesde" and corr != "none":
            # VP: golden is NaN (discrete betas up to 2.0); subVP: the original crashed. Ours refuses.
            with pytest.raises(ValueError, match="num_scales"):
                make()
            continue
        samples, nfe = make()(jax.random.PRNGKey(2))
        _close(samples, golden[tag], tag)
        assert golden_json["pc_nfe"][tag] == sde.N * 2  # the original reports N (n_steps + 1) for every pair
        assert nfe == sde.N * (int(pred != "none") + int(corr != "none"))  # we report what was evaluated


@pytest.mark.parametrize("name", SDE_NAMES)
@pytest.mark.parametrize("solver", ["scipy", "jax"])
def test_ode_sampler_matches_golden(name, solver, golden, golden_json):
    """scipy RK45 reproduces the original's samples and NFE; the JAX solver agrees within tolerance."""
    sde = make_sde(name)
    sampler = sampling.get_score_ode_sampler(sde, exact_gaussian_score(name, sde), (4, 4, 4, 1), denoise=True,
                                             rtol=1e-5, atol=1e-5, eps=EPS[name], solver=solver)
    samples, nfe = sampler(jax.random.PRNGKey(4), z=golden[f"{name}/ode_z"])
    want, want_nfe = golden[f"{name}/ode_samples"], golden_json["ode_nfe"][name]
    if solver == "scipy":
        _close(samples, want, name)
        assert nfe == want_nfe + 1  # the solve's evaluations (the original's count) + the denoising step
    else:
        np.testing.assert_allclose(np.asarray(samples), want, atol=2e-4)
        # scipy's steps up to float32 round-off (score_sde/ode.py): equal, or one RK45 step (6 evaluations) apart
        # where an error norm near 1 is accepted by one and rejected by the other (VP: 56 against 50).
        assert abs(nfe - (want_nfe + 1)) <= 6


# --------------------------------------------------------------------------- model-level (pmapped) samplers


class ExactGaussianModel(nn.Module):
    """A parameter-free 'network' whose score (through get_score_fn, continuous) is the golden exact score."""

    sde_name: str

    @nn.compact
    def __call__(self, x, labels, train=False):
        if self.sde_name == "vesde":  # label = sigma(t); output = score
            v = S0 ** 2 + labels ** 2 - 0.01 ** 2
            return -(x - MU) / v[:, None, None, None]
        t = labels / 999.0
        sde = make_sde(self.sde_name)
        score = exact_gaussian_score(self.sde_name, sde)(x, t)
        std = sde.marginal_prob(x, t)[1]
        return -score * std[:, None, None, None]  # get_score_fn divides by -std


def _pstate():
    state = mutils.State(step=0, params={}, opt_state={}, lr=0.0, model_state={}, ema_rate=0.999, params_ema={},
                         rng=jax.random.PRNGKey(0))
    return parallel.replicate(state)


@pytest.mark.parametrize("name", ["vpsde", "vesde"])
def test_model_level_samplers_match_golden(name, golden, golden_json):
    """get_pc_sampler / get_ode_sampler / get_sampling_fn (pmapped, replicated state) give the goldens."""
    n_dev = parallel.local_device_count()
    if n_dev != 1:
        pytest.skip("goldens were made on one device")
    model, pstate = ExactGaussianModel(name), _pstate()
    sde = make_sde(name, 10)
    pred, corr = ("reverse_diffusion", "langevin") if name == "vesde" else ("euler_maruyama", "none")
    cfg = ml_collections.ConfigDict({
        "sampling": {"method": "pc", "predictor": pred, "corrector": corr, "snr": 0.16, "n_steps_each": 1,
                     "probability_flow": False, "noise_removal": True},
        "training": {"continuous": True}})
    sampler = sampling.get_sampling_fn(cfg, sde, model, (4, 4, 4, 1), lambda x: x, EPS[name])
    samples, nfe = sampler(jnp.asarray([jax.random.PRNGKey(2)]), pstate)
    tag = f"{name}/pc_N10_{pred}_{corr}"
    _close(samples[0], golden[tag], tag)
    assert nfe == sde.N * (int(pred != "none") + int(corr != "none"))

    sde = make_sde(name)
    for solver in ("scipy", "jax"):
        cfg = ml_collections.ConfigDict({"sampling": {"method": "ode", "noise_removal": True, "ode_solver": solver},
                                         "training": {"continuous": True}})
        sampler = sampling.get_sampling_fn(cfg, sde, model, (4, 4, 4, 1), lambda x: x, EPS[name])
        samples, nfe = sampler(jnp.asarray([jax.random.PRNGKey(4)]), pstate, z=golden[f"{name}/ode_z"][None])
        want = golden[f"{name}/ode_samples"]
        if solver == "scipy":
            _close(samples[0], want, f"{name} ode scipy")
            assert nfe == golden_json["ode_nfe"][name] + 1  # the solve's evaluations + the denoising step
        else:
            np.testing.assert_allclose(np.asarray(samples[0]), want, atol=2e-4)


def test_shared_update_fns_step_the_models_score_by_hand(golden):
    """shared_predictor_update_fn (probability flow) and shared_corrector_update_fn (ALD) on VE, from the formulas.

    Exact score s = -(x - MU) / (S0² + sigma(t)² - sigma_min²); g(t)² = 2 sigma(t)² log(sigma_max / sigma_min).
    Probability-flow Euler step: x + ½ g² s / N, no noise. ALD: step 2 (snr sigma(t))², x + step s + sqrt(2 step) z.
    """
    sde = make_sde("vesde")
    model = ExactGaussianModel("vesde")
    state = parallel.unreplicate(_pstate())
    x, t = jnp.asarray(golden["sde_x"]), jnp.asarray(golden["sde_t"])
    x64, t64 = np.asarray(x, np.float64), np.asarray(t, np.float64)
    sigma = 0.01 * (50 / 0.01) ** t64
    score = -(x64 - MU) / (S0 ** 2 + sigma ** 2 - 0.01 ** 2)[:, None, None, None]
    key = jax.random.PRNGKey(3)

    out, mean = sampling.shared_predictor_update_fn(key, state, x, t, sde, model, sampling.EulerMaruyamaPredictor,
                                                    probability_flow=True, continuous=True)
    g2 = 2 * sigma ** 2 * np.log(50 / 0.01)
    assert_close_scaled(mean, x64 + 0.5 * g2[:, None, None, None] * score / sde.N, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(mean))

    out, mean = sampling.shared_corrector_update_fn(key, state, x, t, sde, model, sampling.AnnealedLangevinDynamics,
                                                    continuous=True, snr=0.16, n_steps=1)
    step = (2 * (0.16 * sigma) ** 2)[:, None, None, None]
    noise = np.asarray(jax.random.normal(jax.random.split(key)[1], x.shape), np.float64)
    assert_close_scaled(mean, x64 + step * score, rtol=1e-5)
    assert_close_scaled(out, x64 + step * score + np.sqrt(2 * step) * noise, rtol=1e-5)


def _counting(score_fn, calls: list):
    """``score_fn`` that appends to ``calls`` whenever it is evaluated (at run time, inside jit and loops)."""

    def counted(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return score_fn(x, t)

    return counted


@pytest.mark.parametrize("pred,corr,n_steps", [("euler_maruyama", "none", 1), ("none", "langevin", 3),
                                               ("reverse_diffusion", "ald", 2), ("ancestral_sampling", "langevin", 1)])
def test_pc_nfe_is_the_number_of_score_evaluations(pred, corr, n_steps):
    sde = make_sde("vesde", 6)
    calls = []
    sampler = sampling.get_score_pc_sampler(sde, _counting(GAUSS.score_fn(sde), calls), (3, 2),
                                            sampling.get_predictor(pred), sampling.get_corrector(corr),
                                            n_steps=n_steps)
    samples, nfe = sampler(jax.random.PRNGKey(0))
    jax.block_until_ready(samples)
    jax.effects_barrier()
    assert nfe == len(calls) == sde.N * (int(pred != "none") + n_steps * int(corr != "none"))


@pytest.mark.parametrize("solver", ["scipy", "jax"])
def test_ode_nfe_is_the_number_of_score_evaluations(solver):
    """The solve's evaluations plus the denoising step's one."""
    sde = make_sde("vesde")
    calls = []
    sampler = sampling.get_score_ode_sampler(sde, _counting(GAUSS.score_fn(sde), calls), (3, 2), denoise=True,
                                             rtol=1e-3, atol=1e-3, eps=1e-5, solver=solver)
    samples, nfe = sampler(jax.random.PRNGKey(0))
    jax.block_until_ready(samples)
    jax.effects_barrier()
    assert nfe == len(calls)


def test_probability_flow_pc_sampler_converges_to_the_exact_flow_map():
    """probability_flow=True with Euler–Maruyama: Euler steps of the ODE from the prior sample, no noise,
    so the samples approach the exact flow map T -> eps of Gaussian data at first order in 1/N."""
    shape, eps, key = (64, 2), 1e-5, jax.random.PRNGKey(3)
    errors = []
    for n in (100, 400):
        sde = make_sde("vpsde", n)
        z = sde.prior_sampling(jax.random.split(key)[1], shape)  # the sampler's own first split
        exact = GAUSS.flow_map(sde, z, jnp.full((shape[0],), sde.T), jnp.full((shape[0],), eps))
        x, _ = sampling.get_score_pc_sampler(sde, GAUSS.score_fn(sde), shape, sampling.EulerMaruyamaPredictor,
                                             None, probability_flow=True, denoise=False, eps=eps)(key)
        errors.append(float(jnp.abs(x - exact).max()))
    assert errors[1] < 1e-2, errors
    assert 3.0 < errors[0] / errors[1] < 5.0, errors  # first order: 4x finer, 4x smaller


def test_denoise_false_keeps_the_last_steps_noise():
    """Euler–Maruyama, no corrector: without denoising the sample is the last mean plus g(eps) sqrt(1/N) z,
    z drawn with the last predictor key (keys split by hand: prior, then corrector and predictor per step)."""
    sde, shape, eps, key = make_sde("vpsde", 8), (5, 2), 1e-3, jax.random.PRNGKey(4)
    make = lambda denoise: sampling.get_score_pc_sampler(  # noqa: E731
        sde, GAUSS.score_fn(sde), shape, sampling.EulerMaruyamaPredictor, None, denoise=denoise, eps=eps)
    noisy, denoised = make(False)(key)[0], make(True)(key)[0]
    rng = jax.random.split(key)[0]
    for _ in range(sde.N):
        rng, _ = jax.random.split(rng)
        rng, predictor_key = jax.random.split(rng)
    g = np.sqrt(0.1 + eps * (20.0 - 0.1))
    expected = g * np.sqrt(1.0 / sde.N) * np.asarray(jax.random.normal(predictor_key, shape), np.float64)
    assert_close_scaled(np.asarray(noisy) - np.asarray(denoised), expected, rtol=1e-4)


def test_configuration_errors_are_clear():
    sde = make_sde("subvpsde")
    score = exact_gaussian_score("subvpsde", sde)
    with pytest.raises(NotImplementedError, match="reverse_diffusion"):
        sampling.get_score_pc_sampler(sde, score, (2, 4, 4, 1), sampling.get_predictor("ancestral_sampling"), None)
    with pytest.raises(ValueError, match="probability_flow"):
        sampling.get_predictor("ancestral_sampling")(make_sde("vesde"), score, True)
    with pytest.raises(ValueError, match="ode_solver"):
        sampling.get_score_ode_sampler(sde, score, (2, 4, 4, 1), solver="euler")
    cfg = ml_collections.ConfigDict({"sampling": {"method": "ddpm_magic"}})
    with pytest.raises(ValueError, match="config.sampling.method='ddpm_magic' is unknown; use one of pc, ode, "):
        sampling.get_sampling_fn(cfg, sde, None, (2, 4, 4, 1), lambda x: x, 1e-3)
    with pytest.raises(ValueError, match="N=10"):
        sampling.get_score_ode_sampler(make_sde("vpsde", 10), score, (2, 4, 4, 1), denoise=True)


# --------------------------------------------------------------------------- exact math: Gaussian data

DATA_MEAN = np.array([0.5, -0.3])
DATA_COV = np.array([[0.5, 0.2], [0.2, 0.3]])
GAUSS = toy.Gaussian(DATA_MEAN, DATA_COV)


def _moment_error(x):
    """Largest absolute error of the sample mean and covariance against the data's."""
    x = np.asarray(x, np.float64)
    return max(np.abs(x.mean(0) - DATA_MEAN).max(), np.abs(np.cov(x.T) - DATA_COV).max())


def _mc_sigma(n):
    """Standard error of the mean / covariance entries for n samples (largest variance 0.5)."""
    return 0.5 * np.sqrt(2.0 / n)


def _gauss_samples(name, n_levels, pred, corr, n, key=0, n_steps=1, snr=0.16):
    sde = make_sde(name, n_levels)
    sampler = sampling.get_score_pc_sampler(sde, GAUSS.score_fn(sde), (n, 2), sampling.get_predictor(pred),
                                            sampling.get_corrector(corr), snr=snr, n_steps=n_steps, eps=EPS[name])
    return sampler(jax.random.PRNGKey(key))[0]


def _combos(name):
    preds = ["euler_maruyama", "reverse_diffusion", "none"] + ([] if name == "subvpsde" else ["ancestral_sampling"])
    return [(p, c) for p in preds for c in ("none", "langevin", "ald") if (p, c) != ("none", "none")]


@pytest.mark.parametrize("name", SDE_NAMES)
def test_every_predictor_corrector_pair_samples_the_data_moments(name):
    """Exact score of N(mean, cov) data: sample moments within 4 MC sigma (0.045 here) + 1/N = 0.055.

    At N = 100 the discretisation bias is mostly below the Monte Carlo noise of 4000 samples; the largest
    error measured, 0.047 (VE ancestral sampling without corrector: 100 geometric noise levels from 50 down
    to 0.01), is the reason for the 1/N. test_moment_error_shrinks_as_n_grows checks the bias itself.

    Corrector-only samplers take 5 Langevin steps on each of 2N levels (with fewer, the chain lags
    behind the shrinking noise levels: annealed Langevin needs many steps, as in NCSN).
    ALD alone on sub-VP is left out: its step size scales with the kernel variance (1 - a²)², which is
    far below the data variance for t < 0.3, so the chain freezes before t reaches 0 (an algorithm
    property, not a discretisation error); sub-VP's ALD is covered with a predictor.
    """
    n, n_levels = 4000, 100
    errors = {}
    for pred, corr in _combos(name):
        if name == "subvpsde" and (pred, corr) == ("none", "ald"):
            continue
        if pred == "none":
            x = _gauss_samples(name, 2 * n_levels, pred, corr, n, n_steps=5, snr=0.3 if corr == "ald" else 0.16)
        else:
            x = _gauss_samples(name, n_levels, pred, corr, n)
        errors[(pred, corr)] = _moment_error(x)
    tol = 4 * _mc_sigma(n) + 1.0 / n_levels
    bad = {k: round(v, 4) for k, v in errors.items() if not v < tol}
    assert not bad, f"moment errors above {tol:.3f}: {bad}"


@pytest.mark.parametrize("name,pred,corr", [("vpsde", "reverse_diffusion", "none"),
                                            ("subvpsde", "euler_maruyama", "none"),
                                            ("vesde", "reverse_diffusion", "none"),
                                            ("vpsde", "none", "langevin")])
def test_moment_error_shrinks_as_n_grows(name, pred, corr):
    n = 20000
    coarse = _moment_error(_gauss_samples(name, 25, pred, corr, n))
    fine = _moment_error(_gauss_samples(name, 400, pred, corr, n, key=1))
    assert coarse > 4 * _mc_sigma(n), "N=25 should show a discretisation error above MC noise"
    assert fine < 4 * _mc_sigma(n) + 2.0 / 400
    assert fine < coarse / 2


MIXTURE = toy.GaussianMixture([0.3, 0.7], [[-1.2, 0.4], [1.0, -0.3]], [0.3, 0.35])


@pytest.mark.parametrize("name", SDE_NAMES)
def test_mixture_weights_are_recovered(name):
    """2-D two-component mixture: the fraction of samples in each component is its weight (MC error)."""
    n = 8000
    sde = make_sde(name, 200)
    sampler = sampling.get_score_pc_sampler(sde, MIXTURE.score_fn(sde), (n, 2), sampling.get_predictor(
        "reverse_diffusion"), sampling.get_corrector("langevin"), snr=0.16, eps=EPS[name])
    x = sampler(jax.random.PRNGKey(5))[0]
    post = MIXTURE.log_posterior(sde, x, jnp.zeros(n))
    frac = float(jnp.mean(jnp.argmax(post, axis=1) == 1))
    assert abs(frac - 0.7) < 4 * np.sqrt(0.21 / n) + 0.01
    for k in range(2):
        xk = np.asarray(x)[np.asarray(jnp.argmax(post, axis=1)) == k]
        np.testing.assert_allclose(xk.mean(0), np.asarray(MIXTURE.components[k].mean_flat), atol=0.05)


# --------------------------------------------------------------------------- exact math: ODE flow map

FULL = toy.Gaussian(np.linspace(-0.5, 0.5, 8),
                    0.2 * np.eye(8) + 0.05 * np.ones((8, 8)) + np.diag(np.linspace(0.0, 0.3, 8)), event_shape=(2, 2, 2))


@pytest.mark.parametrize("name", SDE_NAMES)
def test_ode_sampler_follows_exact_flow_map(name):
    """Full-covariance Gaussian data: the flow map T -> eps is affine; both solvers land on it, with
    scipy's steps up to one RK45 step (6 evaluations)."""
    sde = make_sde(name)
    z = sde.prior_sampling(jax.random.PRNGKey(6), (6, 2, 2, 2))
    exact = FULL.flow_map(sde, z, jnp.full((6,), sde.T), jnp.full((6,), EPS[name]))
    nfes = {}
    for solver in ("scipy", "jax"):
        sampler = sampling.get_score_ode_sampler(sde, FULL.score_fn(sde), (6, 2, 2, 2), eps=EPS[name],
                                                 rtol=1e-5, atol=1e-5, solver=solver)
        x, nfes[solver] = sampler(jax.random.PRNGKey(0), z=z)
        err = float(jnp.abs(x - exact).max())
        assert err < 2e-4, (solver, err)
    assert abs(nfes["jax"] - nfes["scipy"]) <= 6, nfes


_TWO_DEVICE_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np
import sampling, sde_lib
from score_sde import parallel
assert jax.local_device_count() == 2
sde = sde_lib.VESDE(0.01, 50, 1000)
score = lambda x, t: -(x - 0.3) / (0.25 + sde.sigma(t)[:, None, None, None] ** 2)
corr = sampling.get_corrector("langevin")(sde, score, 0.16, 1)
xs = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4, 4, 1)) * jnp.asarray([1.0, 5.0])[:, None, None, None, None]
t = jnp.full((2, 3), 0.5)
keys = jax.random.split(jax.random.PRNGKey(2), 2)
x_p, mean_p = parallel.pmap(corr.update_fn)(keys, xs, t)
# By hand: the step size uses the norms averaged over both devices' batches.
noise = [jax.random.normal(jax.random.split(k)[1], xs.shape[1:]) for k in keys]
norm = lambda v: jnp.linalg.norm(v.reshape(v.shape[0], -1), axis=-1).mean()
grad = [score(xs[i], t[i]) for i in range(2)]
step = (0.16 * (norm(noise[0]) + norm(noise[1])) / (norm(grad[0]) + norm(grad[1]))) ** 2 * 2
for i in range(2):
    np.testing.assert_allclose(np.asarray(mean_p[i]), np.asarray(xs[i] + step * grad[i]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(x_p[i]), np.asarray(xs[i] + step * grad[i] + noise[i] * jnp.sqrt(2 * step)),
                               rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_corrector_averages_step_size_over_devices():
    """Under pmap the Langevin step size uses norms averaged over the 'batch' device axis (2 CPU devices)."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", _TWO_DEVICE_SCRIPT], cwd=root, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
