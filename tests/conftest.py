"""Shared fixtures: project root, the shared real data sets, and a throwaway copy of the repo."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tapework.params import Params, load_params
from tools.workspace import ROOT, SHARED_DATA, copy_project, run, stage_command, tool_env, update_params  # noqa: F401  (shared with the tests)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")



def make_params(changes: dict[str, object] | None = None) -> Params:
    """The committed params.yaml with dotted-key `changes`, validated: tests run the settings `dvc repro` runs."""
    return load_params(ROOT / "params.yaml", changes)


# One reason for every real-data skip, so pytest's summary prints it once with the count.
SHARED_DATA_MISSING = (
    f"real-data test: {SHARED_DATA} is missing. Put the genuine data sets there (mnist/, fashion-mnist/, "
    "california-housing/: the canonical files, see README 'Tests') or set TAPEWORK_SHARED_DATA to their folder"
)


def shared_data(name: str) -> Path:
    """A folder of the shared real data. Missing: skipped with one reason, or a failure where
    TAPEWORK_REQUIRE_SHARED_DATA=1 (.ci/run sets it, so CI always proves the real-data tests)."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        if os.environ.get("TAPEWORK_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"{SHARED_DATA_MISSING} (TAPEWORK_REQUIRE_SHARED_DATA=1 makes this a failure)")
        pytest.skip(SHARED_DATA_MISSING)
    return folder


TINY_PARAMS = {
    "preprocess.max_train_examples": 400,
    "train.epochs": 3,
    "train.batch_size": 16,
    "train.mlp.hidden_units": [32],
    "train.histogram_every": 1,
}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test (and every stage it runs) gets its own download cache and no mirror from outside."""
    monkeypatch.setenv("TAPEWORK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TAPEWORK_MIRROR", raising=False)
    # Asks train() to split the CPU into devices, which fails once TF has started in this process.
    monkeypatch.delenv("TAPEWORK_LOGICAL_CPUS", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # never send loopback requests to a proxy
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A throwaway copy of the repo (see copy_project) with tiny params."""
    return copy_project(tmp_path / "repo", TINY_PARAMS)


# Beside the `tiny_results` repo: what its `dvc repro` printed ({"stdout": ..., "stderr": ...}).
TINY_REPRO_OUTPUT = "repro-output.json"


@pytest.fixture(scope="session")
def tiny_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo copy with tiny params after one full `dvc repro` from scratch, made once per test process
    (each pytest-xdist worker): never use it directly, take a copy with `tiny_trained`. What that
    run printed is in TINY_REPRO_OUTPUT beside it."""
    repo = copy_project(tmp_path_factory.mktemp("tiny-results") / "repo", TINY_PARAMS)
    result = run(["dvc", "repro"], repo, TAPEWORK_CACHE=str(repo.parent / "cache"))
    (repo.parent / TINY_REPRO_OUTPUT).write_text(json.dumps({"stdout": result.stdout, "stderr": result.stderr}))
    return repo


@pytest.fixture
def tiny_trained(tiny_results: Path, tmp_path: Path) -> Path:
    """A throwaway copy of `tiny_results`: every stage's outputs exist, uncommitted, and `dvc status` is clean."""
    target = tmp_path / "repo"
    shutil.copytree(tiny_results, target, symlinks=True)
    return target
