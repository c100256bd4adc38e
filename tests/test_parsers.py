"""The pure parsers accept the real formats and reject garbage with a DataError naming file, problem and fix."""

from __future__ import annotations

import gzip
import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from tapework import parsers
from tapework.errors import DataError
from tapework.parsers import (
    CALIFORNIA_COLUMNS,
    check_counts,
    iter_idx,
    parse_california_housing,
    parse_cifar10_binary,
    parse_csv,
    parse_idx,
)
from tests.conftest import shared_data

pytestmark = pytest.mark.timeout(30)


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format (magic 0x0000 08 <ndim>, big-endian dims, payload)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def cifar_records(labels: list[int], seed: int = 0) -> tuple[bytes, np.ndarray]:
    """CIFAR-10 binary records for `labels` and the HWC images they encode."""
    images = np.random.default_rng(seed).integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    records = [bytes([label]) + image.transpose(2, 0, 1).tobytes() for label, image in zip(labels, images)]
    return b"".join(records), images


# --- IDX --------------------------------------------------------------------------------------


def test_parse_idx_reads_raw_and_gzip_images_and_labels(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 1], dtype=np.uint8)
    np.testing.assert_array_equal(parse_idx(idx_bytes(images)), images)
    np.testing.assert_array_equal(parse_idx(gzip.compress(idx_bytes(labels))), labels)
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(idx_bytes(labels)))
    parsed = parse_idx(path)
    assert parsed.dtype == np.uint8 and parsed.flags.writeable
    np.testing.assert_array_equal(parsed, labels)


def test_parse_idx_rejects_wrong_magic_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x02" + b"\x00" * 20))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: bad IDX magic number 0x00000802"):
        parse_idx(path)
    with pytest.raises(DataError, match="bad IDX magic"):
        parse_idx(b"<html>404 Not Found</html>")


def test_parse_idx_rejects_truncated_payload_and_header(tmp_path: Path) -> None:
    data = idx_bytes(np.zeros((5, 4, 4), np.uint8))
    path = tmp_path / "images.idx"
    path.write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"images\.idx: truncated: dimensions \(5, 4, 4\) need 80 bytes but 70 follow"):
        parse_idx(path)
    with pytest.raises(DataError, match="truncated IDX header"):
        parse_idx(data[:10])
    with pytest.raises(DataError, match="too short"):
        parse_idx(b"\x00\x00")


def test_parse_idx_rejects_trailing_bytes_and_empty_dims() -> None:
    with pytest.raises(DataError, match="3 unexpected trailing bytes"):
        parse_idx(idx_bytes(np.zeros(4, np.uint8)) + b"abc")
    with pytest.raises(DataError, match="hold no data"):
        parse_idx(struct.pack(">HBBI", 0, 8, 1, 0))


def test_parse_idx_rejects_a_corrupt_gzip_stream() -> None:
    good = gzip.compress(idx_bytes(np.zeros(100, np.uint8)))
    with pytest.raises(DataError, match="corrupt gzip stream"):
        parse_idx(good[: len(good) // 2])


def test_check_counts() -> None:
    check_counts(np.zeros((3, 2, 2)), np.zeros(3))
    with pytest.raises(DataError, match="3 images but 2 labels"):
        check_counts(np.zeros((3, 2, 2)), np.zeros(2), name="mnist train")


# --- CIFAR-10 binary --------------------------------------------------------------------------


def test_parse_cifar10_binary_turns_chw_records_into_hwc_images() -> None:
    data, expected = cifar_records([3, 0, 9])
    images, labels = parse_cifar10_binary(data)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8 and images.flags.c_contiguous
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(labels, [3, 0, 9])
    assert labels.dtype == np.int64
    # The first 1024 pixel bytes of a record are the red plane, row by row.
    assert images[0, 0, 1, 0] == data[1 + 1] and images[0, 0, 0, 1] == data[1 + 1024]


def test_parse_cifar10_binary_rejects_partial_records_and_bad_labels(tmp_path: Path) -> None:
    data, _ = cifar_records([1, 2])
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(data[:-1])
    with pytest.raises(DataError, match=r"data_batch_1\.bin: 6145 bytes is not a whole.*3073-byte"):
        parse_cifar10_binary(path)
    with pytest.raises(DataError, match="not a whole, non-zero number"):
        parse_cifar10_binary(b"")
    bad, _ = cifar_records([4, 10])
    with pytest.raises(DataError, match="record 1 has label 10, expected 0..9"):
        parse_cifar10_binary(bad)


# --- CSV --------------------------------------------------------------------------------------


def test_parse_csv_returns_float_features_target_and_names(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("a,b,label\n1,2.5,cat\n3,4,dog\n")
    x, y, names = parse_csv(path, "label")
    assert x.dtype == np.float64 and x.shape == (2, 2) and names == ("a", "b")
    assert list(y) == ["cat", "dog"] and y.dtype.kind == "U"
    x, y, names = parse_csv(io.StringIO("f,t\n1,0.5\n2,1.5\n"), "t")
    assert y.dtype == np.float64 and names == ("f",)


def test_parse_csv_missing_target_lists_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("x1,x2,y\n1,2,3\n")
    with pytest.raises(DataError, match=r"t\.csv: no target column 'price'; columns are: x1, x2, y\. Set download\.csv\.target"):
        parse_csv(path, "price")


def test_parse_csv_names_non_numeric_feature_columns(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("city,size,colour,y\nParis,1,red,0\nRome,2,blue,1\n")
    with pytest.raises(DataError, match="non-numeric column.*: city, colour"):
        parse_csv(path, "y")


@pytest.mark.parametrize("bad_value", ["", "nan", "inf"])
def test_parse_csv_names_the_column_with_missing_values(tmp_path: Path, bad_value: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(f"a,b,y\n1,2,0\n3,{bad_value},1\n")
    with pytest.raises(DataError, match=r"column 'b' has 1 missing or non-finite value\(s\) \(first at data row 2\)"):
        parse_csv(path, "y")


def test_parse_csv_rejects_empty_and_header_only_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: empty file"):
        parse_csv(empty, "y")
    header_only = tmp_path / "header.csv"
    header_only.write_text("a,y\n")
    with pytest.raises(DataError, match="no data rows"):
        parse_csv(header_only, "y")


def test_parse_csv_rejects_a_target_only_file(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("y\n1\n2\n")
    with pytest.raises(DataError, match="add feature columns"):
        parse_csv(path, "y")


# --- California housing -----------------------------------------------------------------------


def test_parse_california_housing_small_file(tmp_path: Path) -> None:
    path = tmp_path / "cal_housing.data"
    path.write_text(
        "-122.230000,37.880000,41.000000,880.000000,129.000000,322.000000,126.000000,8.325200,452600.000000\n"
        "-122.220000,37.860000,21.000000,7099.000000,1106.000000,2401.000000,1138.000000,8.301400,358500.000000\n"
    )
    x, y, names = parse_california_housing(path)
    assert x.shape == (2, 8) and x.dtype == np.float64 and names == CALIFORNIA_COLUMNS[:-1]
    np.testing.assert_array_equal(y, [452600.0, 358500.0])


def test_parse_california_housing_rejects_wrong_columns_and_text(tmp_path: Path) -> None:
    path = tmp_path / "cal_housing.data"
    path.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(DataError, match=r"cal_housing\.data: 3 columns, expected 9"):
        parse_california_housing(path)
    path.write_text("1,2,3,4,5,6,7,8,9\n1,2,3,4,5,6,7,8,9,10\n")
    with pytest.raises(DataError, match="not a well-formed CSV"):
        parse_california_housing(path)
    path.write_text("1,2,3,4,5,6,7,8,9\n1,2,3,4,x,6,7,8,9\n")
    with pytest.raises(DataError, match="non-numeric column.*total_bedrooms"):
        parse_california_housing(path)


def test_parse_california_housing_real_file() -> None:
    path = shared_data("california-housing") / "cal_housing.data"
    x, y, names = parse_california_housing(path)
    assert x.shape == (20640, 8) and y.shape == (20640,)
    assert names[-1] == "median_income" and y.min() > 0


# --- issue 16: decompression bounds and column names ---------------------------------------------


def gzip_bomb(header: bytes, zeros: int) -> bytes:
    """A gzip stream of `header` then `zeros` zero bytes, compressed chunk by chunk (~1000:1)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1 << 20)
    parts = [packer.compress(header)]
    for start in range(0, zeros, len(chunk)):
        parts.append(packer.compress(chunk[: zeros - start]))
    return b"".join(parts) + packer.flush()


def test_parse_idx_never_inflates_past_what_the_header_describes() -> None:
    """A 0.2 MB file inflating to 256 MB behind a 60,000-label header: refused after 60,009 inflated bytes."""
    bomb = gzip_bomb(struct.pack(">HBBI", 0, 8, 1, 60_000), 256 << 20)
    assert len(bomb) < 300_000
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"holds more than the 60,008 bytes its IDX header describes; stopped inflating"):
            parse_idx(bomb, name="train-labels-idx1-ubyte.gz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes allocated while refusing the bomb"


def test_parse_idx_refuses_a_header_claiming_more_than_the_inflate_limit() -> None:
    header = struct.pack(">HBBIII", 0, 8, 3, 1_000_000, 1000, 1000)  # a terabyte of images
    with pytest.raises(DataError, match=r"its IDX header claims 1,000,000,000,016 bytes of data, more than the 2,147,483,648"):
        parse_idx(gzip.compress(header + bytes(10)))


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (lambda good: good + b"xx", "2 bytes follow the gzip stream's end"),
        (lambda good: good[:-4] + b"\0\0\0\0", "corrupt gzip stream"),  # wrong length in the trailer
        (lambda good: good[:-1], "corrupt gzip stream"),
    ],
)
def test_parse_idx_checks_the_whole_gzip_container(data, problem) -> None:
    good = gzip.compress(idx_bytes(np.zeros(100, np.uint8)))
    with pytest.raises(DataError, match=problem):
        parse_idx(data(good))


# --- iter_idx: the same file read in chunks of rows ----------------------------------------------


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def streamed(path: Path, rows: int) -> list[np.ndarray]:
    return list(iter_idx(path, rows))


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("read_bytes", [1 << 20, 7], ids=["1MiB-reads", "7-byte-reads"])
def test_iter_idx_equals_parse_idx_in_chunks_across_boundaries(tmp_path, monkeypatch, compress, read_bytes) -> None:
    """Chunks of 1, 3, 7 and 50 rows of 7 images (3x5): the header's dims first, then the rows in file order."""
    monkeypatch.setattr(parsers, "IDX_READ_BYTES", read_bytes)  # 7: every file read splits a header, row and gzip block
    images = np.random.default_rng(1).integers(0, 256, (7, 3, 5), dtype=np.uint8)
    encoded = idx_bytes(images)
    path = write(tmp_path / "images", gzip.compress(encoded) if compress else encoded)
    whole = parse_idx(path)
    np.testing.assert_array_equal(whole, images)
    for rows in (1, 3, 7, 50):
        stream = iter_idx(path, rows)
        assert stream.dims == (7, 3, 5)
        chunks = list(stream)
        assert [len(chunk) for chunk in chunks] == [min(rows, 7 - start) for start in range(0, 7, rows)]
        assert all(chunk.dtype == np.uint8 and chunk.shape[1:] == (3, 5) for chunk in chunks)
        np.testing.assert_array_equal(np.concatenate(chunks), whole)
        np.testing.assert_array_equal(np.concatenate(list(stream)), whole)  # each pass reads the file afresh
    labels = write(tmp_path / "labels", gzip.compress(idx_bytes(images[:, 0, 0])) if compress else idx_bytes(images[:, 0, 0]))
    np.testing.assert_array_equal(np.concatenate(streamed(labels, 4)), images[:, 0, 0])


def test_iter_idx_reads_the_header_only_until_iterated(tmp_path) -> None:
    """The dims come from the header; a corrupt body is found by the iterator, not before."""
    good = gzip.compress(idx_bytes(np.zeros((40, 4, 4), np.uint8)), mtime=0)
    path = write(tmp_path / "images.gz", good[:-12] + bytes(12))  # the last deflate bytes and the trailer damaged
    stream = iter_idx(path, 8)
    assert stream.dims == (40, 4, 4)
    with pytest.raises(DataError, match=r"images\.gz: corrupt gzip stream"):
        list(stream)


def test_iter_idx_raises_a_late_problem_before_the_last_chunk(tmp_path) -> None:
    """A CRC mismatch is only seen at the end: the iterator raises it instead of yielding the last chunk,
    so a reader that stops after the last row still sees it."""
    good = bytearray(gzip.compress(idx_bytes(np.arange(30, dtype=np.uint8).reshape(10, 1, 3)), mtime=0))
    good[-8] ^= 0xFF  # the CRC-32 in the trailer
    stream = iter_idx(write(tmp_path / "labels.gz", bytes(good)), 4)
    chunks = iter(stream)
    assert len(next(chunks)) == 4 and len(next(chunks)) == 4
    with pytest.raises(DataError, match=r"labels\.gz: corrupt gzip stream \(.*incorrect data check"):
        next(chunks)


@pytest.mark.parametrize(
    ("data", "problem", "found"),
    [
        (gzip.compress(b"\x00\x00\x08\x02" + bytes(20)), "bad IDX magic number 0x00000802", "header"),
        (b"<html>404 Not Found</html>", "bad IDX magic", "header"),
        (b"\x00\x00", "2 bytes is too short for an IDX header", "header"),
        (idx_bytes(np.zeros((5, 4, 4), np.uint8))[:10], r"truncated IDX header \(10 of 16 bytes\)", "header"),
        (struct.pack(">HBBI", 0, 8, 1, 0), r"IDX dimensions \(0,\) hold no data", "header"),
        (idx_bytes(np.zeros((5, 4, 4), np.uint8))[:-10], r"truncated: dimensions \(5, 4, 4\) need 80 bytes but 70 follow", "header"),
        (idx_bytes(np.zeros(4, np.uint8)) + b"abc", "3 unexpected trailing bytes", "header"),  # a raw file's length is known at once
        (gzip.compress(struct.pack(">HBBIII", 0, 8, 3, 1_000_000, 1000, 1000) + bytes(10)), "its IDX header claims 1,000,000,000,016 bytes", "header"),
        (gzip.compress(idx_bytes(np.zeros((5, 4, 4), np.uint8))[:-10]), r"truncated: dimensions \(5, 4, 4\) need 80 bytes but 70 follow", "data"),
        (gzip.compress(idx_bytes(np.zeros(100, np.uint8))) + b"xx", "2 bytes follow the gzip stream's end", "data"),
        (gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:-1], r"corrupt gzip stream \(it ends before its end marker\)", "data"),
        (gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:-4] + bytes(4), "corrupt gzip stream", "data"),  # wrong length in the trailer
        (gzip.compress(idx_bytes(np.zeros(100, np.uint8)) + b"extra"), "the gzip stream holds more than the 108 bytes its IDX header describes", "data"),
    ],
    ids=[
        "gzip-bad-magic", "html", "too-short", "truncated-header", "no-data", "raw-truncated", "raw-trailing", "claims-a-terabyte",
        "gzip-truncated", "after-gzip-end", "no-end-marker", "bad-trailer-length", "gzip-excess",
    ],  # fixed ids: gzip bytes carry the time, and pytest-xdist workers must collect the same names
)
def test_iter_idx_refuses_what_parse_idx_refuses(tmp_path, data, problem, found) -> None:
    """Each refusal names the file and the fix, from iter_idx (a header problem, a raw file's length)
    or from the iterator (what only reading a gzip stream shows); parse_idx says the same."""
    path = write(tmp_path / "train-images-idx3-ubyte.gz", data)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: " + problem) as caught:
        stream = iter_idx(path, 3)
        assert found == "data", "iter_idx should have refused the header"
        list(stream)
    assert "check the data set and mirror" in str(caught.value) or "rerun the download stage" in str(caught.value)
    with pytest.raises(DataError, match=problem):
        parse_idx(path)


def test_iter_idx_refuses_an_unreadable_file(tmp_path) -> None:
    with pytest.raises(DataError, match=r"missing\.gz: cannot read it \(No such file or directory\)"):
        iter_idx(tmp_path / "missing.gz", 10)


def test_iter_idx_memory_is_one_chunk_not_the_file(tmp_path) -> None:
    """16 MB of images (2 MB gzip-compressed) read in 64 KB chunks: the peak stays near one read
    buffer and one chunk, far below the file."""
    rows = 20_000
    images = np.broadcast_to(np.arange(28, dtype=np.uint8), (rows, 28, 28))
    path = write(tmp_path / "big.gz", gzip.compress(idx_bytes(np.ascontiguousarray(images)), compresslevel=1))
    total = 0
    tracemalloc.start()
    try:
        for chunk in iter_idx(path, 83):  # 83 rows: 65,072 bytes
            assert chunk[-1, 0, 27] == 27
            total += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == rows
    assert peak < 4 << 20, f"{peak} bytes allocated while streaming {rows * 784} bytes"


def test_iter_idx_stops_inflating_a_gzip_bomb_where_the_header_ends(tmp_path) -> None:
    """A 60,000-label header followed by 32 MB of zeros: the iterator refuses it after 60,009 inflated bytes."""
    path = write(tmp_path / "train-labels-idx1-ubyte.gz", gzip_bomb(struct.pack(">HBBI", 0, 8, 1, 60_000), 32 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"holds more than the 60,008 bytes its IDX header describes; stopped inflating"):
            list(iter_idx(path, 1000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak} bytes allocated while refusing the bomb"


def test_check_counts_takes_header_counts() -> None:
    check_counts(3, np.zeros(3))
    with pytest.raises(DataError, match="4 images but 3 labels"):
        check_counts(4, np.zeros(3))


@pytest.mark.parametrize(
    ("text", "repeated"),
    [
        ("y,a,b,y\n1,2,3,1\n0,1,1,0\n", "'y' at columns 1, 4"),  # the target twice: its copy would be a feature
        ("a,b,a,y\n1,2,3,1\n0,1,1,0\n", "'a' at columns 1, 3"),
        ('"a",b,a,y\n1,2,3,1\n0,1,1,0\n', "'a' at columns 1, 3"),  # quoting does not make a name different
    ],
)
def test_parse_csv_refuses_repeated_column_names(tmp_path: Path, text: str, repeated: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(text)
    for source in (path, io.StringIO(text)):
        with pytest.raises(DataError, match=rf"repeated column name\(s\): {repeated}\. Rename or drop the copies"):
            parse_csv(source, "y")
    _, _, names = parse_csv(io.StringIO("a,a.1,y\n1,2,3\n"), "y")  # distinct names that merely look like pandas' renames
    assert names == ("a", "a.1")
