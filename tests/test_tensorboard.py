"""TensorBoard: train() writes one scalar per metric and epoch (equal to the history) and weight histograms."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import run
from tests.distribute_driver import train_tiny


def summary_values(folder: Path):
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                yield event.step, value


def read_events(folder: Path) -> dict[str, dict[int, np.ndarray]]:
    """tag -> {step: value} for every summary in the event file(s) under `folder` (hparams aside)."""
    values: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for step, value in summary_values(folder):
        if value.metadata.plugin_data.plugin_name == "hparams":
            continue
        assert step not in values[value.tag], f"{value.tag} written twice for step {step}"
        values[value.tag][step] = tf.make_ndarray(value.tensor)
    return dict(values)


def read_hparams(folder: Path) -> list[dict[str, object]]:
    """The hyperparameters of each hparams session-start record under `folder`."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    sessions = []
    for _, value in summary_values(folder):
        if value.metadata.plugin_data.plugin_name == "hparams":
            data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
            if data.HasField("session_start_info"):
                hparams = data.session_start_info.hparams
                sessions.append({name: getattr(entry, entry.WhichOneof("kind")) for name, entry in hparams.items()})
    return sessions


def scalars(events: dict[str, dict[int, np.ndarray]]) -> dict[str, dict[int, np.ndarray]]:
    return {tag: steps for tag, steps in events.items() if all(value.shape == () for value in steps.values())}


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("tensorboard") / "logs"
    result = train_tiny("classification", epochs=2, log_dir=log_dir)  # histogram_every: 1
    return result, read_events(log_dir / "train"), read_events(log_dir / "val"), log_dir


def test_scalars_hold_one_value_per_epoch_equal_to_the_history(logged_run):
    result, train_events, val_events, _ = logged_run
    expected_tags = {"train": {"loss", "accuracy", "huber", "learning_rate"}, "val": {"loss", "accuracy", "huber"}}
    for split, events in (("train", train_events), ("val", val_events)):
        logged = scalars(events)
        assert set(logged) == expected_tags[split]
        for tag, steps in logged.items():
            assert sorted(steps) == [1, 2], (split, tag)
            key = tag if tag == "learning_rate" else f"{split}_{tag}"
            for row in result.history:
                # Summaries store float32: the logged value is exactly the history's value rounded to float32.
                assert steps[row["epoch"]] == np.float32(row[key]), (split, tag, row["epoch"])


def test_weight_histograms_cover_every_trainable_variable_each_epoch(logged_run):
    result, train_events, val_events, _ = logged_run
    histograms = {tag: steps for tag, steps in train_events.items() if tag not in scalars(train_events)}
    variables = {variable.path: variable.numpy() for variable in result.model.trainable_variables}
    assert set(histograms) == set(variables)
    assert not set(val_events) - set(scalars(val_events))  # histograms go to the train writer only
    for tag, steps in histograms.items():
        assert sorted(steps) == [1, 2], tag
        buckets = steps[2]  # (left edge, right edge, count) per bucket, for the final epoch's weights
        assert buckets.ndim == 2 and buckets.shape[1] == 3, tag
        weights = variables[tag]
        assert buckets[:, 2].sum() == weights.size, tag
        assert buckets[:, 0].min() <= weights.min() and buckets[:, 1].max() >= weights.max(), tag


def test_hyperparameters_are_logged_once_for_the_hparams_tab(logged_run):
    (session,) = read_hparams(logged_run[3] / "train")
    assert session["dataset"] == "digits"
    assert session["train.learning_rate"] == pytest.approx(0.01) and session["train.epochs"] == 2
    assert session["train.mlp.hidden_units"] == "[32]" and session["train.model"] == "mlp"


def run_folders(repo: Path) -> dict[str, list[int]]:
    """Run folder under logs/ -> the epochs its train loss was logged for (in order of the steps)."""
    return {folder.name: sorted(read_events(folder / "train")["loss"]) for folder in sorted((repo / "logs").iterdir())}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_each_pipeline_run_gets_its_own_tensorboard_run(tiny_trained):
    """A plain run logs to logs/<model>-<fingerprint>; rerunning it replaces its points, another
    params value gets another folder, and a DVC experiment logs under its own name."""
    repo_copy = tiny_trained  # after one plain `dvc repro`
    (first,) = run_folders(repo_copy)
    assert first.startswith("mlp-") and run_folders(repo_copy)[first] == [1, 2, 3]
    run(["dvc", "repro", "--force", "train"], repo_copy)  # the same run again, from scratch
    assert run_folders(repo_copy) == {first: [1, 2, 3]}
    run(["dvc", "exp", "run", "-n", "lr-high", "-S", "train.learning_rate=0.003"], repo_copy)
    assert run_folders(repo_copy) == {first: [1, 2, 3], "lr-high": [1, 2, 3]}
    (session,) = read_hparams(repo_copy / "logs" / "lr-high" / "train")
    assert session["train.learning_rate"] == pytest.approx(0.003) and session["dataset"] == "digits"
