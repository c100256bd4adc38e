"""Pure parsers for the raw formats; garbage raises DataError naming the file, the problem and the fix."""

from __future__ import annotations

import collections
import contextlib
import csv
import io
import math
import struct
import typing
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import numpy as np

from tapework.errors import DataError

if typing.TYPE_CHECKING:
    import pandas as pd

IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
# Most bytes an IDX file may inflate to: 40x Fashion-MNIST's train images (47 MB), far below a gzip bomb's gigabytes.
MAX_IDX_BYTES = 2**31
IDX_READ_BYTES = 1 << 20  # file bytes read per step of an IDX file: its memory is one chunk, not the file
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


@contextlib.contextmanager
def _open(source: Source, name: str | None) -> Iterator[tuple[BinaryIO, str]]:
    """A binary stream over `source` (bytes or a path) and the name errors give it."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(source), name or "<bytes>"
        return
    path = Path(source)
    try:
        stream = path.open("rb")
    except OSError as error:
        raise DataError(f"{path}: cannot read it ({error.strerror}). Rerun the download stage.") from error
    with stream:
        yield stream, name or str(path)


class _IdxData:
    """One IDX file read front to back in pieces (gzip inflated on the way), its header parsed and checked.

    `read_into` hands out the data bytes; `finish` checks what follows them. Never inflates more
    than is asked for (plus one byte to see excess), so a gzip bomb costs what its header allows.
    """

    def __init__(self, stream: BinaryIO, where: str) -> None:
        self.stream, self.where = stream, where
        self.pending = stream.read(IDX_READ_BYTES)  # file bytes read but not yet handed out (gzip: not yet inflated)
        self.inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if self.pending[:2] == b"\x1f\x8b" else None  # 16+: gzip, with its CRC
        self.dims = self._header()
        self.size = math.prod(self.dims)  # data bytes after the header
        self.header_bytes = 4 + 4 * len(self.dims)
        if self.inflater is not None and self.header_bytes + self.size > MAX_IDX_BYTES:
            raise DataError(
                f"{where}: its IDX header claims {self.header_bytes + self.size:,} bytes of data, more than the {MAX_IDX_BYTES:,} "
                f"this parser inflates; not an MNIST-style file. {REFETCH}"
            )
        if self.inflater is None:  # a raw file's length is known now: refuse a wrong one before any data is read
            follow = len(self.pending) + _rest(stream)
            if follow != self.size:
                self._wrong_length(follow)

    def _header(self) -> tuple[int, ...]:
        head = self._read(4)
        if len(head) < 4:
            self._short(f"{len(head)} bytes is too short for an IDX header")
        magic = int.from_bytes(head, "big")
        if magic not in (IDX_LABELS_MAGIC, IDX_IMAGES_MAGIC):
            raise DataError(
                f"{self.where}: bad IDX magic number 0x{magic:08x}; expected 0x{IDX_LABELS_MAGIC:08x} (labels) or "
                f"0x{IDX_IMAGES_MAGIC:08x} (images). This is not an MNIST-style IDX file: check the data set and mirror."
            )
        ndim = head[3]
        packed = self._read(4 * ndim)
        if len(packed) < 4 * ndim:
            self._short(f"truncated IDX header ({4 + len(packed)} of {4 + 4 * ndim} bytes)")
        dims = struct.unpack(f">{ndim}I", packed)
        if 0 in dims:
            raise DataError(f"{self.where}: IDX dimensions {dims} hold no data. {REFETCH}")
        return dims

    def _short(self, problem: str) -> typing.NoReturn:
        """The data ended early: a gzip stream cut before its end marker says so, else `problem`."""
        if self.inflater is not None and not self.inflater.eof:
            raise DataError(f"{self.where}: corrupt gzip stream (it ends before its end marker). {REFETCH}")
        raise DataError(f"{self.where}: {problem}. {REFETCH}")

    def _wrong_length(self, follow: int) -> typing.NoReturn:
        if follow < self.size:
            self._short(f"truncated: dimensions {self.dims} need {self.size} bytes but {follow} follow")
        raise DataError(f"{self.where}: {follow - self.size} unexpected trailing bytes after {self.dims} of data. {REFETCH}")

    def _next(self, limit: int) -> bytes:
        """Up to `limit` (> 0) further data bytes; b"" at the end of the data."""
        if self.inflater is None:
            if not self.pending:
                self.pending = self.stream.read(max(limit, IDX_READ_BYTES))
            piece, self.pending = self.pending[:limit], self.pending[limit:]
            return piece
        while not self.inflater.eof:
            if not self.pending:
                self.pending = self.stream.read(IDX_READ_BYTES)
                if not self.pending:
                    return b""
            try:  # a zlib error includes a CRC or length mismatch, found when the end marker is reached
                piece = self.inflater.decompress(self.pending, min(limit, IDX_READ_BYTES))  # bounded: one piece held at a time
            except zlib.error as error:
                raise DataError(f"{self.where}: corrupt gzip stream ({error}). {REFETCH}") from error
            # Past the end marker the rest of the input is `unused_data` (zlib may leave it in the tail too).
            self.pending = b"" if self.inflater.eof else self.inflater.unconsumed_tail
            if piece:
                return piece
        return b""

    def _read(self, size: int) -> bytes:
        pieces, got = [], 0
        while got < size and (piece := self._next(size - got)):
            pieces.append(piece)
            got += len(piece)
        return b"".join(pieces)

    def read_into(self, out: np.ndarray, done: int) -> None:
        """Fill the uint8 array `out` with the next data bytes; `done` data bytes were read before them."""
        view, filled = memoryview(out.reshape(-1)), 0
        if self.inflater is None:  # straight into the array: no intermediate copy
            piece = self.pending[: len(view)]
            view[: len(piece)], filled, self.pending = piece, len(piece), self.pending[len(piece) :]
            while filled < len(view) and (count := self.stream.readinto(view[filled:])):
                filled += count
        else:
            while filled < len(view) and (piece := self._next(len(view) - filled)):
                view[filled : filled + len(piece)] = piece
                filled += len(piece)
        if filled < len(view):
            self._wrong_length(done + filled)

    def finish(self) -> None:
        """After all the data: nothing may follow it, and a gzip stream must end here, intact."""
        if self._next(1):  # one byte past the end shows excess without inflating it
            if self.inflater is None:
                self._wrong_length(self.size + 1 + len(self.pending) + _rest(self.stream))
            raise DataError(
                f"{self.where}: the gzip stream holds more than the {self.header_bytes + self.size:,} bytes its IDX header "
                f"describes; stopped inflating there (a gzip bomb or a wrong file). {REFETCH}"
            )
        if self.inflater is not None:
            if not self.inflater.eof:
                self._short("")
            extra = len(self.inflater.unused_data) + len(self.pending) + _rest(self.stream)
            if extra:
                raise DataError(f"{self.where}: {extra} bytes follow the gzip stream's end. {REFETCH}")


def _rest(stream: BinaryIO) -> int:
    """Bytes left in `stream` from its position (which it keeps)."""
    position = stream.tell()
    end = stream.seek(0, io.SEEK_END)
    stream.seek(position)
    return end - position


def parse_idx(source: Source, *, name: str | None = None) -> np.ndarray:
    """An IDX file (gzip or raw, bytes or path) -> uint8 array: labels (N,) or images (N, H, W)."""
    with _open(source, name) as (stream, where):
        data = _IdxData(stream, where)
        array = np.empty(data.dims, np.uint8)
        data.read_into(array, 0)
        data.finish()
    return array


@dataclass(frozen=True)
class IdxStream:
    """An IDX file whose header has been read: `dims` now, its rows on iteration.

    Each iteration reads the file afresh and yields uint8 chunks of `rows_per_chunk` rows
    (`(n, *dims[1:])`, the last one shorter) in file order, holding about one chunk in memory.
    A problem found late (a CRC mismatch, a short stream) raises DataError from the iterator,
    before the last chunk is yielded, so a reader that stops after the last row still sees it.
    """

    path: Path
    where: str
    dims: tuple[int, ...]
    rows_per_chunk: int

    def __iter__(self) -> Iterator[np.ndarray]:
        with _open(self.path, self.where) as (stream, where):
            data = _IdxData(stream, where)
            if data.dims != self.dims:
                raise DataError(f"{where}: its IDX header changed from {self.dims} to {data.dims} while it was read. {REFETCH}")
            row_bytes, total = math.prod(self.dims[1:]), self.dims[0]
            for start in range(0, total, self.rows_per_chunk):
                chunk = np.empty((min(self.rows_per_chunk, total - start), *self.dims[1:]), np.uint8)
                data.read_into(chunk, start * row_bytes)
                if start + len(chunk) == total:
                    data.finish()
                yield chunk


def iter_idx(source_path: str | Path, rows_per_chunk: int, *, name: str | None = None) -> IdxStream:
    """An IDX file (gzip or raw) read in chunks of rows: its header read and checked now, its data on iteration."""
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be at least 1, not {rows_per_chunk}")
    with _open(source_path, name) as (stream, where):
        dims = _IdxData(stream, where).dims
    return IdxStream(Path(source_path), where, dims, rows_per_chunk)


def check_counts(images: np.ndarray | int, labels: np.ndarray | int, *, name: str = "images/labels") -> None:
    """Images and labels (arrays, or their counts from the files' headers) must pair up one to one."""
    images, labels = (value if isinstance(value, int) else len(value) for value in (images, labels))
    if images != labels:
        raise DataError(
            f"{name}: {images} images but {labels} labels; the files do not belong together. "
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
    values = column.to_numpy() if _pandas().api.types.is_numeric_dtype(column) else column.astype(str).to_numpy(dtype=str)
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


def _pandas() -> typing.Any:
    """pandas, imported on first use: only the CSV formats need it, and its import costs the download
    and preprocess stages about 0.15 s on every other data set."""
    import pandas

    return pandas


def _read_frame(source: str | Path | IO[str], where: str, *, header: str | None) -> pd.DataFrame:
    pd = _pandas()
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
    bad = [str(name) for name in frame.columns if not _pandas().api.types.is_numeric_dtype(frame[name])]
    if bad:
        raise DataError(f"{where}: non-numeric column(s): {', '.join(bad)}. {fix}")


def _check_finite(frame: pd.DataFrame, where: str) -> None:
    for name in frame.columns:
        column = frame[name]
        missing = column.isna().to_numpy()
        if _pandas().api.types.is_numeric_dtype(column) and not missing.any():
            missing = ~np.isfinite(column.to_numpy(dtype=np.float64))
        if missing.any():
            row = int(np.flatnonzero(missing)[0])
            raise DataError(
                f"{where}: column '{name}' has {int(missing.sum())} missing or non-finite value(s) "
                f"(first at data row {row + 1}). Fill or drop those rows."
            )

