"""TensorBoard: train() writes one scalar per metric and epoch (equal to the history) and weight histograms."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.distribute_driver import train_tiny


def read_events(folder: Path) -> dict[str, dict[int, np.ndarray]]:
    """tag -> {step: value} for every summary in the event file(s) under `folder`."""
    values: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                assert event.step not in values[value.tag], f"{value.tag} written twice for step {event.step}"
                values[value.tag][event.step] = tf.make_ndarray(value.tensor)
    return dict(values)


def scalars(events: dict[str, dict[int, np.ndarray]]) -> dict[str, dict[int, np.ndarray]]:
    return {tag: steps for tag, steps in events.items() if all(value.shape == () for value in steps.values())}


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("tensorboard") / "logs"
    result = train_tiny("classification", epochs=2, log_dir=log_dir)  # histogram_every: 1
    return result, read_events(log_dir / "train"), read_events(log_dir / "val")


def test_scalars_hold_one_value_per_epoch_equal_to_the_history(logged_run):
    result, train_events, val_events = logged_run
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
    result, train_events, val_events = logged_run
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
