"""A loopback HTTP server for tests: serves files per path, counts requests, injects programmed faults.

    with FaultServer({"/a.bin": b"..."}) as server:
        server.program("/a.bin", "500", "truncate")  # 1st request 500, 2nd truncated, then good
        download_file(server.url + "/a.bin", ...)
        assert server.requests("/a.bin") == 3
"""

from __future__ import annotations

import collections
import http.server
import socketserver
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

# good: the file; corrupt: one byte flipped; truncate: full Content-Length, half the body, then close;
# 404 / 500: that status; slow_drop: headers and a few bytes, a stall of `stall_seconds`, then close;
# trickle: full Content-Length, then one byte every `trickle_seconds` (never stalls long enough for a read timeout);
# oversize: no Content-Length, the file followed by filler up to `oversize_bytes` in all, then close;
# trickle_headers: the status line and headers one byte every `trickle_seconds`, then the whole body.
FAULTS = ("good", "corrupt", "truncate", "404", "500", "slow_drop", "trickle", "oversize", "trickle_headers")


class FaultServer:
    def __init__(
        self,
        files: dict[str, bytes | Path] | None = None,
        *,
        stall_seconds: float = 1.0,
        trickle_seconds: float = 0.5,
        oversize_bytes: int = 300_000_000,
    ) -> None:
        self.files: dict[str, bytes | Path] = dict(files or {})
        self.stall_seconds = stall_seconds
        self.trickle_seconds = trickle_seconds
        self.oversize_bytes = oversize_bytes
        self.sent: collections.Counter[str] = collections.Counter()  # body bytes written per path
        self.stopping = threading.Event()
        self._faults: dict[str, collections.deque[str]] = collections.defaultdict(collections.deque)
        self._counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)  # port 0: the OS picks a free port
        self._httpd.fault_server = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def add_folder(self, prefix: str, folder: Path) -> None:
        """Serve every file of `folder` under `prefix` (e.g. '/mnist')."""
        for path in Path(folder).iterdir():
            if path.is_file():
                self.files[f"{prefix.rstrip('/')}/{path.name}"] = path

    def program(self, path: str, *faults: str) -> None:
        """Queue faults for the next requests of `path`; once the queue is empty, requests are served good."""
        unknown = set(faults) - set(FAULTS)
        assert not unknown, f"unknown fault(s) {unknown}; use {FAULTS}"
        with self._lock:
            self._faults[path].extend(faults)

    def requests(self, path: str | None = None) -> int:
        """Requests seen for `path`, or in total."""
        with self._lock:
            return self._counts[path] if path else sum(self._counts.values())

    def _next_fault(self, path: str) -> str:
        with self._lock:
            self._counts[path] += 1
            queue = self._faults[path]
            return queue.popleft() if queue else "good"

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()  # ends trickle and oversize bodies still being written
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class _Server(http.server.ThreadingHTTPServer):
    fault_server: FaultServer

    def server_bind(self) -> None:
        # Skip HTTPServer.server_bind's socket.getfqdn(): a reverse DNS lookup that can stall offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that time out and hang up are part of the tests


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        state = self.server.fault_server
        path = unquote(urlsplit(self.path).path)
        fault = state._next_fault(path)
        content = state.files.get(path)
        if fault in ("404", "500") or content is None:
            self.send_error(500 if fault == "500" else 404)
            return
        data = content.read_bytes() if isinstance(content, Path) else content
        if fault == "trickle_headers":  # the status line and headers one byte at a time, then the body
            head = f"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            for index in range(len(head)):
                if state.stopping.is_set():
                    return
                self._send(path, head[index : index + 1])
                time.sleep(state.trickle_seconds)
            self._send(path, data)
            self.close_connection = True
            return
        if fault == "corrupt":
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if fault != "oversize":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "truncate":
            self._send(path, data[: len(data) // 2])
        elif fault == "slow_drop":
            self._send(path, data[: min(len(data) // 2, 1024)])
            time.sleep(state.stall_seconds)
        elif fault == "trickle":
            for index in range(len(data)):
                if state.stopping.is_set():
                    break
                self._send(path, data[index : index + 1])
                time.sleep(state.trickle_seconds)
        elif fault == "oversize":
            self._send(path, data)
            filler = bytes(1 << 20)
            remaining = state.oversize_bytes - len(data)
            while remaining > 0 and not state.stopping.is_set():
                self._send(path, filler[:remaining])
                remaining -= len(filler)
        else:
            self._send(path, data)
        self.close_connection = True  # truncate / slow_drop / oversize: the close is what ends the body

    def _send(self, path: str, chunk: bytes) -> None:
        self.wfile.write(chunk)
        self.wfile.flush()
        with self.server.fault_server._lock:
            self.server.fault_server.sent[path] += len(chunk)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the http.server API
        pass
