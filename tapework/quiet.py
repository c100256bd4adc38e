"""Quiet, honest logs for the stage processes: TensorFlow's C++ INFO chatter off, a few known lines dropped.

`quiet_stage_process()` runs first in every stage process (stages/__init__.py), before TensorFlow
is imported:

* It sets `TF_CPP_MIN_LOG_LEVEL` to 1 unless the user set it: TensorFlow's C++ INFO lines
  (CPU feature guard, XLA service start-up, "Compiled cluster using XLA!") go, its warnings and
  errors stay.
* Some lines ignore that level or are known to be harmless (`NOISE` below). They are written by
  C++ straight to file descriptor 2, so fd 2 is routed through a pipe to a small filter process
  that drops exactly the records in `NOISE` and forwards every other byte unchanged. Python's own
  `sys.stderr` (logging, tqdm, tracebacks) is rebound to the original stderr and bypasses the
  filter, so `sys.stderr.isatty()` still tells whether a terminal is attached.

The filter is a process, not a thread: if the stage dies (a C++ CHECK failure, abort, SIGKILL)
the filter still forwards what was written before, then exits when the pipe closes. It ignores
SIGINT and SIGTERM for that reason (Ctrl-C reaches the whole process group), keeps draining the
pipe even when its own output fails (so the stage can never block on a full pipe), and a stage
that exits normally waits for it to finish, so no line arrives after the stage has ended.

`TAPEWORK_STDERR_FILTER=0` turns the filter off (every byte reaches stderr unfiltered).

The filter process runs this file as a script with `python -I -S`, so its top level imports only
small standard modules (it starts beside every stage); the stage side imports the rest when it
installs the filter.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys
from collections.abc import MutableMapping

LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
# 1 = drop INFO, keep WARNING, ERROR and FATAL (0 shows everything, 2 hides warnings, 3 hides errors).
DEFAULT_LOG_LEVEL = "1"
SWITCH_VARIABLE = "TAPEWORK_STDERR_FILTER"  # "0" turns the filter off
# A partial line (no newline yet) is forwarded after this long without more bytes.
PARTIAL_LINE_SECONDS = 0.2
# At a normal exit the stage waits at most this long for the filter to drain; longer only when a
# subprocess the stage started still holds the pipe (the filter then ends when that one does).
EXIT_WAIT_SECONDS = 5.0
READ_SIZE = 65536
# A line growing past this without a newline is forwarded as it is: no known record is that long.
MAX_PENDING = 65536

# The prefix absl puts before each C++ log record: severity, date, time, thread id, file:line.
_ABSL = rb"%s\d{4} \S+ +\d+ %s:\d+\] "


def _record(severity: bytes, source: bytes, message: bytes) -> re.Pattern[bytes]:
    return re.compile(_ABSL % (severity, re.escape(source)) + message + rb"$")


class Noise:
    """A known stderr record: its first line, and the lines that continue it (if any)."""

    __slots__ = ("name", "first", "continuation")

    def __init__(self, name: str, first: re.Pattern[bytes], continuation: re.Pattern[bytes] | None = None) -> None:
        self.name = name
        self.first = first
        self.continuation = continuation


NOISE = (
    # absl's one-time preamble, once per TensorFlow shared library that logs; no level hides it.
    Noise("absl preamble", re.compile(rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$")),
    # Printed at import on x86 whatever TF_CPP_MIN_LOG_LEVEL says. Turning oneDNN off
    # (TF_ENABLE_ONEDNN_OPTS=0) would change the results, so only the notice goes.
    Noise("oneDNN notice", _record(rb"I", b"port.cc", rb"oneDNN custom operations are on\. .*")),
    # TensorFlow bug, three records per traced function: with oneDNN on, Grappler's remapper matches
    # MatMul + BiasAdd + Add + Relu (residual_mlp's relu(x + Dense(x)) in the inference graphs:
    # validation and evaluate) but sets the fused node's op only for convolutions, leaving it empty.
    # TensorFlow then drops that function's Grappler rewrites and runs it as traced: measured, the same
    # outputs bit for bit and the same speed as with the remapper switched off. Reproduction: REMAPPER_BUG in
    # tests/test_quiet.py, which also fails once a TensorFlow upgrade fixes it (then delete these).
    Noise(
        "remapper bug: no kernel for an empty op",
        _record(rb"W", b"graph_view.cc", rb"No registered '' OpKernel for \S+ devices compatible with node \{\{node \S+\}\}"),
        re.compile(rb"(\t\.  Registered:  <no registered kernels>)?$"),
    ),
    Noise(
        "remapper bug: TFG rejects the empty op",
        _record(rb"E", b"tfg_optimizer_hook.cc", rb"tfg_optimizer\{.*\} failed: INVALID_ARGUMENT: Node \S+ has an empty op name"),
        re.compile(rb"\twhen importing GraphDef to MLIR module in GrapplerHook$"),
    ),
    # The TFLite converter (export stage) reports two options it ignores for SavedModel input: the
    # converter's defaults, which the export does not set; and LiteRT's interpreter announces its
    # default CPU delegate at INFO level through its own logger, which TF_CPP_MIN_LOG_LEVEL does not reach.
    Noise("TFLite converter: ignored output_format", _record(rb"W", b"tf_tfl_flatbuffer_helpers.cc", rb"Ignored output_format\.")),
    Noise("TFLite converter: ignored drop_control_dependency", _record(rb"W", b"tf_tfl_flatbuffer_helpers.cc", rb"Ignored drop_control_dependency\.")),
    Noise("LiteRT delegate notice", re.compile(rb"INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.$")),
    Noise(
        "remapper bug: optimisation skipped",
        _record(
            rb"W",
            b"optimize_function_graph_utils.cc",
            rb"Ignoring multi-device function optimization failure: INVALID_ARGUMENT: Node '\S+' does not specify an operation",
        ),
    ),
)


class NoiseFilter:
    """Drops whole `NOISE` records from a byte stream; every other byte passes unchanged, in order."""

    def __init__(self, noise: tuple[Noise, ...] = NOISE) -> None:
        self.noise = noise
        self.pending = b""  # a line without its newline yet
        self._continuation: re.Pattern[bytes] | None = None  # set while inside a dropped record

    def _keep(self, line: bytes) -> bool:
        text = line.rstrip(b"\r\n")
        if self._continuation is not None:
            if self._continuation.match(text):
                return False
            self._continuation = None
        for noise in self.noise:
            if noise.first.match(text):
                self._continuation = noise.continuation
                return False
        return True

    def feed(self, data: bytes) -> bytes:
        """The bytes of `data` (after any pending partial line) to forward now."""
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()
        kept = b"".join(line + b"\n" for line in lines if self._keep(line + b"\n"))
        return kept + self.flush() if len(self.pending) > MAX_PENDING else kept

    def flush(self) -> bytes:
        """The pending partial line, if it is not noise (at the end, or when no more bytes came)."""
        line, self.pending = self.pending, b""
        return line if line and self._keep(line) else b""


def _write_lines(fd: int, data: bytes) -> None:
    """One write per line: Python's own stderr writes the same file, and its lines then land only
    between whole lines of ours, never inside one."""
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end + 1
        view = memoryview(data)[start:end]
        while view:
            view = view[os.write(fd, view) :]
        start = end


def run_filter(source: int = 0, sink: int = 1) -> int:
    """The filter process: read `source` until every writer has closed it, forward to `sink`."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)  # outlive the stage so its last lines still come through
    noise_filter = NoiseFilter()
    sink_ok = True

    def forward(data: bytes) -> None:
        nonlocal sink_ok
        if data and sink_ok:
            try:
                _write_lines(sink, data)
            except OSError:
                sink_ok = False  # nobody reads stderr any more: keep draining so the stage never blocks

    while True:
        ready, _, _ = select.select([source], [], [], PARTIAL_LINE_SECONDS if noise_filter.pending else None)
        if not ready:
            forward(noise_filter.flush())
            continue
        chunk = os.read(source, READ_SIZE)
        if not chunk:
            break
        forward(noise_filter.feed(chunk))
    forward(noise_filter.flush())
    return 0


# While installed: the filter process (a subprocess.Popen), and a duplicate of the stderr the stage was started with.
_installed: tuple[object, int] | None = None


def install_stderr_filter() -> bool:
    """Route fd 2 through the filter process; Python's sys.stderr keeps the original stderr. Idempotent.

    Returns False (and changes nothing) where there is no stderr to filter or no process to start.
    """
    global _installed
    if _installed is not None:
        return True
    if os.name != "posix":
        return False
    import atexit
    import io
    import subprocess  # here, not at the top: the filter process never needs it
    try:
        original = os.dup(2)
    except OSError:
        return False  # started without a stderr
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__)], stdin=read_end, stdout=original, stderr=original, close_fds=True
        )
    except OSError:
        for fd in (read_end, write_end, original):
            os.close(fd)
        return False
    os.close(read_end)
    previous = sys.stderr
    if previous is not None:
        previous.flush()
    os.dup2(write_end, 2)  # C and C++ writes to fd 2 (TensorFlow's logging) now pass the filter
    os.close(write_end)
    encoding = getattr(previous, "encoding", None) or "utf-8"
    errors = getattr(previous, "errors", None) or "backslashreplace"
    sys.stderr = io.TextIOWrapper(open(original, "wb", closefd=False), encoding=encoding, errors=errors, line_buffering=True)
    _installed = (process, original)
    atexit.register(_uninstall)  # registered before TensorFlow's handlers, so it runs after them
    return True


def _uninstall() -> None:
    """Put the original stderr back on fd 2 (closing the pipe) and wait for the filter to drain."""
    global _installed
    if _installed is None:
        return
    import subprocess

    (process, original), _installed = _installed, None
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.dup2(original, 2)
    try:
        process.wait(timeout=EXIT_WAIT_SECONDS)
    except subprocess.TimeoutExpired:
        pass  # a subprocess still holds the pipe: the filter finishes on its own when it closes


def quiet_stage_process(environ: MutableMapping[str, str] | None = None) -> None:
    """TensorFlow's C++ log level (unless set) and the stderr filter (unless switched off), before TensorFlow loads."""
    environ = os.environ if environ is None else environ
    environ.setdefault(LOG_LEVEL_VARIABLE, DEFAULT_LOG_LEVEL)
    if environ.get(SWITCH_VARIABLE, "1") != "0":
        install_stderr_filter()


if __name__ == "__main__":
    sys.exit(run_filter())
