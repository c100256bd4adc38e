"""Output sets replaced whole (tapework/outputs.py), stage locks, and what a failing train or
evaluate stage leaves in the workspace: the last good outputs, byte for byte."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tapework.errors import TapeworkError
from tapework.outputs import exclusive, journal_path, output_set, recover, staged_path
from tests.conftest import run, stage_command, tool_env, update_params
from tests.test_workflow import snapshot


def make_targets(root: Path) -> list[Path]:
    """A folder and two files in two folders, like the train stage's models/ and metrics/."""
    return [root / "models", root / "metrics" / "train.json", root / "metrics" / "history.tsv"]


def write_set(staged: dict[Path, Path], targets: list[Path], tag: str) -> None:
    folder, first, second = targets
    staged[folder].mkdir()
    (staged[folder] / "weights.bin").write_text(f"weights {tag}")
    staged[first].write_text(f"metrics {tag}")
    staged[second].write_text(f"history {tag}")


def contents(targets: list[Path]) -> list[str]:
    folder, first, second = targets
    return [(folder / "weights.bin").read_text(), first.read_text(), second.read_text()]


def leftovers(root: Path) -> list[str]:
    return sorted(path.relative_to(root).as_posix() for path in root.rglob(".*") if "lock" not in path.name)


def test_a_set_replaces_every_target_together(tmp_path: Path) -> None:
    targets = make_targets(tmp_path)
    for tag in ("old", "new"):
        with output_set("train", targets) as staged:
            write_set(staged, targets, tag)
        assert contents(targets) == [f"weights {tag}", f"metrics {tag}", f"history {tag}"]
    assert leftovers(tmp_path) == []


def test_an_error_while_staging_leaves_the_old_set_and_no_leftovers(tmp_path: Path) -> None:
    targets = make_targets(tmp_path)
    with output_set("train", targets) as staged:
        write_set(staged, targets, "old")
    with pytest.raises(OSError, match="No space"):
        with output_set("train", targets) as staged:
            write_set(staged, targets, "new")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert contents(targets) == ["weights old", "metrics old", "history old"]
    assert leftovers(tmp_path) == []


# Replaces the set in a child process that SIGKILLs itself right after the `after`-th rename.
KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from tapework import outputs
    from tests.test_outputs import make_targets, write_set

    root, after = Path(sys.argv[1]), int(sys.argv[2])
    targets = make_targets(root)
    real_replace, calls = os.replace, [0]

    def replace_then_die(source, destination):
        real_replace(source, destination)
        calls[0] += 1
        if calls[0] == after:
            os.kill(os.getpid(), signal.SIGKILL)

    outputs.os.replace = replace_then_die
    with outputs.output_set("train", targets) as staged:
        write_set(staged, targets, "new")
    """
)


@pytest.mark.parametrize("renames", [1, 2, 3])  # the folder takes two renames (aside, then in), each file one
def test_a_kill_between_renames_is_rolled_forward_by_the_next_run(tmp_path: Path, renames: int) -> None:
    targets = make_targets(tmp_path)
    with output_set("train", targets) as staged:
        write_set(staged, targets, "old")
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path), str(renames)], env=tool_env(), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert journal_path("train", targets).is_file()  # killed mid-commit: the journal says what to finish
    assert recover("train", targets) == "rolled forward"
    assert contents(targets) == ["weights new", "metrics new", "history new"]
    assert leftovers(tmp_path) == []


def test_a_kill_before_the_journal_leaves_the_old_set(tmp_path: Path) -> None:
    targets = make_targets(tmp_path)
    with output_set("train", targets) as staged:
        write_set(staged, targets, "old")
    staged_path(targets[1]).write_text("half")  # what a kill while staging leaves
    (tmp_path / "metrics" / ".train.json.abc.partial").write_text("half")
    assert recover("train", targets) == "cleared"
    assert contents(targets) == ["weights old", "metrics old", "history old"]
    assert leftovers(tmp_path) == []


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tapework.outputs import exclusive
    with exclusive("train", [Path(sys.argv[1]) / "models"]):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_a_second_writer_is_refused_until_the_first_dies(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=tool_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TapeworkError, match=rf"another train run \(PID {holder.pid}\) is writing .*models.*wait for it"):
            with exclusive("train", [tmp_path / "models"]):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs; the kernel drops the lock
        holder.wait()
    with exclusive("train", [tmp_path / "models"]):
        pass


@pytest.fixture
def trained(tiny_trained: Path) -> Path:
    return tiny_trained


@pytest.mark.slow
def test_a_diverging_train_run_keeps_the_last_good_outputs(trained: Path) -> None:
    def results() -> dict[str, bytes]:  # the data stages rerun for the new data set: their outputs may change
        return {name: data for name, data in snapshot(trained).items() if not name.startswith("data/")}

    before = results()
    # Regression with plain SGD at a huge step: the loss overflows in the first epoch (exit 3).
    update_params(trained / "params.yaml", {"download.dataset": "diabetes", "train.optimizer": "sgd", "train.learning_rate": 10.0, "train.momentum": 0.99})
    result = run(["dvc", "repro"], trained, check=False)
    assert "Running stage 'train'" in result.stdout
    assert result.returncode != 0 and "error: non-finite loss" in result.stderr, result.stderr[-2000:]
    assert results() == before
    assert not list(trained.glob(".*.outputs.journal")) and not list(trained.rglob(".*.staged"))


@pytest.mark.slow
def test_a_killed_train_run_keeps_the_last_good_outputs(trained: Path) -> None:
    before = snapshot(trained)
    update_params(trained / "params.yaml", {"train.epochs": 60})
    process = subprocess.Popen(stage_command("train", trained), cwd=trained, env=tool_env(), stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((trained / "checkpoints").glob("*/ckpt-2.index")) and not (trained / "checkpoints" / "ckpt-2.index").exists():
        assert process.poll() is None and time.monotonic() < deadline, "train ended or never checkpointed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert snapshot(trained) == before


@pytest.mark.slow
def test_a_full_disk_during_evaluate_is_one_line_and_changes_nothing(trained: Path) -> None:
    """ENOSPC on the third output the stage writes: one line, exit 2, every output as it was."""
    before = snapshot(trained)
    script = textwrap.dedent(
        """
        import errno, os, runpy, sys
        from tapework import io
        real, calls = io.atomic_write_bytes, [0]
        def full_disk(path, data):
            calls[0] += 1
            if calls[0] == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            real(path, data)
        io.atomic_write_bytes = full_disk
        sys.argv = sys.argv[1:]
        runpy.run_module("stages.evaluate", run_name="__main__")
        """
    )
    command = stage_command("evaluate", trained)
    result = run([sys.executable, "-c", script, *command[2:]], trained, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left on the device" in errors[0] and "Traceback" not in result.stderr
    assert snapshot(trained) == before
    assert not list(trained.rglob(".*.staged")) and not list(trained.rglob(".*.partial"))


@pytest.mark.slow
def test_evaluate_without_the_history_file_changes_nothing(trained: Path) -> None:
    (trained / "metrics" / "train_history.tsv").unlink()
    before = snapshot(trained)
    result = run(stage_command("evaluate", trained), trained, check=False)
    assert result.returncode == 2 and "train_history.tsv is missing: run the train stage first" in result.stderr
    assert snapshot(trained) == before
    assert json.loads((trained / "metrics" / "evaluate.json").read_text())["test"]["accuracy"] > 0


@pytest.mark.parametrize("stage", ["download", "preprocess", "train", "evaluate"])
def test_every_writing_stage_refuses_a_second_writer_with_one_line(repo_copy: Path, stage: str) -> None:
    """While one run of a stage holds its lock, a second one started by hand exits 2 naming the first."""
    command = stage_command(stage, repo_copy)
    options = dict(zip(command[3::2], command[4::2]))
    first_output = {"download": "--raw", "preprocess": "--prepared", "train": "--models", "evaluate": "--metrics"}[stage]
    holder_script = HOLDER.replace('"train", [Path(sys.argv[1]) / "models"]', f'"{stage}", [Path(sys.argv[1])]')
    holder = subprocess.Popen([sys.executable, "-c", holder_script, options[first_output]], cwd=repo_copy, env=tool_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = run(command, repo_copy, check=False)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: another {stage} run (PID {holder.pid})" in result.stderr and "Traceback" not in result.stderr
