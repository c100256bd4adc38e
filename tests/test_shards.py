"""preprocess.format: shards: the records equal the arrays, memory stays bounded, damage is refused,
and the streamed epochs are exact (each example once), reproducible and resumable."""

import dataclasses
import json
import tracemalloc

import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_digits

from tapework.errors import DataError
from tapework.preprocess import RawDataset, RawSource, load_prepared, prepare, prepared_format, write_shards
from tapework.shards import Layout, iter_split, shard_name, split_files
from tests.conftest import make_params


def digits_raw() -> RawDataset:
    data = load_digits()
    return RawDataset(data.images.astype(np.uint8)[..., None], data.target, None, None, "classification", tuple(map(str, range(10))), None, (8, 8, 1))


def diabetes_raw() -> RawDataset:
    data = load_diabetes()
    return RawDataset(data.data, data.target, None, None, "regression", (), tuple(data.feature_names), None)


def chunked(raw: RawDataset, rows: int) -> RawSource:
    """`raw` as a streamed source whose chunks do not line up with the shards."""
    source = RawSource.from_arrays(raw)
    return dataclasses.replace(source, train_inputs=lambda: (raw.x_train[start : start + rows] for start in range(0, len(raw.x_train), rows)))


@pytest.fixture(scope="module")
def sharded_digits(tmp_path_factory):
    """Digits (400 training examples) as arrays and as shards of 37 examples, from the same params."""
    params = make_params({"preprocess.max_train_examples": 400, "preprocess.shard_size": 37}).preprocess
    folder = tmp_path_factory.mktemp("shards") / "prepared"
    write_shards(chunked(digits_raw(), 123), params, "digits", folder)
    return prepare(digits_raw(), params, "digits"), load_prepared(folder)


@pytest.mark.parametrize("raw", [digits_raw, diabetes_raw], ids=["classification", "regression"])
@pytest.mark.parametrize("changes", [{}, {"preprocess.max_train_examples": 300, "preprocess.normalization": "minmax"}], ids=["defaults", "subsample-minmax"])
def test_shards_hold_the_arrays_records_and_the_same_meta(raw, changes, tmp_path):
    params = make_params({**changes, "preprocess.shard_size": 97}).preprocess
    arrays = prepare(raw(), params, "data")
    meta = write_shards(chunked(raw(), 123), params, "data", tmp_path / "prepared")
    sharded = load_prepared(tmp_path / "prepared")
    for split in ("train", "val", "test"):
        inputs, labels = sharded.split(split)
        expected_inputs, expected_labels = arrays.split(split)
        assert inputs.dtype == expected_inputs.dtype and labels.dtype == expected_labels.dtype
        assert inputs.tobytes() == expected_inputs.tobytes() and labels.tobytes() == expected_labels.tobytes(), split
        assert np.array_equal(sharded.labels(split), expected_labels)
        counts = [count for _, count in split_files(meta, split)]
        assert all(count == 97 for count in counts[:-1]) and sum(counts) == len(expected_labels)
    # Statistics, counts and classes agree bit for bit: the statistics run over the same chunks.
    assert {key: value for key, value in meta.items() if key in arrays.meta} == json.loads(json.dumps(arrays.meta))
    assert sorted(path.name for path in (tmp_path / "prepared").iterdir()) == sorted([*meta["sha256"], "meta.json"])


def test_auto_picks_shards_above_the_size_threshold():
    source = RawSource.from_arrays(digits_raw())  # 1,797 images of 64 bytes: 115,008 bytes
    size_mib = 1797 * 64 / 2**20
    assert prepared_format(make_params({"preprocess.format": "auto", "preprocess.shards_above_mib": size_mib * 1.01}).preprocess, source) == "arrays"
    assert prepared_format(make_params({"preprocess.format": "auto", "preprocess.shards_above_mib": size_mib * 0.99}).preprocess, source) == "shards"
    assert prepared_format(make_params({"preprocess.format": "shards", "preprocess.shards_above_mib": 1e9}).preprocess, source) == "shards"


def test_writing_shards_holds_one_chunk_in_memory_not_the_data_set(tmp_path):
    """Peak Python allocations while 30,000 or 60,000 generated 784-byte examples stream into shards."""

    def peak(examples: int) -> int:
        rows = 500

        def inputs():
            for start in range(0, examples, rows):
                yield np.random.default_rng(start).integers(0, 256, (min(rows, examples - start), 28, 28, 1), dtype=np.uint8)

        labels = np.arange(examples) % 10
        source = RawSource(labels, None, inputs, None, (28, 28, 1), np.dtype(np.uint8), "classification", tuple("0123456789"), None, (28, 28, 1))
        tracemalloc.start()
        write_shards(source, make_params({"preprocess.shard_size": 1000}).preprocess, "generated", tmp_path / f"prepared-{examples}")
        _, highest = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return highest

    small, large = peak(30_000), peak(60_000)
    assert large < 60_000 * 784 / 2, (small, large)  # well under the 47 MB of pixels
    assert large < small * 1.1, (small, large)  # twice the data, the same peak


def damage_flip(folder, meta):
    path = folder / split_files(meta, "train")[1][0]
    data = bytearray(path.read_bytes())
    data[5] ^= 1
    path.write_bytes(bytes(data))
    return "does not match the hash in meta.json"


def damage_truncate(folder, meta):
    path = folder / split_files(meta, "val")[0][0]
    path.write_bytes(path.read_bytes()[:-3])
    return "truncated or replaced"


def damage_delete(folder, meta):
    (folder / split_files(meta, "test")[-1][0]).unlink()
    return "is missing (meta.json lists it)"


def damage_listing(folder, meta):
    edited = json.loads((folder / "meta.json").read_text())
    edited["shards"]["train"] = edited["shards"]["train"][:-1]  # one shard fewer than the counts say
    (folder / "meta.json").write_text(json.dumps(edited))
    return "changed after preprocess wrote it"


@pytest.mark.parametrize("damage", [damage_flip, damage_truncate, damage_delete, damage_listing])
def test_a_corrupt_or_missing_shard_is_refused_before_training(damage, tmp_path):
    folder = tmp_path / "prepared"
    meta = write_shards(RawSource.from_arrays(digits_raw()), make_params({"preprocess.shard_size": 200}).preprocess, "digits", folder)
    load_prepared(folder)  # intact: accepted
    expected = damage(folder, meta)
    with pytest.raises(DataError, match="re-run the preprocess stage") as error:
        load_prepared(folder)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_iter_split_yields_exact_chunks_across_shard_files(sharded_digits):
    arrays, sharded = sharded_digits
    chunks = list(iter_split(sharded.directory, sharded.meta, "train", 50))
    assert [len(labels) for _, labels in chunks] == [50] * 8
    assert np.concatenate([inputs for inputs, _ in chunks]).tobytes() == arrays.split("train")[0].tobytes()
    assert shard_name("train", 3) == "train-00003.rec"
    layout = Layout((2, 3), "float32", "int32")
    inputs, labels = np.arange(12, dtype=np.float32).reshape(2, 2, 3), np.array([7, -1])
    decoded = layout.decode(layout.encode(inputs, labels))
    assert layout.record_bytes == 28 and np.array_equal(decoded[0], inputs) and decoded[1].tolist() == [7, -1]


def test_workers_read_disjoint_shards_that_cover_the_split_and_steps_follow_the_longest(sharded_digits):
    from tapework.batching import split_steps, worker_shards

    _, sharded = sharded_digits
    files = split_files(sharded.meta, "train")  # 400 examples: 10 shards of 37 and one of 30
    parts = [worker_shards(files, index, 3) for index in range(3)]
    assert sorted(name for part in parts for name, _ in part) == sorted(name for name, _ in files)
    assert [sum(count for _, count in part) for part in parts] == [148, 141, 111]
    # Global batch 30 = 10 per worker: the longest worker (148 examples) runs 15 steps, 14 without its remainder.
    assert split_steps(sharded, "train", 30, False, 3) == 15 and split_steps(sharded, "train", 30, True, 3) == 14
    assert split_steps(sharded, "train", 30, False) == 14  # one reader: ceil(400 / 30)


def test_streamed_epochs_read_each_example_once_in_an_order_set_by_seed_and_epoch(sharded_digits):
    from tapework.batching import split_dataset

    arrays, sharded = sharded_digits

    def epoch(seed, number, buffer=64, drop=False):
        batches = list(split_dataset(sharded, "train", 32, seed=seed, epoch=number, shuffle_window=buffer, drop_remainder=drop))
        return np.concatenate([x.numpy() for x, _ in batches]), np.concatenate([y.numpy() for _, y in batches]), [len(y) for _, y in batches]

    def records(inputs, labels):
        return sorted(map(bytes, Layout((8, 8, 1), "uint8", "int32").encode(inputs, labels)))

    inputs, labels, sizes = epoch(1, 1)
    assert records(inputs, labels) == records(*arrays.split("train"))  # every example exactly once
    assert sizes == [32] * 12 + [16]
    again = epoch(1, 1)
    assert again[0].tobytes() == inputs.tobytes() and again[1].tobytes() == labels.tobytes()  # a rebuilt epoch is the same epoch
    assert epoch(1, 2)[1].tobytes() != labels.tobytes() and epoch(2, 1)[1].tobytes() != labels.tobytes()
    assert epoch(1, 1, drop=True)[2] == [32] * 12
    in_order = [y.numpy() for _, y in split_dataset(sharded, "val", 16)]
    assert np.concatenate(in_order).tobytes() == arrays.split("val")[1].tobytes()  # no seed: file order


def test_both_formats_read_ahead_a_fixed_depth_without_tf_data_autotuning(sharded_digits):
    # Autotuning's model thread makes each epoch's iterator deletion wait for its timer (batching.read_ahead).
    from tapework.batching import PREFETCH_ELEMENTS, split_dataset

    for prepared in sharded_digits:
        for stack in (0,) if prepared.sharded else (0, 3):
            dataset = split_dataset(prepared, "train", 32, seed=1, epoch=1, stack=stack)
            assert dataset.options().autotune.enabled is False, (prepared.sharded, stack)
            assert int(dataset._buffer_size) == PREFETCH_ELEMENTS  # the last step is the fixed-depth prefetch


def test_array_splits_become_tensors_once_and_every_epoch_reuses_them(sharded_digits):
    from tapework.batching import split_dataset

    arrays, _ = sharded_digits
    epochs = [np.concatenate([y.numpy() for _, y in split_dataset(arrays, "train", 32, seed=1, epoch=epoch)]) for epoch in (1, 2)]
    converted = arrays.tensors["train"]
    split_dataset(arrays, "train", 32, seed=1, epoch=3)
    assert arrays.tensors["train"] is converted  # the third epoch copied nothing
    assert converted[0].numpy().tobytes() == arrays.split("train")[0].tobytes()
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(arrays.split("train")[1]) and epochs[0].tobytes() != epochs[1].tobytes()


def test_training_on_shards_is_bitwise_reproducible_resumes_exactly_and_evaluates_like_arrays(sharded_digits, tmp_path):
    from tapework.evaluation import evaluate_model
    from tapework.models import weights_dict
    from tapework.training import train

    arrays, sharded = sharded_digits
    params = dataclasses.replace(
        make_params({"train.epochs": 4, "train.batch_size": 32, "train.tensorboard": False, "train.steps_per_execution": 4, "train.shuffle_window": 50, "train.schedule": "cosine", "train.mlp.dropout": 0.3}).train
    )
    straight = train(params, sharded, checkpoint_dir=tmp_path / "straight")
    assert straight.history[-1]["val_accuracy"] > 0.5
    assert train(params, sharded).history == straight.history
    train(params, sharded, checkpoint_dir=tmp_path / "resumed", stop_after_epochs=2)  # "crash" after epoch 2
    resumed = train(params, sharded, checkpoint_dir=tmp_path / "resumed")
    assert resumed.history == straight.history
    first, second = weights_dict(straight.model), weights_dict(resumed.model)
    assert all(first[name].tobytes() == second[name].tobytes() for name in first)
    # The test split streamed from shards gives the evaluation the arrays give, bit for bit.
    from_shards, from_arrays = evaluate_model(straight.model, sharded, 64, 0.5), evaluate_model(straight.model, arrays, 64, 0.5)
    assert from_shards.results == from_arrays.results and from_shards.outputs.tobytes() == from_arrays.outputs.tobytes()
    assert np.array_equal(from_shards.actual, from_arrays.actual)


def test_shard_windows_group_whole_shards_and_permute_each_window_by_seed_epoch_and_window():
    from tapework.batching import shard_windows

    files = [(f"s{index}", count) for index, count in enumerate([40, 40, 40, 40, 25])]
    plan = shard_windows(files, 3, 2, 70)
    assert sorted(name for group, _ in plan for name in group) == [name for name, _ in files]
    sizes = [sum(dict(files)[name] for name in group) for group, _ in plan]
    assert all(size >= 70 for size in sizes[:-1])  # whole shards, at least the window (the last one takes the rest)
    for (group, permutation), size in zip(plan, sizes):
        assert sorted(permutation.tolist()) == list(range(size))  # each window's rows exactly once
    again = shard_windows(files, 3, 2, 70)
    assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(plan, again))  # a pure function
    other_epoch = shard_windows(files, 3, 3, 70)
    assert [group for group, _ in other_epoch] != [group for group, _ in plan] or not all(np.array_equal(a[1], b[1]) for a, b in zip(plan, other_epoch))
    assert [group for group, _ in shard_windows(files, None, 0, 70)] == [["s0", "s1"], ["s2", "s3"], ["s4"]]  # no seed: file order
    assert all(permutation is None for _, permutation in shard_windows(files, None, 0, 70))
    assert [len(group) for group, _ in shard_windows(files, 3, 2, 1)] == [1] * 5  # a window smaller than a shard: one shard each


@pytest.mark.parametrize("rows", [90, 110, 0], ids=["fewer-inputs", "more-inputs", "no-inputs"])
def test_inputs_and_labels_of_different_counts_are_refused_and_nothing_is_written(rows, tmp_path):
    labels = np.arange(100) % 10
    chunks = [np.zeros((rows, 2, 2, 1), np.uint8)] if rows else []
    source = RawSource(labels, None, lambda: iter(chunks), None, (2, 2, 1), np.dtype(np.uint8), "classification", tuple("0123456789"), None, (2, 2, 1))
    with pytest.raises(DataError, match=r"the train file's inputs and labels differ in count \(100 labels\); re-run the download stage"):
        write_shards(source, make_params().preprocess, "generated", tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists() and list(tmp_path.iterdir()) == []  # the temp folder is gone too
