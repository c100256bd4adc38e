"""Fetching bytes: http(s)://, file:// or local paths -> a verified file, plus safe tar extraction.

Nothing unverified ever lands at a destination: bytes stream into a temp file beside it,
are hashed on the way, and are renamed into place only when the SHA-256 matches.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import logging
import os
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO
from urllib.parse import quote, unquote, urlsplit

from tqdm import tqdm

from tapework.errors import DataError, DownloadError
from tapework.io import atomic_path, file_digest

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
PROGRESS_MIN_BYTES = 4 << 20  # smaller files finish before a bar would be useful
MAX_BACKOFF_SECONDS = 60.0
USER_AGENT = "tapework-download/0.1"
WEB_SCHEMES = ("http", "https")
FIX_SOURCE = "check download.mirror / TAPEWORK_MIRROR (it must hold '{name}') and download.dataset in params.yaml"


class _Transient(Exception):
    """A failure worth retrying: connection error, timeout, truncated body, HTTP 5xx."""


def cache_dir() -> Path:
    """User cache of verified files: env TAPEWORK_CACHE, default ~/.cache/tapework."""
    return Path(os.environ.get("TAPEWORK_CACHE") or Path.home() / ".cache" / "tapework").expanduser()


def cache_path(sha256: str, name: str) -> Path:
    # Content-addressed, so a changed pin or two files with one name can never collide.
    return cache_dir() / "sha256" / sha256 / name


def effective_mirror(mirror: str) -> str:
    """The mirror to use: env TAPEWORK_MIRROR (when set and non-empty) wins over params."""
    return os.environ.get("TAPEWORK_MIRROR") or mirror


def url_scheme(location: str) -> str:
    """'http', 'https', 'file', or '' for a plain local path; other schemes are refused."""
    scheme = urlsplit(location).scheme.lower()
    if scheme in (*WEB_SCHEMES, "file"):
        return scheme
    if len(scheme) <= 1:  # no scheme, or a Windows drive letter such as C:
        return ""
    raise DownloadError(f"{location}: unsupported URL scheme '{scheme}://'. Use http(s)://, file:// or a local path.")


def file_name(location: str) -> str:
    """The last path component of a URL or local path."""
    name = PurePosixPath(unquote(urlsplit(location).path)).name if url_scheme(location) else Path(location).name
    if not name:
        raise DownloadError(f"{location}: names no file. Give a URL or path that ends in a file name.")
    return name


def resolve_url(canonical_url: str, mirror: str) -> str:
    """Where to fetch `canonical_url`: `mirror` (URL or folder) + the canonical file name; no mirror = canonical."""
    if not mirror:
        return canonical_url
    name = file_name(canonical_url)
    if url_scheme(mirror):
        return mirror.rstrip("/") + "/" + quote(name)
    return str(Path(mirror).expanduser() / name)


def download_file(
    url: str,
    dest: str | Path,
    sha256: str,
    *,
    retries: int,
    backoff_seconds: float,
    timeout_seconds: float,
    progress: bool = True,
) -> Path:
    """Fetch `url` to `dest` verified against `sha256` (empty only for local sources); returns `dest`.

    A `dest` that already matches the pin is kept and no request is made.
    """
    dest = Path(dest)
    scheme = url_scheme(url)
    if not sha256 and scheme in WEB_SCHEMES:
        raise DownloadError(f"{url}: refusing an unpinned download over the network. Give the file's SHA-256 pin.")
    if dest.is_file():
        if sha256 and file_digest(dest) == sha256:
            return dest
        dest.unlink()  # stale or unverifiable: never leave it where a verified file is expected
    log.log(logging.INFO if scheme in WEB_SCHEMES else logging.DEBUG, "downloading %s", url)
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, scheme, dest, sha256, timeout_seconds, progress)
            return dest
        except _Transient as error:
            if attempt == retries:
                raise DownloadError(
                    f"{url}: download failed after {retries + 1} attempt(s); last error: {error}. "
                    "Check the network, or set download.mirror / TAPEWORK_MIRROR to a reachable copy."
                ) from error
            delay = min(backoff_seconds * 2**attempt, MAX_BACKOFF_SECONDS)
            log.warning("%s: %s; retry %d/%d in %.2f s", url, error, attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _fetch_once(url: str, scheme: str, dest: Path, sha256: str, timeout: float, progress: bool) -> None:
    with atomic_path(dest) as temp, _open(url, scheme, timeout) as (stream, length):
        digest = _stream_to(stream, temp, length, file_name(url), progress)
        if sha256 and digest != sha256:
            if scheme in WEB_SCHEMES:
                kept = dest.with_name(dest.name + ".corrupt")
                os.replace(temp, kept)
            else:  # a local source is itself the bad file: no second copy
                kept = _local_path(url, scheme)
            raise DownloadError(
                f"{url}: SHA-256 mismatch: expected {sha256}, got {digest}. The bad file is at {kept} "
                f"for inspection and was not used; {FIX_SOURCE.format(name=dest.name)}."
            )


@contextlib.contextmanager
def _open(url: str, scheme: str, timeout: float) -> Iterator[tuple[BinaryIO, int | None]]:
    """Yield (byte stream, promised length or None); raise _Transient for retryable failures."""
    if not scheme or scheme == "file":
        path = _local_path(url, scheme)
        try:
            stream = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            raise DownloadError(f"{path}: no such file; {FIX_SOURCE.format(name=path.name)}.") from None
        except OSError as error:
            raise DownloadError(f"{path}: cannot read it ({error.strerror}). Check the path and its permissions.") from error
        with stream:
            yield stream, os.fstat(stream.fileno()).st_size
        return
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code >= 500 or error.code in (408, 429):
            raise _Transient(f"HTTP {error.code} {error.reason}") from error
        raise DownloadError(
            f"{url}: HTTP {error.code} {error.reason}; not retried. {FIX_SOURCE.format(name=file_name(url))}."
        ) from error
    except ValueError as error:  # malformed URL (http.client.InvalidURL and friends)
        raise DownloadError(f"{url}: not a valid URL ({error}). Fix the URL or mirror in params.yaml.") from error
    except (OSError, http.client.HTTPException) as error:  # URLError, refused, reset, timeout
        raise _Transient(_describe(error)) from error
    with response:
        length = response.headers.get("Content-Length", "")
        yield response, int(length) if length.isdigit() else None


def _local_path(url: str, scheme: str) -> Path:
    if not scheme:
        return Path(url).expanduser()
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise DownloadError(f"{url}: file:// URLs must name a local file (file:///path). Fix the URL or mirror.")
    return Path(urllib.request.url2pathname(parts.path))


def _stream_to(stream: BinaryIO, temp: Path, length: int | None, name: str, progress: bool) -> str:
    """Copy stream -> temp while hashing; a body shorter than promised is a retryable truncation."""
    digest = hashlib.sha256()
    received = 0
    show = progress and sys.stderr.isatty() and (length or 0) >= PROGRESS_MIN_BYTES
    with open(temp, "wb") as out, tqdm(
        total=length, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not show, leave=False
    ) as bar:
        while True:
            try:
                chunk = stream.read(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as error:  # timeout, reset, IncompleteRead
                raise _Transient(f"connection lost after {received} bytes ({_describe(error)})") from error
            if not chunk:
                break
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    # http.client does not raise when a Content-Length body ends early, so count bytes ourselves.
    if length is not None and received != length:
        raise _Transient(f"truncated body: got {received} of {length} promised bytes")
    return digest.hexdigest()


def _describe(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    return f"{type(error).__name__}: {reason}" if str(reason) else type(error).__name__


def safe_extract(archive_path: str | Path, dest_dir: str | Path) -> list[Path]:
    """Extract a tar archive into `dest_dir`, refusing it whole if any member could escape; returns the files."""
    archive_path, dest_dir = Path(archive_path), Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    root = dest_dir.resolve()
    try:
        with tarfile.open(archive_path, "r:*") as tar:
            members = tar.getmembers()
            for member in members:  # check everything before writing anything
                problem = _unsafe_member(member, root)
                if problem:
                    raise DataError(
                        f"{archive_path}: refusing to extract member '{member.name}': {problem}. The archive is "
                        "corrupt or malicious; delete it and download it again from the canonical source."
                    )
            tar.extractall(dest_dir, members=members, filter="data")  # stdlib guard as a second layer
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(f"{archive_path}: not a valid tar archive ({error}). Delete it and download it again.") from error
    return [dest_dir / member.name for member in members if member.isfile()]


def _unsafe_member(member: tarfile.TarInfo, root: Path) -> str:
    """Why `member` must not be extracted under `root`, or '' when it is safe."""
    name = member.name
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return "absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "'..' path traversal"
    target = root / name
    if not target.resolve().is_relative_to(root):
        return "path resolves outside the destination"
    if member.issym() or member.islnk():
        link = member.linkname
        if link.startswith(("/", "\\")) or PureWindowsPath(link).drive:
            return f"link to absolute path '{link}'"
        # Symlinks resolve from the member's folder, hard links from the archive root.
        base = target.parent if member.issym() else root
        if not (base / link).resolve().is_relative_to(root):
            return f"link pointing outside the destination ('{link}')"
    elif not (member.isfile() or member.isdir()):
        return "special file (device or FIFO)"
    return ""
