"""Fetching bytes: http(s)://, file:// or local paths -> a verified file, plus safe tar extraction.

Nothing unverified ever lands at a destination: bytes stream into a temp file beside it,
are hashed on the way, and are renamed into place only when the SHA-256 matches. A pinned
file's download never writes more than its pinned size, and every file has a deadline.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import http.client
import logging
import os
import socket
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO
from urllib.parse import quote, unquote, urlsplit

from tqdm import tqdm

from tapework.errors import DataError, DownloadError, EnvironmentSettingError
from tapework.io import atomic_path, clear_stale, file_digest, format_bytes

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
PROGRESS_MIN_BYTES = 4 << 20  # smaller files finish before a bar would be useful
MAX_BACKOFF_SECONDS = 60.0
PROGRESS_LOG_SECONDS = 10.0  # a download still running logs a progress line this often
USER_AGENT = "tapework-download/0.1"
WEB_SCHEMES = ("http", "https")
CACHE_ENV = "TAPEWORK_CACHE"
MIRROR_ENV = "TAPEWORK_MIRROR"
FIX_SOURCE = "check download.mirror / TAPEWORK_MIRROR (it must hold '{name}') and download.dataset in params.yaml"


class _Transient(Exception):
    """A failure worth retrying: connection error, timeout, truncated body, HTTP 5xx."""


def cache_dir() -> Path:
    """User cache of verified files: env TAPEWORK_CACHE, default ~/.cache/tapework."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tapework").expanduser()


def cache_path(sha256: str, name: str) -> Path:
    # Content-addressed, so a changed pin or two files with one name can never collide.
    return cache_dir() / "sha256" / sha256 / name


def prepare_cache() -> Path:
    """The cache folder, created and proven writable, with what killed downloads left in it removed.

    Only leftovers no live process holds are removed (tapework.io.clear_stale), so a concurrent
    run sharing the cache keeps its partial files.
    """
    folder = cache_dir() / "sha256"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        setting = os.environ.get(CACHE_ENV)
        where = f"{CACHE_ENV}={setting!r}" if setting else f"the download cache {folder.parent} ({CACHE_ENV} unset)"
        raise EnvironmentSettingError(
            f"{where} cannot hold downloads ({error.strerror or error}): set {CACHE_ENV} to a writable folder"
            f"{', or unset it to use ~/.cache/tapework' if setting else ''}."
        ) from None
    for pinned in folder.iterdir():
        if pinned.is_dir():
            clear_stale(pinned, ".*.partial")
    return folder


def effective_mirror(mirror: str) -> str:
    """The mirror to use: env TAPEWORK_MIRROR (when set and non-empty) wins over params; both are checked."""
    setting = os.environ.get(MIRROR_ENV)
    if setting:
        problem = mirror_problem(setting)
        if problem:
            raise EnvironmentSettingError(
                f"{MIRROR_ENV}={setting!r} is not a usable mirror ({problem}): set it to http(s)://host/path/, "
                f"file:///folder/ or a folder that holds the data set's files, or unset it."
            )
        return setting
    problem = mirror_problem(mirror) if mirror else ""
    if problem:
        raise DownloadError(
            f"params.yaml: download.mirror = '{mirror}' is not a usable mirror ({problem}). Fix `download.mirror`: "
            "http(s)://host/path/, file:///folder/, a folder, or '' for the canonical URLs."
        )
    return mirror


def mirror_problem(location: str) -> str:
    """What makes `location` unusable as a mirror base ('' when it is usable)."""
    try:
        parts = urlsplit(location)
        port = parts.port  # parsed lazily: a non-numeric or out-of-range port raises here
    except ValueError as error:
        return str(error)
    scheme = parts.scheme.lower()
    if scheme in WEB_SCHEMES:
        if not parts.hostname:
            return "no host name"
        if port == 0:
            return "port 0"
        if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in location):
            return "it contains a space or control character; percent-encode it"
    elif scheme == "file":
        if parts.netloc not in ("", "localhost"):
            return "file:// URLs name a local folder: file:///path"
    elif len(scheme) > 1:  # one letter is a Windows drive
        return f"unsupported URL scheme '{scheme}://'"
    return ""


def url_scheme(location: str) -> str:
    """'http', 'https', 'file', or '' for a plain local path; other schemes are refused."""
    try:
        scheme = urlsplit(location).scheme.lower()
    except ValueError as error:  # e.g. an unclosed IPv6 bracket
        raise DownloadError(f"{location}: not a valid URL ({error}). Fix the URL or mirror.") from None
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
    deadline_seconds: float,
    size: int | None = None,
    progress: bool = True,
) -> Path:
    """Fetch `url` to `dest` verified against `sha256` (empty only for local sources); returns `dest`.

    `size` (the pinned byte count, None when unknown) bounds what is written: a longer body is cut
    off and kept nowhere. `deadline_seconds` bounds the whole fetch, retries included.
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
    limits = _Limits(size, timeout_seconds, deadline_seconds, time.monotonic() + deadline_seconds)
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, scheme, dest, sha256, limits, progress)
            return dest
        except _Transient as error:
            if attempt == retries:
                raise DownloadError(
                    f"{url}: download failed after {retries + 1} attempt(s); last error: {error}. "
                    "Check the network, or set download.mirror / TAPEWORK_MIRROR to a reachable copy."
                ) from error
            delay = min(backoff_seconds * 2**attempt, MAX_BACKOFF_SECONDS)
            if time.monotonic() + delay >= limits.deadline:
                raise limits.overdue(url, f"last error: {error}") from error
            log.warning("%s: %s; retry %d/%d in %.2f s", url, error, attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class _Limits:
    """What one file's download may take: bytes (its pinned size) and time (per read, and overall)."""

    def __init__(self, size: int | None, timeout: float, deadline_seconds: float, deadline: float) -> None:
        self.size, self.timeout, self.deadline_seconds, self.deadline = size, timeout, deadline_seconds, deadline

    def overdue(self, url: str, detail: str) -> DownloadError:
        return DownloadError(
            f"{url}: not complete within download.deadline_seconds = {self.deadline_seconds:g} s ({detail}); "
            "nothing was kept. Use a faster mirror (download.mirror / TAPEWORK_MIRROR) or raise download.deadline_seconds."
        )


def _fetch_once(url: str, scheme: str, dest: Path, sha256: str, limits: _Limits, progress: bool) -> None:
    with atomic_path(dest) as temp, _open(url, scheme, limits) as (stream, length):
        if limits.size is not None and length is not None and length != limits.size:
            what = "is" if scheme in ("", "file") else "has a Content-Length of"
            raise DownloadError(
                f"{url}: {what} {length:,} bytes but the pinned file has {limits.size:,}; nothing was "
                f"downloaded. {_fix(dest.name)}."
            )
        digest = _stream_to(stream, temp, length, url, limits, progress)
        if sha256 and digest != sha256:
            if scheme in WEB_SCHEMES:
                kept = dest.with_name(dest.name + ".corrupt")
                os.replace(temp, kept)
            else:  # a local source is itself the bad file: no second copy
                kept = local_path(url, scheme)
            raise DownloadError(
                f"{url}: SHA-256 mismatch: expected {sha256}, got {digest}. The bad file is at {kept} "
                f"for inspection and was not used; {FIX_SOURCE.format(name=dest.name)}."
            )


class _Watchdog:
    """Shuts the attempt's sockets down when the deadline passes.

    urlopen reads the status line and the headers itself, where only the per-read timeout
    applies: a server sending them one byte at a time would otherwise run past
    download.deadline_seconds. A shut-down socket makes the blocked read return at once.
    """

    def __init__(self, deadline: float) -> None:
        self.sockets: list[socket.socket] = []
        self.fired = threading.Event()
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(deadline - time.monotonic(), 0.0), self._fire)
        self._timer.daemon = True

    def opener(self) -> urllib.request.OpenerDirector:
        """urllib's default opener, with connections that report their socket to this watchdog."""
        watchdog = self

        class Connection(http.client.HTTPConnection):
            def connect(self) -> None:
                super().connect()
                watchdog.watch(self.sock)

        class SecureConnection(http.client.HTTPSConnection):
            def connect(self) -> None:
                super().connect()
                watchdog.watch(self.sock)

        class Handler(urllib.request.HTTPHandler):
            def http_open(self, request: urllib.request.Request) -> http.client.HTTPResponse:
                return self.do_open(Connection, request)

        class SecureHandler(urllib.request.HTTPSHandler):
            def https_open(self, request: urllib.request.Request) -> http.client.HTTPResponse:
                return self.do_open(SecureConnection, request, context=self._context)

        return urllib.request.build_opener(Handler, SecureHandler)

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self.sockets.append(sock)
            fired = self.fired.is_set()
        if fired:
            self._shut(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired.set()
            sockets = list(self.sockets)
        for sock in sockets:
            self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # already closed by its connection: nothing left to stop
            sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


@contextlib.contextmanager
def _open(url: str, scheme: str, limits: _Limits) -> Iterator[tuple[BinaryIO, int | None]]:
    """Yield (byte stream, promised length or None); raise _Transient for retryable failures."""
    if not scheme or scheme == "file":
        path = local_path(url, scheme)
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
    with _Watchdog(limits.deadline) as watchdog:
        response = _request(watchdog, request, url, limits)
        if watchdog.fired.is_set():  # http.client takes a cut-off header block for a complete one
            response.close()
            raise limits.overdue(url, "the response headers had not all arrived")
        with response:
            length = response.headers.get("Content-Length", "")
            yield response, int(length) if length.isdigit() else None


def _request(watchdog: _Watchdog, request: urllib.request.Request, url: str, limits: _Limits) -> http.client.HTTPResponse:
    """The response once its headers are in; the errors of urlopen as DownloadError (final) or _Transient (retried)."""
    try:
        return watchdog.opener().open(request, timeout=limits.timeout)
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
        if watchdog.fired.is_set():
            raise limits.overdue(url, "the response headers had not all arrived") from error
        raise _Transient(_describe(error)) from error


def local_path(url: str, scheme: str) -> Path:
    """The file a plain path or file:// URL names (`scheme` as url_scheme gives it)."""
    if not scheme:
        return Path(url).expanduser()
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise DownloadError(f"{url}: file:// URLs must name a local file (file:///path). Fix the URL or mirror.")
    return Path(urllib.request.url2pathname(parts.path))


def _stream_to(stream: BinaryIO, temp: Path, length: int | None, url: str, limits: _Limits, progress: bool) -> str:
    """Copy stream -> temp while hashing, within `limits`; a body shorter than promised is a retryable truncation."""
    name = file_name(url)
    digest = hashlib.sha256()
    received = 0
    expected = limits.size if limits.size is not None else length
    started = last_log = time.monotonic()
    show = progress and sys.stderr.isatty() and (expected or 0) >= PROGRESS_MIN_BYTES
    # Read at most one byte past the pinned size: enough to know the body is too long.
    cap = limits.size + 1 if limits.size is not None else None
    with open(temp, "wb") as out, tqdm(
        total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not show, leave=False
    ) as bar:
        while True:
            want = CHUNK_BYTES if cap is None else min(CHUNK_BYTES, cap - received)
            try:
                # read1: whatever has arrived (one underlying read), so a trickling server cannot hold
                # one call past the deadline the way read(n), which waits for n bytes, would.
                chunk = stream.read1(want)
            except (OSError, http.client.HTTPException) as error:  # timeout, reset, IncompleteRead
                raise _Transient(f"connection lost after {received} bytes ({_describe(error)})") from error
            now = time.monotonic()
            if not chunk:
                break
            received += len(chunk)
            if limits.size is not None and received > limits.size:
                raise DownloadError(
                    f"{url}: the source sent more than the pinned {limits.size:,} bytes (Content-Length "
                    f"{'absent' if length is None else f'{length:,}'}); stopped there and kept nothing. "
                    f"{_fix(name)}."
                )
            try:
                out.write(chunk)
            except OSError as error:
                raise _write_error(temp, error) from error
            digest.update(chunk)
            bar.update(len(chunk))
            if now >= limits.deadline:
                raise limits.overdue(url, f"{_amount(received, expected)} received")
            if now - last_log >= PROGRESS_LOG_SECONDS:
                last_log = now
                rate = received / max(now - started, 1e-9)
                log.info(
                    "%s: %s after %.0f s (%s/s); gives up in %.0f s (download.deadline_seconds)",
                    name, _amount(received, expected), now - started, format_bytes(rate), limits.deadline - now,
                )
        try:
            out.flush()
        except OSError as error:
            raise _write_error(temp, error) from error
    # http.client does not raise when a Content-Length body ends early, so count bytes ourselves.
    if expected is not None and received != expected:
        raise _Transient(f"truncated body: got {received} of {expected} expected bytes")
    return digest.hexdigest()


def _fix(name: str) -> str:
    """FIX_SOURCE as a sentence of its own."""
    text = FIX_SOURCE.format(name=name)
    return text[0].upper() + text[1:]


def _write_error(temp: Path, error: OSError) -> DownloadError:
    full = " (disk full)" if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return DownloadError(
        f"cannot write {temp.parent}{full}: {error.strerror or error}; nothing was kept. Free space there, or set "
        f"{CACHE_ENV} to a folder on a disk with room (the download cache; data/ needs room for the files too)."
    )


def _amount(received: int, expected: int | None) -> str:
    return f"{format_bytes(received)} of {format_bytes(expected)}" if expected is not None else f"{format_bytes(received)} (size unknown)"


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
