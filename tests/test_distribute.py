"""tf.distribute: MirroredStrategy on 2 logical CPUs and MultiWorkerMirroredStrategy with 2 local
workers train what one device trains, through the same `train()` code path.

Distributed runs are subprocesses of tests/distribute_driver.py (logical CPUs must be configured
before TensorFlow starts; each worker is a process); the single-device reference runs in-process.

Tolerances, measured on 17 configurations (2 tasks x 2 seeds x 4 training-set sizes, plus the
default seed; 2 epochs, Adam): replicas sum partial float32 matmuls in another order than one
device, so results drift apart by rounding only. Weights differed by at most 1.2e-7 typically and
2.8e-6 in the worst run (Adam's 1/sqrt(v) amplifies rounding noise on near-zero gradients); metrics
by at most 3.8e-7 relative (train MAE aside, see distribute_driver.EXAMPLES). The bounds below
leave ~4x (weights) and ~25x (metrics) headroom for other CPUs' kernels, while a real bug, e.g.
dividing each replica's loss by 2 x its local batch size, moves weights by ~1e-2.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tapework.distribute import LOGICAL_CPUS_ENV, configure_environment, configure_logical_cpus, distribute_dataset, is_chief, make_strategy
from tapework.errors import EnvironmentSettingError
from tapework.models import weights_dict
from tests.conftest import tool_env
from tests.distribute_driver import tiny_shards, train_tiny

DRIVER = Path(__file__).with_name("distribute_driver.py")
WEIGHTS_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
METRICS_TOLERANCE = {"rel": 1e-5, "abs": 1e-6}
PROCESS_TIMEOUT = 240  # seconds for a whole group of processes; a hung collective must fail the test, not hang it


def run_processes(tmp_path: Path, runs: dict[str, tuple[list[str], dict[str, str]]], returncode: int = 0) -> dict[str, str]:
    """Start one driver process per run (name -> (driver args, extra env)) at once; returns each one's
    log, after checking that every process exited with `returncode`.

    Workers of one cluster must run concurrently, so all start before any is waited on; every
    process is killed in `finally`, whatever happens.
    """
    processes = {}
    logs = {name: tmp_path / f"{name}.log" for name in runs}
    try:
        for name, (args, env) in runs.items():
            with logs[name].open("w") as log:
                command = [sys.executable, str(DRIVER), str(tmp_path / name), *args]
                processes[name] = subprocess.Popen(command, env=tool_env(**env), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + PROCESS_TIMEOUT
        for process in processes.values():
            process.wait(timeout=max(deadline - time.monotonic(), 0))
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    texts = {name: path.read_text() for name, path in logs.items()}
    for name, process in processes.items():
        assert process.returncode == returncode, f"{name} exited with {process.returncode}:\n{texts[name][-4000:]}"
    return texts


def load_run(prefix: Path) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(prefix.with_suffix(".npz")) as arrays:
        weights = {name: arrays[name] for name in arrays.files}
    return weights, json.loads(prefix.with_suffix(".json").read_text())


def assert_close_to(reference: tuple[dict[str, np.ndarray], list[dict]], weights: dict[str, np.ndarray], history: list[dict]) -> None:
    reference_weights, reference_history = reference
    assert weights.keys() == reference_weights.keys()
    for name, expected in reference_weights.items():
        np.testing.assert_allclose(weights[name], expected, err_msg=name, **WEIGHTS_TOLERANCE)
    assert len(history) == len(reference_history)
    for row, expected in zip(history, reference_history):
        assert row.keys() == expected.keys()
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, **METRICS_TOLERANCE), f"epoch {expected['epoch']} {key}"


def free_ports(count: int) -> list[int]:
    """Ports the OS says are free (bound to port 0); held open together so they differ."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def worker_runs(args: list[str], tmp_dir: Path, count: int = 2) -> dict[str, tuple[list[str], dict[str, str]]]:
    """One driver run per worker of a local cluster, each with its TF_CONFIG (worker 0 is the chief)."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(count)]}
    return {
        # TMPDIR: where non-chief workers keep their private checkpoints, so the test can check they are gone.
        f"worker{index}": (args, {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}), "TMPDIR": str(tmp_dir)})
        for index in range(count)
    }


@pytest.fixture(scope="module")
def reference():
    """Single-device (distribute: none) weights and history per task, computed once per module."""
    cache: dict[str, tuple[dict[str, np.ndarray], list[dict]]] = {}

    def get(task: str) -> tuple[dict[str, np.ndarray], list[dict]]:
        if task not in cache:
            result = train_tiny(task)
            cache[task] = (weights_dict(result.model), result.history)
        return cache[task]

    return get


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """MirroredStrategy runs on 2 logical CPUs per (task, steps_per_execution), computed once per module."""
    cache: dict[tuple[str, int], tuple[dict[str, np.ndarray], dict, str]] = {}

    def get(task: str, steps_per_execution: int) -> tuple[dict[str, np.ndarray], dict, str]:
        key = (task, steps_per_execution)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"mirrored_{task}_{steps_per_execution}")
            args = ["--distribute", "mirrored", "--task", task, "--steps-per-execution", str(steps_per_execution)]
            log = run_processes(folder, {"run": (args, {LOGICAL_CPUS_ENV: "2"})})["run"]
            cache[key] = (*load_run(folder / "run"), log)
        return cache[key]

    return get


@pytest.mark.timeout(300)
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_mirrored_on_two_logical_cpus_matches_single_device(task, reference, mirrored):
    weights, report, log = mirrored(task, 1)
    assert "mirrored with 2 replica(s) in sync" in log  # really two replicas, not a silent fallback to one
    assert_close_to(reference(task), weights, report["history"])


@pytest.mark.timeout(300)
def test_mirrored_with_steps_per_execution_matches_single_device_and_one_step_per_call(reference, mirrored):
    # 8 steps per epoch run as 3 + 3 + 2: the last call stops early inside the compiled loop.
    weights, report, log = mirrored("classification", 3)
    assert "mirrored with 2 replica(s) in sync" in log
    assert_close_to(reference("classification"), weights, report["history"])
    one_step_weights, one_step_report, _ = mirrored("classification", 1)
    assert report["history"] == one_step_report["history"]  # same ops in the same order: bitwise equal
    for name, array in one_step_weights.items():
        np.testing.assert_array_equal(weights[name], array, err_msg=name)


@pytest.mark.timeout(300)
def test_multi_worker_matches_single_device_and_only_the_chief_writes(reference, tmp_path):
    checkpoints, logs, worker_tmp = tmp_path / "checkpoints", tmp_path / "logs", tmp_path / "worker_tmp"
    worker_tmp.mkdir()
    args = ["--distribute", "multi_worker", "--checkpoint-dir", str(checkpoints), "--log-dir", str(logs)]
    texts = run_processes(tmp_path, worker_runs(args, worker_tmp))
    (chief_weights, chief), (other_weights, other) = load_run(tmp_path / "worker0"), load_run(tmp_path / "worker1")
    assert chief["chief"] and not other["chief"]
    for text in texts.values():
        assert "multi_worker with 2 replica(s) in sync" in text  # one replica per worker, kept in sync
    assert_close_to(reference("classification"), chief_weights, chief["history"])
    # Every worker holds the same synchronised weights and computes the same (all-reduced) metrics.
    assert other["history"] == chief["history"]
    for name, array in chief_weights.items():
        np.testing.assert_array_equal(other_weights[name], array, err_msg=name)

    # Outputs: the chief's checkpoints only, TensorBoard events from the chief's process only.
    expected = {"checkpoint"} | {f"ckpt-{epoch}.{suffix}" for epoch in (1, 2) for suffix in ("index", "data-00000-of-00001")}
    assert {path.name for path in checkpoints.iterdir()} == expected
    events = sorted(logs.rglob("events.out.tfevents.*"))
    assert [path.parent.name for path in events] == ["train", "val"]
    assert all(f".{chief['pid']}." in path.name for path in events), events
    assert list(worker_tmp.iterdir()) == []  # the non-chief's private checkpoints were deleted


@pytest.mark.timeout(300)
def test_multi_worker_resume_with_steps_per_execution_matches_single_device(reference, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    args = ["--distribute", "multi_worker", "--steps-per-execution", "3", "--checkpoint-dir", str(checkpoints)]
    first = tmp_path / "first"
    first.mkdir()
    run_processes(first, worker_runs([*args, "--stop-after-epochs", "1"], tmp_path))  # "crash" after epoch 1
    assert {path.name for path in checkpoints.iterdir()} >= {"checkpoint", "ckpt-1.index"}
    texts = run_processes(tmp_path, worker_runs(args, tmp_path))
    assert "resumed from the chief's checkpoint" in texts["worker1"]  # the non-chief resumed too, read-only
    weights, report = load_run(tmp_path / "worker0")
    assert [row["epoch"] for row in report["history"]] == [1, 2]
    assert_close_to(reference("classification"), weights, report["history"])


@pytest.mark.timeout(300)
def test_mirrored_on_shards_matches_single_device_on_shards(tmp_path):
    # One worker reads every shard; the replicas split each streamed global batch, as with arrays.
    log = run_processes(tmp_path, {"run": (["--distribute", "mirrored", "--shards", str(tmp_path / "mirrored")], {LOGICAL_CPUS_ENV: "2"})})["run"]
    assert "mirrored with 2 replica(s) in sync" in log
    single = train_tiny(data=tiny_shards("classification", tmp_path / "single", 40))
    weights, report = load_run(tmp_path / "run")
    assert_close_to((weights_dict(single.model), single.history), weights, report["history"])


@pytest.mark.timeout(300)
def test_multi_worker_on_shards_reads_own_files_and_counts_each_example_once(tmp_path):
    # 249 examples in shards of 40: worker 0 reads shards 0, 2, 4, 6 (129 examples), worker 1 shards 1, 3, 5 (120),
    # so worker 1 runs out first and the distributed iterator must carry it through worker 0's last batches.
    learning_rate = 1e-9  # the weights barely move: the epoch's train metrics are those of one fixed model over the split
    args = ["--distribute", "multi_worker", "--shards", str(tmp_path / "shards"), "--shard-size", "40", "--learning-rate", str(learning_rate)]
    texts = run_processes(tmp_path, worker_runs(args, tmp_path))
    assert "worker 0 of 2 reads its own 4 shard file(s), 129 examples" in texts["worker0"]
    assert "worker 1 of 2 reads its own 3 shard file(s), 120 examples" in texts["worker1"]
    (_, chief), (_, other) = load_run(tmp_path / "worker0"), load_run(tmp_path / "worker1")
    assert other["history"] == chief["history"]
    single = train_tiny(learning_rate=learning_rate).history
    for row, expected in zip(chief["history"], single, strict=True):
        # Accuracy is a count over the split: equal only if every example counted exactly once.
        assert row["train_accuracy"] == expected["train_accuracy"], row
        assert row["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
        assert row["val_accuracy"] == expected["val_accuracy"]


@pytest.mark.timeout(300)
def test_multi_worker_on_shards_refuses_a_batch_the_workers_cannot_split(tmp_path):
    args = ["--distribute", "multi_worker", "--shards", str(tmp_path / "shards"), "--batch-size", "25"]
    texts = run_processes(tmp_path, worker_runs(args, tmp_path), returncode=1)  # the driver lets the DataError end it
    for text in texts.values():
        assert "DataError: train.batch_size = 25 does not split evenly over the 2 workers that each read their own shards; use a multiple of 2" in text, text[-3000:]
        assert "epoch 1/" not in text


def nonfinite_steps_under_mirrored() -> None:
    """Body of the next test, run in a fresh process: only replica 1's half of one batch holds a NaN target.

    Both replicas must still agree to skip that step (the flag is all-reduced): a replica that applied
    its update alone would wait forever for the other in the gradient all-reduce.
    """
    configure_logical_cpus(2)
    import keras

    from tapework.batching import make_dataset
    from tapework.loop import TaskSpec, make_train_function
    from tapework.metrics import MetricSet
    from tests.test_loop import tiny_mlp

    strategy = make_strategy("mirrored")
    inputs = np.ones((12, 6), np.float32)
    targets = np.array([1, 2, 3, 4, 5, 6, np.nan, 8, 9, 10, 11, 12], np.float32)  # batch 2 = [5, 6 | nan, 8]
    for stop_on_nonfinite, expected in ((True, (2, 1, 1)), (False, (3, 1, 2))):
        with strategy.scope():
            model = tiny_mlp(classes=1)
            optimizer = keras.optimizers.SGD(0.01)
            optimizer.build(model.trainable_variables)
            metrics = MetricSet("regression", 0, 1.0)
        run = make_train_function(model, optimizer, TaskSpec("regression", 1), metrics, steps_per_execution=8, stop_on_nonfinite=stop_on_nonfinite, strategy=strategy)
        steps, bad = run(iter(distribute_dataset(strategy, make_dataset(inputs, targets, batch_size=4))))
        # (steps run, non-finite steps, optimizer updates): stop mode ends at the bad step, skip mode carries on.
        counts = (int(steps), int(bad), int(optimizer.iterations.numpy()))  # int() of a mirrored Keras variable fails
        assert counts == expected, counts
        assert all(np.isfinite(variable.numpy()).all() for variable in model.trainable_variables)
    print("nonfinite-ok")


@pytest.mark.timeout(300)
def test_nonfinite_loss_on_one_replica_is_skipped_by_all(tmp_path):
    command = [sys.executable, "-c", "from tests.test_distribute import nonfinite_steps_under_mirrored as run; run()"]
    result = subprocess.run(command, cwd=DRIVER.parents[1], env=tool_env(), capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    assert result.returncode == 0 and "nonfinite-ok" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]


# --- issue 16: the environment a run reads ---------------------------------------------------------


def tf_config(kind: str, index: int, **cluster: list[str]) -> str:
    return json.dumps({"cluster": cluster or {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": kind, "index": index}})


@pytest.mark.parametrize(
    ("config", "kind", "chief"),
    [
        (None, "none", True),
        (None, "multi_worker", True),
        (tf_config("worker", 0), "multi_worker", True),
        (tf_config("worker", 1), "multi_worker", False),
        (tf_config("worker", 0, chief=["127.0.0.1:3"], worker=["127.0.0.1:1"]), "multi_worker", False),
        (tf_config("chief", 0, chief=["127.0.0.1:3"], worker=["127.0.0.1:1"]), "multi_worker", True),
        (tf_config("worker", 1), "none", True),  # the chief rule is multi_worker's only (and configure_environment refuses this)
        (tf_config("worker", 1), "mirrored", True),
    ],
)
def test_is_chief_applies_the_worker_rule_only_under_multi_worker(monkeypatch: pytest.MonkeyPatch, config, kind, chief) -> None:
    if config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", config)
    assert is_chief(kind) is chief


@pytest.mark.parametrize(
    ("variable", "value", "kind", "message"),
    [
        ("TF_CONFIG", tf_config("worker", 1), "none", "TF_CONFIG is set (worker 1 of a 2-process cluster) but train.distribute is 'none'"),
        ("TF_CONFIG", tf_config("worker", 0), "mirrored", "but train.distribute is 'mirrored': unset TF_CONFIG for a one-process run, or set train.distribute: multi_worker"),
        ("TF_CONFIG", "{cluster: ", "multi_worker", "TF_CONFIG is invalid (not JSON: "),
        ("TF_CONFIG", "[1, 2]", "multi_worker", "TF_CONFIG is invalid (not a JSON object)"),
        ("TF_CONFIG", '{"cluster": {"worker": "127.0.0.1:1"}, "task": {"type": "worker", "index": 0}}', "multi_worker", "'cluster' must map task types to lists"),
        ("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": "0"}}', "multi_worker", "'task' must hold a 'type' and an integer 'index'"),
        ("TF_CONFIG", tf_config("worker", 2), "multi_worker", "task worker 2 is not in the cluster"),
        ("TF_CONFIG", tf_config("ps", 0), "multi_worker", "task ps 0 is not in the cluster"),
        (LOGICAL_CPUS_ENV, "abc", "mirrored", "TAPEWORK_LOGICAL_CPUS='abc' is invalid: set it to an integer from 1 to 256"),
        (LOGICAL_CPUS_ENV, "0", "mirrored", "TAPEWORK_LOGICAL_CPUS='0' is invalid"),
        (LOGICAL_CPUS_ENV, "-2", "mirrored", "TAPEWORK_LOGICAL_CPUS='-2' is invalid"),
        (LOGICAL_CPUS_ENV, "100000000", "none", "TAPEWORK_LOGICAL_CPUS='100000000' is invalid"),
        (LOGICAL_CPUS_ENV, "2.5", "mirrored", "TAPEWORK_LOGICAL_CPUS='2.5' is invalid"),
    ],
)
def test_malformed_or_contradicting_environment_is_one_line(monkeypatch: pytest.MonkeyPatch, variable, value, kind, message) -> None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.setenv(variable, value)
    with pytest.raises(EnvironmentSettingError) as caught:
        configure_environment(kind)  # raises before TensorFlow's devices are touched
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert "unset it" in str(caught.value) or "unset TF_CONFIG" in str(caught.value)
