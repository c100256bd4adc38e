"""Reproducibility gate: rerun the committed pipeline in a fresh clone and compare with the commit.

`scripts/repro_gate.py` is the command. The comparison is made of pure functions on dicts, which
the unit tests call directly:

* **outputs**: the md5 of every `outs` entry of every stage in the committed `dvc.lock` against
  the md5 that a fresh `dvc repro --force` writes.
* **metrics**: `dvc metrics diff --json --all` (HEAD against the fresh workspace) filled in with
  the raw values of the metrics files that dvc.yaml names.
* **inputs**: source files and params recorded in `dvc.lock`. If they differ, the committed lock
  was written for other code or params (a stale lock). That is drift in every mode.
* **committed files**: every git-tracked output (`cache: false`) against its md5 in the committed
  `dvc.lock`. A mismatch means the commit holds files from another run. That is drift in every mode.

Modes: *exact* (same CPU kind as the committed run: any difference is drift) and *tolerant*
(another CPU kind: oneDNN and Eigen pick kernels by CPU flags, so bits may differ. Hashes are
reported but not fatal, and numeric metrics must agree within `METRIC_ABS_TOLERANCE`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

EXIT_REPRODUCED, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2
MODES = ("auto", "exact", "tolerant")

# Tolerance for numeric metrics in tolerant mode (another CPU kind). It is absolute and applies
# to every float metric (losses, accuracies, huber, F1). Why 1e-4:
# * On another CPU kind, oneDNN and Eigen take other kernel paths (SSE/AVX2/AVX-512/AMX), and
#   numpy does too. That changes the order of float32 additions by about 1e-7 relative per op.
#   Measured on the default digits run (20 epochs): with oneDNN capped at AVX2 or SSE4.1
#   (ONEDNN_MAX_CPU_ISA) or switched off (TF_ENABLE_ONEDNN_OPTS=0), the largest metric change
#   was 2.2e-8 (test.loss), and accuracies and F1 were identical. The default train step is
#   XLA-compiled (train.jit_compile: auto), and XLA generates code for the host CPU: with XLA and
#   oneDNN both capped at AVX2 or SSE4.2 (XLA_FLAGS=--xla_cpu_max_isa, ONEDNN_MAX_CPU_ISA) on an
#   AVX-512 machine, the largest metric change was 7.5e-9 (test.loss, val.loss), weights moved by
#   at most 1.5e-7, and accuracies and F1 were identical. 1e-4 leaves 4 orders of magnitude of
#   headroom.
# * 1e-4 still catches any real change. One flipped prediction among the 359 digits test images
#   moves accuracy by 2.8e-3. Changing train.learning_rate from 0.001 to 0.003 moves test.loss
#   by about 1e-2.
# Counts and flags (epochs_run, best_epoch, stopped_early) must match exactly in every mode.
METRIC_ABS_TOLERANCE = 1e-4

SECTION_TITLES = {
    "inputs": "dvc.lock inputs (code, params)",
    "committed": "committed files vs committed dvc.lock",
    "outs": "dvc.lock outputs (md5)",
    "metrics": "metrics",
}
# Sections where matching rows are summarised in one line instead of one row each.
COLLAPSED_SECTIONS = ("inputs", "committed")
# Printed under the table when a section holds drift.
HINTS = {
    "inputs": "the committed dvc.lock was written for other code or params (stale lock): run `dvc repro` "
    "on a clean checkout of this commit and commit the updated dvc.lock",
    "committed": "a committed output does not match the committed dvc.lock: commit the outputs and dvc.lock of the same run",
    "outs": "outputs differ bitwise: on the same CPU kind that means nondeterminism, or an input dvc.lock does not track",
    "metrics": "metrics differ from the committed ones",
}


class GateError(Exception):
    """Could not run the comparison (clone, dvc repro or dvc metrics failed, lock missing)."""


@dataclass(frozen=True)
class Row:
    section: str  # "inputs" | "committed" | "outs" | "metrics"
    name: str  # file (and metric key)
    committed: Any
    fresh: Any
    difference: str  # "same", "+1.2e-06", "md5 differs", "missing in fresh run", ...
    fatal: bool  # counts as drift

    @property
    def same(self) -> bool:
        return self.difference == "same"


# --------------------------------------------------------------------------- dvc.lock helpers


def lock_outs(lock: Mapping[str, Any]) -> dict[str, str]:
    """`{path: md5}` over every `outs` entry of every stage in a parsed dvc.lock."""
    outs: dict[str, str] = {}
    for stage in (lock or {}).get("stages", {}).values():
        for out in stage.get("outs", []) or []:
            outs[out["path"]] = _entry_hash(out)
    return outs


def lock_inputs(lock: Mapping[str, Any]) -> dict[str, str]:
    """Deps that no stage produces (source files) and params, per stage: `{label: hash or value}`.

    Deps produced by another stage (data/raw, models, ...) are left out: the outputs comparison
    covers them, and on another CPU kind they may differ legitimately."""
    stages = (lock or {}).get("stages", {})
    produced = set(lock_outs(lock))
    inputs: dict[str, str] = {}
    for stage_name, stage in stages.items():
        for dep in stage.get("deps", []) or []:
            if dep["path"] not in produced:
                inputs[f"{dep['path']} ({stage_name})"] = _entry_hash(dep)
        for params_file, values in (stage.get("params") or {}).items():
            for key, value in (values or {}).items():
                inputs[f"{params_file}:{key} ({stage_name})"] = json.dumps(value, sort_keys=True)
    inputs.update({f"cmd ({name})": str(stage.get("cmd")) for name, stage in stages.items()})
    return inputs


def _entry_hash(entry: Mapping[str, Any]) -> str:
    kind = entry.get("hash", "md5")
    return str(entry.get(kind) or entry.get("md5") or entry.get("etag") or "?")


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def metrics_files(dvc_yaml: Mapping[str, Any]) -> list[str]:
    """Paths declared under `metrics:` in a parsed dvc.yaml."""
    files = []
    for stage in (dvc_yaml or {}).get("stages", {}).values():
        for entry in stage.get("metrics", []) or []:
            files.append(entry if isinstance(entry, str) else next(iter(entry)))
    return files


# --------------------------------------------------------------------------- metrics helpers


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{"test": {"loss": 1}}` -> `{"test.loss": 1}` (dvc's own naming)."""
    if not isinstance(tree, Mapping):
        return {prefix: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


MISSING = object()


def merge_metrics(
    dvc_diff: Mapping[str, Any],
    committed_raw: Mapping[str, Any] | None = None,
    fresh_raw: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, tuple[Any, Any]]]:
    """`{file: {key: (committed, fresh)}}` from `dvc metrics diff --json --all` output, completed
    with the raw JSON of each side (`{file: parsed json}`) for anything dvc left out."""
    merged: dict[str, dict[str, tuple[Any, Any]]] = {}
    for name, entries in (dvc_diff or {}).items():
        for key, entry in (entries or {}).items():
            merged.setdefault(name, {})[key] = (entry.get("old", MISSING), entry.get("new", MISSING))
    committed_flat = {name: flatten(tree) for name, tree in (committed_raw or {}).items()}
    fresh_flat = {name: flatten(tree) for name, tree in (fresh_raw or {}).items()}
    for name in sorted(set(committed_flat) | set(fresh_flat)):
        old, new = committed_flat.get(name, {}), fresh_flat.get(name, {})
        for key in sorted(set(old) | set(new)):
            merged.setdefault(name, {}).setdefault(key, (old.get(key, MISSING), new.get(key, MISSING)))
    return merged


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compare_metric(committed: Any, fresh: Any, mode: str, tolerance: float = METRIC_ABS_TOLERANCE) -> tuple[str, bool]:
    """(difference text, fatal) for one metric value. Exact mode: equal values only. Tolerant
    mode: floats within `tolerance`; ints, flags and strings still equal."""
    if committed is MISSING or fresh is MISSING:
        return ("missing in fresh run" if fresh is MISSING else "not in commit"), True
    if _is_number(committed) and _is_number(fresh):
        if committed == fresh or (math.isnan(committed) and math.isnan(fresh)):
            return "same", False
        delta = fresh - committed
        text = f"{delta:+.3g}" if math.isfinite(delta) else "not finite"
        if mode == "tolerant" and (isinstance(committed, float) or isinstance(fresh, float)):
            if math.isfinite(delta) and abs(delta) <= tolerance:
                return f"{text} (within {tolerance:g})", False
            return f"{text} (beyond {tolerance:g})", True
        return text, True
    if type(committed) is type(fresh) and committed == fresh:
        return "same", False
    return "differs", True


# --------------------------------------------------------------------------- the comparison


def choose_mode(requested: str, committed_cpu: Mapping[str, Any] | None, current_cpu: Mapping[str, Any]) -> tuple[str, str]:
    """(mode, reason). auto: exact when the CPU kind matches the committed run's, else tolerant."""
    if requested not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {requested!r}")
    if requested != "auto":
        return requested, f"--mode {requested}"
    if committed_cpu is None:
        return "tolerant", "the committed run records no CPU kind"
    if dict(committed_cpu) == dict(current_cpu):
        return "exact", f"same CPU kind as the committed run ({describe_cpu(current_cpu)})"
    return "tolerant", f"CPU kind differs: committed {describe_cpu(committed_cpu)}, here {describe_cpu(current_cpu)}"


def describe_cpu(cpu: Mapping[str, Any]) -> str:
    return f"{cpu.get('machine', '?')} {cpu.get('model', '?')}, flags {cpu.get('flags_sha256', '?')}"


def compare(
    committed_lock: Mapping[str, Any],
    fresh_lock: Mapping[str, Any],
    metrics: Mapping[str, Mapping[str, tuple[Any, Any]]],
    mode: str,
    committed_files: Mapping[str, str] | None = None,
    tolerance: float = METRIC_ABS_TOLERANCE,
) -> list[Row]:
    """Every comparison row. `metrics` is `merge_metrics(...)`; `committed_files` maps a
    git-tracked output path to the md5 of its committed bytes."""
    if mode not in ("exact", "tolerant"):
        raise ValueError(f"mode must be exact or tolerant, not {mode!r}")
    rows: list[Row] = []

    old_in, new_in = lock_inputs(committed_lock), lock_inputs(fresh_lock)
    for name in sorted(set(old_in) | set(new_in)):
        old, new = old_in.get(name, MISSING), new_in.get(name, MISSING)
        if old == new:
            rows.append(Row("inputs", name, old, new, "same", False))
        else:
            text = "missing in fresh run" if new is MISSING else "not in commit" if old is MISSING else "differs: committed dvc.lock is stale"
            rows.append(Row("inputs", name, _show(old), _show(new), text, True))

    old_outs, new_outs = lock_outs(committed_lock), lock_outs(fresh_lock)
    for name, md5 in sorted((committed_files or {}).items()):
        locked = old_outs.get(name, MISSING)
        same = locked == md5
        rows.append(Row("committed", name, _show(locked), md5, "same" if same else "committed file does not match dvc.lock", not same))

    for name in sorted(set(old_outs) | set(new_outs)):
        old, new = old_outs.get(name, MISSING), new_outs.get(name, MISSING)
        if old == new:
            rows.append(Row("outs", name, old, new, "same", False))
        elif old is MISSING or new is MISSING:
            rows.append(Row("outs", name, _show(old), _show(new), "missing in fresh run" if new is MISSING else "not in commit", True))
        else:
            fatal = mode == "exact"
            rows.append(Row("outs", name, old, new, "md5 differs" if fatal else "md5 differs (not fatal: other CPU kind)", fatal))

    for file_name in sorted(metrics):
        for key, (old, new) in sorted(metrics[file_name].items()):
            text, fatal = compare_metric(old, new, mode, tolerance)
            rows.append(Row("metrics", f"{file_name}: {key}", _show(old), _show(new), text, fatal))
    return rows


def _show(value: Any) -> Any:
    return "(missing)" if value is MISSING else value


def is_drift(rows: Sequence[Row]) -> bool:
    return any(row.fatal for row in rows)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if re.fullmatch(r"[0-9a-f]{32}(\.dir)?", text):  # md5: the first 12 digits are enough to read
        return text[:12] + ("….dir" if text.endswith(".dir") else "…")
    return text if len(text) <= 40 else text[:39] + "…"


def render(rows: Sequence[Row], mode: str, reason: str, tolerance: float = METRIC_ABS_TOLERANCE) -> str:
    """The readable diff: one table (file or metric | committed | fresh | difference) by section,
    then a verdict line."""
    header = ("file or metric", "committed", "fresh", "difference")
    table: list[tuple[str, str, str, str] | str] = []
    for section, title in SECTION_TITLES.items():
        section_rows = [row for row in rows if row.section == section]
        if not section_rows:
            continue
        table.append(f"{title}:")
        shown = [row for row in section_rows if not (section in COLLAPSED_SECTIONS and row.same)]
        for row in shown:
            flag = "  " if not row.fatal else "! "
            table.append((flag + row.name, _cell(row.committed), _cell(row.fresh), row.difference))
        hidden = len(section_rows) - len(shown)
        if hidden:
            table.append(f"  ({hidden} {'more ' if shown else ''}entries, all the same)")
    widths = [max([len(header[i])] + [len(line[i]) for line in table if isinstance(line, tuple)]) for i in range(4)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    tolerance_text = f", numeric metrics within abs {tolerance:g}" if mode == "tolerant" else ", bitwise"
    lines = [f"mode: {mode} ({reason}{tolerance_text})", fmt(header), fmt(["-" * w for w in widths])]
    lines += [line if isinstance(line, str) else fmt(line) for line in table]
    fatal = [row for row in rows if row.fatal]
    tolerated = [row for row in rows if not row.fatal and not row.same]
    if fatal:
        names = ", ".join(row.name for row in fatal[:6]) + (", …" if len(fatal) > 6 else "")
        lines.append(f"DRIFT: {len(fatal)} of {len(rows)} entries differ ({mode} mode): {names}")
        drifted = {row.section for row in fatal}
        for section in SECTION_TITLES:
            if section in drifted:
                hint = HINTS[section]
                if section in ("outs", "metrics") and "inputs" in drifted:
                    hint = f"{hint}; expected while the lock is stale (code or params changed): refresh dvc.lock first"
                lines.append(f"hint: {hint}")
    else:
        extra = f"; {len(tolerated)} tolerated differences" if tolerated else ""
        lines.append(f"REPRODUCED: {len(rows)} entries compared ({mode} mode){extra}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- running it


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
        tracked = set(_git(["ls-files"], clone, env).splitlines())
        committed_files = {path: file_md5(clone / path) for path in lock_outs(committed_lock) if path in tracked}
        names = metrics_files(dvc_yaml)
        committed_raw = {name: _load_json(clone / name) for name in names}
        committed_provenance = _load_json(clone / "metrics/train.provenance.json") or {}
        mode, reason = choose_mode(requested_mode, committed_provenance.get("cpu"), cpu_kind())

        dvc = shutil.which("dvc", path=env["PATH"]) or "dvc"
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
        skipped = [name for name in (dvc_yaml.get("stages") or {}) if name not in ran]
        if skipped:
            raise GateError(f"dvc repro --force did not run stage(s) {', '.join(skipped)} (frozen?): their outputs cannot be checked")

        fresh_lock = _load_yaml(clone / "dvc.lock", "fresh dvc.lock")
        diff = _run([dvc, "metrics", "diff", "--json", "--all"], clone, env, timeout=600)
        if diff.returncode != 0:
            raise GateError(f"dvc metrics diff failed ({diff.returncode}):\n{tail(diff.stderr)}")
        try:
            dvc_diff = json.loads(diff.stdout or "{}")
        except ValueError as error:
            raise GateError(f"dvc metrics diff --json printed no JSON: {error}\n{tail(diff.stdout)}") from error
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

        rows = compare(committed_lock, fresh_lock, metrics, mode, committed_files)
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


def main(argv: Sequence[str] | None = None, default_repo: Path | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="repro_gate.py",
        description="Clone committed HEAD, run `dvc repro` there and compare dvc.lock output hashes and "
        "metrics with the commit. Exit 0 reproduced, 1 drift, 2 error.",
    )
    parser.add_argument("--mode", choices=MODES, default="auto", help="exact: any difference is drift; tolerant: hashes reported, metrics within "
                        f"{METRIC_ABS_TOLERANCE:g}; auto (default): exact on the committed run's CPU kind, else tolerant")
    parser.add_argument("--keep", action="store_true", help="keep the temp clone for inspection")
    parser.add_argument("--repo", type=Path, default=default_repo or Path.cwd(), help="git repository to check (default: this project)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed for dvc repro (default 3600)")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    return run_gate(args.repo.resolve(), args.mode, args.keep, args.timeout)
