"""Pure helpers of preprocess/batching/optim: splits, statistics, schedules, data order."""

import hashlib
import json
import math

import numpy as np
import pytest

from tapework.batching import epoch_permutation, make_dataset, steps_per_epoch
from tapework.errors import DataError
from tapework.io import stable_hash
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


# --- issue 16: meta.json carries its own hash; values beyond float32 -------------------------------


def edit_meta(folder, change):
    path = folder / "meta.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def truncate(folder):
    path = folder / "meta.json"
    path.write_bytes(path.read_bytes()[:40])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda meta: meta.update(num_classes=5), "changed after preprocess wrote it"),
        (lambda meta: meta.update(class_names=meta["class_names"][:2]), "changed after preprocess wrote it"),
        (lambda meta: meta["sha256"].pop("x_val.npy"), "changed after preprocess wrote it"),
        (lambda meta: meta.pop("meta_sha256"), "changed after preprocess wrote it"),
    ],
    ids=["num_classes", "class_names", "sha256-entry", "self-hash"],
)
def test_an_edited_meta_json_is_refused(tmp_path, damage, message):
    write_prepared(prepare(fake_images(), make_params().preprocess, "fake"), tmp_path / "p")
    edit_meta(tmp_path / "p", damage)
    with pytest.raises(DataError, match=rf"meta\.json {message} \(its meta_sha256 does not match\): re-run the preprocess stage"):
        load_prepared(tmp_path / "p")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda meta: meta.update(num_classes=5), r"class_names holds 3 name\(s\) for num_classes = 5"),
        (lambda meta: meta.update(class_names=meta["class_names"][:2]), r"class_names holds 2 name\(s\) for num_classes = 3"),
        (lambda meta: meta["sha256"].pop("x_val.npy"), "sha256 must list exactly"),
        (lambda meta: meta.update(num_classes=2, class_names=["a", "b"]), r"y_\w+ holds labels 0\.\.2, outside 0\.\.1"),
        (lambda meta: meta.update(input_shape=[4, 4]), "do not fit input_shape"),
        (lambda meta: meta.update(task="clustering"), "task is 'clustering'"),
    ],
)
def test_meta_json_is_checked_even_with_a_recomputed_self_hash(tmp_path, damage, message):
    """Someone who edits meta.json and recomputes meta_sha256 still gets a one-line error, not a crash later."""
    write_prepared(prepare(fake_images(), make_params().preprocess, "fake"), tmp_path / "p")

    def edit_and_rehash(meta):
        meta.pop("meta_sha256")
        damage(meta)
        meta["meta_sha256"] = stable_hash(meta)

    edit_meta(tmp_path / "p", edit_and_rehash)
    with pytest.raises(DataError, match=message):
        load_prepared(tmp_path / "p")


def test_a_truncated_meta_json_is_a_data_error(tmp_path):
    write_prepared(prepare(fake_images(), make_params().preprocess, "fake"), tmp_path / "p")
    truncate(tmp_path / "p")
    with pytest.raises(DataError, match=r"meta\.json is not valid JSON \(.*\): re-run the preprocess stage"):
        load_prepared(tmp_path / "p")


def tabular(x, y, task="regression", names=("a", "b")):
    return RawDataset(np.asarray(x, np.float64), np.asarray(y), None, None, task, ("0", "1") if task == "classification" else (), names, None)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        ([[1e39, 0.0]], [1.0], r"column 'a' holds 1e\+39 at data row 1, beyond float32's range"),
        ([[0.0, -3.5e38]], [1.0], r"column 'b' holds -3\.5e\+38 at data row 1"),
        ([[0.0, 1.0]], [4e38], r"the target holds 4e\+38 at data row 1"),
    ],
)
def test_values_beyond_float32_are_refused_naming_column_and_row(x, y, message):
    rows = np.tile(np.asarray([[1.0, 2.0]]), (20, 1))
    rows[7] = x[0]
    targets = np.arange(20, dtype=np.float64)
    targets[7] = y[0]
    with pytest.raises(DataError, match=message.replace("row 1", "row 8")):
        prepare(tabular(rows, targets), make_params().preprocess, "fake")


def test_a_minmax_range_beyond_float32_is_refused():
    rows = np.tile(np.asarray([[1.0, 2.0]]), (40, 1))
    rows[::2, 1] = 3e38
    rows[1::2, 1] = -3e38  # each value fits float32; their range does not
    with pytest.raises(DataError, match=r"column 'b' spans more than float32 can hold \(minmax scale overflows\)"):
        prepare(tabular(rows, np.arange(40.0)), make_params({"preprocess.normalization": "minmax"}).preprocess, "fake")
