"""Deterministic splits, normalisation statistics and the compact arrays train reads."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tapework import shards
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
    held = held_out(size, fraction, seed, labels)
    kept = np.ones(size, bool)
    kept[held] = False
    return np.flatnonzero(kept), held


def held_out(size: int, fraction: float, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    """The sorted indices `split_indices` holds out, computed one class at a time (memory: one class's indices)."""
    rng = np.random.default_rng(seed)
    held = []
    for value in [None] if labels is None else np.unique(labels):
        group = np.arange(size) if value is None else np.flatnonzero(labels == value)
        # copy(): keep the held share only, not a view pinning the whole permutation.
        held.append(rng.permutation(group)[: int(round(fraction * len(group)))].copy())
    result = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    if len(result) in (0, size):
        raise DataError(f"splitting {size} examples with fraction {fraction} leaves an empty split; use more data or another fraction")
    return result


def subsample(size: int, count: int, seed: int) -> np.ndarray:
    """`count` sorted indices out of range(size), chosen by the seed (all of them when count is 0)."""
    if count == 0 or count >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng([seed, 1]).permutation(size)[:count])


STATS_CHUNK_VALUES = 1 << 20  # values per chunk in the normalisation statistics


def normalization_stats(inputs: np.ndarray, method: str, image: bool) -> tuple[np.ndarray, np.ndarray]:
    """(offset, scale) from the training split only, so validation and test never leak into it.

    Images get one value per channel; tabular data one per feature.
    """
    rows = stats_chunk_rows(inputs.shape[1:])
    return chunked_normalization_stats(lambda: (inputs[start : start + rows] for start in range(0, len(inputs), rows)), inputs.shape[1:], method, image)


def stats_chunk_rows(input_shape: tuple[int, ...]) -> int:
    """Rows per chunk in the statistics: about 8 MB of float64 at a time."""
    return max(1, STATS_CHUNK_VALUES // max(1, int(np.prod(input_shape))))


def chunked_normalization_stats(chunks: Callable[[], Iterator[np.ndarray]], input_shape: tuple[int, ...], method: str, image: bool) -> tuple[np.ndarray, np.ndarray]:
    """normalization_stats over the rows `chunks()` yields (called once per pass), in chunks of `stats_chunk_rows`.

    The sums run chunk by chunk in the same order for arrays and for shards, so both formats give
    bitwise-equal statistics for the same data.
    """
    axes = tuple(range(len(input_shape))) if image else 0
    channels = input_shape[-1]
    if method == "standard":
        # float64 sums (float32 loses digits over millions of pixels), taken over chunks of rows:
        # a float64 copy of the whole split would be 8x the uint8 images (340 MB for Fashion-MNIST).
        def wide() -> Any:
            return (chunk.astype(np.float64) for chunk in chunks())

        count = 0
        total = np.zeros(channels)
        for chunk in wide():
            count += chunk.size // channels  # values per channel (image) or per feature
            total = total + chunk.sum(axis=axes)
        offset = total / count
        squares = np.zeros(channels)
        for chunk in wide():
            chunk -= offset  # in place: the float64 chunk is this pass's own copy
            squares = squares + np.square(chunk, out=chunk).sum(axis=axes)
        scale = np.sqrt(squares / count)  # two passes: no cancellation
    elif method == "minmax":
        low = high = None
        for chunk in chunks():
            low = chunk.min(axis=axes) if low is None else np.minimum(low, chunk.min(axis=axes))
            high = chunk.max(axis=axes) if high is None else np.maximum(high, chunk.max(axis=axes))
        offset = low.astype(np.float64)
        scale = high.astype(np.float64) - offset
    elif method == "none":
        offset, scale = np.zeros(channels), np.ones(channels)
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

    y_train: np.ndarray  # class labels may be any integer dtype (IDX: uint8, one byte per example)
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
        """Every row in memory (the arrays format), class labels as int64 like every loader's."""
        x_test = None if self.test_inputs is None else _concatenate(self.test_inputs(), self.input_shape, self.input_dtype)

        def labels(values: np.ndarray | None) -> np.ndarray | None:
            return values.astype(np.int64) if values is not None and self.task == "classification" else values

        return RawDataset(
            _concatenate(self.train_inputs(), self.input_shape, self.input_dtype), labels(self.y_train), x_test, labels(self.y_test),
            self.task, self.class_names, self.feature_names, self.image_shape,
        )


def _concatenate(chunks: Iterator[np.ndarray], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    parts = list(chunks)
    if not parts:
        return np.zeros((0, *shape), dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass(frozen=True)
class Prepared:
    arrays: dict[str, np.ndarray]  # x_train, y_train, x_val, y_val, x_test, y_test; empty when sharded
    meta: dict[str, Any]
    directory: Path | None = None  # the prepared folder (read by the shard pipelines)
    # Tensor copies of the array splits, made once by batching.split_dataset: the train pipeline is
    # rebuilt every epoch, and copying 55,000 float32 images into a tensor takes about 80 ms here.
    tensors: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def sharded(self) -> bool:
        return self.meta.get(shards.FORMAT_KEY) == shards.SHARDS

    def count(self, name: str) -> int:
        return int(self.meta["counts"][name])

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """One split's (inputs, labels) in memory: shards are read whole (for the small splits and export)."""
        if self.sharded:
            return shards.read_split(self.directory, self.meta, name)
        return self.arrays[f"x_{name}"], self.arrays[f"y_{name}"]

    def chunks(self, name: str, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One split's (inputs, labels) in chunks of `rows` examples, in order: bounded memory for either format."""
        if self.sharded:
            yield from shards.iter_split(self.directory, self.meta, name, rows)
            return
        inputs, labels = self.split(name)
        for start in range(0, len(labels), rows):
            yield inputs[start : start + rows], labels[start : start + rows]

    def labels(self, name: str) -> np.ndarray:
        """One split's labels in order (the inputs of shards are read in chunks and dropped)."""
        if not self.sharded:
            return self.split(name)[1]
        parts = [labels for _, labels in self.chunks(name, stats_chunk_rows(tuple(self.meta["input_shape"])))]
        return np.concatenate(parts) if parts else np.zeros(0, self.meta[shards.RECORD_KEY]["label_dtype"])


def _class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels, minlength=num_classes).tolist()


TRAIN, VAL, TEST, LEFT_OUT = 0, 1, 2, -1  # split_destinations' codes, TRAIN..TEST in SPLITS order


def split_destinations(labels: np.ndarray, has_test: bool, params: PreprocessParams, classification: bool) -> np.ndarray:
    """Each row of the source's train file: TRAIN, VAL, TEST (held out when there is no test file) or LEFT_OUT.

    One byte per example (plus one class's indices while splitting): the deterministic split
    both formats use, so each split's rows, in file order, are np.flatnonzero(destination == code).
    """
    destination = np.zeros(len(labels), np.int8)
    pool = None  # the rows left for train and validation when a test split is held out
    if not has_test:
        destination[held_out(len(labels), params.test_fraction, params.seed, labels if classification else None)] = TEST
        pool = np.flatnonzero(destination == TRAIN)
    pool_labels = labels if pool is None else labels[pool]
    validation = held_out(len(pool_labels), params.val_fraction, params.seed + 1, pool_labels if classification else None)
    destination[validation if pool is None else pool[validation]] = VAL
    del pool, pool_labels, validation
    train = np.flatnonzero(destination == TRAIN)
    chosen = subsample(len(train), params.max_train_examples, params.seed)
    if len(chosen) < len(train):
        left_out = np.ones(len(train), bool)
        left_out[chosen] = False
        destination[train[left_out]] = LEFT_OUT
    return destination


def _dtypes(task: str, image: bool) -> tuple[type, type]:
    # Images stay uint8 (4x smaller); the model standardises them on the fly with the statistics.
    return (np.uint8 if image else np.float32), (np.int32 if task == "classification" else np.float32)


def prepare(raw: RawDataset, params: PreprocessParams, dataset: str) -> Prepared:
    """Raw data set -> train/val/test arrays plus the statistics the model standardises with."""
    _check_float32_range(RawSource.from_arrays(raw), dataset)
    if len(raw.x_train) != len(raw.y_train):
        raise DataError(f"{dataset}: {len(raw.x_train)} inputs but {len(raw.y_train)} labels; re-run the download stage")
    destination = split_destinations(raw.y_train, raw.x_test is not None, params, raw.task == "classification")
    input_dtype, label_dtype = _dtypes(raw.task, raw.image_shape is not None)
    arrays = {}
    for code, name in enumerate(SPLITS):
        rows = np.flatnonzero(destination == code)
        inputs, labels = (raw.x_test, raw.y_test) if name == "test" and raw.x_test is not None else (raw.x_train[rows], raw.y_train[rows])
        arrays[f"x_{name}"] = np.ascontiguousarray(inputs, dtype=input_dtype)
        arrays[f"y_{name}"] = np.ascontiguousarray(labels, dtype=label_dtype)
    offset, scale = normalization_stats(arrays["x_train"], params.normalization, raw.image_shape is not None)
    labels = {name: arrays[f"y_{name}"] for name in SPLITS}
    return Prepared(arrays, _meta(RawSource.from_arrays(raw), params, dataset, offset, scale, labels))


def _meta(source: RawSource, params: PreprocessParams, dataset: str, offset: np.ndarray, scale: np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, Any]:
    """meta.json's description of the prepared data (both formats): shapes, classes, statistics, counts."""
    if not (np.isfinite(offset).all() and np.isfinite(scale).all()):  # minmax: max - min can pass float32's range
        column = int(np.flatnonzero(~(np.isfinite(offset) & np.isfinite(scale)))[0])
        raise DataError(
            f"{dataset}: {_column_name(source, column)} spans more than float32 can hold ({params.normalization} scale "
            f"overflows); rescale that column, or use preprocess.normalization: standard"
        )
    classification = source.task == "classification"
    num_classes = len(source.class_names) if classification else 0
    meta: dict[str, Any] = {
        "dataset": dataset,
        "task": source.task,
        "input_shape": list(source.input_shape),
        "num_classes": num_classes,
        "class_names": list(source.class_names),
        "feature_names": list(source.feature_names) if source.feature_names else None,
        "normalization": {"method": params.normalization, "offset": offset.tolist(), "scale": scale.tolist()},
        "counts": {name: int(len(labels[name])) for name in SPLITS},
    }
    if classification:
        meta["class_counts"] = {name: _class_counts(labels[name], num_classes) for name in SPLITS}
    else:
        targets = labels["train"].astype(np.float32).astype(np.float64)  # the float32 values the prepared data holds
        meta["target"] = {"offset": float(targets.mean()), "scale": float(targets.std() or 1.0)}
    return meta


def prepared_format(params: PreprocessParams, source: RawSource) -> str:
    """`preprocess.format` resolved: `auto` picks shards when the prepared inputs would pass `shards_above_mib`."""
    if params.format != "auto":
        return params.format
    input_dtype, _ = _dtypes(source.task, source.image_shape is not None)
    examples = len(source.y_train) + (0 if source.y_test is None else len(source.y_test))
    size = examples * int(np.prod(source.input_shape)) * np.dtype(input_dtype).itemsize
    return shards.SHARDS if size > params.shards_above_mib * 2**20 else "arrays"


def write_shards(source: RawSource, params: PreprocessParams, dataset: str, directory: str | Path) -> dict[str, Any]:
    """Stream `source` into shard files and meta.json, as one all-or-nothing folder; returns the meta.

    Memory holds the labels, one chunk of inputs and one write buffer per split: it does not grow
    with the inputs. The records equal the arrays `prepare` would write, in the same order, and
    the statistics are computed over the same chunks, so both formats describe the same data bit
    for bit.
    """
    shards.check_byte_order()
    _check_float32_range(source, dataset)
    destination = split_destinations(source.y_train, source.y_test is not None, params, source.task == "classification")
    input_dtype, label_dtype = _dtypes(source.task, source.image_shape is not None)
    layout = shards.Layout(tuple(source.input_shape), np.dtype(input_dtype).name, np.dtype(label_dtype).name)
    with atomic_directory(directory) as temp:
        writers = {name: shards.ShardWriter(temp, name, layout, params.shard_size) for name in SPLITS}

        def route(chunks: Iterator[np.ndarray], labels: np.ndarray, split_of: np.ndarray | None, where: str) -> None:
            """Each row of `chunks` to its split's writer (every row to test when `split_of` is None)."""
            start = stop = 0
            for chunk in chunks:
                stop = start + len(chunk)
                if stop > len(labels):
                    break
                if split_of is None:
                    writers["test"].write(chunk, labels[start:stop])
                for code, name in enumerate(SPLITS if split_of is not None else ()):
                    rows = split_of[start:stop] == code
                    if rows.any():
                        writers[name].write(chunk[rows], labels[start:stop][rows])
                start = stop
            if start != len(labels) or stop > len(labels):
                raise DataError(f"{dataset}: the {where} file's inputs and labels differ in count ({len(labels)} labels); re-run the download stage")

        route(source.train_inputs(), source.y_train, destination, "train")
        if source.test_inputs is not None:
            route(source.test_inputs(), source.y_test, None, "test")
        listing = {name: writers[name].close() for name in SPLITS}
        labels = {
            name: source.y_test if name == "test" and source.y_test is not None else source.y_train[destination == code]
            for code, name in enumerate(SPLITS)
        }
        meta: dict[str, Any] = {
            shards.FORMAT_KEY: shards.SHARDS,
            shards.RECORD_KEY: layout.to_meta(),
            shards.FILES_KEY: {name: [[file, count] for file, count, _ in listing[name]] for name in SPLITS},
            "input_shape": list(layout.input_shape),  # what iter_split needs now; _meta adds the rest
            "counts": {name: int(len(labels[name])) for name in SPLITS},
        }
        rows = stats_chunk_rows(layout.input_shape)
        offset, scale = chunked_normalization_stats(
            lambda: (inputs for inputs, _ in shards.iter_split(temp, meta, "train", rows)), layout.input_shape, params.normalization, source.image_shape is not None
        )
        meta.update(_meta(source, params, dataset, offset, scale, labels))
        meta["sha256"] = {file: digest for name in SPLITS for file, _, digest in listing[name]}
        meta = json.loads(json.dumps(meta))  # as load_prepared will read it back
        write_json(temp / META_FILE, {**meta, META_HASH_KEY: stable_hash(meta)})
    return meta


def _column_name(source: RawSource | RawDataset, column: int) -> str:
    if source.image_shape is not None:
        return f"channel {column}"
    return f"column '{source.feature_names[column]}'" if source.feature_names else f"feature {column + 1}"


def _check_float32_range(source: RawSource, dataset: str) -> None:
    """Tabular features and regression targets become float32: a value beyond its range would turn into inf."""
    checks: list[tuple[Iterator[np.ndarray], str, str | None]] = []
    if source.image_shape is None:
        checks.append((source.train_inputs(), "data row", None))
        if source.test_inputs is not None:
            checks.append((source.test_inputs(), "test row", None))
    if source.task == "regression":
        checks += [(iter([source.y_train]), "data row", "the target")]
        if source.y_test is not None:
            checks.append((iter([source.y_test]), "test row", "the target"))
    for chunks, row_kind, label in checks:
        offset = 0
        for values in chunks:
            if values.dtype.kind != "f":
                break
            table = values.reshape(len(values), -1)
            beyond = np.abs(table) > FLOAT32_MAX
            if beyond.any():
                row, column = (int(index[0]) for index in np.nonzero(beyond))
                name = label or _column_name(source, column)
                raise DataError(
                    f"{dataset}: {name} holds {table[row, column]:g} at {row_kind} {offset + row + 1}, beyond float32's range "
                    f"(±{FLOAT32_MAX:.4g}) that training computes in. Rescale that column (e.g. other units) or drop the row"
                )
            offset += len(values)


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
    if meta.get(shards.FORMAT_KEY) == shards.SHARDS:
        # Every shard is hashed before training starts: a corrupt or missing one stops the run here.
        shards.check_byte_order()
        if verify:
            shards.verify_files(directory, meta, SPLITS)
        return Prepared({}, meta, directory)
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
    if meta.get(shards.FORMAT_KEY, "arrays") not in ("arrays", shards.SHARDS):
        fail(f"{shards.FORMAT_KEY} is {meta.get(shards.FORMAT_KEY)!r}, not {shards.SHARDS} (an arrays folder has no such key)")
    if meta.get(shards.FORMAT_KEY) == shards.SHARDS:
        shards.check_meta(meta, SPLITS, fail)
    elif not isinstance(hashes, dict) or sorted(hashes) != sorted(ARRAY_FILES):
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
