"""The evaluate stage's logic: test metrics via the shared Evaluator, then reports and plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from tapework.batching import split_dataset
from tapework.io import write_json
from tapework.loop import Evaluator, task_spec
from tapework.metrics import MetricSet
from tapework.preprocess import Prepared
from tapework.reports import class_scores, per_class_report, regression_report, summary_figure, write_csv, write_table

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class ReportPaths:
    """Where the evaluate stage writes; dvc.yaml names each path (its outs)."""

    metrics: Path  # test metrics JSON
    report: Path  # per-class (or per-target-bin) table
    confusion: Path  # (actual, predicted) class-name pairs for `dvc plots`
    predictions: Path  # (actual, predicted) values for `dvc plots` (regression)
    summary: Path  # PNG for people who do not open `dvc plots`


@dataclass(frozen=True)
class Outcome:
    task: str
    results: dict[str, float]
    actual: np.ndarray
    predicted: np.ndarray  # class ids (classification) or values in target units (regression)
    confusion: np.ndarray | None
    outputs: np.ndarray  # the Evaluator's per-example outputs: logits, or values in target units


def evaluate_model(model: keras.Model, data: Prepared, batch_size: int, huber_delta: float) -> Outcome:
    spec = task_spec(data.meta)
    metrics = MetricSet(spec.task, spec.num_classes, huber_delta, target_scale=spec.target_scale, with_confusion=spec.task == "classification")
    y_test = data.labels("test")
    results, outputs = Evaluator(model, spec, metrics)(split_dataset(data, "test", batch_size), collect_outputs=True)
    if spec.task == "classification":
        confusion = metrics.confusion_matrix()
        results["macro_f1"] = float(class_scores(confusion)[2].mean())  # the report's macro average F1
        return Outcome(spec.task, results, y_test, np.argmax(outputs, axis=-1), confusion, outputs)
    return Outcome(spec.task, results, y_test, outputs, None, outputs)


def write_reports(outcome: Outcome, meta: dict[str, Any], history: pd.DataFrame, paths: ReportPaths) -> None:
    """The test metrics JSON, the report table, both plot CSVs and the summary PNG.

    Both plot CSVs are always written (DVC outputs must exist); the one that does not apply
    to the task holds only its header.
    """
    import pandas as pd  # imported here: the export stage evaluates through this module and writes no table

    write_json(paths.metrics, {"test": outcome.results})
    names = meta["class_names"]
    if outcome.task == "classification":
        write_table(per_class_report(outcome.confusion, names), paths.report)
        pairs = pd.DataFrame({"actual": [names[i] for i in outcome.actual], "predicted": [names[i] for i in outcome.predicted]})
        write_csv(pairs, paths.confusion)
        write_csv(pd.DataFrame(columns=["actual", "predicted"]), paths.predictions)
    else:
        write_table(regression_report(outcome.actual, outcome.predicted), paths.report)
        write_csv(pd.DataFrame({"actual": outcome.actual, "predicted": outcome.predicted}), paths.predictions)
        write_csv(pd.DataFrame(columns=["actual", "predicted"]), paths.confusion)
    summary_figure(history, outcome.task, outcome.confusion, names, outcome.actual, outcome.predicted, paths.summary)
