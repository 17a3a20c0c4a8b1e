"""digits-FD: the shipped classifier reaches its stated accuracy, and the distance ranks data above noise."""
import hashlib
import pathlib

import numpy as np
import pytest

from score_sde import datasets, digits_fd


@pytest.fixture(scope="module")
def splits():
    """``(train images, train labels, test images, test labels)`` as get_dataset splits the digits, in [0, 1]."""
    images, labels = datasets.load_digits()
    images = images.astype(np.float32) / 255.0
    n_train = len(labels) - datasets.DIGITS_NUM_EVAL
    return images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]


def test_shipped_weights_match_their_metadata():
    meta = digits_fd.load_metadata()
    weights = pathlib.Path(digits_fd.__file__).parent / "assets" / digits_fd.WEIGHTS_FILE
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == meta["sha256"]
    assert meta["feature_dim"] == digits_fd.FEATURE_DIM
    assert meta["test_size"] == datasets.DIGITS_NUM_EVAL


def test_shipped_weights_reach_the_stated_test_accuracy(splits):
    """Recomputed on the test split: the metadata's accuracy to within one image (float round-off across
    platforms may flip one borderline digit), and it is a real classifier (>= 95 %)."""
    _, _, x_test, y_test = splits
    meta = digits_fd.load_metadata()
    logits, feats = digits_fd.classify(x_test)
    correct = int(np.sum(np.argmax(logits, axis=1) == y_test))
    assert abs(correct - meta["test_correct"]) <= 1, f"{correct} correct, metadata says {meta['test_correct']}"
    assert correct / len(y_test) >= 0.95
    # the features are the penultimate layer: the last Dense maps them to the logits
    params = digits_fd.load_params()
    last = params["Dense_1"]
    assert feats.shape == (len(y_test), digits_fd.FEATURE_DIM)
    np.testing.assert_allclose(digits_fd.features(x_test) @ np.asarray(last["kernel"], np.float64)
                               + np.asarray(last["bias"]), logits, rtol=1e-4, atol=1e-4)


def test_digits_fd_from_features_is_the_frechet_distance():
    """Closed forms: a shift c adds |c|² and nothing else; doubling the features adds |μ|² + tr(C)."""
    rs = np.random.RandomState(0)
    f = rs.randn(400, 5) @ rs.randn(5, 5) + rs.randn(5)
    c = rs.randn(5)
    assert digits_fd.digits_fd_from_features(f, f + c) == pytest.approx(np.sum(c ** 2), rel=1e-6)
    expected = np.sum(f.mean(0) ** 2) + np.trace(np.cov(f.T))
    assert digits_fd.digits_fd_from_features(f, 2 * f) == pytest.approx(expected, rel=1e-6)


def test_digits_fd_is_zero_for_identical_sets(splits):
    _, _, x_test, _ = splits
    scale = np.trace(np.cov(digits_fd.features(x_test).T))
    assert abs(digits_fd.digits_fd(x_test, x_test)) < 1e-6 * scale


def test_digits_fd_ranks_held_out_digits_far_above_noise_and_partial_data(splits):
    """Test vs train (the finite-sample floor) is several times smaller than a set that lacks half the classes,
    and more than ten times smaller than uniform noise; the distance is symmetric."""
    x_train, y_train, x_test, _ = splits
    rs = np.random.RandomState(0)
    held_out = digits_fd.digits_fd(x_test, x_train)
    noise = digits_fd.digits_fd(rs.rand(*x_test.shape), x_train)
    half_the_classes = digits_fd.digits_fd(x_train[y_train < 5][:len(x_test)], x_train)
    assert held_out < noise / 10, (held_out, noise)
    assert held_out < half_the_classes / 3, (held_out, half_the_classes)
    assert digits_fd.digits_fd(x_train, x_test) == pytest.approx(held_out, rel=1e-6)


def test_bad_image_shape_is_refused():
    with pytest.raises(ValueError, match=r"\(N, 8, 8, 1\)"):
        digits_fd.features(np.zeros((4, 28, 28, 1)))


def test_missing_weights_name_the_training_script(monkeypatch, tmp_path):
    monkeypatch.setattr(digits_fd, "_asset", lambda name: tmp_path / name)
    digits_fd.load_params.cache_clear()
    try:
        with pytest.raises(digits_fd.MissingWeightsError, match="scripts/train_digits_classifier.py"):
            digits_fd.features(np.zeros((2, 8, 8, 1)))
        with pytest.raises(digits_fd.MissingWeightsError, match="scripts/train_digits_classifier.py"):
            digits_fd.load_metadata()
    finally:
        digits_fd.load_params.cache_clear()
