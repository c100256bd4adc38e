"""`fetch_dataset` (verified raw files -> data/raw) and `load_raw` (data/raw -> arrays), per file format.

What each data set is (task, files, pins, classes) is its entry in tapework/catalogue.py; this
module holds one fetch and one load function per `catalogue.FORMATS` entry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tapework import parsers
from tapework.catalogue import DATASETS, IDX_FILES, DatasetSpec
from tapework.download import cache_path, download_file, effective_mirror, local_path, prepare_cache, resolve_url, safe_extract, url_scheme
from tapework.errors import DataError, DownloadError
from tapework.io import clear_stale, file_digest, held_temp, load_npz, read_json, save_npz, temp_pattern, write_json
from tapework.params import CsvParams, DownloadParams, ParamsError
from tapework.preprocess import RawDataset

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CSV_FILE = "data.csv"
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


def _write_bundled(spec: DatasetSpec, params: DownloadParams, stage: Path) -> dict[str, Any]:
    import sklearn  # imported here: only the bundled data sets need it, and it is slow to import
    from sklearn import datasets as sk_datasets

    name = spec.name
    bunch = getattr(sk_datasets, spec.sklearn_loader)(**dict(spec.sklearn_options))
    if spec.image_shape is not None:
        arrays = {"x": bunch.images.astype(np.uint8)[..., np.newaxis], "y": bunch.target.astype(np.int64)}
    else:
        names = np.array(bunch.feature_names, dtype=str)  # unicode array: loadable without pickle
        arrays = {"x": bunch.data.astype(np.float64), "y": bunch.target.astype(np.float64), "feature_names": names}
    save_npz(stage / f"{name}.npz", arrays)
    return {f"{name}.npz": {"url": f"sklearn.datasets.{spec.sklearn_loader}", "scikit-learn": sklearn.__version__}}


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


def load_raw(dataset: str, raw_dir: Path, csv: CsvParams) -> RawDataset:
    """Verify `raw_dir`'s manifest hashes, then parse the raw files into arrays."""
    spec = dataset_spec(dataset)
    raw_dir = Path(raw_dir)
    _verify_manifest(dataset, spec, raw_dir, csv)
    return _FORMATS[spec.format][1](raw_dir, spec, csv)


def _verify_manifest(dataset: str, spec: DatasetSpec, raw_dir: Path, csv: CsvParams) -> None:
    """Check `raw_dir` before anything parses it: each pinned file against its pin, then the manifest's hashes.

    The manifest is a record, not an authority: a file the loader reads must be listed in it,
    a file it does not list is refused, and a pinned file (catalogue pins; data.csv against
    download.csv.sha256) must match its pin whatever the manifest says, so that editing the
    manifest cannot switch a check off.
    """
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
    return tuple(remote.name for remote in spec.files)


def _load_bundled(raw_dir: Path, spec: DatasetSpec, csv: CsvParams) -> RawDataset:
    arrays = load_npz(raw_dir / f"{spec.name}.npz")
    names = tuple(str(item) for item in arrays["feature_names"]) if "feature_names" in arrays else None
    return RawDataset(arrays["x"], arrays["y"], None, None, spec.task or "", spec.class_names, names, spec.image_shape)


def _load_idx(raw_dir: Path, spec: DatasetSpec, csv: CsvParams) -> RawDataset:
    def split(images_name: str, labels_name: str) -> tuple[np.ndarray, np.ndarray]:
        images = parsers.parse_idx(raw_dir / images_name)
        labels = parsers.parse_idx(raw_dir / labels_name)
        parsers.check_counts(images, labels, name=f"{raw_dir / images_name} / {labels_name}")
        height, width, _ = spec.image_shape
        if images.ndim != 3 or labels.ndim != 1 or images.shape[1:] != (height, width):
            raise DataError(f"{raw_dir / images_name}: shape {images.shape}, expected (N, {height}, {width}). {RERUN}")
        _check_labels(labels, spec, raw_dir / labels_name)
        return images[..., np.newaxis], labels.astype(np.int64)

    x_train, y_train = split(IDX_FILES[0], IDX_FILES[1])
    x_test, y_test = split(IDX_FILES[2], IDX_FILES[3])
    return RawDataset(x_train, y_train, x_test, y_test, "classification", spec.class_names, None, spec.image_shape)


def _load_cifar10(raw_dir: Path, spec: DatasetSpec, csv: CsvParams) -> RawDataset:
    batches = [parsers.parse_cifar10_binary(raw_dir / name) for name in CIFAR10_TRAIN]
    x_train = np.concatenate([images for images, _ in batches])
    y_train = np.concatenate([labels for _, labels in batches])
    x_test, y_test = parsers.parse_cifar10_binary(raw_dir / CIFAR10_TEST)
    return RawDataset(x_train, y_train, x_test, y_test, "classification", spec.class_names, None, spec.image_shape)


def _load_california(raw_dir: Path, spec: DatasetSpec, csv: CsvParams) -> RawDataset:
    x, y, names = parsers.parse_california_housing(raw_dir / spec.files[0].name)
    return RawDataset(x, y, None, None, "regression", (), names, None)


def _load_csv(raw_dir: Path, spec: DatasetSpec, csv: CsvParams) -> RawDataset:
    path = raw_dir / CSV_FILE
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


def _check_labels(labels: np.ndarray, spec: DatasetSpec, where: Path) -> None:
    if labels.size and int(labels.max()) >= len(spec.class_names):
        raise DataError(f"{where}: label {int(labels.max())} outside 0..{len(spec.class_names) - 1}. {RERUN}")


Fetch = Callable[[DatasetSpec, DownloadParams, Path], dict[str, Any]]
Load = Callable[[Path, DatasetSpec, CsvParams], RawDataset]
# One (fetch, load) pair per catalogue.FORMATS entry.
_FORMATS: dict[str, tuple[Fetch, Load]] = {
    "sklearn": (_write_bundled, _load_bundled),
    "idx": (_fetch_remote, _load_idx),
    "cifar10_binary": (_fetch_remote, _load_cifar10),
    "california_housing": (_fetch_remote, _load_california),
    "csv": (_fetch_csv, _load_csv),
}
