"""Train the digits-FD classifier once and write it into the package.

Trains :class:`score_sde.digits_fd.DigitsClassifier` on the training split of the embedded digits
(``datasets.load_digits``: the first 1,500 images; the last ``datasets.DIGITS_NUM_EVAL`` = 297 are the
test split, as ``get_dataset`` defines them) with Adam and random shifts of up to one pixel, from a fixed
seed, then evaluates it on the test split and writes

* ``score_sde/assets/digits_classifier.npz`` — the parameters (``'Conv_0/kernel'``, ...; float32);
* ``score_sde/assets/digits_classifier.json`` — the metadata: test accuracy, training settings, the
  parameter count, the weights file's sha256 and the command.

The test accuracy is printed as the last line. Rerunning with the same settings on the same software
gives the same weights (XLA:CPU is deterministic).

Usage (repository root): ``python scripts/train_digits_classifier.py [--steps 3000] [--seed 0]``
(about a minute on two CPU cores).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from score_sde import datasets, digits_fd  # noqa: E402

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "score_sde", "assets")


def digits_splits() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``((train images, labels), (test images, labels))``: images ``(N, 8, 8, 1)`` float32 in [0, 1]."""
    images, labels = datasets.load_digits()
    images = images.astype(np.float32) / 255.0
    n_train = len(labels) - datasets.DIGITS_NUM_EVAL
    return (images[:n_train], labels[:n_train]), (images[n_train:], labels[n_train:])


def shift(rng, images):
    """Each image of ``(B, 8, 8, 1)`` moved by up to one pixel in each direction (zero fill)."""
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    offsets = jax.random.randint(rng, (images.shape[0], 2), 0, 3)
    return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (8, 8, 1)))(padded, offsets)


def train(seed: int, steps: int, batch_size: int, lr: float):
    """Parameters of the classifier after ``steps`` Adam steps on shifted training batches."""
    (x_train, y_train), _ = digits_splits()
    model = digits_fd.DigitsClassifier()
    rng, init_rng = jax.random.split(jax.random.PRNGKey(seed))
    params = model.init(init_rng, jnp.zeros((1, 8, 8, 1)))["params"]
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, rng):
        idx_rng, shift_rng = jax.random.split(rng)
        idx = jax.random.choice(idx_rng, x_train.shape[0], (batch_size,), replace=False)
        images, labels = shift(shift_rng, jnp.asarray(x_train)[idx]), jnp.asarray(y_train)[idx]

        def loss_fn(p):
            logits, _ = model.apply({"params": p}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for i in range(steps):
        rng, step_rng = jax.random.split(rng)
        params, opt_state, loss = step(params, opt_state, step_rng)
        if (i + 1) % 500 == 0:
            print(f"step {i + 1}/{steps}: training loss {float(loss):.4f}", flush=True)
    return params


def accuracy(params, images, labels) -> int:
    """The number of ``images`` the classifier labels correctly."""
    logits, _ = digits_fd.classify(images, params)
    return int(np.sum(np.argmax(logits, axis=1) == labels))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out_dir", default=ASSETS, help="where to write the weights and metadata")
    args = parser.parse_args(argv)

    params = train(args.seed, args.steps, args.batch_size, args.lr)
    (x_train, y_train), (x_test, y_test) = digits_splits()
    correct = accuracy(params, x_test, y_test)
    train_correct = accuracy(params, x_train, y_train)

    arrays = digits_fd.params_to_arrays(params)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, digits_fd.WEIGHTS_FILE), "wb") as f:
        f.write(buffer.getvalue())
    command = "python scripts/train_digits_classifier.py " + " ".join(
        f"--{k} {getattr(args, k)}" for k in ("seed", "steps", "batch_size", "lr"))
    metadata = {
        "what": "digits-FD feature classifier (score_sde.digits_fd.DigitsClassifier); not an Inception network",
        "test_accuracy": correct / len(y_test), "test_correct": correct, "test_size": len(y_test),
        "test_split": f"the last {datasets.DIGITS_NUM_EVAL} images of score_sde/data/digits.npz",
        "train_accuracy": train_correct / len(y_train), "train_size": len(y_train),
        "feature_dim": digits_fd.FEATURE_DIM,
        "parameters": int(sum(a.size for a in arrays.values())),
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
        "optimizer": f"adamw, lr {args.lr} cosine-decayed to 0, weight decay 1e-4; random shifts of up to 1 pixel",
        "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
        "command": command,
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
    }
    with open(os.path.join(args.out_dir, digits_fd.METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2)
        f.write("\n")
    print(f"train accuracy {train_correct}/{len(y_train)} = {train_correct / len(y_train):.4f}")
    print(f"test accuracy {correct}/{len(y_test)} = {correct / len(y_test):.4f} "
          f"(weights: {os.path.join(args.out_dir, digits_fd.WEIGHTS_FILE)})")
    return metadata


if __name__ == "__main__":
    main()
