"""Pure helpers of preprocess/batching/optim: splits, statistics, schedules, data order."""

import hashlib
import math

import numpy as np
import pytest

from tapework.batching import epoch_permutation, make_dataset, steps_per_epoch
from tapework.errors import DataError
from tapework.optim import WarmupSchedule
from tapework.preprocess import RawDataset, load_prepared, normalization_stats, prepare, split_indices, subsample, write_prepared
from tests.conftest import make_params


def test_split_is_deterministic_disjoint_and_complete():
    kept, held = split_indices(1000, 0.2, seed=7)
    again_kept, again_held = split_indices(1000, 0.2, seed=7)
    np.testing.assert_array_equal(kept, again_kept)
    np.testing.assert_array_equal(held, again_held)
    assert len(held) == 200 and len(kept) == 800
    assert not set(kept) & set(held)
    assert sorted(np.concatenate([kept, held])) == list(range(1000))
    other_kept, _ = split_indices(1000, 0.2, seed=8)
    assert not np.array_equal(kept, other_kept)


def test_stratified_split_keeps_class_shares():
    labels = np.repeat(np.arange(4), [100, 200, 300, 400])
    _, held = split_indices(len(labels), 0.1, seed=0, labels=labels)
    np.testing.assert_array_equal(np.bincount(labels[held]), [10, 20, 30, 40])


def test_split_refuses_to_leave_an_empty_side():
    with pytest.raises(DataError, match="empty split"):
        split_indices(3, 0.1, seed=0)


def test_subsample():
    np.testing.assert_array_equal(subsample(10, 0, 1), np.arange(10))
    chosen = subsample(100, 10, 1)
    assert len(chosen) == 10 and np.all(np.diff(chosen) > 0)


def test_normalization_stats_per_channel_and_constant_feature():
    images = np.zeros((4, 2, 2, 3), np.uint8)
    images[..., 0] = 10
    images[0, ..., 1] = 8
    offset, scale = normalization_stats(images, "standard", image=True)
    np.testing.assert_allclose(offset, [10, 2, 0])
    np.testing.assert_allclose(scale, [1.0, np.sqrt(12), 1.0])  # constant channels get scale 1
    table = np.array([[1.0, 5.0], [3.0, 5.0]])
    offset, scale = normalization_stats(table, "minmax", image=False)
    np.testing.assert_allclose(offset, [1, 5])
    np.testing.assert_allclose(scale, [2, 1])


@pytest.mark.parametrize("chunk_values", [1, 50, 1 << 20])  # one row per chunk, a few rows, one chunk
@pytest.mark.parametrize("image", [True, False])
def test_chunked_standard_stats_equal_one_float64_pass(monkeypatch, chunk_values, image):
    import tapework.preprocess as preprocess_module

    monkeypatch.setattr(preprocess_module, "STATS_CHUNK_VALUES", chunk_values)
    rng = np.random.default_rng(5)
    inputs = rng.integers(0, 256, (301, 5, 4, 3)).astype(np.uint8) if image else rng.normal(7.0, 300.0, (301, 6)).astype(np.float32)
    values = inputs.astype(np.float64)
    axes = (0, 1, 2) if image else 0
    offset, scale = normalization_stats(inputs, "standard", image=image)
    np.testing.assert_allclose(offset, values.mean(axis=axes).astype(np.float32), rtol=1e-7)
    np.testing.assert_allclose(scale, values.std(axis=axes).astype(np.float32), rtol=1e-6)


def fake_images(count=200, seed=0):
    rng = np.random.default_rng(seed)
    return RawDataset(rng.integers(0, 256, (count, 4, 4, 1), dtype=np.uint8), rng.integers(0, 3, count), None, None, "classification", ("a", "b", "c"), None, (4, 4, 1))


def test_prepare_uses_train_split_statistics_only_and_is_byte_identical(tmp_path):
    raw = fake_images()
    params = make_params({"preprocess.seed": 3, "preprocess.val_fraction": 0.25, "preprocess.test_fraction": 0.2}).preprocess
    first = prepare(raw, params, "fake")
    assert first.meta["counts"] == {"train": 120, "val": 40, "test": 40}
    assert first.arrays["x_train"].dtype == np.uint8 and first.arrays["y_train"].dtype == np.int32
    expected_mean = first.arrays["x_train"].astype(np.float64).mean()
    assert first.meta["normalization"]["offset"][0] == pytest.approx(expected_mean, rel=1e-6)
    write_prepared(first, tmp_path / "a")
    write_prepared(prepare(raw, params, "fake"), tmp_path / "b")
    for path in sorted((tmp_path / "a").iterdir()):
        assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256((tmp_path / "b" / path.name).read_bytes()).digest(), path.name
    loaded = load_prepared(tmp_path / "a")
    np.testing.assert_array_equal(loaded.arrays["x_val"], first.arrays["x_val"])


def test_load_prepared_rejects_a_corrupted_array(tmp_path):
    write_prepared(prepare(fake_images(), make_params().preprocess, "fake"), tmp_path / "p")
    target = tmp_path / "p" / "x_train.npy"
    target.write_bytes(target.read_bytes()[:-10])
    with pytest.raises(DataError, match="re-run the preprocess stage"):
        load_prepared(tmp_path / "p")
    with pytest.raises(DataError, match="run the preprocess stage first"):
        load_prepared(tmp_path / "missing")


def test_regression_targets_get_offset_and_scale():
    rng = np.random.default_rng(0)
    raw = RawDataset(rng.normal(size=(100, 3)), rng.normal(50, 5, 100), None, None, "regression", (), ("a", "b", "c"), None)
    prepared = prepare(raw, make_params().preprocess, "fake")
    targets = prepared.arrays["y_train"].astype(np.float64)
    assert prepared.meta["target"]["offset"] == pytest.approx(targets.mean(), rel=1e-6)
    assert prepared.arrays["x_train"].dtype == np.float32


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    np.testing.assert_array_equal(epoch_permutation(50, 1, 3), epoch_permutation(50, 1, 3))
    assert not np.array_equal(epoch_permutation(50, 1, 3), epoch_permutation(50, 1, 4))
    inputs, labels = np.arange(10, dtype=np.float32)[:, None], np.arange(10)
    batches = [b.numpy().ravel().tolist() for b, _ in make_dataset(inputs, labels, 4, seed=1, epoch=2)]
    assert sorted(sum(batches, [])) == list(range(10)) and [len(b) for b in batches] == [4, 4, 2]
    assert steps_per_epoch(10, 4, drop_remainder=False) == 3 and steps_per_epoch(10, 4, drop_remainder=True) == 2


@pytest.mark.parametrize(
    ("kind", "step", "expected"),
    [
        ("constant", 0, 0.1 * 1 / 10),  # warmup: (step + 1) / warmup_steps of the base rate
        ("constant", 99, 0.1),
        ("cosine", 10, 0.1),  # first step after warmup: full rate
        ("cosine", 60, 0.01 + 0.5 * 0.09 * (1 + math.cos(math.pi * 50 / 100))),
        ("cosine", 110, 0.01),
        ("exponential", 30, 0.1 * 0.5 ** (20 / 10)),
        ("step", 29, 0.1 * 0.5 ** 1),
        ("step", 30, 0.1 * 0.5 ** 2),
        ("step", 2, 0.1 * 3 / 10),
        ("exponential", 1000, 0.01),  # floored at the minimum rate
    ],
)
def test_schedules_match_hand_computed_rates(kind, step, expected):
    schedule = WarmupSchedule(kind, 0.1, total_steps=110, warmup_steps=10, decay_rate=0.5, decay_steps=10, minimum=0.01)
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)
