"""Shared fixtures: project root, the shared real data sets, and a throwaway copy of the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def shared_data(name: str) -> Path:
    """A folder of ../shared/data; missing data is a failure, never a silent skip."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.fail(f"{folder} is missing: the real data sets must sit in ../shared/data beside the project")
    return folder


def tool_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin first, so `python` and `dvc` are ours."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("TAPEWORK_MIRROR", None)
    env.pop("TAPEWORK_LOGICAL_CPUS", None)
    env.update(extra)
    return env


def run(command: list[str], cwd: Path, check: bool = True, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=tool_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def update_params(path: Path, changes: dict[str, object]) -> None:
    """Set dotted keys (e.g. 'train.epochs') in a params.yaml."""
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


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


def copy_project(target: Path, params_changes: dict[str, object] | None = None) -> Path:
    """The project's tracked and unignored files copied into `target`, a fresh git repo with one commit.

    The committed results (dvc.lock, metrics, plots) belong to the default run, so the copy starts
    without them: its first `dvc repro` runs every stage.
    """
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    for name in files:
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    for generated in ("dvc.lock", "metrics", "plots"):
        path = target / generated
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if params_changes:
        update_params(target / "params.yaml", params_changes)
    run(["git", "init", "-q"], target)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], target)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"], target)
    return target


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A throwaway copy of the repo (see copy_project) with tiny params."""
    return copy_project(tmp_path / "repo", TINY_PARAMS)
