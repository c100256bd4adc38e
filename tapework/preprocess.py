"""Deterministic splits, normalisation statistics and the compact arrays train reads."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tapework.catalogue import NORMALIZATIONS, TASKS
from tapework.errors import DataError
from tapework.io import atomic_directory, load_array, read_json, save_array, file_digest, stable_hash, write_json
from tapework.params import PreprocessParams

SPLITS = ("train", "val", "test")
META_FILE = "meta.json"  # in the prepared folder: shapes, statistics, class names and every array's SHA-256
META_HASH_KEY = "meta_sha256"  # in meta.json: stable_hash of every other key, so an edit to the file is seen
ARRAY_FILES = tuple(f"{kind}_{split}.npy" for split in SPLITS for kind in ("x", "y"))
FLOAT32_MAX = float(np.finfo(np.float32).max)
RERUN_PREPROCESS = "re-run the preprocess stage (dvc repro -f preprocess)"


def split_indices(size: int, fraction: float, seed: int, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split range(size) into (kept, held_out) with about `fraction` held out, both sorted.

    With labels the split is stratified: each class gives the same share, so small validation
    sets keep the class balance. The result depends only on (size, fraction, seed, labels).
    """
    rng = np.random.default_rng(seed)
    groups = [np.arange(size)] if labels is None else [np.flatnonzero(labels == value) for value in np.unique(labels)]
    held = []
    for group in groups:
        shuffled = rng.permutation(group)
        held.append(shuffled[: int(round(fraction * len(group)))])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(size), held_out, assume_unique=True)
    if len(kept) == 0 or len(held_out) == 0:
        raise DataError(f"splitting {size} examples with fraction {fraction} leaves an empty split; use more data or another fraction")
    return kept, held_out


def subsample(size: int, count: int, seed: int) -> np.ndarray:
    """`count` sorted indices out of range(size), chosen by the seed (all of them when count is 0)."""
    if count == 0 or count >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng([seed, 1]).permutation(size)[:count])


# Rows per chunk in normalization_stats: about 8 MB of float64 at a time.
STATS_CHUNK_VALUES = 1 << 20


def normalization_stats(inputs: np.ndarray, method: str, image: bool) -> tuple[np.ndarray, np.ndarray]:
    """(offset, scale) from the training split only, so validation and test never leak into it.

    Images get one value per channel; tabular data one per feature.
    """
    axes = tuple(range(inputs.ndim - 1)) if image else 0
    if method == "standard":
        # float64 sums (float32 loses digits over millions of pixels), taken over chunks of rows:
        # a float64 copy of the whole split would be 8x the uint8 images (340 MB for Fashion-MNIST).
        rows = max(1, STATS_CHUNK_VALUES // max(1, int(np.prod(inputs.shape[1:]))))

        def chunks() -> Any:
            return (inputs[start : start + rows].astype(np.float64) for start in range(0, len(inputs), rows))

        count = inputs.size // inputs.shape[-1]  # values per channel (image) or per feature
        offset = sum(chunk.sum(axis=axes) for chunk in chunks()) / count
        scale = np.sqrt(sum(np.square(chunk - offset).sum(axis=axes) for chunk in chunks()) / count)  # two passes: no cancellation
    elif method == "minmax":
        offset = inputs.min(axis=axes).astype(np.float64)
        scale = inputs.max(axis=axes).astype(np.float64) - offset
    elif method == "none":
        offset, scale = np.zeros(inputs.shape[-1]), np.ones(inputs.shape[-1])
    else:
        raise ValueError(f"unknown normalization '{method}'; expected one of {', '.join(NORMALIZATIONS)}")
    # A constant feature has scale 0: leave it unscaled instead of dividing by zero.
    scale = np.where(scale > 0, scale, 1.0)
    with np.errstate(over="ignore"):  # a minmax range beyond float32 becomes inf here; prepare reports it
        return offset.astype(np.float32), scale.astype(np.float32)


@dataclass(frozen=True, eq=False)  # eq=False: == on numpy arrays is element-wise, not a bool
class RawDataset:
    """A data set as parsed from its raw files (tapework.datasets.load_raw), before any split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None  # None: no official test split; `prepare` holds one out
    y_test: np.ndarray | None
    task: str
    class_names: tuple[str, ...]
    feature_names: tuple[str, ...] | None
    image_shape: tuple[int, int, int] | None


@dataclass(frozen=True, eq=False)
class RawSource:
    """A raw data set read in chunks of rows: labels whole (a few bytes per example), inputs streamed.

    What `preprocess.format: shards` reads, so its memory does not grow with the data set.
    `train_inputs()` / `test_inputs()` return a fresh iterator over the input rows in file order,
    in chunks whose row counts sum to len(y_train) / len(y_test); an error in the file (a bad CRC
    found at its end, a short read) raises DataError from the iterator.
    """

    y_train: np.ndarray
    y_test: np.ndarray | None  # None: no official test split; preprocess holds one out
    train_inputs: Callable[[], Iterator[np.ndarray]]
    test_inputs: Callable[[], Iterator[np.ndarray]] | None
    input_shape: tuple[int, ...]  # one example's shape (rows are (chunk, *input_shape))
    input_dtype: np.dtype
    task: str
    class_names: tuple[str, ...]
    feature_names: tuple[str, ...] | None
    image_shape: tuple[int, int, int] | None

    @classmethod
    def from_arrays(cls, raw: RawDataset) -> RawSource:
        """A data set already in memory, as one chunk per split."""
        test_inputs = None if raw.x_test is None else (lambda: iter([raw.x_test]))
        return cls(
            raw.y_train, raw.y_test, lambda: iter([raw.x_train]), test_inputs, tuple(raw.x_train.shape[1:]), raw.x_train.dtype,
            raw.task, raw.class_names, raw.feature_names, raw.image_shape,
        )

    def materialize(self) -> RawDataset:
        """Every row in memory (the arrays format)."""
        x_test = None if self.test_inputs is None else _concatenate(self.test_inputs(), self.input_shape, self.input_dtype)
        return RawDataset(
            _concatenate(self.train_inputs(), self.input_shape, self.input_dtype), self.y_train, x_test, self.y_test,
            self.task, self.class_names, self.feature_names, self.image_shape,
        )


def _concatenate(chunks: Iterator[np.ndarray], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    parts = list(chunks)
    return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros((0, *shape), dtype)


@dataclass(frozen=True)
class Prepared:
    arrays: dict[str, np.ndarray]  # x_train, y_train, x_val, y_val, x_test, y_test
    meta: dict[str, Any]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self.arrays[f"x_{name}"], self.arrays[f"y_{name}"]


def _class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels, minlength=num_classes).tolist()


def prepare(raw: RawDataset, params: PreprocessParams, dataset: str) -> Prepared:
    """Raw data set -> train/val/test arrays plus the statistics the model standardises with."""
    classification = raw.task == "classification"
    _check_float32_range(raw, dataset)
    x_all, y_all = raw.x_train, raw.y_train
    if len(x_all) != len(y_all):
        raise DataError(f"{dataset}: {len(x_all)} inputs but {len(y_all)} labels; re-run the download stage")
    if raw.x_test is None:
        kept, held = split_indices(len(x_all), params.test_fraction, params.seed, y_all if classification else None)
        x_test, y_test = x_all[held], y_all[held]
        x_all, y_all = x_all[kept], y_all[kept]
    else:
        x_test, y_test = raw.x_test, raw.y_test
    kept, held = split_indices(len(x_all), params.val_fraction, params.seed + 1, y_all if classification else None)
    x_train, y_train, x_val, y_val = x_all[kept], y_all[kept], x_all[held], y_all[held]
    chosen = subsample(len(x_train), params.max_train_examples, params.seed)
    x_train, y_train = x_train[chosen], y_train[chosen]

    image = raw.image_shape is not None
    # Images stay uint8 (4x smaller); the model standardises them on the fly with these stats.
    input_dtype = np.uint8 if image else np.float32
    label_dtype = np.int32 if classification else np.float32
    arrays = {}
    for name, (inputs, labels) in {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}.items():
        arrays[f"x_{name}"] = np.ascontiguousarray(inputs, dtype=input_dtype)
        arrays[f"y_{name}"] = np.ascontiguousarray(labels, dtype=label_dtype)
    offset, scale = normalization_stats(arrays["x_train"], params.normalization, image)
    if not (np.isfinite(offset).all() and np.isfinite(scale).all()):  # minmax: max - min can pass float32's range
        column = int(np.flatnonzero(~(np.isfinite(offset) & np.isfinite(scale)))[0])
        raise DataError(
            f"{dataset}: {_column_name(raw, column)} spans more than float32 can hold ({params.normalization} scale "
            f"overflows); rescale that column, or use preprocess.normalization: standard"
        )
    num_classes = len(raw.class_names) if classification else 0
    meta: dict[str, Any] = {
        "dataset": dataset,
        "task": raw.task,
        "input_shape": list(arrays["x_train"].shape[1:]),
        "num_classes": num_classes,
        "class_names": list(raw.class_names),
        "feature_names": list(raw.feature_names) if raw.feature_names else None,
        "normalization": {"method": params.normalization, "offset": offset.tolist(), "scale": scale.tolist()},
        "counts": {name: int(len(arrays[f"y_{name}"])) for name in SPLITS},
    }
    if classification:
        meta["class_counts"] = {name: _class_counts(arrays[f"y_{name}"], num_classes) for name in SPLITS}
    else:
        targets = arrays["y_train"].astype(np.float64)
        meta["target"] = {"offset": float(targets.mean()), "scale": float(targets.std() or 1.0)}
    return Prepared(arrays, meta)


def _column_name(raw: RawDataset, column: int) -> str:
    if raw.image_shape is not None:
        return f"channel {column}"
    return f"column '{raw.feature_names[column]}'" if raw.feature_names else f"feature {column + 1}"


def _check_float32_range(raw: RawDataset, dataset: str) -> None:
    """Tabular features and regression targets become float32: a value beyond its range would turn into inf."""
    checks = []
    if raw.image_shape is None:
        checks += [(raw.x_train, "data row", None), (raw.x_test, "test row", None)]
    if raw.task == "regression":
        checks += [(raw.y_train, "data row", "the target"), (raw.y_test, "test row", "the target")]
    for values, row_kind, label in checks:
        if values is None or values.dtype.kind != "f":
            continue
        table = values.reshape(len(values), -1)
        beyond = np.abs(table) > FLOAT32_MAX
        if beyond.any():
            row, column = (int(index[0]) for index in np.nonzero(beyond))
            name = label or _column_name(raw, column)
            raise DataError(
                f"{dataset}: {name} holds {table[row, column]:g} at {row_kind} {row + 1}, beyond float32's range "
                f"(±{FLOAT32_MAX:.4g}) that training computes in. Rescale that column (e.g. other units) or drop the row"
            )


def write_prepared(prepared: Prepared, directory: str | Path) -> None:
    """Write every array and meta.json (with each array's SHA-256 and its own) as one all-or-nothing folder."""
    with atomic_directory(directory) as temp:
        hashes = {}
        for name, array in sorted(prepared.arrays.items()):
            save_array(temp / f"{name}.npy", array)
            hashes[f"{name}.npy"] = file_digest(temp / f"{name}.npy")
        meta = json.loads(json.dumps({**prepared.meta, "sha256": hashes}))  # as load_prepared will read it back
        write_json(temp / META_FILE, {**meta, META_HASH_KEY: stable_hash(meta)})


def load_prepared(directory: str | Path, verify: bool = True) -> Prepared:
    """Read what write_prepared wrote; with `verify`, an edited meta.json or a changed or truncated array is an error."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise DataError(f"{meta_path} is missing: run the preprocess stage first (dvc repro preprocess)")
    try:
        meta = read_json(meta_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{meta_path} is not valid JSON ({error}): {RERUN_PREPROCESS}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path} does not hold a JSON object: {RERUN_PREPROCESS}")
    recorded = meta.pop(META_HASH_KEY, None)
    if verify and recorded != stable_hash(meta):
        raise DataError(f"{meta_path} changed after preprocess wrote it (its {META_HASH_KEY} does not match): {RERUN_PREPROCESS}")
    _check_meta(meta, meta_path)
    arrays = {}
    for file_name in ARRAY_FILES:
        path = directory / file_name
        if verify and (not path.is_file() or file_digest(path) != meta["sha256"][file_name]):
            raise DataError(f"{path} does not match the hash in meta.json: {RERUN_PREPROCESS}")
        try:
            arrays[file_name.removesuffix(".npy")] = load_array(path)
        except (OSError, ValueError) as error:
            raise DataError(f"{path} is not a readable array ({error}): {RERUN_PREPROCESS}") from None
    _check_arrays(arrays, meta, meta_path)
    return Prepared(arrays, meta)


def _check_meta(meta: dict[str, Any], meta_path: Path) -> None:
    """The keys later stages read, with the types and agreements they rely on."""

    def fail(problem: str) -> None:
        raise DataError(f"{meta_path}: {problem}: {RERUN_PREPROCESS}")

    hashes = meta.get("sha256")
    if not isinstance(hashes, dict) or sorted(hashes) != sorted(ARRAY_FILES):
        listed = sorted(hashes) if isinstance(hashes, dict) else hashes
        fail(f"sha256 must list exactly {', '.join(ARRAY_FILES)} (it lists {listed})")
    if meta.get("task") not in TASKS:
        fail(f"task is {meta.get('task')!r}, not one of {', '.join(TASKS)}")
    shape = meta.get("input_shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(size, int) and size > 0 for size in shape):
        fail(f"input_shape is {shape!r}, not a list of positive integers")
    normalization = meta.get("normalization")
    if not isinstance(normalization, dict) or not all(isinstance(normalization.get(key), list) for key in ("offset", "scale")):
        fail("normalization must hold offset and scale lists")
    if meta["task"] == "classification":
        classes, names = meta.get("num_classes"), meta.get("class_names")
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
            fail(f"num_classes is {classes!r}, not an integer >= 2")
        if not isinstance(names, list) or len(names) != classes:
            fail(f"class_names holds {len(names) if isinstance(names, list) else names!r} name(s) for num_classes = {classes}")
    else:
        target = meta.get("target")
        if not isinstance(target, dict) or not all(isinstance(target.get(key), (int, float)) for key in ("offset", "scale")):
            fail("target must hold numeric offset and scale")


def _check_arrays(arrays: dict[str, np.ndarray], meta: dict[str, Any], meta_path: Path) -> None:
    """The arrays agree with meta.json: input shape, one label per example, labels within num_classes."""
    for split in SPLITS:
        inputs, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if list(inputs.shape[1:]) != meta["input_shape"] or labels.shape != (len(inputs),):
            raise DataError(
                f"{meta_path}: x_{split} {inputs.shape} / y_{split} {labels.shape} do not fit input_shape "
                f"{meta['input_shape']}: {RERUN_PREPROCESS}"
            )
        if meta["task"] == "classification" and labels.size and not 0 <= int(labels.min()) <= int(labels.max()) < meta["num_classes"]:
            raise DataError(
                f"{meta_path}: y_{split} holds labels {int(labels.min())}..{int(labels.max())}, outside 0..{meta['num_classes'] - 1} "
                f"(num_classes): {RERUN_PREPROCESS}"
            )
