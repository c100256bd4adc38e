"""tf.data input pipelines: seeded, resumable per-epoch shuffling and batching, from arrays or shards."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tapework.preprocess import Prepared
from tapework.shards import Layout, split_files

# Shard files read at once while training: enough to mix neighbouring shards before the shuffle buffer.
INTERLEAVED_SHARDS = 4
READ_BUFFER_BYTES = 1 << 20  # per open shard file


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


def split_dataset(
    data: Prepared,
    split: str,
    batch_size: int,
    *,
    seed: int | None = None,
    epoch: int = 0,
    drop_remainder: bool = False,
    shuffle_buffer: int = 1,
    worker: tuple[int, int] = (0, 1),
) -> tf.data.Dataset:
    """Batches of one split from either prepared format; shuffled per epoch when `seed` is given, in order otherwise.

    Arrays shuffle the whole split (`make_dataset`); shards stream through `shard_dataset`, and
    `worker = (index, count)` keeps only that worker's own shard files.
    """
    if not data.sharded:
        inputs, labels = data.split(split)
        return make_dataset(inputs, labels, batch_size, seed=seed, epoch=epoch, drop_remainder=drop_remainder)
    files = [str(data.directory / name) for name, _ in worker_shards(split_files(data.meta, split), *worker)]
    return shard_dataset(files, Layout.from_meta(data.meta), batch_size, seed=seed, epoch=epoch, drop_remainder=drop_remainder, shuffle_buffer=shuffle_buffer)


def worker_shards(files: list[tuple[str, int]], index: int, count: int) -> list[tuple[str, int]]:
    """The shard files worker `index` of `count` reads: every count-th file, the same ones every epoch."""
    return files[index::count]


def split_steps(data: Prepared, split: str, batch_size: int, drop_remainder: bool, workers: int = 1) -> int:
    """Steps in one epoch of `split_dataset`: with several workers reading their own shards, the longest worker's.

    `batch_size` is the global batch; each of `workers` reads batches of batch_size / workers.
    """
    if not data.sharded or workers == 1:
        return steps_per_epoch(data.count(split), batch_size, drop_remainder)
    files = split_files(data.meta, split)
    return max(steps_per_epoch(sum(count for _, count in worker_shards(files, index, workers)), batch_size // workers, drop_remainder) for index in range(workers))


def shuffle_seed(seed: int, epoch: int) -> int:
    """The shuffle buffer's op seed for one epoch, a pure function of (seed, epoch) like epoch_permutation."""
    return int(np.random.default_rng([seed, epoch, 1]).integers(2**31 - 1))


def shard_dataset(
    files: list[str],
    layout: Layout,
    batch_size: int,
    *,
    seed: int | None = None,
    epoch: int = 0,
    drop_remainder: bool = False,
    shuffle_buffer: int = 1,
) -> tf.data.Dataset:
    """Batches decoded from fixed-length record files (tapework/shards.py), streamed with bounded memory.

    With `seed`, the epoch's order is a function of (seed, epoch) only: the files in
    `epoch_permutation` order, read INTERLEAVED_SHARDS at a time in a fixed round-robin, then a
    seeded buffer of `shuffle_buffer` examples. Without it, every record in file order. Each
    record is read exactly once, so every example counts once in the epoch's metrics.
    """
    if seed is not None:
        files = [files[index] for index in epoch_permutation(len(files), seed, epoch)]
    names = tf.data.Dataset.from_tensor_slices(tf.constant(files, dtype=tf.string, shape=[len(files)]))

    def read(name: tf.Tensor) -> tf.data.Dataset:
        return tf.data.FixedLengthRecordDataset(name, layout.record_bytes, buffer_size=READ_BUFFER_BYTES)

    if seed is None:
        records = names.flat_map(read)
    else:
        cycle = max(1, min(INTERLEAVED_SHARDS, len(files)))
        records = names.interleave(read, cycle_length=cycle, block_length=1, num_parallel_calls=cycle, deterministic=True)
        records = records.shuffle(shuffle_buffer, seed=shuffle_seed(seed, epoch))
    batch_dimension = batch_size if drop_remainder else -1
    input_shape = list(layout.input_shape)

    def decode(batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # One decode per batch, not per record: the records are byte strings of one fixed length.
        raw = tf.io.decode_raw(batch, tf.uint8)
        inputs, labels = raw[:, : layout.input_bytes], raw[:, layout.input_bytes :]
        if layout.input_dtype == "float32":
            inputs = tf.bitcast(tf.reshape(inputs, [batch_dimension, *input_shape, 4]), tf.float32)  # little-endian bytes -> float32
        else:
            inputs = tf.reshape(inputs, [batch_dimension, *input_shape])
        return inputs, tf.bitcast(tf.reshape(labels, [batch_dimension, 4]), tf.as_dtype(layout.label_dtype))

    options = tf.data.Options()
    options.deterministic = True  # the parallel read and decode keep their order
    batches = records.batch(batch_size, drop_remainder=drop_remainder)
    return batches.map(decode, num_parallel_calls=tf.data.AUTOTUNE).with_options(options).prefetch(tf.data.AUTOTUNE)
