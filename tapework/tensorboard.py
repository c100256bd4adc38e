"""TensorBoard event files for a training run: per-epoch scalars and weight histograms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

SPLITS = ("train", "val")


class SummaryWriters:
    """One event-file writer per split under `log_dir`; `None` writes nothing (non-chief workers, tensorboard off)."""

    def __init__(self, log_dir: Path | None) -> None:
        self.writers = {} if log_dir is None else {split: tf.summary.create_file_writer(str(Path(log_dir) / split)) for split in SPLITS}

    def write(self, row: dict[str, Any], model: keras.Model, epoch: int, histograms: bool) -> None:
        """Scalars of one history row (`train_*` and `val_*` keys, the learning rate), plus histograms if asked."""
        for split, writer in self.writers.items():
            with writer.as_default(step=epoch):
                for key, value in row.items():
                    if key.startswith(f"{split}_"):
                        tf.summary.scalar(key.removeprefix(f"{split}_"), value)
                if split == "train":
                    tf.summary.scalar("learning_rate", row["learning_rate"])
                    if histograms:
                        for variable in model.trainable_variables:
                            tf.summary.histogram(variable.path, variable.value)
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
