"""Data past memory: peak RSS of each stage on a generated Fashion-MNIST-shaped data set of a
million examples or more, read as shards, and streaming's speed against arrays.

    python benchmarks/scale.py                          # 1,000,000 and 2,000,000 training examples
    python benchmarks/scale.py --examples 1000000 --no-double
    python benchmarks/scale.py --quick                  # seconds: tiny sizes, digits for the speed part

1. Peak RSS. For N training examples (and N/6 test examples, Fashion-MNIST's proportion) the
   script writes four MNIST-style gzip IDX files (28x28 uint8, 10 classes; each image a class
   prototype with random contrast plus noise, so a model can learn it). They enter through the
   real pipeline: a copy of the project with `download.dataset: idx` pinned to their SHA-256,
   `preprocess.format: shards`, `train.epochs: 1` and params.yaml's default model and batch; the
   `download`, `preprocess` and `train` stage commands from dvc.yaml run one after another, each
   in its own process, and each one's peak RSS is its ru_maxrss from os.wait4, taken in a small
   launcher process (see MEASURE: Linux keeps the parent's high-water RSS across exec). The
   baseline is the same train stage (same params) on the bundled digits data, as arrays: the
   median of three runs (one with --quick), since TensorFlow's own peak varies by tens of MiB.
   `--double` (the default) repeats it with 2N examples.
2. Speed. Real Fashion-MNIST (from ../shared/data/fashion-mnist or TAPEWORK_SHARED_DATA; digits
   with --quick) prepared both ways from the same raw files, then tapework.training.train with
   params.yaml's train section (checkpoints and TensorBoard off), arrays and shards alternated
   `--rounds` times: the median epoch time after each run's first epoch (training + validation,
   as the train stage logs it), and its ratio.

Prints MACHINE, STAGE, BASELINE, TARGET, THROUGHPUT and RATIO lines; `--json PATH` writes them too.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tapework.quiet import quiet_stage_process  # noqa: E402

quiet_stage_process()  # TensorFlow's start-up lines, as in every stage process

from tapework.io import file_digest  # noqa: E402
from tools.machine import machine_description  # noqa: E402
from tools.workspace import SHARED_DATA, copy_project, stage_command, tool_env  # noqa: E402

MIB = 2**20
IMAGE = (28, 28)
CLASSES = 10
GENERATE_ROWS = 20_000  # images generated and compressed at a time
STAGES = ("download", "preprocess", "train")
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# Targets from the issue: preprocess within 1 GiB; train within 256 MiB of its digits peak; both
# within 10 % when the data set doubles; streaming at least 0.8x the arrays' speed.
PREPROCESS_LIMIT_MIB, TRAIN_HEADROOM_MIB, DOUBLING_GROWTH, SPEED_RATIO = 1024, 256, 0.10, 0.8


def prototypes(seed: int) -> np.ndarray:
    """One smooth 28x28 pattern per class: 7x7 noise blown up 4x, in 0..255."""
    coarse = np.random.default_rng([seed, 0]).normal(size=(CLASSES, 7, 7))
    smooth = np.kron(coarse, np.ones((4, 4)))
    smooth -= smooth.min(axis=(1, 2), keepdims=True)
    return (smooth / smooth.max(axis=(1, 2), keepdims=True) * 255).astype(np.float32)


def write_idx(folder: Path, split: str, count: int, seed: int) -> None:
    """`count` labelled images as two gzip IDX files (level 1: the writing, not the size, is the cost)."""
    patterns = prototypes(seed)
    labels = np.random.default_rng([seed, 1, count]).integers(0, CLASSES, count).astype(np.uint8)
    prefix = "train" if split == "train" else "test"
    with gzip.GzipFile(folder / IDX_NAMES[f"{prefix}_labels"], "wb", compresslevel=1, mtime=0) as stream:
        stream.write((0x801).to_bytes(4, "big") + count.to_bytes(4, "big") + labels.tobytes())
    with gzip.GzipFile(folder / IDX_NAMES[f"{prefix}_images"], "wb", compresslevel=1, mtime=0) as stream:
        stream.write((0x803).to_bytes(4, "big") + b"".join(size.to_bytes(4, "big") for size in (count, *IMAGE)))
        for start in range(0, count, GENERATE_ROWS):
            rng = np.random.default_rng([seed, 2, start])
            chunk = labels[start : start + GENERATE_ROWS]
            contrast = rng.uniform(0.5, 1.0, (len(chunk), 1, 1)).astype(np.float32)
            noise = rng.normal(0, 48, (len(chunk), *IMAGE)).astype(np.float32)
            stream.write(np.clip(patterns[chunk] * contrast + noise, 0, 255).astype(np.uint8).tobytes())


def generate(folder: Path, train_count: int, seed: int) -> dict[str, str]:
    """The four IDX files in `folder`; returns their pins as download.idx.sha256 wants them."""
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder, "train", train_count, seed)
    write_idx(folder, "test", max(CLASSES, train_count // 6), seed + 1)
    return {key: file_digest(folder / name) for key, name in IDX_NAMES.items()}


# Runs a command as its grandchild and writes that process's peak RSS (KiB) to argv[1]. Linux
# carries a process's high-water RSS across exec (exec_mmap records the old mm's), so a stage
# forked straight from this script would report at least this script's own RSS; forked from
# this small interpreter instead, its figure is its own.
MEASURE = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump({"exit": os.waitstatus_to_exitcode(status), "peak_rss_kib": usage.ru_maxrss}, out)
"""


def run_stage(project: Path, stage: str) -> dict[str, Any]:
    """One stage in its own process: wall time, peak RSS (that process alone) and its log."""
    started = time.perf_counter()
    measured = project / f".peak-{stage}.json"
    command = [sys.executable, "-c", MEASURE, str(measured), *stage_command(stage, project)]
    result = subprocess.run(command, cwd=project, env=tool_env(TAPEWORK_CACHE=str(project / ".cache")), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    usage = json.loads(measured.read_text())
    if result.returncode != 0 or usage["exit"] != 0:
        raise RuntimeError(f"stage {stage} failed:\n{result.stderr[-4000:]}")
    return {"stage": stage, "seconds": seconds, "peak_rss_mib": usage["peak_rss_kib"] * 1024 / MIB, "log": result.stderr}


def epoch_seconds(log: str) -> list[float]:
    """The train stage's epoch times, from its `epoch N/M ... 12.3s` lines."""
    return [float(line.rsplit(" ", 1)[1].rstrip("s")) for line in log.splitlines() if " epoch " in line and line.rstrip().endswith("s") and "/" in line.split(" epoch ", 1)[1].split()[0]]


def scale_run(workdir: Path, examples: int, seed: int) -> dict[str, Any]:
    """Generate N examples, then download, preprocess (shards) and one epoch of train in a project copy."""
    source = workdir / f"idx-{examples}"
    started = time.perf_counter()
    pins = generate(source, examples, seed)
    generated = time.perf_counter() - started
    pixels = sum((source / IDX_NAMES[key]).stat().st_size for key in ("train_images", "test_images"))
    project = copy_project(
        workdir / f"project-{examples}",
        {
            "download.dataset": "idx",
            "download.idx.path": str(source),
            **{f"download.idx.sha256.{key}": pin for key, pin in pins.items()},
            "preprocess.format": "shards",
            "train.epochs": 1,
            "train.tensorboard": False,
        },
    )
    stages = [run_stage(project, stage) for stage in STAGES]
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    shard_bytes = sum((project / "data/prepared" / name).stat().st_size for name in meta["sha256"])
    shutil.rmtree(source)
    shutil.rmtree(project)
    return {
        "examples": examples,
        "counts": meta["counts"],
        "generate_seconds": generated,
        "gzip_bytes": pixels,
        "shard_bytes": shard_bytes,
        "stages": [{key: value for key, value in stage.items() if key != "log"} | ({"epoch_seconds": epoch_seconds(stage["log"])} if stage["stage"] == "train" else {}) for stage in stages],
    }


def digits_baseline(workdir: Path, repeats: int) -> dict[str, Any]:
    """The same train stage (same params: default model and batch, one epoch) on the bundled digits, as arrays.

    TensorFlow's own peak varies by tens of MiB from run to run, so the baseline is the median of `repeats` runs.
    """
    project = copy_project(workdir / "project-digits", {"train.epochs": 1, "train.tensorboard": False})
    for stage in ("download", "preprocess"):
        run_stage(project, stage)
    peaks = []
    for _ in range(repeats):
        shutil.rmtree(project / "checkpoints", ignore_errors=True)  # train from scratch each time
        peaks.append(run_stage(project, "train")["peak_rss_mib"])
    shutil.rmtree(project)
    return {"peak_rss_mib": statistics.median(peaks), "peak_rss_mib_runs": peaks}


def throughput(workdir: Path, quick: bool, rounds: int) -> dict[str, Any]:
    """Median epoch time (after the first) of arrays and shards on the same real data, alternated."""
    import dataclasses

    from tapework.datasets import fetch_dataset, stream_raw
    from tapework.params import load_params
    from tapework.preprocess import load_prepared, prepare, write_prepared, write_shards

    dataset = "digits" if quick else "fashion_mnist"
    mirror = "" if quick else str(SHARED_DATA / "fashion-mnist")
    if mirror and not Path(mirror).is_dir():
        raise SystemExit(f"{mirror} is missing: the speed part needs the genuine Fashion-MNIST files there (or set TAPEWORK_SHARED_DATA), or use --quick")
    os.environ["TAPEWORK_CACHE"] = str(workdir / "cache")
    params = load_params(ROOT / "params.yaml", {"download.dataset": dataset, "download.mirror": mirror})
    fetch_dataset(params.download, workdir / "raw")
    source = stream_raw(params.download, workdir / "raw")
    write_prepared(prepare(source.materialize(), params.preprocess, dataset), workdir / "arrays")
    write_shards(source, params.preprocess, dataset, workdir / "shards")
    data = {"arrays": load_prepared(workdir / "arrays"), "shards": load_prepared(workdir / "shards")}

    from tapework.training import train

    train_params = dataclasses.replace(params.train, epochs=2 if quick else 4, tensorboard=False)
    epochs: dict[str, list[float]] = {"arrays": [], "shards": []}
    for _ in range(rounds):
        for kind in ("arrays", "shards"):
            epochs[kind] += train(train_params, data[kind]).epoch_seconds[1:]  # the first epoch also traces and compiles
    examples = data["arrays"].count("train")
    return {
        "dataset": dataset,
        "model": train_params.model,
        "batch_size": train_params.batch_size,
        "train_examples": examples,
        "shuffle_window": train_params.shuffle_window,
        "epoch_seconds": epochs,
        "examples_per_second": {kind: examples / statistics.median(values) for kind, values in epochs.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1_000_000, help="training examples of the generated set")
    parser.add_argument("--no-double", dest="double", action="store_false", help="skip the run with twice the examples")
    parser.add_argument("--rounds", type=int, default=2, help="arrays/shards alternations in the speed part")
    parser.add_argument("--quick", action="store_true", help="3,000 and 6,000 examples, digits for the speed part, one round")
    parser.add_argument("--workdir", type=Path, help="where the data and project copies go (default: a temp folder, removed)")
    parser.add_argument("--speed-only", action="store_true", help="only part 2")
    parser.add_argument("--skip-speed", action="store_true", help="only part 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    examples, rounds = (3_000, 1) if args.quick else (args.examples, args.rounds)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tapework-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report: dict[str, Any] = {"machine": machine_description(), "runs": []}
        print(f"MACHINE {report['machine']}", flush=True)
        if args.speed_only:
            examples, args.double = 0, False
        baseline = digits_baseline(workdir, 1 if args.quick else 3) if examples else {"peak_rss_mib": float("nan"), "peak_rss_mib_runs": []}
        report["baseline"] = baseline
        print(f"BASELINE stage=train dataset=digits format=arrays peak_rss_mib={baseline['peak_rss_mib']:.0f} (median of {', '.join(f'{peak:.0f}' for peak in baseline['peak_rss_mib_runs'])})", flush=True)
        for size in ((examples, 2 * examples) if args.double else (examples,)) if examples else ():
            outcome = scale_run(workdir, size, args.seed)
            report["runs"].append(outcome)
            print(f"DATA examples={size} counts={json.dumps(outcome['counts'], separators=(',', ':'))} gzip_mib={outcome['gzip_bytes'] / MIB:.0f} shards_mib={outcome['shard_bytes'] / MIB:.0f} generate_seconds={outcome['generate_seconds']:.1f}", flush=True)
            for stage in outcome["stages"]:
                extra = ""
                if stage["stage"] == "train":
                    extra = f" epoch_seconds={stage['epoch_seconds'][0]:.1f} examples_per_second={outcome['counts']['train'] / stage['epoch_seconds'][0]:.0f}"
                print(f"STAGE examples={size} stage={stage['stage']} seconds={stage['seconds']:.1f} peak_rss_mib={stage['peak_rss_mib']:.0f}{extra}", flush=True)
        peaks = [{stage["stage"]: stage["peak_rss_mib"] for stage in run["stages"]} for run in report["runs"]]
        for run, peak in zip(report["runs"], peaks):
            print(f"TARGET examples={run['examples']} preprocess_peak_mib={peak['preprocess']:.0f} (<= {PREPROCESS_LIMIT_MIB}: {'met' if peak['preprocess'] <= PREPROCESS_LIMIT_MIB else 'MISSED'}) "
                  f"train_above_digits_mib={peak['train'] - baseline['peak_rss_mib']:.0f} (<= {TRAIN_HEADROOM_MIB}: {'met' if peak['train'] - baseline['peak_rss_mib'] <= TRAIN_HEADROOM_MIB else 'MISSED'})")
        if len(peaks) == 2:
            for stage in ("preprocess", "train"):
                growth = peaks[1][stage] / peaks[0][stage] - 1
                print(f"TARGET doubling stage={stage} growth={growth:+.1%} (<= {DOUBLING_GROWTH:.0%}: {'met' if growth <= DOUBLING_GROWTH else 'MISSED'})")
        if args.skip_speed:
            return
        speed = throughput(workdir, args.quick, rounds)
        report["throughput"] = speed
        for kind in ("arrays", "shards"):
            values = speed["epoch_seconds"][kind]
            print(f"THROUGHPUT dataset={speed['dataset']} model={speed['model']} batch={speed['batch_size']} format={kind} epoch_median_seconds={statistics.median(values):.2f} (n={len(values)}: {', '.join(f'{value:.2f}' for value in values)}) examples_per_second={speed['examples_per_second'][kind]:.0f}")
        ratio = speed["examples_per_second"]["shards"] / speed["examples_per_second"]["arrays"]
        report["ratio"] = ratio
        print(f"RATIO shards/arrays={ratio:.2f} (>= {SPEED_RATIO}: {'met' if ratio >= SPEED_RATIO else 'MISSED'})")
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
