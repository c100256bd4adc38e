"""Real data sets through the real stage scripts: Fashion-MNIST over a loopback HTTP mirror,
California housing from a mirror folder, the offline regression set, and a user CSV."""

import csv
import hashlib
import json

import numpy as np
import pytest

from tests.conftest import run, shared_data, stage_command, update_params
from tests.http_server import FaultServer


def stage(repo, name, **env):
    return run(stage_command(name, repo), repo, **env)


@pytest.mark.slow
def test_real_fashion_mnist_through_loopback_mirror_download_and_preprocess(repo_copy):
    update_params(repo_copy / "params.yaml", {"download.dataset": "fashion_mnist", "preprocess.max_train_examples": 0})
    with FaultServer() as server:
        server.add_folder("/fashion", shared_data("fashion-mnist"))
        stage(repo_copy, "download", TAPEWORK_MIRROR=f"{server.url}/fashion/")
        assert server.requests() == 4  # the four canonical IDX files, once each
    stage(repo_copy, "preprocess")
    meta = json.loads((repo_copy / "data/prepared/meta.json").read_text())
    counts = meta["counts"]
    assert counts["train"] + counts["val"] == 60000 and counts["test"] == 10000
    assert meta["input_shape"] == [28, 28, 1]
    per_class_train = np.add(meta["class_counts"]["train"], meta["class_counts"]["val"])
    assert per_class_train.tolist() == [6000] * 10  # the published balance
    assert meta["class_counts"]["test"] == [1000] * 10
    assert meta["class_counts"]["val"] == [600] * 10  # stratified 10% validation split
    assert meta["class_names"][0] == "T-shirt/top" and meta["class_names"][9] == "Ankle boot"
    images = np.load(repo_copy / "data/prepared/x_train.npy")
    assert images.dtype == np.uint8 and images.shape == (54000, 28, 28, 1)


def regression_outputs_ok(repo):
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())["test"]
    assert {"loss", "mae", "rmse", "r2", "huber"} <= set(metrics)
    report = (repo / "metrics/report.tsv").read_text().splitlines()
    assert report[0] == "target_range\tcount\tmae\trmse\tbias" and len(report) == 1 + 5
    predictions = list(csv.DictReader((repo / "plots/predictions.csv").open()))
    assert len(predictions) > 10 and set(predictions[0]) == {"actual", "predicted"}
    assert (repo / "plots/confusion.csv").read_text().strip() == "actual,predicted"  # header only: not a classification run
    history = (repo / "metrics/train_history.tsv").read_text().splitlines()[0].split("\t")
    assert {"train_mae", "val_rmse", "val_r2", "train_huber"} <= set(history)
    rendered = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)["data"]
    assert len(rendered["predicted_vs_actual"]) >= 1 and len(rendered["loss"]) >= 1
    return metrics


@pytest.mark.slow
def test_offline_regression_pipeline_writes_regression_metrics_and_plots(repo_copy):
    update_params(repo_copy / "params.yaml", {"download.dataset": "diabetes", "train.epochs": 5, "train.learning_rate": 0.01})
    run(["dvc", "repro"], repo_copy)
    metrics = regression_outputs_ok(repo_copy)
    assert metrics["r2"] > 0.2  # diabetes is hard; a linear model gets about 0.45


@pytest.mark.slow
def test_california_housing_from_a_mirror_folder(repo_copy):
    update_params(
        repo_copy / "params.yaml",
        {"download.dataset": "california_housing", "download.mirror": str(shared_data("california-housing")), "preprocess.max_train_examples": 4000, "train.epochs": 4, "train.learning_rate": 0.003},
    )
    run(["dvc", "repro"], repo_copy)
    metrics = regression_outputs_ok(repo_copy)
    assert metrics["r2"] > 0.5  # median house value from 8 features: an MLP gets 0.6+ quickly
    assert 20_000 < metrics["mae"] < 80_000  # in dollars: metrics are in the target's own units


@pytest.mark.slow
def test_user_csv_classification(repo_copy, tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(600, 3))
    labels = np.where(features[:, 0] + features[:, 1] > 0, "high", "low")
    path = tmp_path / "table.csv"
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["a", "b", "c", "label"])
        writer.writerows([[*row, label] for row, label in zip(features.round(4), labels)])
    pin = hashlib.sha256(path.read_bytes()).hexdigest()  # local files are pinned too
    update_params(repo_copy / "params.yaml", {"download.dataset": "csv", "download.csv.path": str(path), "download.csv.sha256": pin, "download.csv.target": "label", "train.epochs": 5})
    run(["dvc", "repro"], repo_copy)
    metrics = json.loads((repo_copy / "metrics/evaluate.json").read_text())["test"]
    assert metrics["accuracy"] > 0.8  # linearly separable classes
    report = (repo_copy / "metrics/report.tsv").read_text()
    assert "\nhigh\t" in report and "\nlow\t" in report
