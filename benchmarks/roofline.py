"""Roofline of the train step: a model's FLOPs per example against what this CPU sustains in plain
matmuls, and where an epoch's time goes (compute, input pipeline, validation).

    python benchmarks/roofline.py                    # residual_mlp and mlp, batch 32, 64 and 256
    python benchmarks/roofline.py --models residual_mlp --batches 32
    python benchmarks/roofline.py --quick            # smoke test: small data, one batch size

Everything runs as the pipeline runs it: op determinism on, params.yaml's train settings
(steps_per_execution, jit_compile), float32, Fashion-MNIST-shaped data (55,000 training and
5,000 validation examples of 28x28x1 uint8, random and learnable, as in loop_vs_fit.py).

1. Matmul rate. The model's own matmul shapes at each batch size, in one XLA-compiled function:
   for every Dense kernel (in, out), the forward (B x in @ in x out) and both backward products
   (B x out @ out x in, in x B @ B x out), as plain MatMul ops (not XLA, whose simplifier could
   fold the benchmark's sums away) in a loop of 50 rounds. Also a 1024 x 1024 x 1024 matmul, the
   CPU's rate on a large problem. GFLOP/s = 2 m k n per product over the median time of
   `--repeats` calls.
2. FLOPs. Per training example 6 x sum(in x out) over the Dense kernels (forward 2, backward 4),
   per validation example 2 x sum(in x out); the element-wise work (normalisation, activations,
   Adam, metrics) is left out, so the bound is a floor. The roofline time of an epoch is its
   FLOPs over the matmul rate at the same shapes.
3. Epoch split, each the median of `--repeats` epochs after one warm-up: epoch: the project's
   train function (tapework.loop.make_train_function, as train() builds it) over the epoch's real
   dataset (tapework.batching.make_dataset, a new one per epoch as train() does); resident batch:
   the same steps on one batch held in memory (Dataset.from_tensors(...).repeat), so
   epoch - resident is what the input pipeline adds; validation: tapework.loop.Evaluator over
   the 5,000 validation examples. achieved GFLOP/s and of_roofline use the real epoch.
4. With --profile, one more epoch per model and batch under tf.profiler, split into the compiled
   step's matmuls, its fused element-wise kernels (Adam, activations, metrics), its other kernels,
   and the time outside the compiled step (the in-graph loop over steps, the iterator, Python).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tapework.quiet import quiet_stage_process  # noqa: E402

quiet_stage_process()  # TensorFlow's start-up lines, as in every stage process

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tapework.batching import make_dataset, steps_per_epoch  # noqa: E402
from tapework.loop import Evaluator, TaskSpec, make_train_function  # noqa: E402
from tapework.metrics import MetricSet  # noqa: E402
from tapework.models import build_model, model_config  # noqa: E402
from tapework.optim import make_optimizer  # noqa: E402
from tapework.params import load_params  # noqa: E402
from tapework.training import configure_determinism  # noqa: E402
from tools.machine import machine_description  # noqa: E402

CLASSES = 10
FASHION_TRAIN = 55_000  # the run this benchmark stands for: the pipeline on Fashion-MNIST (54,000-55,000 training examples)


def synthetic(samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST-shaped uint8 images whose class shifts their mean: learnable, like loop_vs_fit's data."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, samples).astype(np.int32)
    images = np.clip(rng.normal(labels[:, None, None, None] * 20 + 40, 40, (samples, 28, 28, 1)), 0, 255).astype(np.uint8)
    return images, labels


def dense_kernels(model: keras.Model) -> list[tuple[int, int]]:
    """(in, out) of every Dense kernel in the model."""
    return [tuple(int(size) for size in variable.shape) for variable in model.trainable_variables if len(variable.shape) == 2]


def timed(function: Any, repeats: int) -> float:
    function()  # trace and compile
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def matmul_rate(kernels: list[tuple[int, int]], batch: int, repeats: int, chain: int = 50) -> float:
    """GFLOP/s of the model's forward and backward matmul shapes at `batch`: plain MatMul kernels, `chain` rounds per call."""
    rng = np.random.default_rng(0)
    tensors = [
        (tf.constant(rng.normal(size=(batch, fan_in)), tf.float32), tf.constant(rng.normal(size=(fan_in, fan_out)), tf.float32), tf.constant(rng.normal(size=(batch, fan_out)), tf.float32))
        for fan_in, fan_out in kernels
    ]

    # No XLA here: its algebraic simplifier may rewrite a sum of a product into a product of sums.
    @tf.function
    def products() -> tf.Tensor:
        total = tf.constant(0.0)
        for round_number in tf.range(chain):
            shift = tf.cast(round_number, tf.float32)  # new inputs each round: nothing to hoist or deduplicate
            for inputs, kernel, upstream in tensors:
                total += tf.reduce_sum(tf.matmul(inputs + shift, kernel))
                total += tf.reduce_sum(tf.matmul(upstream + shift, kernel, transpose_b=True))
                total += tf.reduce_sum(tf.matmul(inputs + shift, upstream, transpose_a=True))
        return total

    seconds = timed(lambda: products().numpy(), repeats)
    flops = chain * sum(3 * 2 * batch * fan_in * fan_out for fan_in, fan_out in kernels)
    return flops / seconds / 1e9


def large_matmul_rate(repeats: int, size: int = 1024, chain: int = 10) -> float:
    a = tf.random.stateless_normal((size, size), seed=(1, 2))
    b = tf.random.stateless_normal((size, size), seed=(3, 4))

    @tf.function
    def product() -> tf.Tensor:
        total = tf.constant(0.0)
        for round_number in tf.range(chain):
            total += tf.reduce_sum(tf.matmul(a + tf.cast(round_number, tf.float32), b))
        return total

    return chain * 2 * size**3 / timed(lambda: product().numpy(), repeats) / 1e9


def epoch_split(model_name: str, batch: int, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, repeats: int) -> dict[str, Any]:
    """Median seconds of the real epoch, of the same steps on one resident batch, and of validation."""
    params = load_params(ROOT / "params.yaml", {"train.model": model_name, "train.batch_size": batch}).train
    configure_determinism(params.seed)
    steps = steps_per_epoch(len(x), batch, params.drop_remainder)
    offset, scale = [float(x.mean())], [float(x.std())]
    model = build_model(model_config(params, (28, 28, 1), CLASSES, offset, scale))
    optimizer = make_optimizer(params, steps)
    optimizer.build(model.trainable_variables)
    spec = TaskSpec("classification", CLASSES)
    metrics = MetricSet("classification", CLASSES, params.huber_delta)
    # jit_compile: auto decides as for `dvc repro` on Fashion-MNIST at params.yaml's epochs (--quick too).
    pipeline_steps = steps_per_epoch(FASHION_TRAIN, batch, params.drop_remainder) * params.epochs
    run = make_train_function(model, optimizer, spec, metrics, steps_per_execution=params.steps_per_execution, jit_compile=params.use_xla(pipeline_steps))
    evaluator = Evaluator(model, spec, MetricSet("classification", CLASSES, params.huber_delta), params.steps_per_execution)
    resident = tf.data.Dataset.from_tensors((tf.constant(x[:batch]), tf.constant(y[:batch]))).repeat(steps)
    val_dataset = make_dataset(x_val, y_val, batch)

    def drain(dataset: tf.data.Dataset) -> None:
        iterator = iter(dataset)
        while int(run(iterator)[0]) == params.steps_per_execution:
            pass
        metrics.results()

    epoch = iter(range(1, 10_000))
    def profile(folder: Path) -> dict[str, float]:
        return profile_epoch(drain, lambda: make_dataset(x, y, batch, seed=params.seed, epoch=next(epoch), drop_remainder=params.drop_remainder), folder)

    return {
        "steps": steps,
        "profile": profile,
        "flops_kernels": dense_kernels(model),
        "resident": timed(lambda: drain(resident), repeats),
        "epoch": timed(lambda: drain(make_dataset(x, y, batch, seed=params.seed, epoch=next(epoch), drop_remainder=params.drop_remainder)), repeats),
        "validation": timed(lambda: evaluator(val_dataset), repeats),
    }


def profile_epoch(run: Any, make_epoch: Any, folder: Path) -> dict[str, float]:
    """One epoch under tf.profiler, split into XLA's matmuls, its fused element-wise kernels, its
    other kernels, and the time outside the compiled step (the in-graph loop, the iterator, Python).

    Reads the profile's XSpace protobuf (TensorFlow's own xplane_pb2): the compiled step's kernels
    are events on TensorFlow's compute threads, named after their HLO instruction.
    """
    import glob
    import re

    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    tf.profiler.experimental.start(str(folder))
    started = time.perf_counter()
    run(make_epoch())
    seconds = time.perf_counter() - started
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    space.ParseFromString(Path(glob.glob(f"{folder}/plugins/profile/*/*.xplane.pb")[0]).read_bytes())
    plane = next(plane for plane in space.planes if plane.name == "/host:CPU")
    names = {key: value.name for key, value in plane.event_metadata.items()}
    split = {"epoch": seconds, "executable": 0.0, "matmul": 0.0, "fusion": 0.0, "other_kernels": 0.0}
    for line in plane.lines:
        for event in line.events:
            name, seconds_spent = names.get(event.metadata_id, ""), event.duration_ps / 1e12
            if name == "CpuExecutable::ExecuteAsyncOnStream":
                split["executable"] += seconds_spent
            elif not line.name.startswith("tf_") or name.startswith(("ThunkExecutor", "CpuExecutable", "BlockUntilReady", "ExecutorState", "Iterator", "Prefetch", "InstantiatedCapturedFunction", "end: ")):
                continue
            elif re.search(r"(?i)matmul|dot", name):
                split["matmul"] += seconds_spent
            elif "fusion" in name:
                split["fusion"] += seconds_spent
            elif name.startswith(("wrapped_", "copy", "cond")):
                split["other_kernels"] += seconds_spent
    split["outside_executable"] = split["epoch"] - split["executable"]
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="residual_mlp,mlp")
    parser.add_argument("--batches", default="32,64,256")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="6,000 examples, batch 64, 2 repeats")
    parser.add_argument("--profile", action="store_true", help="also one epoch under tf.profiler per model and batch: where its time goes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    train_size, val_size, batches, repeats = (5_500, 500, [64], 2) if args.quick else (FASHION_TRAIN, 5_000, [int(b) for b in args.batches.split(",")], args.repeats)
    x, y = synthetic(train_size + val_size, seed=0)
    x_train, y_train, x_val, y_val = x[:train_size], y[:train_size], x[train_size:], y[train_size:]
    print(f"MACHINE {machine_description()}", flush=True)
    large = large_matmul_rate(repeats)
    print(f"MATMUL 1024x1024x1024 gflops={large:.1f}", flush=True)
    report: dict[str, Any] = {"large_matmul_gflops": large, "rows": []}
    for model_name in args.models.split(","):
        for batch in batches:
            split = epoch_split(model_name, batch, x_train, y_train, x_val, y_val, repeats)
            kernels = split["flops_kernels"]
            rate = matmul_rate(kernels, batch, repeats)
            per_example = sum(fan_in * fan_out for fan_in, fan_out in kernels)
            flops = 6 * per_example * train_size
            bound = flops / (rate * 1e9)
            row = {
                "model": model_name, "batch": batch, "train_flops_per_example": 6 * per_example, "matmul_gflops": rate,
                "roofline_seconds": bound, "resident_batch_seconds": split["resident"], "epoch_seconds": split["epoch"],
                "validation_seconds": split["validation"], "achieved_gflops": flops / split["epoch"] / 1e9,
            }
            report["rows"].append(row)
            print(
                f"ROOFLINE model={model_name} batch={batch} train_mflops_per_example={6 * per_example / 1e6:.2f} "
                f"matmul_gflops={rate:.1f} roofline_s={bound:.3f} epoch_s={split['epoch']:.3f} resident_batch_s={split['resident']:.3f} "
                f"pipeline_s={split['epoch'] - split['resident']:+.3f} validation_s={split['validation']:.3f} "
                f"achieved_gflops={row['achieved_gflops']:.1f} of_roofline={bound / split['epoch']:.0%}",
                flush=True,
            )
            if args.profile:
                with tempfile.TemporaryDirectory(prefix="tapework-profile-") as folder:
                    row["profile"] = profile = split["profile"](Path(folder))
                print(
                    f"PROFILE model={model_name} batch={batch} epoch_s={profile['epoch']:.3f} xla_step_s={profile['executable']:.3f} "
                    f"matmul_s={profile['matmul']:.3f} fused_elementwise_s={profile['fusion']:.3f} "
                    f"other_kernels_s={profile['other_kernels']:.3f} outside_step_s={profile['outside_executable']:.3f}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
