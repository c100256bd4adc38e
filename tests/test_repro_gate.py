"""Reproducibility gate (tapework/gate.py, scripts/repro_gate.py): the comparison as pure functions
on dicts, then once end to end on a tiny committed copy of the repo."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from tapework import gate
from tapework.gate import MISSING, METRIC_ABS_TOLERANCE, choose_mode, compare, is_drift, lock_inputs, lock_outs, merge_metrics, metrics_files, render
from tests.conftest import ROOT, run, update_params

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


def rows_for(mode: str, fresh_lock: dict | None = None, fresh_metrics: dict | None = None, committed_files: dict | None = None):
    metrics = merge_metrics({}, METRICS, fresh_metrics if fresh_metrics is not None else METRICS)
    return compare(make_lock(), fresh_lock or make_lock(), metrics, mode, committed_files)


def fatal_names(rows) -> list[str]:
    return [row.name for row in rows if row.fatal]


@pytest.mark.parametrize("mode", ["exact", "tolerant"])
def test_identical_runs_pass_in_both_modes(mode):
    rows = rows_for(mode, committed_files={"metrics/train.json": "5" * 32})
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
        for kind in ("outs", "metrics", "plots"):
            declared |= {entry if isinstance(entry, str) else next(iter(entry)) for entry in stage.get(kind, [])}
    assert set(lock_outs(yaml.safe_load((ROOT / "dvc.lock").read_text()))) == declared
    assert set(metrics_files(dvc_yaml)) == {"metrics/train.json", "metrics/evaluate.json"}


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
    rows = rows_for(mode, fresh_lock=fresh)
    assert fatal_names(rows) == ["params.yaml:train (train)", "stages/train.py (train)"]
    text = render(rows, mode, "test")
    assert "committed dvc.lock is stale" in text and "(4 more entries, all the same)" in text
    assert "hint: the committed dvc.lock was written for other code or params" in text

    # Outputs of a stale stage differ as a consequence: the hint says so instead of "nondeterminism".
    set_out(fresh, "models", "f" * 32 + ".dir")
    text = render(compare(make_lock(), fresh, merge_metrics({}, METRICS, METRICS), mode), mode, "test")
    assert ("expected while the lock is stale" in text) == (mode == "exact")


def test_committed_file_that_does_not_match_the_lock_is_drift():
    rows = rows_for("tolerant", committed_files={"metrics/train.json": "e" * 32})
    assert fatal_names(rows) == ["metrics/train.json"]
    assert "committed file does not match dvc.lock" in render(rows, "tolerant", "test")


def test_merge_metrics_reads_dvc_metrics_diff_json_and_fills_gaps_from_raw_json():
    dvc_diff = {"metrics/evaluate.json": {"test.loss": {"old": 0.5, "new": 0.25, "diff": -0.25}, "test.f1": {"old": 0.5, "new": "x"}}}
    merged = merge_metrics(dvc_diff, {"metrics/evaluate.json": {"test": {"loss": 0.5, "accuracy": 0.9}}}, {"metrics/evaluate.json": {"test": {"loss": 0.25}}})
    assert merged == {"metrics/evaluate.json": {"test.loss": (0.5, 0.25), "test.f1": (0.5, "x"), "test.accuracy": (0.9, MISSING)}}
    assert gate.compare_metric(0.5, "x", "tolerant") == ("differs", True)
    assert gate.compare_metric(float("nan"), float("nan"), "exact") == ("same", False)


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
    return run([sys.executable, str(ROOT / "scripts/repro_gate.py"), "--repo", str(repo), *args], ROOT, check=False, timeout=400, TMPDIR=str(tmp_path))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gate_end_to_end_reproduced_then_tampered_then_broken(repo_copy, tmp_path):
    missing = gate_cli(repo_copy, tmp_path)  # nothing committed to compare against yet
    assert missing.returncode == 2 and "no dvc.lock in the commit" in missing.stdout, missing.stdout

    run(["dvc", "repro"], repo_copy)
    commit(repo_copy, "tiny run")
    good = gate_cli(repo_copy, tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "mode: exact" in good.stdout and "REPRODUCED" in good.stdout
    assert "ran download, preprocess, train, evaluate" in good.stdout  # every stage, even with its git-tracked outputs unchanged
    assert "metrics/evaluate.json: test.accuracy" in good.stdout and "models" in good.stdout

    metrics_path = repo_copy / "metrics/evaluate.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["test"]["accuracy"] += 0.01
    metrics_path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    commit(repo_copy, "tampered metric")
    tampered = gate_cli(repo_copy, tmp_path)
    assert tampered.returncode == 1, tampered.stdout + tampered.stderr
    drift_line = next(line for line in tampered.stdout.splitlines() if line.startswith("DRIFT"))
    assert "metrics/evaluate.json: test.accuracy" in drift_line
    assert "! metrics/evaluate.json: test.accuracy" in tampered.stdout and "-0.01" in tampered.stdout
    assert "committed file does not match dvc.lock" in tampered.stdout  # the lock still has the honest md5

    update_params(repo_copy / "params.yaml", {"train.batch_size": 0})
    commit(repo_copy, "bad params")
    broken = gate_cli(repo_copy, tmp_path)
    assert broken.returncode == 2, broken.stdout + broken.stderr
    assert "dvc repro failed" in broken.stdout and "in stage 'download'" in broken.stdout
    assert "train.batch_size = 0 is invalid" in broken.stdout  # the stage's own stderr line
    assert not list(tmp_path.glob("tapework-gate-*"))  # temp clones removed
