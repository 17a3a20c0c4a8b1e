"""IS / FID / KID against closed forms, feature extraction with a stand-in network, statistics files."""
import ml_collections
import numpy as np
import pytest
import scipy.linalg

from score_sde import eval_records, inception, metrics


def _random_spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


# ---------------------------------------------------------------- Inception Score

def test_is_uniform_logits_is_one():
    assert metrics.classifier_score_from_logits(np.zeros((50, 10))) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("num_classes", [2, 7, 10])
def test_is_confident_distinct_classes_is_class_count(num_classes):
    labels = np.tile(np.arange(num_classes), 5)
    logits = 60.0 * np.eye(num_classes)[labels]
    assert metrics.classifier_score_from_logits(logits) == pytest.approx(num_classes, rel=1e-9)


def test_is_finite_with_extreme_logits():
    logits = np.array([[2000.0, 0.0, -2000.0], [0.0, 2000.0, -2000.0]])  # class 2 underflows to probability 0
    assert metrics.classifier_score_from_logits(logits) == pytest.approx(2.0, rel=1e-12)


def test_is_matches_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 6)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    q = p.mean(0)
    expected = np.exp(np.mean(np.sum(p * np.log(p / q), axis=1)))
    assert metrics.classifier_score_from_logits(logits) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- FID

def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(1).normal(size=(300, 32))
    assert metrics.frechet_classifier_distance_from_activations(x, x) == pytest.approx(0.0, abs=1e-8)


def test_trace_sqrt_product_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    a, b = _random_spd(rng, 64), _random_spd(rng, 64, scale=3.0)
    expected = np.trace(scipy.linalg.sqrtm(a @ b)).real
    assert metrics.trace_sqrt_product(a, b) == pytest.approx(expected, rel=1e-9)


def test_fid_of_samples_approaches_gaussian_closed_form():
    rng = np.random.default_rng(3)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d, scale=2.0)
    root1 = scipy.linalg.sqrtm(s1).real
    closed = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
              - 2 * np.trace(scipy.linalg.sqrtm(root1 @ s2 @ root1).real))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-9)
    errors = []
    for n in (2_000, 200_000):
        x = rng.multivariate_normal(mu1, s1, size=n)
        y = rng.multivariate_normal(mu2, s2, size=n)
        errors.append(abs(metrics.frechet_classifier_distance_from_activations(x, y) - closed))
    assert errors[1] < 0.02 * closed
    assert errors[1] < errors[0]


def test_gaussian_statistics_unbiased():
    x = np.random.default_rng(4).normal(size=(20, 3))
    mu, sigma = metrics.gaussian_statistics(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False))


# ---------------------------------------------------------------- KID

def _kid_brute_force(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * k(x, y).mean())


def test_kid_single_block_equals_unbiased_mmd():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(30, 5)), rng.normal(0.5, 1.0, size=(41, 5))
    kid, std = metrics.kernel_classifier_distance_and_std_from_activations(x, y)
    assert kid == pytest.approx(_kid_brute_force(x, y), rel=1e-12)
    assert np.isnan(std)


def test_kid_blocks_average_unbiased_blocks():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(25, 4)), rng.normal(size=(23, 4)) + 1
    kid, std = metrics.kernel_classifier_distance_and_std_from_activations(x, y, max_block_size=10)
    # 3 blocks; sizes differ by at most one, larger blocks last (tfgan's split).
    blocks = [_kid_brute_force(x[a:b], y[c:e]) for (a, b), (c, e) in
              zip([(0, 8), (8, 16), (16, 25)], [(0, 7), (7, 15), (15, 23)])]
    assert kid == pytest.approx(np.mean(blocks), rel=1e-12)
    assert std == pytest.approx(np.std(blocks, ddof=1) / np.sqrt(3), rel=1e-9)


def test_kid_is_unbiased_for_one_distribution():
    """Mean over many independent pairs is 0 within its standard error; the V-statistic is clearly positive."""
    rng = np.random.default_rng(7)
    kids, biased = [], []
    for _ in range(60):
        x, y = rng.normal(size=(60, 8)), rng.normal(size=(60, 8))
        kids.append(metrics.kernel_classifier_distance_from_activations(x, y))
        d = 8
        k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
        biased.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    kids = np.asarray(kids)
    sem = kids.std(ddof=1) / np.sqrt(len(kids))
    assert abs(kids.mean()) < 3 * sem
    assert np.mean(biased) > 10 * sem
    shifted = metrics.kernel_classifier_distance_from_activations(rng.normal(size=(60, 8)),
                                                                     rng.normal(1.0, 1.0, size=(60, 8)))
    assert shifted > 10 * sem


# ---------------------------------------------------------------- names, stats files, features

def test_metric_names_never_fid_for_stand_in():
    assert inception.metric_names(True, 2048)["fid"] == "FID"
    assert inception.metric_names(True, 16)["fid"] == "FID (stand-in features)"
    assert inception.metric_names(False, 2048)["kid"] == "KID (stand-in features)"


def _config(tmp_path, dataset="CIFAR10"):
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict({"dataset": dataset, "image_size": 32, "category": "church_outdoor"})
    config.eval = ml_collections.ConfigDict({"stats_dir": str(tmp_path / "stats"), "inception_path": None})
    return config


def test_stats_round_trip(tmp_path):
    config = _config(tmp_path)
    path = eval_records.dataset_stats_path(config)
    assert path.endswith("stats/cifar10_stats.npz")
    pools = np.random.default_rng(8).normal(size=(50, 12)).astype(np.float32)
    eval_records.save_dataset_stats(path, pools, extractor_name="stand-in")
    stats = eval_records.load_dataset_stats(config)
    np.testing.assert_array_equal(stats["pool_3"], pools)
    np.testing.assert_allclose(stats["mu"], pools.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats["sigma"], np.cov(pools.astype(np.float64), rowvar=False), rtol=1e-6)
    assert stats["feature_extractor"] == "stand-in"
    lsun = _config(tmp_path, "LSUN")
    assert eval_records.stats_filename(lsun) == "lsun_church_outdoor_32_stats.npz"


def test_missing_stats_message(tmp_path):
    with pytest.raises(eval_records.StatsUnavailableError, match="--mode fid_stats"):
        eval_records.load_dataset_stats(_config(tmp_path))


def test_missing_inception_message(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(inception.InceptionUnavailableError, match="inception_path"):
        inception.load_feature_extractor(config)  # tensorflow_hub absent / offline
    config.eval.inception_path = str(tmp_path / "nowhere")
    with pytest.raises(inception.InceptionUnavailableError, match="nowhere"):
        inception.load_feature_extractor(config)


def test_stand_in_saved_model_features(tmp_path):
    path = str(tmp_path / "stand_in")
    inception.save_stand_in_extractor(path, feature_dim=16, num_classes=10)
    config = _config(tmp_path)
    config.eval.inception_path = path
    extractor = inception.load_feature_extractor(config)
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, size=(7, 8, 8, 3), dtype=np.uint8)
    out = inception.run_inception(images, extractor, batch_size=3)
    assert out["pool_3"].shape == (7, 16) and out["logits"].shape == (7, 10)
    # The same numbers as calling the network directly on (x - 127.5) / 127.5, in one batch.
    direct = extractor.model((images.astype(np.float32) - 127.5) / 127.5)
    np.testing.assert_allclose(out["pool_3"], direct["pool_3"].numpy(), rtol=1e-6, atol=1e-6)
    # Grayscale images are repeated to three channels.
    gray = images[..., :1]
    np.testing.assert_allclose(inception.run_inception(gray, extractor)["pool_3"],
                               inception.run_inception(np.repeat(gray, 3, -1), extractor)["pool_3"])
    names = inception.metric_names(extractor.is_inception, out["pool_3"].shape[1])
    assert names["fid"] == "FID (stand-in features)"


def test_fixed_size_model_gets_resized_inputs(tmp_path):
    import tensorflow as tf

    class Fixed(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 12, 12, 3], tf.float32)])
        def __call__(self, images):
            return {"pool_3": tf.reduce_mean(images, axis=[1, 2]), "logits": images[:, 0, 0, :]}

    path = str(tmp_path / "fixed")
    tf.saved_model.save(Fixed(), path)
    extractor = inception.load_saved_model_extractor(path, is_inception=False)
    assert extractor.input_size == (12, 12)
    images = np.full((2, 5, 5, 3), 255, np.uint8)
    np.testing.assert_allclose(inception.run_inception(images, extractor)["pool_3"], 1.0, rtol=1e-6)


# ---------------------------------------------------------------- bad input: one ValueError naming the input

def _features(n=20, d=4, seed=10):
    return np.random.default_rng(seed).normal(size=(n, d))


def _with(x, row, value):
    x = x.copy()
    x[row, 1] = value
    return x


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_fid_and_kid_refuse_non_finite_features(bad):
    real, gen = _features(), _features(seed=11)
    for fn in (metrics.frechet_classifier_distance_from_activations,
               metrics.kernel_classifier_distance_from_activations):
        with pytest.raises(ValueError, match=r"generated_activations holds NaN or infinite values in 1 of 20 rows"):
            fn(real, _with(gen, 3, bad))
        with pytest.raises(ValueError, match=r"real_activations holds NaN or infinite values in 1 of 20 rows"):
            fn(_with(real, 0, bad), gen)


def test_is_refuses_nan_logits():
    with pytest.raises(ValueError, match=r"logits holds NaN or infinite values in 1 of 20 rows"):
        metrics.classifier_score_from_logits(_with(_features(), 5, np.nan))


@pytest.mark.parametrize("fn, args, name", [
    (metrics.classifier_score_from_logits, (np.zeros((0, 10)),), "logits"),
    (metrics.frechet_classifier_distance_from_activations, (np.zeros((0, 4)), _features()), "real_activations"),
    (metrics.frechet_classifier_distance_from_activations, (_features(), np.zeros((0, 4))), "generated_activations"),
    (metrics.kernel_classifier_distance_from_activations, (np.zeros((0, 4)), _features()), "real_activations"),
    (metrics.kernel_classifier_distance_from_activations, (_features(), np.zeros((0, 4))), "generated_activations"),
    (metrics.kernel_classifier_distance_from_activations, (np.zeros((0, 4)), np.zeros((0, 4))), "real_activations"),
])
def test_empty_inputs_are_refused(fn, args, name):
    with pytest.raises(ValueError, match=rf"^{name} has shape \(0, "):
        fn(*args)


@pytest.mark.parametrize("size", [-5, 0, 1])
def test_kid_refuses_bad_block_size(size):
    with pytest.raises(ValueError, match=rf"max_block_size = {size}; it must be an integer >= 2"):
        metrics.kernel_classifier_distance_from_activations(_features(), _features(seed=11), max_block_size=size)


def test_fid_refuses_a_covariance_that_is_not_psd():
    """sigma1 = -I, sigma2 = I would give FID 0.0 (the clipped root of -I is 0); a covariance is never -I."""
    mu, eye = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match=r"sigma1 is not positive semi-definite \(smallest eigenvalue -1\)"):
        metrics.frechet_distance(mu, -eye, mu, eye)
    with pytest.raises(ValueError, match="sigma2 is not symmetric"):
        metrics.frechet_distance(mu, eye, mu, eye + np.triu(np.ones((3, 3)), 1))
    with pytest.raises(ValueError, match="mu2 holds NaN"):
        metrics.frechet_distance(mu, eye, np.array([0.0, np.nan, 0.0]), eye)


def test_fid_accepts_singular_covariances():
    """Fewer samples than feature dimensions (rank-deficient covariances, round-off eigenvalues < 0) are valid."""
    x = np.random.default_rng(12).normal(size=(20, 256)).astype(np.float32)
    trace = 2 * np.trace(np.cov(x.astype(np.float64), rowvar=False))  # the size of the terms that cancel
    assert metrics.frechet_classifier_distance_from_activations(x, x) == pytest.approx(0.0, abs=1e-6 * trace)
    y = np.random.default_rng(13).normal(size=(20, 256)).astype(np.float32)
    assert metrics.frechet_classifier_distance_from_activations(x, y) > 0
