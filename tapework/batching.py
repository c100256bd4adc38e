"""tf.data input pipelines: seeded, resumable per-epoch shuffling and batching."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch, a pure function of (seed, epoch).

    Deriving it from the epoch number (not from a stateful RNG) is what lets a resumed run see
    exactly the batches an uninterrupted run would have seen.
    """
    return np.random.default_rng([seed, epoch]).permutation(size)


def make_dataset(
    inputs: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int | None = None,
    epoch: int = 0,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Batches of (inputs, labels); shuffled per epoch when `seed` is given, in order otherwise.

    Built for a per-epoch rebuild: the epoch's order is cut into index batches here, in NumPy,
    so the pipeline handles one element per batch (not one per example followed by `.batch`),
    and each batch is a single gather from the arrays.
    """
    size = len(inputs)
    order = np.arange(size) if seed is None else epoch_permutation(size, seed, epoch)
    full, rest = divmod(size, batch_size)
    inputs_tensor = tf.constant(inputs)
    labels_tensor = tf.constant(labels)
    indices = tf.data.Dataset.from_tensor_slices(order[: full * batch_size].reshape(full, batch_size))
    if rest and not drop_remainder:
        indices = indices.concatenate(tf.data.Dataset.from_tensors(order[full * batch_size :]))

    def gather(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        if not drop_remainder:
            # The element_spec `.batch(drop_remainder=False)` gives: batch dimension unknown.
            index = tf.compat.v1.placeholder_with_default(index, [None])
        return tf.gather(inputs_tensor, index), tf.gather(labels_tensor, index)

    options = tf.data.Options()
    # The static rewrites have nothing to improve in this pipeline, and applying them serialises
    # it at every iter(): a cost paid each epoch, since the dataset is rebuilt each epoch.
    options.experimental_optimization.apply_default_optimizations = False
    return indices.map(gather).with_options(options).prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(size: int, batch_size: int, drop_remainder: bool) -> int:
    return size // batch_size if drop_remainder else -(-size // batch_size)
