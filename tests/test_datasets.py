"""score_sde.datasets: the tfds path (mocked and real, offline), our own readers, the embedded digits."""
from __future__ import annotations

import gzip
import pathlib
import struct
import tarfile
import time
from unittest import mock

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from score_sde import datasets, parallel


def make_config(dataset: str, image_size: int, batch_size: int = 8, *, category: str | None = None,
                random_flip: bool = False, centered: bool = False, data_dir: str | None = None,
                tfrecords_path: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.training = ml_collections.ConfigDict({"batch_size": batch_size})
    config.eval = ml_collections.ConfigDict({"batch_size": batch_size})
    config.data = ml_collections.ConfigDict({
        "dataset": dataset, "image_size": image_size, "random_flip": random_flip, "centered": centered,
        "category": category, "data_dir": data_dir, "tfrecords_path": tfrecords_path})
    return config


def epoch(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray | None]:
    """All examples of a finite pipeline, batch axes merged: images (N, H, W, C), labels (N,) or None."""
    images, labels = [], []
    for batch in ds:
        img = batch["image"].numpy()
        images.append(img.reshape((-1,) + img.shape[-3:]))
        if batch["label"] is not None:
            labels.append(batch["label"].numpy().reshape(-1))
    return np.concatenate(images), (np.concatenate(labels) if labels else None)


def match_rows(actual: np.ndarray, expected: np.ndarray, atol: float = 1e-6) -> np.ndarray:
    """Index into ``expected`` of each row of ``actual`` (each must match exactly one row)."""
    flat_e = expected.reshape(len(expected), -1)
    index = []
    for row in actual.reshape(len(actual), -1):
        hits = np.flatnonzero(np.all(np.abs(flat_e - row) <= atol, axis=1))
        assert len(hits) == 1, f"{len(hits)} matches for a pipeline image"
        index.append(hits[0])
    return np.array(index)


@pytest.fixture
def download_possible():
    """Pretend the download host answers (only used together with mocks that never download)."""
    with mock.patch.object(datasets, "_can_download", lambda urls: True):
        yield


def raw_split(name: str, split: str) -> list[dict]:
    """The (mocked) tfds examples of a split as numpy dicts, read directly from the builder."""
    return list(tfds.as_numpy(tfds.builder(name).as_dataset(split=split)))


# ----------------------------------------------------------------------------------------------
# Scalers, batch geometry, errors
# ----------------------------------------------------------------------------------------------

def test_scalers():
    x = np.linspace(0.0, 1.0, 11)
    centered = make_config("DIGITS", 8, centered=True)
    np.testing.assert_allclose(datasets.get_data_scaler(centered)(x), 2 * x - 1)
    np.testing.assert_allclose(datasets.get_data_inverse_scaler(centered)(2 * x - 1), x)
    plain = make_config("DIGITS", 8, centered=False)
    np.testing.assert_array_equal(datasets.get_data_scaler(plain)(x), x)
    np.testing.assert_array_equal(datasets.get_data_inverse_scaler(plain)(x), x)


def test_batch_size_must_divide_devices(monkeypatch):
    monkeypatch.setattr(parallel, "device_count", lambda: 4)
    with pytest.raises(ValueError, match=r"config.training.batch_size = 6 .* number of devices \(4\)"):
        datasets.get_dataset(make_config("DIGITS", 8, batch_size=6))
    with pytest.raises(ValueError, match=r"config.eval.batch_size"):
        datasets.get_dataset(make_config("DIGITS", 8, batch_size=6), evaluation=True)


def test_batch_dims_follow_devices(monkeypatch):
    """Global batch 8 over 4 devices (2 on this host): per-device 2, leading axis = local devices."""
    monkeypatch.setattr(parallel, "device_count", lambda: 4)
    monkeypatch.setattr(parallel, "local_device_count", lambda: 2)
    train_ds, _, _ = datasets.get_dataset(make_config("DIGITS", 8, batch_size=8), additional_dim=3)
    assert next(iter(train_ds))["image"].shape == (2, 3, 2, 8, 8, 1)


def _train_images(config, batches: int, **kwargs) -> np.ndarray:
    """The first ``batches`` train batches of ``config``, ``(batches, batch_size, 8, 8, 1)``."""
    ds = datasets.get_dataset(config, **kwargs)[0].take(batches)
    return np.stack([batch["image"].reshape(-1, 8, 8, 1) for batch in ds.as_numpy_iterator()])


def test_train_stream_is_drawn_from_the_seed_and_resumes_at_its_position(monkeypatch):
    """The same config reads the same batches; a stream started at step 120 is the one-go stream from batch
    120 on (across the epoch boundary at 150); each epoch reads every training digit once, in a new order;
    the seed and the process index change the order, flips and dequantisation noise come from the seed too."""
    config = make_config("DIGITS", 8, batch_size=10)
    config.seed, config.training.eval_freq = 3, 50
    images = datasets.load_digits()[0][:1500] / 255.0
    stream = _train_images(config, 200)
    np.testing.assert_array_equal(_train_images(config, 200), stream)
    np.testing.assert_array_equal(_train_images(config, 80, start_step=120), stream[120:])
    epochs = [match_rows(stream[:150].reshape(-1, 8, 8, 1), images), match_rows(stream[150:].reshape(-1, 8, 8, 1),
                                                                                  images)]
    assert sorted(epochs[0]) == list(range(1500)) and len(set(epochs[1])) == 500
    assert not np.array_equal(epochs[0][:500], epochs[1])
    assert not np.array_equal(epochs[0], np.arange(1500))

    config.seed = 4
    assert not np.array_equal(_train_images(config, 5), stream[:5])
    config.seed = 3
    monkeypatch.setattr(parallel, "process_index", lambda: 1)
    assert not np.array_equal(_train_images(config, 5), stream[:5])
    monkeypatch.undo()

    config.data.random_flip = True
    flipped = _train_images(config, 150, uniform_dequantization=True)
    np.testing.assert_array_equal(_train_images(config, 30, uniform_dequantization=True, start_step=120),
                                  flipped[120:])
    # Each example is its unflipped self or its mirror, plus noise in [0, 1/256): both occur, about half each.
    plain = stream[:150] * 255 / 256
    gap_plain = (flipped - plain).reshape(1500, -1)
    gap_mirror = (flipped - plain[..., ::-1, :]).reshape(1500, -1)
    is_plain = np.all((gap_plain > -1e-6) & (gap_plain < 1 / 256 + 1e-6), axis=1)
    is_mirror = np.all((gap_mirror > -1e-6) & (gap_mirror < 1 / 256 + 1e-6), axis=1)
    assert np.all(is_plain | is_mirror)
    assert 600 < np.sum(is_mirror & ~is_plain) < 900 and 600 < np.sum(is_plain & ~is_mirror) < 900
    noise = gap_plain[is_plain & ~is_mirror][plain.reshape(1500, -1)[is_plain & ~is_mirror] == 0] * 256
    assert noise.size > 10000 and abs(noise.mean() - 0.5) < 0.02 and abs(noise.std() - 12 ** -0.5) < 0.02


def test_unknown_dataset():
    with pytest.raises(NotImplementedError, match="MNIST_FOO"):
        datasets.get_dataset(make_config("MNIST_FOO", 8))


def test_eval_split_smaller_than_batch():
    with pytest.raises(ValueError, match="297 examples, fewer than one evaluation batch"):
        datasets.get_dataset(make_config("DIGITS", 8, batch_size=512), evaluation=True)


# ----------------------------------------------------------------------------------------------
# The embedded digits (real data)
# ----------------------------------------------------------------------------------------------

def test_digits_embedded_data():
    images, labels = datasets.load_digits()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    assert labels.shape == (1797,) and set(np.unique(labels)) == set(range(10))
    # 0..16 counts stored as floor(v * 255 / 16 + 0.5): exactly 17 levels, both ends present.
    levels = np.floor(np.arange(17) * 255 / 16 + 0.5).astype(np.uint8)
    assert set(np.unique(images)) == set(levels)
    # Class sizes of the UCI test set as scikit-learn ships it.
    np.testing.assert_array_equal(np.bincount(labels), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    # Real handwriting: the border columns are nearly empty, the centre is ink.
    assert images[:, :, 0].mean() < 5 and images[:, 2:6, 2:6].mean() > 100


def test_digits_pipeline():
    images, labels = datasets.load_digits()
    config = make_config("DIGITS", 8, batch_size=16)
    train_ds, eval_ds, source = datasets.get_dataset(config, additional_dim=2)
    assert source.num_examples("train") == 1500 and source.num_examples("test") == 297
    batch = next(iter(train_ds))
    assert batch["image"].shape == (1, 2, 16, 8, 8, 1) and batch["image"].dtype == tf.float32
    assert batch["label"].shape == (1, 2, 16) and batch["label"].dtype == tf.int64
    train_images = batch["image"].numpy().reshape(-1, 8, 8, 1)
    index = match_rows(train_images, images[:1500] / 255.0)
    np.testing.assert_array_equal(batch["label"].numpy().reshape(-1), labels[index])

    _, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
    got, got_labels = epoch(eval_ds)
    assert got.shape == (288, 8, 8, 1)  # 297 examples, whole batches of 16, one epoch
    index = match_rows(got, images[1500:] / 255.0)
    assert len(set(index)) == 288
    np.testing.assert_array_equal(got_labels, labels[1500:][index])


def test_digits_dequantization_and_resize():
    images, _ = datasets.load_digits()
    config = make_config("DIGITS", 8, batch_size=32)
    _, eval_ds, _ = datasets.get_dataset(config, uniform_dequantization=True, evaluation=True)
    got, _ = epoch(eval_ds.take(2))
    # (255 x + U) / 256 with x = k / 255: each output is an eval image k with 256 * out - k in [0, 1).
    assert np.all(got >= 0) and np.all(got < 1)
    eval_images = images[1500:].astype(np.float32)
    index = match_rows(got * 256.0 - 0.5, eval_images, atol=0.5 + 1e-3)
    noise = got * 256.0 - eval_images[index]
    assert noise.min() > -1e-3 and noise.max() < 1 + 1e-3 and 0.45 < noise.mean() < 0.55

    resized_ds, _, _ = datasets.get_dataset(make_config("DIGITS", 16, batch_size=4))
    assert next(iter(resized_ds))["image"].shape == (1, 4, 16, 16, 1)


# ----------------------------------------------------------------------------------------------
# tfds datasets, mocked (the real loading code path, offline)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset,tfds_name,split", [("CIFAR10", "cifar10", "test"), ("SVHN", "svhn_cropped", "test")])
def test_tfds_32x32(download_possible, dataset, tfds_name, split):
    with tfds.testing.mock_data(num_examples=16):
        raw = raw_split(tfds_name, split)
        _, eval_ds, builder = datasets.get_dataset(make_config(dataset, 32, batch_size=8), evaluation=True)
        assert isinstance(builder, tfds.core.DatasetBuilder) and builder.name == tfds_name
        got, got_labels = epoch(eval_ds)
    assert got.shape == (16, 32, 32, 3) and got.dtype == np.float32
    raw_images = np.stack([ex["image"] for ex in raw]).astype(np.float32) / 255.0
    index = match_rows(got, raw_images)
    np.testing.assert_array_equal(got_labels, np.array([ex["label"] for ex in raw])[index])


def test_tfds_flips_and_dequantization(download_possible, monkeypatch):
    monkeypatch.setattr(datasets, "SHUFFLE_BUFFER_SIZE", 64)  # mocked splits have no known size to cap it
    with tfds.testing.mock_data(num_examples=8):
        raw = raw_split("cifar10", "train")
        train_ds, _, _ = datasets.get_dataset(make_config("CIFAR10", 32, batch_size=8, random_flip=True),
                                              additional_dim=8, uniform_dequantization=True)
        got, _ = epoch(train_ds.take(1))
    assert got.shape == (64, 32, 32, 3)
    raw_images = np.stack([ex["image"] for ex in raw]).astype(np.float32)
    both = np.concatenate([raw_images, raw_images[:, :, ::-1]])
    # Every output is an input k, flipped or not, as (k + U) / 256: 256 * out - k in [0, 1) (float error 1e-3).
    index = match_rows(got * 256.0 - 0.5, both, atol=0.5 + 1e-3)
    flipped = index >= len(raw_images)
    assert 0 < flipped.sum() < len(index)
    noise = got * 256.0 - both[index]
    assert noise.min() > -1e-3 and noise.max() < 1 + 1e-3 and 0.45 < noise.mean() < 0.55


@pytest.mark.parametrize("augmented", [False, True])
def test_tfds_stream_is_seeded_and_reseeded_at_a_restart(download_possible, monkeypatch, augmented):
    """A tfds pipeline reads the same batches (order; flips and noise when on) in two builds of one config; a
    restart at a later step reads another, equally repeatable stream; another seed another one. Without
    augmentation only the order can differ."""
    monkeypatch.setattr(datasets, "SHUFFLE_BUFFER_SIZE", 64)
    config = make_config("CIFAR10", 32, batch_size=8, random_flip=augmented)
    config.seed, config.training.eval_freq = 1, 10

    def batches(**kwargs):
        ds = datasets.get_dataset(config, additional_dim=4, uniform_dequantization=augmented, **kwargs)[0]
        return np.stack([batch["image"] for batch in ds.take(3).as_numpy_iterator()])

    with tfds.testing.mock_data(num_examples=24):
        first = batches()
        np.testing.assert_array_equal(batches(), first)
        restarted = batches(start_step=40)
        np.testing.assert_array_equal(batches(start_step=40), restarted)
        config.seed = 2
        other_seed = batches()
    assert not np.array_equal(restarted, first) and not np.array_equal(other_seed, first)


def test_celeba_crop_and_resize(download_possible):
    with tfds.testing.mock_data(num_examples=4):
        raw = raw_split("celeb_a", "validation")
        _, eval_ds, _ = datasets.get_dataset(make_config("CELEBA", 64, batch_size=4), evaluation=True)
        got, labels = epoch(eval_ds)
    assert labels is None  # celeb_a has no 'label' feature
    assert got.shape == (4, 64, 64, 3) and raw[0]["image"].shape == (218, 178, 3)
    # The central 140x140 window starts at row (218 - 140) // 2 = 39 and column (178 - 140) // 2 = 19.
    crops = np.stack([ex["image"][39:179, 19:159] for ex in raw]).astype(np.float32) / 255.0
    expected = tf.image.resize(crops, (64, 64), antialias=True).numpy()
    match_rows(got, expected, atol=1e-5)


def _lsun_expected(image: np.ndarray, size: int) -> np.ndarray:
    """The original's LSUN preprocessing of one uint8 image, written out: at 128, bilinear resize of the shorter side
    to 128 then the central 128x128; otherwise the central square, bicubic to ``size``, clipped and truncated to
    uint8. Both antialiased; crop offsets rounded down."""
    h, w = image.shape[:2]
    if size == 128:
        ratio = np.float32(size) / np.float32(min(h, w))  # float32 and half-to-even, as tf.round in the pipeline
        new_h, new_w = (int(np.round(np.float32(n) * ratio)) for n in (h, w))
        resized = tf.image.resize(image.astype(np.float32) / 255.0, (new_h, new_w), antialias=True).numpy()
        top, left = (new_h - size) // 2, (new_w - size) // 2
        return resized[top:top + size, left:left + size]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top:top + side, left:left + side].astype(np.float32)
    resized = tf.image.resize(square, (size, size), method="bicubic", antialias=True).numpy()
    return np.clip(resized, 0, 255).astype(np.uint8) / np.float32(255)


# Taller and wider than square; shorter sides above and below 128 and 256, so the resizes both shrink (where
# antialiasing matters) and enlarge.
LSUN_SHAPES = [(300, 280, 3), (200, 330, 3), (140, 90, 3), (270, 400, 3)]


@pytest.mark.parametrize("size", [128, 256])
def test_lsun(download_possible, size):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in LSUN_SHAPES]

    def as_dataset(builder, *args, **kwargs):
        examples = ({"id": str(i), "image": image} for i, image in enumerate(images))
        return tf.data.Dataset.from_generator(lambda: examples, output_types=builder.info.features.dtype,
                                              output_shapes=builder.info.features.shape)

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        _, eval_ds, builder = datasets.get_dataset(make_config("LSUN", size, batch_size=4, category="church_outdoor"),
                                                   evaluation=True)
        got, labels = epoch(eval_ds)
    assert builder.builder_config.name == "church_outdoor"
    assert got.shape == (4, size, size, 3) and labels is None
    index = match_rows(got, np.stack([_lsun_expected(image, size) for image in images]), atol=1e-5)
    assert sorted(index) == list(range(len(images)))


def test_image_ops_geometry():
    image = tf.reshape(tf.range(218 * 178 * 1), (218, 178, 1))
    crop = datasets.central_crop(image, 140).numpy()
    np.testing.assert_array_equal(crop, image.numpy()[39:179, 19:159])
    small = datasets.resize_small(tf.ones((218, 178, 3)), 64)
    assert small.shape == (78, 64, 3)  # round(218 * 64 / 178) = round(78.4)
    # crop_resize: square centre crop then resize, back to uint8 by truncation as the original
    # (a constant 200 comes back as 200 or, from float error, 199); overshoot saturates.
    out = datasets.crop_resize(tf.fill((40, 60, 3), tf.constant(200, tf.uint8)), 16)
    assert out.dtype == tf.uint8 and out.shape == (16, 16, 3) and set(np.unique(out.numpy())) <= {199, 200}
    left_dark = tf.concat([tf.zeros((30, 10, 1), tf.uint8), tf.fill((30, 50, 1), tf.constant(255, tf.uint8))], 1)
    out = datasets.crop_resize(left_dark, 30).numpy()  # the crop is columns 15..44: all bright
    assert out.min() >= 254
    # Upsampling a sharp edge makes bicubic ring below 0 and above 255: clipped, rows stay monotone (a wrapping
    # cast would put near-0 values on the bright side).
    edge = tf.concat([tf.zeros((6, 3, 1), tf.uint8), tf.fill((6, 3, 1), tf.constant(255, tf.uint8))], 1)
    ringing = tf.image.resize(tf.cast(edge, tf.float32), (36, 36), method="bicubic", antialias=True).numpy()
    assert ringing.max() > 256 and ringing.min() < -1
    out = datasets.crop_resize(edge, 36).numpy()[..., 0].astype(int)
    assert out[:, 0].max() == 0 and out[:, -1].min() >= 254
    assert np.all(np.diff(out, axis=1) >= -1)  # monotone up to the truncation jitter


def test_tfrecords_ffhq(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 3, 16, 16), dtype=np.uint8)  # stored C, H, W as the original
    path = tmp_path / "ffhq-r04.tfrecords"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for img in images:
            example = tf.train.Example(features=tf.train.Features(feature={
                "shape": tf.train.Feature(int64_list=tf.train.Int64List(value=img.shape)),
                "data": tf.train.Feature(bytes_list=tf.train.BytesList(value=[img.tobytes()]))}))
            writer.write(example.SerializeToString())
    config = make_config("FFHQ", 16, batch_size=2, tfrecords_path=str(path))
    _, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
    got, labels = epoch(eval_ds)
    assert labels is None and got.shape == (4, 16, 16, 3)
    match_rows(got, images.transpose(0, 2, 3, 1) / 255.0)
    config.data.tfrecords_path = str(tmp_path / "missing-*.tfrecords")
    with pytest.raises(datasets.DatasetUnavailableError, match="tfrecords_path"):
        datasets.get_dataset(config)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 binary format: tfds' own builder, and our own reader
# ----------------------------------------------------------------------------------------------

def _cifar_records(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, bytes]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    planes = images.transpose(0, 3, 1, 2).reshape(n, -1)  # R plane, G plane, B plane, row-major
    return images, labels.astype(np.int64), np.concatenate([labels[:, None], planes], axis=1).tobytes()


def _write_cifar_binary(folder: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Synthetic cifar-10-batches-bin/: 5 train files of 2 records, a test file of 4."""
    root = folder / "cifar-10-batches-bin"
    root.mkdir(parents=True)
    train_parts = []
    for i in range(1, 6):
        images, labels, raw = _cifar_records(2, seed=i)
        (root / f"data_batch_{i}.bin").write_bytes(raw)
        train_parts.append((images, labels))
    test_images, test_labels, raw = _cifar_records(4, seed=10)
    (root / "test_batch.bin").write_bytes(raw)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (root / "batches.meta.txt").write_text("\n".join(names) + "\n")
    return {"train": (np.concatenate([p[0] for p in train_parts]), np.concatenate([p[1] for p in train_parts])),
            "test": (test_images, test_labels)}


def test_tfds_cifar10_builder_on_binary_records(tmp_path):
    """tfds' real CIFAR-10 builder prepares synthetic binary records (only download_and_extract patched),
    reached through our manual-dir route; then the data_dir is read again with no mock at all."""
    extracted = tmp_path / "extracted"
    expected = _write_cifar_binary(extracted)
    data_dir = tmp_path / "tfds"
    manual = data_dir / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / datasets.CIFAR10_BINARY_TARBALL).write_bytes(b"placeholder: never read, download_and_extract is patched")
    config = make_config("CIFAR10", 32, batch_size=2, data_dir=str(data_dir))
    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", return_value=str(extracted)):
        _, eval_ds, builder = datasets.get_dataset(config, evaluation=True)
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == 10 and builder.info.splits["test"].num_examples == 4

    with mock.patch.object(datasets, "_can_download", side_effect=AssertionError("must not probe")):
        train_ds, eval_ds, builder = datasets.get_dataset(config, evaluation=True)
    for ds, split in ((eval_ds, "test"), (train_ds, "train")):
        got, labels = epoch(ds)
        images, true_labels = expected[split]
        assert got.shape == images.shape
        index = match_rows(got, images / 255.0)
        assert sorted(index) == list(range(len(images)))
        np.testing.assert_array_equal(labels, true_labels[index])


def _write_cifar_tarball(path: pathlib.Path, tmp_path: pathlib.Path) -> dict:
    expected = _write_cifar_binary(tmp_path / "src")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    return expected


def test_own_cifar10_binary_reader(tmp_path):
    tarball = tmp_path / datasets.CIFAR10_BINARY_TARBALL
    expected = _write_cifar_tarball(tarball, tmp_path)
    splits = datasets.read_cifar10_binary(tarball)
    for split in ("train", "test"):
        np.testing.assert_array_equal(splits[split][0], expected[split][0])
        np.testing.assert_array_equal(splits[split][1], expected[split][1])

    # data_dir = the tarball itself, or a data_dir holding it (nothing prepared): our reader, no probe.
    for data_dir in (tarball, tmp_path):
        config = make_config("CIFAR10", 32, batch_size=2, data_dir=str(data_dir))
        with mock.patch.object(datasets, "_can_download", side_effect=AssertionError("must not probe")):
            _, eval_ds, source = datasets.get_dataset(config, evaluation=True)
        assert isinstance(source, datasets.ArraySource)
        got, labels = epoch(eval_ds)
        index = match_rows(got, expected["test"][0] / 255.0)
        np.testing.assert_array_equal(labels, expected["test"][1][index])


def test_cifar10_binary_reader_rejects_bad_tarballs(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    src = tmp_path / "src"
    _write_cifar_binary(src)
    with open(src / "cifar-10-batches-bin" / "test_batch.bin", "ab") as f:
        f.write(b"\x00" * 7)
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    with pytest.raises(ValueError, match="not a whole number"):
        datasets.read_cifar10_binary(bad)
    partial = tmp_path / "partial.tar.gz"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-bin" / "test_batch.bin", arcname="cifar-10-batches-bin/test_batch.bin")
    with pytest.raises(ValueError, match="data_batch_1.bin"):
        datasets.read_cifar10_binary(partial)


# ----------------------------------------------------------------------------------------------
# Offline, unprepared: our error, at once
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset,category", [("CIFAR10", None), ("SVHN", None), ("CELEBA", None),
                                              ("LSUN", "bedroom")])
def test_offline_unprepared_fails_fast(tmp_path, monkeypatch, dataset, category):
    """The real network probe, pointed at a closed local port through the proxy variables, so the
    result does not depend on this machine's network: our message in well under tfds' ~205 s of retries."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    config = make_config(dataset, 32, category=category, data_dir=str(tmp_path))
    start = time.monotonic()
    with pytest.raises(datasets.DatasetUnavailableError) as info:
        datasets.get_dataset(config)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert str(tmp_path) in message and f"{tmp_path}/downloads/manual" in message
    assert "download_and_prepare" in message
    assert ("cifar-10-binary.tar.gz" in message) == (dataset == "CIFAR10")
    if dataset == "LSUN":
        assert "bedroom_train_lmdb.zip" in message and "church" not in message


def test_probe_gives_up_quickly():
    start = time.monotonic()
    assert not datasets._host_reachable("127.0.0.1", 9, timeout=1.0)
    assert not datasets._can_download([])
    assert time.monotonic() - start < 3


# ----------------------------------------------------------------------------------------------
# IDX reader and Fashion-MNIST
# ----------------------------------------------------------------------------------------------

def _idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_read_idx(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8),
              rng.integers(-2**31, 2**31 - 1, size=(7,), dtype=np.int32),
              rng.standard_normal((3, 4)).astype(np.float32)]
    for i, array in enumerate(arrays):
        plain = tmp_path / f"a{i}-ubyte"
        plain.write_bytes(_idx_bytes(array))
        packed = tmp_path / f"a{i}-ubyte.gz"
        packed.write_bytes(gzip.compress(_idx_bytes(array)))
        for path in (plain, packed):
            got = datasets.read_idx(path)
            assert got.dtype == array.dtype and got.dtype.isnative
            np.testing.assert_array_equal(got, array)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(_idx_bytes(arrays[0])[:-1])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        datasets.read_idx(truncated)
    not_idx = tmp_path / "not_idx"
    not_idx.write_bytes(b"PK\x03\x04zip")
    with pytest.raises(ValueError, match="not an IDX file"):
        datasets.read_idx(not_idx)


def test_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(1)
    data = {}
    for prefix, n in (("train", 12), ("t10k", 6)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))  # uncompressed works too
        data[prefix] = (images, labels)
    config = make_config("FASHION_MNIST", 28, batch_size=3, data_dir=str(tmp_path))
    train_ds, eval_ds, source = datasets.get_dataset(config, evaluation=True)
    assert source.num_examples("train") == 12 and source.num_examples("test") == 6
    got, labels = epoch(eval_ds)
    assert got.shape == (6, 28, 28, 1)
    index = match_rows(got, data["t10k"][0][..., None] / 255.0)
    np.testing.assert_array_equal(labels, data["t10k"][1][index])
    config32 = make_config("FASHION_MNIST", 32, batch_size=3, data_dir=str(tmp_path))
    assert next(iter(datasets.get_dataset(config32)[0]))["image"].shape == (1, 3, 32, 32, 1)


def test_fashion_mnist_missing(tmp_path):
    with pytest.raises(datasets.DatasetUnavailableError, match="apt-get install dataset-fashion-mnist"):
        datasets.get_dataset(make_config("FASHION_MNIST", 28, data_dir=str(tmp_path)))


@pytest.mark.skipif(not pathlib.Path(datasets.FASHION_MNIST_DEFAULT_DIR, "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_debian_package():
    splits = datasets.load_fashion_mnist()
    assert splits["train"][0].shape == (60000, 28, 28, 1) and splits["test"][0].shape == (10000, 28, 28, 1)
    for images, labels in splits.values():
        np.testing.assert_array_equal(np.bincount(labels), np.full(10, len(labels) // 10))
        assert images.max() == 255 and images.min() == 0


def test_missing_importlib_resources_is_named(tmp_path, monkeypatch):
    """tfds 4.9.10 cannot prepare anything without importlib_resources: say so before it fails obscurely."""
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / datasets.CIFAR10_BINARY_TARBALL).write_bytes(b"never read")
    real_find_spec = datasets.importlib.util.find_spec
    monkeypatch.setattr(datasets.importlib.util, "find_spec",
                        lambda name, *a: None if name == "importlib_resources" else real_find_spec(name, *a))
    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                           side_effect=AssertionError("must stop before preparing")):
        with pytest.raises(RuntimeError, match="importlib_resources.*requirements.txt"):
            datasets.get_dataset(make_config("CIFAR10", 32, data_dir=str(tmp_path)))
