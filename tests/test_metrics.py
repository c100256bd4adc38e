"""Metric maths against hand-computed references (and scikit-learn where it has the same metric)."""

import json

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support, r2_score

from tapework.io import write_json
from tapework.metrics import ConfusionMatrix, HuberMetric, MetricSet, RSquared
from tapework.reports import per_class_report
from tests.conftest import run


def huber_reference(y_true, y_pred, delta):
    """Textbook piecewise definition, averaged over elements of each example then over examples."""
    error = np.abs(np.asarray(y_pred, np.float64) - np.asarray(y_true, np.float64))
    values = np.where(error <= delta, 0.5 * error**2, delta * error - 0.5 * delta**2)
    return values.reshape(len(values), -1).mean(axis=1).mean()


def test_huber_matches_hand_computed_values():
    metric = HuberMetric(delta=1.0)
    # errors 0.5 (quadratic: 0.125), 2.0 (linear: 1.5), 0 (0)
    metric.update_state(np.array([0.0, 0.0, 3.0]), np.array([0.5, -2.0, 3.0]))
    assert float(metric.result()) == pytest.approx((0.125 + 1.5 + 0.0) / 3, rel=1e-6)


@pytest.mark.parametrize("delta", [0.1, 1.0, 5.0])
def test_huber_accumulates_across_batches_like_one_batch(delta):
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.normal(size=(50, 3)) * 3, rng.normal(size=(50, 3)) * 3
    metric = HuberMetric(delta)
    for start in range(0, 50, 16):
        metric.update_state(y_true[start : start + 16], y_pred[start : start + 16])
    assert float(metric.result()) == pytest.approx(huber_reference(y_true, y_pred, delta), rel=1e-5)
    metric.reset_state()
    assert float(metric.result()) == 0.0


def test_huber_sample_weight():
    metric = HuberMetric(1.0)
    metric.update_state(np.array([0.0, 0.0]), np.array([0.5, 3.0]), sample_weight=np.array([1.0, 0.0]))
    assert float(metric.result()) == pytest.approx(0.125)


def test_r_squared_matches_scikit_learn_over_batches():
    rng = np.random.default_rng(1)
    actual = rng.normal(loc=1e5, scale=3e4, size=1000)  # large offset: the float32 cancellation case
    predicted = actual + rng.normal(scale=1e4, size=1000)
    metric = RSquared()
    for start in range(0, 1000, 128):
        metric.update_state(actual[start : start + 128], predicted[start : start + 128])
    assert float(metric.result()) == pytest.approx(r2_score(actual, predicted), abs=1e-5)


def test_confusion_matrix_and_per_class_report_match_scikit_learn():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, size=300)
    logits = rng.normal(size=(300, 4))
    logits[np.arange(300), labels] += 1.0  # better than chance, not perfect
    metric = ConfusionMatrix(4)
    metric.update_state(labels[:100], logits[:100])
    metric.update_state(labels[100:], logits[100:])
    confusion = np.asarray(metric.result())
    predicted = logits.argmax(axis=1)
    expected = np.zeros((4, 4), np.int64)
    np.add.at(expected, (labels, predicted), 1)
    np.testing.assert_array_equal(confusion, expected)
    report = per_class_report(confusion, ["a", "b", "c", "d"])
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, zero_division=0)
    np.testing.assert_allclose(report["precision"][:4], precision, rtol=1e-12)
    np.testing.assert_allclose(report["recall"][:4], recall, rtol=1e-12)
    np.testing.assert_allclose(report["f1"][:4], f1, rtol=1e-12)
    np.testing.assert_array_equal(report["support"][:4], support)
    macro = report.set_index("class").loc["macro avg"]
    assert macro["f1"] == pytest.approx(f1.mean())


def test_per_class_report_handles_a_class_never_predicted():
    confusion = np.array([[5, 0], [3, 0]])
    report = per_class_report(confusion, ["yes", "no"]).set_index("class")
    assert report.loc["no", "precision"] == 0.0 and report.loc["no", "f1"] == 0.0


def test_metric_set_classification_results():
    metrics = MetricSet("classification", 3, huber_delta=1.0)
    labels = np.array([0, 1, 2, 1])
    logits = np.array([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [0, 0, 5.0]])
    metrics.update(labels, logits, np.array([0.1, 0.2, 0.3, 0.4]))
    results = metrics.results()
    assert results["accuracy"] == pytest.approx(0.5)
    assert results["loss"] == pytest.approx(0.25)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert results["huber"] == pytest.approx(huber_reference(np.eye(3)[labels], probabilities, 1.0), rel=1e-5)


def test_regression_metrics_average_per_example_not_per_batch():
    """A partial last batch must weigh by its examples: batches [1, 1, 1] and [3] give MAE 1.5, not 2.0."""
    metrics = MetricSet("regression", 0, huber_delta=10.0)
    metrics.update(np.zeros(3), np.ones(3), np.ones(3))
    metrics.update(np.zeros(1), np.full(1, 3.0), np.full(1, 9.0))
    results = metrics.results()
    assert results["mae"] == pytest.approx(1.5)
    assert results["rmse"] == pytest.approx(np.sqrt((1 + 1 + 1 + 9) / 4))
    assert results["huber"] == pytest.approx((0.5 * 3 + 0.5 * 9) / 4)
    assert results["loss"] == pytest.approx(3.0)


@pytest.mark.parametrize("task, main", [("classification", "accuracy"), ("regression", "mae")])
def test_running_reads_the_loss_and_main_metric_the_progress_bar_shows(task, main):
    metrics = MetricSet(task, 3 if task == "classification" else 1, 0.5)
    labels = np.array([0, 2, 1, 2]) if task == "classification" else np.array([1.0, 2.0, 3.0, 4.0])
    outputs = np.eye(3, dtype="float32")[[0, 1, 1, 2]] * 4 if task == "classification" else np.array([1.5, 2.0, 2.0, 4.5], "float32")
    metrics.update(labels, outputs, np.array([0.5, 1.0, 1.5, 2.0], "float32"))
    running = metrics.running()
    assert list(running) == ["loss", main]
    results = metrics.results()
    assert running == {"loss": results["loss"], main: results[main]} and running["loss"] == pytest.approx(1.25)


# --- issue 16: R² of a constant target is not defined --------------------------------------------


@pytest.mark.parametrize("value", [0.0, 5.0, 0.1, -123456.7])
def test_r_squared_of_a_constant_target_is_not_defined_and_left_out(value, caplog):
    """SST = 0: no R² exists (1.0 was reported before). 0.1 and -123456.7 are not exact in binary,
    so their float64 sums leave rounding residue that must still count as zero spread."""
    caplog.set_level("WARNING", logger="tapework.metrics")
    metrics = MetricSet("regression", 0, huber_delta=1.0)
    rng = np.random.default_rng(0)
    for _ in range(40):  # many batches: rounding accumulates across the assign_adds
        targets = np.full(97, value, np.float32)
        metrics.update(targets, targets + rng.normal(size=97).astype(np.float32), np.ones(97))
    assert not metrics.others[-1].defined() and np.isnan(float(metrics.others[-1].result()))
    first = metrics.results()
    assert "r2" not in first and {"loss", "mae", "rmse", "huber"} <= set(first)
    metrics.results()
    warnings = [record.getMessage() for record in caplog.records if "r2 is not defined" in record.getMessage()]
    assert warnings == ["r2 is not defined: the target is constant over these 3880 examples (nothing to explain); it is left out of the metrics"]


def test_r_squared_of_a_barely_varying_target_is_still_reported():
    rng = np.random.default_rng(2)
    actual = (1000.0 + rng.normal(scale=0.05, size=2000)).astype(np.float32)  # spread 5e-5 of the magnitude
    predicted = actual + rng.normal(scale=0.01, size=2000).astype(np.float32)
    metric = RSquared()
    for start in range(0, 2000, 100):
        metric.update_state(actual[start : start + 100], predicted[start : start + 100])
    assert metric.defined()
    assert float(metric.result()) == pytest.approx(r2_score(actual.astype(np.float64), predicted.astype(np.float64)), abs=1e-3)


def test_dvc_metrics_show_and_diff_work_when_r2_is_left_out(tmp_path):
    """The evaluate stage's file without its r2 key (constant target) against a committed one with it."""
    metrics_file = tmp_path / "metrics" / "evaluate.json"
    metrics_file.parent.mkdir()
    (tmp_path / "dvc.yaml").write_text("metrics:\n  - metrics/evaluate.json\n")
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        run(command, tmp_path)
    write_json(metrics_file, {"test": {"loss": 0.5, "mae": 1.0, "r2": 0.75}})
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], tmp_path)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "with r2"], tmp_path)
    metrics = MetricSet("regression", 0, huber_delta=1.0)
    metrics.update(np.full(8, 3.0), np.arange(8.0), np.ones(8))
    write_json(metrics_file, {"test": metrics.results()})  # what write_reports writes for a constant target
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], tmp_path).stdout)
    (workspace,) = shown.values()  # DVC keys the workspace as ""
    assert set(workspace["data"]["metrics/evaluate.json"]["data"]["test"]) == {"loss", "mae", "rmse", "huber"}
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], tmp_path).stdout)["metrics/evaluate.json"]
    assert diff["test.r2"] == {"old": 0.75, "new": None}  # DVC shows the key as gone, not as an error
    assert diff["test.mae"]["new"] == pytest.approx(np.abs(np.arange(8.0) - 3.0).mean())
    assert "test.r2" in run(["dvc", "metrics", "diff", "--all"], tmp_path).stdout


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_catalogue_names_the_metrics_each_task_reports(task):
    """catalogue.METRICS (params validation, repeats.primary_metric, compare's directions) is what MetricSet reports."""
    from tapework import catalogue

    metrics = MetricSet(task, 3, 0.5)
    labels = np.array([0, 2, 1]) if task == "classification" else np.array([1.0, 2.0, 4.0])  # a varying target: R² is defined
    outputs = np.eye(3, dtype="float32")[[0, 1, 1]] if task == "classification" else np.array([1.5, 2.0, 3.0], "float32")
    metrics.update(labels, outputs, np.ones(3, "float32"))
    assert tuple(metrics.results()) == catalogue.METRICS[task]
