"""tf.distribute plumbing: logical CPU replicas, the strategy named in params, worker roles, input sharding.

The step functions themselves stay in loop.py; this module only decides *where* they run.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from tapework.catalogue import STRATEGIES

# Number of logical CPU devices to split the host CPU into (MirroredStrategy replicas on a CPU-only machine).
LOGICAL_CPUS_ENV = "TAPEWORK_LOGICAL_CPUS"


def configure_logical_cpus(count: int) -> None:
    """Split the first physical CPU into `count` logical devices.

    TensorFlow fixes its device list when it initialises (at the first op), so this must run
    before anything touches TF; calling it again with the count already in place is a no-op.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"logical CPU count must be an integer >= 1, got {count!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    configured = len(current) if current else 1  # None: TF's default of one device per physical CPU
    if configured == count:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as error:
        raise RuntimeError(
            f"cannot split the CPU into {count} logical devices: TensorFlow already initialised its devices "
            f"({error}). Set {LOGICAL_CPUS_ENV}={count} in the environment, or call configure_logical_cpus "
            "before any TensorFlow op runs"
        ) from None


def logical_cpus_from_env() -> int | None:
    """The count asked for by TAPEWORK_LOGICAL_CPUS, or None when it is unset or empty."""
    value = os.environ.get(LOGICAL_CPUS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{LOGICAL_CPUS_ENV}={value!r} is invalid: expected an integer >= 1 (or unset)")
    return int(value)


def configure_logical_cpus_from_env() -> None:
    count = logical_cpus_from_env()
    if count is not None:
        configure_logical_cpus(count)


def mirrored_devices() -> list[str] | None:
    """Replica devices for MirroredStrategy: its default (every GPU) when there are GPUs, else every logical CPU.

    Without GPUs MirroredStrategy's default is a single CPU replica, so logical CPUs must be named.
    """
    if tf.config.list_logical_devices("GPU"):
        return None
    return [device.name for device in tf.config.list_logical_devices("CPU")]


def make_strategy(kind: str) -> tf.distribute.Strategy | None:
    """`train.distribute` -> a strategy (None for single-device training)."""
    if kind == "none":
        return None
    if kind == "mirrored":
        devices = mirrored_devices()
        if devices is None:
            return tf.distribute.MirroredStrategy()
        # The default collective all-reduce keys its ops per process: a second MirroredStrategy in the same process
        # reuses the first one's keys (shape-mismatch errors). Logical CPUs share one host, so reducing onto one is enough.
        return tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
    if kind == "multi_worker":
        # Reads the cluster from TF_CONFIG; it must be built before other TF ops run in this process.
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown train.distribute '{kind}'; expected one of {', '.join(STRATEGIES)}")


def distribute_dataset(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset) -> tf.distribute.DistributedDataset:
    """Split each global batch of `dataset` across the replicas (and workers) of `strategy`."""
    options = tf.data.Options()
    # DATA: every worker builds the same seeded global order and keeps its slice of each global batch,
    # so a step's union of replica batches is exactly the single-device batch (FILE needs files; OFF repeats data).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def _tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG", "") or "{}"
    try:
        return json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}): {raw[:200]!r}") from None


def is_chief() -> bool:
    """True unless TF_CONFIG names this process a non-chief worker (only the chief writes outputs)."""
    config = _tf_config()
    task = config.get("task", {})
    kind, index = task.get("type", "chief"), int(task.get("index", 0))
    if kind == "chief":
        return True
    # Without an explicit chief, worker 0 plays that role (TensorFlow's convention).
    return kind == "worker" and index == 0 and "chief" not in config.get("cluster", {})
