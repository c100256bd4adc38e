"""tf.data input pipelines: seeded, resumable per-epoch shuffling and batching, from arrays or shards."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tapework.preprocess import Prepared
from tapework.shards import Layout, split_files

# Elements read ahead of the step: one is enough to hide the read (each element is a whole batch
# or stack), a second absorbs jitter. A fixed depth, because autotuning is off (see `read_ahead`).
PREFETCH_ELEMENTS = 2


def read_ahead(dataset: tf.data.Dataset, options: tf.data.Options | None = None) -> tf.data.Dataset:
    """The pipeline's last step: `PREFETCH_ELEMENTS` read ahead, tf.data autotuning off.

    Autotuning runs a model thread per iterator that sleeps on a doubling timer (10 ms up to
    seconds), and deleting the iterator at the end of an epoch waits until that thread wakes:
    0 to 1.2 s per epoch, measured here (README, Performance, "The epoch's end waited for
    tf.data"). A fixed depth needs no such thread and reads the same elements in the same order.
    """
    options = options or tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options).prefetch(PREFETCH_ELEMENTS)


def epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch, a pure function of (seed, epoch).

    Deriving it from the epoch number (not from a stateful RNG) is what lets a resumed run see
    exactly the batches an uninterrupted run would have seen.
    """
    return np.random.default_rng([seed, epoch]).permutation(size)


def make_dataset(
    inputs: np.ndarray | tf.Tensor,
    labels: np.ndarray | tf.Tensor,
    batch_size: int,
    *,
    seed: int | None = None,
    epoch: int = 0,
    drop_remainder: bool = False,
    stack: int = 0,
) -> tf.data.Dataset:
    """Batches of (inputs, labels); shuffled per epoch when `seed` is given, in order otherwise.

    Built for a per-epoch rebuild: the epoch's order is cut into index batches here, in NumPy,
    so the pipeline handles one element per batch (not one per example followed by `.batch`),
    and each batch is a single gather from the arrays.

    With `stack` > 0 each element is instead (inputs, labels, count): a stack of `stack`
    consecutive batches shaped (stack, batch_size, ...) of which the first `count` are run (only
    the last stack of full batches has count < stack), then the short last batch alone as a stack
    of one. The train function runs a stack as one XLA program. The batches run, and their order,
    are the same as without `stack`.
    """
    size = len(inputs)
    order = np.arange(size) if seed is None else epoch_permutation(size, seed, epoch)
    full, rest = divmod(size, batch_size)
    inputs_tensor = tf.constant(inputs)
    labels_tensor = tf.constant(labels)
    batches = order[: full * batch_size].reshape(full, batch_size)
    if stack:
        stacks, left = divmod(full, stack)
        groups = batches[: stacks * stack].reshape(stacks, stack, batch_size)
        counts = [stack] * stacks
        if left:
            # The last full batches padded to a whole stack with copies of its first batch, which are never
            # run (counts): every stack of full batches has one shape, so XLA compiles one program for them.
            padding = np.repeat(batches[stacks * stack : stacks * stack + 1], stack - left, axis=0)
            groups = np.concatenate([groups, np.concatenate([batches[stacks * stack :], padding])[np.newaxis]])
            counts.append(left)
        indices = tf.data.Dataset.from_tensor_slices((groups, np.array(counts, np.int32)))
        if rest and not drop_remainder:
            indices = indices.concatenate(tf.data.Dataset.from_tensors((order[full * batch_size :][np.newaxis], np.int32(1))))
    else:
        indices = tf.data.Dataset.from_tensor_slices(batches)
        if rest and not drop_remainder:
            indices = indices.concatenate(tf.data.Dataset.from_tensors(order[full * batch_size :]))

    @tf.autograph.experimental.do_not_convert  # no tensor control flow: skip AutoGraph's rewrite (see loop.plain_graph)
    def gather(index: tf.Tensor, count: tf.Tensor | None = None) -> tuple[tf.Tensor, ...]:
        if not drop_remainder or stack:
            # The element_spec `.batch(drop_remainder=False)` gives: batch dimension unknown (the short batch's stack too).
            index = tf.compat.v1.placeholder_with_default(index, [None] * (2 if stack else 1))
        if count is None:
            return tf.gather(inputs_tensor, index), tf.gather(labels_tensor, index)
        return tf.gather(inputs_tensor, index), tf.gather(labels_tensor, index), count

    options = tf.data.Options()
    # The static rewrites have nothing to improve in this pipeline, and applying them serialises
    # it at every iter(): a cost paid each epoch, since the dataset is rebuilt each epoch.
    options.experimental_optimization.apply_default_optimizations = False
    return read_ahead(indices.map(gather), options)


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
    shuffle_window: int = 1,
    worker: tuple[int, int] = (0, 1),
    stack: int = 0,
) -> tf.data.Dataset:
    """Batches of one split from either prepared format; shuffled per epoch when `seed` is given, in order otherwise.

    Arrays shuffle the whole split (`make_dataset`). Shards stream through `shard_dataset`, shuffled
    within windows of `shuffle_window` examples; `worker = (index, count)` keeps only that
    worker's own shard files. `stack`: see `make_dataset` (arrays only).
    """
    if not data.sharded:
        if split not in data.tensors:
            data.tensors[split] = tuple(tf.constant(array) for array in data.split(split))
        inputs, labels = data.tensors[split]  # make_dataset's tf.constant returns a tensor as it is: no copy
        return make_dataset(inputs, labels, batch_size, seed=seed, epoch=epoch, drop_remainder=drop_remainder, stack=stack)
    if stack:
        raise ValueError("stacked batches are built from arrays only")
    files = [(str(data.directory / name), count) for name, count in worker_shards(split_files(data.meta, split), *worker)]
    return shard_dataset(files, Layout.from_meta(data.meta), batch_size, seed=seed, epoch=epoch, drop_remainder=drop_remainder, shuffle_window=shuffle_window)


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


def shard_windows(files: list[tuple[str, int]], seed: int | None, epoch: int, window: int) -> list[tuple[list[str], np.ndarray | None]]:
    """One epoch's plan over shard files: groups of whole shards and, with `seed`, a permutation of each group's rows.

    A pure function of (files, seed, epoch, window), like `epoch_permutation`: the shards in
    `epoch_permutation` order, cut into groups of at least `window` examples (whole shards, at
    least one), each group's rows in a seeded permutation. Without `seed`: file order, unshuffled.
    """
    order = np.arange(len(files)) if seed is None else epoch_permutation(len(files), seed, epoch)
    groups: list[list[int]] = []
    held = 0
    for index in order:
        if not groups or held >= window:
            groups.append([])
            held = 0
        groups[-1].append(int(index))
        held += files[index][1]
    plan = []
    for number, group in enumerate(groups):
        rows = sum(files[index][1] for index in group)
        permutation = None if seed is None else np.random.default_rng([seed, epoch, number]).permutation(rows).astype(np.int32)
        plan.append(([files[index][0] for index in group], permutation))
    return plan


def shard_dataset(
    files: list[tuple[str, int]],
    layout: Layout,
    batch_size: int,
    *,
    seed: int | None = None,
    epoch: int = 0,
    drop_remainder: bool = False,
    shuffle_window: int = 1,
) -> tf.data.Dataset:
    """Batches decoded from fixed-length record files (tapework/shards.py), streamed with bounded memory.

    `files` are (path, examples) pairs. The pipeline reads one group of whole shards at a time
    (`shard_windows`: at least `shuffle_window` examples), permutes its rows when `seed` is
    given, and cuts the groups' rows into batches across group boundaries, so every example is
    read exactly once per epoch and only the last batch can be short. Every step works on whole
    groups or batches, never on single records: per-element costs in tf.data would otherwise
    dominate on a CPU that also trains.
    """
    plan = shard_windows(files, seed, epoch, shuffle_window)
    names = tf.ragged.constant([group for group, _ in plan], dtype=tf.string)
    record = layout.record_bytes

    @tf.autograph.experimental.do_not_convert  # no tensor control flow: skip AutoGraph's rewrite (see loop.plain_graph)
    def read(group: tf.Tensor, permutation: tf.Tensor | None = None) -> tf.Tensor:
        contents = tf.strings.reduce_join(tf.map_fn(tf.io.read_file, group, fn_output_signature=tf.string))
        rows = tf.reshape(tf.io.decode_raw(contents, tf.uint8), [-1, record])
        return rows if permutation is None else tf.gather(rows, permutation)

    if seed is None:
        groups = tf.data.Dataset.from_tensor_slices(names).map(read)
    else:
        # Built from one flat array: tf.ragged.constant would walk a million-entry permutation in Python.
        permutations = tf.RaggedTensor.from_row_lengths(np.concatenate([permutation for _, permutation in plan]), [len(permutation) for _, permutation in plan])
        groups = tf.data.Dataset.from_tensor_slices((names, permutations)).map(read)
    batch_dimension = batch_size if drop_remainder else -1
    input_shape = list(layout.input_shape)

    @tf.autograph.experimental.do_not_convert  # no tensor control flow: skip AutoGraph's rewrite (see loop.plain_graph)
    def decode(raw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # One decode per batch: slice the record bytes, then reinterpret them (little-endian) as the prepared dtypes.
        inputs, labels = raw[:, : layout.input_bytes], raw[:, layout.input_bytes :]
        if layout.input_dtype == "float32":
            inputs = tf.bitcast(tf.reshape(inputs, [batch_dimension, *input_shape, 4]), tf.float32)
        else:
            inputs = tf.reshape(inputs, [batch_dimension, *input_shape])
        return inputs, tf.bitcast(tf.reshape(labels, [batch_dimension, 4]), tf.as_dtype(layout.label_dtype))

    # prefetch(1) on groups: the next group is read while this one is consumed, and no more (memory stays bounded).
    batches = groups.prefetch(1).rebatch(batch_size, drop_remainder=drop_remainder)
    return read_ahead(batches.map(decode))
