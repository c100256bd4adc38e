"""Optimisers and learning-rate schedules from params (schedules are per optimizer step)."""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf

from tapework.catalogue import OPTIMIZERS, SCHEDULES
from tapework.params import TrainParams


@keras.saving.register_keras_serializable(package="tapework")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0, then constant, cosine, exponential or step decay.

    All decay shapes are functions of the step *after* warmup, so warmup never shifts them.
    """

    def __init__(self, kind: str, base: float, total_steps: int, warmup_steps: int = 0, decay_rate: float = 0.5, decay_steps: int = 1, minimum: float = 0.0) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule '{kind}'; expected one of {', '.join(SCHEDULES)}")
        self.kind = kind
        self.base = float(base)
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = int(warmup_steps)
        self.decay_rate = float(decay_rate)
        self.decay_steps = max(int(decay_steps), 1)
        self.minimum = float(minimum)

    def __call__(self, step: Any) -> Any:
        step = tf.cast(step, tf.float32)
        after = tf.maximum(step - self.warmup_steps, 0.0)
        if self.kind == "constant":
            rate = tf.constant(self.base)
        elif self.kind == "cosine":
            span = float(max(self.total_steps - self.warmup_steps, 1))
            progress = tf.minimum(after / span, 1.0)
            rate = self.minimum + 0.5 * (self.base - self.minimum) * (1.0 + tf.cos(math.pi * progress))
        elif self.kind == "exponential":
            rate = self.base * tf.pow(self.decay_rate, after / self.decay_steps)
        else:
            rate = self.base * tf.pow(self.decay_rate, tf.floor(after / self.decay_steps))
        if self.kind != "cosine":
            rate = tf.maximum(rate, self.minimum)
        if self.warmup_steps:
            # (step + 1) so the very first update already moves: lr never starts at exactly 0.
            warm = self.base * (step + 1.0) / self.warmup_steps
            rate = tf.where(step < self.warmup_steps, warm, rate)
        return rate

    def get_config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "base": self.base,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "decay_rate": self.decay_rate,
            "decay_steps": self.decay_steps,
            "minimum": self.minimum,
        }


def make_schedule(train: TrainParams, steps_per_epoch: int) -> WarmupSchedule:
    return WarmupSchedule(
        train.schedule,
        train.learning_rate,
        total_steps=train.epochs * steps_per_epoch,
        warmup_steps=train.warmup_epochs * steps_per_epoch,
        decay_rate=train.decay_rate,
        decay_steps=train.decay_epochs * steps_per_epoch,
        minimum=train.min_learning_rate,
    )


def make_optimizer(train: TrainParams, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    schedule = make_schedule(train, steps_per_epoch)
    clip = {"global_clipnorm": train.clip_norm} if train.clip_norm > 0 else {}
    if train.optimizer == "adam":
        optimizer = keras.optimizers.Adam(learning_rate=schedule, **clip)
    elif train.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=train.weight_decay, **clip)
    elif train.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=train.momentum, **clip)
    else:
        raise ValueError(f"unknown optimizer '{train.optimizer}'; expected one of {', '.join(OPTIMIZERS)}")
    if train.mixed_precision is True:  # float16; bfloat16 has float32's exponent range and needs no scaling
        # Dynamic loss scaling: grows the scale while gradients stay finite, halves it on overflow.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return float(inner.learning_rate)
