"""Per-epoch training checkpoints (tf.train.Checkpoint) that make an interrupted run resumable.

A checkpoint holds every variable that decides the rest of the run: model weights and RNG
state, optimizer slots and step, metric accumulators, the early-stopping state and best
weights, and the epoch (the data order is a pure function of seed and epoch). It is tagged
with a fingerprint of params + data so a run never resumes from another experiment's state.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

log = logging.getLogger(__name__)


def _raw(variables: list[Any]) -> list[tf.Variable]:
    # Keras 3 variables wrap a tf.Variable; tf.train.Checkpoint tracks the wrapped one.
    return [getattr(variable, "value", variable) for variable in variables]


class TrainingState:
    """Early-stopping bookkeeping and history, as variables so they checkpoint atomically with weights."""

    def __init__(self, model: keras.Model) -> None:
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.best_value = tf.Variable(float("inf"), dtype=tf.float64, trainable=False, name="best_value")
        self.best_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="best_epoch")
        self.epochs_without_improvement = tf.Variable(0, dtype=tf.int64, trainable=False, name="wait")
        self.history_json = tf.Variable("[]", dtype=tf.string, trainable=False, name="history")
        self.best_weights = [tf.Variable(variable.numpy(), trainable=False) for variable in model.variables]

    @property
    def history(self) -> list[dict[str, Any]]:
        return json.loads(self.history_json.numpy().decode())

    def append_history(self, row: dict[str, Any]) -> None:
        self.history_json.assign(json.dumps([*self.history, row], sort_keys=True))

    def remember_best(self, model: keras.Model) -> None:
        for saved, variable in zip(self.best_weights, model.variables):
            saved.assign(variable.numpy())

    def restore_best(self, model: keras.Model) -> None:
        for saved, variable in zip(self.best_weights, model.variables):
            variable.assign(saved.numpy())


# What reading a damaged checkpoint raises: TensorFlow's read errors, and the IndexError /
# ValueError its Python reader raises on a truncated or garbled file.
DAMAGED = (tf.errors.OpError, IndexError, ValueError, AssertionError)
# Where tf.train.Checkpoint keeps CheckpointStore's fingerprint variable.
FINGERPRINT_KEY = "fingerprint/.ATTRIBUTES/VARIABLE_VALUE"


class CheckpointStore:
    """Save/restore a TrainingState plus model/optimizer/metric variables under one directory."""

    def __init__(self, directory: str | Path, fingerprint: str, model: keras.Model, optimizer: Any, metric_variables: list[Any], state: TrainingState) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.fingerprint_variable = tf.Variable(fingerprint, dtype=tf.string, trainable=False, name="fingerprint")
        self.checkpoint = tf.train.Checkpoint(
            model_variables=_raw(model.variables),
            optimizer_variables=_raw(optimizer.variables),
            metric_variables=_raw(metric_variables),
            epoch=state.epoch,
            best_value=state.best_value,
            best_epoch=state.best_epoch,
            epochs_without_improvement=state.epochs_without_improvement,
            history=state.history_json,
            best_weights=state.best_weights,
            fingerprint=self.fingerprint_variable,
        )
        # max_to_keep=2: the previous checkpoint survives while the next one is being written.
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.directory), max_to_keep=2)

    def restore_if_compatible(self, source: str | Path | None = None) -> bool:
        """Restore the latest checkpoint of this run (same fingerprint); returns whether one was restored.

        Without `source` it reads this store's own directory and clears a checkpoint of other
        params or data there. With `source` (a non-chief worker reading the chief's folder) it
        only reads: a foreign or vanishing checkpoint means "start fresh", and nothing is deleted.
        """
        if source is not None:
            latest = tf.train.latest_checkpoint(str(source))
            try:
                return latest is not None and self._restore(latest)
            except tf.errors.NotFoundError:
                return False  # the chief is clearing a checkpoint of another run: it starts fresh, so do we
        self._clear_unfinished_saves()
        # Newest first: a damaged latest checkpoint (a truncated file, a zeroed index) falls back to the one before.
        for path in reversed(self.manager.checkpoints):
            try:
                if self._restore(path):
                    return True
            except DAMAGED as error:
                log.warning("checkpoint %s is damaged (%s); trying the one before", path, str(error).splitlines()[0][:200])
                continue
            log.info("checkpoint in %s is from other params, data or code; starting fresh", self.directory)
            break
        if self.manager.checkpoints:
            self.clear()
        return False

    def _restore(self, path: str) -> bool:
        """Restore `path` if it belongs to this run; False (nothing restored) if it belongs to another."""
        if tf.train.load_checkpoint(path).get_tensor(FINGERPRINT_KEY).decode() != self.fingerprint:
            return False
        self.checkpoint.restore(path).assert_existing_objects_matched()
        return True

    def _clear_unfinished_saves(self) -> None:
        """A save killed or out of disk space leaves its `ckpt-N_temp` folder: never a checkpoint, always garbage."""
        for leftover in self.directory.glob("*_temp*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def save(self, epoch: int) -> str:
        try:
            return self.manager.save(checkpoint_number=epoch)
        finally:
            self._clear_unfinished_saves()  # a failed save (full disk) must not leave ckpt-N_temp behind

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.directory), max_to_keep=2)


def open_store(checkpoint_dir: Path | None, chief: bool, fingerprint: str, model: keras.Model, optimizer: Any, metric_variables: list[Any], state: TrainingState) -> CheckpointStore | None:
    """The chief saves into and resumes from `checkpoint_dir`.

    A non-chief worker resumes from the chief's checkpoint too (every worker must start at the
    same epoch) but saves into a private temporary folder, which the caller deletes when training
    ends: it must still save, because saving reads the metrics' on-read variables, a collective
    all workers join.
    """
    if checkpoint_dir is None:
        return None
    if chief:
        store = CheckpointStore(checkpoint_dir, fingerprint, model, optimizer, metric_variables, state)
        if store.restore_if_compatible():
            log.info("resumed from %s at epoch %d", store.manager.latest_checkpoint, int(state.epoch))
        return store
    private = Path(tempfile.mkdtemp(prefix="tapework-worker-checkpoints-"))
    try:
        store = CheckpointStore(private, fingerprint, model, optimizer, metric_variables, state)
        if store.restore_if_compatible(source=checkpoint_dir):
            log.info("resumed from the chief's checkpoint in %s at epoch %d", checkpoint_dir, int(state.epoch))
    except BaseException:
        shutil.rmtree(private, ignore_errors=True)
        raise
    return store
