"""Deterministic splits, normalisation statistics and the compact arrays train reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tapework.catalogue import NORMALIZATIONS
from tapework.errors import DataError
from tapework.io import atomic_directory, load_array, read_json, save_array, file_digest, write_json
from tapework.params import PreprocessParams

SPLITS = ("train", "val", "test")
META_FILE = "meta.json"  # in the prepared folder: shapes, statistics, class names and every array's SHA-256


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


def write_prepared(prepared: Prepared, directory: str | Path) -> None:
    """Write every array and meta.json (with each array's SHA-256) as one all-or-nothing folder."""
    with atomic_directory(directory) as temp:
        hashes = {}
        for name, array in sorted(prepared.arrays.items()):
            save_array(temp / f"{name}.npy", array)
            hashes[f"{name}.npy"] = file_digest(temp / f"{name}.npy")
        write_json(temp / META_FILE, {**prepared.meta, "sha256": hashes})


def load_prepared(directory: str | Path, verify: bool = True) -> Prepared:
    """Read what write_prepared wrote; with `verify`, a changed or truncated array is an error."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise DataError(f"{meta_path} is missing: run the preprocess stage first (dvc repro preprocess)")
    meta = read_json(meta_path)
    arrays = {}
    for file_name, expected in meta["sha256"].items():
        path = directory / file_name
        if verify and (not path.is_file() or file_digest(path) != expected):
            raise DataError(f"{path} does not match the hash in meta.json: re-run the preprocess stage (dvc repro -f preprocess)")
        arrays[file_name.removesuffix(".npy")] = load_array(path)
    return Prepared(arrays, meta)
