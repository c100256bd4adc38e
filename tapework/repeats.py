"""Repeats: one configuration run once per seed (train.seed and repeats.extra_seeds), and the
aggregate stage's outputs over those runs.

* the aggregate metrics JSON (`dvc metrics show` / `diff` / `dvc exp show` read it): the number
  of seeds, and per metric the mean, std, n and the 95 % Student-t interval as scalars, nested
  like the run's own metrics (`{"seeds": 3, "test": {"accuracy": {"mean": ..., "std": ...,
  "n": 3, "ci95_low": ..., "ci95_high": ...}}}`; a single run gives `{"seeds": 1}`);
* the per-seed table (a plain output, so `dvc exp show` stays narrow): every run's metrics, which
  `python -m tapework.compare` reads at any revision to test differences seed by seed;
* the spread table for `dvc plots`: per epoch, each history column's mean, min, max and std.

Runs are ordered by seed, so the bytes do not depend on the order of repeats.extra_seeds.
No TensorFlow here: the aggregate stage reads JSON and TSV only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tapework.errors import DataError
from tapework.io import atomic_write_text, read_json
from tapework.params import with_overrides  # dotted names -> nested sections
from tapework.stats import mean, sample_std, summarize

# The keys of a run's metrics (train.json + evaluate.json) that are not measurements of the run:
# a flag, and the model's size (the same for every seed of one configuration).
FLAGS = ("stopped_early", "parameters")
# History columns the spread table covers: the per-split metrics (not the epoch, learning rate or skipped steps).
SPREAD_PREFIXES = ("train_", "val_")


@dataclass(frozen=True)
class RunFiles:
    """Where one run's train and evaluate stages wrote their results."""

    train_metrics: Path
    evaluate_metrics: Path
    history: Path


@dataclass(frozen=True)
class Run:
    seed: int
    metrics: dict[str, Any]  # train.json and evaluate.json merged: {"train": {...}, "val": {...}, "test": {...}, "epochs_run", ...}
    history: list[dict[str, float | int]]


def seed_files(root: Path, patterns: RunFiles, seed: int) -> RunFiles:
    """A seed's files from path patterns relative to `root` holding `{seed}` (dvc.yaml passes them)."""
    return RunFiles(*(root / str(pattern).format(seed=seed) for pattern in (patterns.train_metrics, patterns.evaluate_metrics, patterns.history)))


def read_history_rows(path: Path) -> list[dict[str, float | int]]:
    """metrics/train_history.tsv (tapework/history.py) as rows of numbers, without pandas."""
    lines = Path(path).read_text().splitlines()
    if len(lines) < 2:
        raise DataError(f"{path} holds no epoch; rerun the train stage that writes it")
    columns = lines[0].split("\t")
    return [{column: _number(text) for column, text in zip(columns, line.split("\t"), strict=True)} for line in lines[1:]]


def _number(text: str) -> float | int:
    try:
        return int(text)  # counts (epoch, skipped_steps); history.py writes every float with a '.' or an exponent
    except ValueError:
        return float(text)


def read_run(seed: int, files: RunFiles) -> Run:
    for path in (files.train_metrics, files.evaluate_metrics, files.history):
        if not Path(path).is_file():
            raise DataError(f"{path} (seed {seed}) is missing; run `dvc repro` to train and evaluate that seed")
    metrics = {**read_json(files.train_metrics), **read_json(files.evaluate_metrics)}
    return Run(seed, metrics, read_history_rows(files.history))


def measurements(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """`{"test.accuracy": 0.97, "epochs_run": 20, ...}`: every number of a run's metrics, flags left out."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(measurements(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in FLAGS:
            flat[name] = value
    return flat


def _check_same_metrics(runs: Sequence[Run]) -> list[str]:
    names = list(measurements(runs[0].metrics))
    for run in runs[1:]:
        if set(measurements(run.metrics)) != set(names):
            raise DataError(
                f"the run of seed {run.seed} reports other metrics than the run of seed {runs[0].seed}; "
                "rerun both with the same params (`dvc repro`)"
            )
    return names


def aggregate(runs: Sequence[Run]) -> dict[str, Any]:
    """The aggregate metrics JSON: `seeds` (how many runs), and per metric `summarize` over the runs as scalars.

    One run has no spread, and its mean is the run's own metric: then only `seeds` is written,
    so a single-seed run's `dvc metrics show` / `dvc exp show` gain one column, not a copy of every metric.
    """
    names = _check_same_metrics(runs)
    if len(runs) < 2:
        return {"seeds": len(runs)}
    return {"seeds": len(runs), **with_overrides({}, {name: summarize([measurements(run.metrics)[name] for run in runs]).scalars() for name in names})}


def per_seed_table(runs: Sequence[Run]) -> dict[str, Any]:
    """Every run's metrics by seed: `{"seeds": [{"seed": 7, "metrics": {...}}, ...]}`, ascending seeds."""
    _check_same_metrics(runs)
    return {"seeds": [{"seed": run.seed, "metrics": run.metrics} for run in sorted(runs, key=lambda run: run.seed)]}


def spread_table(runs: Sequence[Run]) -> str:
    """Per epoch: how many seeds' runs reached it, then for each metric column its mean, min, max and std.

    Columns: `epoch`, `seeds`, then `<column>` (the mean, under the history's own name, so a plot
    names the same fields as the single-run plots), `<column>_min`, `<column>_max`,
    `<column>_std` (empty where fewer than two runs reached the epoch). A run that stopped early
    counts up to its last epoch. Floats as repr, so identical runs give identical bytes.
    """
    columns = [column for column in runs[0].history[0] if column.startswith(SPREAD_PREFIXES)]
    epochs = max(len(run.history) for run in runs)
    header = ["epoch", "seeds"] + [f"{column}{suffix}" for column in columns for suffix in ("", "_min", "_max", "_std")]
    lines = ["\t".join(header)]
    for index in range(epochs):
        rows = [run.history[index] for run in sorted(runs, key=lambda run: run.seed) if index < len(run.history)]
        cells = [str(index + 1), str(len(rows))]
        for column in columns:
            values = [float(row[column]) for row in rows]
            std = repr(sample_std(values)) if len(values) > 1 else ""
            cells += [repr(mean(values)), repr(min(values)), repr(max(values)), std]
        lines.append("\t".join(cells))
    return "\n".join(lines) + "\n"


def write_spread(path: Path, runs: Sequence[Run]) -> None:
    atomic_write_text(path, spread_table(runs))
