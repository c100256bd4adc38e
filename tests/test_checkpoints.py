"""Retention of the per-run checkpoint folders: the rule, the locks that protect live runs, the
clean-up command, and the train stage applying the rule before it trains."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tapework.checkpoints import LOCK_SUFFIX, hold, lock_path, prune, run_folders
from tapework.params import load_params
from tapework.preprocess import load_prepared
from tapework.runs import run_checkpoint_dir
from tests.conftest import ROOT, make_params, run, stage_command, tool_env, update_params

DAY = 86_400.0
NOW = 1_800_000_000.0  # a fixed "now": ages below are exact


def make_run(root: Path, name: str, age_days: float, *, epoch: int | None = 3, now: float = NOW) -> Path:
    """A run folder like CheckpointStore leaves, its files last written `age_days` before `now`."""
    folder = root / name
    folder.mkdir(parents=True)
    files = [folder / "ckpt-3.index", folder / "ckpt-3.data-00000-of-00001"]
    if epoch is not None:
        (folder / "checkpoint").write_text(f'model_checkpoint_path: "ckpt-{epoch}"\nall_model_checkpoint_paths: "ckpt-{epoch}"\n')
        files.append(folder / "checkpoint")
    for index, path in enumerate(files[:2]):
        path.write_bytes(b"x" * (100 + index))
    stamp = now - age_days * DAY
    for path in files:
        os.utime(path, (stamp, stamp))
    return folder


def names(root: Path) -> set[str]:
    return {path.name for path in root.iterdir()} if root.is_dir() else set()


def removal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith("removed checkpoint folder")]


def test_folders_older_than_keep_days_are_removed_one_line_each(tmp_path, caplog):
    for name, age in (("mlp-fresh", 1), ("mlp-old", 40), ("cnn-older", 45.5), ("mlp-month", 29)):
        make_run(tmp_path, name, age)
    with caplog.at_level("INFO", logger="tapework"):
        removed = prune(tmp_path, 0, 30, now=NOW)
    assert {removal.folder.path.name for removal in removed} == {"mlp-old", "cnn-older"}
    assert names(tmp_path) == {"mlp-fresh", "mlp-month"}
    lines = removal_lines(caplog)
    assert len(lines) == 2
    assert any(f"{tmp_path / 'cnn-older'} (last written 45.5 days ago" in line and line.endswith("older than keep_days = 30") for line in lines), lines
    assert any(f"{tmp_path / 'mlp-old'} (last written 40.0 days ago" in line for line in lines), lines


def test_only_the_keep_runs_most_recently_written_stay(tmp_path, caplog):
    for age in range(1, 7):
        make_run(tmp_path, f"mlp-{age}", age)
    with caplog.at_level("INFO", logger="tapework"):
        prune(tmp_path, 2, 0, now=NOW)  # keep_days 0: no age limit
    assert names(tmp_path) == {"mlp-1", "mlp-2"}
    lines = removal_lines(caplog)
    assert len(lines) == 4 and all(line.endswith("not among the keep_runs = 2 most recently written") for line in lines)


def test_zero_for_both_keeps_everything_and_all_removes_everything(tmp_path):
    for age in (1, 100, 1000):
        make_run(tmp_path, f"mlp-{age}", age)
    assert prune(tmp_path, 0, 0, now=NOW) == [] and len(names(tmp_path)) == 3
    assert len(prune(tmp_path, 16, 30, everything=True, now=NOW)) == 3 and names(tmp_path) == set()


def test_the_current_run_is_kept_and_not_counted(tmp_path, caplog):
    current = make_run(tmp_path, "mlp-current", 100)  # oldest of all: a resumed run's own folder
    for age in (1, 2, 50):
        make_run(tmp_path, f"mlp-{age}", age)
    with caplog.at_level("INFO", logger="tapework"):
        prune(tmp_path, 1, 30, current=current, now=NOW)
    assert names(tmp_path) == {"mlp-current", "mlp-1"}
    assert len(removal_lines(caplog)) == 2


def test_the_age_is_the_newest_file_anywhere_in_the_folder(tmp_path):
    folder = make_run(tmp_path, "mlp-touched", 90)
    (folder / "ckpt-4_temp").mkdir()
    fresh = folder / "ckpt-4_temp" / "part"
    fresh.write_bytes(b"y")
    os.utime(fresh, (NOW - DAY, NOW - DAY))
    assert [round(entry.age_days(NOW), 3) for entry in run_folders(tmp_path)] == [1.0]
    assert prune(tmp_path, 0, 30, now=NOW) == []


def test_dry_run_removes_nothing(tmp_path, caplog):
    make_run(tmp_path, "mlp-old", 40)
    with caplog.at_level("INFO", logger="tapework"):
        removed = prune(tmp_path, 0, 30, dry_run=True, now=NOW)
    assert len(removed) == 1 and names(tmp_path) == {"mlp-old"}
    assert [record.getMessage() for record in caplog.records if "would remove" in record.getMessage()]


HOLDER = """
import sys, time
from pathlib import Path
from tapework.checkpoints import hold
with hold(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
print("released", flush=True)
"""


def start_holder(folder: Path, seconds: float = 600) -> subprocess.Popen:
    """Another process holding `folder` as a training run does (the worktree's tapework: cwd is the repo root)."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)], cwd=ROOT, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held", process.stderr.read()
    return process


def test_a_folder_a_live_run_holds_is_kept_until_the_holder_is_killed(tmp_path):
    folder = make_run(tmp_path, "mlp-live", 400)
    make_run(tmp_path, "mlp-dead", 400)
    process = start_holder(folder)
    try:
        removed = prune(tmp_path, 0, 30, now=NOW)
        assert [removal.folder.path.name for removal in removed] == ["mlp-dead"]
        assert names(tmp_path) == {"mlp-live", f"mlp-live{LOCK_SUFFIX}"}
        assert prune(tmp_path, 0, 0, everything=True, now=NOW) == []  # --all too spares it
    finally:
        process.send_signal(signal.SIGKILL)  # no `finally` of its own runs: only the kernel drops the lock
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert [removal.folder.path.name for removal in prune(tmp_path, 0, 30, now=NOW)] == ["mlp-live"]
    assert names(tmp_path) == set()  # its lock file went with it


def test_stray_lock_files_are_removed_unless_held(tmp_path):
    (tmp_path / f"mlp-gone{LOCK_SUFFIX}").write_text("123\n")
    held = tmp_path / "mlp-starting"  # a run that holds its lock but has saved nothing yet
    process = start_holder(held)
    try:
        prune(tmp_path, 16, 30, now=NOW)
        assert names(tmp_path) == {f"mlp-starting{LOCK_SUFFIX}"}
    finally:
        process.kill()
        process.communicate()


def test_a_second_run_of_the_same_folder_waits_for_the_first(tmp_path, caplog):
    folder = tmp_path / "mlp-same"
    process = start_holder(folder, seconds=1.5)
    started = time.monotonic()
    with caplog.at_level("INFO", logger="tapework"), hold(folder):
        waited = time.monotonic() - started
        assert process.stdout.readline().strip() == "released"
    process.communicate()
    assert waited > 0.5, waited
    assert f"checkpoint folder {folder} is in use by another run (pid {process.pid}); waiting for it to end" in caplog.text


def test_retention_never_changes_the_run_folder(tmp_path):
    meta = {"dataset": "digits", "sha256": {"x_train.npy": "0" * 64}}
    folders = {run_checkpoint_dir(tmp_path, make_params(changes).train, meta) for changes in ({}, {"checkpoints.keep_runs": 1, "checkpoints.keep_days": 0.5})}
    assert len(folders) == 1


# --- the command ---------------------------------------------------------------------------------


def command(repo: Path, *arguments: str) -> subprocess.CompletedProcess:
    # From the repository root, so the worktree's tapework is the one imported.
    return subprocess.run([sys.executable, "-m", "tapework.checkpoints", "--repo", str(repo), *arguments], cwd=ROOT, env=tool_env(), capture_output=True, text=True, timeout=60)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """dvc.yaml and params.yaml of this project, keep_runs 2 and keep_days 30, and four run folders under its checkpoints root."""
    repo = tmp_path / "project"
    repo.mkdir()
    (repo / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    update_params(repo / "params.yaml", {"checkpoints.keep_runs": 2, "checkpoints.keep_days": 30})
    now = time.time()
    for name, age, epoch in (("mlp-a", 0.01, 20), ("mlp-b", 1, 7), ("mlp-c", 3, None), ("cnn-d", 40, 2)):
        make_run(repo / "checkpoints", name, age, epoch=epoch, now=now)
    return repo


def test_command_lists_prunes_dry_and_prunes(project):
    root = project / "checkpoints"
    listed = command(project, "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:-1]}
    assert list(rows) == ["mlp-a", "mlp-b", "mlp-c", "cnn-d"]  # most recently written first
    sizes = {name: sum(path.stat().st_size for path in (root / name).iterdir()) for name in rows}
    assert re.search(rf"^mlp-a\s+{sizes['mlp-a']} B\s+20\s+\d+ min ago\s+free$", rows["mlp-a"]), rows["mlp-a"]
    assert re.search(r"^mlp-b .*\s7\s+24\.0 h ago\s+free$", rows["mlp-b"]), rows["mlp-b"]
    assert re.search(rf"^mlp-c\s+{sizes['mlp-c']} B\s+-\s+3\.0 days ago\s+free$", rows["mlp-c"]), rows["mlp-c"]  # no checkpoint file: no epoch
    assert listed.stdout.splitlines()[-1] == f"4 run folder(s), {sum(sizes.values())} B in {root}"

    dry = command(project, "prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert names(root) == {"mlp-a", "mlp-b", "mlp-c", "cnn-d"}
    assert len(re.findall(r"would remove checkpoint folder", dry.stderr)) == 2
    assert "older than keep_days = 30" in dry.stderr and "not among the keep_runs = 2 most recently written" in dry.stderr
    assert dry.stdout.startswith("would remove 2 run folder(s)")

    process = start_holder(root / "mlp-c")  # a live run: kept whatever the rule says
    try:
        pruned = command(project, "prune")
        listed = command(project, "list")
    finally:
        process.kill()
        process.communicate()
    assert pruned.returncode == 0, pruned.stderr
    assert len(re.findall(r"INFO removed checkpoint folder", pruned.stderr)) == 1 and "cnn-d" in pruned.stderr
    assert names(root) == {"mlp-a", "mlp-b", "mlp-c", f"mlp-c{LOCK_SUFFIX}"}
    assert re.search(rf"mlp-c .*in use \(pid {process.pid}\)$", listed.stdout, re.MULTILINE), listed.stdout

    overridden = command(project, "prune", "--keep-runs", "1", "--keep-days", "0")
    assert overridden.returncode == 0 and names(root) == {"mlp-a"}
    assert command(project, "prune", "--all").returncode == 0 and names(root) == set()
    assert command(project, "list").stdout.strip() == f"{root}: no run folders"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("prune", "--keep-runs", "-1"), r"--keep-runs -1 --keep-days 30: both must be 0 \(no limit\) or more"),
        (("prune", "--keep-days", "nan"), r"both must be 0 \(no limit\) or more"),
        (("--repo", "{empty}", "list"), r"dvc.yaml names no `--checkpoints` folder for the train stage; pass --root PATH"),
    ],
)
def test_command_errors_are_one_line_and_exit_2(project, tmp_path, arguments, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = command(project, *(argument.replace("{empty}", str(empty)) for argument in arguments))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and re.search(f"^error: .*{message}", result.stderr), result.stderr


def test_command_reads_its_defaults_from_params_yaml(project):
    update_params(project / "params.yaml", {"checkpoints.keep_runs": -3})
    result = command(project, "prune", "--dry-run")
    assert result.returncode == 2 and "checkpoints.keep_runs = -3 is invalid" in result.stderr
    assert command(project, "prune", "--dry-run", "--keep-runs", "1", "--keep-days", "1").returncode == 0  # both given: params.yaml is not read


# --- the train stage -----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_train_stage_prunes_other_runs_by_the_rule_before_training(repo_copy):
    update_params(repo_copy / "params.yaml", {"checkpoints.keep_runs": 2, "checkpoints.keep_days": 30, "train.epochs": 2, "train.tensorboard": False})
    run(["dvc", "repro", "preprocess"], repo_copy)
    root = repo_copy / "checkpoints"
    params = load_params(repo_copy / "params.yaml")
    own = run_checkpoint_dir(root, params.train, load_prepared(repo_copy / "data/prepared").meta)
    now = time.time()
    make_run(root, own.name, 100, epoch=None, now=now)  # this run's own folder, older than any limit: never removed
    for name, age in (("mlp-recent1", 0.5), ("mlp-recent2", 1), ("mlp-third", 2), ("cnn-old", 60)):
        make_run(root, name, age, now=now)

    result = run(stage_command("train", repo_copy), repo_copy)
    lines = [line for line in result.stderr.splitlines() if "removed checkpoint folder" in line]
    assert len(lines) == 2, result.stderr[-3000:]
    assert any("cnn-old" in line and "older than keep_days = 30" in line for line in lines), lines
    assert any("mlp-third" in line and "not among the keep_runs = 2 most recently written" in line for line in lines), lines
    # Pruning came first: before the first epoch's line.
    assert result.stderr.index("removed checkpoint folder") < result.stderr.index("epoch 1/2")
    assert names(root) == {own.name, f"{own.name}{LOCK_SUFFIX}", "mlp-recent1", "mlp-recent2"}
    assert (own / "ckpt-2.index").is_file()
    assert json.loads((repo_copy / "metrics/train.json").read_text())["epochs_run"] == 2


def test_the_command_imports_no_tensorflow():
    probe = "import sys, tapework.checkpoints; print(sorted({'tensorflow', 'keras'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=tool_env(), capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr
