"""Pure parsers for the raw formats; garbage raises DataError naming the file, the problem and the fix."""

from __future__ import annotations

import collections
import csv
import io
import math
import struct
import zlib
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from tapework.errors import DataError

IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
# Most bytes an IDX file may inflate to: 40x Fashion-MNIST's train images (47 MB), far below a gzip bomb's gigabytes.
MAX_IDX_BYTES = 2**31
CIFAR_IMAGE_SHAPE = (3, 32, 32)  # stored channel-major: all red, then green, then blue
CIFAR_RECORD_BYTES = 1 + math.prod(CIFAR_IMAGE_SHAPE)
CIFAR_NUM_CLASSES = 10
CALIFORNIA_COLUMNS = (
    "longitude",
    "latitude",
    "housing_median_age",
    "total_rooms",
    "total_bedrooms",
    "population",
    "households",
    "median_income",
    "median_house_value",
)
CALIFORNIA_TARGET = "median_house_value"
REFETCH = "Delete the file and rerun the download stage (`dvc repro download`)."

Source = bytes | bytearray | memoryview | str | Path


def _read(source: Source, name: str | None) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), name or "<bytes>"
    path = Path(source)
    try:
        return path.read_bytes(), name or str(path)
    except OSError as error:
        raise DataError(f"{path}: cannot read it ({error.strerror}). Rerun the download stage.") from error


def parse_idx(source: Source, *, name: str | None = None) -> np.ndarray:
    """An IDX file (gzip or raw, bytes or path) -> uint8 array: labels (N,) or images (N, H, W)."""
    data, where = _read(source, name)
    if data[:2] == b"\x1f\x8b":  # gzip magic
        data = _inflate_idx(data, where)
    if len(data) < 4:
        raise DataError(f"{where}: {len(data)} bytes is too short for an IDX header. {REFETCH}")
    magic = int.from_bytes(data[:4], "big")
    if magic not in (IDX_LABELS_MAGIC, IDX_IMAGES_MAGIC):
        raise DataError(
            f"{where}: bad IDX magic number 0x{magic:08x}; expected 0x{IDX_LABELS_MAGIC:08x} (labels) or "
            f"0x{IDX_IMAGES_MAGIC:08x} (images). This is not an MNIST-style IDX file: check the data set and mirror."
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{where}: truncated IDX header ({len(data)} of {header} bytes). {REFETCH}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if 0 in dims:
        raise DataError(f"{where}: IDX dimensions {dims} hold no data. {REFETCH}")
    expected, payload = math.prod(dims), len(data) - header
    if payload < expected:
        raise DataError(f"{where}: truncated: dimensions {dims} need {expected} bytes but {payload} follow. {REFETCH}")
    if payload > expected:
        raise DataError(f"{where}: {payload - expected} unexpected trailing bytes after {dims} of data. {REFETCH}")
    # .copy(): frombuffer views the read-only bytes; callers get an ordinary writable array.
    return np.frombuffer(data, np.uint8, count=expected, offset=header).reshape(dims).copy()


def _inflate_idx(compressed: bytes, where: str) -> bytes:
    """Inflate a gzip-compressed IDX file, never past the size its own header gives (plus one byte to see excess).

    A gzip bomb (a small file that inflates to gigabytes) is refused after at most that many bytes.
    """
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # 16+: the gzip container, with its CRC check
    out = bytearray()
    pending = compressed

    def inflate_to(size: int) -> None:
        nonlocal pending
        while len(out) < size and not inflater.eof:
            chunk = inflater.decompress(pending, size - len(out))
            pending = inflater.unconsumed_tail
            if not chunk and not pending:
                return
            out.extend(chunk)

    try:
        inflate_to(4)
        header = 4 + 4 * out[3] if len(out) >= 4 else 4
        inflate_to(header)
        needed = header
        if len(out) == header and int.from_bytes(out[:4], "big") in (IDX_LABELS_MAGIC, IDX_IMAGES_MAGIC):
            needed = header + math.prod(struct.unpack(f">{out[3]}I", bytes(out[4:header])))
            if needed > MAX_IDX_BYTES:
                raise DataError(
                    f"{where}: its IDX header claims {needed:,} bytes of data, more than the {MAX_IDX_BYTES:,} this parser "
                    f"inflates; not an MNIST-style file. {REFETCH}"
                )
            inflate_to(needed + 1)  # one byte past the end shows excess without inflating it
            if len(out) > needed:
                raise DataError(
                    f"{where}: the gzip stream holds more than the {needed:,} bytes its IDX header describes; "
                    f"stopped inflating there (a gzip bomb or a wrong file). {REFETCH}"
                )
        else:  # not an IDX header: the checks in parse_idx name the problem
            inflate_to(needed + 1)
    except zlib.error as error:  # includes a CRC mismatch, checked when the end marker is reached
        raise DataError(f"{where}: corrupt gzip stream ({error}). {REFETCH}") from error
    if len(out) <= needed and not inflater.eof:  # every input byte used, and still no end marker
        raise DataError(f"{where}: corrupt gzip stream (it ends before its end marker). {REFETCH}")
    if inflater.unused_data:
        raise DataError(f"{where}: {len(inflater.unused_data)} bytes follow the gzip stream's end. {REFETCH}")
    return bytes(out)


def check_counts(images: np.ndarray, labels: np.ndarray, *, name: str = "images/labels") -> None:
    """Images and labels must pair up one to one."""
    if len(images) != len(labels):
        raise DataError(
            f"{name}: {len(images)} images but {len(labels)} labels; the files do not belong together. "
            "Delete the raw data and rerun the download stage."
        )


def parse_cifar10_binary(batch: Source, *, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 binary batch (records of 1 label byte + 3072 CHW pixel bytes) -> (N,32,32,3) uint8, (N,) int64."""
    data, where = _read(batch, name)
    if not data or len(data) % CIFAR_RECORD_BYTES:
        raise DataError(
            f"{where}: {len(data)} bytes is not a whole, non-zero number of {CIFAR_RECORD_BYTES}-byte CIFAR-10 "
            f"records. {REFETCH}"
        )
    records = np.frombuffer(data, np.uint8).reshape(-1, CIFAR_RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    bad = np.flatnonzero(labels >= CIFAR_NUM_CLASSES)
    if bad.size:
        raise DataError(f"{where}: record {bad[0]} has label {labels[bad[0]]}, expected 0..9. {REFETCH}")
    images = records[:, 1:].reshape(-1, *CIFAR_IMAGE_SHAPE).transpose(0, 2, 3, 1)  # CHW -> HWC
    return np.ascontiguousarray(images), labels


def parse_csv(path_or_buffer: str | Path | IO[str], target: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """A CSV with a header -> (features float64 (N,F), target (N,), feature names); all features numeric."""
    where = str(path_or_buffer) if isinstance(path_or_buffer, (str, Path)) else "<csv buffer>"
    if not isinstance(path_or_buffer, (str, Path)):  # read once: the header check and pandas both need the text
        path_or_buffer = io.StringIO(path_or_buffer.read())
    frame = _read_frame(path_or_buffer, where, header="infer")
    _check_unique_names(path_or_buffer, where)
    if target not in frame.columns:
        columns = ", ".join(map(str, frame.columns))
        raise DataError(f"{where}: no target column '{target}'; columns are: {columns}. Set download.csv.target.")
    features = frame.drop(columns=[target])
    if features.shape[1] == 0:
        raise DataError(f"{where}: only the target column '{target}' is present; add feature columns.")
    _check_numeric(features, where, "Encode them as numbers (e.g. one-hot) or drop them from the file.")
    _check_finite(frame, where)
    column = frame[target]
    # Keep numeric targets numeric; anything else becomes a plain unicode array (never an object array).
    values = column.to_numpy() if pd.api.types.is_numeric_dtype(column) else column.astype(str).to_numpy(dtype=str)
    return features.to_numpy(dtype=np.float64), values, tuple(map(str, features.columns))


def _check_unique_names(source: str | Path | io.StringIO, where: str) -> None:
    """Refuse repeated column names: pandas would rename a copy (`y` -> `y.1`), and a copy of the
    target would then be read as a feature, leaking the label into the inputs."""
    if isinstance(source, io.StringIO):
        source.seek(0)
        header = next((row for row in csv.reader(source) if row), [])
    else:
        with open(source, newline="", encoding="utf-8-sig", errors="replace") as stream:  # -sig: as pandas, drop a BOM
            header = next((row for row in csv.reader(stream) if row), [])
    positions = collections.defaultdict(list)
    for index, column in enumerate(header, start=1):
        positions[column].append(index)
    repeated = {column: at for column, at in positions.items() if len(at) > 1}
    if repeated:
        listed = "; ".join(f"'{column}' at columns {', '.join(map(str, at))}" for column, at in repeated.items())
        raise DataError(f"{where}: repeated column name(s): {listed}. Rename or drop the copies: every column needs its own name.")


def parse_california_housing(path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """StatLib `cal_housing.data` (9 comma-separated numeric columns, no header) -> (x (N,8), y (N,), names)."""
    where = str(path)
    frame = _read_frame(path, where, header=None)
    if frame.shape[1] != len(CALIFORNIA_COLUMNS):
        raise DataError(
            f"{where}: {frame.shape[1]} columns, expected {len(CALIFORNIA_COLUMNS)} ({', '.join(CALIFORNIA_COLUMNS)}). "
            f"This is not StatLib's cal_housing.data. {REFETCH}"
        )
    frame.columns = list(CALIFORNIA_COLUMNS)
    _check_numeric(frame, where, REFETCH)
    _check_finite(frame, where)
    features = frame.drop(columns=[CALIFORNIA_TARGET])
    target = frame[CALIFORNIA_TARGET].to_numpy(dtype=np.float64)
    return features.to_numpy(dtype=np.float64), target, tuple(features.columns)


def _read_frame(source: str | Path | IO[str], where: str, *, header: str | None) -> pd.DataFrame:
    try:
        frame = pd.read_csv(source, header=header)
    except pd.errors.EmptyDataError:
        raise DataError(f"{where}: empty file. Point the data set at a CSV with a header row and data.") from None
    except pd.errors.ParserError as error:
        raise DataError(f"{where}: not a well-formed CSV ({error}). Fix the file.") from error
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{where}: cannot read it as text ({error}). Check the path and the file.") from error
    if frame.empty:
        raise DataError(f"{where}: no data rows. Point the data set at a CSV with data.")
    return frame


def _check_numeric(frame: pd.DataFrame, where: str, fix: str) -> None:
    bad = [str(name) for name in frame.columns if not pd.api.types.is_numeric_dtype(frame[name])]
    if bad:
        raise DataError(f"{where}: non-numeric column(s): {', '.join(bad)}. {fix}")


def _check_finite(frame: pd.DataFrame, where: str) -> None:
    for name in frame.columns:
        column = frame[name]
        missing = column.isna().to_numpy()
        if pd.api.types.is_numeric_dtype(column) and not missing.any():
            missing = ~np.isfinite(column.to_numpy(dtype=np.float64))
        if missing.any():
            row = int(np.flatnonzero(missing)[0])
            raise DataError(
                f"{where}: column '{name}' has {int(missing.sum())} missing or non-finite value(s) "
                f"(first at data row {row + 1}). Fill or drop those rows."
            )

