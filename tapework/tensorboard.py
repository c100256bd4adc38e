"""TensorBoard event files for a training run: per-epoch scalars, weight histograms and the run's
hyperparameters (the HParams tab), one folder per run under the workspace's `logs/`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

SPLITS = ("train", "val")


def run_log_dir(logs: Path, run_name: str) -> Path:
    """`logs/<run name>` in the workspace DVC runs from.

    A queued experiment runs in a temporary copy of the repository, and DVC sets DVC_ROOT to the
    parent workspace (for other runs it is the repository itself), so a relative `logs` resolves
    there and the logs of queued runs survive their temporary copy.
    """
    root = Path(os.environ.get("DVC_ROOT", ".")) if not logs.is_absolute() else Path("/")
    return root / logs / run_name


def flat_hparams(tree: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested params -> `{"train.mlp.dropout": 0.1, ...}` with TensorBoard's value types (lists as text)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class SummaryWriters:
    """One event-file writer per split under `log_dir`; `None` writes nothing (non-chief workers, tensorboard off).

    A run that starts from epoch 0 replaces whatever an earlier attempt of the same run left in
    `log_dir` (same run name: same params, data and code); a resumed run appends to it, so the
    folder always holds one point per epoch.
    """

    def __init__(self, log_dir: Path | None, *, resumed: bool, hparams: dict[str, Any] | None = None) -> None:
        self.writers: dict[str, Any] = {}
        if log_dir is None:
            return
        log_dir = Path(log_dir)
        if not resumed:
            for split in SPLITS:
                shutil.rmtree(log_dir / split, ignore_errors=True)
        self.writers = {split: tf.summary.create_file_writer(str(log_dir / split)) for split in SPLITS}
        if hparams and not resumed:
            from tensorboard.plugins.hparams import api as hparams_api  # imported here: only runs that log need it

            with self.writers["train"].as_default():
                hparams_api.hparams(flat_hparams(hparams), trial_id=log_dir.name)
            self.writers["train"].flush()

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
