"""Repeats end to end on tiny data: a `dvc repro` with repeats.extra_seeds killed mid-way retrains only
the missing seeds (the interrupted one resumes from its own checkpoint folder), per-seed outputs are
byte-reproducible, and the aggregate metrics and the spread plots come out of it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import run, tool_env, update_params

EXTRA = (7, 8)


def lock_stages(repo: Path) -> set[str]:
    try:
        return set((yaml.safe_load((repo / "dvc.lock").read_text()) or {}).get("stages", {}))
    except (FileNotFoundError, yaml.YAMLError):  # not written yet, or being rewritten
        return set()


def running(log: Path) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", log.read_text())


def checkpoint_folders(repo: Path, epoch: int) -> set[Path]:
    """Checkpoint folders (one per run) holding a checkpoint of `epoch`."""
    return {path.parent for path in repo.glob(f"checkpoints/*/ckpt-{epoch}.index")}


def latest_epochs(repo: Path) -> dict[Path, int]:
    """Each checkpoint folder's newest saved epoch (CheckpointStore numbers checkpoints by epoch)."""
    latest: dict[Path, int] = {}
    for index in repo.glob("checkpoints/*/ckpt-*.index"):
        epoch = int(index.name.removeprefix("ckpt-").removesuffix(".index"))
        latest[index.parent] = max(epoch, latest.get(index.parent, 0))
    return latest


def kill_during_a_seed(repo: Path, log: Path, epochs: int) -> str:
    """Start `dvc repro`; once one extra seed's train stage is done and another has saved a few
    epochs, SIGKILL the whole process group. Returns the interrupted stage."""
    with open(log, "w") as stream:
        process = subprocess.Popen(["dvc", "repro"], cwd=repo, env=tool_env(), stdout=stream, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, watched = time.monotonic() + 480, None
        while True:
            assert process.poll() is None, f"dvc repro ended before it could be interrupted:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no extra seed was interrupted in time"
            done = lock_stages(repo)
            current = (running(log) or [""])[-1]
            if current.startswith("train_seed@") and current not in done and done & {f"train_seed@{seed}" for seed in EXTRA}:
                watched = current
                # A folder mid-way (at least 3 epochs saved, well short of the last): the running seed's own.
                # A range, not one epoch: an epoch of tiny data takes ~0.1 s, shorter than a poll on a busy machine.
                if any(3 <= epoch <= epochs - 10 for epoch in latest_epochs(repo).values()):
                    break
            time.sleep(0.02)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return watched


@pytest.mark.slow
@pytest.mark.tier2
@pytest.mark.timeout(900)
def test_killed_repeats_retrain_only_the_missing_seeds(repo_copy, tmp_path):
    epochs = 60  # long enough on tiny data to catch a seed mid-way
    update_params(repo_copy / "params.yaml", {"repeats.extra_seeds": list(EXTRA), "train.epochs": epochs})
    interrupted = kill_during_a_seed(repo_copy, tmp_path / "first.log", epochs)
    finished = lock_stages(repo_copy)
    other = ({f"train_seed@{seed}" for seed in EXTRA} - {interrupted}).pop()
    assert interrupted not in finished and {"train", other} <= finished

    rerun = run(["dvc", "repro"], repo_copy, timeout=600)
    ran = set(re.findall(r"Running stage '([^']+)'", rerun.stdout))
    assert interrupted in ran, rerun.stdout
    for stage in finished - {"check_params", "aggregate"}:
        assert stage not in ran, f"{stage} had finished before the kill and ran again"
        assert f"Stage '{stage}' didn't change, skipping" in rerun.stdout
    assert "resumed from" in rerun.stderr and "at epoch " in rerun.stderr, rerun.stderr[-3000:]

    # Each seed has its own checkpoint folder: the main run's and both extra seeds'.
    assert len(checkpoint_folders(repo_copy, epochs)) == 1 + len(EXTRA)
    # The resumed seed is bitwise the uninterrupted one: rerun that stage alone from scratch.
    seed = interrupted.split("@")[1]
    outputs = [Path("runs") / f"seed-{seed}" / name for name in ("train.json", "train_history.tsv", "models/model.weights.npz")]
    resumed = {path: (repo_copy / path).read_bytes() for path in outputs}
    for folder in checkpoint_folders(repo_copy, epochs):
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    again = run(["dvc", "repro", "--force", "--single-item", interrupted], repo_copy, timeout=600)
    assert "resumed from" not in again.stderr
    assert {path: (repo_copy / path).read_bytes() for path in outputs} == resumed
    assert json.loads(run(["dvc", "status", "--json"], repo_copy).stdout) == {}

    # The aggregate covers all three runs; the spread plot draws them.
    aggregate = json.loads((repo_copy / "metrics/repeats.json").read_text())
    assert aggregate["seeds"] == 3 and set(aggregate["test"]["accuracy"]) == {"n", "mean", "std", "ci95_low", "ci95_high"}
    by_seed = json.loads((repo_copy / "metrics/repeats_by_seed.json").read_text())
    assert [entry["seed"] for entry in by_seed["seeds"]] == [7, 8, 42]
    plots = json.loads(run(["dvc", "plots", "show", "--json"], repo_copy).stdout)["data"]
    spread = plots["loss_spread"][0]["content"]
    points = spread["data"]["values"]
    assert {point["field"] for point in points} == {"train_loss", "val_loss"} and len(points) == 2 * epochs
    assert all(float(point[f"{point['field']}_min"]) <= float(point["dvc_inferred_y_value"]) <= float(point[f"{point['field']}_max"]) for point in points)
    assert {point["seeds"] for point in points} == {"3"}
    assert [layer["mark"]["type"] for layer in spread["layer"]] == ["area", "line"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_default_has_no_seed_stages_and_adding_a_seed_runs_only_it(tiny_trained):
    repo_copy = tiny_trained  # a tiny default run (extra_seeds: []), done
    assert lock_stages(repo_copy) == {"check_params", "download", "preprocess", "train", "evaluate", "export", "aggregate"}
    assert json.loads((repo_copy / "metrics/repeats.json").read_text()) == {"seeds": 1}
    by_seed = json.loads((repo_copy / "metrics/repeats_by_seed.json").read_text())["seeds"]
    assert [entry["seed"] for entry in by_seed] == [42]
    assert by_seed[0]["metrics"]["test"] == json.loads((repo_copy / "metrics/evaluate.json").read_text())["test"]
    assert run(["dvc", "stage", "list", "--name-only"], repo_copy).stdout.split() == ["check_params", "download", "preprocess", "train", "evaluate", "export", "aggregate"]

    update_params(repo_copy / "params.yaml", {"repeats.extra_seeds": [7]})
    one = run(["dvc", "repro"], repo_copy)
    assert set(re.findall(r"Running stage '([^']+)'", one.stdout)) == {"check_params", "train_seed@7", "evaluate_seed@7", "aggregate"}
    before = {path: path.read_bytes() for path in (repo_copy / "runs/seed-7").rglob("*") if path.is_file()}
    assert before and not [path for path in repo_copy.rglob(".gitignore") if path.parent.name.startswith("seed-")]  # runs/.gitignore covers them

    update_params(repo_copy / "params.yaml", {"repeats.extra_seeds": [7, 9]})
    two = run(["dvc", "repro"], repo_copy)
    assert set(re.findall(r"Running stage '([^']+)'", two.stdout)) == {"check_params", "train_seed@9", "evaluate_seed@9", "aggregate"}
    assert {path: path.read_bytes() for path in (repo_copy / "runs/seed-7").rglob("*") if path.is_file()} == before
    provenance = json.loads((repo_copy / "runs/seed-9/evaluate.provenance.json").read_text())
    assert provenance["seed"] == 9 and json.loads((repo_copy / "runs/seed-9/train.provenance.json").read_text())["seed"] == 9
    assert json.loads((repo_copy / "metrics/repeats.json").read_text())["test"]["accuracy"]["n"] == 3
