"""Benchmark: how long deleting a tf.data iterator takes, with tf.data autotuning on and off.

The loop's epochs used to end with a wait of up to 1.2 s (README, Performance, "The epoch's end
waited for tf.data"): with autotuning on, each iterator has a model thread that sleeps on a
doubling timer, and deleting the iterator waited for it. This script shows the effect alone,
without a model: a dataset of `--elements` batches (one gather each, then `prefetch(AUTOTUNE)`
as tf.data's guide recommends), a consumer that spends `--step-ms` on each batch as a compiled
step would, then `del iterator`, timed. Autotuning on (tf.data's default) and off
(`batching.read_ahead`'s setting) take turns, `--repeats` epochs each.

    python benchmarks/tf_data_teardown.py                 # 200 batches x 3 ms, 6 epochs per setting
    python benchmarks/tf_data_teardown.py --quick         # smoke test: 20 batches x 1 ms, 2 epochs each
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tapework.quiet import quiet_stage_process  # noqa: E402

quiet_stage_process()  # TensorFlow's start-up lines, as in every stage process

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tools.machine import machine_description  # noqa: E402

BATCH = 64
FEATURES = 784


def make_pipeline(inputs: tf.Tensor, elements: int, autotune: bool) -> tf.data.Dataset:
    """`elements` batches gathered from `inputs`, read ahead by prefetch(AUTOTUNE)."""
    options = tf.data.Options()
    options.autotune.enabled = autotune
    starts = tf.data.Dataset.range(elements)
    batches = starts.map(lambda start: tf.gather(inputs, tf.range(start, start + BATCH) % len(inputs)))
    return batches.with_options(options).prefetch(tf.data.AUTOTUNE)


def epoch(inputs: tf.Tensor, elements: int, step_seconds: float, autotune: bool) -> dict[str, float]:
    dataset = make_pipeline(inputs, elements, autotune)
    started = time.perf_counter()
    iterator = iter(dataset)
    for _ in iterator:
        time.sleep(step_seconds)  # the consumer's step: the CPU is free for tf.data meanwhile, as while XLA waits
    iterated = time.perf_counter()
    del iterator
    deleted = time.perf_counter()
    return {"iterate_seconds": iterated - started, "delete_ms": 1000 * (deleted - iterated)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=200, help="batches per epoch (default 200)")
    parser.add_argument("--step-ms", type=float, default=3.0, help="the consumer's time per batch (default 3 ms)")
    parser.add_argument("--repeats", type=int, default=6, help="epochs per setting, after one warm-up epoch each (default 6)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 20 batches x 1 ms, 2 epochs per setting")
    parser.add_argument("--json", type=Path, help="also write every epoch to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.elements, args.step_ms, args.repeats = 20, 1.0, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    inputs = tf.constant(np.random.default_rng(0).random((4096, FEATURES), dtype=np.float32))
    print(f"MACHINE {machine_description()}")
    print(f"RUN elements={args.elements} step_ms={args.step_ms:g} repeats={args.repeats} batch={BATCH}x{FEATURES}")
    results: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    for round_index in range(args.repeats + 1):
        for setting in ("on", "off"):  # alternated, so both see the same machine
            outcome = epoch(inputs, args.elements, args.step_ms / 1000, autotune=setting == "on")
            if round_index:  # the first round builds and warms both pipelines
                results[setting].append(outcome)
    for setting, epochs in results.items():
        deletes = [item["delete_ms"] for item in epochs]
        iterates = [item["iterate_seconds"] for item in epochs]
        print(
            f"RESULT autotune={setting:3s} delete_ms median={statistics.median(deletes):.1f} max={max(deletes):.1f} "
            f"(epochs: {', '.join(f'{value:.1f}' for value in deletes)})  iterate_s median={statistics.median(iterates):.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
