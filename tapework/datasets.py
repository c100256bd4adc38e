"""`fetch_dataset` (verified raw files -> data/raw), `load_raw` (data/raw -> arrays) and `stream_raw`
(data/raw -> a RawSource read in chunks), per file format.

What each data set is (task, files, pins, classes) is its entry in tapework/catalogue.py; this
module holds one fetch and one load function per `catalogue.FORMATS` entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import importlib.util
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from tapework import parsers
from tapework.catalogue import DATASETS, IDX_FILES, DatasetSpec
from tapework.download import cache_path, download_file, effective_mirror, local_path, prepare_cache, resolve_url, safe_extract, url_scheme
from tapework.errors import DataError, DownloadError
from tapework.io import clear_stale, file_digest, held_temp, load_npz, read_json, save_npz, temp_pattern, write_json
from tapework.params import DownloadParams, IdxParams, ParamsError
from tapework.preprocess import RawDataset, RawSource

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CSV_FILE = "data.csv"
# download.idx.sha256's key for each of catalogue.IDX_FILES, in that order.
IDX_PIN_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
IDX_CHUNK_BYTES = 8 << 20  # pixels per chunk when stream_raw streams IDX images
RERUN = "Rerun the download stage (`dvc repro download` or `python stages/download.py`)."


CIFAR10_DIR = "cifar-10-batches-bin"
CIFAR10_TRAIN = tuple(f"{CIFAR10_DIR}/data_batch_{index}.bin" for index in range(1, 6))
CIFAR10_TEST = f"{CIFAR10_DIR}/test_batch.bin"


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown data set '{name}'; known: {', '.join(DATASETS)}. Fix download.dataset.")
    return DATASETS[name]


def fetch_dataset(params: DownloadParams, raw_dir: Path) -> dict[str, Any]:
    """Replace `raw_dir` with the data set's verified raw files and a manifest.json; returns the manifest.

    Everything is built in a staging folder beside `raw_dir` and swapped in only when complete,
    so a failure leaves the previous `raw_dir` (or none) untouched.
    """
    name, raw_dir = params.dataset, Path(raw_dir)
    spec = dataset_spec(name)
    with _staging(raw_dir) as stage:
        sources = _FORMATS[spec.format][0](spec, params, stage)
        files = sorted(path for path in stage.rglob("*") if path.is_file())
        manifest = {
            "dataset": name,
            "files": {path.relative_to(stage).as_posix(): file_digest(path) for path in files},
            "sources": sources,
        }
        write_json(stage / MANIFEST, manifest)
    return manifest


@contextlib.contextmanager
def _staging(raw_dir: Path) -> Iterator[Path]:
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    # A SIGKILL skips every `finally`: clear what killed runs left (held_temp's lock tells a live run's apart).
    for suffix in (".staging", ".old"):
        clear_stale(raw_dir.parent, temp_pattern(raw_dir.name, suffix))
    with held_temp(raw_dir.parent, f".{raw_dir.name}.", ".staging", directory=True) as stage:
        try:
            yield stage
            stage.chmod(0o755)  # mkdtemp makes it 0700; data/raw should be an ordinary folder
            old = stage.with_suffix(".old")
            if raw_dir.exists():
                os.replace(raw_dir, old)
            os.replace(stage, raw_dir)
            shutil.rmtree(old, ignore_errors=True)  # ignore: a concurrent run's clear_stale may be removing it too
        finally:
            if stage.exists():
                shutil.rmtree(stage)


def _fetch_kwargs(params: DownloadParams) -> dict[str, Any]:
    return {
        "retries": params.retries,
        "backoff_seconds": params.backoff_seconds,
        "timeout_seconds": params.timeout_seconds,
        "deadline_seconds": params.deadline_seconds,
    }


def _fetch_remote(spec: DatasetSpec, params: DownloadParams, stage: Path) -> dict[str, Any]:
    """Each pinned file, through the verified cache, into `stage` (an archive is unpacked there)."""
    name = spec.name
    mirror = effective_mirror(params.mirror)
    prepare_cache()
    sources = {}
    for remote in spec.files:
        if mirror:
            url = resolve_url(remote.url or remote.name, mirror)
        elif remote.url:
            url = remote.url
        else:
            raise DownloadError(
                f"data set '{name}': {remote.name} has no canonical download URL. Set download.mirror (or env "
                f"TAPEWORK_MIRROR) to a folder or URL that holds {remote.name} (SHA-256 {remote.sha256})."
            )
        log.debug("fetching %s from %s", remote.name, url)
        cached = download_file(url, cache_path(remote.sha256, remote.name), remote.sha256, size=remote.size, **_fetch_kwargs(params))
        if spec.format == "cifar10_binary":
            _extract_cifar10(cached, stage)
        else:  # a local copy through the same verified path: hashed again on the way into data/raw
            download_file(str(cached), stage / remote.name, remote.sha256, size=remote.size, **_fetch_kwargs(params), progress=False)
        sources[remote.name] = {"url": remote.url, "sha256": remote.sha256}
    return sources


def _extract_cifar10(archive: Path, stage: Path) -> None:
    safe_extract(archive, stage)
    missing = [name for name in (*CIFAR10_TRAIN, CIFAR10_TEST) if not (stage / name).is_file()]
    if missing:
        raise DataError(f"{archive}: lacks {', '.join(missing)}; not the CIFAR-10 binary release. Delete it. {RERUN}")


def bundled_arrays(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """The features and targets of a bundled data set, as `sklearn.datasets.<spec.sklearn_loader>`
    returns them, read from that loader's own files without importing scikit-learn.

    Importing scikit-learn imports SciPy's statistics: about 1 s, three quarters of the download
    stage's time on digits. The files are read as the loader reads them (gzip text, np.loadtxt);
    tests/test_datasets.py checks both arrays against the loader's, bit for bit.
    """
    found = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if found is None or found.origin is None:
        raise DataError(f"data set '{spec.name}' ships with scikit-learn, which is not installed: install the project's requirements (bash scripts/env.sh).")
    folder = Path(found.origin).parent / "datasets" / "data"
    tables = []
    for name in spec.bundled_files:
        with gzip.open(folder / name, mode="rt", encoding="utf-8") as stream:
            tables.append(np.loadtxt(stream, delimiter=spec.bundled_delimiter))
    if len(tables) == 1:  # the target is the last column
        return tables[0][:, :-1], tables[0][:, -1]
    return tables[0], tables[1]


def _write_bundled(spec: DatasetSpec, params: DownloadParams, stage: Path) -> dict[str, Any]:
    name = spec.name
    features, targets = bundled_arrays(spec)
    if spec.image_shape is not None:
        arrays = {"x": features.reshape(-1, *spec.image_shape).astype(np.uint8), "y": targets.astype(np.int64)}
    else:
        names = np.array(spec.feature_names, dtype=str)  # unicode array: loadable without pickle
        arrays = {"x": features.astype(np.float64), "y": targets.astype(np.float64), "feature_names": names}
    save_npz(stage / f"{name}.npz", arrays)
    return {f"{name}.npz": {"url": f"sklearn.datasets.{spec.sklearn_loader}", "scikit-learn": metadata.version("scikit-learn")}}


def _fetch_csv(spec: DatasetSpec, params: DownloadParams, stage: Path) -> dict[str, Any]:
    """download.csv.path, verified against download.csv.sha256, as data/raw/data.csv.

    The pin is required for local files too: DVC sees params.yaml, not the file, so the pin is
    what makes an edited CSV a change that `dvc status` reports and `dvc repro` reruns.
    """
    csv = params.csv
    if not csv.path:
        raise ParamsError("params.yaml: download.csv.path is empty: the csv data set needs a path or URL.")
    remote = url_scheme(csv.path) in ("http", "https")
    if not remote:
        local = local_path(csv.path, url_scheme(csv.path))
        if not local.is_file():
            raise DataError(f"{csv.path}: no such file. Fix download.csv.path in params.yaml.")
        current = file_digest(local)
        if not csv.sha256:
            raise ParamsError(
                f"params.yaml: download.csv.sha256 is empty; pin the CSV: set `sha256: {current}` under download.csv "
                f"(the SHA-256 of {csv.path} now). After editing the file, paste its new hash there."
            )
        if current != csv.sha256:
            raise DataError(
                f"{csv.path}: SHA-256 {current} differs from download.csv.sha256 {csv.sha256}: the file changed. If the "
                f"change is intended, set `sha256: {current}` under download.csv in params.yaml; else restore the file."
            )
    elif not csv.sha256:
        raise ParamsError(
            f"params.yaml: download.csv.sha256 is empty but download.csv.path = '{csv.path}' is an http(s) URL; "
            "pin its SHA-256 (`sha256sum FILE`) in download.csv.sha256."
        )
    source = csv.path
    if remote:
        prepare_cache()
        source = str(download_file(csv.path, cache_path(csv.sha256, CSV_FILE), csv.sha256, **_fetch_kwargs(params)))
    download_file(source, stage / CSV_FILE, csv.sha256, **_fetch_kwargs(params), progress=False)
    return {CSV_FILE: {"url": csv.path, "sha256": file_digest(stage / CSV_FILE)}}


def _fetch_idx_params(spec: DatasetSpec, params: DownloadParams, stage: Path) -> dict[str, Any]:
    """The four canonical IDX files from download.idx.path, each verified against its download.idx.sha256 pin.

    As for csv, the pins are required for local files too: DVC sees params.yaml, not the files.
    """
    idx = params.idx
    if not idx.path:
        raise ParamsError(f"params.yaml: download.idx.path is empty: the idx data set needs a folder or base URL holding {', '.join(IDX_FILES)}.")
    remote = url_scheme(idx.path) in ("http", "https")
    pins = dict(zip(IDX_FILES, _idx_pins(idx), strict=True))
    if not remote:
        folder = local_path(idx.path, url_scheme(idx.path))
        missing = [name for name in IDX_FILES if not (folder / name).is_file()]
        if missing:
            raise DataError(f"{idx.path}: has no {missing[0]}. Fix download.idx.path in params.yaml: a folder holding {', '.join(IDX_FILES)}.")
        current = {name: file_digest(folder / name) for name in IDX_FILES}
        if not all(pins.values()):
            raise ParamsError(
                f"params.yaml: download.idx.sha256 is not set for every file; pin the files: set "
                f"{_idx_pin_text(current)} under download.idx.sha256 (their SHA-256 in {idx.path} now). "
                "After editing a file, paste its new hash there."
            )
        for key, name in zip(IDX_PIN_KEYS, IDX_FILES, strict=True):
            if current[name] != pins[name]:
                raise DataError(
                    f"{folder / name}: SHA-256 {current[name]} differs from download.idx.sha256.{key} {pins[name]}: the file changed. "
                    f"If the change is intended, set `{key}: {current[name]}` under download.idx.sha256 in params.yaml; else restore the file."
                )
    elif not all(pins.values()):
        raise ParamsError(
            f"params.yaml: download.idx.sha256 is not set for every file but download.idx.path = '{idx.path}' is an http(s) URL; "
            f"pin each file's SHA-256 (`sha256sum FILE`) under download.idx.sha256 ({', '.join(IDX_PIN_KEYS)})."
        )
    sources = {}
    for name, pin in pins.items():
        source = resolve_url(name, idx.path)
        if remote:
            prepare_cache()
            source = str(download_file(source, cache_path(pin, name), pin, **_fetch_kwargs(params)))
        download_file(source, stage / name, pin, **_fetch_kwargs(params), progress=False)
        sources[name] = {"url": resolve_url(name, idx.path), "sha256": pin}
    return sources


def _idx_pins(idx: IdxParams) -> tuple[str, ...]:
    """download.idx.sha256 in catalogue.IDX_FILES order."""
    return tuple(getattr(idx.sha256, key) for key in IDX_PIN_KEYS)


def _idx_pin_text(digests: dict[str, str]) -> str:
    """`train_images: <hash>`, ... for each IDX file: the lines to paste under download.idx.sha256."""
    return ", ".join(f"`{key}: {digests[name]}`" for key, name in zip(IDX_PIN_KEYS, IDX_FILES, strict=True))


def load_raw(download: DownloadParams, raw_dir: Path) -> RawDataset:
    """Verify `raw_dir`'s manifest hashes, then parse the raw files of data set download.dataset into arrays."""
    spec, raw_dir = dataset_spec(download.dataset), Path(raw_dir)
    _verify_manifest(spec, raw_dir, download)
    return _FORMATS[spec.format][1](raw_dir, spec, download)


def stream_raw(download: DownloadParams, raw_dir: Path) -> RawSource:
    """As `load_raw`, but a RawSource: IDX images are streamed from their files in chunks of about
    IDX_CHUNK_BYTES pixels (labels read whole); any other format is loaded whole, as one chunk.

    `stream_raw(...).materialize()` equals `load_raw(...)`.
    """
    spec, raw_dir = dataset_spec(download.dataset), Path(raw_dir)
    _verify_manifest(spec, raw_dir, download)
    if spec.format in ("idx", "idx_params"):
        train, test, class_names, image_shape = _open_idx(raw_dir, spec, download)
        return RawSource(
            train.labels, test.labels, train.chunks, test.chunks, image_shape, np.dtype(np.uint8),
            "classification", class_names, None, image_shape,
        )
    return RawSource.from_arrays(_FORMATS[spec.format][1](raw_dir, spec, download))


def _verify_manifest(spec: DatasetSpec, raw_dir: Path, download: DownloadParams) -> None:
    """Check `raw_dir` before anything parses it: each pinned file against its pin, then the manifest's hashes.

    The manifest is a record, not an authority: a file the loader reads must be listed in it,
    a file it does not list is refused, and a pinned file (catalogue pins; data.csv against
    download.csv.sha256; the idx data set's files against download.idx.sha256) must match its pin
    whatever the manifest says, so that editing the manifest cannot switch a check off.
    """
    dataset, csv = download.dataset, download.csv
    path = raw_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: not found. {RERUN}")
    try:
        manifest = read_json(path)
        recorded, files = manifest["dataset"], dict(manifest["files"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
        raise DataError(f"{path}: not a valid manifest ({error}). {RERUN}") from error
    if recorded != dataset:
        raise DataError(f"{path}: holds data set '{recorded}' but download.dataset is '{dataset}'. {RERUN}")
    pins = {remote.name: (remote.sha256, "its catalogue pin (tapework/catalogue.py)") for remote in spec.files}
    if spec.format == "cifar10_binary":
        pins = {}  # the pinned archive is unpacked, not kept; its members are checked against the manifest
    if spec.format == "csv" and csv.sha256:
        pins[CSV_FILE] = (csv.sha256, "download.csv.sha256")
    if spec.format == "idx_params":
        empty = [key for key, pin in zip(IDX_PIN_KEYS, _idx_pins(download.idx), strict=True) if not pin]
        if empty:
            raise ParamsError(f"params.yaml: download.idx.sha256.{empty[0]} is empty; pin every IDX file (the download stage prints the hashes to paste).")
        pins.update({name: (pin, f"download.idx.sha256.{key}") for key, name, pin in zip(IDX_PIN_KEYS, IDX_FILES, _idx_pins(download.idx), strict=True)})
    for name, (pin, source) in sorted(pins.items()):  # first, so that no manifest edit can skip them
        _check_digest(raw_dir / name, pin, source)
    for remote in spec.files:  # a manifest from an older pin must not pass as current
        if remote.name in files and files[remote.name] != remote.sha256:
            raise DataError(f"{path}: {remote.name} was fetched under another pin. {RERUN}")
    unlisted = sorted(set(_read_by_loader(spec)) - set(files))
    if unlisted:
        raise DataError(f"{path}: does not list {unlisted[0]}, which the {spec.format} loader reads. {RERUN}")
    present = {file.relative_to(raw_dir).as_posix() for file in raw_dir.rglob("*") if file.is_file()} - {MANIFEST}
    unknown = sorted(present - set(files))
    if unknown:
        raise DataError(f"{raw_dir / unknown[0]}: not listed in {MANIFEST}, so it cannot be verified. {RERUN}")
    for name, expected in sorted(files.items()):
        if name not in pins:
            _check_digest(raw_dir / name, expected, "the manifest's")


def _check_digest(file: Path, expected: str, source: str) -> None:
    if not file.is_file():
        raise DataError(f"{file}: missing (the data set needs it). {RERUN}")
    got = file_digest(file)
    if got != expected:
        raise DataError(f"{file}: SHA-256 {got} differs from {source} {expected}; it changed after download. {RERUN}")


def _read_by_loader(spec: DatasetSpec) -> tuple[str, ...]:
    """The raw files the load function of `spec`'s format opens."""
    if spec.format == "sklearn":
        return (f"{spec.name}.npz",)
    if spec.format == "cifar10_binary":
        return (*CIFAR10_TRAIN, CIFAR10_TEST)
    if spec.format == "csv":
        return (CSV_FILE,)
    if spec.format == "idx_params":
        return IDX_FILES
    return tuple(remote.name for remote in spec.files)


def _load_bundled(raw_dir: Path, spec: DatasetSpec, download: DownloadParams) -> RawDataset:
    arrays = load_npz(raw_dir / f"{spec.name}.npz")
    names = tuple(str(item) for item in arrays["feature_names"]) if "feature_names" in arrays else None
    return RawDataset(arrays["x"], arrays["y"], None, None, spec.task or "", spec.class_names, names, spec.image_shape)


@dataclasses.dataclass(frozen=True, eq=False)
class _IdxSplit:
    """One split of an IDX data set: its labels read and checked, its images' header read."""

    labels: np.ndarray  # uint8 (N,), as in the file: one byte per example while streaming
    images: parsers.IdxStream

    def chunks(self) -> Iterator[np.ndarray]:
        """The images in chunks of rows, (n, H, W, 1), read afresh on each call."""
        return (chunk[..., np.newaxis] for chunk in self.images)

    def whole(self) -> np.ndarray:
        """Every image at once, (N, H, W, 1)."""
        images = parsers.parse_idx(self.images.path)
        if images.shape != self.images.dims:
            raise DataError(f"{self.images.path}: its IDX header changed from {self.images.dims} to {images.shape} while it was read. {RERUN}")
        return images[..., np.newaxis]


def _idx_split(raw_dir: Path, images_name: str, labels_name: str, shape: tuple[int, int] | None) -> _IdxSplit:
    """Labels parsed whole and the images' header read; counts and shapes checked before any pixel is read."""
    labels = parsers.parse_idx(raw_dir / labels_name)
    first = parsers.iter_idx(raw_dir / images_name, 1)
    dims = first.dims
    parsers.check_counts(dims[0], labels, name=f"{raw_dir / images_name} / {labels_name}")
    if len(dims) != 3 or labels.ndim != 1 or (shape is not None and dims[1:] != shape):
        expected = "height, width" if shape is None else f"{shape[0]}, {shape[1]}"
        raise DataError(f"{raw_dir / images_name}: shape {dims}, expected (N, {expected}) images with (N,) labels. {RERUN}")
    rows = max(1, IDX_CHUNK_BYTES // math.prod(dims[1:]))
    return _IdxSplit(labels, dataclasses.replace(first, rows_per_chunk=rows))


def _open_idx(raw_dir: Path, spec: DatasetSpec, download: DownloadParams) -> tuple[_IdxSplit, _IdxSplit, tuple[str, ...], tuple[int, int, int]]:
    """Both splits of an IDX data set (labels read, images' headers read, every check done), its class names and image shape."""
    shape = None if spec.image_shape is None else spec.image_shape[:2]
    train = _idx_split(raw_dir, IDX_FILES[0], IDX_FILES[1], shape)
    test = _idx_split(raw_dir, IDX_FILES[2], IDX_FILES[3], train.images.dims[1:])
    if spec.format == "idx":
        class_names, fix = spec.class_names, RERUN
    elif download.idx.class_names:
        class_names = download.idx.class_names
        fix = f"download.idx.class_names names {len(class_names)} classes: give one name per label, or [] for 0..K-1."
    else:
        top = max(int(split.labels.max()) for split in (train, test))
        class_names, fix = tuple(str(label) for label in range(top + 1)), ""
        if len(class_names) < 2:
            raise DataError(f"{raw_dir / IDX_FILES[1]}: every label is 0; classification needs at least two classes. Check the labels files.")
    for split, name in ((train, IDX_FILES[1]), (test, IDX_FILES[3])):
        if int(split.labels.max()) >= len(class_names):
            raise DataError(f"{raw_dir / name}: label {int(split.labels.max())} outside 0..{len(class_names) - 1}. {fix}")
    return train, test, class_names, (*train.images.dims[1:], 1)


def _load_idx(raw_dir: Path, spec: DatasetSpec, download: DownloadParams) -> RawDataset:
    train, test, class_names, image_shape = _open_idx(raw_dir, spec, download)
    return RawDataset(train.whole(), train.labels.astype(np.int64), test.whole(), test.labels.astype(np.int64), "classification", class_names, None, image_shape)


def _load_cifar10(raw_dir: Path, spec: DatasetSpec, download: DownloadParams) -> RawDataset:
    batches = [parsers.parse_cifar10_binary(raw_dir / name) for name in CIFAR10_TRAIN]
    x_train = np.concatenate([images for images, _ in batches])
    y_train = np.concatenate([labels for _, labels in batches])
    x_test, y_test = parsers.parse_cifar10_binary(raw_dir / CIFAR10_TEST)
    return RawDataset(x_train, y_train, x_test, y_test, "classification", spec.class_names, None, spec.image_shape)


def _load_california(raw_dir: Path, spec: DatasetSpec, download: DownloadParams) -> RawDataset:
    x, y, names = parsers.parse_california_housing(raw_dir / spec.files[0].name)
    return RawDataset(x, y, None, None, "regression", (), names, None)


def _load_csv(raw_dir: Path, spec: DatasetSpec, download: DownloadParams) -> RawDataset:
    csv, path = download.csv, raw_dir / CSV_FILE
    x, target, names = parsers.parse_csv(path, csv.target)
    if csv.task == "regression":
        if target.dtype.kind not in "biuf":
            raise DataError(f"{path}: target '{csv.target}' is not numeric; set download.csv.task: classification.")
        return RawDataset(x, target.astype(np.float64), None, None, "regression", (), names, None)
    if target.dtype.kind == "f" and not np.array_equal(target, np.round(target)):
        raise DataError(f"{path}: target '{csv.target}' has non-integer values; set download.csv.task: regression.")
    classes, y = np.unique(target, return_inverse=True)  # sorted class values -> 0..K-1
    if len(classes) < 2:
        raise DataError(f"{path}: target '{csv.target}' has a single class; classification needs at least two.")
    class_names = tuple(str(int(c)) if target.dtype.kind == "f" else str(c) for c in classes)
    return RawDataset(x, y.astype(np.int64), None, None, "classification", class_names, names, None)


Fetch = Callable[[DatasetSpec, DownloadParams, Path], dict[str, Any]]
Load = Callable[[Path, DatasetSpec, DownloadParams], RawDataset]
# One (fetch, load) pair per catalogue.FORMATS entry.
_FORMATS: dict[str, tuple[Fetch, Load]] = {
    "sklearn": (_write_bundled, _load_bundled),
    "idx": (_fetch_remote, _load_idx),
    "cifar10_binary": (_fetch_remote, _load_cifar10),
    "california_housing": (_fetch_remote, _load_california),
    "csv": (_fetch_csv, _load_csv),
    "idx_params": (_fetch_idx_params, _load_idx),
}
