"""Atomic, deterministic file output: no partial files, no timestamps in bytes."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tapework.errors import DataError

try:
    import fcntl
except ImportError:  # Windows: no flock, so no leftover is ever judged stale (they are kept, never wrongly removed)
    fcntl = None  # type: ignore[assignment]

# Fixed zip entry time so identical arrays give identical bytes (zip's epoch is 1980).
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def try_lock(fd: int, *, wait: bool) -> bool:
    """An exclusive flock on `fd`; False when another open file holds it (without `wait`) or locks are unsupported."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # e.g. a filesystem without flock: nobody can lock, so nothing is judged stale
        return False
    return True


def still_at(path: Path, fd: int) -> bool:
    """Whether `path` still names the file or folder open as `fd` (not removed or replaced meanwhile)."""
    try:
        return os.lstat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def held_temp(parent: Path, prefix: str, suffix: str, *, directory: bool = False) -> Iterator[Path]:
    """A new temp file (or folder) in `parent`, exclusively flock-ed for the whole block.

    The kernel drops the lock when the process ends, however it ends (SIGKILL included), so
    `clear_stale` can tell what a dead run left behind from the work of a live one.
    """
    while True:
        if directory:
            path = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
            fd = os.open(path, os.O_RDONLY)
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
            path = Path(name)
        try_lock(fd, wait=True)
        # A clear_stale between mkstemp and the lock may have removed it as unlocked: then make another.
        if still_at(path, fd):
            break
        os.close(fd)
    try:
        yield path
    finally:
        os.close(fd)


def clear_stale(parent: Path, pattern: str) -> list[Path]:
    """Remove the entries of `parent` matching `pattern` that no live process holds (see `held_temp`)."""
    removed = []
    for path in sorted(Path(parent).glob(pattern)):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # gone meanwhile, a symlink, or unreadable: not ours to judge
            continue
        try:
            if not try_lock(fd, wait=False) or not still_at(path, fd):
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def temp_pattern(name: str, suffix: str) -> str:
    """The glob matching `held_temp(parent, f".{name}.", suffix)` entries, whatever characters `name` holds."""
    return f".{glob.escape(name)}.*{suffix}"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync and rename it into place, else delete it.

    Temp files that a killed run left beside `path` are removed first; those of a live run are kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(path.parent, temp_pattern(path.name, ".partial"))
    with held_temp(path.parent, f".{path.name}.", ".partial") as temp_path:
        # mkstemp creates 0600 files; outputs should get the usual mode the umask allows.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_path, 0o666 & ~umask)
        try:
            yield temp_path
            with open(temp_path, "rb+") as stream:
                os.fsync(stream.fileno())
            os.replace(temp_path, path)
        finally:
            temp_path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temp_path:
        temp_path.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, payload: Any) -> None:
    """Sorted keys, fixed indent, trailing newline: stable bytes for git and `dvc metrics diff`."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))  # write_json writes UTF-8, whatever the locale


def save_array(path: str | Path, array: np.ndarray) -> None:
    """`.npy` written atomically (the format has no timestamp, so bytes depend only on the array)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def load_array(path: str | Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def save_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Like np.savez, but entries carry a fixed timestamp so the archive bytes are reproducible."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, mode="w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            entry.external_attr = 0o644 << 16
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(entry, member.getvalue())
    atomic_write_bytes(path, buffer.getvalue())


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read arrays only: allow_pickle=False means a crafted file cannot run code on load."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"{path} is not a valid array archive ({error}); re-run the stage that writes it") from None


def format_bytes(count: float, *, binary: bool = False) -> str:
    """`16.4 kB` (powers of 1000) or, with `binary`, `1.3 MiB` (powers of 1024); whole bytes below one unit."""
    base, units = (1024, ("B", "KiB", "MiB", "GiB")) if binary else (1000, ("B", "kB", "MB", "GB"))
    for unit in units:
        if count < base or unit == units[-1]:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= base
    raise AssertionError("unreachable")


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks (SHA-256 for pins and manifests; DVC's lock uses MD5)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def stable_hash(payload: Any) -> str:
    """SHA-256 of a JSON-able payload with sorted keys: equal content, equal hash, whatever the dict order."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside `path`; on success it replaces `path` whole, else it is removed.

    A reader therefore sees the old complete folder, no folder, or the new complete folder,
    never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A SIGKILL skips every `finally`: clear what such a run left behind (not a live run's folder).
    clear_stale(path.parent, temp_pattern(path.name, ".partial"))
    with held_temp(path.parent, f".{path.name}.", ".partial", directory=True) as temp_path:
        try:
            yield temp_path
            if path.exists():
                shutil.rmtree(path)
            os.replace(temp_path, path)
        finally:
            shutil.rmtree(temp_path, ignore_errors=True)
