"""Quiet, honest stage logs (tapework/quiet.py via stages/__init__.py) and the progress bar's running metrics."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tapework.quiet import LOG_LEVEL_VARIABLE, NOISE, SWITCH_VARIABLE, NoiseFilter
from tests.conftest import ROOT, run, stage_command, tool_env, update_params

# The records NOISE drops, verbatim as TensorFlow 2.21 wrote them on the project's machine.
NOISE_SAMPLES = {
    "absl preamble": b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    "oneDNN notice": (
        b"I0000 00:00:1795662003.041248    1970 port.cc:153] oneDNN custom operations are on. You may see slightly different "
        b"numerical results due to floating-point round-off errors from different computation orders. To turn them off, set the "
        b"environment variable `TF_ENABLE_ONEDNN_OPTS=0`.\n"
    ),
    "remapper bug: no kernel for an empty op": (
        b"W0000 00:00:1795662061.065139    4681 graph_view.cc:850] No registered '' OpKernel for CPU devices compatible with node "
        b"{{node while/body/_1/while/cond_1/then/_183/while/cond_1/residual_mlp_1/residual_block_1/Relu}}\n"
        b"\t.  Registered:  <no registered kernels>\n\n"
    ),
    "remapper bug: TFG rejects the empty op": (
        b"E0000 00:00:1795662061.074639    4681 tfg_optimizer_hook.cc:135] tfg_optimizer{any(tfg-consolidate-attrs,tfg-toposort,"
        b"tfg-shape-inference{graph-version=0},tfg-prepare-attrs-export)} failed: INVALID_ARGUMENT: Node "
        b"while/body/_1/while/cond_1/then/_183/while/cond_1/residual_mlp_1/residual_block_1/Relu has an empty op name\n"
        b"\twhen importing GraphDef to MLIR module in GrapplerHook\n"
    ),
    "TFLite converter: ignored output_format": (
        b"W0000 00:00:1795664709.207107   22085 tf_tfl_flatbuffer_helpers.cc:364] Ignored output_format.\n"
    ),
    "TFLite converter: ignored drop_control_dependency": (
        b"W0000 00:00:1795664709.207160   22085 tf_tfl_flatbuffer_helpers.cc:367] Ignored drop_control_dependency.\n"
    ),
    "LiteRT delegate notice": b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n",
    "remapper bug: optimisation skipped": (
        b"W0000 00:00:1795662061.085730    4681 optimize_function_graph_utils.cc:634] Ignoring multi-device function optimization "
        b"failure: INVALID_ARGUMENT: Node 'while/body/_1/while/cond_1/then/_183/while/cond_1/residual_mlp_1/residual_block_1/Relu' "
        b"does not specify an operation\n"
    ),
}

# Written only by the export stage's TFLite conversion and check (tests/test_export_pipeline.py sees them go).
EXPORT_RECORDS = {"TFLite converter: ignored output_format", "TFLite converter: ignored drop_control_dependency", "LiteRT delegate notice"}

# Look-alikes that are not those records: every byte of them must come through.
KEPT = [
    b"W0000 00:00:1795662720.323333   24326 op_kernel.cc:1858] OP_REQUIRES failed at whole_file_read_ops.cc:117 : NOT_FOUND: x\n",
    b"\tan indented line of its own\n",  # follows a dropped record in the stream below, but is not its continuation
    b"W0000 00:00:1795662058.473328    4734 assert_op.cc:39] Ignoring Assert operator check_labels/Assert/Assert\n",
    # Another TFG failure: kept, and so is its continuation line.
    b"E0000 00:00:1795662061.074639    4681 tfg_optimizer_hook.cc:135] tfg_optimizer{any(tfg-toposort)} failed: INTERNAL: other\n"
    b"\twhen importing GraphDef to MLIR module in GrapplerHook\n",
    b"I0000 00:00:1795662003.082401    1970 cpu_feature_guard.cc:227] This TensorFlow binary is optimized ...\n",
    b"quoted: oneDNN custom operations are on. You may see slightly different numerical results\n",
    b"\n",
    b"\xff\xfe not UTF-8 \x00 bytes\r\n",
]

# The TensorFlow bug behind residual_mlp's graph-optimizer errors, reduced to plain TensorFlow. With
# oneDNN on (the default on x86), Grappler's remapper fuses MatMul + BiasAdd + Add + Relu into a node
# without an op; TF_ENABLE_ONEDNN_OPTS=0 makes the messages go away.
REMAPPER_BUG = """
import tensorflow as tf

kernel = tf.Variable(tf.ones([8, 8]))
bias = tf.Variable(tf.zeros([8]))


@tf.function
def residual(x):
    return tf.nn.relu(x + tf.nn.bias_add(tf.matmul(x, kernel), bias))


print(residual(tf.ones([4, 8])).numpy().sum())
"""

# A stage-like process: the stages package first (as `python -m stages.<verb>` imports it), then
# TensorFlow, one log line of our own, the remapper bug and a real warning.
TENSORFLOW_SCRIPT = (
    """
import logging
import stages
logging.basicConfig(level="INFO", format="%(name)s %(message)s")
logging.getLogger("tapework").info("a stage log line")
"""
    + REMAPPER_BUG
    + """
try:
    tf.io.read_file("/nonexistent/tapework-quiet-check")
except tf.errors.NotFoundError:
    print("not found, as expected")
"""
)


def filtered(data: bytes, chunk: int) -> bytes:
    noise_filter = NoiseFilter()
    out = b"".join(noise_filter.feed(data[start : start + chunk]) for start in range(0, len(data), chunk))
    return out + noise_filter.flush()


def test_every_noise_rule_has_a_verbatim_sample():
    assert [noise.name for noise in NOISE] == list(NOISE_SAMPLES)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_filter_drops_exactly_the_known_records_whatever_the_chunking(chunk):
    samples = list(NOISE_SAMPLES.values())
    # Each kept line follows a dropped record, so continuation handling is exercised both ways.
    parts: list[bytes] = []
    for index, kept in enumerate(KEPT):
        parts += [samples[index % len(samples)], kept]
    data = b"".join(parts) + b"a last line without newline"
    assert filtered(data, chunk) == b"".join(KEPT) + b"a last line without newline"


def test_filter_forwards_a_partial_line_on_flush_but_not_a_partial_noise_record():
    noise_filter = NoiseFilter()
    assert noise_filter.feed(b"progress 50%") == b""
    assert noise_filter.flush() == b"progress 50%"
    preamble = NOISE_SAMPLES["absl preamble"].rstrip(b"\n")
    assert noise_filter.feed(preamble) == b"" and noise_filter.flush() == b""


def test_filter_passes_a_long_line_without_newline_on_as_it_comes():
    noise_filter = NoiseFilter()
    blob = b"x" * 300_000
    passed = [noise_filter.feed(blob[start : start + 4096]) for start in range(0, len(blob), 4096)]
    assert any(passed[:-1])  # forwarded before the end, not held back whole
    assert b"".join(passed) + noise_filter.flush() == blob


def tensorflow_run(**env: str) -> subprocess.CompletedProcess:
    """TENSORFLOW_SCRIPT in a fresh process, without TF_CPP_MIN_LOG_LEVEL unless given."""
    environment = tool_env(**env)
    if LOG_LEVEL_VARIABLE not in env:
        environment.pop(LOG_LEVEL_VARIABLE, None)
    result = subprocess.run([sys.executable, "-c", TENSORFLOW_SCRIPT], cwd=ROOT, env=environment, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-4000:]
    return result


def matched_rules(stderr: bytes) -> set[str]:
    lines = stderr.split(b"\n")
    return {noise.name for noise in NOISE if any(noise.first.match(line) for line in lines)}


@pytest.mark.slow
def test_tensorflow_noise_is_filtered_and_real_warnings_and_own_logs_stay():
    quiet = tensorflow_run()
    raw = tensorflow_run(**{SWITCH_VARIABLE: "0"})
    # Without the filter every known record really occurs: the rules match what TensorFlow writes,
    # and TensorFlow still has the remapper bug (when this fails after an upgrade, drop its rules).
    assert matched_rules(raw.stderr) == set(NOISE_SAMPLES) - EXPORT_RECORDS, raw.stderr.decode(errors="replace")
    assert matched_rules(quiet.stderr) == set(), quiet.stderr.decode(errors="replace")
    for text in (b"oneDNN custom operations", b"absl::InitializeLog", b"empty op name", b"does not specify an operation"):
        assert text not in quiet.stderr
    for result in (quiet, raw):
        assert b"cpu_feature_guard" not in result.stderr and b"XLA service" not in result.stderr  # INFO is off by default
        assert re.search(rb"^W\d{4} .*op_kernel\.cc:\d+\] OP_REQUIRES failed at .*NOT_FOUND", result.stderr, re.M), result.stderr
        assert b"tapework a stage log line\n" in result.stderr
        assert result.stdout == quiet.stdout  # the filter never touches stdout
    assert b"not found, as expected" in quiet.stdout


def test_users_log_level_wins():
    """A TF_CPP_MIN_LOG_LEVEL the user set is kept; without one, stages use 1 (INFO off, warnings on)."""
    script = "import stages, os; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"
    assert run([sys.executable, "-c", script], ROOT, **{LOG_LEVEL_VARIABLE: "3"}).stdout == "3\n"
    environment = tool_env()
    environment.pop(LOG_LEVEL_VARIABLE, None)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environment, capture_output=True, text=True, check=True)
    assert result.stdout == "1\n"


def test_stages_package_runs_before_tensorflow_is_imported():
    """`python -m stages.train` imports the stages package (which sets the log level and installs the
    filter) before the stage module, and that package imports no TensorFlow or Keras itself."""
    result = run([sys.executable, "-X", "importtime", "-m", "stages.train", "--help"], ROOT)
    names = [line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:") and "|" in line]
    framework = [index for index, name in enumerate(names) if name.split(".")[0] in ("tensorflow", "keras")]
    assert framework, "the train stage no longer imports TensorFlow: this test checks nothing"
    assert "stages" in names and "tapework.quiet" in names
    assert names.index("stages") < framework[0], f"imported before the stages package: {names[framework[0]]}"


# C-level writes to fd 2 (as TensorFlow's C++ makes them) around Python's own stderr use.
BIG = bytes(range(256)) * 800  # 200 kB with every byte value (as ROBUSTNESS_SCRIPT writes it): more than a pipe holds
ROBUSTNESS_SCRIPT = """
import os, signal, sys, time
import stages
case = sys.argv[1]
if case == "interrupt":
    # As the train stage does: a suite started as a background job starts its children with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        os.write(1, b"ready\\n")
        time.sleep(60)
    except KeyboardInterrupt:
        os.write(2, b"after the interrupt\\n")
        sys.exit(130)
print("python's own stderr line", file=sys.stderr)
os.write(2, b"c line before\\n")
os.write(2, {noise!r})
os.write(2, bytes(range(256)) * 800 + b"\\n")
if case == "abort":
    os.write(2, b"last words before abort\\n")
    os.abort()
if case == "traceback":
    raise RuntimeError("boom")
os.write(2, b"a partial last line")
"""


def robustness_command(case: str) -> list[str]:
    script = ROBUSTNESS_SCRIPT.format(noise=NOISE_SAMPLES["oneDNN notice"] + NOISE_SAMPLES["absl preamble"])
    return [sys.executable, "-c", script, case]


@pytest.mark.parametrize("target", ["pipe", "file"])
def test_filter_forwards_every_other_byte_to_a_pipe_or_a_file(target, tmp_path):
    if target == "pipe":
        result = subprocess.run(robustness_command("exit"), cwd=ROOT, env=tool_env(), capture_output=True, timeout=60)
        stderr = result.stderr
    else:
        with open(tmp_path / "stderr", "wb") as file:
            result = subprocess.run(robustness_command("exit"), cwd=ROOT, env=tool_env(), stdout=subprocess.PIPE, stderr=file, timeout=60)
        stderr = (tmp_path / "stderr").read_bytes()
    assert result.returncode == 0
    python_line = b"python's own stderr line\n"
    assert stderr.count(python_line) == 1  # Python's stderr bypasses the filter, so it may come before or after C's lines
    assert stderr.replace(python_line, b"") == b"c line before\n" + BIG + b"\n" + b"a partial last line"


def in_order(expected: bytes, stderr: bytes) -> bool:
    """Whether the lines of `expected` occur in `stderr` in that order, maybe with other lines between
    (Python's own lines reach stderr by another path, so they may fall between C's lines)."""
    lines = iter(stderr.split(b"\n"))
    return all(any(line == wanted for line in lines) for wanted in expected.split(b"\n"))


@pytest.mark.parametrize("case", ["abort", "traceback"])
def test_nothing_is_lost_when_the_process_dies(case):
    result = subprocess.run(robustness_command(case), cwd=ROOT, env=tool_env(), capture_output=True, timeout=60)
    assert in_order(b"c line before\n" + BIG + b"\n", result.stderr) and b"oneDNN" not in result.stderr
    if case == "abort":
        assert result.returncode == -signal.SIGABRT
        assert b"last words before abort\n" in result.stderr  # written just before abort(): the filter outlives the process
    else:
        assert result.returncode == 1
        assert in_order(b"Traceback (most recent call last):\nRuntimeError: boom", result.stderr)


def test_filter_survives_ctrl_c_to_the_process_group():
    process = subprocess.Popen(robustness_command("interrupt"), cwd=ROOT, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert process.stdout.readline() == b"ready\n"
        time.sleep(0.5)  # into the sleep
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the stage and the filter both get it
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert b"after the interrupt\n" in stderr


def read_terminal(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> bytes:
    """Run `command` with a pseudo-terminal (120 columns) as stdin, stdout and stderr; returns everything it drew."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # tqdm draws nothing on a 0-column terminal
    process = subprocess.Popen(command, cwd=cwd, env=env, stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True)
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every holder of the terminal has closed it
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(timeout=30) == 0, output.decode(errors="replace")[-4000:]
    finally:
        process.kill()
        os.close(controller)
    return output


@pytest.mark.slow
def test_progress_bar_shows_running_loss_and_accuracy_on_a_terminal_only(repo_copy):
    update_params(repo_copy / "params.yaml", {"train.epochs": 2, "train.steps_per_execution": 8})
    for stage in ("download", "preprocess"):
        run(stage_command(stage, repo_copy), repo_copy)
    environment = tool_env()
    environment.pop(LOG_LEVEL_VARIABLE, None)  # as a user's shell has it
    drawn = read_terminal(stage_command("train", repo_copy), repo_copy, environment)
    bars = [frame for frame in re.split(rb"[\r\n]", drawn) if frame.startswith(b"epoch ")]
    assert any(re.search(rb"\d+/\d+ \[.*, loss=\d+\.\d{4}, accuracy=\d+\.\d{4}\]", frame) for frame in bars), drawn.decode(errors="replace")
    with_bar = {name: (repo_copy / name).read_bytes() for name in ("models/model.weights.npz", "metrics/train.json")}

    # Without a terminal: no bar, and reading the metrics for the bar changed nothing.
    for folder in ("models", "checkpoints", "logs"):
        shutil.rmtree(repo_copy / folder)
    piped = subprocess.run(stage_command("train", repo_copy), cwd=repo_copy, env=environment, capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert "step/s" not in piped.stderr and "loss=" not in piped.stderr
    # The real stage, quiet: its own lines and nothing of TensorFlow's start-up.
    assert "tapework.training INFO epoch 2/2" in piped.stderr and "tapework INFO trained 2 epochs" in piped.stderr
    assert not matched_rules(piped.stderr.encode()) and "oneDNN" not in piped.stderr and "cpu_feature_guard" not in piped.stderr, piped.stderr
    for name, content in with_bar.items():
        assert (repo_copy / name).read_bytes() == content, f"{name} differs between the run with a progress bar and without"
