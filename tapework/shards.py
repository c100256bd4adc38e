"""Prepared data as shards: fixed-length binary records, written and checked with NumPy only.

One record is one example: its input bytes (C order) then its label, both little-endian, with no
header or framing. NumPy writes them (so preprocess needs no TensorFlow) and
`tf.data.FixedLengthRecordDataset` reads them (tapework/batching.py, `shard_dataset`), decoding a
whole batch of records with one `decode_raw`. Each split is a list of shard files of
`preprocess.shard_size` records; meta.json lists every file with its example count and SHA-256.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tapework.errors import DataError

FORMAT_KEY = "format"  # meta.json of a sharded folder: "shards"; an arrays folder has no such key
SHARDS = "shards"
RECORD_KEY = "record"  # meta.json: the record layout (input dtype, label dtype, bytes per record)
FILES_KEY = "shards"  # meta.json: {split: [[file name, examples], ...]} in reading order
SHARD_SUFFIX = ".rec"
RERUN_PREPROCESS = "re-run the preprocess stage (dvc repro -f preprocess)"
# Bytes per write and per read: large enough that a shard costs a few system calls, small enough to stay bounded.
IO_CHUNK_BYTES = 8 << 20


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}{SHARD_SUFFIX}"


@dataclass(frozen=True)
class Layout:
    """How one example is laid out in a record."""

    input_shape: tuple[int, ...]
    input_dtype: str  # "uint8" (images) or "float32" (tabular features)
    label_dtype: str  # "int32" (class index) or "float32" (regression target)

    @property
    def input_bytes(self) -> int:
        return math.prod(self.input_shape) * np.dtype(self.input_dtype).itemsize

    @property
    def record_bytes(self) -> int:
        return self.input_bytes + np.dtype(self.label_dtype).itemsize

    def to_meta(self) -> dict[str, Any]:
        return {"input_dtype": self.input_dtype, "label_dtype": self.label_dtype, "bytes": self.record_bytes}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Layout:
        record = meta[RECORD_KEY]
        return cls(tuple(meta["input_shape"]), record["input_dtype"], record["label_dtype"])

    def encode(self, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(n, *input_shape) inputs and (n,) labels -> (n, record_bytes) uint8 records."""
        count = len(labels)
        little = {"uint8": "<u1", "float32": "<f4", "int32": "<i4"}
        inputs = np.ascontiguousarray(inputs, dtype=little[self.input_dtype]).reshape(count, -1).view(np.uint8)
        labels = np.ascontiguousarray(labels, dtype=little[self.label_dtype]).reshape(count, 1).view(np.uint8)
        return np.concatenate([inputs, labels], axis=1)

    def decode(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, record_bytes) uint8 -> inputs (n, *input_shape) and labels (n,), in the prepared dtypes."""
        inputs = np.ascontiguousarray(records[:, : self.input_bytes]).view(f"<{np.dtype(self.input_dtype).str[1:]}")
        labels = np.ascontiguousarray(records[:, self.input_bytes :]).view(f"<{np.dtype(self.label_dtype).str[1:]}")
        return inputs.reshape(-1, *self.input_shape).astype(self.input_dtype, copy=False), labels.reshape(-1).astype(self.label_dtype, copy=False)


class ShardWriter:
    """Appends records to `<split>-NNNNN.rec` files of `shard_size` records each, hashing as it writes.

    Memory stays at one write chunk whatever the split's size.
    """

    def __init__(self, directory: Path, split: str, layout: Layout, shard_size: int) -> None:
        self.directory, self.split, self.layout, self.shard_size = Path(directory), split, layout, shard_size
        self.files: list[tuple[str, int, str]] = []  # (name, examples, sha256) of each closed shard
        self._stream: Any = None
        self._digest: Any = None
        self._count = 0

    def write(self, inputs: np.ndarray, labels: np.ndarray) -> None:
        start = 0
        while start < len(labels):
            if self._stream is None:
                self._open()
            take = min(self.shard_size - self._count, len(labels) - start)
            records = self.layout.encode(inputs[start : start + take], labels[start : start + take])
            self._stream.write(records.data)
            self._digest.update(records.data)
            self._count += take
            start += take
            if self._count == self.shard_size:
                self._close_shard()

    def close(self) -> list[tuple[str, int, str]]:
        if self._stream is not None:
            self._close_shard()
        return self.files

    def _open(self) -> None:
        name = shard_name(self.split, len(self.files))
        self._stream = open(self.directory / name, "wb")  # in preprocess's temp folder: renamed into place whole
        self._digest, self._count = hashlib.sha256(), 0

    def _close_shard(self) -> None:
        self._stream.close()
        self.files.append((Path(self._stream.name).name, self._count, self._digest.hexdigest()))
        self._stream = None


def split_files(meta: dict[str, Any], split: str) -> list[tuple[str, int]]:
    """[(file name, examples), ...] of one split, in reading order."""
    return [(name, int(count)) for name, count in meta[FILES_KEY][split]]


def iter_split(directory: str | Path, meta: dict[str, Any], split: str, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, labels) of one split in chunks of exactly `rows` examples (the last one shorter), across shard files."""
    layout = Layout.from_meta(meta)
    pending: list[np.ndarray] = []
    held = 0
    for name, count in split_files(meta, split):
        with open(Path(directory) / name, "rb") as stream:
            left = count
            while left:
                take = min(left, rows, max(1, IO_CHUNK_BYTES // layout.record_bytes))
                block = np.frombuffer(stream.read(take * layout.record_bytes), np.uint8)
                if block.size != take * layout.record_bytes:
                    raise DataError(f"{Path(directory) / name}: shorter than meta.json says: {RERUN_PREPROCESS}")
                pending.append(block.reshape(take, layout.record_bytes))
                held += take
                left -= take
                while held >= rows:
                    joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
                    yield layout.decode(joined[:rows])
                    pending, held = [joined[rows:]], held - rows
    if held:
        yield layout.decode(np.concatenate(pending))


def read_split(directory: str | Path, meta: dict[str, Any], split: str) -> tuple[np.ndarray, np.ndarray]:
    """One whole split in memory (validation and test splits, export's reference outputs, tests)."""
    layout = Layout.from_meta(meta)
    chunks = list(iter_split(directory, meta, split, rows=max(1, int(meta["counts"][split]))))
    if not chunks:
        return np.zeros((0, *layout.input_shape), layout.input_dtype), np.zeros(0, layout.label_dtype)
    return chunks[0]


def check_meta(meta: dict[str, Any], splits: tuple[str, ...], fail: Any) -> None:
    """The shard listing agrees with itself: files per split, counts summing to `counts`, sha256 listing exactly them."""
    record, listing, hashes = meta.get(RECORD_KEY), meta.get(FILES_KEY), meta.get("sha256")
    if not isinstance(record, dict) or record.get("input_dtype") not in ("uint8", "float32") or record.get("label_dtype") not in ("int32", "float32"):
        fail(f"{RECORD_KEY} must give input_dtype (uint8|float32) and label_dtype (int32|float32)")
    if not isinstance(listing, dict) or sorted(listing) != sorted(splits):
        fail(f"{FILES_KEY} must list the shard files of {', '.join(splits)}")
    names = []
    for split in splits:
        entries = listing[split]
        if not isinstance(entries, list) or not all(
            isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], int) and entry[1] > 0
            for entry in entries
        ):
            fail(f"{FILES_KEY}.{split} must be a list of [file name, examples > 0] pairs")
        if sum(count for _, count in entries) != meta.get("counts", {}).get(split):
            fail(f"the {split} shards hold {sum(count for _, count in entries)} examples but counts.{split} is {meta.get('counts', {}).get(split)}")
        names += [name for name, _ in entries]
    if not isinstance(hashes, dict) or sorted(hashes) != sorted(names):
        fail("sha256 must list exactly the shard files")


def verify_files(directory: str | Path, meta: dict[str, Any], splits: tuple[str, ...]) -> None:
    """Every shard present, of the size its record count gives, with the SHA-256 meta.json records: checked before any training."""
    layout = Layout.from_meta(meta)
    directory = Path(directory)
    for split in splits:
        for name, count in split_files(meta, split):
            path = directory / name
            if not path.is_file():
                raise DataError(f"{path} is missing (meta.json lists it): {RERUN_PREPROCESS}")
            size = path.stat().st_size
            if size != count * layout.record_bytes:
                raise DataError(
                    f"{path} holds {size} bytes, not the {count} records x {layout.record_bytes} bytes meta.json gives "
                    f"(truncated or replaced): {RERUN_PREPROCESS}"
                )
            digest = hashlib.sha256()
            with open(path, "rb") as stream:
                while chunk := stream.read(IO_CHUNK_BYTES):
                    digest.update(chunk)
            if digest.hexdigest() != meta["sha256"][name]:
                raise DataError(f"{path} does not match the hash in meta.json (changed after preprocess): {RERUN_PREPROCESS}")


def check_byte_order() -> None:
    """Records are little-endian and TensorFlow decodes them in the host's order (tf.bitcast)."""
    if sys.byteorder != "little":
        raise DataError("preprocess.format: shards needs a little-endian host (x86-64, ARM64); use preprocess.format: arrays here")
