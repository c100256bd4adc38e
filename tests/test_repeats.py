"""tapework/repeats.py: the aggregate stage's three outputs from per-seed files, without TensorFlow."""

import json
import math
from pathlib import Path

import pytest
import scipy.stats

from tapework.errors import DataError
from tapework.history import history_table
from tapework.io import write_json
from tapework.repeats import Run, RunFiles, aggregate, measurements, per_seed_table, read_history_rows, read_run, seed_files, spread_table


def fake_run(seed: int, accuracy: float, epochs: int = 3, stopped_early: bool = False) -> Run:
    history = [
        {"epoch": epoch, "learning_rate": 0.001, "skipped_steps": 0, "train_loss": 2.0 / epoch + seed * 1e-3, "val_loss": 2.5 / epoch + accuracy}
        for epoch in range(1, epochs + 1)
    ]
    metrics = {
        "train": {"loss": history[-1]["train_loss"]},
        "val": {"loss": history[-1]["val_loss"]},
        "test": {"accuracy": accuracy, "loss": 1 - accuracy},
        "epochs_run": epochs,
        "best_epoch": epochs,
        "stopped_early": stopped_early,
    }
    return Run(seed, metrics, history)


RUNS = [fake_run(42, 0.9693), fake_run(7, 0.9721), fake_run(8, 0.9666, epochs=2, stopped_early=True)]


def test_aggregate_is_nested_by_split_with_scalar_statistics():
    result = aggregate(RUNS)
    assert set(result) == {"seeds", "train", "val", "test", "epochs_run", "best_epoch"}  # the flag is no measurement
    assert result["seeds"] == 3
    accuracy = result["test"]["accuracy"]
    values = [0.9693, 0.9721, 0.9666]
    low, high = scipy.stats.t.interval(0.95, 2, loc=sum(values) / 3, scale=scipy.stats.sem(values))
    assert accuracy == {
        "n": 3,
        "mean": pytest.approx(sum(values) / 3, rel=1e-14),
        "std": pytest.approx(scipy.stats.tstd(values), rel=1e-12),
        "ci95_low": pytest.approx(low, rel=1e-10),
        "ci95_high": pytest.approx(high, rel=1e-10),
    }
    assert all(not isinstance(value, (list, dict)) for value in accuracy.values())  # DVC drops lists from metrics
    assert result["epochs_run"]["mean"] == pytest.approx(8 / 3)


def test_one_run_gives_the_count_only():
    # No spread, and the mean would copy the run's own metrics into a second set of columns.
    assert aggregate([RUNS[0]]) == {"seeds": 1}


def test_outputs_do_not_depend_on_the_order_of_the_seeds():
    shuffled = [RUNS[2], RUNS[0], RUNS[1]]
    assert json.dumps(aggregate(RUNS), sort_keys=True) == json.dumps(aggregate(shuffled), sort_keys=True)
    assert per_seed_table(RUNS) == per_seed_table(shuffled)
    assert spread_table(RUNS) == spread_table(shuffled)
    assert [entry["seed"] for entry in per_seed_table(RUNS)["seeds"]] == [7, 8, 42]
    assert per_seed_table(RUNS)["seeds"][1]["metrics"]["stopped_early"] is True  # every key, flags too


def test_spread_table_per_epoch():
    lines = [line.split("\t") for line in spread_table(RUNS).splitlines()]
    header, rows = lines[0], [dict(zip(lines[0], line)) for line in lines[1:]]
    assert header == ["epoch", "seeds"] + [f"{column}{suffix}" for column in ("train_loss", "val_loss") for suffix in ("", "_min", "_max", "_std")]
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert [row["seeds"] for row in rows] == ["3", "3", "2"]  # seed 8 stopped after epoch 2
    second = [run.history[1]["val_loss"] for run in sorted(RUNS, key=lambda run: run.seed)]
    assert float(rows[1]["val_loss"]) == pytest.approx(sum(second) / 3, rel=1e-14)
    assert (float(rows[1]["val_loss_min"]), float(rows[1]["val_loss_max"])) == (min(second), max(second))
    assert float(rows[1]["val_loss_std"]) == pytest.approx(scipy.stats.tstd(second), rel=1e-12)
    third = [run.history[2]["val_loss"] for run in RUNS if len(run.history) > 2]
    assert float(rows[2]["val_loss"]) == pytest.approx(sum(third) / 2, rel=1e-14)
    single = [line.split("\t") for line in spread_table([RUNS[0]]).splitlines()]
    assert single[1][single[0].index("val_loss_std")] == ""  # no spread from one run
    assert float(single[1][single[0].index("val_loss_min")]) == float(single[1][single[0].index("val_loss")])


def test_runs_with_other_metrics_are_refused():
    other = fake_run(9, 0.5)
    del other.metrics["test"]["accuracy"]
    with pytest.raises(DataError, match="seed 9 reports other metrics"):
        aggregate([RUNS[0], other])


def test_measurements_flatten_numbers_and_skip_flags():
    assert measurements(RUNS[0].metrics) == {
        "train.loss": RUNS[0].metrics["train"]["loss"],
        "val.loss": RUNS[0].metrics["val"]["loss"],
        "test.accuracy": 0.9693,
        "test.loss": 1 - 0.9693,
        "epochs_run": 3,
        "best_epoch": 3,
    }


def test_history_rows_round_trip_the_history_writer(tmp_path):
    rows = [{"epoch": 1, "learning_rate": 0.0010000000474974513, "skipped_steps": 0, "val_loss": 1.3515430688858032, "val_r2": -math.inf}]
    path = tmp_path / "history.tsv"
    path.write_text(history_table(rows))
    assert read_history_rows(path) == rows
    path.write_text("epoch\tval_loss\n")
    with pytest.raises(DataError, match="no epoch"):
        read_history_rows(path)


def test_seed_files_fill_the_patterns_under_the_runs_folder(tmp_path):
    patterns = RunFiles(Path("seed-{seed}/train.json"), Path("seed-{seed}/evaluate.json"), Path("seed-{seed}/train_history.tsv"))
    files = seed_files(tmp_path / "runs", patterns, 7)
    assert files == RunFiles(tmp_path / "runs/seed-7/train.json", tmp_path / "runs/seed-7/evaluate.json", tmp_path / "runs/seed-7/train_history.tsv")
    with pytest.raises(DataError, match=r"seed-7/train\.json \(seed 7\) is missing.*dvc repro"):
        read_run(7, files)
    run = RUNS[0]
    write_json(files.train_metrics, {key: value for key, value in run.metrics.items() if key != "test"})
    write_json(files.evaluate_metrics, {"test": run.metrics["test"]})
    files.history.write_text(history_table(run.history))
    assert read_run(7, files) == Run(7, run.metrics, run.history)
