"""Reproducibility gate (tools/repro_gate, `python -m tools.repro_gate`): the comparison as pure
functions on dicts, then once end to end on a tiny committed copy of the repo."""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from tapework.io import file_digest
from tests.conftest import ROOT, run, update_params
from tools.repro_gate.compare import (
    MISSING,
    METRIC_ABS_TOLERANCE,
    choose_mode,
    compare,
    compare_metric,
    is_drift,
    lock_inputs,
    lock_outs,
    merge_metrics,
    metrics_files,
    render,
    status_rows,
)

CPU = {"machine": "x86_64", "model": "Some CPU", "flags_sha256": "0123456789abcdef"}


def out(path: str, md5: str) -> dict:
    return {"path": path, "hash": "md5", "md5": md5}


def make_lock() -> dict:
    return {
        "schema": "2.0",
        "stages": {
            "preprocess": {
                "cmd": "python stages/preprocess.py",
                "deps": [out("stages/preprocess.py", "1" * 32)],
                "params": {"params.yaml": {"preprocess": {"seed": 42}}},
                "outs": [out("data/prepared", "2" * 32 + ".dir")],
            },
            "train": {
                "cmd": "python stages/train.py",
                "deps": [out("data/prepared", "2" * 32 + ".dir"), out("stages/train.py", "3" * 32)],
                "params": {"params.yaml": {"train": {"epochs": 20, "learning_rate": 0.001}}},
                "outs": [out("models", "4" * 32 + ".dir"), out("metrics/train.json", "5" * 32)],
            },
        },
    }


# `dvc status --json` in a fresh clone of a commit whose dvc.lock matches make_lock(): the clone
# has no DVC cache, so cached outputs are "not in cache" and the deps they feed are "deleted".
FRESH_CLONE_STATUS = {
    "preprocess": [{"changed outs": {"data/prepared": "not in cache"}}],
    "train": [{"changed deps": {"data/prepared": "deleted"}}, {"changed outs": {"models": "not in cache"}}],
}


def with_status(stage: str, entry: dict) -> dict:
    """FRESH_CLONE_STATUS with one more `dvc status` entry for `stage`."""
    status = json.loads(json.dumps(FRESH_CLONE_STATUS))
    status.setdefault(stage, []).append(entry)
    return status


METRICS = {"metrics/train.json": {"val": {"loss": 0.0718932, "accuracy": 0.979021}, "epochs_run": 20, "stopped_early": False}}


def with_metric(key: str, value) -> dict:
    changed = json.loads(json.dumps(METRICS))
    node = changed["metrics/train.json"]
    *parents, leaf = key.split(".")
    for name in parents:
        node = node[name]
    node[leaf] = value
    return changed


def set_out(lock: dict, path: str, md5: str) -> dict:
    for stage in lock["stages"].values():
        for entry in stage.get("outs", []):
            if entry["path"] == path:
                entry["md5"] = md5
    return lock


def rows_for(mode: str, fresh_lock: dict | None = None, fresh_metrics: dict | None = None, status: dict | None = None, committed_md5: dict | None = None):
    metrics = merge_metrics({}, METRICS, fresh_metrics if fresh_metrics is not None else METRICS)
    return compare(make_lock(), fresh_lock or make_lock(), metrics, mode, status if status is not None else FRESH_CLONE_STATUS, committed_md5)


def fatal_names(rows) -> list[str]:
    return [row.name for row in rows if row.fatal]


@pytest.mark.parametrize("mode", ["exact", "tolerant"])
def test_identical_runs_pass_in_both_modes(mode):
    rows = rows_for(mode)
    assert not is_drift(rows) and all(row.same for row in rows)
    assert {row.section for row in rows} == {"inputs", "committed", "outs", "metrics"}
    text = render(rows, mode, "test")
    assert "REPRODUCED" in text and "DRIFT" not in text and f"mode: {mode}" in text


def test_lock_helpers_see_every_out_and_only_source_deps():
    lock = make_lock()
    assert lock_outs(lock) == {"data/prepared": "2" * 32 + ".dir", "models": "4" * 32 + ".dir", "metrics/train.json": "5" * 32}
    inputs = lock_inputs(lock)
    assert "stages/train.py (train)" in inputs and "params.yaml:train (train)" in inputs
    assert not any(name.startswith("data/prepared") for name in inputs)  # produced by a stage: an output, not an input


def test_the_committed_lock_covers_every_output_declared_in_dvc_yaml():
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    declared = set()
    for stage in dvc_yaml["stages"].values():
        if "matrix" in stage:
            continue  # one stage per seed of repeats.extra_seeds: none in the committed default run
        for kind in ("outs", "metrics", "plots"):
            declared |= {entry if isinstance(entry, str) else next(iter(entry)) for entry in stage.get(kind, [])}
    assert set(lock_outs(yaml.safe_load((ROOT / "dvc.lock").read_text()))) == declared
    assert set(metrics_files(dvc_yaml)) == {"metrics/train.json", "metrics/evaluate.json", "metrics/repeats.json"}


def test_a_dep_folder_holding_other_stages_outputs_counts_as_produced():
    # The aggregate stage depends on `runs`, the folder of every extra seed's outputs.
    lock = make_lock()
    lock["stages"]["train"]["outs"].append(out("runs/seed-7/train.json", "6" * 32))
    lock["stages"]["aggregate"] = {"cmd": "python -m stages.aggregate", "deps": [out("runs", "7" * 32 + ".dir"), out("stages/aggregate.py", "8" * 32)], "outs": []}
    inputs = lock_inputs(lock)
    assert "stages/aggregate.py (aggregate)" in inputs and "runs (aggregate)" not in inputs
    status = {"aggregate": [{"changed deps": {"runs": "modified"}}], "train_seed@7": [{"changed outs": {"runs/seed-7/train.json": "not in cache"}}]}
    assert status_rows(status) == []
    assert [row.name for row in status_rows({"aggregate": [{"changed deps": {"runsx": "modified"}}]})] == ["runsx (aggregate)"]


def test_changed_output_hash_is_drift_in_exact_mode_only():
    fresh = set_out(make_lock(), "models", "f" * 32 + ".dir")
    exact = rows_for("exact", fresh_lock=fresh)
    assert is_drift(exact) and fatal_names(exact) == ["models"]
    text = render(exact, "exact", "same CPU kind")
    assert "DRIFT" in text and "! models" in text and "md5 differs" in text and "hint:" in text

    tolerant = rows_for("tolerant", fresh_lock=fresh)
    assert not is_drift(tolerant)
    text = render(tolerant, "tolerant", "CPU kind differs")
    assert "REPRODUCED" in text and "models" in text and "not fatal" in text and "1 tolerated" in text


def test_metric_within_tolerance_passes_tolerant_but_not_exact():
    fresh = with_metric("val.loss", METRICS["metrics/train.json"]["val"]["loss"] + METRIC_ABS_TOLERANCE / 10)
    assert not is_drift(rows_for("tolerant", fresh_metrics=fresh))
    exact = rows_for("exact", fresh_metrics=fresh)
    assert fatal_names(exact) == ["metrics/train.json: val.loss"]


@pytest.mark.parametrize("mode", ["exact", "tolerant"])
def test_metric_beyond_tolerance_is_drift_and_named(mode):
    fresh = with_metric("val.accuracy", 0.95)
    rows = rows_for(mode, fresh_metrics=fresh)
    assert fatal_names(rows) == ["metrics/train.json: val.accuracy"]
    text = render(rows, mode, "test")
    line = next(line for line in text.splitlines() if "val.accuracy" in line)
    assert line.startswith("! metrics/train.json: val.accuracy") and "0.979021" in line and "0.95" in line and "-0.029" in line
    assert text.splitlines()[1].split() == ["file", "or", "metric", "committed", "fresh", "difference"]
    assert text.splitlines()[-2].startswith("DRIFT: 1 of") and "val.accuracy" in text.splitlines()[-2]


@pytest.mark.parametrize(("key", "value"), [("epochs_run", 19), ("stopped_early", True)])
def test_counts_and_flags_must_match_even_in_tolerant_mode(key, value):
    assert fatal_names(rows_for("tolerant", fresh_metrics=with_metric(key, value))) == [f"metrics/train.json: {key}"]


def test_missing_metric_or_output_is_drift_in_both_modes():
    fresh_metrics = json.loads(json.dumps(METRICS))
    del fresh_metrics["metrics/train.json"]["val"]["loss"]
    fresh_lock = make_lock()
    fresh_lock["stages"]["train"]["outs"].pop()  # metrics/train.json no longer an output
    for mode in ("exact", "tolerant"):
        rows = rows_for(mode, fresh_lock=fresh_lock, fresh_metrics=fresh_metrics)
        assert fatal_names(rows) == ["metrics/train.json", "metrics/train.json: val.loss"]
        assert "missing in fresh run" in render(rows, mode, "test")


@pytest.mark.parametrize("mode", ["exact", "tolerant"])
def test_stale_lock_inputs_are_drift_in_both_modes(mode):
    fresh = make_lock()
    fresh["stages"]["train"]["deps"][1]["md5"] = "9" * 32  # stages/train.py changed after the lock was written
    fresh["stages"]["train"]["params"]["params.yaml"]["train"]["epochs"] = 3
    # What dvc status prints for that in the clone (shape of real dvc 3.67 output).
    status = {
        **FRESH_CLONE_STATUS,
        "train": [
            {"changed deps": {"stages/train.py": "modified", "data/prepared": "deleted", "params.yaml": {"train": "modified"}}},
            {"changed outs": {"models": "not in cache"}},
        ],
    }
    rows = rows_for(mode, fresh_lock=fresh, status=status)
    assert fatal_names(rows) == ["params.yaml:train (train)", "stages/train.py (train)"]
    text = render(rows, mode, "test")
    assert "committed dvc.lock is stale" in text and "(4 more entries, all the same)" in text
    assert "hint: the committed dvc.lock was written for other code or params" in text

    # Outputs of a stale stage differ as a consequence: the hint says so instead of "nondeterminism".
    set_out(fresh, "models", "f" * 32 + ".dir")
    text = render(compare(make_lock(), fresh, merge_metrics({}, METRICS, METRICS), mode, status), mode, "test")
    assert ("expected while the lock is stale" in text) == (mode == "exact")


def test_committed_file_that_does_not_match_the_lock_is_drift():
    status = with_status("train", {"changed outs": {"metrics/train.json": "modified"}})
    rows = rows_for("tolerant", status=status, committed_md5={"metrics/train.json": "e" * 32})
    assert fatal_names(rows) == ["metrics/train.json"]
    text = render(rows, "tolerant", "test")
    assert "committed file does not match dvc.lock" in text
    assert "! metrics/train.json" in text and "555555555555…" in text and "eeeeeeeeeeee…" in text  # lock md5, committed bytes' md5
    assert "hint: a committed output does not match the committed dvc.lock" in text


def test_committed_section_holds_the_git_held_outputs_only():
    # Cached outputs are "not in cache" in a fresh clone: the outputs comparison checks them.
    rows = rows_for("exact")
    assert [row.name for row in rows if row.section == "committed"] == ["metrics/train.json"]
    assert "(1 entries, all the same)" in render(rows, "exact", "test")


def test_committed_file_missing_from_the_commit_is_drift():
    status = with_status("train", {"changed outs": {"metrics/train.json": "deleted"}})
    rows = rows_for("exact", status=status)
    assert fatal_names(rows) == ["metrics/train.json"]
    assert "missing in the commit" in render(rows, "exact", "test")


# Real `dvc status --json` output of dvc 3.67, in a fresh clone of a tiny committed run of this
# project (no DVC cache there), before `dvc repro`.
REAL_STATUS_CONSISTENT = {
    "download": [{"changed outs": {"data/raw": "not in cache"}}],
    "preprocess": [{"changed deps": {"data/raw": "deleted"}}, {"changed outs": {"data/prepared": "not in cache"}}],
    "train": [{"changed deps": {"data/prepared": "deleted"}}, {"changed outs": {"models": "not in cache"}}],
    "evaluate": [{"changed deps": {"data/prepared": "deleted", "models": "deleted"}}],
}
# After editing stages/train.py, train.epochs in params.yaml, and test.accuracy in the committed
# metrics/evaluate.json.
REAL_STATUS_STAGE_PARAM_METRICS = {
    "download": [{"changed outs": {"data/raw": "not in cache"}}],
    "preprocess": [{"changed deps": {"data/raw": "deleted"}}, {"changed outs": {"data/prepared": "not in cache"}}],
    "train": [
        {"changed deps": {"stages/train.py": "modified", "data/prepared": "deleted", "params.yaml": {"train": "modified"}}},
        {"changed outs": {"models": "not in cache"}},
    ],
    "evaluate": [{"changed deps": {"data/prepared": "deleted", "models": "deleted"}}, {"changed outs": {"metrics/evaluate.json": "modified"}}],
}
# After deleting the committed metrics/report.tsv and editing tapework/io.py (a dep of every stage).
REAL_STATUS_DELETED_OUT_SHARED_DEP = {
    "download": [{"changed deps": {"tapework/io.py": "modified"}}, {"changed outs": {"data/raw": "not in cache"}}],
    "preprocess": [{"changed deps": {"tapework/io.py": "modified", "data/raw": "deleted"}}, {"changed outs": {"data/prepared": "not in cache"}}],
    "train": [{"changed deps": {"tapework/io.py": "modified", "data/prepared": "deleted"}}, {"changed outs": {"models": "not in cache"}}],
    "evaluate": [
        {"changed deps": {"tapework/io.py": "modified", "data/prepared": "deleted", "models": "deleted"}},
        {"changed outs": {"metrics/report.tsv": "deleted"}},
    ],
}
# After changing evaluate's cmd in dvc.yaml.
REAL_STATUS_COMMAND = {
    "download": [{"changed outs": {"data/raw": "not in cache"}}],
    "preprocess": [{"changed deps": {"data/raw": "deleted"}}, {"changed outs": {"data/prepared": "not in cache"}}],
    "train": [{"changed deps": {"data/prepared": "deleted"}}, {"changed outs": {"models": "not in cache"}}],
    "evaluate": [{"changed deps": {"data/prepared": "deleted", "models": "deleted"}}, "changed command"],
}
# After adding a dep (tapework/training.py), a param (train.seed) and `always_changed: true` to evaluate.
REAL_STATUS_NEW_DEP_PARAM = {
    "download": [{"changed outs": {"data/raw": "not in cache"}}],
    "preprocess": [{"changed deps": {"data/raw": "deleted"}}, {"changed outs": {"data/prepared": "not in cache"}}],
    "train": [{"changed deps": {"data/prepared": "deleted"}}, {"changed outs": {"models": "not in cache"}}],
    "evaluate": [
        {"changed deps": {"data/prepared": "deleted", "models": "deleted", "tapework/training.py": "modified", "params.yaml": {"train.seed": "new"}}},
        "always changed",
    ],
}


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({}, []),  # `dvc status --json` where the workspace matches dvc.lock and the cache holds every output
        (REAL_STATUS_CONSISTENT, []),
        (
            REAL_STATUS_STAGE_PARAM_METRICS,
            [
                ("committed", "metrics/evaluate.json", "committed file does not match dvc.lock"),
                ("inputs", "params.yaml:train (train)", "differs: committed dvc.lock is stale"),
                ("inputs", "stages/train.py (train)", "differs: committed dvc.lock is stale"),
            ],
        ),
        (
            REAL_STATUS_DELETED_OUT_SHARED_DEP,
            [("committed", "metrics/report.tsv", "missing in the commit (dvc.lock lists it)")]
            + [("inputs", f"tapework/io.py ({stage})", "differs: committed dvc.lock is stale") for stage in ("download", "evaluate", "preprocess", "train")],
        ),
        (REAL_STATUS_COMMAND, [("inputs", "cmd (evaluate)", "differs: committed dvc.lock is stale")]),
        (
            REAL_STATUS_NEW_DEP_PARAM,
            [
                ("inputs", "params.yaml:train.seed (evaluate)", "new: committed dvc.lock is stale"),
                ("inputs", "tapework/training.py (evaluate)", "differs: committed dvc.lock is stale"),
            ],
        ),
    ],
    ids=["empty", "consistent", "stage-param-metrics", "deleted-out-shared-dep", "command", "new-dep-param"],
)
def test_status_rows_read_real_dvc_status_json(status, expected):
    rows = status_rows(status)
    assert [(row.section, row.name, row.difference) for row in rows] == expected
    assert all(row.fatal for row in rows)


def test_status_rows_leave_out_deps_that_a_stage_produces():
    # evaluate reads metrics/train_history.tsv, which train writes: the outputs comparison covers it.
    status = {"evaluate": [{"changed deps": {"metrics/train_history.tsv": "modified", "stages/evaluate.py": "modified"}}]}
    assert [row.name for row in status_rows(status, produced={"metrics/train_history.tsv"})] == ["stages/evaluate.py (evaluate)"]
    assert len(status_rows(status)) == 2


def test_gate_md5_of_committed_files_matches_dvc_lock():
    """The md5 the gate shows for a committed file is the one dvc writes into dvc.lock."""
    outs = lock_outs(yaml.safe_load((ROOT / "dvc.lock").read_text()))
    for name in ("metrics/train.json", "metrics/evaluate.json"):
        assert file_digest(ROOT / name, "md5") == outs[name]


def test_merge_metrics_reads_dvc_metrics_diff_json_and_fills_gaps_from_raw_json():
    dvc_diff = {"metrics/evaluate.json": {"test.loss": {"old": 0.5, "new": 0.25, "diff": -0.25}, "test.f1": {"old": 0.5, "new": "x"}}}
    merged = merge_metrics(dvc_diff, {"metrics/evaluate.json": {"test": {"loss": 0.5, "accuracy": 0.9}}}, {"metrics/evaluate.json": {"test": {"loss": 0.25}}})
    assert merged == {"metrics/evaluate.json": {"test.loss": (0.5, 0.25), "test.f1": (0.5, "x"), "test.accuracy": (0.9, MISSING)}}
    assert compare_metric(0.5, "x", "tolerant") == ("differs", True)
    assert compare_metric(float("nan"), float("nan"), "exact") == ("same", False)


def test_choose_mode_by_cpu_kind():
    assert choose_mode("auto", CPU, dict(CPU))[0] == "exact"
    mode, reason = choose_mode("auto", CPU, {**CPU, "flags_sha256": "fedcba9876543210"})
    assert mode == "tolerant" and "CPU kind differs" in reason and "fedcba9876543210" in reason
    assert choose_mode("auto", None, CPU)[0] == "tolerant"
    assert choose_mode("exact", CPU, {**CPU, "model": "Other"})[0] == "exact"
    assert choose_mode("tolerant", CPU, CPU)[0] == "tolerant"
    with pytest.raises(ValueError):
        choose_mode("loose", CPU, CPU)


def commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message], repo)


def gate_cli(repo: Path, tmp_path: Path, *args: str):
    return run([sys.executable, "-m", "tools.repro_gate", "--repo", str(repo), *args], ROOT, check=False, timeout=400, TMPDIR=str(tmp_path))


@pytest.mark.slow
@pytest.mark.tier2
@pytest.mark.timeout(900)
def test_gate_end_to_end_reproduced_then_tampered_then_broken(tiny_trained, tmp_path):
    repo_copy = tiny_trained  # a tiny run's outputs, not yet committed
    missing = gate_cli(repo_copy, tmp_path)  # nothing committed to compare against yet
    assert missing.returncode == 2 and "no dvc.lock in the commit" in missing.stdout, missing.stdout

    commit(repo_copy, "tiny run")
    good = gate_cli(repo_copy, tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "mode: exact" in good.stdout and "REPRODUCED" in good.stdout
    ran = re.search(r"dvc repro --force ran (.+) in [0-9.]+ s", good.stdout).group(1).split(", ")
    assert sorted(ran) == sorted(name for name, stage in yaml.safe_load((repo_copy / "dvc.yaml").read_text())["stages"].items() if "matrix" not in stage)  # every stage (no per-seed stage: extra_seeds is []), even with its git-tracked outputs unchanged
    assert "metrics/evaluate.json: test.accuracy" in good.stdout and "models" in good.stdout

    # Two faults in one commit, each reported on its own: a committed metric edited by hand, and
    # code edited after dvc.lock was written.
    metrics_path = repo_copy / "metrics/evaluate.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["test"]["accuracy"] += 0.01
    metrics_path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    with open(repo_copy / "stages/evaluate.py", "a") as stream:
        stream.write("# edited after dvc.lock was written\n")
    commit(repo_copy, "tampered metric, stale lock")
    tampered = gate_cli(repo_copy, tmp_path)
    assert tampered.returncode == 1, tampered.stdout + tampered.stderr
    drift_line = next(line for line in tampered.stdout.splitlines() if line.startswith("DRIFT"))
    assert "metrics/evaluate.json: test.accuracy" in drift_line
    assert "! metrics/evaluate.json: test.accuracy" in tampered.stdout and "-0.01" in tampered.stdout
    assert "committed file does not match dvc.lock" in tampered.stdout  # the lock still has the honest md5
    assert "! stages/evaluate.py (evaluate)" in tampered.stdout and "differs: committed dvc.lock is stale" in tampered.stdout
    assert "hint: the committed dvc.lock was written for other code or params" in tampered.stdout

    update_params(repo_copy / "params.yaml", {"train.batch_size": 0})
    commit(repo_copy, "bad params")
    broken = gate_cli(repo_copy, tmp_path)
    assert broken.returncode == 2, broken.stdout + broken.stderr
    first_stage = next(iter(yaml.safe_load((repo_copy / "dvc.yaml").read_text())["stages"]))  # the params check
    assert "dvc repro failed" in broken.stdout and f"in stage '{first_stage}'" in broken.stdout
    assert "train.batch_size = 0 is invalid" in broken.stdout  # the stage's own stderr line
    assert not list(tmp_path.glob("tapework-gate-*"))  # temp clones removed
