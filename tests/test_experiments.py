"""DVC experiments on tiny data in a throwaway copy of the repo: `dvc exp run -S`, `dvc exp show`
columns, the celery queue with two workers, and DVC's repo lock against a concurrent `dvc repro`."""

import csv
import hashlib
import io
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tools.repro_gate.compare import flatten, lock_outs
from tests.conftest import run, tool_env, update_params
from tests.test_tensorboard import run_folders

METRICS_FILES = {"metrics/train.json", "metrics/evaluate.json", "metrics/repeats.json"}
METRIC_KEYS = {
    "metrics/train.json": {"best_epoch", "epochs_run", "parameters", "stopped_early", "train.accuracy", "train.huber", "train.loss", "val.accuracy", "val.huber", "val.loss"},
    "metrics/evaluate.json": {"test.accuracy", "test.huber", "test.loss", "test.macro_f1"},
}
# The aggregate over the seeds' runs: one run by default, which has no spread: the count only.
METRIC_KEYS["metrics/repeats.json"] = {"seeds"}
# Keys that only the provenance JSONs hold: they are plain outs and must never become metrics columns.
PROVENANCE_KEYS = ("cpu", "packages", "data_sha256", "model_sha256", "params_sha256", "params_section", "dataset", "seed")


def exp_show(repo: Path) -> list[dict]:
    return json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)


def experiments(show: list[dict]) -> dict[str, dict]:
    """Experiment name -> its row (`rev`, `name`, `data`, `error`) from `dvc exp show --json`."""
    found = {}
    for baseline in show:
        for group in baseline.get("experiments") or []:
            for row in group.get("revs", []):
                found[row.get("name") or group.get("name") or row["rev"]] = row
    return found


def metric_values(row: dict) -> dict[str, dict]:
    return {name: flatten(entry["data"]) for name, entry in row["data"]["metrics"].items()}


def param_values(row: dict) -> dict:
    return flatten(row["data"]["params"]["params.yaml"]["data"])


def check_metrics_complete(name: str, row: dict, epochs: int) -> dict[str, dict]:
    assert not row.get("error"), f"{name}: {row['error']}"
    values = metric_values(row)
    assert set(values) == METRICS_FILES, f"{name}: metrics files {sorted(values)}"
    for file_name, keys in METRIC_KEYS.items():
        assert set(values[file_name]) == keys, f"{name}: {file_name} has {sorted(values[file_name])}"
        for key, value in values[file_name].items():
            assert isinstance(value, bool) or math.isfinite(value), f"{name}: {file_name} {key} = {value}"
    assert values["metrics/train.json"]["epochs_run"] == epochs
    return values


def git_bytes(repo: Path, rev: str, path: str) -> bytes:
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, check=True).stdout


def check_commit_matches_its_lock(repo: Path, rev: str) -> None:
    """The experiment's commit holds the metrics files whose md5 its own dvc.lock records: the
    results were written whole by that run, not mixed with another worker's."""
    outs = lock_outs(yaml.safe_load(git_bytes(repo, rev, "dvc.lock")))
    for path in ("metrics/train.json", "metrics/evaluate.json", "metrics/train_history.tsv", "metrics/report.tsv"):
        assert hashlib.md5(git_bytes(repo, rev, path)).hexdigest() == outs[path], f"{rev[:7]}: {path} does not match its dvc.lock"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_exp_run_set_param_and_show_columns_without_clashes(repo_copy):
    result = run(["dvc", "exp", "run", "-S", "train.learning_rate=0.003"], repo_copy)
    name = result.stdout.split("Ran experiment(s):")[1].split()[0]
    assert yaml.safe_load((repo_copy / "params.yaml").read_text())["train"]["learning_rate"] == 0.003  # applied to the workspace

    found = experiments(exp_show(repo_copy))
    assert name in found, f"{name} not in {sorted(found)}"
    values = check_metrics_complete(name, found[name], epochs=3)
    params = param_values(found[name])
    assert params["train.learning_rate"] == 0.003 and params["train.epochs"] == 3

    # Only metrics/train.json and metrics/evaluate.json are metrics; the provenance JSONs are outs.
    metric_columns = set().union(*values.values())
    assert not any(column.split(".")[0] in PROVENANCE_KEYS for column in metric_columns)
    # dvc exp show flattens metric and param names into one namespace. No name may be both.
    # The `train.` prefix is shared, though: train.loss (metric, training split) vs
    # train.learning_rate (param, train stage), and train.huber (metric) vs train.huber_delta (param).
    assert not metric_columns & set(params)
    assert {column for column in metric_columns if column.startswith("train.")} == {"train.accuracy", "train.huber", "train.loss"}

    table = list(csv.reader(io.StringIO(run(["dvc", "exp", "show", "--csv"], repo_copy).stdout)))
    header, rows = table[0], table[1:]
    assert len(header) == len(set(header)), f"duplicate columns: {sorted(c for c in header if header.count(c) > 1)}"
    assert metric_columns | {"train.learning_rate", "train.huber_delta"} <= set(header)
    assert not [column for column in header if column.split(".")[0] in PROVENANCE_KEYS]
    assert "metrics/train.provenance.json" not in header and "metrics/evaluate.provenance.json" not in header
    row = next(row for row in rows if row[0] == name)
    assert float(row[header.index("train.learning_rate")]) == 0.003
    assert float(row[header.index("test.loss")]) == values["metrics/evaluate.json"]["test.loss"]
    # Both kinds resolve without ambiguity when sorting by name.
    run(["dvc", "exp", "show", "--csv", "--sort-by", "train.loss"], repo_copy)
    run(["dvc", "exp", "show", "--csv", "--sort-by", "train.learning_rate"], repo_copy)


def queue_states(repo: Path) -> dict[str, str]:
    """Experiment name -> Queued/Running/Success/Failed from `dvc queue status`."""
    states = {}
    for line in run(["dvc", "queue", "status"], repo).stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] != "Task" and not line.startswith("Worker"):
            states[parts[1]] = parts[-1]
    return states


def processes_in(repo: Path) -> list[int]:
    """PIDs whose working directory is inside `repo`: the queue workers and their runs. The repo
    is this test's own temp folder, so these are processes this test started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd == str(repo) or cwd.startswith(f"{repo}/"):
                pids.append(int(entry.name))
    return pids


def stop_queue(repo: Path) -> None:
    try:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=tool_env(), capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 30
    while processes_in(repo) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in processes_in(repo):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.tier2
@pytest.mark.timeout(600)
def test_queue_with_two_workers_finishes_both_experiments_intact(repo_copy):
    rates = {"lr-002": 0.002, "lr-004": 0.004}
    # As docs/comparing-runs.md says: the stages every queued run shares have run once before the
    # workers start, so the workers restore them from DVC's run cache. Two workers that both run and
    # save the same stage race in DVC 3.67's run cache (one deletes the other's half-written entry).
    run(["dvc", "repro", "preprocess"], repo_copy)
    try:
        for name, rate in rates.items():
            run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.learning_rate={rate}"], repo_copy)
        assert queue_states(repo_copy) == {name: "Queued" for name in rates}
        run(["dvc", "queue", "start", "-j", "2"], repo_copy)
        deadline = time.monotonic() + 480
        while True:
            states = queue_states(repo_copy)
            if all(states.get(name) in ("Success", "Failed") for name in rates):
                break
            assert time.monotonic() < deadline, f"queue not done after 480 s: {states}"
            time.sleep(3)
        failed = [name for name in rates if states[name] != "Success"]
        logs = {name: run(["dvc", "queue", "logs", name], repo_copy, check=False).stdout[-3000:] for name in failed}
        assert not failed, f"queued experiments failed: {states}\n" + "\n".join(f"--- dvc queue logs {n}:\n{text}" for n, text in logs.items())
        for name in rates:
            log = run(["dvc", "queue", "logs", name], repo_copy).stdout
            for stage in ("download", "preprocess"):
                assert f"Running stage '{stage}'" not in log, f"{name} ran {stage} instead of restoring it:\n{log[-3000:]}"

        found = experiments(exp_show(repo_copy))
        results = {}
        for name, rate in rates.items():
            assert name in found, f"{name} not in dvc exp show: {sorted(found)}"
            results[name] = check_metrics_complete(name, found[name], epochs=3)
            assert param_values(found[name])["train.learning_rate"] == rate
            check_commit_matches_its_lock(repo_copy, found[name]["rev"])
        first, second = (results[name] for name in rates)
        assert first != second
        # Queued runs execute in temporary copies; their TensorBoard runs land in this workspace's logs/.
        logged = run_folders(repo_copy)
        assert {name: logged.get(name) for name in rates} == {name: [1, 2, 3] for name in rates}, logged
        for file_name, keys in METRIC_KEYS.items():
            for key in keys - {"best_epoch", "epochs_run", "parameters", "stopped_early"}:
                if key == "seeds":
                    continue  # the aggregate's count of runs
                assert first[file_name][key] != second[file_name][key], f"{file_name} {key} equal in both experiments"
    finally:
        stop_queue(repo_copy)
    assert not processes_in(repo_copy)


@pytest.mark.slow
@pytest.mark.tier2
@pytest.mark.timeout(400)
def test_second_repro_while_one_runs_gets_the_lock_error_and_the_first_completes(repo_copy, tmp_path):
    epochs = 100  # about 15 s of training on tiny data: the second repro gives up on the lock after 3 s
    update_params(repo_copy / "params.yaml", {"train.epochs": epochs})
    with open(tmp_path / "first.out", "w") as out, open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen(["dvc", "repro"], cwd=repo_copy, env=tool_env(), stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list(repo_copy.glob("checkpoints/*/ckpt-1.index")):  # the train stage has begun (one folder per run)
            assert first.poll() is None, f"first repro ended early:\n{(tmp_path / 'first.err').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "train never wrote its first checkpoint"
            time.sleep(0.1)
        second = run(["dvc", "repro"], repo_copy, check=False, timeout=120)
        assert first.poll() is None, "the first repro finished before the second tried the lock: raise `epochs`"
        assert second.returncode != 0, second.stdout
        # DVC releases the repo lock (.dvc/tmp/lock) while a stage command runs and guards the
        # stage's deps and outs with .dvc/tmp/rwlock instead. So the second repro gets either
        # error, depending on timing. While train runs it is the rwlock one, naming the first's PID.
        if "Unable to acquire lock" in second.stderr:
            assert "another DVC process is running" in second.stderr, second.stderr
        else:
            assert "is busy, it is being blocked by" in second.stderr and f"(PID {first.pid})" in second.stderr, second.stderr
            assert ".dvc/tmp/rwlock" in second.stderr, second.stderr
        assert "Running stage" not in second.stdout

        assert first.wait(timeout=300) == 0, (tmp_path / "first.err").read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert json.loads((repo_copy / "metrics/train.json").read_text())["epochs_run"] == epochs
    assert json.loads((repo_copy / "metrics/evaluate.json").read_text())["test"]["accuracy"] > 0.5
    assert json.loads(run(["dvc", "status", "--json"], repo_copy).stdout) == {}  # every output matches dvc.lock
