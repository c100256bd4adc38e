"""Metrics written from scratch as keras.metrics.Metric subclasses, and the per-task metric set."""

from __future__ import annotations

import logging
import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)
# An SST at or below this share of sum(y^2) is float64 rounding left by a constant target's sums
# (relative error ~1e-16 per addition, over up to ~10^6 additions), not spread in the target.
CONSTANT_TARGET_RTOL = 1e-10


class HuberMetric(keras.metrics.Metric):
    """Mean Huber error: 0.5 * e^2 for |e| <= delta, delta * (|e| - 0.5 * delta) beyond.

    Small errors count quadratically (like MSE / 2), large ones linearly (like MAE), so a few
    outliers do not dominate it. `delta` is in the units of `y_true`; MetricSet sets it from
    `train.huber_delta` (see there for what the metric measures per task).
    """

    def __init__(self, delta: float = 1.0, name: str = "huber", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.delta = float(delta)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        y_true = tf.cast(y_true, self.dtype)
        y_pred = tf.cast(y_pred, self.dtype)
        error = tf.abs(y_pred - y_true)
        quadratic = tf.minimum(error, self.delta)
        # 0.5*q^2 + delta*(|e| - q) equals the piecewise Huber form without a branch.
        per_element = 0.5 * tf.square(quadratic) + self.delta * (error - quadratic)
        per_example = tf.reshape(per_element, [tf.shape(per_element)[0], -1])
        per_example = tf.reduce_mean(per_example, axis=-1)
        if sample_weight is None:
            weights = tf.ones_like(per_example)
        else:
            weights = tf.reshape(tf.cast(sample_weight, self.dtype), [-1])
        self.total.assign_add(tf.reduce_sum(per_example * weights))
        self.count.assign_add(tf.reduce_sum(weights))

    def result(self) -> Any:
        return tf.math.divide_no_nan(self.total, self.count)

    def reset_state(self) -> None:
        self.total.assign(0.0)
        self.count.assign(0.0)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "delta": self.delta}


class RSquared(keras.metrics.Metric):
    """Coefficient of determination 1 - SSE/SST, accumulated over batches in float64.

    float64 because SST = sum(y^2) - (sum y)^2 / n cancels catastrophically in float32.
    R² is not defined when the target is constant (SST = 0): `result()` is then NaN and
    `defined()` False, and MetricSet leaves it out of the metrics.
    """

    def __init__(self, name: str = "r2", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.count = self.add_variable(shape=(), initializer="zeros", name="count", dtype="float64")
        self.sum = self.add_variable(shape=(), initializer="zeros", name="sum", dtype="float64")
        self.sum_squares = self.add_variable(shape=(), initializer="zeros", name="sum_squares", dtype="float64")
        self.squared_error = self.add_variable(shape=(), initializer="zeros", name="squared_error", dtype="float64")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        y_true = tf.reshape(tf.cast(y_true, tf.float64), [-1])
        y_pred = tf.reshape(tf.cast(y_pred, tf.float64), [-1])
        self.count.assign_add(tf.cast(tf.size(y_true), tf.float64))
        self.sum.assign_add(tf.reduce_sum(y_true))
        self.sum_squares.assign_add(tf.reduce_sum(tf.square(y_true)))
        self.squared_error.assign_add(tf.reduce_sum(tf.square(y_true - y_pred)))

    def _total(self) -> Any:
        """SST, the target's squared deviations from its mean, and whether it is more than rounding."""
        total = self.sum_squares - tf.math.divide_no_nan(tf.square(self.sum), self.count)
        return total, total > CONSTANT_TARGET_RTOL * self.sum_squares

    def defined(self) -> bool:
        return bool(self._total()[1])

    def result(self) -> Any:
        total, defined = self._total()
        r2 = 1.0 - tf.math.divide_no_nan(self.squared_error, total)
        return tf.cast(tf.where(defined, r2, tf.constant(math.nan, tf.float64)), tf.float32)

    def reset_state(self) -> None:
        for variable in (self.count, self.sum, self.sum_squares, self.squared_error):
            variable.assign(0.0)


class ConfusionMatrix(keras.metrics.Metric):
    """Running confusion matrix: rows are true classes, columns predicted classes."""

    def __init__(self, num_classes: int, name: str = "confusion_matrix", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.matrix = self.add_variable(shape=(num_classes, num_classes), initializer="zeros", name="matrix", dtype="int64")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        labels = tf.reshape(tf.cast(y_true, tf.int64), [-1])
        predictions = tf.argmax(y_pred, axis=-1)
        self.matrix.assign_add(tf.math.confusion_matrix(labels, predictions, self.num_classes, dtype=tf.int64))

    def result(self) -> Any:
        return tf.convert_to_tensor(self.matrix)

    def reset_state(self) -> None:
        self.matrix.assign(tf.zeros_like(self.matrix))


class MetricSet:
    """The metrics one split tracks, and how each is fed from (labels, outputs, loss).

    `huber_delta` (`train.huber_delta`) is in units of the target's scale:
    * regression: standard deviations of the training target (`target_scale`). The Huber error
      is computed on prediction - target in the target's own units, with delta = huber_delta *
      target_scale, and reported in those units (squared units on the quadratic side).
    * classification: probability. Per example it is the mean over classes of Huber(p_k - y_k)
      with p the softmax and y the one-hot label, so every |error| is at most 1; errors beyond
      delta (at 0.5: the true class given less than 1/2, or a wrong class more than 1/2) count
      linearly. At delta >= 1 it would be the Brier score / 2K and never leave the quadratic side.
    """

    def __init__(self, task: str, num_classes: int, huber_delta: float, *, target_scale: float = 1.0, with_confusion: bool = False) -> None:
        self.task = task
        self.loss = keras.metrics.Mean(name="loss")
        self.huber = HuberMetric(huber_delta * (target_scale if task == "regression" else 1.0))
        if task == "classification":
            self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
            self.others = [self.accuracy]
            self.confusion = ConfusionMatrix(num_classes) if with_confusion else None
        else:
            self.others = [keras.metrics.MeanAbsoluteError(name="mae"), keras.metrics.RootMeanSquaredError(name="rmse"), RSquared()]
            self.confusion = None
        self.num_classes = num_classes
        self._warned_undefined = False

    @property
    def all(self) -> list[keras.metrics.Metric]:
        extra = [self.confusion] if self.confusion is not None else []
        return [self.loss, *self.others, self.huber, *extra]

    def update(self, labels: Any, outputs: Any, loss: Any) -> None:
        """`outputs` are logits (classification) or predictions in target units (regression)."""
        self.loss.update_state(loss)
        if self.task == "classification":
            probabilities = tf.nn.softmax(outputs)
            self.accuracy.update_state(labels, outputs)
            self.huber.update_state(tf.one_hot(tf.cast(labels, tf.int32), self.num_classes), probabilities)
            if self.confusion is not None:
                self.confusion.update_state(labels, outputs)
        else:
            # Column vectors: Keras' MAE averages over the last axis first, so rank-1 inputs would
            # give one mean per batch and a partial last batch would weigh as much as a full one.
            labels, outputs = tf.reshape(labels, [-1, 1]), tf.reshape(outputs, [-1, 1])
            for metric in self.others:
                metric.update_state(labels, outputs)
            self.huber.update_state(labels, outputs)

    @property
    def main(self) -> keras.metrics.Metric:
        """The metric a progress bar shows beside the loss: accuracy (classification) or mae (regression)."""
        return self.others[0]

    def running(self) -> dict[str, float]:
        """The loss and main metric accumulated so far (reading them waits for the device)."""
        return {metric.name: float(metric.result()) for metric in (self.loss, self.main)}

    def reset(self) -> None:
        for metric in self.all:
            metric.reset_state()

    def results(self) -> dict[str, float]:
        """Scalar results as Python floats (confusion matrix excluded).

        An R² that is not defined (constant target) is left out, with a warning the first time:
        metrics files stay valid JSON of finite scalars, and `dvc metrics diff` shows the key as absent.
        """
        results = {}
        for metric in self.all:
            if metric is self.confusion:
                continue
            if isinstance(metric, RSquared) and not metric.defined():
                if not self._warned_undefined:
                    log.warning(
                        "r2 is not defined: the target is constant over these %d examples (nothing to explain); "
                        "it is left out of the metrics", int(keras.ops.convert_to_numpy(metric.count)),
                    )
                    self._warned_undefined = True
                continue
            results[metric.name] = float(metric.result())
        return results

    def confusion_matrix(self) -> np.ndarray:
        if self.confusion is None:
            raise ValueError("this MetricSet was built without a confusion matrix")
        return np.asarray(self.confusion.result())

    def variables(self) -> list[Any]:
        return [variable for metric in self.all for variable in metric.variables]
