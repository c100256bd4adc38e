"""tf.distribute plumbing: logical CPU replicas, the strategy named in params, worker roles, input sharding.

The step functions themselves stay in loop.py; this module only decides *where* they run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import tensorflow as tf

from tapework.catalogue import STRATEGIES
from tapework.errors import EnvironmentSettingError

# Number of logical CPU devices to split the host CPU into (MirroredStrategy replicas on a CPU-only machine).
LOGICAL_CPUS_ENV = "TAPEWORK_LOGICAL_CPUS"
# More replicas than that buys nothing on any CPU, and TensorFlow builds every device up front
# (a value in the millions never finishes starting).
MAX_LOGICAL_CPUS = 256
TF_CONFIG_ENV = "TF_CONFIG"
TF_CONFIG_EXAMPLE = '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'


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
    if not value.isdigit() or not 1 <= int(value) <= MAX_LOGICAL_CPUS:
        raise EnvironmentSettingError(
            f"{LOGICAL_CPUS_ENV}={value!r} is invalid: set it to an integer from 1 to {MAX_LOGICAL_CPUS} (logical CPU "
            "devices for train.distribute: mirrored, e.g. 2), or unset it."
        )
    return int(value)


def configure_logical_cpus_from_env() -> None:
    count = logical_cpus_from_env()
    if count is not None:
        configure_logical_cpus(count)


def configure_environment(kind: str) -> None:
    """Check the environment this run reads against `train.distribute`, then split the CPU as asked.

    Runs before TensorFlow starts: a malformed TF_CONFIG or TAPEWORK_LOGICAL_CPUS, or a TF_CONFIG
    naming a cluster while `kind` is not multi_worker, stops the run with one line.
    """
    config = _tf_config()
    if config and kind != "multi_worker":
        task = config.get("task", {})
        role = f"{task.get('type', '?')} {task.get('index', '?')} of a {_cluster_size(config)}-process cluster"
        raise EnvironmentSettingError(
            f"{TF_CONFIG_ENV} is set ({role}) but train.distribute is '{kind}': unset {TF_CONFIG_ENV} for a "
            "one-process run, or set train.distribute: multi_worker."
        )
    configure_logical_cpus_from_env()


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


def cluster_position() -> tuple[int, int]:
    """(this process's index, the number of processes) in TF_CONFIG's cluster, chief first; (0, 1) without a cluster.

    The index is the one MultiWorkerMirroredStrategy gives this worker's input pipeline.
    """
    config = _tf_config()
    if not config:
        return 0, 1
    cluster, task = config["cluster"], config["task"]
    order = [(kind, index) for kind in ("chief", "worker") for index in range(len(cluster.get(kind, [])))]
    return order.index((task["type"], task.get("index", 0))), len(order)


def distribute_shards(strategy: tf.distribute.Strategy, make: Callable[[int], tf.data.Dataset]) -> tf.distribute.DistributedDataset:
    """Each worker's own pipeline, `make(worker index)` (its own shard files): file-level sharding.

    Workers may hold unequal numbers of examples; the distributed iterator then gives the workers
    that ran out empty batches until every worker has, so each example counts exactly once.
    """

    def dataset(context: tf.distribute.InputContext) -> tf.data.Dataset:
        return make(context.input_pipeline_id)

    return strategy.distribute_datasets_from_function(dataset)


def _cluster_size(config: dict) -> int:
    return sum(len(addresses) for addresses in config.get("cluster", {}).values())


def _tf_config() -> dict:
    """TF_CONFIG parsed and checked ({} when unset or empty); a malformed one is an EnvironmentSettingError."""
    raw = os.environ.get(TF_CONFIG_ENV, "").strip()
    if not raw:
        return {}

    def invalid(problem: str) -> EnvironmentSettingError:
        return EnvironmentSettingError(
            f"{TF_CONFIG_ENV} is invalid ({problem}): set it to JSON such as {TF_CONFIG_EXAMPLE} (this process's "
            f"entry in task), or unset it."
        )

    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise invalid(f"not JSON: {error}") from None
    if not isinstance(config, dict):
        raise invalid("not a JSON object")
    if not config:
        return {}
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster or not all(
        isinstance(addresses, list) and addresses and all(isinstance(address, str) for address in addresses)
        for addresses in cluster.values()
    ):
        raise invalid("'cluster' must map task types to lists of 'host:port' addresses")
    if not isinstance(task, dict) or not isinstance(task.get("type"), str) or isinstance(task.get("index", 0), bool) or not isinstance(task.get("index", 0), int):
        raise invalid("'task' must hold a 'type' and an integer 'index'")
    kind, index = task["type"], task.get("index", 0)
    if kind not in cluster or not 0 <= index < len(cluster[kind]):
        raise invalid(f"task {kind} {index} is not in the cluster")
    return config


def is_chief(kind: str) -> bool:
    """Whether this process writes the outputs: always, unless `kind` is multi_worker and TF_CONFIG names another role."""
    if kind != "multi_worker":
        return True
    config = _tf_config()
    task = config.get("task", {})
    role, index = task.get("type", "chief"), task.get("index", 0)
    if role == "chief":
        return True
    # Without an explicit chief, worker 0 plays that role (TensorFlow's convention).
    return role == "worker" and index == 0 and "chief" not in config.get("cluster", {})
