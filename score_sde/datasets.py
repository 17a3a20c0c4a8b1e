"""Training and evaluation data as ``tf.data`` pipelines, the way the original fed its ``pmap``.

Every dataset yields dicts ``{'image': float32, 'label': int64 or None}`` batched as
``(local_devices, [additional_dim,] per_device_batch, H, W, C)`` with pixels in ``[0, 1]``
(``get_data_scaler`` maps them to ``[-1, 1]`` when ``config.data.centered``).

Datasets (``config.data.dataset``):

- ``CIFAR10``, ``SVHN``, ``CELEBA``, ``LSUN`` (``config.data.category``), ``ImageNet`` (score_flow's
  ``downsampled_imagenet/32x32`` or ``64x64`` by ``config.data.image_size``; train / validation, no
  labels): tensorflow-datasets, with the original's crops and resizes. ``config.data.data_dir``
  (optional) is the tfds data directory. An unprepared dataset is prepared from
  ``<data_dir>/downloads/manual/`` when the files tfds would download are there, downloaded when
  their host answers, and otherwise stops at once with a message saying how to provide it (tfds
  itself would retry for minutes).
  CIFAR-10 can also be read straight from ``cifar-10-binary.tar.gz`` by :func:`read_cifar10_binary`
  (``data_dir`` set to the tarball, or the tarball placed directly in ``data_dir``).
- ``FFHQ``, ``CelebAHQ``: TFRecords of ``{'shape': [C, H, W], 'data': raw uint8}`` at
  ``config.data.tfrecords_path`` (file or glob), as the original.
- ``DIGITS``: the UCI handwritten digits embedded in this package (``score_sde/data``, see its
  README): 1,797 images 8x8x1; the first 1,500 train, the last 297 evaluate.
- ``GMM``: draws of the Gaussian mixture ``score_sde.mixtures.make_mixture(config.data.dim)`` as
  ``(1, 1, dim)`` float "images" (not pixels; for the ``mlp`` model): see :func:`load_gmm`.
- ``FASHION_MNIST``: the gzipped IDX files of Fashion-MNIST (28x28x1; 60,000 train, 10,000 test)
  in ``config.data.data_dir`` or, by default, where Debian's ``dataset-fashion-mnist`` puts them.
"""
from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import importlib.util
import os
import pathlib
import socket
import tarfile
import threading
import urllib.parse
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import tensorflow as tf

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

from score_sde import data_order, data_scaling, parallel

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CIFAR10_BINARY_TARBALL = "cifar-10-binary.tar.gz"
DIGITS_NUM_EVAL = 297
GMM_NUM_TRAIN, GMM_NUM_EVAL = 50000, 5000
SHUFFLE_BUFFER_SIZE = 10000
_NETWORK_TIMEOUT_S = 3.0

# config.data.dataset -> (tfds name, train split, eval split); LSUN's name gets the category.
_TFDS_DATASETS = {
    "CIFAR10": ("cifar10", "train", "test"),
    "SVHN": ("svhn_cropped", "train", "test"),
    "CELEBA": ("celeb_a", "train", "validation"),
    "LSUN": ("lsun/{category}", "train", "validation"),
    "ImageNet": ("downsampled_imagenet/{size}", "train", "validation"),
}
_IMAGENET_SIZES = (32, 64)  # the resolutions tfds' downsampled_imagenet has


class DatasetUnavailableError(RuntimeError):
    """The requested data is not on this machine and cannot be downloaded; the message says how to provide it."""


# The scalers live in a module without TensorFlow; the original's API has them here.
get_data_scaler = data_scaling.get_data_scaler
get_data_inverse_scaler = data_scaling.get_data_inverse_scaler


# ----------------------------------------------------------------------------------------------
# Image operations (HWC tensors; dynamic shapes allowed)
# ----------------------------------------------------------------------------------------------

def central_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """The central ``size x size`` window of an ``(H, W, C)`` image (top/left offsets rounded down)."""
    shape = tf.shape(image)
    top = (shape[0] - size) // 2
    left = (shape[1] - size) // 2
    return tf.image.crop_to_bounding_box(image, top, left, size, size)


def resize_small(image: tf.Tensor, resolution: int) -> tf.Tensor:
    """Resize (bilinear, antialiased) so that the shorter side is ``resolution``, keeping the aspect ratio.

    The longer side becomes ``round(side * resolution / min(H, W))`` (half to even).
    """
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    ratio = resolution / tf.reduce_min(shape)
    new_size = tf.cast(tf.round(shape * ratio), tf.int32)
    return tf.image.resize(image, new_size, antialias=True)


def crop_resize(image: tf.Tensor, resolution: int) -> tf.Tensor:
    """Central square crop of a uint8 image, bicubic (antialiased) resize to ``resolution``, back to uint8.

    Values are clipped to ``[0, 255]`` before the (truncating) cast, so bicubic overshoot saturates.
    """
    shape = tf.shape(image)
    crop = tf.minimum(shape[0], shape[1])
    image = central_crop(image, crop)
    image = tf.image.resize(image, (resolution, resolution), method=tf.image.ResizeMethod.BICUBIC, antialias=True)
    return tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)


def _to_float_resized(image: tf.Tensor, resolution: int) -> tf.Tensor:
    """uint8 image to float32 in ``[0, 1]``, resized (bilinear, antialiased) to ``resolution`` if it differs."""
    image = tf.image.convert_image_dtype(image, tf.float32)
    if image.shape[0] == resolution and image.shape[1] == resolution:
        return image
    return tf.image.resize(image, (resolution, resolution), antialias=True)


# ----------------------------------------------------------------------------------------------
# Readers of our own (no pickle anywhere)
# ----------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), gzipped when the name ends in ``.gz``.

    Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, each dimension as a big-endian
    uint32, then the values big-endian in row-major order. Returns an array of that shape
    in native byte order.
    """
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (header {data[:4]!r}).")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} of {dtype} ({expected} bytes in all), "
                         f"but the file has {len(data)} bytes; the file is truncated or corrupt.")
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


_CIFAR10_RECORD = 1 + 32 * 32 * 3
_CIFAR10_MEMBERS = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}


def read_cifar10_binary(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read ``cifar-10-binary.tar.gz`` (the *binary* version; never the pickled python one).

    Each record is one label byte followed by 3,072 pixel bytes: the 32x32 red plane, then
    green, then blue, each row-major. Returns ``{'train': (images, labels), 'test': ...}``
    with images ``(N, 32, 32, 3)`` uint8 and labels ``(N,)`` int64, in file order
    (``data_batch_1..5.bin`` for train, ``test_batch.bin`` for test).
    """
    wanted = {name for names in _CIFAR10_MEMBERS.values() for name in names}
    contents: dict[str, bytes] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            name = os.path.basename(member.name)
            if member.isfile() and name in wanted:
                contents[name] = tar.extractfile(member).read()
    missing = sorted(wanted - contents.keys())
    if missing:
        raise ValueError(f"{path} lacks {missing}; expected the CIFAR-10 binary version "
                         f"({CIFAR10_BINARY_TARBALL}, folder cifar-10-batches-bin/).")
    splits = {}
    for split, names in _CIFAR10_MEMBERS.items():
        raw = b"".join(contents[name] for name in names)
        if len(raw) % _CIFAR10_RECORD:
            raise ValueError(f"{path}: {split} files hold {len(raw)} bytes, not a whole number of "
                             f"{_CIFAR10_RECORD}-byte records; the tarball is corrupt.")
        records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR10_RECORD)
        images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        splits[split] = (np.ascontiguousarray(images), records[:, 0].astype(np.int64))
    return splits


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The embedded UCI handwritten digits: images ``(1797, 8, 8, 1)`` uint8 in 0..255, labels ``(1797,)`` int64.

    Pixel values are the original counts 0..16 stored as ``floor(v * 255 / 16 + 0.5)``
    (see ``score_sde/data/README.md``).
    """
    with importlib.resources.files("score_sde").joinpath("data", "digits.npz").open("rb") as f:
        with np.load(f, allow_pickle=False) as arrays:
            images, labels = arrays["images"], arrays["labels"]
    return images[..., None], labels.astype(np.int64)


def load_gmm(config, uniform_dequantization: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``GMM``: fixed draws of ``score_sde.mixtures.make_mixture(config.data.dim)`` with their component labels.

    Returns ``{'train': (x, labels), 'test': (x, labels)}``, ``x`` float32 ``(N, 1, 1, dim)`` (each
    point is a 1x1 "image" with ``dim`` channels), ``GMM_NUM_TRAIN`` and ``GMM_NUM_EVAL`` points
    drawn with the seed ``config.seed`` (train) and ``config.seed + 1`` (test).
    """
    import jax

    from score_sde import mixtures  # imported here: only this dataset needs it

    data = config.data
    problems = []
    if (data.image_size, data.num_channels) != (1, data.dim):
        problems.append(f"config.data.image_size = {data.image_size} and config.data.num_channels = "
                        f"{data.num_channels} must be 1 and config.data.dim = {data.dim}")
    if data.centered or data.random_flip or uniform_dequantization:
        problems.append("config.data.centered, random_flip and uniform_dequantization must be False (the "
                        "mixture's points are not pixels in [0, 1])")
    if problems:
        raise ValueError("GMM dataset: " + "; ".join(problems) + ".")
    mixture = mixtures.make_mixture(data.dim)
    splits = {}
    for split, seed, n in (("train", config.seed, GMM_NUM_TRAIN), ("test", config.seed + 1, GMM_NUM_EVAL)):
        x, labels = mixture.sample_with_labels(jax.random.PRNGKey(seed), n)
        splits[split] = (np.asarray(x, np.float32).reshape(n, 1, 1, data.dim), np.asarray(labels, np.int64))
    return splits


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST from its IDX files: ``{'train': (60000, 28, 28, 1) uint8 + labels, 'test': 10000}``.

    Looks in ``data_dir`` (default :data:`FASHION_MNIST_DEFAULT_DIR`) for
    ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` with or without ``.gz``.
    """
    folder = pathlib.Path(data_dir or FASHION_MNIST_DEFAULT_DIR)
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        arrays = []
        for kind in ("images-idx3", "labels-idx1"):
            candidates = [folder / f"{prefix}-{kind}-ubyte.gz", folder / f"{prefix}-{kind}-ubyte"]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise DatasetUnavailableError(
                    f"Fashion-MNIST: {candidates[0].name} not found in {folder}. On Debian/Ubuntu run "
                    f"`sudo apt-get install dataset-fashion-mnist` (files land in {FASHION_MNIST_DEFAULT_DIR}), "
                    "or download the four *-ubyte.gz files from "
                    "https://github.com/zalandoresearch/fashion-mnist and set config.data.data_dir to their folder.")
            arrays.append(read_idx(found))
        images, labels = arrays
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(f"Fashion-MNIST in {folder}: {split} images {images.shape} and labels "
                             f"{labels.shape} do not match.")
        splits[split] = (images[..., None].astype(np.uint8), labels.astype(np.int64))
    return splits


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """An in-memory dataset (what :func:`get_dataset` returns as ``dataset_builder`` for non-tfds data).

    ``splits`` maps a split name to ``(images (N, H, W, C) uint8, labels (N,) int64)``.
    """

    name: str
    splits: dict[str, tuple[np.ndarray, np.ndarray]]

    def num_examples(self, split: str) -> int:
        return len(self.splits[split][1])


# ----------------------------------------------------------------------------------------------
# tensorflow-datasets: availability checked before anything can hang
# ----------------------------------------------------------------------------------------------

def _host_reachable(host: str, port: int, timeout: float = _NETWORK_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds (DNS lookup included)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)  # a hanging resolver cannot hold us longer than this
    return bool(result and result[0])


def _can_download(urls: Iterable[str]) -> bool:
    """Whether the first download host (or the configured HTTP(S) proxy) answers within a few seconds."""
    urls = list(urls)
    if not urls:
        return False
    parsed = urllib.parse.urlparse(urls[0])
    proxy = (os.environ.get(f"{parsed.scheme}_proxy") or os.environ.get(f"{parsed.scheme.upper()}_PROXY")
             or os.environ.get("all_proxy") or os.environ.get("ALL_PROXY"))
    if proxy:
        parsed = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed.hostname is not None and _host_reachable(parsed.hostname, port)


def _needed_downloads(builder: tfds.core.DatasetBuilder, category: str | None) -> dict[str, str]:
    """URL -> file name of what tfds downloads for this builder (LSUN: only the category's files)."""
    infos = builder.url_infos or {}
    files = {url: info.filename or os.path.basename(urllib.parse.urlparse(url).path) for url, info in infos.items()}
    if category is not None:
        files = {url: name for url, name in files.items()
                 if name.startswith(f"{category}_") or name == f"{category}.zip"}
    if builder.name == "downsampled_imagenet":  # url_infos lists every resolution's tarballs
        files = {url: name for url, name in files.items() if name.endswith(f"_{builder.builder_config.name}.tar")}
    return files


def _check_importlib_resources() -> None:
    if importlib.util.find_spec("importlib_resources") is None:
        raise RuntimeError("tensorflow-datasets 4.9.10 cannot prepare a dataset without the `importlib_resources` "
                           "package (upstream bug): `pip install -r requirements.txt` installs it.")


def _unavailable_message(dataset: str, name: str, builder: tfds.core.DatasetBuilder, manual_dir: pathlib.Path,
                         files: dict[str, str]) -> str:
    present = {p.name for p in manual_dir.iterdir()} if manual_dir.is_dir() else set()
    missing = [name for name in files.values() if name not in present]
    root = builder.data_dir_root
    lines = [
        f"Dataset {dataset} (tfds '{name}') is not prepared in {builder.data_dir}, and its download "
        f"host does not answer (no network?). Stopping before training; provide the data in one of these ways:",
        f"  1. On a machine with network: `python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{name}', data_dir='DIR').download_and_prepare()\"`, then copy "
        f"DIR/{name.split('/')[0]} into {root}/ (the tfds data_dir here; set config.data.data_dir to change it).",
        f"  2. Put the files tfds downloads into {manual_dir}/ (they are prepared offline, checksums verified); "
        f"missing now: {', '.join(missing) if missing else '(none)'}"
        + (f"  [from {', '.join(url for url, name in files.items() if name in missing)}]" if missing else ""),
    ]
    if dataset == "CIFAR10":
        lines.append(
            f"  3. CIFAR-10 only: put {CIFAR10_BINARY_TARBALL} (the *binary* version from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html; the python version is pickle-based and not read) "
            f"directly in {root}/, or set config.data.data_dir to the tarball itself; score_sde's own reader "
            "then loads it without preparing anything.")
    if dataset == "ImageNet":
        lines.append(
            f"  ImageNet: tfds fetches {' and '.join(files.values())} from http://image-net.org/small/; where that "
            "fails, get these tarballs (van den Oord et al.'s downsampled ImageNet; ImageNet's terms apply) "
            "elsewhere and use way 2.")
    return "\n".join(lines)


def _tfds_source(dataset: str, name: str, data_dir: str | None, category: str | None) -> Any:
    """A source ready to read, tried in this order: the tfds dataset prepared in ``data_dir``; prepared now
    from the files in ``<data_dir>/downloads/manual/``; (CIFAR-10) ``cifar-10-binary.tar.gz`` read by our
    own reader when ``data_dir`` is that file or holds it; downloaded when its host answers.

    Raises :class:`DatasetUnavailableError` at once when none of these is possible (an unprepared
    ``tfds.load`` offline would retry for minutes first).
    """
    if dataset == "CIFAR10" and data_dir is not None and pathlib.Path(data_dir).expanduser().is_file():
        return ArraySource("cifar10", read_cifar10_binary(pathlib.Path(data_dir).expanduser()))
    # Imported here, where it is first needed: it takes ~0.25 s, which the embedded data sets need not pay.
    import tensorflow_datasets as tfds  # noqa: PLC0415

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as err:
        hint = " (check config.data.category)" if category is not None else ""
        raise ValueError(f"tensorflow-datasets has no dataset '{name}'{hint}.") from err
    if builder.is_prepared():
        return builder
    files = _needed_downloads(builder, category)
    manual_dir = pathlib.Path(builder.data_dir_root) / "downloads" / "manual"
    if files and all((manual_dir / fname).is_file() for fname in files.values()):
        _check_importlib_resources()
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir), try_download_gcs=False))
        return builder
    tarball = pathlib.Path(builder.data_dir_root) / CIFAR10_BINARY_TARBALL
    if dataset == "CIFAR10" and tarball.is_file():
        return ArraySource("cifar10", read_cifar10_binary(tarball))
    if _can_download(files):
        _check_importlib_resources()
        builder.download_and_prepare()
        return builder
    raise DatasetUnavailableError(_unavailable_message(dataset, name, builder, manual_dir, files))


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------

def _dataset_options() -> tf.data.Options:
    options = tf.data.Options()
    options.experimental_optimization.map_parallelization = True
    options.threading.max_intra_op_parallelism = 1
    return options


def get_dataset(config, additional_dim: int | None = None, uniform_dequantization: bool = False,
                evaluation: bool = False, start_step: int = 0):
    """Create the training and evaluation pipelines.

    Args:
      config: ml_collections config; uses ``config.data.{dataset, image_size, random_flip, category,
        tfrecords_path, data_dir}``, ``config.training.batch_size`` and ``config.eval.batch_size``.
      additional_dim: if given, an extra batch axis of this size after the device axis (the number of
        train steps fused into one jitted call).
      uniform_dequantization: add uniform noise: ``x -> (255 x + U[0, 1)) / 256``.
      evaluation: use ``config.eval.batch_size``, one epoch, no random flips.
      start_step: the training step a resumed run starts at: where its streams begin.

    The order, the flips and the dequantisation noise are drawn from ``config.seed`` (and the process
    index): two runs of one config read the same batches, and a resumed run of in-memory data reads
    what an uninterrupted one would from ``start_step`` on (``score_sde/data_order.py``).

    Returns:
      ``(train_ds, eval_ds, dataset_builder)``: two ``tf.data.Dataset`` of dicts ``{'image', 'label'}``,
      images float32 ``(local_devices, [additional_dim,] batch_size // device_count, H, W, C)`` in
      ``[0, 1]``; ``dataset_builder`` is the tfds builder, the ``TFRecordDataset`` (FFHQ/CelebAHQ) or an
      :class:`ArraySource`.
    """
    batch_size = config.eval.batch_size if evaluation else config.training.batch_size
    n_devices = parallel.device_count()
    if batch_size % n_devices != 0:
        field = "config.eval.batch_size" if evaluation else "config.training.batch_size"
        raise ValueError(f"{field} = {batch_size} is not divisible by the number of devices ({n_devices}); "
                         f"use a multiple of {n_devices}.")
    batch_dims = parallel.batch_dims(batch_size, additional_dim)
    num_epochs = 1 if evaluation else None
    resolution = config.data.image_size
    dataset = config.data.dataset
    data_dir = config.data.get("data_dir", None)

    examples_per_batch = int(np.prod(batch_dims))
    train_first, eval_first = data_order.first_positions(
        config, examples_per_batch // (additional_dim or 1), examples_per_batch, start_step)

    def finish(img: tf.Tensor, seed: tf.Tensor, position: tf.Tensor) -> tf.Tensor:
        """Random flip (training only) and uniform dequantization of a float image in [0, 1]."""
        return data_order.augment(img, seed, position, config.data.random_flip and not evaluation,
                                  uniform_dequantization)

    source: Any
    if dataset in ("FFHQ", "CelebAHQ"):
        files = tf.io.gfile.glob(config.data.tfrecords_path)
        if not files:
            raise DatasetUnavailableError(f"{dataset}: no TFRecord file matches config.data.tfrecords_path = "
                                          f"{config.data.tfrecords_path!r}.")
        source = tf.data.TFRecordDataset(files)

        def preprocess_fn(record, seed, position):
            example = tf.io.parse_single_example(record, features={
                "shape": tf.io.FixedLenFeature([3], tf.int64),
                "data": tf.io.FixedLenFeature([], tf.string)})
            data = tf.reshape(tf.io.decode_raw(example["data"], tf.uint8), example["shape"])
            img = tf.image.convert_image_dtype(tf.transpose(data, (1, 2, 0)), tf.float32)
            return {"image": finish(img, seed, position), "label": None}

        train_split = eval_split = None

        def splits() -> tuple[tf.data.Dataset, tf.data.Dataset]:
            return source, source

    else:
        if dataset in _TFDS_DATASETS:
            name, train_split, eval_split = _TFDS_DATASETS[dataset]
            category = config.data.category if dataset == "LSUN" else None
            if dataset == "ImageNet" and resolution not in _IMAGENET_SIZES:
                raise ValueError(f"config.data.image_size = {resolution}: tfds' downsampled_imagenet has "
                                 f"{' and '.join(f'{r}x{r}' for r in _IMAGENET_SIZES)} only.")
            name = name.format(category=category, size=f"{resolution}x{resolution}")
            source = _tfds_source(dataset, name, data_dir, category)
        elif dataset == "DIGITS":
            images, labels = load_digits()
            n_train = len(labels) - DIGITS_NUM_EVAL
            source = ArraySource("digits", {"train": (images[:n_train], labels[:n_train]),
                                            "test": (images[n_train:], labels[n_train:])})
            train_split, eval_split = "train", "test"
        elif dataset == "FASHION_MNIST":
            source = ArraySource("fashion_mnist", load_fashion_mnist(data_dir))
            train_split, eval_split = "train", "test"
        elif dataset == "GMM":
            source = ArraySource("gmm", load_gmm(config, uniform_dequantization))
            train_split, eval_split = "train", "test"
        else:
            raise NotImplementedError(f"Dataset {dataset} not yet supported (config.data.dataset); choose one of "
                                      f"{sorted(_TFDS_DATASETS) + ['FFHQ', 'CelebAHQ', 'DIGITS', 'FASHION_MNIST', 'GMM']}.")

        if dataset == "CELEBA":
            def resize_op(img):
                img = tf.image.convert_image_dtype(img, tf.float32)
                return resize_small(central_crop(img, 140), resolution)
        elif dataset == "LSUN" and resolution == 128:
            def resize_op(img):
                img = tf.image.convert_image_dtype(img, tf.float32)
                return central_crop(resize_small(img, resolution), resolution)
        elif dataset == "LSUN":
            def resize_op(img):
                return tf.image.convert_image_dtype(crop_resize(img, resolution), tf.float32)
        else:
            def resize_op(img):
                return _to_float_resized(img, resolution)

        def preprocess_fn(example, seed, position):
            img = tf.ensure_shape(resize_op(example["image"]), (resolution, resolution, None))
            return {"image": finish(img, seed, position), "label": example.get("label", None)}

        eval_count = _split_size(source, eval_split)
        if evaluation and eval_count is not None and eval_count < examples_per_batch:
            raise ValueError(f"{dataset} split '{eval_split}' has {eval_count} examples, fewer than one evaluation "
                             f"batch ({examples_per_batch} on this host); lower config.eval.batch_size.")

        def splits() -> tuple[tf.data.Dataset, tf.data.Dataset]:
            import tensorflow_datasets as tfds  # noqa: PLC0415 (imported by _tfds_source already)

            return tuple(source.as_dataset(split=s, shuffle_files=True, read_config=tfds.ReadConfig(
                options=_dataset_options(), shuffle_seed=data_order.shuffle_seed(seed)))
                for s, seed in ((train_split, train_seed), (eval_split, eval_seed)))

    # A resumed run can start a permuted in-memory stream at its position; a sequential one is reseeded.
    random_access = isinstance(source, ArraySource)
    reseed = 0 if random_access else start_step
    train_seed, eval_seed = (data_order.stream_seed(config, split, reseed)
                             for split in (data_order.TRAIN_SPLIT, data_order.EVAL_SPLIT))

    def create_dataset(split: str | None, seed: tf.Tensor, first: int,
                       raw: tf.data.Dataset | None) -> tf.data.Dataset:
        if random_access:
            images, labels = source.splits[split]
            ds, example_at = data_order.permuted_examples(images, labels, seed, first, num_epochs)

            def prepare(position):
                return preprocess_fn(example_at(position), seed, position)
        else:
            # A buffer larger than the split would only hold repeats of it (and take long to fill).
            size = _split_size(source, split) if split is not None else None
            ds = raw.repeat(count=num_epochs)
            ds = ds.shuffle(min(SHUFFLE_BUFFER_SIZE, size or SHUFFLE_BUFFER_SIZE), seed=data_order.shuffle_seed(seed))
            ds = ds.enumerate()

            def prepare(position, example):
                return preprocess_fn(example, seed, position)
        ds = ds.with_options(_dataset_options())
        ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
        for size in reversed(batch_dims):
            ds = ds.batch(size, drop_remainder=True)
        return ds.prefetch(tf.data.AUTOTUNE)

    train_raw, eval_raw = (None, None) if random_access else splits()
    return (create_dataset(train_split, train_seed, train_first, train_raw),
            create_dataset(eval_split, eval_seed, eval_first, eval_raw), source)


def _split_size(source: Any, split: str) -> int | None:
    """Number of examples in a split, or None where unknown (TFRecords, mocked tfds metadata)."""
    if isinstance(source, ArraySource):
        return source.num_examples(split)
    try:
        return source.info.splits[split].num_examples or None
    except (AttributeError, KeyError):
        return None
