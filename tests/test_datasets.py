"""The registry, fetch_dataset and load_raw: real MNIST / Fashion-MNIST / California housing through the
mirror setting, generated CIFAR-10 / IDX data for the fault paths, csv, and the download stage script."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from http_server import FaultServer

from tapework import catalogue, datasets, parsers
from tapework.catalogue import DATASETS, RemoteFile
from tapework.datasets import fetch_dataset, load_raw
from tapework.errors import DataError, DownloadError
from tapework.params import CsvParams, DownloadParams, IdxParams, IdxPinsParams, ParamsError, read_raw, with_overrides
from tapework.preprocess import RawDataset
from tests.conftest import make_params, shared_data, stage_command

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[1]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def params(dataset: str, **overrides: object) -> DownloadParams:
    fast = {"retries": 2, "backoff_seconds": 0.01, "timeout_seconds": 5.0}
    return dataclasses.replace(make_params().download, dataset=dataset, **{**fast, **overrides})


def csv_settings(**changes: str) -> CsvParams:
    """download.csv from the committed params.yaml with `changes`."""
    return dataclasses.replace(make_params().download.csv, **changes)


def tree(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def tiny_mnist(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Replace the mnist spec with tiny generated IDX files (4x4 images) pinned to their own hashes."""
    rng = np.random.default_rng(0)

    def idx(array: np.ndarray) -> bytes:
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)

    files = {
        "train-images-idx3-ubyte.gz": idx(rng.integers(0, 256, (6, 4, 4))),
        "train-labels-idx1-ubyte.gz": idx(np.array([0, 1, 2, 3, 4, 9])),
        "t10k-images-idx3-ubyte.gz": idx(rng.integers(0, 256, (3, 4, 4))),
        "t10k-labels-idx1-ubyte.gz": idx(np.array([5, 6, 7])),
    }
    remote = tuple(RemoteFile(name, f"https://example.invalid/mnist/{name}", sha(data), len(data)) for name, data in files.items())
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(DATASETS["mnist"], files=remote, image_shape=(4, 4, 1)))
    return files


# --- registry ---------------------------------------------------------------------------------


def test_catalogue_entries_are_complete() -> None:
    """Every data set has a known format with a fetch and a load function, and sound pins."""
    for name, spec in DATASETS.items():
        assert spec.name == name
        assert spec.format in catalogue.FORMATS and spec.format in datasets._FORMATS, name
        assert spec.task in (*catalogue.TASKS, None), name
        assert (spec.sklearn_loader is not None) == (spec.format == "sklearn") == bool(spec.bundled_files), name
        assert bool(spec.feature_names) == (spec.format == "sklearn" and spec.image_shape is None), name  # tabular bundled data names its columns
        assert (spec.target_name is not None) == (spec.task == "regression"), name
        assert len(spec.class_names) == (10 if spec.task == "classification" and spec.format != "idx_params" else 0), name  # idx_params: from download.idx
        for remote in spec.files:
            assert len(remote.sha256) == 64 and int(remote.sha256, 16) >= 0, remote
            assert isinstance(remote.size, int) and remote.size > 0, remote
            assert remote.url is None or remote.url.startswith("https://") and remote.url.endswith("/" + remote.name)


@pytest.mark.parametrize("name", [name for name, spec in DATASETS.items() if spec.format == "sklearn"])
def test_bundled_data_sets_are_read_bit_for_bit_as_their_scikit_learn_loader_returns_them(name, tmp_path) -> None:
    """The download stage reads scikit-learn's data files itself (no scikit-learn import); the arrays
    and feature names it writes are the loader's, and the file records the loader and its version."""
    import sklearn
    from sklearn import datasets as sk_datasets

    spec = DATASETS[name]
    bunch = getattr(sk_datasets, spec.sklearn_loader)(**dict(spec.sklearn_options))
    features, targets = datasets.bundled_arrays(spec)
    assert features.dtype == bunch.data.dtype and np.array_equal(features, bunch.data)
    assert np.array_equal(targets, bunch.target) and targets.astype(bunch.target.dtype).tobytes() == bunch.target.tobytes()
    manifest = fetch_dataset(make_params({"download.dataset": name}).download, tmp_path / "raw")
    written = np.load(tmp_path / "raw" / f"{name}.npz")
    if spec.image_shape is not None:
        assert np.array_equal(written["x"], bunch.images.astype(np.uint8)[..., np.newaxis]) and written["x"].dtype == np.uint8
    else:
        assert list(written["feature_names"]) == list(bunch.feature_names) == list(spec.feature_names)
        assert np.array_equal(written["x"], bunch.data)
    assert np.array_equal(written["y"], bunch.target)
    assert manifest["sources"][f"{name}.npz"] == {"url": f"sklearn.datasets.{spec.sklearn_loader}", "scikit-learn": sklearn.__version__}


@pytest.mark.parametrize(
    ("dataset", "folder"), [("mnist", "mnist"), ("fashion_mnist", "fashion-mnist"), ("california_housing", "california-housing")]
)
def test_pins_match_the_shared_reference_sums(dataset: str, folder: str) -> None:
    sums = dict(reversed(line.split()) for line in (shared_data(folder) / "SHA256SUMS").read_text().splitlines() if line)
    for remote in DATASETS[dataset].files:
        assert sums[remote.name] == remote.sha256, remote.name
        assert (shared_data(folder) / remote.name).stat().st_size == remote.size, remote.name


# --- bundled (offline) data sets --------------------------------------------------------------


def test_digits_is_offline_uint8_images_and_byte_identical_across_runs(tmp_path: Path) -> None:
    first = fetch_dataset(params("digits"), tmp_path / "a" / "raw")
    second = fetch_dataset(params("digits"), tmp_path / "b" / "raw")
    assert first == second and tree(tmp_path / "a" / "raw") == tree(tmp_path / "b" / "raw")
    assert sorted(tree(tmp_path / "a" / "raw")) == ["digits.npz", "manifest.json"]
    raw = load_raw(params("digits"), tmp_path / "a" / "raw")
    assert raw.x_train.shape == (1797, 8, 8, 1) and raw.x_train.dtype == np.uint8 and raw.x_train.max() == 16
    assert raw.y_train.dtype == np.int64 and set(raw.y_train) == set(range(10))
    assert raw.x_test is None and raw.y_test is None
    assert (raw.task, raw.image_shape, raw.class_names[3]) == ("classification", (8, 8, 1), "3")


def test_diabetes_is_offline_float_regression(tmp_path: Path) -> None:
    fetch_dataset(params("diabetes"), tmp_path / "raw")
    raw = load_raw(params("diabetes"), tmp_path / "raw")
    assert raw.x_train.shape == (442, 10) and raw.x_train.dtype == np.float64
    assert raw.y_train.dtype == np.float64 and raw.task == "regression" and raw.class_names == ()
    assert raw.feature_names[:4] == ("age", "sex", "bmi", "bp") and raw.image_shape is None


# --- real data through the mirror setting ------------------------------------------------------


def test_real_mnist_through_an_http_mirror_then_from_cache(tmp_path: Path) -> None:
    with FaultServer() as server:
        server.add_folder("/mirror/mnist", shared_data("mnist"))
        mirror = server.url + "/mirror/mnist/"
        manifest = fetch_dataset(params("mnist", mirror=mirror), tmp_path / "one" / "raw")
        assert server.requests() == 4
        fetch_dataset(params("mnist", mirror=mirror), tmp_path / "two" / "raw")
        assert server.requests() == 4  # every file came from the verified cache: no request at all
    assert tree(tmp_path / "one" / "raw") == tree(tmp_path / "two" / "raw")
    assert manifest["files"]["train-images-idx3-ubyte.gz"] == DATASETS["mnist"].files[0].sha256
    assert manifest["sources"]["train-images-idx3-ubyte.gz"]["url"].startswith("https://storage.googleapis.com/")
    raw = load_raw(params("mnist"), tmp_path / "one" / "raw")
    assert raw.x_train.shape == (60000, 28, 28, 1) and raw.x_test.shape == (10000, 28, 28, 1)
    assert raw.x_train.dtype == np.uint8 and raw.y_train.dtype == np.int64
    assert np.bincount(raw.y_train).tolist() == MNIST_TRAIN_COUNTS
    assert len(raw.y_test) == 10000 and raw.image_shape == (28, 28, 1)


def test_real_fashion_mnist_through_an_http_mirror(tmp_path: Path) -> None:
    with FaultServer() as server:
        server.add_folder("/fashion", shared_data("fashion-mnist"))
        fetch_dataset(params("fashion_mnist", mirror=server.url + "/fashion"), tmp_path / "raw")
    raw = load_raw(params("fashion_mnist"), tmp_path / "raw")
    assert raw.x_train.shape == (60000, 28, 28, 1) and raw.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(raw.y_train).tolist() == [6000] * 10
    assert np.bincount(raw.y_test).tolist() == [1000] * 10
    assert raw.class_names[0] == "T-shirt/top" and raw.class_names[9] == "Ankle boot"


@pytest.mark.parametrize("style", ["file_url", "folder"])
def test_real_california_housing_through_a_local_mirror(tmp_path: Path, style: str) -> None:
    folder = shared_data("california-housing")
    mirror = folder.as_uri() if style == "file_url" else str(folder)
    fetch_dataset(params("california_housing", mirror=mirror), tmp_path / "raw")
    raw = load_raw(params("california_housing"), tmp_path / "raw")
    assert raw.x_train.shape == (20640, 8) and raw.y_train.shape == (20640,) and raw.x_test is None
    assert raw.task == "regression" and raw.feature_names[0] == "longitude" and raw.image_shape is None


def test_california_housing_without_a_mirror_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="cal_housing.data has no canonical download URL.*download.mirror"):
        fetch_dataset(params("california_housing"), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


# --- mirror precedence, atomicity, verification ------------------------------------------------


def test_env_mirror_overrides_the_params_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_mnist) -> None:
    with FaultServer({f"/env/{name}": data for name, data in tiny_mnist.items()}) as server:
        monkeypatch.setenv("TAPEWORK_MIRROR", server.url + "/env")
        fetch_dataset(params("mnist", mirror=str(tmp_path / "no-such-folder")), tmp_path / "raw")
        assert server.requests() == 4
    raw = load_raw(params("mnist"), tmp_path / "raw")
    assert raw.x_train.shape == (6, 4, 4, 1) and raw.y_test.tolist() == [5, 6, 7]


def test_failed_fetch_leaves_previous_raw_dir_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_mnist) -> None:
    raw_dir = tmp_path / "data" / "raw"
    with FaultServer({f"/m/{name}": data for name, data in tiny_mnist.items()}) as server:
        fetch_dataset(params("mnist", mirror=server.url + "/m"), raw_dir)
        before = tree(raw_dir)
        monkeypatch.setenv("TAPEWORK_CACHE", str(tmp_path / "fresh-cache"))  # force real requests again
        server.program("/m/t10k-images-idx3-ubyte.gz", "corrupt")
        with pytest.raises(DownloadError, match="SHA-256 mismatch"):
            fetch_dataset(params("mnist", mirror=server.url + "/m"), raw_dir)
        assert tree(raw_dir) == before
        assert sorted(p.name for p in raw_dir.parent.iterdir()) == ["raw"]  # no staging folder left behind
        with pytest.raises(DownloadError, match="HTTP 404"):
            fetch_dataset(params("mnist", mirror=server.url + "/elsewhere"), tmp_path / "new" / "raw")
    assert not (tmp_path / "new" / "raw").exists()
    load_raw(params("mnist"), raw_dir)


def test_load_raw_verifies_the_manifest(tmp_path: Path) -> None:
    raw_dir = tmp_path / "raw"
    with pytest.raises(DataError, match="manifest.json: not found.*download stage"):
        load_raw(params("digits"), raw_dir)
    fetch_dataset(params("digits"), raw_dir)
    with pytest.raises(DataError, match="holds data set 'digits' but download.dataset is 'diabetes'"):
        load_raw(params("diabetes"), raw_dir)
    npz = raw_dir / "digits.npz"
    data = bytearray(npz.read_bytes())
    data[-100] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(DataError, match="digits.npz: SHA-256 .* differs from the manifest"):
        load_raw(params("digits"), raw_dir)


# --- CIFAR-10 (generated archive in the real binary layout) -------------------------------------


def cifar_archive(path: Path, per_batch: int = 2, extra: tuple[str, bytes] | None = None) -> tuple[Path, dict]:
    """A small cifar-10-binary.tar.gz with the real member layout; returns it and the HWC images per batch."""
    rng = np.random.default_rng(1)
    members: dict[str, bytes] = {"cifar-10-batches-bin/batches.meta.txt": "\n".join(catalogue.CIFAR10_CLASSES).encode()}
    images = {}
    for index, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        batch = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        labels = [(index + k) % 10 for k in range(per_batch)]
        images[name] = (batch, labels)
        members[f"cifar-10-batches-bin/{name}.bin"] = b"".join(
            bytes([label]) + image.transpose(2, 0, 1).tobytes() for label, image in zip(labels, batch)
        )
    if extra:
        members[extra[0]] = extra[1]
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo("cifar-10-batches-bin")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, images


def pin_cifar(monkeypatch: pytest.MonkeyPatch, archive: Path) -> None:
    (remote,) = DATASETS["cifar10"].files
    pinned = dataclasses.replace(remote, sha256=sha(archive.read_bytes()), size=archive.stat().st_size)
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(DATASETS["cifar10"], files=(pinned,)))


def test_cifar10_binary_archive_is_extracted_and_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, images = cifar_archive(tmp_path / "cifar-10-binary.tar.gz")
    pin_cifar(monkeypatch, archive)
    with FaultServer({"/kriz/cifar-10-binary.tar.gz": archive.read_bytes()}) as server:
        server.program("/kriz/cifar-10-binary.tar.gz", "truncate")
        manifest = fetch_dataset(params("cifar10", mirror=server.url + "/kriz"), tmp_path / "raw")
        assert server.requests() == 2
    assert "cifar-10-batches-bin/data_batch_5.bin" in manifest["files"]
    assert "cifar-10-binary.tar.gz" not in manifest["files"] and "cifar-10-binary.tar.gz" in manifest["sources"]
    raw = load_raw(params("cifar10"), tmp_path / "raw")
    assert raw.x_train.shape == (10, 32, 32, 3) and raw.x_test.shape == (2, 32, 32, 3)
    assert raw.x_train.dtype == np.uint8 and raw.y_train.dtype == np.int64
    np.testing.assert_array_equal(raw.x_train[:2], images["data_batch_1"][0])
    np.testing.assert_array_equal(raw.x_test, images["test_batch"][0])
    assert raw.y_train.tolist()[:4] == [0, 1, 1, 2] and raw.class_names[0] == "airplane"


def test_cifar10_archive_escaping_its_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, _ = cifar_archive(tmp_path / "cifar-10-binary.tar.gz", extra=("../../escaped.txt", b"pwned"))
    pin_cifar(monkeypatch, archive)
    with pytest.raises(DataError, match="refusing to extract member '../../escaped.txt'"):
        fetch_dataset(params("cifar10", mirror=str(tmp_path)), tmp_path / "data" / "raw")
    assert not (tmp_path / "data" / "raw").exists() and not (tmp_path.parent / "escaped.txt").exists()


# --- csv ----------------------------------------------------------------------------------------


def csv_params(path: str, **csv: str) -> DownloadParams:
    return params("csv", csv=csv_settings(path=path, **csv))


def pinned_csv(path: Path, **csv: str) -> DownloadParams:
    """download.csv naming a local file, pinned to its current SHA-256 (the pin is required)."""
    return csv_params(str(path), sha256=sha(path.read_bytes()), **csv)


def test_csv_local_classification_with_text_labels(tmp_path: Path) -> None:
    table = tmp_path / "iris.csv"
    table.write_text("a,b,species\n1,2,setosa\n3,4,virginica\n5,6,setosa\n")
    manifest = fetch_dataset(pinned_csv(table, target="species"), tmp_path / "raw")
    assert manifest["files"]["data.csv"] == sha(table.read_bytes())
    raw = load_raw(params("csv", csv=csv_settings(path=str(table), target="species")), tmp_path / "raw")
    assert raw.x_train.dtype == np.float64 and raw.x_train.shape == (3, 2) and raw.feature_names == ("a", "b")
    assert raw.y_train.tolist() == [0, 1, 0] and raw.y_train.dtype == np.int64
    assert raw.class_names == ("setosa", "virginica") and raw.task == "classification"


def test_csv_over_http_needs_and_checks_a_pin(tmp_path: Path) -> None:
    body = b"x1,x2,price\n1,2,3.5\n4,5,6.25\n"
    with FaultServer({"/t.csv": body}) as server:
        url = server.url + "/t.csv"
        with pytest.raises(ParamsError, match="download.csv.sha256"):
            fetch_dataset(csv_params(url, target="price", task="regression"), tmp_path / "raw")
        with pytest.raises(DownloadError, match="SHA-256 mismatch"):
            fetch_dataset(csv_params(url, target="price", sha256="0" * 64), tmp_path / "raw")
        good = csv_params(url, target="price", task="regression", sha256=sha(body))
        fetch_dataset(good, tmp_path / "raw")
        requests = server.requests()
        fetch_dataset(good, tmp_path / "raw")
        assert server.requests() == requests  # cached
    raw = load_raw(good, tmp_path / "raw")
    assert raw.task == "regression" and raw.y_train.tolist() == [3.5, 6.25] and raw.y_train.dtype == np.float64


def test_csv_classification_rejects_fractional_targets(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("a,y\n1,0.5\n2,1.0\n")
    fetch_dataset(csv_params(table.as_uri(), target="y", sha256=sha(table.read_bytes())), tmp_path / "raw")
    with pytest.raises(DataError, match="non-integer values; set download.csv.task: regression"):
        load_raw(params("csv", csv=csv_settings(path=str(table), target="y")), tmp_path / "raw")


# --- the stage script ---------------------------------------------------------------------------


def run_stage(workdir: Path, dataset: str) -> subprocess.CompletedProcess[str]:
    """The download stage's dvc.yaml command in `workdir`, with the committed params.yaml naming `dataset`."""
    (workdir / "params.yaml").write_text(yaml.safe_dump(with_overrides(read_raw(REPO / "params.yaml"), {"download.dataset": dataset})))
    env = {**os.environ, "TAPEWORK_CACHE": str(workdir / "cache"), "PYTHONPATH": str(REPO)}  # `-m stages.download` from elsewhere
    return subprocess.run(stage_command("download"), cwd=workdir, env=env, capture_output=True, text=True, timeout=60)


def test_download_stage_fetches_digits(tmp_path: Path) -> None:
    result = run_stage(tmp_path, "digits")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "data" / "raw").iterdir()) == ["digits.npz", "manifest.json"]
    assert "digits" in result.stderr


def test_download_stage_rejects_bad_params_before_any_work(tmp_path: Path) -> None:
    result = run_stage(tmp_path, "mnits")
    assert result.returncode == 2
    assert "download.dataset" in result.stderr and "mnist" in result.stderr
    assert not (tmp_path / "data").exists()


def test_catalogue_formats_and_loaders_agree() -> None:
    assert set(catalogue.FORMATS) == set(datasets._FORMATS)


def test_adding_a_data_set_is_one_catalogue_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new data set in a known format (here: MNIST's files under another name) needs nothing but its entry."""
    monkeypatch.setitem(catalogue.DATASETS, "mnist_again", dataclasses.replace(DATASETS["mnist"], name="mnist_again"))
    download = dataclasses.replace(params("mnist"), dataset="mnist_again", mirror=str(shared_data("mnist")))
    fetch_dataset(download, tmp_path / "raw")
    raw = load_raw(params("mnist_again"), tmp_path / "raw")
    assert raw.x_train.shape == (60000, 28, 28, 1) and raw.class_names == catalogue.DIGIT_CLASSES


# --- the manifest cannot switch a check off (issue 16, item B) -----------------------------------


def drop_from_manifest(raw_dir: Path, name: str) -> None:
    manifest = json.loads((raw_dir / "manifest.json").read_text())
    del manifest["files"][name]
    (raw_dir / "manifest.json").write_text(json.dumps(manifest))


def test_a_pinned_file_is_checked_against_the_catalogue_whatever_the_manifest_says(tmp_path: Path, tiny_mnist) -> None:
    raw_dir = tmp_path / "raw"
    fetch_dataset(params("mnist", mirror=str(_serve_folder(tmp_path, tiny_mnist))), raw_dir)
    labels = raw_dir / "train-labels-idx1-ubyte.gz"
    # A swapped, well-formed labels file (all zeros) whose manifest entry was deleted.
    labels.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 6]) + bytes(6), mtime=0))
    drop_from_manifest(raw_dir, labels.name)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: SHA-256 \w+ differs from its catalogue pin"):
        load_raw(params("mnist"), raw_dir)
    # Or the manifest entry rewritten to the swapped file's hash: the pin still decides.
    manifest = json.loads((raw_dir / "manifest.json").read_text())
    manifest["files"][labels.name] = sha(labels.read_bytes())
    (raw_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="differs from its catalogue pin"):
        load_raw(params("mnist"), raw_dir)


def test_a_gzip_bomb_behind_a_deleted_manifest_entry_is_never_inflated(tmp_path: Path, tiny_mnist, monkeypatch: pytest.MonkeyPatch) -> None:
    raw_dir = tmp_path / "raw"
    fetch_dataset(params("mnist", mirror=str(_serve_folder(tmp_path, tiny_mnist))), raw_dir)
    images = raw_dir / "train-images-idx3-ubyte.gz"
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = packer.compress(bytes([0, 0, 8, 3, 0, 0, 0, 6, 0, 0, 0, 4, 0, 0, 0, 4])) + packer.compress(bytes(64 << 20)) + packer.flush()
    images.write_bytes(bomb)  # 64 KB on disk, 64 MB inflated
    drop_from_manifest(raw_dir, images.name)
    inflated = []
    monkeypatch.setattr(parsers.zlib, "decompressobj", _counting_decompressobj(inflated))
    with pytest.raises(DataError, match="differs from its catalogue pin"):
        load_raw(params("mnist"), raw_dir)
    assert sum(inflated) == 0  # refused by its hash before anything was parsed


def test_files_the_manifest_does_not_list_are_refused(tmp_path: Path) -> None:
    raw_dir = tmp_path / "raw"
    fetch_dataset(params("digits"), raw_dir)
    (raw_dir / "extra.bin").write_bytes(b"unverified")
    with pytest.raises(DataError, match=r"extra\.bin: not listed in manifest\.json, so it cannot be verified"):
        load_raw(params("digits"), raw_dir)
    (raw_dir / "extra.bin").unlink()
    drop_from_manifest(raw_dir, "digits.npz")
    with pytest.raises(DataError, match=r"manifest\.json: does not list digits\.npz, which the sklearn loader reads"):
        load_raw(params("digits"), raw_dir)


def _serve_folder(tmp_path: Path, files: dict[str, bytes]) -> Path:
    folder = tmp_path / "mirror"
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _counting_decompressobj(inflated: list[int]):
    real = zlib.decompressobj

    class Counting:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def decompress(self, data, max_length=0):
            out = self.inner.decompress(data, max_length)
            inflated.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self.inner, name)

    return Counting


# --- local CSV files are pinned too (issue 16, item C) ---------------------------------------------


def test_local_csv_without_a_pin_is_refused_with_the_hash_to_paste(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("a,b,target\n1,2,0\n3,4,1\n")
    current = sha(table.read_bytes())
    for path in (str(table), table.as_uri()):
        with pytest.raises(ParamsError, match=rf"download\.csv\.sha256 is empty; pin the CSV: set `sha256: {current}` under download\.csv") as caught:
            fetch_dataset(csv_params(path), tmp_path / "raw")
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "raw").exists()
    fetch_dataset(csv_params(str(table), sha256=current), tmp_path / "raw")
    table.write_text("a,b,target\n1,2,1\n3,4,1\n")  # edited: the pin no longer matches
    edited = sha(table.read_bytes())
    with pytest.raises(DataError, match=rf"SHA-256 {edited} differs from download\.csv\.sha256 {current}: the file changed\. If the change is intended, set `sha256: {edited}`"):
        fetch_dataset(csv_params(str(table), sha256=current), tmp_path / "raw")
    assert load_raw(params("csv", csv=csv_settings(path=str(table), sha256=current)), tmp_path / "raw").y_train.tolist() == [0, 1]  # the pinned data stays
    (tmp_path / "raw" / "data.csv").write_text("a,b,target\n9,9,1\n9,9,0\n")  # swapped in data/raw, manifest entry gone
    drop_from_manifest(tmp_path / "raw", "data.csv")
    with pytest.raises(DataError, match=rf"data\.csv: SHA-256 \w+ differs from download\.csv\.sha256 {current}"):
        load_raw(params("csv", csv=csv_settings(path=str(table), sha256=current)), tmp_path / "raw")


def test_check_params_stage_never_opens_the_csv(tmp_path: Path) -> None:
    """download.csv.path names a FIFO: opening it would block, so the stage finishing proves it never read the CSV."""
    fifo = tmp_path / "table.csv"
    os.mkfifo(fifo)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_overrides(read_raw(REPO / "params.yaml"), {"download.dataset": "csv", "download.csv.path": str(fifo)})))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(stage_command("check_params"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "params.ok").is_file()


# --- the idx data set: IDX files of one's own, pinned in params (download.idx) --------------------

PIN_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def idx_file(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def write_idx_set(folder: Path, train_labels: list[int], test_labels: list[int]) -> Path:
    """The four canonical IDX files in `folder`: random 5x3 images (not square: the shape must come from the header)."""
    rng = np.random.default_rng(3)
    folder.mkdir()
    arrays = (rng.integers(0, 256, (len(train_labels), 5, 3)), np.array(train_labels), rng.integers(0, 256, (len(test_labels), 5, 3)), np.array(test_labels))
    for name, array in zip(catalogue.IDX_FILES, arrays, strict=True):
        (folder / name).write_bytes(idx_file(array))
    return folder


@pytest.fixture
def own_idx(tmp_path: Path) -> Path:
    """9 + 4 generated images, labels 0..3."""
    return write_idx_set(tmp_path / "own", [0, 1, 2, 3, 0, 1, 2, 3, 0], [3, 2, 1, 0])


def pins_of(folder: Path) -> dict[str, str]:
    return {key: sha((folder / name).read_bytes()) for key, name in zip(PIN_KEYS, catalogue.IDX_FILES, strict=True)}


def idx_params(path: str, pins: dict[str, str] | None = None, class_names: tuple[str, ...] = ()) -> DownloadParams:
    pins = pins or dict.fromkeys(PIN_KEYS, "")
    return params("idx", idx=IdxParams(path, IdxPinsParams(**pins), class_names))


def same_raw(first: RawDataset, second: RawDataset) -> None:
    for name in ("x_train", "y_train", "x_test", "y_test"):
        a, b = getattr(first, name), getattr(second, name)
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), name
    for name in ("task", "class_names", "feature_names", "image_shape"):
        assert getattr(first, name) == getattr(second, name), name


def test_idx_kind_from_a_local_folder_loads_and_streams_the_same_arrays(tmp_path: Path, own_idx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for path in (str(own_idx), own_idx.as_uri()):
        manifest = fetch_dataset(idx_params(path, pins_of(own_idx)), tmp_path / "raw")
        assert manifest["dataset"] == "idx" and sorted(manifest["files"]) == sorted(catalogue.IDX_FILES)
    assert tree(tmp_path / "raw") == {**tree(own_idx), "manifest.json": (tmp_path / "raw" / "manifest.json").read_bytes()}
    download = idx_params(str(own_idx), pins_of(own_idx))
    raw = load_raw(download, tmp_path / "raw")
    assert raw.x_train.shape == (9, 5, 3, 1) and raw.x_test.shape == (4, 5, 3, 1) and raw.image_shape == (5, 3, 1)
    assert raw.x_train.dtype == np.uint8 and raw.y_train.dtype == np.int64 and raw.y_test.tolist() == [3, 2, 1, 0]
    assert raw.task == "classification" and raw.class_names == ("0", "1", "2", "3")  # [] = "0".."K-1"
    np.testing.assert_array_equal(raw.x_train[..., 0], parsers.parse_idx(own_idx / catalogue.IDX_FILES[0]))
    monkeypatch.setattr(datasets, "IDX_CHUNK_BYTES", 2 * 15)  # two 5x3 images per chunk: 9 rows in 5 chunks
    source = datasets.stream_raw(download, tmp_path / "raw")
    assert [len(chunk) for chunk in source.train_inputs()] == [2, 2, 2, 2, 1]
    assert source.input_shape == (5, 3, 1) and source.input_dtype == np.uint8
    same_raw(source.materialize(), raw)
    named = idx_params(str(own_idx), pins_of(own_idx), ("cat", "dog", "bird", "fish"))
    assert load_raw(named, tmp_path / "raw").class_names == datasets.stream_raw(named, tmp_path / "raw").class_names == ("cat", "dog", "bird", "fish")


def test_idx_kind_over_http_through_the_verified_cache(tmp_path: Path, own_idx: Path) -> None:
    with FaultServer() as server:
        server.add_folder("/own", own_idx)
        server.program("/own/" + catalogue.IDX_FILES[0], "500")  # retried
        download = idx_params(server.url + "/own/", pins_of(own_idx))
        manifest = fetch_dataset(download, tmp_path / "one" / "raw")
        assert server.requests() == 5
        fetch_dataset(download, tmp_path / "two" / "raw")
        assert server.requests() == 5  # every file from the verified cache
        assert manifest["sources"][catalogue.IDX_FILES[3]]["url"] == server.url + "/own/" + catalogue.IDX_FILES[3]
        with pytest.raises(ParamsError, match=r"download\.idx\.sha256 is not set for every file but download\.idx\.path = 'http://.*' is an http\(s\) URL"):
            fetch_dataset(idx_params(server.url + "/own"), tmp_path / "three" / "raw")
        wrong = {**pins_of(own_idx), "test_labels": "0" * 64}
        with pytest.raises(DownloadError, match="SHA-256 mismatch"):
            fetch_dataset(idx_params(server.url + "/own", wrong), tmp_path / "three" / "raw")
    assert not (tmp_path / "three" / "raw").exists()
    same_raw(load_raw(download, tmp_path / "one" / "raw"), load_raw(download, tmp_path / "two" / "raw"))
    same_raw(load_raw(download, tmp_path / "one" / "raw"), datasets.stream_raw(download, tmp_path / "one" / "raw").materialize())


def test_idx_kind_without_pins_prints_the_hashes_to_paste(tmp_path: Path, own_idx: Path) -> None:
    pins = pins_of(own_idx)
    with pytest.raises(ParamsError, match="download.idx.sha256 is not set for every file; pin the files") as caught:
        fetch_dataset(idx_params(str(own_idx), {**pins, "train_labels": ""}), tmp_path / "raw")
    assert all(f"`{key}: {pin}`" in str(caught.value) for key, pin in pins.items()) and "\n" not in str(caught.value)
    with pytest.raises(ParamsError, match="download.idx.path is empty"):
        fetch_dataset(idx_params(""), tmp_path / "raw")
    with pytest.raises(DataError, match=r"has no train-images-idx3-ubyte\.gz\. Fix download\.idx\.path"):
        fetch_dataset(idx_params(str(tmp_path)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_idx_kind_refuses_a_changed_file_naming_its_pin(tmp_path: Path, own_idx: Path) -> None:
    pins = pins_of(own_idx)
    fetch_dataset(idx_params(str(own_idx), pins), tmp_path / "raw")
    (own_idx / catalogue.IDX_FILES[2]).write_bytes(idx_file(np.zeros((4, 5, 3))))
    edited = sha((own_idx / catalogue.IDX_FILES[2]).read_bytes())
    with pytest.raises(DataError, match=rf"SHA-256 {edited} differs from download\.idx\.sha256\.test_images {pins['test_images']}: the file changed\. If the change is intended, set `test_images: {edited}`"):
        fetch_dataset(idx_params(str(own_idx), pins), tmp_path / "raw")
    assert load_raw(idx_params(str(own_idx), pins), tmp_path / "raw").x_test.any()  # the pinned data stays


@pytest.mark.parametrize("edit", ["dropped", "rewritten"])
def test_idx_kind_manifest_edit_cannot_bypass_the_params_pins(tmp_path: Path, own_idx: Path, edit: str) -> None:
    raw_dir, download = tmp_path / "raw", idx_params(str(own_idx), pins_of(own_idx))
    fetch_dataset(download, raw_dir)
    labels = raw_dir / catalogue.IDX_FILES[1]
    labels.write_bytes(idx_file(np.zeros(9)))  # a swapped, well-formed labels file
    if edit == "dropped":
        drop_from_manifest(raw_dir, labels.name)
    else:
        manifest = json.loads((raw_dir / "manifest.json").read_text())
        manifest["files"][labels.name] = sha(labels.read_bytes())
        (raw_dir / "manifest.json").write_text(json.dumps(manifest))
    for read in (load_raw, datasets.stream_raw):
        with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: SHA-256 \w+ differs from download\.idx\.sha256\.train_labels"):
            read(download, raw_dir)
        with pytest.raises(ParamsError, match=r"download\.idx\.sha256\.train_labels is empty"):
            read(idx_params(str(own_idx), {**pins_of(own_idx), "train_labels": ""}), raw_dir)


def test_idx_kind_checks_labels_against_class_names_and_counts(tmp_path: Path, own_idx: Path) -> None:
    def fetched(name: str) -> DownloadParams:
        download = idx_params(str(own_idx), pins_of(own_idx))
        fetch_dataset(download, tmp_path / name)
        return download

    download = fetched("a")
    few = dataclasses.replace(download, idx=dataclasses.replace(download.idx, class_names=("a", "b", "c")))
    for read in (load_raw, datasets.stream_raw):
        with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: label 3 outside 0\.\.2\. download\.idx\.class_names names 3 classes"):
            read(few, tmp_path / "a")
    (own_idx / catalogue.IDX_FILES[3]).write_bytes(idx_file(np.array([3, 2, 1])))  # 4 test images, 3 labels
    for read in (load_raw, datasets.stream_raw):
        with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz / t10k-labels-idx1-ubyte\.gz: 4 images but 3 labels"):
            read(fetched("b"), tmp_path / "b")
    (own_idx / catalogue.IDX_FILES[3]).write_bytes(idx_file(np.zeros(4)))
    (own_idx / catalogue.IDX_FILES[1]).write_bytes(idx_file(np.zeros(9)))
    with pytest.raises(DataError, match="every label is 0; classification needs at least two classes"):
        load_raw(fetched("c"), tmp_path / "c")
    (own_idx / catalogue.IDX_FILES[2]).write_bytes(idx_file(np.zeros((4, 3, 5))))  # test images of another shape
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: shape \(4, 3, 5\), expected \(N, 5, 3\) images"):
        datasets.stream_raw(fetched("d"), tmp_path / "d")


def test_idx_kind_params_are_validated() -> None:
    loaded = make_params({"download.dataset": "idx", "download.idx.path": "/data/own", "download.idx.class_names": ["a", "b"], "train.model": "cnn"})
    assert loaded.download.idx.class_names == ("a", "b") and loaded.task() == "classification"  # an image data set: cnn serves it
    for changes, key in [
        ({"download.dataset": "idx"}, "download.idx.path"),
        ({"download.idx.class_names": ["a"]}, "download.idx.class_names"),
        ({"download.idx.class_names": ["a", "a"]}, "download.idx.class_names"),
        ({"download.idx.class_names": "ab"}, "download.idx.class_names"),
        ({"download.idx.class_names": ["a", ""]}, "download.idx.class_names"),
        ({"download.idx.sha256.test_labels": "abc"}, "download.idx.sha256.test_labels"),
    ]:
        with pytest.raises(ParamsError, match=re.escape(key)):
            make_params(changes)


def test_idx_kind_on_real_mnist_equals_the_catalogue_entry(tmp_path: Path) -> None:
    """Real MNIST pointed at as the idx data set: the same arrays as the pinned `mnist` entry, loaded whole and streamed."""
    folder = shared_data("mnist")
    download = idx_params(str(folder), pins_of(folder), catalogue.DIGIT_CLASSES)
    fetch_dataset(download, tmp_path / "own")
    fetch_dataset(params("mnist", mirror=str(folder)), tmp_path / "mnist")
    raw = load_raw(download, tmp_path / "own")
    same_raw(raw, load_raw(params("mnist"), tmp_path / "mnist"))
    same_raw(raw, datasets.stream_raw(download, tmp_path / "own").materialize())
    source = datasets.stream_raw(params("mnist"), tmp_path / "mnist")
    assert max(len(chunk) for chunk in source.train_inputs()) == (8 << 20) // 784  # about 8 MiB of pixels per chunk
    same_raw(raw, source.materialize())


def test_stream_raw_of_other_formats_is_the_loaded_arrays_as_one_chunk(tmp_path: Path) -> None:
    fetch_dataset(params("digits"), tmp_path / "raw")
    source = datasets.stream_raw(params("digits"), tmp_path / "raw")
    assert [len(chunk) for chunk in source.train_inputs()] == [1797] and source.test_inputs is None
    same_raw(source.materialize(), load_raw(params("digits"), tmp_path / "raw"))
    (tmp_path / "raw" / "extra.bin").write_bytes(b"unverified")  # the same manifest check first
    with pytest.raises(DataError, match="not listed in manifest.json"):
        datasets.stream_raw(params("digits"), tmp_path / "raw")


def test_idx_kind_through_the_download_and_preprocess_stages(tmp_path: Path) -> None:
    """The stage commands of dvc.yaml with download.dataset: idx: the prepared data keeps the header's shape and the given names."""
    folder = write_idx_set(tmp_path / "own", [0, 1, 2] * 20, [2, 1, 0] * 4)
    changes = {"download.dataset": "idx", "download.idx.path": str(folder), "download.idx.class_names": ["red", "green", "blue"]}
    changes.update({f"download.idx.sha256.{key}": pin for key, pin in pins_of(folder).items()})
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(with_overrides(read_raw(REPO / "params.yaml"), changes)))
    env = {**os.environ, "TAPEWORK_CACHE": str(work / "cache"), "PYTHONPATH": str(REPO)}
    for stage in ("download", "preprocess"):
        result = subprocess.run(stage_command(stage), cwd=work, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    meta = json.loads((work / "data" / "prepared" / "meta.json").read_text())
    assert meta["input_shape"] == [5, 3, 1] and meta["class_names"] == ["red", "green", "blue"]
    assert meta["counts"]["test"] == 12 and meta["counts"]["train"] + meta["counts"]["val"] == 60
