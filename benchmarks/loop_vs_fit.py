"""Benchmark: the project's hand-written train loop against `model.fit`, in one process.

Same model for every variant (`build_model` of params.yaml's `mlp` and `residual_mlp`, same
initial weights), same data (Fashion-MNIST shaped: 60000 x 28 x 28 x 1 uint8), same optimizer
(Adam 1e-3), same loss (sparse categorical cross-entropy from logits). fit tracks loss mean +
accuracy; the loop tracks what train() tracks (tapework.metrics.MetricSet: loss mean, accuracy and
Huber):

  (a)  model.fit, default compile (on a CPU-only machine Keras resolves jit_compile="auto" to False)
  (b)  model.fit, compile(..., steps_per_execution=32)
  (b') model.fit, compile(..., steps_per_execution=32, jit_compile=True): the strongest fit. Keras
       drops XLA at compile() while op determinism is on, so (b') runs only with --no-determinism,
       and the benchmark checks `model.jit_compile` rather than trusting the label.
  (c)  the project's loop: tapework.loop.make_train_function + tapework.batching.make_dataset +
      tapework.metrics.MetricSet, driven as tapework.training.train drives it (a new dataset per
      epoch), at params.yaml's steps_per_execution and jit_compile, plus a steps_per_execution sweep

This is the only file in the repository that calls `fit`: it is the baseline.

    python benchmarks/loop_vs_fit.py                  # random (learnable) uint8 data, batch 32, 64 and 256
    python benchmarks/loop_vs_fit.py --both-determinism   # two processes, op determinism on and off: c/b'
    python benchmarks/loop_vs_fit.py --real path/to/fashion-mnist   # a folder with the IDX .gz files
    python benchmarks/loop_vs_fit.py --explore        # + the levers: XLA flipped, drop_remainder
    python benchmarks/loop_vs_fit.py --quick          # smoke test: tiny data, one batch size

Timing. Every variant of a batch size is built first; then the variants take turns, one epoch
each, in an order rotated every round, so a change of machine load (other jobs on a shared box)
hits all of them alike. Round 1 is the warm-up (tracing) and is not counted. An epoch is timed
from before its dataset/iterator is made to after its metrics are Python floats (fit: from
on_epoch_begin to on_epoch_end, with the logs turned into floats). samples/s is the median over
the measured epochs; a ratio X/Y is the median over rounds of Y's epoch time / X's epoch time in
the same round.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tapework import parsers  # noqa: E402
from tapework.batching import make_dataset, steps_per_epoch  # noqa: E402
from tapework.loop import TaskSpec, make_train_function  # noqa: E402
from tapework.metrics import MetricSet  # noqa: E402
from tapework.models import build_model, model_config  # noqa: E402
from tapework.params import TrainParams, load_params  # noqa: E402
from tapework.preprocess import normalization_stats  # noqa: E402
from tapework.training import step_grouping, train_epoch  # noqa: E402
from tools.machine import machine_description  # noqa: E402
from tools.workspace import ROOT  # noqa: E402

FASHION_TRAIN = 60_000  # the run this benchmark stands for: Fashion-MNIST's training images

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"


# --------------------------------------------------------------------------------------------
# Machine and data
# --------------------------------------------------------------------------------------------


def synthetic_data(samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images that are nonetheless learnable: a random template per class plus noise.

    Learnable on purpose, so that "fit and the loop reach the same loss" means something (on pure
    noise with random labels every trainer sits at ln(10)).
    """
    rng = np.random.default_rng(seed)
    # Low-contrast templates under heavy noise: a few epochs to learn, not one.
    templates = rng.integers(112, 144, size=(NUM_CLASSES, *IMAGE_SHAPE), dtype=np.int16)
    labels = rng.integers(0, NUM_CLASSES, size=samples).astype(np.int32)
    noise = rng.integers(-128, 129, size=(samples, *IMAGE_SHAPE), dtype=np.int16)
    images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels


def real_data(folder: Path, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The Fashion-MNIST train split as the project holds it: (N, 28, 28, 1) uint8, int32 labels."""
    images = parsers.parse_idx(folder / TRAIN_IMAGES)[..., np.newaxis]
    labels = parsers.parse_idx(folder / TRAIN_LABELS).astype(np.int32)
    parsers.check_counts(images, labels, name=str(folder))
    return images[:samples], labels[:samples]


# --------------------------------------------------------------------------------------------
# Model and optimizer: identical for every variant
# --------------------------------------------------------------------------------------------


def make_config(images: np.ndarray, seed: int, model: str = "mlp") -> dict[str, Any]:
    """The project's model config for params.yaml's `model` section, standardised with the data's stats."""
    train = dataclasses.replace(load_params(ROOT / "params.yaml").train, model=model, seed=seed, l2=0.0)
    offset, scale = normalization_stats(images, "standard", image=True)
    return model_config(train, images.shape[1:], NUM_CLASSES, offset, scale)


def fresh_model(config: dict[str, Any], seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)  # same initial weights and dropout seeds for every variant
    return build_model(config)


def make_optimizer() -> keras.optimizers.Optimizer:
    return keras.optimizers.Adam(learning_rate=1e-3)


# --------------------------------------------------------------------------------------------
# Trainers: one per variant; each runs one epoch per call
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    key: str
    label: str
    batch_size: int
    samples: int
    model: str = "mlp"
    epoch_seconds: list[float] = dataclasses.field(default_factory=list)  # warm-up epoch first
    losses: list[float] = dataclasses.field(default_factory=list)
    accuracies: list[float] = dataclasses.field(default_factory=list)
    note: str = ""

    @property
    def measured(self) -> list[float]:
        return self.epoch_seconds[1:] or self.epoch_seconds

    @property
    def samples_per_second(self) -> float:
        return self.samples / statistics.median(self.measured)


class _EpochTimer(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        {key: float(value) for key, value in (logs or {}).items()}  # as the loop: results are floats
        self.seconds.append(time.perf_counter() - self._started)


class FitTrainer:
    def __init__(self, outcome: Outcome, x: np.ndarray, y: np.ndarray, config: dict[str, Any], seed: int, steps_per_execution: int, jit_compile: Any = "auto") -> None:
        self.outcome, self.x, self.y = outcome, x, y
        self.model = fresh_model(config, seed)
        self.model.compile(
            optimizer=make_optimizer(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            steps_per_execution=steps_per_execution,
            jit_compile=jit_compile,
        )
        self.timer = _EpochTimer()
        if jit_compile is True and self.model.jit_compile is not True:
            raise AssertionError(f"{outcome.label}: Keras compiled without XLA (jit_compile={self.model.jit_compile}); op determinism turns it off")
        self.outcome.note = f"jit_compile={self.model.jit_compile}"

    def epoch(self, number: int) -> None:
        # One fit call per epoch (so variants can take turns); the compiled train function is
        # kept between calls, and the timer excludes fit's per-call setup.
        history = self.model.fit(self.x, self.y, batch_size=self.outcome.batch_size, epochs=number, initial_epoch=number - 1, shuffle=True, verbose=0, callbacks=[self.timer])
        self.outcome.epoch_seconds.append(self.timer.seconds[-1])
        self.outcome.losses.append(float(history.history["loss"][-1]))
        self.outcome.accuracies.append(float(history.history["accuracy"][-1]))


class LoopTrainer:
    """One epoch as tapework.training.train runs it (train_epoch), minus validation, checkpoints and logging."""

    def __init__(
        self,
        outcome: Outcome,
        x: np.ndarray,
        y: np.ndarray,
        config: dict[str, Any],
        seed: int,
        steps_per_execution: int,
        *,
        drop_remainder: bool = False,
        jit_compile: bool = False,
        policy: str = "float32",
    ) -> None:
        self.outcome, self.seed = outcome, seed
        self.inputs, self.labels = tf.constant(x), tf.constant(y)  # converted once, as split_dataset keeps a split's tensors
        self.drop_remainder = drop_remainder
        # What train_epoch reads: steps per call, and stop with an error on a non-finite loss.
        self.params = dataclasses.replace(load_params(ROOT / "params.yaml").train, steps_per_execution=steps_per_execution, on_nonfinite="error")
        keras.mixed_precision.set_dtype_policy(policy)  # layers take the policy in force when they are built
        try:
            self.model = fresh_model(config, seed)
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
        self.optimizer = make_optimizer()
        self.optimizer.build(self.model.trainable_variables)  # slots must exist before the first traced step
        self.metrics = MetricSet("classification", NUM_CLASSES, self.params.huber_delta)  # what train() tracks for this task
        spec = TaskSpec("classification", NUM_CLASSES)
        # One device, arrays: the steps grouped as train() groups them.
        grouping = step_grouping(steps_per_execution, outcome.batch_size, jit_compile, one_device_arrays=True)
        self.stack = grouping.stack
        self.run = make_train_function(self.model, self.optimizer, spec, self.metrics, steps_per_execution=steps_per_execution, jit_compile=jit_compile, stacked=bool(grouping.stack), full_batch=grouping.full_batch)
        self.steps = steps_per_epoch(len(x), outcome.batch_size, drop_remainder)

    def epoch(self, number: int) -> None:
        steps_before = int(self.optimizer.iterations)
        started = time.perf_counter()
        self.metrics.reset()
        dataset = make_dataset(self.inputs, self.labels, self.outcome.batch_size, seed=self.seed, epoch=number, drop_remainder=self.drop_remainder, stack=self.stack)
        train_epoch(self.run, dataset, self.steps, number, self.params)  # the epoch driver tapework.training.train uses
        results = self.metrics.results()
        self.outcome.epoch_seconds.append(time.perf_counter() - started)
        done = int(self.optimizer.iterations) - steps_before
        if done != self.steps:
            raise AssertionError(f"{self.outcome.label}: applied {done} steps in epoch {number}, expected {self.steps}")
        self.outcome.losses.append(results["loss"])
        self.outcome.accuracies.append(results["accuracy"])
        self.outcome.note = f"traces={self.run.experimental_get_tracing_count()}"


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def pipeline_settings(model: str, batch_size: int) -> tuple[TrainParams, int]:
    """params.yaml's train settings for `model`, and the train steps of the run that `jit_compile:
    auto` weighs for them: `dvc repro` on Fashion-MNIST at params.yaml's epochs."""
    defaults = dataclasses.replace(load_params(ROOT / "params.yaml").train, model=model)
    return defaults, steps_per_epoch(FASHION_TRAIN, batch_size, defaults.drop_remainder) * defaults.epochs


def variants(args: argparse.Namespace, defaults: TrainParams, run_steps: int) -> list[tuple[str, str, Callable[..., Any], dict[str, Any]]]:
    """(key, label, trainer class, trainer kwargs); keys a, b, c are the issue's three.

    (c) runs at params.yaml's train settings (steps_per_execution, jit_compile resolved for the
    model and a run of `run_steps` steps): the loop as `dvc repro` runs it. (b') exists only with
    op determinism off.
    """
    spe, jit = defaults.steps_per_execution, defaults.use_xla(run_steps)
    loop = {"steps_per_execution": spe, "jit_compile": jit}
    rows: list[tuple[str, str, Callable[..., Any], dict[str, Any]]] = [
        ("a", "(a) fit", FitTrainer, {"steps_per_execution": 1}),
        ("b", "(b) fit spe=32", FitTrainer, {"steps_per_execution": 32}),
    ]
    if not args.determinism:
        rows.append(("b-xla", "(b') fit spe=32 jit_compile=True, op determinism off", FitTrainer, {"steps_per_execution": 32, "jit_compile": True}))
    rows.append(("c", f"(c) loop spe={spe} jit={jit} (params.yaml)", LoopTrainer, loop))
    for other in args.sweep:
        if other != spe:
            rows.append((f"c-spe{other}", f"(c) loop spe={other} jit={jit}", LoopTrainer, {**loop, "steps_per_execution": other}))
    if args.explore:
        rows += [
            ("c-jit-flip", f"(c) loop spe={spe} jit={not jit}", LoopTrainer, {**loop, "jit_compile": not jit}),
            ("c-drop-remainder", "(c) loop, drop_remainder", LoopTrainer, {**loop, "drop_remainder": True}),
        ]
        if not args.determinism:  # Keras turns fit's XLA off under op determinism
            rows.append(("a-jit", "(a) fit, jit_compile=True", FitTrainer, {"steps_per_execution": 1, "jit_compile": True}))
    if args.bf16:  # train.mixed_precision: bfloat16 against float32, each with XLA as params.yaml has it and flipped
        rows += [
            ("c-bf16", f"(c) loop spe={spe} jit={jit} mixed_bfloat16", LoopTrainer, {**loop, "policy": "mixed_bfloat16"}),
            ("c-bf16-jit-flip", f"(c) loop spe={spe} jit={not jit} mixed_bfloat16", LoopTrainer, {**loop, "jit_compile": not jit, "policy": "mixed_bfloat16"}),
        ]
        if not args.explore:
            rows.append(("c-jit-flip", f"(c) loop spe={spe} jit={not jit}", LoopTrainer, {**loop, "jit_compile": not jit}))
    if args.only:
        rows = [row for row in rows if row[0] in args.only or row[0] in ("a", "b", "b-xla", "c")]
    return rows


def paired_ratio(numerator: Outcome, denominator: Outcome) -> float:
    """Median over measured rounds of denominator's epoch time / numerator's: throughput ratio."""
    pairs = list(zip(numerator.measured, denominator.measured))
    return statistics.median(d / n for n, d in pairs)


def describe(outcome: Outcome, reference: Outcome | None) -> str:
    spread = ", ".join(f"{outcome.samples / s:,.0f}" for s in outcome.measured)
    versus = f"  vs (a) {paired_ratio(outcome, reference):.2f}x" if reference is not None else ""
    return (
        f"RESULT {outcome.model:<12} {outcome.label:<58} batch={outcome.batch_size:<4} samples/s={outcome.samples_per_second:>9,.0f}{versus}  "
        f"(epochs: {spread}; warm-up {outcome.epoch_seconds[0]:.2f}s)  final loss={outcome.losses[-1]:.4f} "
        f"acc={outcome.accuracies[-1]:.4f}  {outcome.note}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5, help="measured epochs per variant, after one warm-up epoch (default 5)")
    parser.add_argument("--batch-sizes", default="32,64,256", help="comma-separated (default 32,64,256)")
    parser.add_argument("--models", default="mlp,residual_mlp", help="params.yaml model families, comma-separated (default mlp,residual_mlp)")
    parser.add_argument("--sweep", default="1,8,32", help="steps_per_execution values for the loop (default 1,8,32)")
    parser.add_argument("--samples", type=int, default=FASHION_TRAIN, help=f"training examples (default {FASHION_TRAIN})")
    parser.add_argument("--real", type=Path, metavar="PATH", help="folder with the Fashion-MNIST IDX .gz files, instead of random data")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--explore", action="store_true", help="also run the levers: XLA flipped, drop_remainder (with --no-determinism also fit with jit_compile=True)")
    parser.add_argument("--only", default="", help="with --explore: comma-separated variant keys to keep besides a, b, c")
    parser.add_argument("--no-determinism", dest="determinism", action="store_false", help="skip tf.config.experimental.enable_op_determinism() (train() enables it)")
    parser.add_argument("--intra-op", type=int, default=0, help="intra-op threads (0: TensorFlow's default)")
    parser.add_argument("--inter-op", type=int, default=0, help="inter-op threads (0: TensorFlow's default)")
    parser.add_argument("--bf16", action="store_true", help="also the loop under Keras's mixed_bfloat16 policy (train.mixed_precision: bfloat16), with XLA on and off")
    parser.add_argument("--both-determinism", action="store_true", help="run this benchmark twice, in two processes (op determinism on, then off), and print c/b' for each")
    parser.add_argument("--quick", action="store_true", help="smoke test: 4096 examples, batch 64, the variants at params.yaml's settings (no sweep), 1+2 epochs, each model")
    parser.add_argument("--json", type=Path, help="also write every outcome to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.batch_sizes, args.epochs, args.sweep, args.explore = min(args.samples, 4096), "64", 2, "", False
    args.batch_sizes = [int(item) for item in args.batch_sizes.split(",") if item]
    args.models = [item for item in args.models.split(",") if item]
    args.sweep = [int(item) for item in args.sweep.split(",") if item]
    args.only = [item for item in args.only.split(",") if item]
    return args


def run_one_setting(args: argparse.Namespace) -> int:
    tf.config.threading.set_intra_op_parallelism_threads(args.intra_op)
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)
    if args.determinism:
        tf.config.experimental.enable_op_determinism()  # as tapework.training.train does
    machine = machine_description()
    threads = f"intra-op {args.intra_op or 'default'}, inter-op {args.inter_op or 'default'}, op determinism {'on' if args.determinism else 'off'}"
    print(f"MACHINE {machine}", flush=True)
    print(f"SETTINGS {threads}", flush=True)
    if args.real:
        x, y = real_data(args.real, args.samples)
        source = f"Fashion-MNIST train split ({args.real})"
    else:
        x, y = synthetic_data(args.samples, args.seed)
        source = "random uint8 (class template + noise)"
    print(f"DATA {source}: x {x.shape} {x.dtype}, y {y.shape} {y.dtype}", flush=True)
    tables: list[tuple[str, int, dict[str, Outcome]]] = []
    ratios: dict[str, float] = {}
    for model in args.models:
        config = make_config(x, args.seed, model)
        for batch_size in args.batch_sizes:
            trainers: dict[str, Any] = {}
            defaults, pipeline_steps = pipeline_settings(model, batch_size)  # --quick too
            for key, label, kind, kwargs in variants(args, defaults, pipeline_steps):
                trainers[key] = kind(Outcome(key, label, batch_size, len(x), model), x, y, config, args.seed, **kwargs)
            keys = list(trainers)
            for round_index in range(args.epochs + 1):
                shift = round_index % len(keys)
                for key in keys[shift:] + keys[:shift]:
                    trainers[key].epoch(round_index + 1)
            rows = {key: trainer.outcome for key, trainer in trainers.items()}
            for outcome in rows.values():
                print(describe(outcome, rows["a"] if outcome.key != "a" else None), flush=True)
            line = f"RATIO model={model} batch={batch_size}"
            for reference in ("a", "b", "b-xla"):
                if reference in rows:
                    name = f"c/{reference.replace('-xla', chr(39))}"  # b-xla prints as b'
                    ratios[f"{model}:{batch_size}:{name}"] = paired_ratio(rows["c"], rows[reference])
                    line += f" {name}={ratios[f'{model}:{batch_size}:{name}']:.2f}"
            if "b-xla" in rows:
                ratios[f"{model}:{batch_size}:b'/a"] = paired_ratio(rows["b-xla"], rows["a"])
            print(line, flush=True)
            print(f"PARITY model={model} batch={batch_size} fit_loss={rows['a'].losses[-1]:.4f} loop_loss={rows['c'].losses[-1]:.4f} "
                  f"after {len(rows['a'].losses)} epochs (fit, per epoch: {', '.join(f'{v:.4f}' for v in rows['a'].losses)}; "
                  f"loop: {', '.join(f'{v:.4f}' for v in rows['c'].losses)})", flush=True)
            tables.append((model, batch_size, rows))

    print()
    print(f"Machine: {machine}; {threads}.  ")
    print(f"Data: {source}, {len(x)} examples. Median of {args.epochs} epochs after 1 warm-up, variants interleaved epoch by epoch; ratios are medians of per-round ratios.")
    print()
    print("| model | batch | variant | samples/s | vs (a) |")
    print("|---|---:|---|---:|---:|")
    for model, batch_size, rows in tables:
        for outcome in rows.values():
            versus = "1.00x" if outcome.key == "a" else f"{paired_ratio(outcome, rows['a']):.2f}x"
            print(f"| {model} | {batch_size} | {outcome.label} | {outcome.samples_per_second:,.0f} | {versus} |")
    if args.json:
        payload = {
            "machine": machine,
            "settings": threads,
            "determinism": args.determinism,
            "source": source,
            "ratios": ratios,
            "outcomes": [dataclasses.asdict(outcome) | {"samples_per_second": outcome.samples_per_second} for _, _, rows in tables for outcome in rows.values()],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


def run_both_settings(argv: list[str], args: argparse.Namespace) -> int:
    """Op determinism is process-wide, so each setting runs in its own process, each with its own (a).

    The loop as the pipeline runs it (determinism on) is compared with the strongest fit (b',
    which needs determinism off) through their ratios to (a): c/b' = (c/a, on) / (b'/a, off).
    """
    forwarded = [item for item in argv if item != "--both-determinism"]
    reports = {}
    with tempfile.TemporaryDirectory(prefix="loop-vs-fit-") as folder:
        for name, extra in (("on", []), ("off", ["--no-determinism"])):
            path = Path(folder) / f"{name}.json"
            command = [sys.executable, str(Path(__file__).resolve()), *[item for item in forwarded if item != "--no-determinism"], *extra, "--json", str(path)]
            print(f"SETTING op determinism {name}: {' '.join(command[1:])}", flush=True)
            if subprocess.run(command, check=False).returncode:
                return 1
            reports[name] = json.loads(path.read_text())["ratios"]
    print()
    print("| model | batch | c/a, determinism on | b'/a, off | c/b', c as the pipeline runs it (on) | c/b', all off |")
    print("|---|---:|---:|---:|---:|---:|")
    combined = {}
    for model in args.models:
        for batch_size in args.batch_sizes:
            key = f"{model}:{batch_size}"
            on, off = reports["on"][f"{key}:c/a"], reports["off"][f"{key}:b'/a"]
            combined[key] = {"c/a on": on, "b'/a off": off, "c/b' on vs off": on / off, "c/b' off": reports["off"][f"{key}:c/b'"]}
            print(f"| {model} | {batch_size} | {on:.2f}x | {off:.2f}x | {on / off:.2f}x | {reports['off'][f'{key}:c/b' + chr(39)]:.2f}x |")
            print(f"RATIO_BOTH model={model} batch={batch_size} c/b'(det on)={on / off:.2f} c/b'(det off)={reports['off'][f'{key}:c/b' + chr(39)]:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"on": reports["on"], "off": reports["off"], "combined": combined}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.both_determinism:
        return run_both_settings(argv, args)
    return run_one_setting(args)


if __name__ == "__main__":
    sys.exit(main())
