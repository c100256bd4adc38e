"""download_file against a faulty loopback server, resolve_url, the cache and safe_extract."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from http_server import FaultServer

from tapework import download
from tapework.catalogue import DATASETS, RemoteFile
from tapework.datasets import fetch_dataset
from tapework.download import download_file, effective_mirror, prepare_cache, resolve_url, safe_extract
from tapework.errors import DataError, DownloadError, EnvironmentSettingError
from tests.conftest import ROOT, make_params

pytestmark = pytest.mark.timeout(30)

PAYLOAD = bytes(range(256)) * 64  # 16 KiB
PIN = hashlib.sha256(PAYLOAD).hexdigest()
FAST = {"retries": 2, "backoff_seconds": 0.01, "timeout_seconds": 5.0, "deadline_seconds": 30.0}


@pytest.fixture
def server():
    with FaultServer({"/data/file.bin": PAYLOAD}, stall_seconds=1.0) as running:
        yield running


def leftovers(folder: Path) -> list[str]:
    """Temp or partial files beside a destination."""
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(".partial"))


def test_good_file_is_streamed_verified_and_renamed(server: FaultServer, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "file.bin"
    assert download_file(server.url + "/data/file.bin", dest, PIN, **FAST) == dest
    assert dest.read_bytes() == PAYLOAD
    assert server.requests("/data/file.bin") == 1
    assert leftovers(dest.parent) == []


def test_verified_destination_makes_no_request(server: FaultServer, tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    download_file(server.url + "/data/file.bin", dest, PIN, **FAST)
    download_file(server.url + "/data/file.bin", dest, PIN, **FAST)
    assert server.requests() == 1


def test_stale_destination_is_replaced(server: FaultServer, tmp_path: Path) -> None:
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"an older, different file")
    download_file(server.url + "/data/file.bin", dest, PIN, **FAST)
    assert dest.read_bytes() == PAYLOAD


def test_hash_mismatch_keeps_corrupt_copy_aside_and_nothing_at_dest(server: FaultServer, tmp_path: Path) -> None:
    server.program("/data/file.bin", "corrupt")
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError) as caught:
        download_file(server.url + "/data/file.bin", dest, PIN, **FAST)
    message = str(caught.value)
    corrupt = tmp_path / "file.bin.corrupt"
    got = hashlib.sha256(corrupt.read_bytes()).hexdigest()
    assert f"expected {PIN}" in message and f"got {got}" in message and str(corrupt) in message
    assert len(corrupt.read_bytes()) == len(PAYLOAD) and corrupt.read_bytes() != PAYLOAD
    assert not dest.exists() and leftovers(tmp_path) == []
    assert server.requests() == 1  # a wrong file is a content problem: not retried


@pytest.mark.parametrize("fault", ["500", "truncate", "slow_drop"])
def test_transient_fault_is_retried_then_succeeds(server: FaultServer, tmp_path: Path, fault: str) -> None:
    server.program("/data/file.bin", fault)
    dest = tmp_path / "file.bin"
    download_file(server.url + "/data/file.bin", dest, PIN, retries=2, backoff_seconds=0.01, timeout_seconds=0.3, deadline_seconds=30.0)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests() == 2


def test_stall_shorter_than_timeout_then_drop_is_a_truncation(server: FaultServer, tmp_path: Path) -> None:
    server.stall_seconds = 0.05
    server.program("/data/file.bin", "slow_drop", "slow_drop")
    dest = tmp_path / "file.bin"
    download_file(server.url + "/data/file.bin", dest, PIN, **FAST)
    assert dest.read_bytes() == PAYLOAD and server.requests() == 3


@pytest.mark.parametrize("fault", ["500", "truncate", "slow_drop"])
def test_retries_exhausted_is_a_clear_error(server: FaultServer, tmp_path: Path, fault: str) -> None:
    server.program("/data/file.bin", *[fault] * 3)
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match=r"failed after 3 attempt\(s\).*mirror") as caught:
        download_file(server.url + "/data/file.bin", dest, PIN, retries=2, backoff_seconds=0.01, timeout_seconds=0.3, deadline_seconds=30.0)
    assert server.url + "/data/file.bin" in str(caught.value)
    assert server.requests() == 3
    assert not dest.exists() and leftovers(tmp_path) == []


def test_404_is_not_retried_and_names_url_status_and_fix(server: FaultServer, tmp_path: Path) -> None:
    url = server.url + "/data/missing.bin"
    with pytest.raises(DownloadError) as caught:
        download_file(url, tmp_path / "missing.bin", PIN, **FAST)
    message = str(caught.value)
    assert url in message and "404" in message and "download.mirror" in message and "download.dataset" in message
    assert server.requests() == 1
    assert list(tmp_path.iterdir()) == []


def test_backoff_is_exponential(server: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(download.time, "sleep", sleeps.append)
    server.program("/data/file.bin", "500", "500", "500")
    download_file(server.url + "/data/file.bin", tmp_path / "f", PIN, retries=3, backoff_seconds=0.5, timeout_seconds=5, deadline_seconds=30.0)
    assert sleeps == [0.5, 1.0, 2.0]


def test_connection_refused_is_retried_then_reported(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadError, match=r"after 2 attempt\(s\)"):
        download_file(f"http://127.0.0.1:{port}/x", tmp_path / "x", PIN, retries=1, backoff_seconds=0.01, timeout_seconds=2, deadline_seconds=30.0)
    assert not (tmp_path / "x").exists()


def test_unpinned_network_download_is_refused(server: FaultServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="unpinned"):
        download_file(server.url + "/data/file.bin", tmp_path / "f", "", **FAST)
    assert server.requests() == 0


def test_local_path_and_file_url_are_copied_and_verified(tmp_path: Path) -> None:
    source = tmp_path / "src" / "file.bin"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    download_file(str(source), tmp_path / "a", PIN, **FAST)
    download_file(source.as_uri(), tmp_path / "b", PIN, **FAST)
    download_file(str(source), tmp_path / "c", "", **FAST)  # local files may be unpinned
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == (tmp_path / "c").read_bytes() == PAYLOAD
    with pytest.raises(DownloadError, match=f"SHA-256 mismatch.*bad file is at {source}"):
        download_file(str(source), tmp_path / "d", "0" * 64, **FAST)
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.corrupt").exists()  # the source is the evidence


def test_missing_local_file_is_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download.time, "sleep", lambda seconds: pytest.fail("a missing file must not be retried"))
    with pytest.raises(DownloadError, match="no such file.*download.mirror"):
        download_file(str(tmp_path / "nope.gz"), tmp_path / "out.gz", PIN, **FAST)


def test_progress_bar_on_a_large_file_does_not_change_the_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = PAYLOAD * 300  # ~4.7 MiB: above the progress-bar threshold
    monkeypatch.setattr(download.sys.stderr, "isatty", lambda: True, raising=False)
    with FaultServer({"/big": big}) as running:
        download_file(running.url + "/big", tmp_path / "big", hashlib.sha256(big).hexdigest(), **FAST)
    assert (tmp_path / "big").read_bytes() == big


@pytest.mark.parametrize(
    ("mirror", "expected"),
    [
        ("", "https://example.org/pub/train-images-idx3-ubyte.gz"),
        ("http://127.0.0.1:8000/mnist", "http://127.0.0.1:8000/mnist/train-images-idx3-ubyte.gz"),
        ("https://mirror.example/base/", "https://mirror.example/base/train-images-idx3-ubyte.gz"),
        ("file:///srv/data/", "file:///srv/data/train-images-idx3-ubyte.gz"),
        ("/srv/data", "/srv/data/train-images-idx3-ubyte.gz"),
    ],
)
def test_resolve_url(mirror: str, expected: str) -> None:
    assert resolve_url("https://example.org/pub/train-images-idx3-ubyte.gz", mirror) == expected


def test_resolve_url_refuses_unknown_schemes() -> None:
    with pytest.raises(DownloadError, match="unsupported URL scheme 'ftp://'"):
        resolve_url("https://example.org/a.gz", "ftp://mirror.example/")


def test_env_mirror_overrides_params(monkeypatch: pytest.MonkeyPatch) -> None:
    assert effective_mirror("/from/params") == "/from/params"
    monkeypatch.setenv("TAPEWORK_MIRROR", "http://127.0.0.1:9/env")
    assert effective_mirror("/from/params") == "http://127.0.0.1:9/env"


# --- safe_extract -------------------------------------------------------------------------------


def make_tar(path: Path, members: list[tuple[str, str, str]]) -> Path:
    """members: (name, kind, content-or-link-target) with kind 'file', 'symlink' or 'hardlink'."""
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                data = value.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = value
                tar.addfile(info)
    return path


def test_safe_extract_accepts_an_ordinary_archive(tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "ok.tar.gz",
        [("top/a.txt", "file", "alpha"), ("top/sub/b.txt", "file", "beta"), ("top/link", "symlink", "a.txt")],
    )
    files = safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out/top/a.txt").read_text() == "alpha"
    assert (tmp_path / "out/top/sub/b.txt").read_text() == "beta"
    assert (tmp_path / "out/top/link").read_text() == "alpha"
    assert sorted(files) == [tmp_path / "out/top/a.txt", tmp_path / "out/top/sub/b.txt"]


@pytest.mark.parametrize(
    ("members", "problem"),
    [
        ([("good.txt", "file", "x"), ("../evil.txt", "file", "pwned")], "traversal"),
        ([("top/../../evil.txt", "file", "pwned")], "traversal"),
        ([("/tmp/tapework-evil-absolute.txt", "file", "pwned")], "absolute path"),
        ([("link", "symlink", "../../outside")], "outside"),
        ([("link", "symlink", "/etc/passwd")], "absolute"),
        ([("hard", "hardlink", "../outside.txt")], "outside"),
        ([("hard", "hardlink", "/etc/passwd")], "absolute"),
    ],
)
def test_safe_extract_refuses_escaping_members_and_writes_nothing(
    tmp_path: Path, members: list[tuple[str, str, str]], problem: str
) -> None:
    archive = make_tar(tmp_path / "evil.tar.gz", members)
    dest = tmp_path / "sandbox" / "out"
    dest.mkdir(parents=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DataError, match=f"refusing to extract member .*{problem}") as caught:
        safe_extract(archive, dest)
    assert str(archive) in str(caught.value) and "download it again" in str(caught.value)
    assert list(dest.iterdir()) == []  # every member is checked before anything is written
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing beside the sandbox either
    assert [p.name for p in dest.parent.iterdir()] == ["out"]
    assert not Path("/tmp/tapework-evil-absolute.txt").exists()


def test_safe_extract_rejects_a_non_archive(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.tar.gz"
    bogus.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="not a valid tar archive"):
        safe_extract(bogus, tmp_path / "out")


# --- limits: deadline, pinned size, disk full, leftovers of killed runs (issue 16, item A) ---------


def test_trickling_mirror_is_given_up_at_the_deadline_with_progress_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One byte every 0.1 s never trips the 2 s read timeout; only the per-file deadline ends it."""
    monkeypatch.setattr(download, "PROGRESS_LOG_SECONDS", 0.5)
    caplog.set_level("INFO", logger="tapework.download")
    with FaultServer({"/data/file.bin": PAYLOAD}, trickle_seconds=0.1) as running:
        running.program("/data/file.bin", "trickle")
        started = time.monotonic()
        with pytest.raises(DownloadError, match=r"not complete within download\.deadline_seconds = 2 s .*raise download\.deadline_seconds") as caught:
            download_file(running.url + "/data/file.bin", tmp_path / "file.bin", PIN, retries=2, backoff_seconds=0.01, timeout_seconds=2.0, deadline_seconds=2.0, size=len(PAYLOAD))
        elapsed = time.monotonic() - started
    assert "\n" not in str(caught.value)
    assert 2.0 <= elapsed < 4.5  # the deadline, overshot by at most one read
    progress = [record.getMessage() for record in caplog.records if "gives up in" in record.getMessage()]
    assert len(progress) >= 2 and all("file.bin: " in line and "of 16.4 kB" in line for line in progress), progress
    assert list(tmp_path.iterdir()) == []  # nothing kept, no partial file


def test_headers_sent_one_byte_at_a_time_are_given_up_at_the_deadline(tmp_path: Path) -> None:
    """urlopen reads the status line and headers itself; one byte every 0.1 s of them (~90 bytes)
    never trips the 2 s read timeout, so only the deadline's watchdog ends the request."""
    with FaultServer({"/data/file.bin": PAYLOAD}, trickle_seconds=0.1) as running:
        running.program("/data/file.bin", "trickle_headers")
        started = time.monotonic()
        with pytest.raises(DownloadError, match=r"not complete within download\.deadline_seconds = 1\.5 s \(the response headers had not all arrived\)") as caught:
            download_file(running.url + "/data/file.bin", tmp_path / "file.bin", PIN, retries=2, backoff_seconds=0.01, timeout_seconds=2.0, deadline_seconds=1.5, size=len(PAYLOAD))
        elapsed = time.monotonic() - started
        assert running.requests("/data/file.bin") == 1  # the deadline was spent: no retry
    assert "\n" not in str(caught.value)
    assert 1.5 <= elapsed < 3.0
    assert list(tmp_path.iterdir()) == []


def test_headers_sent_one_byte_at_a_time_within_the_deadline_still_download(tmp_path: Path) -> None:
    """The watchdog stops only what overruns: the same slow headers with time to spare give the file."""
    with FaultServer({"/data/file.bin": PAYLOAD}, trickle_seconds=0.005) as running:
        running.program("/data/file.bin", "trickle_headers")
        path = download_file(running.url + "/data/file.bin", tmp_path / "file.bin", PIN, retries=0, backoff_seconds=0.01, timeout_seconds=2.0, deadline_seconds=30.0, size=len(PAYLOAD))
    assert path.read_bytes() == PAYLOAD


def test_body_longer_than_the_pinned_size_is_cut_off_and_kept_nowhere(tmp_path: Path) -> None:
    """No Content-Length and 20 MB of body for a 16 KiB pin: reading stops one byte past the pin."""
    with FaultServer({"/data/file.bin": PAYLOAD}, oversize_bytes=20_000_000) as running:
        running.program("/data/file.bin", "oversize")
        with pytest.raises(DownloadError, match=r"sent more than the pinned 16,384 bytes \(Content-Length absent\); stopped there and kept nothing"):
            download_file(running.url + "/data/file.bin", tmp_path / "file.bin", PIN, size=len(PAYLOAD), **FAST)
        assert running.requests() == 1  # a wrong body is a content problem: not retried
    assert list(tmp_path.iterdir()) == []  # no oversized .corrupt copy, no partial file


def test_content_length_other_than_the_pinned_size_is_refused_before_the_body(server: FaultServer, tmp_path: Path) -> None:
    server.files["/data/other.bin"] = PAYLOAD * 3
    with pytest.raises(DownloadError, match=r"has a Content-Length of 49,152 bytes but the pinned file has 16,384; nothing was downloaded"):
        download_file(server.url + "/data/other.bin", tmp_path / "file.bin", PIN, size=len(PAYLOAD), **FAST)
    assert list(tmp_path.iterdir()) == [] and server.requests() == 1


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(server: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = open

    class FullDisk:
        def __init__(self, stream):
            self.stream = stream

        def write(self, chunk):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.stream, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

    monkeypatch.setattr(download, "open", lambda path, mode="r", *args, **kwargs: FullDisk(real_open(path, mode, *args, **kwargs)) if "w" in mode else real_open(path, mode, *args, **kwargs), raising=False)
    with pytest.raises(DownloadError, match=r"cannot write .* \(disk full\): No space left on device; nothing was kept\. Free space there, or set TAPEWORK_CACHE") as caught:
        download_file(server.url + "/data/file.bin", tmp_path / "file.bin", PIN, size=len(PAYLOAD), **FAST)
    assert "\n" not in str(caught.value) and list(tmp_path.iterdir()) == []


def test_cache_that_cannot_hold_files_is_one_line_naming_tapework_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    regular = tmp_path / "a-file"
    regular.write_text("not a folder")
    monkeypatch.setenv("TAPEWORK_CACHE", str(regular / "cache"))
    with pytest.raises(EnvironmentSettingError, match=r"TAPEWORK_CACHE='.*a-file/cache' cannot hold downloads \(Not a directory\): set TAPEWORK_CACHE to a writable folder, or unset it"):
        prepare_cache()
    monkeypatch.setenv("TAPEWORK_CACHE", str(tmp_path / "cache"))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(download.tempfile, "TemporaryFile", read_only)  # as on a read-only mount
    with pytest.raises(EnvironmentSettingError, match=r"cannot hold downloads \(Read-only file system\)"):
        prepare_cache()


@pytest.mark.parametrize(
    ("mirror", "problem"),
    [
        ("http://[::1/mnist", "Invalid IPv6 URL"),
        ("http://127.0.0.1:abc/mnist", "Port could not be cast to integer value"),
        ("http:///mnist", "no host name"),
        ("ftp://mirror.example/", "unsupported URL scheme 'ftp://'"),
        ("http://host/with space/", "it contains a space or control character"),
        ("file://server/share", "file:// URLs name a local folder"),
    ],
)
def test_malformed_mirror_is_one_line_naming_where_it_was_set(monkeypatch: pytest.MonkeyPatch, mirror: str, problem: str) -> None:
    monkeypatch.setenv("TAPEWORK_MIRROR", mirror)
    with pytest.raises(EnvironmentSettingError, match=rf"TAPEWORK_MIRROR='.*' is not a usable mirror \({re.escape(problem)}.*or unset it\.$"):
        effective_mirror("")
    monkeypatch.delenv("TAPEWORK_MIRROR")
    with pytest.raises(DownloadError, match=rf"download\.mirror = '.*' is not a usable mirror \({re.escape(problem)}"):
        effective_mirror(mirror)


KILLED_FETCH = """
import dataclasses, json, sys
from tapework import catalogue
from tapework.datasets import fetch_dataset
from tests.conftest import make_params
url, pin, size, raw = sys.argv[1:]
spec = catalogue.DATASETS["california_housing"]
catalogue.DATASETS["california_housing"] = dataclasses.replace(spec, files=(catalogue.RemoteFile("cal_housing.data", None, pin, int(size)),))
params = dataclasses.replace(make_params().download, dataset="california_housing", mirror=url, retries=0, timeout_seconds=30.0)
fetch_dataset(params, raw)
"""


def test_leftovers_of_a_sigkilled_download_are_cleared_next_run_but_a_live_runs_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real SIGKILLs of download subprocesses: each leaves its staging folder and its cache .partial
    behind; the next fetch removes them, except those of a run still alive (flock-ed, tapework.io.held_temp)."""
    spec = DATASETS["california_housing"]
    monkeypatch.setitem(DATASETS, "california_housing", dataclasses.replace(spec, files=(RemoteFile("cal_housing.data", None, PIN, len(PAYLOAD)),)))
    raw, cache = tmp_path / "data" / "raw", tmp_path / "cache"
    params = dataclasses.replace(make_params().download, dataset="california_housing", retries=0)

    def leftovers() -> set[Path]:
        return set(raw.parent.glob(".raw.*")) | set(cache.rglob(".*.partial"))

    def start_stuck_fetch(server: FaultServer, others: set[Path]) -> tuple[subprocess.Popen, set[Path]]:
        """A fetch that stays inside its download (a trickling body); returns it and its own temp entries."""
        server.program("/m/cal_housing.data", "trickle")
        child = subprocess.Popen([sys.executable, "-c", KILLED_FETCH, server.url + "/m", PIN, str(len(PAYLOAD)), str(raw)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while len(leftovers() - others) < 2 or server.sent["/m/cal_housing.data"] < 2:
            assert child.poll() is None, child.stderr.read()
            assert time.monotonic() < deadline, "the child never started its download"
            time.sleep(0.05)
        own = leftovers() - others
        assert sorted(path.suffix for path in own) == [".partial", ".staging"]
        return child, own

    with FaultServer({"/m/cal_housing.data": PAYLOAD}, trickle_seconds=0.05) as server:
        killed, dead = start_stuck_fetch(server, set())
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        assert leftovers() == dead  # SIGKILL ran no `finally`: both stay behind
        live, alive = start_stuck_fetch(server, dead)
        try:
            assert leftovers() == alive  # the live run cleared the dead run's entries as it started
            fetch_dataset(dataclasses.replace(params, mirror=server.url + "/m"), raw)  # served whole this time
            assert leftovers() == alive and live.poll() is None  # a live run's entries are never taken
        finally:
            os.kill(live.pid, signal.SIGKILL)
            live.wait()
        fetch_dataset(dataclasses.replace(params, mirror=server.url + "/m"), raw)
    assert leftovers() == set()
    assert (raw / "cal_housing.data").read_bytes() == PAYLOAD
