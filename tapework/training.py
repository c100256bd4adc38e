"""The epoch loop around the compiled steps: data order, validation, early stopping,
checkpoints, TensorBoard, non-finite detection. The steps themselves live in loop.py."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf
from tqdm import tqdm

from tapework.batching import make_dataset, steps_per_epoch
from tapework.checkpoint import CheckpointStore, TrainingState
from tapework.distribute import configure_logical_cpus_from_env, distribute_dataset, is_chief, make_strategy
from tapework.errors import NonFiniteLossError
from tapework.loop import Evaluator, make_train_function, task_spec
from tapework.metrics import MetricSet
from tapework.models import build_model, model_config
from tapework.optim import current_learning_rate, make_optimizer
from tapework.params import TrainParams, to_plain
from tapework.preprocess import Prepared

log = logging.getLogger(__name__)


def configure_determinism(seed: int) -> None:
    """Same seed + code + machine => bitwise-identical weights and metrics."""
    keras.utils.set_random_seed(seed)  # Python, NumPy and TF global seeds in one call
    tf.config.experimental.enable_op_determinism()  # picks deterministic kernels, fixes reduction order



def fingerprint(train: TrainParams, meta: dict[str, Any]) -> str:
    """Identifies (params, data) so a checkpoint is only ever resumed by the run that wrote it."""
    payload = json.dumps({"train": to_plain(train), "data": meta}, sort_keys=True)  # meta holds the array hashes
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class TrainResult:
    model: keras.Model
    config: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int
    stopped_early: bool

    def summary(self) -> dict[str, Any]:
        """metrics/train.json: final train metrics and the val metrics of the kept weights."""
        kept = self.history[self.best_epoch - 1]
        final = self.history[-1]
        return {
            "train": {key.removeprefix("train_"): value for key, value in final.items() if key.startswith("train_")},
            "val": {key.removeprefix("val_"): value for key, value in kept.items() if key.startswith("val_")},
            "epochs_run": len(self.history),
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
        }


class _Monitor:
    """Early stopping: is this epoch's monitored value an improvement?"""

    def __init__(self, name: str, min_delta: float) -> None:
        self.name = name
        self.min_delta = min_delta
        # Loss-like metrics improve downwards; accuracy and R^2 upwards.
        self.sign = -1.0 if name in ("val_accuracy", "val_r2") else 1.0

    def score(self, row: dict[str, Any]) -> float:
        return self.sign * row[self.name]

    def improved(self, row: dict[str, Any], best: float) -> bool:
        return self.score(row) < best - self.min_delta


def _summaries(log_dir: Path | None) -> dict[str, Any]:
    if log_dir is None:
        return {}
    return {split: tf.summary.create_file_writer(str(log_dir / split)) for split in ("train", "val")}


def _write_summaries(writers: dict[str, Any], row: dict[str, Any], model: keras.Model, epoch: int, histograms: bool) -> None:
    if not writers:
        return
    for split, writer in writers.items():
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


def _close_summaries(writers: dict[str, Any]) -> None:
    for writer in writers.values():
        writer.close()


# Where tf.train.Checkpoint keeps CheckpointStore's fingerprint variable.
_FINGERPRINT_KEY = "fingerprint/.ATTRIBUTES/VARIABLE_VALUE"


def _restore_from_chief(store: CheckpointStore, chief_dir: Path) -> bool:
    """Restore the chief's latest checkpoint into a non-chief worker's objects, read-only (never clears it)."""
    latest = tf.train.latest_checkpoint(str(chief_dir))
    if latest is None:
        return False
    try:
        saved = tf.train.load_checkpoint(latest).get_tensor(_FINGERPRINT_KEY).decode()
    except tf.errors.NotFoundError:
        return False  # the chief is clearing a checkpoint of another run: it starts fresh, so do we
    if saved != store.fingerprint:
        return False
    store.checkpoint.restore(latest).assert_existing_objects_matched()
    return True


def _checkpoint_store(checkpoint_dir: Path | None, chief: bool, run_fingerprint: str, model: keras.Model, optimizer: Any, metrics: MetricSet, state: TrainingState) -> CheckpointStore | None:
    """The chief saves into and resumes from `checkpoint_dir`.

    A non-chief worker resumes from the chief's checkpoint too (every worker must start at the
    same epoch) but saves into a private temporary folder, deleted when training ends: it must
    still save, because saving reads the metrics' on-read variables, a collective all workers join.
    """
    if checkpoint_dir is None:
        return None
    if chief:
        store = CheckpointStore(checkpoint_dir, run_fingerprint, model, optimizer, metrics.variables(), state)
        if store.restore_if_compatible():
            log.info("resumed from %s at epoch %d", store.manager.latest_checkpoint, int(state.epoch))
        return store
    private = Path(tempfile.mkdtemp(prefix="tapework-worker-checkpoints-"))
    try:
        store = CheckpointStore(private, run_fingerprint, model, optimizer, metrics.variables(), state)
        if _restore_from_chief(store, checkpoint_dir):
            log.info("resumed from the chief's checkpoint in %s at epoch %d", checkpoint_dir, int(state.epoch))
    except BaseException:
        shutil.rmtree(private, ignore_errors=True)
        raise
    return store


def train_epoch(train_function: Any, dataset: Any, steps: int, epoch: int, train_params: TrainParams) -> int:
    """Run one epoch of compiled steps; returns how many steps were skipped for a non-finite loss."""
    iterator = iter(dataset)
    done = skipped = 0
    with tqdm(total=steps, desc=f"epoch {epoch}", unit="step", leave=False, disable=not sys.stderr.isatty()) as bar:
        while True:
            ran, bad = (int(value) for value in train_function(iterator))
            done += ran
            bar.update(ran)
            if bad and train_params.on_nonfinite == "error":
                raise NonFiniteLossError(
                    f"non-finite loss at epoch {epoch}, step {done}: training stopped and nothing was written. "
                    "Lower train.learning_rate, set train.clip_norm, or set train.on_nonfinite: skip"
                )
            skipped += bad
            if ran < train_params.steps_per_execution:
                return skipped


def train(
    train_params: TrainParams,
    data: Prepared,
    *,
    checkpoint_dir: Path | None = None,
    log_dir: Path | None = None,
    stop_after_epochs: int | None = None,
) -> TrainResult:
    """Train from scratch or resume from `checkpoint_dir`; returns the model and per-epoch history.

    `stop_after_epochs` ends the process-level run early (tests use it to simulate a crash).
    Under `train.distribute: multi_worker` every worker calls this with the same arguments; only
    the chief writes checkpoints and TensorBoard logs (see `_checkpoint_store`).
    """
    configure_logical_cpus_from_env()  # first: TF fixes its device list when it initialises
    strategy = make_strategy(train_params.distribute)  # MultiWorkerMirroredStrategy must precede other TF ops
    configure_determinism(train_params.seed)
    keras.mixed_precision.set_dtype_policy("mixed_float16" if train_params.mixed_precision else "float32")
    meta = data.meta
    spec = task_spec(meta, train_params.label_smoothing)
    x_train, y_train = data.split("train")
    x_val, y_val = data.split("val")
    steps = steps_per_epoch(len(x_train), train_params.batch_size, train_params.drop_remainder)
    if steps == 0:
        raise ValueError(
            f"train.batch_size = {train_params.batch_size} with drop_remainder leaves no batch from "
            f"{len(x_train)} training examples; lower train.batch_size"
        )
    if strategy is not None:
        log.info("distribute: %s with %d replica(s) in sync", train_params.distribute, strategy.num_replicas_in_sync)
    chief = is_chief()
    normalization = meta["normalization"]
    config = model_config(train_params, tuple(meta["input_shape"]), spec.outputs, normalization["offset"], normalization["scale"])
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = build_model(config)
        optimizer = make_optimizer(train_params, steps)
        optimizer.build(model.trainable_variables)  # slots must exist before the first traced step
        train_metrics = MetricSet(spec.task, spec.num_classes, train_params.huber_delta)
    # Validation runs outside replica context on plain (local) metric variables; it reads the mirrored weights.
    val_metrics = MetricSet(spec.task, spec.num_classes, train_params.huber_delta)
    evaluator = Evaluator(model, spec, val_metrics, train_params.steps_per_execution)
    train_function = make_train_function(
        model,
        optimizer,
        spec,
        train_metrics,
        steps_per_execution=train_params.steps_per_execution,
        stop_on_nonfinite=train_params.on_nonfinite == "error",
        jit_compile=train_params.use_xla(),
        strategy=strategy,
    )
    state = TrainingState(model)
    store = _checkpoint_store(checkpoint_dir, chief, fingerprint(train_params, meta), model, optimizer, train_metrics, state)
    monitor = _Monitor(train_params.early_stopping.monitor, train_params.early_stopping.min_delta)
    patience = train_params.early_stopping.patience
    writers = _summaries(log_dir) if chief else {}
    val_dataset = make_dataset(x_val, y_val, train_params.batch_size)
    stopped_early = False
    epochs_this_process = 0
    try:
        # A resumed run that had already stopped early must not start training again.
        while int(state.epoch) < train_params.epochs and not (patience > 0 and int(state.epochs_without_improvement) >= patience):
            epoch = int(state.epoch) + 1
            started = time.perf_counter()
            train_metrics.reset()
            dataset = make_dataset(x_train, y_train, train_params.batch_size, seed=train_params.seed, epoch=epoch, drop_remainder=train_params.drop_remainder)
            if strategy is not None:
                dataset = distribute_dataset(strategy, dataset)
            skipped = train_epoch(train_function, dataset, steps, epoch, train_params)
            if skipped:
                log.warning("epoch %d: skipped %d step(s) with a non-finite loss", epoch, skipped)
            train_results = train_metrics.results()  # on-read metric variables: summed over replicas (and workers) here
            val_results, _ = evaluator(val_dataset)
            row = {"epoch": epoch, "learning_rate": current_learning_rate(optimizer), "skipped_steps": skipped}
            row.update({f"train_{key}": value for key, value in train_results.items()})
            row.update({f"val_{key}": value for key, value in val_results.items()})
            if not all(math.isfinite(value) for value in row.values()):
                raise NonFiniteLossError(f"epoch {epoch} produced non-finite metrics {row}; nothing was written")
            seconds = time.perf_counter() - started
            log.info(
                "epoch %d/%d  %s  lr %.3g  %.1fs",
                epoch,
                train_params.epochs,
                "  ".join(f"{key} {value:.4f}" for key, value in row.items() if key.startswith(("train_", "val_"))),
                row["learning_rate"],
                seconds,
            )
            state.epoch.assign(epoch)
            state.append_history(row)
            if monitor.improved(row, float(state.best_value)):
                state.best_value.assign(monitor.score(row))
                state.best_epoch.assign(epoch)
                state.epochs_without_improvement.assign(0)
                state.remember_best(model)
            else:
                state.epochs_without_improvement.assign_add(1)
            _write_summaries(writers, row, model, epoch, bool(train_params.histogram_every) and epoch % max(train_params.histogram_every, 1) == 0)
            stop = patience > 0 and int(state.epochs_without_improvement) >= patience
            if store is not None and (epoch % train_params.checkpoint_every == 0 or stop or epoch == train_params.epochs):
                store.save(epoch)
            epochs_this_process += 1
            if stop:
                stopped_early = True
                log.info("early stopping at epoch %d: %s has not improved for %d epochs", epoch, monitor.name, patience)
                break
            if stop_after_epochs is not None and epochs_this_process >= stop_after_epochs:
                break
    finally:
        _close_summaries(writers)
        if store is not None and not chief:
            shutil.rmtree(store.directory, ignore_errors=True)
    history = state.history
    best_epoch = int(state.best_epoch) if patience > 0 else len(history)
    if patience > 0 and train_params.early_stopping.restore_best:
        state.restore_best(model)
    elif patience > 0:
        best_epoch = len(history)
    stopped_early = stopped_early or (patience > 0 and int(state.epochs_without_improvement) >= patience)
    return TrainResult(model, config, history, best_epoch, stopped_early)


def history_table(history: list[dict[str, Any]]) -> str:
    """Per-epoch history as TSV (no wall-clock columns, so identical runs give identical bytes)."""
    columns = list(history[0])
    lines = ["\t".join(columns)]
    for row in history:
        lines.append("\t".join(repr(row[column]) if isinstance(row[column], float) else str(row[column]) for column in columns))
    return "\n".join(lines) + "\n"
