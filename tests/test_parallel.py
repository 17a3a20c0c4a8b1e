"""score_sde.parallel: batch sharding, and averages over an explicitly declared device axis."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sampling
from score_sde import parallel
from tests.helpers import make_sde


def test_shard_splits_the_batch_in_order_and_unshard_inverts_it(monkeypatch):
    monkeypatch.setattr(parallel, "local_device_count", lambda: 4)
    batch = {"image": np.arange(8 * 3 * 2).reshape(8, 3, 2), "label": jnp.arange(8)}
    sharded = parallel.shard(batch)
    assert sharded["image"].shape == (4, 2, 3, 2) and sharded["label"].shape == (4, 2)
    for device in range(4):  # device d holds examples 2d and 2d + 1
        np.testing.assert_array_equal(sharded["image"][device], batch["image"][2 * device:2 * device + 2])
        np.testing.assert_array_equal(sharded["label"][device], [2 * device, 2 * device + 1])
    assert isinstance(sharded["label"], jax.Array)  # device arrays stay on the device
    merged = parallel.unshard(sharded)
    for key in batch:
        np.testing.assert_array_equal(merged[key], batch[key])


def test_shard_rejects_a_batch_that_does_not_split(monkeypatch):
    monkeypatch.setattr(parallel, "local_device_count", lambda: 4)
    with pytest.raises(ValueError, match="Batch of 6 examples does not split over 4 local devices"):
        parallel.shard({"image": np.zeros((6, 2))})


def test_mean_over_devices_only_over_the_declared_axis():
    x = jnp.arange(6.0).reshape(2, 3)
    mapped = jax.vmap(parallel.pmean_over_devices, axis_name="i")
    np.testing.assert_array_equal(mapped(x), x)  # nothing declared: no average, whatever axes are bound
    with parallel.device_axis("i"):
        np.testing.assert_array_equal(mapped(x), jnp.broadcast_to(x.mean(0), x.shape))
        # Fresh functions: a declaration acts when a function is traced, and jit keeps a function's first trace.
        with parallel.device_axis(None):
            np.testing.assert_array_equal(jax.jit(lambda v: parallel.pmean_over_devices(v))(x), x)
        with pytest.raises(NameError, match="unbound axis name: i"):  # declared but not bound: an error
            jax.jit(lambda v: parallel.pmean_over_devices(v))(x)
    np.testing.assert_array_equal(mapped(x), x)  # the declaration ends with its block


def test_pmap_declares_its_batch_axis():
    jaxpr = str(jax.make_jaxpr(parallel.pmap(parallel.pmean_over_devices))(jnp.ones((1, 3))))
    assert "psum" in jaxpr and "axes=('batch',)" in jaxpr, jaxpr


def test_langevin_corrector_averages_norms_over_the_declared_axis():
    """Two 'devices' (a named vmap axis) with batches of different norms: the step size uses the norms averaged
    over both, as the original under pmap, when the axis is declared; else each device's own."""
    sde = make_sde("vesde", 10)  # alpha = 1
    corrector = sampling.LangevinCorrector(sde, lambda x, t: -x, snr=0.16, n_steps=1)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 4, 1)) * jnp.array([1.0, 10.0])[:, None, None, None, None]
    t = jnp.full((2, 3), 0.5)
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    step = jax.vmap(corrector.update_fn, axis_name="devices")
    with parallel.device_axis("devices"):
        _, x_mean = step(keys, x, t)
    _, x_mean_per_device = step(keys, x, t)

    def mean_norm(v):  # per device: batch mean of the per-example norms
        return np.linalg.norm(np.asarray(v).reshape(2, 3, -1), axis=-1).mean(-1)

    noise = np.stack([np.asarray(jax.random.normal(jax.random.split(k)[1], x.shape[1:])) for k in keys])
    grad = -np.asarray(x)
    averaged = 2 * (0.16 * mean_norm(noise).mean() / mean_norm(grad).mean()) ** 2
    own = 2 * (0.16 * mean_norm(noise) / mean_norm(grad)) ** 2
    np.testing.assert_allclose(x_mean, np.asarray(x) + averaged * grad, rtol=1e-5)
    np.testing.assert_allclose(x_mean_per_device, np.asarray(x) + own[:, None, None, None, None] * grad, rtol=1e-5)
    assert not np.allclose(averaged, own, rtol=0.1)  # the two are told apart
