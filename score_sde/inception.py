"""The feature networks of IS / FID / KID: the paper's Inception, a local SavedModel, a stand-in for tests.

Features come from the network the original used (TF-Hub's tfgan Inception: ``pool_3``
2048-d activations and ``logits``; Inception-v3's 2048-d feature vector for images of
256 px and more). The network is a parameter everywhere (:class:`FeatureExtractor`), so that
tests and offline runs can use a small stand-in network; numbers computed from features that
are not the 2048-d Inception ones are labelled ``"(stand-in features)"`` and never called FID
(:func:`metric_names`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

import numpy as np
import tensorflow as tf

from score_sde.datasets import DatasetUnavailableError

INCEPTION_TFHUB = "https://tfhub.dev/tensorflow/tfgan/eval/inception/1"
INCEPTION_V3_TFHUB = "https://tfhub.dev/google/imagenet/inception_v3/feature_vector/4"
INCEPTION_OUTPUT = "logits"
INCEPTION_FINAL_POOL = "pool_3"
INCEPTION_FEATURE_DIM = 2048
STAND_IN_SUFFIX = " (stand-in features)"


class InceptionUnavailableError(DatasetUnavailableError):
    """The Inception network cannot be loaded; the message says how to supply it.

    A :class:`~score_sde.datasets.DatasetUnavailableError` (a needed file is not on this
    machine), so ``main.py`` prints the message instead of a traceback.
    """


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """A feature network for IS / FID / KID.

    Attributes:
        model: callable taking float32 images ``(N, H, W, 3)`` (scaled as ``inceptionv3``
            says) and returning a dict with ``'pool_3'`` ``(N, D)`` and optionally
            ``'logits'`` ``(N, K)``, or a single ``(N, D)`` feature tensor.
        name: where it came from (TF-Hub URL or local path); stored with statistics.
        inceptionv3: inputs in ``[0, 1]`` (Inception-v3 feature vector) instead of ``[-1, 1]``.
        is_inception: the caller vouches that this is the Inception network of the paper;
            metrics are then named IS / FID / KID (if the features are also 2048-d).
        input_size: fixed spatial size the model needs; inputs of another size are resized
            bilinearly as tfgan's ``preprocess_image`` did. ``None``: the model takes any size
            (TF-Hub's tfgan Inception resizes to 299 internally).
    """

    model: Callable[[Any], Any]
    name: str
    inceptionv3: bool = False
    is_inception: bool = False
    input_size: tuple[int, int] | None = None


def _missing_inception_message(url: str, reason: str) -> str:
    return (
        f"Sample-quality metrics need the Inception network ({url}), but {reason}. Either install "
        "tensorflow_hub on a machine with internet access, or download "
        f"{url}?tf-hub-format=compressed, unpack it (tar -xzf) into a folder and pass that folder as "
        "--config.eval.inception_path=/path/to/folder. To evaluate without sample metrics set "
        "--config.eval.enable_sampling=False.")


def _fixed_input_size(model: Any) -> tuple[int, int] | None:
    """The (H, W) a loaded SavedModel's ``__call__`` requires, or None if it takes any size."""
    call = getattr(model, "__call__", None)
    concrete = getattr(call, "concrete_functions", None)
    if not concrete:
        return None
    args, _ = concrete[0].structured_input_signature
    if not args or not hasattr(args[0], "shape") or args[0].shape.rank != 4:
        return None
    height, width = args[0].shape[1], args[0].shape[2]
    return (int(height), int(width)) if height is not None and width is not None else None


def load_saved_model_extractor(path: str, inceptionv3: bool = False, is_inception: bool = True) -> FeatureExtractor:
    """A :class:`FeatureExtractor` from a local TF2 SavedModel directory (works offline)."""
    if not tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        raise InceptionUnavailableError(
            f"config.eval.inception_path={path!r} is not a SavedModel directory (no saved_model.pb there). "
            + _missing_inception_message(INCEPTION_V3_TFHUB if inceptionv3 else INCEPTION_TFHUB,
                                         "the given path does not hold it"))
    model = tf.saved_model.load(path)
    return FeatureExtractor(model=model, name=os.path.abspath(path), inceptionv3=inceptionv3,
                            is_inception=is_inception, input_size=_fixed_input_size(model))


def save_stand_in_extractor(path: str, feature_dim: int = 16, num_classes: int = 10, seed: int = 0) -> None:
    """Write a tiny fixed random network with the Inception module's interface as a SavedModel.

    For tests and offline smoke runs only: ``pool_3 = tanh(area-pool(x, 4×4) · W)`` (``feature_dim``)
    and ``logits = 4 · pool_3 · V`` (``num_classes``), any input size. Load it with
    ``config.eval.inception_path``; its numbers are reported as "(stand-in features)".
    """
    rng = np.random.default_rng(seed)
    proj = (rng.normal(size=(4 * 4 * 3, feature_dim)) / np.sqrt(48.0)).astype(np.float32)
    head = rng.normal(size=(feature_dim, num_classes)).astype(np.float32)

    class StandIn(tf.Module):
        def __init__(self):
            super().__init__()
            self.proj = tf.Variable(proj, trainable=False)
            self.head = tf.Variable(head, trainable=False)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            pooled = tf.reshape(tf.image.resize(images, [4, 4], method="area"), [-1, 48])
            pool_3 = tf.tanh(pooled @ self.proj)
            return {INCEPTION_FINAL_POOL: pool_3, INCEPTION_OUTPUT: 4.0 * pool_3 @ self.head}

    tf.saved_model.save(StandIn(), path)


def get_inception_model(inceptionv3: bool = False, inception_path: str | None = None) -> FeatureExtractor:
    """Load the Inception network used for IS / FID / KID.

    Args:
        inceptionv3: use Inception-v3's feature vector (the original's choice for images of
            256 px and more) instead of tfgan's Inception (pool_3 + logits).
        inception_path: a local SavedModel directory (e.g. the unpacked TF-Hub module); when
            ``None`` the module is loaded from TF-Hub with ``tensorflow_hub``.

    Raises:
        InceptionUnavailableError: the module cannot be loaded; the message says how to supply it.
    """
    if inception_path:
        return load_saved_model_extractor(inception_path, inceptionv3=inceptionv3, is_inception=True)
    url = INCEPTION_V3_TFHUB if inceptionv3 else INCEPTION_TFHUB
    try:
        # Lazy: an optional dependency (absent offline); its absence is reported, not an import error.
        import tensorflow_hub as hub  # noqa: PLC0415
    except ImportError:
        raise InceptionUnavailableError(_missing_inception_message(url, "tensorflow_hub is not installed")) from None
    try:
        model = hub.load(url)
    except Exception as err:  # hub raises many types (URLError, OSError, tf errors); all mean "not available"
        raise InceptionUnavailableError(_missing_inception_message(url, f"loading it failed ({err})")) from err
    return FeatureExtractor(model=model, name=url, inceptionv3=inceptionv3, is_inception=True)


def load_feature_extractor(config) -> FeatureExtractor:
    """The feature network ``config`` asks for (``config.eval.inception_path`` or TF-Hub).

    Inception-v3 is used for ``config.data.image_size >= 256`` as in the original.
    """
    path = config.eval.get("inception_path", None)
    return get_inception_model(inceptionv3=config.data.image_size >= 256, inception_path=path)


def run_inception(images: np.ndarray, extractor: FeatureExtractor, batch_size: int = 500) -> dict:
    """Inception features of uint8 images.

    Inputs are prepared as the original did: ``(x - 127.5) / 127.5`` for tfgan's Inception
    (``x / 255`` for Inception-v3), grayscale repeated to 3 channels, and, only when the
    model needs a fixed size (:attr:`FeatureExtractor.input_size`), resized bilinearly.

    Args:
        images: ``(N, H, W, C)`` uint8 (or float in ``[0, 255]``), C in {1, 3}.
        extractor: the feature network.
        batch_size: images per call of the network (memory only; results do not depend on it).

    Returns:
        ``{'pool_3': (N, D) float32, 'logits': (N, K) float32 or None}``.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"run_inception expects images of shape (N, H, W, 1 or 3); got {images.shape}.")
    pools, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        x = tf.cast(tf.convert_to_tensor(images[start:start + batch_size]), tf.float32)
        x = x / 255.0 if extractor.inceptionv3 else (x - 127.5) / 127.5
        if x.shape[-1] == 1:
            x = tf.repeat(x, 3, axis=-1)
        if extractor.input_size is not None and tuple(x.shape[1:3]) != tuple(extractor.input_size):
            x = tf.compat.v1.image.resize_bilinear(x, list(extractor.input_size))
        out = extractor.model(x)
        if isinstance(out, Mapping):
            pool = out[INCEPTION_FINAL_POOL]
            logit = out.get(INCEPTION_OUTPUT)
        else:
            pool, logit = out, None
        pools.append(np.asarray(pool, np.float32).reshape(x.shape[0], -1))
        if logit is not None:
            logits.append(np.asarray(logit, np.float32).reshape(x.shape[0], -1))
    return {"pool_3": np.concatenate(pools, axis=0),
            "logits": np.concatenate(logits, axis=0) if logits else None}


def metric_names(extractor_is_inception: bool, feature_dim: int) -> dict:
    """Display names for IS / FID / KID: the plain names only for the 2048-d Inception features."""
    real = extractor_is_inception and feature_dim == INCEPTION_FEATURE_DIM
    suffix = "" if real else STAND_IN_SUFFIX
    return {"IS": "IS" + suffix, "fid": "FID" + suffix, "kid": "KID" + suffix}
