"""The order of a run's examples and their random augmentation, drawn from ``config.seed``.

Two runs of one config read the same examples in the same order, flipped and dequantised alike, so a
run is reproducible. Every random choice is a stateless function of a stream seed (``config.seed``, the
split, this process's index) and of the example's *position* in its stream (0, 1, 2, ... over epochs):

- In-memory data (:class:`score_sde.datasets.ArraySource`: digits, GMM, Fashion-MNIST, the CIFAR-10
  tarball) are read in a fresh random permutation each epoch, computed for each position on its own
  (``tf.random.experimental.index_shuffle``). A stream can therefore start at any position, and the
  train stream of a run resumed at step ``s`` is exactly what an uninterrupted run reads from step ``s``
  on (:func:`first_positions`; exact while ``training.batch_size`` is unchanged).
- Sequential data (tfds, TFRecords) go through a seeded shuffle buffer, as the original's unseeded one.
  A resumed run cannot skip to its position cheaply, so it reseeds the buffer with the step it resumes
  at: every run resumed at that step reads the same stream, but not the one an uninterrupted run reads.

Processes (hosts) get different streams: the process index is part of the seed.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from score_sde import parallel

TRAIN_SPLIT, EVAL_SPLIT = 0, 1
_FLIP, _NOISE = 0, 1


def stream_seed(config, split: int, reseed: int = 0) -> tf.Tensor:
    """The ``(2,)`` int64 seed of one split's stream on this process (``reseed``: see the module doc).

    ``config.seed`` (0 where a hand-made config has none).
    """
    seed = tf.constant([config.get("seed", 0), split], tf.int64)
    for value in (parallel.process_index(), reseed):
        seed = tf.random.experimental.stateless_fold_in(seed, tf.constant(value, tf.int64))
    return seed


def shuffle_seed(seed: tf.Tensor) -> int:
    """A Python int for ``Dataset.shuffle`` and tfds' file shuffling, drawn from a stream seed.

    Drawn with the whole seed: ``stateless_fold_in`` puts the folded value in the second element.
    """
    return int(tf.random.stateless_uniform([], seed, minval=0, maxval=2**31 - 1, dtype=tf.int64))


def permuted_examples(images: np.ndarray, labels: np.ndarray, seed: tf.Tensor, first: int,
                      epochs: int | None) -> tuple[tf.data.Dataset, Callable[[tf.Tensor], dict]]:
    """``(positions, example_at)``: the positions from ``first`` on, and the example at a position.

    Epoch ``e`` reads a permutation seeded by ``e``. ``images`` ``(N, ...)``, ``labels`` ``(N,)``;
    ``epochs`` None repeats forever. (The caller maps ``example_at`` together with its preprocessing:
    one map per example, not two.)
    """
    count = len(labels)
    end = np.iinfo(np.int64).max if epochs is None else count * epochs
    images, labels = tf.constant(images), tf.constant(labels)

    def example_at(position: tf.Tensor) -> dict:
        epoch, offset = position // count, position % count
        index = tf.random.experimental.index_shuffle(
            offset, tf.random.experimental.stateless_fold_in(seed, epoch), count - 1)
        return {"image": tf.gather(images, index), "label": tf.gather(labels, index)}

    return tf.data.Dataset.range(first, end), example_at


def augment(img: tf.Tensor, seed: tf.Tensor, position: tf.Tensor, random_flip: bool,
            uniform_dequantization: bool) -> tf.Tensor:
    """A random left-right flip and/or uniform dequantisation ``(255 x + U[0, 1)) / 256`` of an image in [0, 1].

    Drawn from ``seed`` and the example's ``position``: the same example at the same position is
    augmented alike in every run.
    """
    example_seed = tf.random.experimental.stateless_fold_in(seed, position)
    if random_flip:
        flip_seed = tf.random.experimental.stateless_fold_in(example_seed, _FLIP)
        img = tf.image.stateless_random_flip_left_right(img, flip_seed)
    if uniform_dequantization:
        noise_seed = tf.random.experimental.stateless_fold_in(example_seed, _NOISE)
        img = (tf.random.stateless_uniform(tf.shape(img), noise_seed, dtype=tf.float32) + img * 255.0) / 256.0
    return img


def first_positions(config, train_examples_per_step: int, eval_examples_per_batch: int,
                    start_step: int) -> tuple[int, int]:
    """Where a training run that starts at ``start_step`` begins its train and eval streams (in examples).

    Each train step reads ``train_examples_per_step`` examples on this process; the training loop
    draws one eval batch every ``config.training.eval_freq`` steps.
    """
    if start_step == 0:
        return 0, 0
    evals_done = start_step // config.training.eval_freq
    return start_step * train_examples_per_step, evals_done * eval_examples_per_batch
