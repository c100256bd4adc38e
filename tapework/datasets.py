"""The data set registry, `fetch_dataset` (verified raw files -> data/raw) and `load_raw` (data/raw -> arrays)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tapework import parsers
from tapework.download import cache_path, download_file, effective_mirror, resolve_url, safe_extract, url_scheme
from tapework.errors import DataError, DownloadError
from tapework.io import load_npz, read_json, save_npz, sha256_file, write_json
from tapework.params import DATASET_TASKS, IMAGE_SHAPES, CsvParams, DownloadParams, ParamsError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CSV_FILE = "data.csv"
RERUN = "Rerun the download stage (`dvc repro download` or `python stages/download.py`)."


@dataclass(frozen=True)
class RemoteFile:
    name: str  # file name in the cache, on a mirror and in data/raw
    url: str | None  # canonical URL; None = only reachable through a mirror
    sha256: str  # pinned SHA-256 of the canonical bytes


@dataclass(frozen=True)
class DatasetSpec:
    task: str | None  # None: taken from download.csv.task
    files: tuple[RemoteFile, ...] = ()
    class_names: tuple[str, ...] = ()
    image_shape: tuple[int, int, int] | None = None


@dataclass(frozen=True, eq=False)  # eq=False: == on numpy arrays is element-wise, not a bool
class RawDataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    task: str
    class_names: tuple[str, ...]
    feature_names: tuple[str, ...] | None
    image_shape: tuple[int, int, int] | None


DIGIT_CLASSES = tuple(str(digit) for digit in range(10))
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IDX_FILES = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
)
CIFAR10_DIR = "cifar-10-batches-bin"
CIFAR10_TRAIN = tuple(f"{CIFAR10_DIR}/data_batch_{index}.bin" for index in range(1, 6))
CIFAR10_TEST = f"{CIFAR10_DIR}/test_batch.bin"


def _idx_files(base_url: str, pins: tuple[str, str, str, str]) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(name, base_url + name, pin) for name, pin in zip(IDX_FILES, pins, strict=True))


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("classification", class_names=DIGIT_CLASSES, image_shape=IMAGE_SHAPES["digits"]),
    "diabetes": DatasetSpec("regression"),
    # TensorFlow Datasets' MNIST source (the CVDF mirror of yann.lecun.com); pins as in TFDS's checksums.
    "mnist": DatasetSpec(
        "classification",
        _idx_files(
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            (
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            ),
        ),
        DIGIT_CLASSES,
        IMAGE_SHAPES["mnist"],
    ),
    # Keras' fashion_mnist.load_data() source; pins as in TFDS's / Keras' checksums.
    "fashion_mnist": DatasetSpec(
        "classification",
        _idx_files(
            "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
            (
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            ),
        ),
        FASHION_CLASSES,
        IMAGE_SHAPES["fashion_mnist"],
    ),
    # The *binary* release (170,052,171 bytes, MD5 c32a1d4ab5d03f1284b67883e8d87530): never unpickle network data.
    "cifar10": DatasetSpec(
        "classification",
        (
            RemoteFile(
                "cifar-10-binary.tar.gz",
                "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
            ),
        ),
        CIFAR10_CLASSES,
        IMAGE_SHAPES["cifar10"],
    ),
    # cal_housing.data is StatLib's "houses" data (Pace & Barry 1997, https://lib.stat.cmu.edu/datasets/houses.zip)
    # as repackaged by L. Torgo: member CaliforniaHousing/cal_housing.data of cal_housing.tgz
    # (https://www.dcc.fc.up.pt/~ltorgo/Regression/cal_housing.tgz; scikit-learn's copy,
    # https://ndownloader.figshare.com/files/5976036, is pinned at
    # aaa5c9a6afe2225cc2aed2723682ae403280c4a3695a2ddda4ffb5d8215ea681).
    # No canonical URL serves the bare file, so it is fetched only through download.mirror / TAPEWORK_MIRROR.
    "california_housing": DatasetSpec(
        "regression",
        (RemoteFile("cal_housing.data", None, "a2b44dcc7e1c9091b43c4f458b25cbd1f7e8068d08edd26bc4703108d3fa6214"),),
    ),
    "csv": DatasetSpec(None),
}
BUNDLED = {"digits": "load_digits", "diabetes": "load_diabetes"}  # scikit-learn ships these: no network


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
        if name in BUNDLED:
            sources = _write_bundled(name, stage)
        elif name == "csv":
            sources = _fetch_csv(params, stage)
        else:
            sources = _fetch_remote(name, spec, params, stage)
        files = sorted(path for path in stage.rglob("*") if path.is_file())
        manifest = {
            "dataset": name,
            "files": {path.relative_to(stage).as_posix(): sha256_file(path) for path in files},
            "sources": sources,
        }
        write_json(stage / MANIFEST, manifest)
    return manifest


@contextlib.contextmanager
def _staging(raw_dir: Path) -> Iterator[Path]:
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{raw_dir.name}.", suffix=".staging", dir=raw_dir.parent))
    try:
        yield stage
        stage.chmod(0o755)  # mkdtemp makes it 0700; data/raw should be an ordinary folder
        old = stage.with_suffix(".old")
        if raw_dir.exists():
            os.replace(raw_dir, old)
        os.replace(stage, raw_dir)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if stage.exists():
            shutil.rmtree(stage)


def _fetch_kwargs(params: DownloadParams) -> dict[str, Any]:
    return {
        "retries": params.retries,
        "backoff_seconds": params.backoff_seconds,
        "timeout_seconds": params.timeout_seconds,
    }


def _fetch_remote(name: str, spec: DatasetSpec, params: DownloadParams, stage: Path) -> dict[str, Any]:
    mirror = effective_mirror(params.mirror)
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
        cached = download_file(url, cache_path(remote.sha256, remote.name), remote.sha256, **_fetch_kwargs(params))
        if name == "cifar10":
            _extract_cifar10(cached, stage)
        else:  # a local copy through the same verified path: hashed again on the way into data/raw
            download_file(str(cached), stage / remote.name, remote.sha256, **_fetch_kwargs(params), progress=False)
        sources[remote.name] = {"url": remote.url, "sha256": remote.sha256}
    return sources


def _extract_cifar10(archive: Path, stage: Path) -> None:
    safe_extract(archive, stage)
    missing = [name for name in (*CIFAR10_TRAIN, CIFAR10_TEST) if not (stage / name).is_file()]
    if missing:
        raise DataError(f"{archive}: lacks {', '.join(missing)}; not the CIFAR-10 binary release. Delete it. {RERUN}")


def _write_bundled(name: str, stage: Path) -> dict[str, Any]:
    import sklearn  # imported here: only the bundled data sets need it, and it is slow to import
    from sklearn import datasets as sk_datasets

    bunch = getattr(sk_datasets, BUNDLED[name])(**({"scaled": False} if name == "diabetes" else {}))
    if name == "digits":
        arrays = {"x": bunch.images.astype(np.uint8)[..., np.newaxis], "y": bunch.target.astype(np.int64)}
    else:
        names = np.array(bunch.feature_names, dtype=str)  # unicode array: loadable without pickle
        arrays = {"x": bunch.data.astype(np.float64), "y": bunch.target.astype(np.float64), "feature_names": names}
    save_npz(stage / f"{name}.npz", arrays)
    return {f"{name}.npz": {"url": f"sklearn.datasets.{BUNDLED[name]}", "scikit-learn": sklearn.__version__}}


def _fetch_csv(params: DownloadParams, stage: Path) -> dict[str, Any]:
    csv = params.csv
    if not csv.path:
        raise ParamsError("params.yaml: download.csv.path is empty: the csv data set needs a path or URL.")
    if url_scheme(csv.path) in ("http", "https") and not csv.sha256:
        raise ParamsError(
            f"params.yaml: download.csv.sha256 is empty but download.csv.path = '{csv.path}' is an http(s) URL; "
            "pin its SHA-256 (`sha256sum FILE`) in download.csv.sha256."
        )
    source = csv.path
    if csv.sha256 and url_scheme(csv.path) in ("http", "https"):
        source = str(download_file(csv.path, cache_path(csv.sha256, CSV_FILE), csv.sha256, **_fetch_kwargs(params)))
    download_file(source, stage / CSV_FILE, csv.sha256, **_fetch_kwargs(params), progress=False)
    return {CSV_FILE: {"url": csv.path, "sha256": sha256_file(stage / CSV_FILE)}}


def load_raw(dataset: str, raw_dir: Path, csv: CsvParams) -> RawDataset:
    """Verify `raw_dir`'s manifest hashes, then parse the raw files into arrays."""
    spec = dataset_spec(dataset)
    raw_dir = Path(raw_dir)
    _verify_manifest(dataset, spec, raw_dir)
    return _LOADERS[dataset](raw_dir, spec, csv)


def _verify_manifest(dataset: str, spec: DatasetSpec, raw_dir: Path) -> None:
    path = raw_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: not found. {RERUN}")
    try:
        manifest = read_json(path)
        recorded, files = manifest["dataset"], dict(manifest["files"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise DataError(f"{path}: not a valid manifest ({error}). {RERUN}") from error
    if recorded != dataset:
        raise DataError(f"{path}: holds data set '{recorded}' but download.dataset is '{dataset}'. {RERUN}")
    for remote in spec.files:  # a manifest from an older pin must not pass as current
        if remote.name in files and files[remote.name] != remote.sha256:
            raise DataError(f"{path}: {remote.name} was fetched under another pin. {RERUN}")
    for name, expected in sorted(files.items()):
        file = raw_dir / name
        if not file.is_file():
            raise DataError(f"{file}: listed in {MANIFEST} but missing. {RERUN}")
        got = sha256_file(file)
        if got != expected:
            raise DataError(
                f"{file}: SHA-256 {got} differs from the manifest's {expected}; it changed after download. {RERUN}"
            )


def _load_bundled(name: str, raw_dir: Path, spec: DatasetSpec, csv: CsvParams) -> RawDataset:
    arrays = load_npz(raw_dir / f"{name}.npz")
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


_LOADERS: dict[str, Callable[[Path, DatasetSpec, CsvParams], RawDataset]] = {
    "digits": functools.partial(_load_bundled, "digits"),
    "diabetes": functools.partial(_load_bundled, "diabetes"),
    "mnist": _load_idx,
    "fashion_mnist": _load_idx,
    "cifar10": _load_cifar10,
    "california_housing": _load_california,
    "csv": _load_csv,
}
assert set(_LOADERS) == set(DATASETS) == set(DATASET_TASKS), "registry, loaders and params must list the same data sets"
