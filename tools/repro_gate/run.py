"""Running the gate: clone committed HEAD, ask dvc, compare (compare.py), print the table.

In the fresh clone, in this order:

1. `dvc status --json` against the committed dvc.lock: stale lock inputs and committed outputs
   that do not match the lock (`{}` when the commit is consistent).
2. `dvc repro --force`, then the fresh dvc.lock against the committed one (output md5s).
3. `dvc metrics diff --json --all` (HEAD against the fresh workspace) and the raw metrics JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from tapework.io import file_digest
from tools.repro_gate.compare import (
    METRIC_ABS_TOLERANCE,
    MODES,
    choose_mode,
    compare,
    is_drift,
    merge_metrics,
    metrics_files,
    render,
    status_rows,
)

EXIT_REPRODUCED, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class GateError(Exception):
    """Could not run the comparison (clone, dvc status, dvc repro or dvc metrics failed, lock missing)."""


def tool_env(cache_dir: Path) -> dict[str, str]:
    """This interpreter's bin first on PATH (its `dvc` and `python`), a private download cache."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TAPEWORK_CACHE"] = str(cache_dir)
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _run(command: list[str], cwd: Path, env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run in its own process group; on timeout kill that group (stage processes included)."""
    process = subprocess.Popen(command, cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise GateError(f"`{' '.join(command)}` ran past {timeout:g} s and was killed; last output:\n{tail(stderr or stdout)}")
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _git(args: list[str], cwd: Path, env: Mapping[str, str]) -> str:
    result = _run(["git", *args], cwd, env, timeout=300)
    if result.returncode != 0:
        raise GateError(f"git {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip()


def _dvc_json(args: list[str], dvc: str, cwd: Path, env: Mapping[str, str], timeout: float = 600) -> Any:
    """Parsed stdout of `dvc <args>` (a `--json` command)."""
    label = f"dvc {' '.join(args)}"
    result = _run([dvc, *args], cwd, env, timeout=timeout)
    if result.returncode != 0:
        raise GateError(f"{label} failed ({result.returncode}):\n{tail(result.stderr)}")
    try:
        return json.loads(result.stdout or "{}")
    except ValueError as error:
        raise GateError(f"{label} printed no JSON: {error}\n{tail(result.stdout)}") from error


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise GateError(f"{path.name} is not valid JSON: {error}") from error


def _load_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise GateError(f"no {what} in the commit: nothing to compare against (run `dvc repro` and commit dvc.lock)")
    return yaml.safe_load(path.read_text())


def run_gate(repo: Path, requested_mode: str = "auto", keep: bool = False, timeout: float = 3600, out: TextIO = sys.stdout) -> int:
    from tapework.provenance import cpu_kind  # light import (no TensorFlow)

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="tapework-gate-"))
    clone = work / "repo"
    env = tool_env(work / "cache")
    try:
        head = _git(["rev-parse", "HEAD"], repo, env)
        if _git(["status", "--porcelain", "--untracked-files=no"], repo, env):
            print(f"note: {repo} has uncommitted changes; the gate checks committed HEAD only", file=out)
        _git(["clone", "--quiet", "--no-hardlinks", str(repo), str(clone)], work, env)
        _git(["-c", "advice.detachedHead=false", "checkout", "--quiet", head], clone, env)
        print(f"gate: commit {head[:12]} cloned into {clone}", file=out)

        committed_lock = _load_yaml(clone / "dvc.lock", "dvc.lock")
        dvc_yaml = _load_yaml(clone / "dvc.yaml", "dvc.yaml")
        dvc = shutil.which("dvc", path=env["PATH"]) or "dvc"
        # Before the repro, while the workspace holds the committed files: what dvc finds changed
        # against the committed dvc.lock (code, params, command, git-held outputs).
        status = _dvc_json(["status", "--json"], dvc, clone, env)
        committed_md5 = {
            row.name: file_digest(clone / row.name, "md5")
            for row in status_rows(status)
            if row.section == "committed" and (clone / row.name).is_file()
        }
        names = metrics_files(dvc_yaml)
        committed_raw = {name: _load_json(clone / name) for name in names}
        committed_provenance = _load_json(clone / "metrics/train.provenance.json") or {}
        mode, reason = choose_mode(requested_mode, committed_provenance.get("cpu"), cpu_kind())

        repro_start = time.monotonic()
        # --force: run every stage command. Without it, a stage whose outputs are all git-tracked
        # (evaluate: cache: false) and whose deps came out identical is skipped, so its committed
        # outputs would be compared with themselves. --force also bypasses the run-cache.
        result = _run([dvc, "repro", "--force"], clone, env, timeout)
        ran = re.findall(r"Running stage '([^']+)'", result.stdout)
        if result.returncode != 0:
            stage = ran[-1] if ran else "?"
            print(f"ERROR: dvc repro failed (exit {result.returncode}) in stage '{stage}'. Last lines of its stderr:", file=out)
            print(tail(result.stderr or result.stdout), file=out)
            return EXIT_ERROR
        print(f"gate: dvc repro --force ran {', '.join(ran) or 'no stages'} in {time.monotonic() - repro_start:.1f} s", file=out)
        # DVC's names, with one `stage@item` per entry of a `matrix:` stage (none for an empty list).
        listed = _run([dvc, "stage", "list", "--name-only"], clone, env, timeout=300)
        if listed.returncode != 0:
            raise GateError(f"dvc stage list failed ({listed.returncode}):\n{tail(listed.stderr)}")
        stage_names = listed.stdout.split()
        skipped = [name for name in stage_names if name not in ran]
        if skipped:
            raise GateError(f"dvc repro --force did not run stage(s) {', '.join(skipped)} (frozen?): their outputs cannot be checked")

        fresh_lock = _load_yaml(clone / "dvc.lock", "fresh dvc.lock")
        dvc_diff = _dvc_json(["metrics", "diff", "--json", "--all"], dvc, clone, env)
        fresh_raw = {name: _load_json(clone / name) for name in names}
        metrics = merge_metrics(
            dvc_diff,
            {k: v for k, v in committed_raw.items() if v is not None},
            {k: v for k, v in fresh_raw.items() if v is not None},
        )

        fresh_provenance = _load_json(clone / "metrics/train.provenance.json") or {}
        old_packages, new_packages = committed_provenance.get("packages", {}), fresh_provenance.get("packages", {})
        changed = sorted(k for k in set(old_packages) | set(new_packages) if old_packages.get(k) != new_packages.get(k))
        if changed:
            print("note: package versions differ from the committed run: " + ", ".join(f"{k} {old_packages.get(k)} -> {new_packages.get(k)}" for k in changed), file=out)

        rows = compare(committed_lock, fresh_lock, metrics, mode, status, committed_md5)
        print(render(rows, mode, reason), file=out)
        print(f"gate: {time.monotonic() - started:.1f} s in all", file=out)
        return EXIT_DRIFT if is_drift(rows) else EXIT_REPRODUCED
    except GateError as error:
        print(f"ERROR: {error}", file=out)
        return EXIT_ERROR
    finally:
        if keep:
            print(f"gate: kept the clone at {clone}", file=out)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.repro_gate",
        description="Clone committed HEAD, run `dvc status` and `dvc repro --force` there and compare dvc.lock "
        "inputs, output hashes and metrics with the commit. Exit 0 reproduced, 1 drift, 2 error.",
    )
    parser.add_argument("--mode", choices=MODES, default="auto", help="exact: any difference is drift; tolerant: hashes reported, metrics within "
                        f"{METRIC_ABS_TOLERANCE:g}; auto (default): exact on the committed run's CPU kind, else tolerant")
    parser.add_argument("--keep", action="store_true", help="keep the temp clone for inspection")
    parser.add_argument("--repo", type=Path, default=PROJECT_ROOT, help="git repository to check (default: this project)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed for dvc repro (default 3600)")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    return run_gate(args.repo.resolve(), args.mode, args.keep, args.timeout)
