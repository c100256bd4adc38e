"""The hand-written loop: step factories (tf.function, explicit inputs) and one `evaluate` routine.

No model.fit / evaluate / predict: the forward pass, loss, gradients, optimizer update and
metric updates are all spelled out here, and both the train stage's validation and the
evaluate stage go through `evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tapework.metrics import MetricSet

# AutoGraph rewrites the source of every function a tf.function calls (about 30 ms each, paid by
# every process at its first trace). Only the step loops, the short-batch dispatch and
# `train_step` branch on tensors; the functions they call are marked plain_graph and skip the
# rewrite, and so does all they call in turn. Same ops, same bits (tests/test_startup.py checks
# which functions get converted).
plain_graph = tf.autograph.experimental.do_not_convert


@dataclass(frozen=True)
class TaskSpec:
    """How labels relate to model outputs and loss."""

    task: str  # "classification" | "regression"
    num_classes: int  # classes, or 1 output for regression
    label_smoothing: float = 0.0
    target_offset: float = 0.0  # regression: the model predicts (y - offset) / scale
    target_scale: float = 1.0

    @property
    def outputs(self) -> int:
        return self.num_classes if self.task == "classification" else 1


def task_spec(meta: dict[str, Any], label_smoothing: float = 0.0) -> TaskSpec:
    """The TaskSpec of a prepared data set (its meta.json)."""
    if meta["task"] == "classification":
        return TaskSpec("classification", meta["num_classes"], label_smoothing=label_smoothing)
    return TaskSpec("regression", 1, target_offset=meta["target"]["offset"], target_scale=meta["target"]["scale"])


def per_example_loss(spec: TaskSpec) -> Callable[[Any, Any], Any]:
    """Loss per example (no reduction), so averaging is ours: exact under batching and replicas."""
    if spec.task == "classification":
        if spec.label_smoothing > 0:
            # Sparse cross-entropy has no smoothing: smooth a one-hot target instead.
            categorical = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=spec.label_smoothing, reduction=None)
            return lambda labels, logits: categorical(tf.one_hot(tf.cast(labels, tf.int32), spec.num_classes), logits)
        sparse = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        return lambda labels, logits: sparse(labels, logits)

    def squared_error(targets: Any, outputs: Any) -> Any:
        # Loss on the standardised scale keeps gradients O(1) whatever the target's units.
        scaled = (tf.cast(targets, tf.float32) - spec.target_offset) / spec.target_scale
        return tf.square(tf.reshape(outputs, [-1]) - scaled)

    return squared_error


def outputs_in_target_units(spec: TaskSpec, outputs: Any) -> Any:
    """Logits for classification; predictions in the target's own units for regression."""
    if spec.task == "classification":
        return outputs
    return tf.reshape(outputs, [-1]) * spec.target_scale + spec.target_offset


def average_loss(per_example: Any, global_batch_size: Any | None) -> Any:
    """Sum over this replica's examples / the global batch size (None: one device, this batch), as
    tf.nn.compute_average_loss computes it (same ops, same bits) without its batch-size Assert op,
    which XLA drops with a warning in every compiled train step."""
    if global_batch_size is None:
        global_batch_size = tf.shape(per_example)[0]
    return tf.math.divide_no_nan(tf.reduce_sum(per_example), tf.cast(global_batch_size, per_example.dtype))


def _multi_step(step: Callable[..., Any], steps_per_execution: int, stop_on_bad: bool) -> Callable[[Any], Any]:
    """Wrap a per-batch `step(inputs, labels) -> good` into a compiled function running up to N steps per call.

    Reading the iterator inside the graph removes one Python round trip per batch, which is
    most of the cost of small-batch training on CPU.
    """

    @tf.function
    def run(iterator: Any) -> tuple[Any, Any]:
        steps = tf.constant(0, tf.int64)
        bad_steps = tf.constant(0, tf.int64)
        for _ in tf.range(steps_per_execution):
            optional = iterator.get_next_as_optional()
            if not optional.has_value():
                break
            good = step(*optional.get_value())
            steps += 1
            if not good:
                bad_steps += 1
                if stop_on_bad:
                    break
        return steps, bad_steps

    return run


def _full_batches_compiled(step: Callable[..., Any], full_batch: int | None, batch_axis: int) -> Callable[..., Any]:
    """`step` under XLA for batches of `full_batch` examples (along `batch_axis` of the first
    argument), and as a plain graph for any other size: the epoch's short last batch would have XLA
    compile the whole program again for its shape (1 to 2.5 s of the first epoch, measured on
    Fashion-MNIST), for one step an epoch. `full_batch` None compiles every size."""
    compiled = tf.function(step, jit_compile=True)
    if full_batch is None:
        return compiled

    def dispatch(*arguments: Any) -> Any:
        if tf.shape(arguments[0])[batch_axis] == full_batch:
            return compiled(*arguments)
        return step(*arguments)

    return dispatch


def _stacked_steps(step: Callable[..., Any], stop_on_bad: bool, full_batch: int | None) -> Callable[[Any], Any]:
    """`run(iterator) -> (steps run, non-finite steps)` over one (inputs, labels, count) stack of batches, its steps in one XLA program."""

    def steps_of_stack(inputs: Any, labels: Any, count: Any) -> tuple[Any, Any]:
        steps = tf.constant(0, tf.int64)
        bad_steps = tf.constant(0, tf.int64)
        index = tf.constant(0, tf.int32)
        # `while`, not `for index in tf.range(count)`: XLA takes a range's length as a compile-time
        # constant, and would compile the program again for the last stack's count.
        while index < count:
            good = step(inputs[index], labels[index])
            steps += 1
            index += 1
            if not good:
                bad_steps += 1
                if stop_on_bad:
                    break
        return steps, bad_steps

    run_stack = _full_batches_compiled(steps_of_stack, full_batch, batch_axis=1)

    @tf.function
    def run(iterator: Any) -> tuple[Any, Any]:
        optional = iterator.get_next_as_optional()
        if optional.has_value():
            return run_stack(*optional.get_value())
        return tf.constant(0, tf.int64), tf.constant(0, tf.int64)

    return run


def make_train_function(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    spec: TaskSpec,
    metrics: MetricSet,
    *,
    steps_per_execution: int = 1,
    stop_on_nonfinite: bool = True,
    jit_compile: bool = False,
    strategy: tf.distribute.Strategy | None = None,
    stacked: bool = False,
    full_batch: int | None = None,
) -> Callable[[Any], Any]:
    """Build `run(iterator) -> (steps_run, nonfinite_steps)`; a non-finite step never updates weights.

    `jit_compile` compiles each step with XLA: the whole step on one device, the forward and
    backward pass under a strategy. `stacked` (one device, with XLA) reads stacks of batches
    (`batching.make_dataset(..., stack=N)`) and runs each stack's steps as one XLA program: the
    same steps in the same order, bitwise the same weights, without TensorFlow's executor
    launching every step on its own. With `full_batch` (one device, with XLA), a batch of another
    size, an epoch's short last batch, runs as a plain graph instead of being compiled for its
    shape: in both ways of grouping steps, so they stay bitwise equal. With a strategy,
    `iterator` comes from a distributed dataset of *global* batches and every replica computes
    its share; the model, optimizer and `metrics` must have been built in `strategy.scope()`, and
    the optimizer must not clip or scale the loss (params validation refuses both with
    `train.distribute`: not replica-safe).
    """
    loss_fn = per_example_loss(spec)

    @plain_graph
    def compute_gradients(inputs: Any, labels: Any, global_batch_size: Any) -> tuple[Any, Any, Any]:
        with tf.GradientTape() as tape:
            outputs = model(inputs, training=True)
            per_example = loss_fn(labels, outputs)
            # Divide by the *global* batch: replica gradients then sum to the gradient of the mean.
            loss = average_loss(per_example, global_batch_size)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            # Mixed precision: scale up before backprop so float16 gradients do not underflow.
            scaled_loss = optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, model.trainable_variables)
        return outputs, per_example, (loss, gradients)

    @plain_graph
    def apply_update(labels: Any, outputs: Any, per_example: Any, gradients: Any) -> None:
        """The optimizer step (under a strategy: gradients are summed over replicas inside) and metric updates."""
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        metrics.update(labels, outputs_in_target_units(spec, outputs), per_example)

    if strategy is None:

        def train_step(inputs: Any, labels: Any) -> Any:
            outputs, per_example, (loss, gradients) = compute_gradients(inputs, labels, None)
            good = tf.math.is_finite(loss)
            if good:
                apply_update(labels, outputs, per_example, gradients)
            return good

        if stacked:
            return _stacked_steps(train_step, stop_on_nonfinite, full_batch)
        if jit_compile:
            # The whole step in one XLA cluster. On CPU the optimizer and metric updates are ~100
            # tiny element-wise ops per step, each dispatched on its own; fused, they cost little.
            train_step = _full_batches_compiled(train_step, full_batch, batch_axis=0)
        return _multi_step(train_step, steps_per_execution, stop_on_nonfinite)

    if jit_compile:
        # apply_gradients syncs replicas (merge_call), which XLA cannot hold: compile the replica-local part only.
        compute_gradients = tf.function(compute_gradients, jit_compile=True)

    @plain_graph
    def forward_backward(inputs: Any, labels: Any) -> tuple[Any, Any]:
        """Replica part 1: outputs, per-example loss, gradients, and whether every replica's loss is finite."""
        replica = tf.distribute.get_replica_context()
        # Replicas can hold unequal shares of a partial last batch, so count it instead of assuming N * local.
        global_batch_size = replica.all_reduce(tf.distribute.ReduceOp.SUM, tf.shape(labels)[0])
        outputs, per_example, (loss, gradients) = compute_gradients(inputs, labels, global_batch_size)
        nonfinite = tf.cast(tf.logical_not(tf.math.is_finite(loss)), tf.int32)
        # All replicas must agree whether to apply, or their collective updates would deadlock.
        nonfinite = replica.all_reduce(tf.distribute.ReduceOp.SUM, nonfinite)
        return tf.equal(nonfinite, 0), (outputs, per_example, gradients)

    def distributed_train_step(inputs: Any, labels: Any) -> Any:
        good, (outputs, per_example, gradients) = strategy.run(forward_backward, args=(inputs, labels))
        # The branch must sit outside `strategy.run`: a sync point (gradient all-reduce) inside a replica-side
        # cond is unsupported. Every replica holds the same all-reduced flag, so the first local one decides.
        good = strategy.experimental_local_results(good)[0]
        if good:
            strategy.run(apply_update, args=(labels, outputs, per_example, gradients))
        return good

    return _multi_step(distributed_train_step, steps_per_execution, stop_on_nonfinite)


def make_eval_step(model: keras.Model, spec: TaskSpec, metrics: MetricSet) -> Callable[[Any, Any], Any]:
    """One validation/test batch: forward pass (training=False), metric updates, outputs back."""
    loss_fn = per_example_loss(spec)

    @plain_graph
    def eval_step(inputs: Any, labels: Any) -> Any:
        outputs = model(inputs, training=False)
        in_units = outputs_in_target_units(spec, outputs)
        metrics.update(labels, in_units, loss_fn(labels, outputs))
        return in_units

    return eval_step


class Evaluator:
    """The one evaluation routine: the train stage's validation and the evaluate stage both call it.

    Built once so its compiled functions are traced once, not every epoch.
    """

    def __init__(self, model: keras.Model, spec: TaskSpec, metrics: MetricSet, steps_per_execution: int = 1) -> None:
        self.metrics = metrics
        self.steps_per_execution = steps_per_execution
        eval_step = make_eval_step(model, spec, metrics)

        @plain_graph
        def step_without_outputs(inputs: Any, labels: Any) -> Any:
            eval_step(inputs, labels)
            return tf.constant(True)

        self._run_many = _multi_step(step_without_outputs, steps_per_execution, stop_on_bad=False)
        self._run_one = tf.function(eval_step)

    def __call__(self, dataset: tf.data.Dataset, collect_outputs: bool = False) -> tuple[dict[str, float], np.ndarray | None]:
        """Run `dataset` through the model once; returns metric results (and outputs if asked).

        With `collect_outputs`, batches are driven from Python so each batch's outputs can be
        kept (the evaluate stage needs them for its reports); otherwise N batches run per call.
        """
        self.metrics.reset()
        if collect_outputs:
            collected = [self._run_one(inputs, labels).numpy() for inputs, labels in dataset]
            return self.metrics.results(), np.concatenate(collected)
        iterator = iter(dataset)
        while int(self._run_many(iterator)[0]) == self.steps_per_execution:
            pass
        return self.metrics.results(), None
