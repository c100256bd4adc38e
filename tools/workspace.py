"""Helpers that tests and benchmarks share: the project root, subprocess environments, params
edits and throwaway copies of the repository.

They work on a source checkout (the editable install `pip install --no-deps -e .` that
scripts/env.sh makes), since ROOT is the folder above this package. Nothing here imports pytest.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tapework.params import with_overrides

ROOT = Path(__file__).resolve().parents[1]
# The genuine MNIST, Fashion-MNIST and California housing files the real-data tests serve
# through the mirror setting: ../shared/data beside the checkout, or TAPEWORK_SHARED_DATA.
SHARED_DATA = Path(os.environ.get("TAPEWORK_SHARED_DATA") or ROOT.parent / "shared" / "data")


def tool_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin first, so `python` and `dvc` are ours."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("TAPEWORK_MIRROR", None)
    env.pop("TAPEWORK_LOGICAL_CPUS", None)
    env.update(extra)
    return env


def run(command: list[str], cwd: Path, check: bool = True, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Run `command` in `cwd` with tool_env(**env); with `check`, a non-zero exit raises AssertionError with the output's tail."""
    result = subprocess.run(command, cwd=cwd, env=tool_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def stage_command(name: str, repo: Path = ROOT) -> list[str]:
    """The `cmd` of stage `name` in the repo's dvc.yaml, run with this interpreter."""
    words = shlex.split(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][name]["cmd"])
    return [sys.executable, *words[1:]] if words[0] == "python" else words


def update_params(path: Path, changes: dict[str, object]) -> None:
    """Set dotted keys (e.g. 'train.epochs') in a params.yaml."""
    path.write_text(yaml.safe_dump(with_overrides(yaml.safe_load(path.read_text()), changes), sort_keys=False))


def copy_project(target: Path, params_changes: dict[str, object] | None = None) -> Path:
    """The project's tracked and unignored files copied into `target`, a fresh git repo with one commit.

    The committed results (dvc.lock, metrics, plots) belong to the default run, so the copy starts
    without them: its first `dvc repro` runs every stage.
    """
    if not (ROOT / "dvc.yaml").is_file():
        raise RuntimeError(f"{ROOT} is not a tapework checkout: copy_project needs the editable install of a source tree")
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
