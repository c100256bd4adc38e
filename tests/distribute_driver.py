"""Run `tapework.training.train()` on a tiny data set and dump weights + history for a test to compare.

Distributed runs need a process of their own: logical CPUs must be configured before TensorFlow
initialises its devices, and each multi-worker worker is a separate process. The tests call
`train_tiny` in-process for the single-device reference and run this file as a script for the
distributed runs, so every compared run goes through the same `train()` code path.

    python tests/distribute_driver.py OUT_PREFIX --distribute mirrored [--task regression]
        [--steps-per-execution 3] [--checkpoint-dir DIR] [--log-dir DIR] [--stop-after-epochs 1]

Writes OUT_PREFIX.npz (model weights) and OUT_PREFIX.json (history, chief flag, pid). Set
TAPEWORK_LOGICAL_CPUS and TF_CONFIG in the environment as the run needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from sklearn.datasets import load_diabetes, load_digits  # noqa: E402

from tapework.params import load_params  # noqa: E402
from tapework.preprocess import Prepared, RawDataset, prepare  # noqa: E402

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"

BATCH_SIZE = 32
# Classification: 249 examples, so the last global batch (25) splits unevenly (13 + 12) over 2 replicas.
# Regression: 256 (full batches only), because Keras' MeanAbsoluteError on rank-1 targets averages
# per-batch means (a MetricSet issue), which weighs unequal replica batches differently from one device.
EXAMPLES = {"classification": 249, "regression": 256}


def tiny_shards(task: str, directory: Path, shard_size: int) -> Prepared:
    """tiny_data written as shards of `shard_size` examples (NumPy only, like tiny_data)."""
    from tapework.preprocess import RawSource, load_prepared, write_shards

    raw, dataset, preprocess = tiny_raw(task)
    write_shards(RawSource.from_arrays(raw), dataclasses.replace(preprocess, shard_size=shard_size), dataset, directory)
    return load_prepared(directory)


def tiny_data(task: str) -> Prepared:
    raw, dataset, preprocess = tiny_raw(task)
    return prepare(raw, preprocess, dataset)


def tiny_raw(task: str) -> tuple[RawDataset, str, Any]:
    """Digits (classification) or diabetes (regression) from scikit-learn; NumPy only, so no TF op runs yet."""
    if task == "classification":
        digits = load_digits()
        images = digits.images.astype(np.uint8)[..., None]
        raw = RawDataset(images, digits.target, None, None, task, tuple(map(str, range(10))), None, (8, 8, 1))
        dataset = "digits"
    else:
        diabetes = load_diabetes()
        features = diabetes.data.astype(np.float32)
        raw = RawDataset(features, diabetes.target, None, None, task, (), tuple(diabetes.feature_names), None)
        dataset = "diabetes"
    preprocess = load_params(PARAMS_FILE, {"download.dataset": dataset, "preprocess.max_train_examples": EXAMPLES[task]}).preprocess
    return raw, dataset, preprocess


def train_tiny(
    task: str = "classification",
    distribute: str = "none",
    steps_per_execution: int = 1,
    *,
    epochs: int = 2,
    batch_size: int = BATCH_SIZE,
    checkpoint_dir: Path | None = None,
    log_dir: Path | None = None,
    stop_after_epochs: int | None = None,
    data: Prepared | None = None,
    learning_rate: float = 0.01,
) -> Any:
    """A tiny MLP (dropout 0, so replicas and a single device see the same function) for `epochs` epochs."""
    dataset = "digits" if task == "classification" else "diabetes"
    train_params = load_params(
        PARAMS_FILE,
        {
            "download.dataset": dataset,
            "train.model": "mlp",
            "train.epochs": epochs,
            "train.batch_size": batch_size,
            "train.learning_rate": learning_rate,
            "train.mlp.hidden_units": [32],
            "train.mlp.dropout": 0.0,
            "train.steps_per_execution": steps_per_execution,
            "train.distribute": distribute,
            "train.histogram_every": 1,
        },
    ).train
    from tapework.training import train  # imported late: nothing may touch TF before train() configures devices

    return train(train_params, data or tiny_data(task), checkpoint_dir=checkpoint_dir, log_dir=log_dir, stop_after_epochs=stop_after_epochs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_prefix", type=Path)
    parser.add_argument("--task", default="classification", choices=("classification", "regression"))
    parser.add_argument("--distribute", default="none", choices=("none", "mirrored", "multi_worker"))
    parser.add_argument("--steps-per-execution", type=int, default=1)
    parser.add_argument("--checkpoint-dir", type=Path)
    parser.add_argument("--log-dir", type=Path)
    parser.add_argument("--stop-after-epochs", type=int)
    parser.add_argument("--shards", type=Path, help="write tiny_data as shards here and train on them")
    parser.add_argument("--shard-size", type=int, default=40)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")  # the test reads the replica count

    result = train_tiny(
        args.task,
        args.distribute,
        args.steps_per_execution,
        checkpoint_dir=args.checkpoint_dir,
        log_dir=args.log_dir,
        stop_after_epochs=args.stop_after_epochs,
        data=tiny_shards(args.task, args.shards, args.shard_size) if args.shards else None,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
    )
    from tapework.models import weights_dict
    from tapework.training import is_chief

    np.savez(args.out_prefix.with_suffix(".npz"), **weights_dict(result.model))
    report = {"history": result.history, "chief": is_chief(args.distribute), "pid": os.getpid()}
    args.out_prefix.with_suffix(".json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
