"""The epoch loop around the compiled steps: data order, validation, non-finite detection, and
the calls into checkpoints, early stopping and TensorBoard. The steps themselves live in loop.py."""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf
from tqdm import tqdm

from tapework.batching import split_dataset, split_steps, worker_shards
from tapework.checkpoint import TrainingState, open_store
from tapework.distribute import configure_environment, distribute_dataset, distribute_shards, is_chief, make_strategy, cluster_position
from tapework.early_stopping import EarlyStopping
from tapework.errors import DataError, NonFiniteLossError
from tapework.loop import Evaluator, make_train_function, task_spec
from tapework.metrics import MetricSet
from tapework.models import build_model, model_config
from tapework.optim import current_learning_rate, make_optimizer
from tapework.params import TrainParams, to_plain
from tapework.precision import dtype_policy
from tapework.preprocess import Prepared
from tapework.runs import run_fingerprint, run_id
from tapework.shards import split_files
from tapework.tensorboard import SummaryWriters

log = logging.getLogger(__name__)


def configure_determinism(seed: int) -> None:
    """Same seed + code + machine => bitwise-identical weights and metrics."""
    keras.utils.set_random_seed(seed)  # Python, NumPy and TF global seeds in one call
    tf.config.experimental.enable_op_determinism()  # picks deterministic kernels, fixes reduction order


@dataclass
class TrainResult:
    model: keras.Model
    config: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int
    stopped_early: bool
    epoch_seconds: list[float]  # wall time of each epoch this process ran: training, validation, summaries

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


def train_epoch(train_function: Any, dataset: Any, steps: int, epoch: int, train_params: TrainParams, metrics: MetricSet | None = None) -> int:
    """Run one epoch of compiled steps; returns how many steps were skipped for a non-finite loss.

    On a terminal (stderr a TTY) a progress bar counts the steps and, given the train `metrics`,
    shows the running loss and main metric (accuracy or mae) after each compiled call.
    """
    iterator = iter(dataset)
    done = skipped = 0
    shown = sys.stderr.isatty()
    # Reading the metrics waits for the device, so only a drawn bar does it. Under multi_worker the
    # read is a collective across workers, which would hang unless every worker had a terminal.
    postfix = metrics if shown and train_params.distribute != "multi_worker" else None
    with tqdm(total=steps, desc=f"epoch {epoch}", unit="step", leave=False, disable=not shown) as bar:
        while True:
            ran, bad = (int(value) for value in train_function(iterator))
            done += ran
            if postfix is not None:
                bar.set_postfix({name: f"{value:.4f}" for name, value in postfix.running().items()}, refresh=False)
            bar.update(ran)
            if bad and train_params.on_nonfinite == "error":
                raise NonFiniteLossError(
                    f"non-finite loss at epoch {epoch}, step {done}: training stopped and nothing was written. "
                    "Lower train.learning_rate, set train.clip_norm, or set train.on_nonfinite: skip"
                )
            skipped += bad
            if ran == 0:  # the iterator is spent (a stack or a call may run fewer steps and still not be the last)
                return skipped


def run_steps(data: Prepared, train_params: TrainParams) -> int:
    """Train steps of the whole run on one device (epochs x batches per epoch): what `jit_compile: auto` weighs."""
    return split_steps(data, "train", train_params.batch_size, train_params.drop_remainder, 1) * train_params.epochs


@dataclass(frozen=True)
class StepGrouping:
    """How train() groups steps into compiled calls; `benchmarks/loop_vs_fit.py` runs the loop the same way.

    `stack` > 0: batches come in stacks of that many (`batching.make_dataset(stack=...)`) and each
    stack's steps run as one XLA program; 0: the step loop reads one batch per step. `full_batch`:
    only batches of this size run under XLA, the epoch's short last batch as a plain graph, so XLA
    compiles one program per run. Only stacks use it: with one step per program, a size check
    before every step costs more than compiling the short batch saves (README, Performance).
    """

    stack: int
    full_batch: int | None


def step_grouping(steps_per_execution: int, batch_size: int, jit_compile: bool, one_device_arrays: bool) -> StepGrouping:
    """Stacks on one device with XLA and arrays (not shards, not under a strategy); elsewhere one batch per step."""
    if jit_compile and one_device_arrays:
        return StepGrouping(stack=steps_per_execution, full_batch=batch_size)
    return StepGrouping(stack=0, full_batch=None)


def epoch_dataset(data: Prepared, train_params: TrainParams, epoch: int, strategy: tf.distribute.Strategy | None, workers: int, stack: int) -> Any:
    """One epoch's training batches (in stacks of `stack` when > 0): a function of (seed, epoch), so a resumed run sees what an uninterrupted one saw."""
    settings = {"seed": train_params.seed, "epoch": epoch, "drop_remainder": train_params.drop_remainder, "shuffle_window": train_params.shuffle_window}
    if strategy is None:
        return split_dataset(data, "train", train_params.batch_size, stack=stack, **settings)
    if workers > 1:
        return distribute_shards(strategy, lambda index: split_dataset(data, "train", train_params.batch_size // workers, worker=(index, workers), **settings))
    return distribute_dataset(strategy, split_dataset(data, "train", train_params.batch_size, **settings))


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
    the chief writes checkpoints and TensorBoard logs (see `checkpoint.open_store`).
    """
    configure_environment(train_params.distribute)  # first: TF fixes its device list when it initialises
    strategy = make_strategy(train_params.distribute)  # MultiWorkerMirroredStrategy must precede other TF ops
    configure_determinism(train_params.seed)
    keras.mixed_precision.set_dtype_policy(dtype_policy(train_params.mixed_precision, gpu=bool(tf.config.list_physical_devices("GPU"))))
    meta = data.meta
    spec = task_spec(meta, train_params.label_smoothing)
    # Under multi_worker, sharded data is split by file: each worker reads its own shards (README, Scaling out).
    worker, workers = cluster_position() if data.sharded and train_params.distribute == "multi_worker" else (0, 1)
    if workers > 1:
        if strategy.num_replicas_in_sync != workers:
            raise DataError(
                f"sharded data under multi_worker needs one replica per worker, but {workers} workers hold "
                f"{strategy.num_replicas_in_sync} replicas; give each worker one device, or use preprocess.format: arrays"
            )
        if train_params.batch_size % workers:
            raise DataError(
                f"train.batch_size = {train_params.batch_size} does not split evenly over the {workers} workers that each "
                f"read their own shards; use a multiple of {workers}"
            )
        own = worker_shards(split_files(data.meta, "train"), worker, workers)
        log.info("worker %d of %d reads its own %d shard file(s), %d examples", worker, workers, len(own), sum(count for _, count in own))
    steps = split_steps(data, "train", train_params.batch_size, train_params.drop_remainder, workers)
    if steps == 0:
        raise DataError(
            f"train.batch_size = {train_params.batch_size} with drop_remainder leaves no batch from "
            f"{data.count('train')} training examples; lower train.batch_size"
        )
    if strategy is not None:
        log.info("distribute: %s with %d replica(s) in sync", train_params.distribute, strategy.num_replicas_in_sync)
    chief = is_chief(train_params.distribute)
    normalization = meta["normalization"]
    config = model_config(train_params, tuple(meta["input_shape"]), spec.outputs, normalization["offset"], normalization["scale"])
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = build_model(config)
        optimizer = make_optimizer(train_params, steps)
        optimizer.build(model.trainable_variables)  # slots must exist before the first traced step
        train_metrics = MetricSet(spec.task, spec.num_classes, train_params.huber_delta, target_scale=spec.target_scale)
    # Validation runs outside replica context on plain (local) metric variables; it reads the mirrored weights.
    val_metrics = MetricSet(spec.task, spec.num_classes, train_params.huber_delta, target_scale=spec.target_scale)
    evaluator = Evaluator(model, spec, val_metrics, train_params.steps_per_execution)
    jit_compile = train_params.use_xla(run_steps(data, train_params))
    grouping = step_grouping(train_params.steps_per_execution, train_params.batch_size, jit_compile, one_device_arrays=strategy is None and not data.sharded)
    train_function = make_train_function(
        model,
        optimizer,
        spec,
        train_metrics,
        steps_per_execution=train_params.steps_per_execution,
        stop_on_nonfinite=train_params.on_nonfinite == "error",
        jit_compile=jit_compile,
        strategy=strategy,
        stacked=bool(grouping.stack),
        full_batch=grouping.full_batch,
    )
    state = TrainingState(model)
    log.info("run %s", run_id(train_params, meta))
    # A checkpoint is only ever resumed by the run that wrote it: same params, data and code.
    store = open_store(checkpoint_dir, chief, run_fingerprint(train_params, meta), model, optimizer, train_metrics.variables(), state)
    stopping = EarlyStopping(train_params.early_stopping, state)
    hparams = {"dataset": meta["dataset"], "train": to_plain(train_params)}
    writers = SummaryWriters(log_dir if chief else None, resumed=int(state.epoch) > 0, hparams=hparams)
    val_dataset = split_dataset(data, "val", train_params.batch_size)
    epoch_seconds: list[float] = []
    try:
        # A resumed run that had already stopped early must not start training again.
        while int(state.epoch) < train_params.epochs and not stopping.should_stop():
            epoch = int(state.epoch) + 1
            started = time.perf_counter()
            train_metrics.reset()
            dataset = epoch_dataset(data, train_params, epoch, strategy, workers, grouping.stack)
            skipped = train_epoch(train_function, dataset, steps, epoch, train_params, train_metrics)
            if skipped:
                log.warning("epoch %d: skipped %d step(s) with a non-finite loss", epoch, skipped)
            train_results = train_metrics.results()  # on-read metric variables: summed over replicas (and workers) here
            val_results, _ = evaluator(val_dataset)
            row = {"epoch": epoch, "learning_rate": current_learning_rate(optimizer), "skipped_steps": skipped}
            row.update({f"train_{key}": value for key, value in train_results.items()})
            row.update({f"val_{key}": value for key, value in val_results.items()})
            if not all(math.isfinite(value) for value in row.values()):
                raise NonFiniteLossError(f"epoch {epoch} produced non-finite metrics {row}; nothing was written")
            state.epoch.assign(epoch)
            state.append_history(row)
            stop = stopping.update(row, model)
            writers.write(row, model, epoch, bool(train_params.histogram_every) and epoch % max(train_params.histogram_every, 1) == 0)
            seconds = time.perf_counter() - started
            epoch_seconds.append(seconds)
            log.info(
                "epoch %d/%d  %s  lr %.3g  %.1fs",
                epoch,
                train_params.epochs,
                "  ".join(f"{key} {value:.4f}" for key, value in row.items() if key.startswith(("train_", "val_"))),
                row["learning_rate"],
                seconds,
            )
            if store is not None and (epoch % train_params.checkpoint_every == 0 or stop or epoch == train_params.epochs):
                store.save(epoch)
            if stop:
                log.info("early stopping at epoch %d: %s has not improved for %d epochs", epoch, stopping.params.monitor, stopping.params.patience)
                break
            if stop_after_epochs is not None and len(epoch_seconds) >= stop_after_epochs:
                break
    finally:
        writers.close()
        if store is not None and not chief:
            shutil.rmtree(store.directory, ignore_errors=True)
    history = state.history
    best_epoch = stopping.finish(model, len(history))
    return TrainResult(model, config, history, best_epoch, stopping.should_stop(), epoch_seconds)
