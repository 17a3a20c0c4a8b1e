"""score_sde.ode: both solvers against closed-form ODE solutions, both time directions."""
import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import likelihood
import sampling
from score_sde import ode, parallel


def _scalar_rate(t):
    """a(t) of dy/dt = a(t) y."""
    return -3.0 * t + jnp.cos(t)


def _scalar_rate_integral(t):
    """A(t) with A' = a."""
    return -1.5 * t ** 2 + np.sin(t)


def _linear_fn(t, y):
    return _scalar_rate(t) * y


Y0 = jnp.linspace(-2.0, 3.0, 50, dtype=jnp.float32).reshape(5, 10)


def _linear_exact(t0, t1):
    return np.asarray(Y0, np.float64) * np.exp(_scalar_rate_integral(t1) - _scalar_rate_integral(t0))


@pytest.mark.parametrize("t0,t1", [(0.0, 1.5), (1.5, 0.0)])
@pytest.mark.parametrize("method", ["RK45", "DOP853"])
def test_time_dependent_linear_ode_both_solvers(t0, t1, method):
    exact = _linear_exact(t0, t1)
    ys, nfe_s = ode.solve_scipy(_linear_fn, Y0, t0, t1, method=method, rtol=1e-5, atol=1e-5)
    yj, nfe_j = jax.jit(lambda y: ode.solve_jax(_linear_fn, y, t0, t1, method=method, rtol=1e-5, atol=1e-5))(Y0)
    assert ys.shape == Y0.shape and yj.shape == Y0.shape and yj.dtype == Y0.dtype
    tol = 1e-4 * (1.0 + np.abs(exact))
    np.testing.assert_array_less(np.abs(np.asarray(ys) - exact), tol)
    np.testing.assert_array_less(np.abs(np.asarray(yj) - exact), tol)
    # Same tableau, initial step and controller as scipy: the very same steps (the docstring's claim).
    assert isinstance(nfe_s, int) and int(nfe_j) == nfe_s


def test_rotation_pytree_state_and_tolerance_scaling():
    """y = (p, q) with dp/dt = q, dq/dt = -p: exact (cos, -sin); a pytree state."""
    fn = lambda t, y: {"p": y["q"], "q": -y["p"]}
    y0 = {"p": jnp.ones((3,)), "q": jnp.zeros((3,))}
    t1 = 4.0
    errors, nfes = [], []
    for tol in (1e-3, 1e-6):
        y1, nfe = jax.jit(lambda y: ode.solve_jax(fn, y, 0.0, t1, rtol=tol, atol=tol, method="dop853"))(y0)
        errors.append(max(abs(float(y1["p"][0]) - np.cos(t1)), abs(float(y1["q"][0]) + np.sin(t1))))
        nfes.append(int(nfe))
    assert errors[0] < 1e-2 and errors[1] < 2e-5 and errors[1] < errors[0] / 10
    assert nfes[1] > nfes[0]
    ys, _ = ode.solve_scipy(fn, y0, 0.0, t1, method="DOP853", rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(np.asarray(ys["p"]), np.cos(t1), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ys["q"]), -np.sin(t1), atol=1e-6)


def test_nfe_counts_fsal():
    """dy/dt = 0: every step is accepted with growth; nfe = 2 + n_stages * steps."""
    fn = lambda t, y: jnp.zeros_like(y)
    for method, stages in (("dopri5", 6), ("dop853", 12), ("bosh3", 3)):
        y1, nfe = ode.solve_jax(fn, jnp.ones((4,)), 0.0, 1.0, method=method)
        np.testing.assert_array_equal(np.asarray(y1), 1.0)
        assert (int(nfe) - 2) % stages == 0 and int(nfe) > 2


def test_solve_jax_under_pmap_matches_scipy_with_device_axis():
    """The JAX solve runs inside a pmapped function; scipy takes the device axis as part of the state."""
    n = parallel.local_device_count()
    y0 = jnp.broadcast_to(Y0, (n,) + Y0.shape)
    pfn = parallel.pmap(lambda y: ode.solve_jax(_linear_fn, y, 1.5, 0.0))
    yj, nfe_j = pfn(y0)
    ys, nfe_s = ode.solve_scipy(_linear_fn, y0, 1.5, 0.0)
    exact = _linear_exact(1.5, 0.0)
    np.testing.assert_allclose(np.asarray(yj[0]), exact, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ys[0]), exact, rtol=1e-4, atol=1e-4)
    assert nfe_j.shape == (n,)


def test_failure_is_nan_and_reported():
    y1, _ = ode.solve_jax(_linear_fn, Y0, 0.0, 1.5, max_steps=2)
    assert np.all(np.isnan(np.asarray(y1)))
    with pytest.raises(FloatingPointError, match="max_steps"):
        ode.check_finite(y1)


def test_unknown_solver_names_the_config_field_and_choices():
    with pytest.raises(ValueError, match=r"config\.sampling\.ode_solver.*'jax', 'scipy'"):
        ode.check_solver("torch")
    with pytest.raises(ValueError, match="dopri5"):
        ode.solve_jax(_linear_fn, Y0, 0.0, 1.0, method="Radau")


def test_one_default_solver_everywhere():
    """Samplers, likelihoods and every default config use ode.DEFAULT_SOLVER, the JAX solver; scipy is opt-in."""
    assert ode.DEFAULT_SOLVER == "jax"
    for fn in (sampling.get_ode_sampler, sampling.get_score_ode_sampler, likelihood.get_likelihood_fn,
               likelihood.get_likelihood_fn_from_score):
        assert inspect.signature(fn).parameters["solver"].default == ode.DEFAULT_SOLVER, fn.__name__
    for name in ("cifar10", "celeba", "lsun", "digits"):
        config = importlib.import_module(f"configs.default_{name}_configs").get_default_configs()
        assert config.sampling.ode_solver == ode.DEFAULT_SOLVER, name
