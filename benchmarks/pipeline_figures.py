"""Pipeline figures for the README: training epoch time on real Fashion-MNIST, preprocess time and
peak memory, and the cost of a no-op `dvc repro` against `dvc status`.

    python benchmarks/pipeline_figures.py                 # all three parts
    python benchmarks/pipeline_figures.py --skip-dvc      # without the dvc part
    python benchmarks/pipeline_figures.py --data /path/to/fashion-mnist

1. Epoch time: the Fashion-MNIST IDX files (60,000 train images; the default preprocess holds
   out 10% for validation) through tapework.training.train with params.yaml's train section
   (default model and params, checkpoints and TensorBoard logs to temp folders), `--train-epochs`
   epochs, `--train-repeats` fresh runs. Epoch time is TrainResult.epoch_seconds, the time
   train()'s epoch log line reports (training + validation; not the summaries or the checkpoint
   save).
2. Preprocess: raw files made by tapework.datasets.fetch_dataset from the mirror folder (with
   TAPEWORK_CACHE in a temp folder), then, in a fresh subprocess per repeat, load_raw + prepare +
   write_prepared: wall time per part, and the subprocess's peak RSS (os.wait4's ru_maxrss for
   that child alone), next to its RSS after imports.
3. dvc: the project's tracked and unignored files copied to a temp folder, `git init` + commit, one
   full `dvc repro` (default params.yaml), then no-op `dvc repro` and `dvc status`, alternated,
   `--dvc-repeats` times each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
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
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from tapework.params import load_params  # noqa: E402
from tools.machine import machine_description  # noqa: E402
from tools.workspace import ROOT, SHARED_DATA, copy_project, tool_env  # noqa: E402

# Runs in a fresh interpreter: the stage's three calls, timed, then this process's own RSS figures.
PREPROCESS_CHILD = r"""
import dataclasses, json, resource, sys, time
def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
from tapework.datasets import load_raw
from tapework.params import load_params
from tapework.preprocess import prepare, write_prepared
params = load_params(sys.argv[1])
after_imports = rss_kib()
t0 = time.perf_counter()
raw = load_raw(dataclasses.replace(params.download, dataset="fashion_mnist"), sys.argv[2])
t1 = time.perf_counter()
prepared = prepare(raw, params.preprocess, "fashion_mnist")
t2 = time.perf_counter()
write_prepared(prepared, sys.argv[3])
t3 = time.perf_counter()
print(json.dumps({"load_raw": t1 - t0, "prepare": t2 - t1, "write_prepared": t3 - t2, "total": t3 - t0,
                  "rss_after_imports_kib": after_imports, "self_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "counts": prepared.meta["counts"]}))
"""


def median_line(values: list[float], unit: str = "s") -> str:
    return f"median {statistics.median(values):.2f} {unit} (n={len(values)}: {', '.join(f'{v:.2f}' for v in values)})"


# --------------------------------------------------------------------------------------------
# 2. Preprocess (also makes the prepared data part 1 trains on)
# --------------------------------------------------------------------------------------------


def preprocess_figures(mirror: Path, work: Path, repeats: int) -> tuple[dict[str, Any], Path]:
    from tapework.datasets import fetch_dataset

    cache = work / "cache"
    os.environ["TAPEWORK_CACHE"] = str(cache)  # read by tapework.download at call time
    raw_dir = work / "raw"
    started = time.perf_counter()
    fetch_dataset(load_params(ROOT / "params.yaml", {"download.dataset": "fashion_mnist", "download.mirror": str(mirror)}).download, raw_dir)
    fetch_seconds = time.perf_counter() - started
    runs = []
    prepared_dir = work / "prepared"
    for index in range(repeats):
        target = prepared_dir if index == 0 else work / f"prepared-{index}"
        process = subprocess.Popen(
            [sys.executable, "-c", PREPROCESS_CHILD, str(ROOT / "params.yaml"), str(raw_dir), str(target)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=tool_env(TAPEWORK_CACHE=str(cache)),
        )
        # Drain the pipes (small), then reap this child ourselves: wait4 gives *its* rusage alone,
        # where RUSAGE_CHILDREN would report the largest of every child this process ever waited for.
        out, err = process.stdout.read(), process.stderr.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise RuntimeError(f"preprocess child failed ({process.returncode}):\n{err[-4000:]}")
        run = json.loads(out.strip().splitlines()[-1])
        run["wait4_maxrss_kib"] = usage.ru_maxrss
        runs.append(run)
        if index:
            shutil.rmtree(target)
    figures = {
        "fetch_seconds_from_mirror": fetch_seconds,
        "runs": runs,
        "total_seconds": [run["total"] for run in runs],
        "peak_rss_mib": [run["wait4_maxrss_kib"] / 1024 for run in runs],
        "rss_after_imports_mib": [run["rss_after_imports_kib"] / 1024 for run in runs],
        "counts": runs[0]["counts"],
    }
    return figures, prepared_dir


# --------------------------------------------------------------------------------------------
# 1. Epoch time through tapework.training.train
# --------------------------------------------------------------------------------------------


def epoch_figures(prepared_dir: Path, work: Path, epochs: int, repeats: int) -> dict[str, Any]:
    from tapework.preprocess import load_prepared
    from tapework.training import train

    data = load_prepared(prepared_dir)
    params = dataclasses.replace(load_params(ROOT / "params.yaml").train, epochs=epochs)
    runs = []
    for index in range(repeats):
        started = time.perf_counter()
        result = train(params, data, checkpoint_dir=work / f"checkpoints-{index}", log_dir=work / f"logs-{index}" if params.tensorboard else None)
        total = time.perf_counter() - started
        runs.append({"epoch_seconds": result.epoch_seconds, "train_call_seconds": total, "history": result.history})
    n_train = len(data.split("train")[0])
    by_epoch = [[run["epoch_seconds"][e] for run in runs if len(run["epoch_seconds"]) > e] for e in range(epochs)]
    return {
        "train_examples": n_train,
        "val_examples": len(data.split("val")[0]),
        "params": {"model": params.model, "batch_size": params.batch_size, "steps_per_execution": params.steps_per_execution, "jit_compile": params.jit_compile, "epochs": epochs},
        "runs": runs,
        "epoch_seconds_by_epoch": by_epoch,
        "final_history": runs[-1]["history"][-1],
    }


# --------------------------------------------------------------------------------------------
# 3. dvc repro (no-op) vs dvc status
# --------------------------------------------------------------------------------------------


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 1800) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds


def dvc_figures(work: Path, repeats: int) -> dict[str, Any]:
    repo = copy_project(work / "repo")
    env = tool_env(TAPEWORK_CACHE=str(work / "dvc-cache"))
    full = _run(["dvc", "repro"], repo, env)
    status = subprocess.run(["dvc", "status"], cwd=repo, env=env, capture_output=True, text=True)
    repro_times, status_times = [], []
    for _ in range(repeats):
        repro_times.append(_run(["dvc", "repro"], repo, env))
        status_times.append(_run(["dvc", "status"], repo, env))
    return {
        "full_repro_seconds": full,
        "status_after_repro": status.stdout.strip(),
        "noop_repro_seconds": repro_times,
        "status_seconds": status_times,
        "ratio_repro_over_status": statistics.median(repro_times) / statistics.median(status_times),
    }


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "fashion-mnist", help="folder with the Fashion-MNIST IDX .gz files (the mirror)")
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--train-repeats", type=int, default=3)
    parser.add_argument("--preprocess-repeats", type=int, default=3)
    parser.add_argument("--dvc-repeats", type=int, default=5)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-dvc", action="store_true")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    machine = machine_description()
    print(f"MACHINE {machine}", flush=True)
    figures: dict[str, Any] = {"machine": machine}
    with tempfile.TemporaryDirectory(prefix="tapework-figures-") as temp:
        work = Path(temp)
        pre, prepared_dir = preprocess_figures(args.data, work, args.preprocess_repeats)
        figures["preprocess"] = pre
        print(f"PREPROCESS fashion_mnist {pre['counts']}: fetch from mirror {pre['fetch_seconds_from_mirror']:.2f} s (once)", flush=True)
        print(f"PREPROCESS load_raw + prepare + write_prepared: {median_line(pre['total_seconds'])}", flush=True)
        for part in ("load_raw", "prepare", "write_prepared"):
            print(f"PREPROCESS   {part}: {median_line([run[part] for run in pre['runs']])}", flush=True)
        print(f"PREPROCESS peak RSS: {median_line(pre['peak_rss_mib'], 'MiB')}; RSS after imports {median_line(pre['rss_after_imports_mib'], 'MiB')}", flush=True)
        if not args.skip_train:
            ep = epoch_figures(prepared_dir, work, args.train_epochs, args.train_repeats)
            figures["train"] = ep
            print(f"TRAIN default params {ep['params']}, {ep['train_examples']} train / {ep['val_examples']} val examples", flush=True)
            for index, seconds in enumerate(ep["epoch_seconds_by_epoch"], start=1):
                rate = ep["train_examples"] / statistics.median(seconds)
                print(f"TRAIN epoch {index}: {median_line(seconds)} -> {rate:,.0f} train examples/s (incl. validation)", flush=True)
            print(f"TRAIN last epoch metrics: {ep['final_history']}", flush=True)
        if not args.skip_dvc:
            dv = dvc_figures(work, args.dvc_repeats)
            figures["dvc"] = dv
            print(f"DVC full repro (default params.yaml): {dv['full_repro_seconds']:.1f} s; status after: {dv['status_after_repro']!r}", flush=True)
            print(f"DVC no-op repro: {median_line(dv['noop_repro_seconds'])}", flush=True)
            print(f"DVC status:      {median_line(dv['status_seconds'])}", flush=True)
            print(f"DVC ratio no-op repro / status: {dv['ratio_repro_over_status']:.2f}", flush=True)

    print()
    print(f"Machine: {machine}.")
    print()
    print("| figure | value |")
    print("|---|---|")
    pre = figures["preprocess"]
    print(f"| Fashion-MNIST preprocess (load_raw + prepare + write_prepared) | {statistics.median(pre['total_seconds']):.2f} s (median of {len(pre['total_seconds'])}) |")
    print(f"| Fashion-MNIST preprocess peak RSS | {statistics.median(pre['peak_rss_mib']):.0f} MiB (after imports: {statistics.median(pre['rss_after_imports_mib']):.0f} MiB) |")
    if "train" in figures:
        ep = figures["train"]
        for index, seconds in enumerate(ep["epoch_seconds_by_epoch"], start=1):
            note = " (includes tracing)" if index == 1 else ""
            print(f"| Fashion-MNIST train epoch {index}, default params ({ep['train_examples']} examples + validation){note} | {statistics.median(seconds):.2f} s (median of {len(seconds)}) |")
    if "dvc" in figures:
        dv = figures["dvc"]
        print(f"| `dvc repro`, nothing changed | {statistics.median(dv['noop_repro_seconds']):.2f} s (median of {len(dv['noop_repro_seconds'])}) |")
        print(f"| `dvc status` | {statistics.median(dv['status_seconds']):.2f} s (median of {len(dv['status_seconds'])}) |")
        print(f"| no-op `dvc repro` / `dvc status` | {dv['ratio_repro_over_status']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
