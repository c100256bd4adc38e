"""The hand-written train step against an independent NumPy forward/backward pass."""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tapework.batching import make_dataset
from tapework.loop import Evaluator, TaskSpec, make_train_function
from tapework.metrics import MetricSet
from tapework.models import Dropout, build_model
from tests.conftest import ROOT, run


def tiny_mlp(features=6, hidden=5, classes=3, seed=0, dropout=0.0, l2=0.0):
    keras.utils.set_random_seed(seed)
    config = {
        "model": "mlp",
        "settings": {"hidden_units": [hidden], "dropout": dropout},
        "input_shape": [features],
        "outputs": classes,
        "l2": l2,
        "seed": seed,
        "offset": [0.0] * features,
        "scale": [1.0] * features,
    }
    return build_model(config)


def numpy_sgd_step(weights, inputs, labels, learning_rate):
    """Softmax cross-entropy MLP, gradients by hand (chain rule), one plain SGD update."""
    w1, b1, w2, b2 = (np.asarray(w, np.float64) for w in weights)
    x = inputs.astype(np.float64)
    pre = x @ w1 + b1
    hidden = np.maximum(pre, 0.0)
    logits = hidden @ w2 + b2
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    count = len(labels)
    loss = -np.log(probabilities[np.arange(count), labels]).mean()
    d_logits = probabilities.copy()
    d_logits[np.arange(count), labels] -= 1.0
    d_logits /= count
    d_w2, d_b2 = hidden.T @ d_logits, d_logits.sum(axis=0)
    d_hidden = (d_logits @ w2.T) * (pre > 0)
    d_w1, d_b1 = x.T @ d_hidden, d_hidden.sum(axis=0)
    updated = [w - learning_rate * g for w, g in zip((w1, b1, w2, b2), (d_w1, d_b1, d_w2, d_b2))]
    return loss, updated


def trainable_arrays(model):
    return [variable.numpy() for variable in model.trainable_variables]


@pytest.mark.parametrize("jit_compile", [False, True], ids=["no-xla", "xla"])
def test_train_step_matches_numpy_reference(jit_compile):
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(8, 6)).astype(np.float32)
    labels = rng.integers(0, 3, size=8).astype(np.int32)
    model = tiny_mlp()
    before = trainable_arrays(model)
    optimizer = keras.optimizers.SGD(learning_rate=0.1)
    optimizer.build(model.trainable_variables)
    spec = TaskSpec("classification", 3)
    metrics = MetricSet("classification", 3, 1.0)
    run = make_train_function(model, optimizer, spec, metrics, jit_compile=jit_compile)
    steps, bad = run(iter(make_dataset(inputs, labels, batch_size=8)))
    assert (int(steps), int(bad)) == (1, 0)
    expected_loss, expected_weights = numpy_sgd_step(before, inputs, labels, 0.1)
    assert metrics.results()["loss"] == pytest.approx(expected_loss, rel=1e-5)
    for got, expected in zip(trainable_arrays(model), expected_weights):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def train_weights(steps_per_execution, inputs, labels, jit_compile=False, stacked=False, full_batch=None):
    model = tiny_mlp(seed=3)
    optimizer = keras.optimizers.Adam(0.01)
    optimizer.build(model.trainable_variables)
    metrics = MetricSet("classification", 3, 1.0)
    run = make_train_function(model, optimizer, TaskSpec("classification", 3), metrics, steps_per_execution=steps_per_execution, jit_compile=jit_compile, stacked=stacked, full_batch=full_batch)
    iterator = iter(make_dataset(inputs, labels, batch_size=7, seed=1, epoch=1, stack=steps_per_execution if stacked else 0))
    total = 0
    while steps := int(run(iterator)[0]):
        total += steps
    return total, trainable_arrays(model), metrics.results()


@pytest.mark.parametrize(
    ("jit_compile", "stacked", "full_batch"),
    [(False, False, None), (True, False, None), (True, True, None), (True, False, 7), (True, True, 7)],
    ids=["no-xla", "xla", "xla-stacked", "xla-short-batch-plain", "xla-stacked-short-batch-plain"],
)
def test_steps_per_execution_changes_nothing_but_speed(jit_compile, stacked, full_batch):
    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(50, 6)).astype(np.float32)
    labels = rng.integers(0, 3, size=50).astype(np.int32)
    steps_one, weights_one, results_one = train_weights(1, inputs, labels, jit_compile, full_batch=full_batch)
    # Stacked: 7 full batches of 7 as stacks of 3, 3 and 1 (padded to 3), then the short batch of 1 alone.
    steps_many, weights_many, results_many = train_weights(3 if stacked else 4, inputs, labels, jit_compile, stacked, full_batch)
    assert steps_one == steps_many == 8  # 50 examples / batch 7, last batch partial
    for a, b in zip(weights_one, weights_many):
        np.testing.assert_array_equal(a, b)
    assert results_one == results_many


@pytest.mark.parametrize(("jit_compile", "stacked"), [(False, False), (True, False), (True, True)], ids=["no-xla", "xla", "xla-stacked"])
def test_non_finite_step_is_reported_and_never_applied(jit_compile, stacked):
    # A NaN target poisons its batch's loss for sure (a NaN input can vanish through ReLU).
    inputs = np.ones((4, 6), np.float32)
    targets = np.array([1.0, 2.0, np.nan, 3.0], np.float32)
    model = tiny_mlp(classes=1)
    before = trainable_arrays(model)
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    spec = TaskSpec("regression", 1)
    run = make_train_function(model, optimizer, spec, MetricSet("regression", 0, 1.0), steps_per_execution=4, jit_compile=jit_compile, stacked=stacked)
    steps, bad = run(iter(make_dataset(inputs, targets, batch_size=2, stack=4 if stacked else 0)))
    assert (int(steps), int(bad)) == (2, 1)  # first batch applied, second NaN: stop there
    after = trainable_arrays(model)
    assert all(np.isfinite(a).all() for a in after)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize(("jit_compile", "stacked"), [(False, False), (True, False), (True, True)], ids=["no-xla", "xla", "xla-stacked"])
def test_skip_mode_skips_only_the_bad_step(jit_compile, stacked):
    inputs = np.ones((6, 6), np.float32)
    targets = np.array([1.0, 2.0, np.inf, 3.0, 4.0, 5.0], np.float32)
    model = tiny_mlp(classes=1)
    optimizer = keras.optimizers.SGD(0.01)
    optimizer.build(model.trainable_variables)
    spec = TaskSpec("regression", 1)
    run = make_train_function(model, optimizer, spec, MetricSet("regression", 0, 1.0), steps_per_execution=8, stop_on_nonfinite=False, jit_compile=jit_compile, stacked=stacked)
    steps, bad = run(iter(make_dataset(inputs, targets, batch_size=2, stack=8 if stacked else 0)))
    assert (int(steps), int(bad)) == (3, 1)
    assert int(optimizer.iterations) == 2
    assert all(np.isfinite(a).all() for a in trainable_arrays(model))


def test_xla_step_is_the_same_computation_as_the_uncompiled_one():
    # Fusion may reorder float32 arithmetic, so equal to rounding, not to the bit.
    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(50, 6)).astype(np.float32)
    labels = rng.integers(0, 3, size=50).astype(np.int32)
    _, plain_weights, plain_results = train_weights(4, inputs, labels, jit_compile=False)
    _, xla_weights, xla_results = train_weights(4, inputs, labels, jit_compile=True)
    for plain, xla in zip(plain_weights, xla_weights):
        np.testing.assert_allclose(xla, plain, rtol=1e-5, atol=1e-6)
    assert xla_results == pytest.approx(plain_results, rel=1e-5)


def test_dropout_draws_keras_masks_on_tensorflow_kernels_and_compiles_under_xla():
    x = tf.constant(np.random.default_rng(0).normal(size=(64, 128)).astype(np.float32))
    ours, theirs = Dropout(0.3, seed=7), keras.layers.Dropout(0.3, seed=7)
    for _ in range(3):  # the seed state advances alike, so every call draws the same mask
        np.testing.assert_array_equal(ours(x, training=True).numpy(), theirs(x, training=True).numpy())
    np.testing.assert_array_equal(ours(x, training=False).numpy(), x.numpy())
    compiled = tf.function(lambda: ours(x, training=True), jit_compile=True)
    first, second = compiled().numpy(), compiled().numpy()
    for mask in (first, second):
        dropped = float((mask == 0).mean())
        assert 0.25 < dropped < 0.35, dropped  # rate 0.3
        np.testing.assert_allclose(mask[mask != 0], x.numpy()[mask != 0] / 0.7, rtol=1e-6)
    assert not np.array_equal(first, second)  # a fresh mask per call


def test_evaluator_collects_outputs_and_matches_fast_path():
    rng = np.random.default_rng(2)
    inputs = rng.normal(size=(30, 6)).astype(np.float32)
    labels = rng.integers(0, 3, size=30).astype(np.int32)
    model = tiny_mlp()
    evaluator = Evaluator(model, TaskSpec("classification", 3), MetricSet("classification", 3, 1.0), steps_per_execution=3)
    dataset = make_dataset(inputs, labels, batch_size=4)
    fast, _ = evaluator(dataset)
    slow, outputs = evaluator(dataset, collect_outputs=True)
    assert fast == pytest.approx(slow, rel=1e-6)
    np.testing.assert_allclose(outputs, model(inputs).numpy(), rtol=1e-5, atol=1e-6)
    accuracy = float((outputs.argmax(axis=1) == labels).mean())
    assert fast["accuracy"] == pytest.approx(accuracy)


def test_regression_loss_is_on_standardised_scale_and_metrics_in_target_units():
    spec = TaskSpec("regression", 1, target_offset=100.0, target_scale=10.0)
    model = tiny_mlp(classes=1)
    metrics = MetricSet("regression", 0, 1.0)
    targets = np.array([90.0, 110.0, 100.0, 120.0], np.float32)
    inputs = np.zeros((4, 6), np.float32)
    Evaluator(model, spec, metrics)(make_dataset(inputs, targets, batch_size=4))
    prediction_scaled = float(model(inputs[:1]).numpy()[0, 0])  # all inputs equal
    predicted = prediction_scaled * 10.0 + 100.0
    results = metrics.results()
    assert results["mae"] == pytest.approx(np.abs(predicted - targets).mean(), rel=1e-5)
    assert results["loss"] == pytest.approx((((targets - 100.0) / 10.0 - prediction_scaled) ** 2).mean(), rel=1e-5)
    tf.debugging.assert_all_finite(tf.constant(results["r2"]), "r2")


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_stacked_dataset_holds_the_same_batches_in_the_same_order(drop_remainder):
    inputs = np.arange(50 * 2, dtype=np.float32).reshape(50, 2)
    labels = np.arange(50, dtype=np.int32)
    plain = [labels.numpy() for _, labels in make_dataset(inputs, labels, 7, seed=3, epoch=2, drop_remainder=drop_remainder)]
    stacks = list(make_dataset(inputs, labels, 7, seed=3, epoch=2, drop_remainder=drop_remainder, stack=3))
    # 7 full batches: two stacks of 3, then one padded to 3 of which 1 runs; the short batch alone.
    assert [(tuple(labels.shape), int(count)) for _, labels, count in stacks] == [((3, 7), 3), ((3, 7), 3), ((3, 7), 1)] + ([] if drop_remainder else [((1, 1), 1)])
    unstacked = [batch for _, labels, count in stacks for batch in labels.numpy()[: int(count)]]
    assert len(unstacked) == len(plain) and all(np.array_equal(a, b) for a, b in zip(unstacked, plain))
    assert all(np.array_equal(x.numpy()[..., 0], 2 * y.numpy()) for x, y, _ in stacks)  # inputs gathered with their labels


XLA_PROGRAMS_PROBE = """
import sys
import keras, numpy as np
from tapework.batching import make_dataset
from tapework.loop import TaskSpec, make_train_function
from tapework.metrics import MetricSet
from tests.test_loop import tiny_mlp

full_batch = None if sys.argv[1] == "none" else int(sys.argv[1])
rng = np.random.default_rng(0)
inputs, labels = rng.normal(size=(50, 6)).astype(np.float32), rng.integers(0, 3, size=50).astype(np.int32)
for stacked in (True, False):
    model = tiny_mlp(hidden=4)
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    run = make_train_function(model, optimizer, TaskSpec("classification", 3), MetricSet("classification", 3, 1.0),
                              steps_per_execution=3, jit_compile=True, stacked=stacked, full_batch=full_batch)
    for epoch in (1, 2):
        iterator = iter(make_dataset(inputs, labels, 7, seed=0, epoch=epoch, stack=3 if stacked else 0))
        while int(run(iterator)[0]):
            pass
"""


def test_xla_compiles_the_step_program_once_when_the_short_batch_runs_plain(tmp_path):
    # 50 examples in batches of 7: 7 full batches and a short one of 1, for two epochs, stacked
    # (steps_of_stack) and one step per program (train_step). XLA's dump folder gets one module per
    # compilation of a program.
    compiled = {}
    for full_batch in ("7", "none"):
        dump = tmp_path / full_batch
        run([sys.executable, "-c", XLA_PROGRAMS_PROBE, full_batch], ROOT, XLA_FLAGS=f"--xla_dump_to={dump}")
        for program in ("steps_of_stack", "train_step"):
            compiled[program, full_batch] = len([path for path in dump.glob("*.before_optimizations.txt") if program in path.name])
    # The short batch's own program only without full_batch; the last stack's smaller count never.
    assert compiled == {("steps_of_stack", "7"): 1, ("train_step", "7"): 1, ("steps_of_stack", "none"): 2, ("train_step", "none"): 2}
