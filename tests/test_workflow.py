"""A failed run loses nothing: an invalid params.yaml stops in the check_params stage, before DVC
clears any stage's outputs, and a valid change still reruns only what reads it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import run, update_params

RESULT_FOLDERS = ("data", "models", "metrics", "plots")


def snapshot(repo: Path) -> dict[str, bytes]:
    """Every file of every result folder, by path (stage lock files aside: they hold the last writer's PID)."""
    return {
        path.relative_to(repo).as_posix(): path.read_bytes()
        for folder in RESULT_FOLDERS
        for path in sorted((repo / folder).rglob("*"))
        if path.is_file() and not path.name.endswith(".outputs.lock")
    }


@pytest.fixture(scope="module")
def produced(tiny_results, tmp_path_factory) -> Path:
    """A tiny repo copy after one full `dvc repro`, its results committed."""
    repo = tmp_path_factory.mktemp("workflow") / "repo"
    shutil.copytree(tiny_results, repo, symlinks=True)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "results"], repo)
    return repo


def restore_params(repo: Path) -> None:
    """The documented recovery. Not `git checkout -- params.yaml`: git can take DVC's same-size
    rewrite, made within the second git last looked at the file, for unchanged and keep it."""
    (repo / "params.yaml").write_bytes(run(["git", "show", "HEAD:params.yaml"], repo).stdout.encode())


BAD_CHANGES = [
    ("train.model=cnnn", "train.model", "did you mean 'cnn'"),  # a typo in a value
    # A typo in a key: `+` is DVC's override syntax for a key params.yaml does not have yet.
    ("+train.learning_rat=0.01", "unknown key `train.learning_rat`", "Did you mean `train.learning_rate`"),
    ("download.dataset=mnits", "download.dataset", "did you mean 'mnist'"),  # a bad data set name
]


@pytest.mark.slow
@pytest.mark.parametrize(("change", "named", "hint"), BAD_CHANGES, ids=[change for change, _, _ in BAD_CHANGES])
@pytest.mark.parametrize("how", ["dvc exp run -S", "edit params.yaml + dvc repro"])
def test_invalid_params_leave_every_result_untouched(produced: Path, change: str, named: str, hint: str, how: str) -> None:
    before = snapshot(produced)
    assert {"models/model.weights.npz", "metrics/train.json", "data/raw/manifest.json", "plots/summary.png"} <= set(before)
    try:
        if how == "dvc exp run -S":
            result = run(["dvc", "exp", "run", "-S", change], produced, check=False)
        else:
            key, value = change.removeprefix("+").split("=")
            update_params(produced / "params.yaml", {key: value})
            result = run(["dvc", "repro"], produced, check=False)
        assert result.returncode != 0
        assert "Running stage 'check_params'" in result.stdout
        assert "Running stage 'download'" not in result.stdout and "Running stage 'train'" not in result.stdout
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: params.yaml")]
        assert len(errors) == 1 and named in errors[0] and hint in errors[0], result.stderr
        assert snapshot(produced) == before
    finally:
        restore_params(produced)
    # The documented recovery puts the workspace back to the committed run.
    run(["dvc", "checkout"], produced)
    assert run(["dvc", "status"], produced).stdout.strip() == "Data and pipelines are up to date."


@pytest.mark.slow
def test_a_valid_train_change_reruns_only_train_and_evaluate(produced: Path) -> None:
    try:
        update_params(produced / "params.yaml", {"train.epochs": 2})
        result = run(["dvc", "repro"], produced)
        assert "Running stage 'check_params'" in result.stdout
        for stage in ("download", "preprocess"):
            assert f"Stage '{stage}' didn't change, skipping" in result.stdout, result.stdout
        for stage in ("train", "evaluate"):
            assert f"Running stage '{stage}'" in result.stdout, result.stdout
    finally:
        restore_params(produced)
        run(["git", "checkout", "--", "dvc.lock", "metrics", "plots"], produced)
        run(["dvc", "checkout", "--force"], produced)
