"""Benchmark: the loop's speed epoch by epoch, with where the CPU time and the wall time went in each epoch.

The loop's epochs had two speeds (README, Performance, "The loop's epochs had two speeds"): a
wait at the epoch's end (tf.data autotuning's thread, now off) and periods in which the machine
runs memory-bound code slower. This script trains the loop as `loop_vs_fit.py`'s variant (c)
does (params.yaml's steps_per_execution and stacked XLA steps, op determinism on) and prints,
per epoch:

  samples/s                  the epoch's throughput
  before_calls_ms            epoch start to the first compiled call: building the dataset, iter()
  calls_ms                   the first compiled call's start to the last one's end
  after_calls_ms             the last call's end to the epoch's end: deleting the iterator, reading the metrics
  process_cores              the process's user+system CPU time over the epoch's wall time
  idle_ticks / steal_ticks   the machine's idle and hypervisor-stolen ticks (/proc/stat), summed over
                             its CPUs, in the epoch; wall_ticks is the epoch's wall time in ticks
  busiest_threads            the three threads of this process with the most CPU ticks in the epoch

A slow epoch that waits shows idle ticks with the threads' ticks unchanged, and where it waited
in the three parts; one that works harder shows more thread ticks and longer calls. Run several
processes: the machine's slow periods last seconds.

    python benchmarks/loop_modes.py --real path/to/fashion-mnist            # mlp, batch 32, 8 epochs
    python benchmarks/loop_modes.py --real path/to/fashion-mnist --model residual_mlp --batch 64
    python benchmarks/loop_modes.py --quick                                 # smoke test: tiny random data
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tapework.quiet import quiet_stage_process  # noqa: E402

quiet_stage_process()  # TensorFlow's start-up lines, as in every stage process

import loop_vs_fit  # noqa: E402  (its data, model and trainer: the same loop as variant (c))
import tensorflow as tf  # noqa: E402

from tools.machine import machine_description  # noqa: E402

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def machine_ticks() -> dict[str, int]:
    """Idle and steal ticks summed over the CPUs since boot (/proc/stat's first line)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return {"idle": fields[3], "steal": fields[7] if len(fields) > 7 else 0}


def thread_ticks() -> dict[str, tuple[str, int]]:
    """Thread id -> (name, user+system ticks since it started) for this process."""
    ticks = {}
    for thread in os.listdir("/proc/self/task"):
        try:
            raw = Path(f"/proc/self/task/{thread}/stat").read_text()
        except OSError:
            continue  # the thread ended while we listed them
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        ticks[thread] = (name, int(fields[11]) + int(fields[12]))  # utime, stime
    return ticks


class TimedCalls:
    """The train function, with the start of its first call and the end of its last call recorded."""

    def __init__(self, function: Any) -> None:
        self.function, self.first_start, self.last_end = function, None, None

    def __call__(self, *args: Any) -> Any:
        if self.first_start is None:
            self.first_start = time.perf_counter()
        result = self.function(*args)
        self.last_end = time.perf_counter()  # the call's outputs are read (int) by the caller after this: ~µs
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.function, name)  # experimental_get_tracing_count and the like

    def reset(self) -> None:
        self.first_start = self.last_end = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mlp", help="a params.yaml model family (default mlp)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs, the first one tracing and compiling (default 8)")
    parser.add_argument("--samples", type=int, default=loop_vs_fit.FASHION_TRAIN, help="training examples (default 60000)")
    parser.add_argument("--real", type=Path, metavar="PATH", help="folder with the Fashion-MNIST IDX .gz files, instead of random data")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--jit-compile", choices=("auto", "true", "false"), default="auto", help="XLA: auto resolves as for loop_vs_fit.py's (c), `dvc repro` on Fashion-MNIST (default)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2048 random examples, batch 64, 3 epochs, XLA on")
    parser.add_argument("--json", type=Path, help="also write the epochs to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.batch, args.epochs, args.real, args.jit_compile = 2048, 64, 3, None, "true"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tf.config.experimental.enable_op_determinism()  # as tapework.training.train does
    x, y = loop_vs_fit.real_data(args.real, args.samples) if args.real else loop_vs_fit.synthetic_data(args.samples, args.seed)
    defaults, pipeline_steps = loop_vs_fit.pipeline_settings(args.model, args.batch)
    steps_per_execution = defaults.steps_per_execution
    jit_compile = defaults.use_xla(pipeline_steps) if args.jit_compile == "auto" else args.jit_compile == "true"
    outcome = loop_vs_fit.Outcome("c", "(c) loop", args.batch, len(x), args.model)
    trainer = loop_vs_fit.LoopTrainer(outcome, x, y, loop_vs_fit.make_config(x, args.seed, args.model), args.seed, steps_per_execution, jit_compile=jit_compile)
    print(f"MACHINE {machine_description()}")
    print(f"RUN model={args.model} batch={args.batch} samples={len(x)} steps_per_execution={steps_per_execution} jit_compile={jit_compile} op_determinism=on cpus={os.cpu_count()}")
    trainer.run = calls = TimedCalls(trainer.run)
    epochs = []
    for number in range(1, args.epochs + 1):
        threads_before, machine_before, usage_before = thread_ticks(), machine_ticks(), resource.getrusage(resource.RUSAGE_SELF)
        calls.reset()
        started = time.perf_counter()
        trainer.epoch(number)
        ended = time.perf_counter()
        seconds = ended - started
        threads_after, machine_after, usage_after = thread_ticks(), machine_ticks(), resource.getrusage(resource.RUSAGE_SELF)
        cpu_seconds = (usage_after.ru_utime - usage_before.ru_utime) + (usage_after.ru_stime - usage_before.ru_stime)
        busiest = sorted(
            ((ticks - threads_before.get(thread, (name, 0))[1], name, thread) for thread, (name, ticks) in threads_after.items()),
            reverse=True,
        )[:3]
        epoch = {
            "epoch": number,
            "samples_per_second": len(x) / seconds,
            "before_calls_ms": 1000 * (calls.first_start - started),
            "calls_ms": 1000 * (calls.last_end - calls.first_start),
            "after_calls_ms": 1000 * (ended - calls.last_end),
            "process_cores": cpu_seconds / seconds,
            "idle_ticks": machine_after["idle"] - machine_before["idle"],
            "steal_ticks": machine_after["steal"] - machine_before["steal"],
            "wall_ticks": seconds * TICKS_PER_SECOND,
            "busiest_threads": [{"thread": int(thread), "name": name, "ticks": ticks} for ticks, name, thread in busiest],
        }
        epochs.append(epoch)
        threads = " ".join(f"{item['name']}[{item['thread']}]:{item['ticks']}" for item in epoch["busiest_threads"])
        print(
            f"EPOCH {number} samples/s={epoch['samples_per_second']:,.0f} before_calls_ms={epoch['before_calls_ms']:.0f} "
            f"calls_ms={epoch['calls_ms']:.0f} after_calls_ms={epoch['after_calls_ms']:.0f} process_cores={epoch['process_cores']:.2f} "
            f"idle_ticks={epoch['idle_ticks']} steal_ticks={epoch['steal_ticks']} wall_ticks={epoch['wall_ticks']:.0f} "
            f"busiest_threads={threads}" + ("  (tracing and compiling)" if number == 1 else ""),
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "batch": args.batch, "samples": len(x), "epochs": epochs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
