"""digits-FD: a Fréchet distance for 8×8 digits in the feature space of a small digits classifier.

The CPU-scale analogue of FID for the embedded digits (``config.data.dataset = 'DIGITS'``). It is
*not* FID: the features come from :class:`DigitsClassifier`, a ~22k-parameter CNN trained once by
``scripts/train_digits_classifier.py`` on the training split of the digits and shipped in
``score_sde/assets/digits_classifier.npz`` (its test accuracy and training settings in
``score_sde/assets/digits_classifier.json``), not from Inception. Numbers are comparable only with
other digits-FD numbers computed with the same shipped weights.

Features are the classifier's penultimate layer (:data:`FEATURE_DIM` ReLU units); the distance
between the Gaussians fitted to two feature sets is :func:`score_sde.metrics.frechet_distance`.

Images everywhere are ``(N, 8, 8, 1)`` (or ``(N, 8, 8)``) floats in ``[0, 1]``, the data range of
``datasets.get_dataset`` before scaling (samplers' outputs after the inverse scaler).
"""
from __future__ import annotations

import functools
import importlib.resources
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from score_sde import metrics

FEATURE_DIM = 32
NUM_CLASSES = 10
WEIGHTS_FILE = "digits_classifier.npz"
METADATA_FILE = "digits_classifier.json"
TRAINING_SCRIPT = "scripts/train_digits_classifier.py"
_FEATURE_BATCH = 1024


class DigitsClassifier(nn.Module):
    """Two 3×3 convolutions, 2×2 average pooling, a ReLU layer of ``FEATURE_DIM`` units, 10 logits.

    ``__call__(x)`` takes images ``(N, 8, 8, 1)`` in ``[0, 1]`` and returns ``(logits (N, 10),
    features (N, FEATURE_DIM))``.
    """

    @nn.compact
    def __call__(self, x):
        x = 2.0 * x - 1.0  # centred input: the same weights whatever the caller's data scaler
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        features = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape((x.shape[0], -1))))
        return nn.Dense(NUM_CLASSES)(features), features


class MissingWeightsError(FileNotFoundError):
    """The shipped classifier weights are not in the package; the message names the script that makes them."""


def _asset(name: str):
    return importlib.resources.files("score_sde").joinpath("assets", name)


def params_to_arrays(params) -> dict[str, np.ndarray]:
    """Flax parameters as ``{'Conv_0/kernel': array, ...}``, the layout of the weights file."""
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def arrays_to_params(arrays) -> dict:
    """Inverse of :func:`params_to_arrays`."""
    return traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in arrays.items()})


@functools.lru_cache(maxsize=1)
def load_params() -> dict:
    """The shipped classifier parameters (``score_sde/assets/digits_classifier.npz``).

    Raises:
        MissingWeightsError: the file is missing; it says how to make it.
    """
    weights = _asset(WEIGHTS_FILE)
    if not weights.is_file():
        raise MissingWeightsError(f"score_sde/assets/{WEIGHTS_FILE} (the digits-FD classifier weights) is missing; "
                                  f"make it with `python {TRAINING_SCRIPT}` from the repository root.")
    with weights.open("rb") as f, np.load(f, allow_pickle=False) as arrays:
        return arrays_to_params(dict(arrays))


def load_metadata() -> dict:
    """The shipped weights' metadata (``digits_classifier.json``): test accuracy, seed, steps, command, ..."""
    meta = _asset(METADATA_FILE)
    if not meta.is_file():
        raise MissingWeightsError(f"score_sde/assets/{METADATA_FILE} (the digits-FD classifier metadata) is missing; "
                                  f"make it with `python {TRAINING_SCRIPT}` from the repository root.")
    return json.loads(meta.read_text())


@jax.jit
def _apply(params, images):
    return DigitsClassifier().apply({"params": params}, images)


def _check_images(name: str, images) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1:] != (8, 8, 1):
        raise ValueError(f"{name} must be digits images (N, 8, 8, 1) or (N, 8, 8) in [0, 1]; got shape {images.shape}.")
    return images


def classify(images, params=None) -> tuple[np.ndarray, np.ndarray]:
    """``(logits (N, 10), features (N, FEATURE_DIM))`` of images ``(N, 8, 8[, 1])`` in ``[0, 1]``.

    ``params`` defaults to the shipped weights (:func:`load_params`).
    """
    images = _check_images("images", images)
    params = load_params() if params is None else params
    logits, features = [], []
    for start in range(0, images.shape[0], _FEATURE_BATCH):
        lo, fe = _apply(params, images[start:start + _FEATURE_BATCH])
        logits.append(np.asarray(lo))
        features.append(np.asarray(fe))
    return np.concatenate(logits), np.concatenate(features)


def features(images, params=None) -> np.ndarray:
    """Penultimate-layer features ``(N, FEATURE_DIM)`` float64 of images ``(N, 8, 8[, 1])`` in ``[0, 1]``."""
    return classify(images, params)[1].astype(np.float64)


def digits_fd_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """digits-FD between two feature sets ``(N >= 2, D)``, ``(M >= 2, D)`` (Gaussians fitted to each)."""
    return metrics.frechet_classifier_distance_from_activations(features_a, features_b)


def digits_fd(images_a, images_b, params=None) -> float:
    """digits-FD between two sets of digits images ``(N >= 2, 8, 8[, 1])`` in ``[0, 1]``."""
    return digits_fd_from_features(features(images_a, params), features(images_b, params))


def centred_interval(estimate: float, boot: np.ndarray) -> tuple[float, float]:
    """95 % interval: ``estimate`` plus the 2.5 and 97.5 percentiles of ``boot`` minus its median.

    Resampling with replacement repeats samples, which inflates a Fréchet distance (at 100 samples in
    32 dimensions by more than its spread), so the bootstrap is used for the spread only.
    """
    q_lo, q_mid, q_hi = np.percentile(boot, [2.5, 50, 97.5])
    return float(estimate + q_lo - q_mid), float(estimate + q_hi - q_mid)


def bootstrap_fd(feats, test_feats, rs, n: int, test_idx=None):
    """``(fd, lo, hi, resampled fds)``: digits-FD and its 95 % interval (:func:`centred_interval`), ``n`` resamples.

    ``feats`` ``(N, D)``, ``test_feats`` ``(M, D)``; ``rs`` a ``numpy.random.RandomState`` drawing the
    resamples of ``feats``; ``test_idx`` ``(n, M)`` resample indices of ``test_feats`` (shared by
    several calls, their resampled distances are paired; drawn from ``rs`` if None).
    """
    fd = digits_fd_from_features(feats, test_feats)
    if test_idx is None:
        test_idx = rs.randint(0, len(test_feats), (n, len(test_feats)))
    idx = rs.randint(0, len(feats), (n, len(feats)))
    boot = np.array([digits_fd_from_features(feats[i], test_feats[j]) for i, j in zip(idx, test_idx)])
    return (fd, *centred_interval(fd, boot), boot)
