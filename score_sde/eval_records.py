"""The evaluation job's files: dataset statistics, per-round npz files, resume metadata, summaries.

Used by ``run_lib.evaluate`` / ``run_lib.fid_stats``. Everything that makes an evaluation
resumable lives here: the meta file written after every round (:class:`EvalMeta`), the
settings that define its results (:func:`result_settings`), the canonical order of the
evaluation images and the seeded dequantisation noise. Writes are atomic (temporary file,
rename), so a killed job leaves whole files only.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
import tensorflow as tf

from score_sde import config_checks, inception, metrics
from score_sde.datasets import DatasetUnavailableError

DEFAULT_STATS_DIR = os.path.join("assets", "stats")


class StatsUnavailableError(DatasetUnavailableError):
    """The dataset statistics file for FID / KID is missing; the message says how to make it."""


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
    pool_3 = np.asarray(pool_3, np.float32)
    mu, sigma = metrics.gaussian_statistics(pool_3)
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


def check_stats_extractor(stats: Mapping, extractor: inception.FeatureExtractor, path: str, feature_dim: int) -> None:
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
# The evaluation job's bookkeeping
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class EvalMeta:
    """Where a (possibly interrupted) evaluation stands, written after every round.

    Attributes:
        ckpt_id: the checkpoint being evaluated.
        loss_done: the eval-set loss of ``ckpt_id`` is written.
        bpd_rounds_done: bits/dim rounds written for ``ckpt_id``.
        bound_rounds_done: likelihood-bound rounds written for ``ckpt_id`` (0 in meta files from before the bound).
        sampling_rounds_done: sampling rounds written for ``ckpt_id`` (this host).
        metrics_done: IS / FID / KID of ``ckpt_id`` are written.
        rng: the raw PRNG key data (uint32 list) to continue with.
    """

    ckpt_id: int
    rng: list
    loss_done: bool = False
    bpd_rounds_done: int = 0
    bound_rounds_done: int = 0
    sampling_rounds_done: int = 0
    metrics_done: bool = False


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


def update_eval_meta(eval_dir: str, host: int, meta: EvalMeta, **changes) -> EvalMeta:
    """``meta`` with ``changes`` applied, saved (:func:`save_eval_meta`) before it is returned."""
    meta = dataclasses.replace(meta, **changes)
    save_eval_meta(eval_dir, host, meta)
    return meta


# Config fields that change no number an evaluation writes: which checkpoints, how long to wait
# for them, which parts to compute (each part keeps its own settings), where the data are read,
# and model fields used only in training (evaluation runs params_ema without dropout).
FREE_FIELDS = ("eval.begin_ckpt", "eval.end_ckpt", "eval.wait_for_checkpoints_s", "eval.enable_loss",
               "eval.enable_bpd", "eval.enable_bound", "eval.enable_sampling", "data.data_dir", "model.ema_rate",
               "model.dropout")
# Sections of the config that define an evaluation's numbers (with ``seed``): the data and its
# dequantisation, the model and its SDE, the samplers and ODE solver, eval.* (batch size,
# num_samples, bpd_dataset, the feature network and statistics files).
RESULT_SECTIONS = ("data", "model", "sampling", "eval")
# Fields of config.training that the evaluation loss (and the bound: smallest_time) depends on.
RESULT_TRAINING_FIELDS = ("training.sde", "training.continuous", "training.reduce_mean",
                          "training.likelihood_weighting", "training.importance_weighting", "training.smallest_time")
# Fields (by prefix) that only one part of the evaluation uses: they define results only while the
# switch of that part is on (the ODE fields serve both bits/dim and the ODE sampler).
PART_FIELDS = {
    "eval.enable_loss": ("training.", "data.uniform_dequantization"),
    "eval.enable_bpd": ("sampling.ode_", "eval.bpd_dataset"),
    "eval.enable_bound": ("eval.bound_num_times", "eval.dsm", "eval.offset", "eval.bpd_dataset",
                          "training.smallest_time"),
    "eval.enable_sampling": ("sampling.", "eval.num_samples", "eval.inception_path", "eval.stats_dir"),
}
SETTINGS_FILE = "settings.json"


def result_settings(config, device_count: int) -> dict:
    """The settings that define an evaluation's results, as ``{'section.field': JSON value}``.

    Every field of :data:`RESULT_SECTIONS`, :data:`RESULT_TRAINING_FIELDS` and ``seed``, less
    :data:`FREE_FIELDS` and the :data:`PART_FIELDS` of the parts that are off, plus ``devices``:
    the number of devices, since the random numbers of bits/dim and sampling are drawn per device.
    """
    flat = config_checks.flatten(config.to_dict())

    def used(key: str) -> bool:
        switches = [switch for switch, prefixes in PART_FIELDS.items() if key.startswith(prefixes)]
        return not switches or any(flat[switch] for switch in switches)

    chosen = {key: value for key, value in flat.items()
              if (key.split(".")[0] in RESULT_SECTIONS or key in RESULT_TRAINING_FIELDS or key == "seed")
              and key not in FREE_FIELDS and used(key)}
    chosen["devices"] = int(device_count)
    # Through JSON, so that values compare as they are stored (tuples become lists).
    return json.loads(json.dumps(chosen, sort_keys=True, default=str))


def settings_path(eval_dir: str) -> str:
    return os.path.join(eval_dir, SETTINGS_FILE)


def load_settings(eval_dir: str) -> dict | None:
    """The settings recorded with the results in ``eval_dir``, or None if none are recorded."""
    path = settings_path(eval_dir)
    if not os.path.exists(path):
        return None
    with open(path) as fin:
        return json.load(fin)


def save_settings(eval_dir: str, settings: Mapping) -> None:
    """Record ``settings`` (see :func:`result_settings`) in ``eval_dir`` atomically."""
    path = settings_path(eval_dir)
    tmp = path + ".tmp"
    with open(tmp, "w") as fout:
        json.dump(settings, fout, indent=2, sort_keys=True)
        fout.write("\n")
    os.replace(tmp, path)


def settings_differences(recorded: Mapping, current: Mapping) -> list[str]:
    """``'field: recorded -> current'`` for every field recorded and current with different values.

    A field on one side only (a part switched on or off, a field a newer config added) is no
    difference: :func:`merged_settings` then records it.
    """
    return [f"{key}: {recorded[key]!r} -> {current[key]!r}"
            for key in sorted(set(recorded) & set(current)) if recorded[key] != current[key]]


def merged_settings(recorded: Mapping | None, current: Mapping) -> dict:
    """What to record after a run with ``current`` settings: ``recorded`` (None: nothing yet) updated by them."""
    return {**(recorded or {}), **current}


def key_to_list(key) -> list:
    """Raw uint32 data of a JAX PRNG key (raw or typed) as a JSON-friendly list."""
    data = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return [int(v) for v in np.asarray(data, np.uint32).reshape(-1)]


def write_npz(path: str, *args, **kwargs) -> None:
    """``np.savez_compressed`` to ``path`` atomically (readers never see a partial file)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, *args, **kwargs)
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "wb") as fout:
        fout.write(buffer.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)


def read_npz(path: str) -> dict:
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
    """What the files of checkpoint ``ckpt`` in ``eval_dir`` say: loss, bits/dim, the bound, IS / FID / KID.

    Bits/dim and the bound are means over every per-example value written (data points x repeats),
    each with its standard error (the bound's covers its Monte-Carlo noise over time and noise too).
    """
    row: dict = {}
    loss_file = os.path.join(eval_dir, f"ckpt_{ckpt}_loss.npz")
    if os.path.exists(loss_file):
        row["eval loss"] = float(read_npz(loss_file)["mean_loss"])
    for kind, label in (("bpd", "bits/dim"), ("bound", "bound bits/dim")):
        files = glob.glob(os.path.join(eval_dir, f"{bpd_dataset}_ckpt_{ckpt}_{kind}_*.npz"))
        if files:
            values = np.concatenate([read_npz(f)["arr_0"].reshape(-1) for f in sorted(files)])
            row[f"{label} ({bpd_dataset})"] = float(values.mean())
            row[f"{label} std. error"] = (float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1
                                          else float("nan"))
            row[f"{label} evaluations"] = int(values.size)
    report_file = os.path.join(eval_dir, f"report_{ckpt}.npz")
    if os.path.exists(report_file) and names is not None:
        report = read_npz(report_file)
        for key in ("IS", "fid", "kid"):
            value = float(report[key])
            row[names[key]] = None if (key == "IS" and value < 0) else value
        if "num_samples" in report:
            row["samples"] = int(report["num_samples"])
    return row
