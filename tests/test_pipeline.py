"""End to end: the real stages under `dvc repro` in a throwaway copy of the repo, on tiny data."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import TINY_PARAMS, TINY_REPRO_OUTPUT, copy_project, run, stage_command, tool_env, update_params

STAGES = ("download", "preprocess", "train", "evaluate", "export")
EXPORTED = ("export/model/model_card.json", "export/model/model.tflite", "export/model/saved_model/saved_model.pb", "export/model/saved_model/variables/variables.index", "export/model/saved_model/variables/variables.data-00000-of-00001")
OUTPUTS = EXPORTED + ("metrics/train.json", "metrics/evaluate.json", "metrics/train.provenance.json", "metrics/evaluate.provenance.json", "metrics/train_history.tsv", "metrics/report.tsv", "models/model.weights.npz", "models/model.json", "plots/confusion.csv", "plots/predictions.csv", "plots/summary.png")


def snapshot(repo: Path) -> dict[str, bytes]:
    return {name: (repo / name).read_bytes() for name in OUTPUTS}


def commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message], repo)


@pytest.mark.slow
def test_dvc_repro_end_to_end_skip_diff_and_bitwise_rerun(tiny_results, tiny_trained):
    # The first run from scratch is the shared fixture's: a copy of its outputs and what it printed.
    repo_copy = tiny_trained
    printed = json.loads((tiny_results.parent / TINY_REPRO_OUTPUT).read_text())
    first = subprocess.CompletedProcess(["dvc", "repro"], 0, printed["stdout"], printed["stderr"])
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    # The TFLite converter's and LiteRT's known notices are filtered out of the export stage's output,
    # and no other record of TensorFlow's C++ logging reaches the user: a new one fails here.
    for notice in ("Ignored output_format", "Ignored drop_control_dependency", "XNNPACK delegate"):
        assert notice not in first.stderr
    assert not re.findall(r"^[IWEF]\d{4} \S+ +\d+ \S+:\d+\] .*", first.stderr, re.M)
    train_metrics = json.loads((repo_copy / "metrics/train.json").read_text())
    test_metrics = json.loads((repo_copy / "metrics/evaluate.json").read_text())
    assert set(train_metrics) >= {"train", "val"} and {"loss", "accuracy", "huber"} <= set(train_metrics["val"])
    # The train stage logs the layer summary once, ending in the parameter count that train.json and the card hold.
    parameters = train_metrics["parameters"]
    assert first.stderr.count("tapework INFO model mlp: layer, parameters") == 1
    assert f"total {parameters:,} ({parameters:,} trainable)" in " ".join(first.stderr.split())
    card = json.loads((repo_copy / "export/model/model_card.json").read_text())
    assert card["model"]["parameters"] == parameters and card["test_metrics"] == test_metrics["test"]
    assert {"loss", "accuracy", "huber", "macro_f1"} <= set(test_metrics["test"])
    assert test_metrics["test"]["accuracy"] > 0.5  # 3 epochs on 400 digits: well above 10% chance
    history = (repo_copy / "metrics/train_history.tsv").read_text().splitlines()
    assert history[0].split("\t")[0] == "epoch" and len(history) == 1 + 3
    report = (repo_copy / "metrics/report.tsv").read_text()
    assert report.startswith("class\tprecision\trecall\tf1\tsupport") and "macro avg" in report
    assert (repo_copy / "plots/summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    provenance = json.loads((repo_copy / "metrics/evaluate.provenance.json").read_text())
    assert provenance["dataset"] == "digits" and provenance["seed"] == 42
    assert {"data_sha256", "model_sha256", "params_sha256", "packages", "cpu"} <= set(provenance)
    assert provenance["packages"]["tensorflow-cpu"] and provenance["packages"]["keras"]
    before = snapshot(repo_copy)
    commit(repo_copy, "first run")

    # Nothing changed: every stage is skipped.
    again = run(["dvc", "repro"], repo_copy)
    assert "Running stage" not in again.stdout
    for stage in STAGES:
        assert f"'{stage}' didn't change, skipping" in again.stdout

    # Forced rerun of everything with the same params: bitwise-identical outputs.
    run(["dvc", "repro", "--force"], repo_copy)
    after = snapshot(repo_copy)
    for name in OUTPUTS:
        assert before[name] == after[name], f"{name} differs between two runs with the same params"

    # One param changed: only train, evaluate and export rerun, and the diff tools show it.
    update_params(repo_copy / "params.yaml", {"train.learning_rate": 0.003})
    changed = run(["dvc", "repro"], repo_copy)
    assert all(f"Running stage '{stage}'" in changed.stdout for stage in ("train", "evaluate", "export"))
    assert "Running stage 'download'" not in changed.stdout and "Running stage 'preprocess'" not in changed.stdout
    metrics_diff = json.loads(run(["dvc", "metrics", "diff", "--json"], repo_copy).stdout)
    assert metrics_diff["metrics/evaluate.json"]["test.loss"]["diff"] != 0
    params_diff = json.loads(run(["dvc", "params", "diff", "--json"], repo_copy).stdout)
    change = params_diff["params.yaml"]["train.learning_rate"]
    assert (change["old"], change["new"]) == (0.001, 0.003)
    plots = run(["dvc", "plots", "diff", "HEAD", "--json"], repo_copy)
    rendered = json.loads(plots.stdout)["data"]
    assert {"loss", "huber", "confusion", "plots/summary.png"} <= set(rendered)
    assert all(len(rendered[name]) >= 1 for name in ("loss", "huber", "confusion"))


@pytest.mark.slow
def test_shards_run_end_to_end_under_dvc_repro_and_rerun_bitwise(repo_copy):
    update_params(repo_copy / "params.yaml", {"preprocess.format": "shards", "preprocess.shard_size": 128, "train.shuffle_window": 200})
    first = run(["dvc", "repro"], repo_copy)
    assert all(f"Running stage '{stage}'" in first.stdout for stage in STAGES)
    assert "prepared digits as shards" in first.stderr
    meta = json.loads((repo_copy / "data/prepared/meta.json").read_text())
    assert meta["format"] == "shards" and [name for name, _ in meta["shards"]["train"]] == ["train-00000.rec", "train-00001.rec", "train-00002.rec", "train-00003.rec"]
    assert not list((repo_copy / "data/prepared").glob("*.npy"))
    test_metrics = json.loads((repo_copy / "metrics/evaluate.json").read_text())["test"]
    assert test_metrics["accuracy"] > 0.5
    card = json.loads((repo_copy / "export/model/model_card.json").read_text())
    assert card["input"]["value_range"] == [0, 16] and card["test_metrics"] == test_metrics
    before = snapshot(repo_copy)
    run(["dvc", "repro", "--force"], repo_copy)
    after = snapshot(repo_copy)
    for name in OUTPUTS:
        assert before[name] == after[name], f"{name} differs between two runs on shards with the same params"


@pytest.mark.slow
def test_bad_params_fail_before_any_work_and_touch_nothing(repo_copy):
    update_params(repo_copy / "params.yaml", {"train.batch_size": 0})
    for stage in STAGES:
        result = run(stage_command(stage, repo_copy), repo_copy, check=False)
        assert result.returncode == 2, (stage, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert lines == ["error: params.yaml: train.batch_size = 0 is invalid: must be >= 1 and <= 2147483647. Fix `train.batch_size` in params.yaml."]
    assert not (repo_copy / "data").exists() and not (repo_copy / "models").exists() and not (repo_copy / "metrics").exists()
    assert run(["dvc", "repro"], repo_copy, check=False).returncode != 0


def _start_train(repo: Path) -> subprocess.Popen:
    return subprocess.Popen(stage_command("train", repo), cwd=repo, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(repo: Path, pattern: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not list(repo.glob(pattern)):
        assert process.poll() is None, f"train ended before {pattern} appeared: {process.communicate()}"
        assert time.monotonic() < deadline, f"{pattern} never appeared"
        time.sleep(0.01)


KILL_OUTPUTS = ("models/model.weights.npz", "metrics/train.json", "metrics/train_history.tsv")


@pytest.fixture(scope="session")
def uninterrupted_train(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, dict[str, bytes]]]:
    """For a prepared format: a tiny repo with the kill tests' params, prepared, and the bytes of its
    uninterrupted train run. Made once per format in each test process (pytest-xdist worker)."""
    made: dict[str, tuple[Path, dict[str, bytes]]] = {}

    def reference(prepared_format: str) -> tuple[Path, dict[str, bytes]]:
        if prepared_format not in made:
            # XLA on: a tiny run is too short for `auto`, and the compiled (arrays: stacked) steps are what a full-size run uses.
            changes = {"train.epochs": 30, "train.mlp.dropout": 0.3, "train.schedule": "cosine", "preprocess.format": prepared_format, "train.jit_compile": True}
            if prepared_format == "shards":  # 400 training examples in 7 shards, mixed by a buffer smaller than the split
                changes |= {"preprocess.shard_size": 64, "train.shuffle_window": 100}
            repo = copy_project(tmp_path_factory.mktemp(f"uninterrupted-{prepared_format}") / "repo", TINY_PARAMS | changes)
            run(["dvc", "repro", "preprocess"], repo)
            assert len(list((repo / "data/prepared").glob("train-*.rec"))) == (7 if prepared_format == "shards" else 0)
            run(stage_command("train", repo), repo)
            made[prepared_format] = repo, {name: (repo / name).read_bytes() for name in KILL_OUTPUTS}
        return made[prepared_format]

    return reference


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kill", "prepared_format"),
    [(signal.SIGKILL, "arrays"), (signal.SIGTERM, "arrays"), (signal.SIGINT, "arrays"), (signal.SIGKILL, "shards")],
    ids=["SIGKILL", "SIGTERM", "SIGINT", "SIGKILL-shards"],
)
def test_killed_train_resumes_to_bitwise_identical_result(uninterrupted_train, tmp_path, kill, prepared_format):
    finished, reference = uninterrupted_train(prepared_format)
    repo_copy = tmp_path / "repo"
    # The prepared repo without the finished run's checkpoints and outputs: the run below starts from scratch.
    shutil.copytree(finished, repo_copy, symlinks=True, ignore=shutil.ignore_patterns("checkpoints", "models", "metrics"))

    process = _start_train(repo_copy)
    _wait_for(repo_copy, "checkpoints/*/ckpt-3.index", process)  # the run's own folder under checkpoints/
    process.send_signal(kill)
    _, stderr = process.communicate(timeout=120)
    if kill == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 130, stderr
        assert "interrupted" in stderr
    assert not (repo_copy / "models").exists() and not (repo_copy / "metrics").exists()  # nothing half-written

    resumed = run(stage_command("train", repo_copy), repo_copy)
    assert "resumed from" in resumed.stderr
    for name, data in reference.items():
        assert (repo_copy / name).read_bytes() == data, f"{name} differs after resume"
    assert not any(path.name.endswith(".partial") for path in repo_copy.rglob("*"))
    os.sync()
