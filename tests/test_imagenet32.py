"""ImageNet 32×32 (score_flow's dataset): tfds ``downsampled_imagenet/32x32`` through score_sde.datasets, mocked and
offline, and score_flow's ImageNet configs under ``configs/score_flow`` against score_flow's own files."""
from __future__ import annotations

import importlib
import json
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from score_sde import datasets
from score_sde.config_checks import validate_config
from test_datasets import download_possible, epoch, make_config, raw_split  # noqa: F401 (fixture)

IMAGENET32_CONFIGS = ["default_imagenet32_configs.py", "vp/imagenet32_ddpmpp_continuous.py",
                      "vp/imagenet32_ddpmpp_deep_continuous.py", "subvp/imagenet32_ddpmpp_continuous.py",
                      "subvp/imagenet32_ddpmpp_deep_continuous.py"]
# Fields of score_flow's configs this port leaves out (see configs/score_flow/default_cifar10_configs.py).
NOT_CARRIED = ("deq.", "eval.dequantizer", "eval.ckpt_id", "model.data_init", "model.trainable_embedding")


def test_imagenet32_reads_tfds_downsampled_imagenet(download_possible):
    """The real loading path on tfds' mock data (never downloads): the validation split, 32×32×3 in [0, 1], no labels."""
    with tfds.testing.mock_data(num_examples=16):
        num_raw = len(raw_split("downsampled_imagenet/32x32", "validation"))
        _, eval_ds, builder = datasets.get_dataset(make_config("ImageNet", 32, batch_size=8), evaluation=True)
        assert builder.name == "downsampled_imagenet" and builder.builder_config.name == "32x32"
        got, labels = epoch(eval_ds)
    # The mock's images have random sizes (the feature is (None, None, 3)); the pipeline resizes them to 32×32.
    assert num_raw == 16 and got.shape == (16, 32, 32, 3) and got.dtype == np.float32 and labels is None
    assert 0.0 <= got.min() and got.max() <= 1.0 and len({img.tobytes() for img in got}) == 16


def test_imagenet_size_must_be_one_tfds_has():
    with pytest.raises(ValueError, match="config.data.image_size = 16: tfds' downsampled_imagenet has 32x32 and 64x64"):
        datasets.get_dataset(make_config("ImageNet", 16))


def test_imagenet32_offline_names_the_files_and_the_fix(tmp_path, monkeypatch):
    """Unprepared and offline (the probe pointed at a closed local port): our message at once, this resolution's
    tarballs named, without downloading anything."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(datasets.DatasetUnavailableError) as info:
        datasets.get_dataset(make_config("ImageNet", 32, data_dir=str(tmp_path)))
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "downsampled_imagenet/32x32" in message and f"{tmp_path}/downloads/manual" in message
    assert "download_and_prepare" in message
    assert "train_32x32.tar" in message and "valid_32x32.tar" in message and "64x64" not in message
    assert not (tmp_path / "downloads" / "manual").exists()


def _flat_config(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat_config(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", {"tuple": list(value)} if isinstance(value, tuple) else value


@pytest.mark.parametrize("relpath", IMAGENET32_CONFIGS)
def test_score_flow_imagenet32_configs_match_the_original(relpath, golden_dir):
    original = json.loads((golden_dir / "score_flow_imagenet32_configs.json").read_text())[relpath]
    module = importlib.import_module("configs.score_flow." + relpath[:-3].replace("/", "."))
    config = (getattr(module, "get_config", None) or module.get_default_configs)()
    ours = dict(_flat_config(config.to_dict()))
    for field, value in original.items():
        if field.startswith(NOT_CARRIED):
            continue
        assert field in ours, field
        assert ours[field] == value and type(ours[field]) is type(value), (field, ours[field], value)
    assert config.data.dataset == "ImageNet" and config.data.image_size == 32
    if relpath != "default_imagenet32_configs.py":
        validate_config(config, "train")
