"""Sample-quality metrics: Inception features, Inception Score, FID and KID, dataset statistics.

Features come from the network the original used (TF-Hub's tfgan Inception: ``pool_3``
2048-d activations and ``logits``; Inception-v3's 2048-d feature vector for images of
256 px and more). The metrics are computed here with numpy/scipy in float64, following
``tensorflow_gan.eval`` (which no longer imports on current TensorFlow):

* Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` — :func:`classifier_score_from_logits`;
* FID ``|m - m_w|² + tr(C + C_w - 2 (C^½ C_w C^½)^½)`` with unbiased covariances —
  :func:`frechet_classifier_distance_from_activations`. The matrix square roots use
  symmetric eigendecompositions (``C^½ C_w C^½`` is symmetric PSD, so only its eigenvalues
  are needed), several times faster than ``scipy.linalg.sqrtm`` at 2048 dimensions;
* KID — the unbiased block estimator of the squared MMD with the polynomial kernel
  ``k(x, y) = (xᵀy / d + 1)³`` (blocks of at most 1024 as tfgan) —
  :func:`kernel_classifier_distance_from_activations`.

The feature extractor is a parameter everywhere (:class:`FeatureExtractor`), so that tests
and offline runs can use a small stand-in network; numbers computed from features that are
not the 2048-d Inception ones are labelled ``"(stand-in features)"`` and never called FID.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from typing import Any, Callable, Mapping

import numpy as np

from score_sde.datasets import DatasetUnavailableError

INCEPTION_TFHUB = "https://tfhub.dev/tensorflow/tfgan/eval/inception/1"
INCEPTION_V3_TFHUB = "https://tfhub.dev/google/imagenet/inception_v3/feature_vector/4"
INCEPTION_OUTPUT = "logits"
INCEPTION_FINAL_POOL = "pool_3"
INCEPTION_FEATURE_DIM = 2048
STAND_IN_SUFFIX = " (stand-in features)"
DEFAULT_STATS_DIR = os.path.join("assets", "stats")


class InceptionUnavailableError(DatasetUnavailableError):
    """The Inception network cannot be loaded; the message says how to supply it.

    A :class:`~score_sde.datasets.DatasetUnavailableError` (a needed file is not on this
    machine), so ``main.py`` prints the message instead of a traceback.
    """


class StatsUnavailableError(DatasetUnavailableError):
    """The dataset statistics file for FID / KID is missing; the message says how to make it."""


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
    import tensorflow as tf

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
    import tensorflow as tf

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
        import tensorflow_hub as hub
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
    import tensorflow as tf

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


# ----------------------------------------------------------------------------------------
# Metrics (numpy / scipy, float64)
# ----------------------------------------------------------------------------------------

def classifier_score_from_logits(logits: np.ndarray) -> float:
    """Inception Score ``exp(mean_x KL(softmax(logits_x) || mean_x softmax(logits_x)))``.

    Args:
        logits: ``(N, K)``.
    """
    from scipy.special import log_softmax

    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (N, K); got shape {logits.shape}.")
    log_p = log_softmax(logits, axis=1)
    p = np.exp(log_p)
    with np.errstate(divide="ignore", invalid="ignore"):  # a class no image gives any probability: terms are 0
        log_q = np.log(p.mean(axis=0))
        kl = np.sum(np.where(p > 0, p * (log_p - log_q), 0.0), axis=1)
    return float(np.exp(kl.mean()))


def symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition.

    Tiny negative eigenvalues from round-off are clipped to 0.
    """
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def trace_sqrt_product(sigma: np.ndarray, sigma_w: np.ndarray) -> float:
    """``tr((sigma · sigma_w)^½)`` for symmetric PSD matrices.

    ``sigma·sigma_w`` has the eigenvalues of the symmetric PSD ``A·sigma_w·A`` with
    ``A = sigma^½``, so the trace is the sum of the square roots of those eigenvalues:
    one ``eigh`` for ``A`` and one ``eigvalsh``.
    """
    root = symmetric_sqrt(sigma)
    inner = root @ sigma_w @ root
    inner = 0.5 * (inner + inner.T)
    return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0.0, None))))


def gaussian_statistics(activations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (float64) of ``(N, D)`` activations."""
    activations = np.asarray(activations, np.float64)
    if activations.ndim != 2 or activations.shape[0] < 2:
        raise ValueError(f"activations must be (N >= 2, D); got shape {activations.shape}.")
    mu = activations.mean(axis=0)
    centered = activations - mu
    return mu, centered.T @ centered / (activations.shape[0] - 1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mean_term = float(np.sum(np.square(np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64))))
    trace_term = float(np.trace(sigma1) + np.trace(sigma2)) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return trace_term + mean_term


def frechet_classifier_distance_from_activations(real_activations: np.ndarray,
                                                 generated_activations: np.ndarray) -> float:
    """FID between the Gaussians fitted to two sets of activations ``(N, D)``, ``(M, D)``."""
    mu1, sigma1 = gaussian_statistics(real_activations)
    mu2, sigma2 = gaussian_statistics(generated_activations)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def kernel_classifier_distance_and_std_from_activations(real_activations: np.ndarray,
                                                        generated_activations: np.ndarray,
                                                        max_block_size: int = 1024) -> tuple[float, float]:
    """KID: unbiased squared MMD with kernel ``(xᵀy / D + 1)³``, averaged over blocks.

    Both sets are split into the same number of contiguous blocks (sizes differing by at
    most one, none over ``max_block_size``), as tfgan does; each block gives an unbiased
    estimate (diagonal terms of the within-set kernels left out).

    Returns:
        ``(kid, standard error)``; the error is NaN with a single block.
    """
    real = np.asarray(real_activations, np.float64)
    gen = np.asarray(generated_activations, np.float64)
    if real.ndim != 2 or gen.ndim != 2 or real.shape[1] != gen.shape[1]:
        raise ValueError(f"activations must be (N, D) and (M, D); got {real.shape} and {gen.shape}.")
    dim = real.shape[1]
    n_blocks = int(np.ceil(max(real.shape[0], gen.shape[0]) / max_block_size))

    def bounds(n: int) -> np.ndarray:
        base, extra = divmod(n, n_blocks)
        sizes = np.array([base] * (n_blocks - extra) + [base + 1] * extra)
        return np.concatenate([[0], np.cumsum(sizes)])

    inds_r, inds_g = bounds(real.shape[0]), bounds(gen.shape[0])
    estimates = []
    for i in range(n_blocks):
        r = real[inds_r[i]:inds_r[i + 1]]
        g = gen[inds_g[i]:inds_g[i + 1]]
        m, n = r.shape[0], g.shape[0]
        if m < 2 or n < 2:
            raise ValueError(f"KID needs at least 2 activations per block; got {m} and {n}.")
        k_rr = (r @ r.T / dim + 1.0) ** 3
        k_rg = (r @ g.T / dim + 1.0) ** 3
        k_gg = (g @ g.T / dim + 1.0) ** 3
        estimates.append(-2.0 * k_rg.mean()
                         + (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
                         + (k_gg.sum() - np.trace(k_gg)) / (n * (n - 1)))
    estimates = np.asarray(estimates)
    mean = float(estimates.mean())
    std = float(np.sqrt(estimates.var(ddof=1) / n_blocks)) if n_blocks > 1 else float("nan")
    return mean, std


def kernel_classifier_distance_from_activations(real_activations: np.ndarray, generated_activations: np.ndarray,
                                                max_block_size: int = 1024) -> float:
    """KID (see :func:`kernel_classifier_distance_and_std_from_activations`)."""
    return kernel_classifier_distance_and_std_from_activations(real_activations, generated_activations,
                                                               max_block_size)[0]


def metric_names(extractor_is_inception: bool, feature_dim: int) -> dict:
    """Display names for IS / FID / KID: the plain names only for the 2048-d Inception features."""
    real = extractor_is_inception and feature_dim == INCEPTION_FEATURE_DIM
    suffix = "" if real else STAND_IN_SUFFIX
    return {"IS": "IS" + suffix, "fid": "FID" + suffix, "kid": "KID" + suffix}


def compute_metrics(sample_pools: np.ndarray, sample_logits: np.ndarray | None, data_pools: np.ndarray) -> dict:
    """IS (NaN without logits), FID and KID of samples against dataset activations."""
    inception_score = (classifier_score_from_logits(sample_logits) if sample_logits is not None
                       else float("nan"))
    return {"IS": inception_score,
            "fid": frechet_classifier_distance_from_activations(data_pools, sample_pools),
            "kid": kernel_classifier_distance_from_activations(data_pools, sample_pools)}


# ----------------------------------------------------------------------------------------
# Dataset statistics files
# ----------------------------------------------------------------------------------------

def stats_filename(config) -> str:
    """``<dataset>_stats.npz`` with the original's names (CIFAR10, CELEBA, LSUN_<category>_<size>)."""
    dataset = config.data.dataset
    if dataset == "LSUN":
        return f"lsun_{config.data.category}_{config.data.image_size}_stats.npz"
    return f"{dataset.lower()}_stats.npz"


def dataset_stats_path(config) -> str:
    """Where the statistics of ``config.data`` live: ``config.eval.stats_dir`` (default ``assets/stats``)."""
    stats_dir = config.eval.get("stats_dir", None)
    return os.path.join(stats_dir or DEFAULT_STATS_DIR, stats_filename(config))


def save_dataset_stats(path: str, pool_3: np.ndarray, extractor_name: str, logits: np.ndarray | None = None) -> None:
    """Write a statistics file: ``pool_3`` (N, D), ``mu``, ``sigma``, the extractor's name, [``logits``]."""
    import tensorflow as tf

    pool_3 = np.asarray(pool_3, np.float32)
    mu, sigma = gaussian_statistics(pool_3)
    arrays = {"pool_3": pool_3, "mu": mu, "sigma": sigma, "feature_extractor": np.asarray(extractor_name)}
    if logits is not None:
        arrays["logits"] = np.asarray(logits, np.float32)
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "wb") as fout:
        fout.write(buffer.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)


def load_dataset_stats(config_or_path) -> dict:
    """Read a statistics file (a path, or the config whose :func:`dataset_stats_path` to read).

    Returns:
        dict of numpy arrays with at least ``pool_3``; ``feature_extractor`` is a str ('' if
        the file predates it, e.g. the original's released files).
    """
    import tensorflow as tf

    path = config_or_path if isinstance(config_or_path, str) else dataset_stats_path(config_or_path)
    if not tf.io.gfile.exists(path):
        raise StatsUnavailableError(
            f"Dataset statistics {path!r} not found. Compute them with `python main.py --config <config> "
            "--workdir <dir> --mode fid_stats`, or set config.eval.stats_dir to the folder holding them.")
    with tf.io.gfile.GFile(path, "rb") as fin:
        with np.load(io.BytesIO(fin.read()), allow_pickle=False) as data:
            stats = {key: data[key] for key in data.files}
    stats["feature_extractor"] = str(stats["feature_extractor"]) if "feature_extractor" in stats else ""
    return stats


def check_stats_extractor(stats: Mapping, extractor: FeatureExtractor, path: str, feature_dim: int) -> None:
    """Refuse statistics whose features cannot match the samples'; warn when they name another network.

    Raises:
        ValueError: the statistics' ``pool_3`` dimension differs from ``feature_dim``.
    """
    stats_dim = np.shape(stats["pool_3"])[1]
    if stats_dim != feature_dim:
        raise ValueError(f"Dataset statistics {path!r} hold {stats_dim}-d features but {extractor.name!r} gives "
                         f"{feature_dim}-d ones. Recompute them with --mode fid_stats using the same "
                         "config.eval.inception_path.")
    recorded = stats.get("feature_extractor", "")
    if recorded and recorded != extractor.name:
        logging.warning("Dataset statistics %s were computed with %s, the samples' features come from %s; "
                        "make sure both are the same network.", path, recorded, extractor.name)


def write_summary(path_prefix: str, summary: Mapping) -> None:
    """Write ``summary`` as ``<prefix>.json`` and a readable ``<prefix>.md`` table."""
    import tensorflow as tf

    with tf.io.gfile.GFile(path_prefix + ".json", "w") as fout:
        fout.write(json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n")
    lines = [f"# {summary.get('title', 'Evaluation')}", ""]
    for key, value in summary.items():
        if key in ("title", "checkpoints"):
            continue
        lines.append(f"- **{key}**: {value}")
    checkpoints = summary.get("checkpoints", {})
    if checkpoints:
        columns = list(dict.fromkeys(name for row in checkpoints.values() for name in row))
        lines += ["", "| checkpoint | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for ckpt, row in sorted(checkpoints.items(), key=lambda kv: int(kv[0])):
            cells = [_format(row.get(c)) for c in columns]
            lines.append(f"| {ckpt} | " + " | ".join(cells) + " |")
    with tf.io.gfile.GFile(path_prefix + ".md", "w") as fout:
        fout.write("\n".join(lines) + "\n")


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# ----------------------------------------------------------------------------------------
# The evaluation job's bookkeeping (used by run_lib.evaluate / run_lib.fid_stats)
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class EvalMeta:
    """Where a (possibly interrupted) evaluation stands, written after every round.

    Attributes:
        ckpt_id: the checkpoint being evaluated.
        loss_done: the eval-set loss of ``ckpt_id`` is written.
        bpd_rounds_done: bits/dim rounds written for ``ckpt_id``.
        sampling_rounds_done: sampling rounds written for ``ckpt_id`` (this host).
        metrics_done: IS / FID / KID of ``ckpt_id`` are written.
        rng: the raw PRNG key data (uint32 list) to continue with.
    """

    ckpt_id: int
    rng: list
    loss_done: bool = False
    bpd_rounds_done: int = 0
    sampling_rounds_done: int = 0
    metrics_done: bool = False

    def replace(self, **changes) -> "EvalMeta":
        return dataclasses.replace(self, **changes)


def eval_meta_path(eval_dir: str, host: int) -> str:
    return os.path.join(eval_dir, f"meta_{host}.json")


def save_eval_meta(eval_dir: str, host: int, meta: EvalMeta) -> None:
    """Write the meta atomically (temporary file, fsync, rename)."""
    path = eval_meta_path(eval_dir, host)
    tmp = path + ".tmp"
    with open(tmp, "w") as fout:
        json.dump(dataclasses.asdict(meta), fout)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, path)


def load_eval_meta(eval_dir: str, host: int) -> EvalMeta | None:
    """The saved meta of ``host``, or None when no evaluation was interrupted."""
    path = eval_meta_path(eval_dir, host)
    if not os.path.exists(path):
        return None
    with open(path) as fin:
        return EvalMeta(**json.load(fin))


def key_to_list(key) -> list:
    """Raw uint32 data of a JAX PRNG key (raw or typed) as a JSON-friendly list."""
    import jax

    data = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return [int(v) for v in np.asarray(data, np.uint32).reshape(-1)]


def write_npz(path: str, *args, **kwargs) -> None:
    """``np.savez_compressed`` to ``path`` atomically (readers never see a partial file)."""
    import tensorflow as tf

    buffer = io.BytesIO()
    np.savez_compressed(buffer, *args, **kwargs)
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "wb") as fout:
        fout.write(buffer.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)


def read_npz(path: str) -> dict:
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "rb") as fin:
        with np.load(io.BytesIO(fin.read()), allow_pickle=False) as data:
            return {key: data[key] for key in data.files}


def collect_images(ds) -> np.ndarray:
    """All images of a batched ``tf.data`` pipeline of ``{'image': (..., H, W, C)}`` as one ``(N, H, W, C)`` array.

    Values in ``[0, 1]`` that are exact multiples of 1/255 (undequantised, unresized data)
    come back as uint8 ``0..255``; anything else as float32 ``0..1``.
    """
    chunks = []
    for batch in ds.as_numpy_iterator():
        image = np.asarray(batch["image"])
        chunks.append(image.reshape((-1,) + image.shape[-3:]))
    if not chunks:
        raise ValueError("The dataset yielded no images.")
    images = np.concatenate(chunks, axis=0)
    as_uint8 = np.round(images * 255.0)
    if np.max(np.abs(as_uint8 / 255.0 - images)) < 1e-6:
        return as_uint8.astype(np.uint8)
    return images.astype(np.float32)


def canonical_order(images: np.ndarray) -> np.ndarray:
    """Sort images by a hash of their bytes: the same order however the pipeline shuffled them.

    Evaluation then sees the same batches in every run, so an interrupted evaluation resumes
    exactly where it stopped and gives the numbers of an uninterrupted one.
    """
    import hashlib

    digests = [hashlib.blake2b(np.ascontiguousarray(img).tobytes(), digest_size=16).digest() for img in images]
    order = sorted(range(len(digests)), key=digests.__getitem__)
    return images[np.asarray(order, dtype=np.int64)]


def to_unit_float(images: np.ndarray) -> np.ndarray:
    """uint8 ``0..255`` or float ``0..1`` images as float32 in ``[0, 1]``."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)


def dequantize(images: np.ndarray, seed: tuple) -> np.ndarray:
    """Uniform dequantisation ``(255 x + U[0, 1)) / 256`` with noise from ``numpy`` seeded by ``seed``."""
    x = to_unit_float(images)
    noise = np.random.default_rng(list(seed)).random(x.shape, dtype=np.float32)
    return (noise + x * 255.0) / 256.0


def summarize_checkpoint(eval_dir: str, ckpt: int, bpd_dataset: str, names: Mapping | None) -> dict:
    """What the files of checkpoint ``ckpt`` in ``eval_dir`` say: loss, bits/dim, IS / FID / KID."""
    import glob

    row: dict = {}
    loss_file = os.path.join(eval_dir, f"ckpt_{ckpt}_loss.npz")
    if os.path.exists(loss_file):
        row["eval loss"] = float(read_npz(loss_file)["mean_loss"])
    bpd_files = glob.glob(os.path.join(eval_dir, f"{bpd_dataset}_ckpt_{ckpt}_bpd_*.npz"))
    if bpd_files:
        bpds = np.concatenate([read_npz(f)["arr_0"].reshape(-1) for f in sorted(bpd_files)])
        row[f"bits/dim ({bpd_dataset})"] = float(bpds.mean())
        row["bits/dim std. error"] = float(bpds.std(ddof=1) / np.sqrt(bpds.size)) if bpds.size > 1 else float("nan")
        row["bits/dim evaluations"] = int(bpds.size)
    report_file = os.path.join(eval_dir, f"report_{ckpt}.npz")
    if os.path.exists(report_file) and names is not None:
        report = read_npz(report_file)
        for key in ("IS", "fid", "kid"):
            value = float(report[key])
            row[names[key]] = None if (key == "IS" and value < 0) else value
        if "num_samples" in report:
            row["samples"] = int(report["num_samples"])
    return row
