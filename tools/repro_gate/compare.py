"""The gate's comparison: pure functions on parsed dicts. No git, no subprocess, no file access.

Sections of the report, each built from what DVC prints:

* **inputs**: the code, params and command of every stage against the committed `dvc.lock`, as
  `dvc status --json` reports them in the fresh clone before `dvc repro`. A change means the
  committed lock was written for other code or params (a stale lock). That is drift in every mode.
* **committed**: every git-held output (`cache: false`) against its md5 in the committed
  `dvc.lock`, from the same `dvc status --json`. A change means the commit holds files from
  another run. That is drift in every mode.
* **outs**: the md5 of every `outs` entry of every stage in the committed `dvc.lock` against the
  md5 that a fresh `dvc repro --force` writes.
* **metrics**: `dvc metrics diff --json --all` (HEAD against the fresh workspace) filled in with
  the raw values of the metrics files that dvc.yaml names.

Modes: *exact* (same CPU kind as the committed run: any difference is drift) and *tolerant*
(another CPU kind: oneDNN and Eigen pick kernels by CPU flags, so bits may differ. Hashes are
reported but not fatal, and numeric metrics must agree within `METRIC_ABS_TOLERANCE`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

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

# `dvc status` says this of an output whose bytes are neither in the workspace nor in the DVC
# cache. A fresh clone has no cache, so there every cached output (data, models) is "not in
# cache": those are checked by the outputs comparison after `dvc repro --force`, not here.
NOT_IN_CACHE = "not in cache"
# `dvc status` lists a stage with `always_changed: true` this way even when nothing changed.
ALWAYS_CHANGED = "always changed"
CHANGED_COMMAND = "changed command"


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


MISSING = object()


# --------------------------------------------------------------------------- dvc.lock helpers


def lock_outs(lock: Mapping[str, Any]) -> dict[str, str]:
    """`{path: md5}` over every `outs` entry of every stage in a parsed dvc.lock."""
    outs: dict[str, str] = {}
    for stage in (lock or {}).get("stages", {}).values():
        for out in stage.get("outs", []) or []:
            outs[out["path"]] = _entry_hash(out)
    return outs


def lock_inputs(lock: Mapping[str, Any]) -> dict[str, str]:
    """Deps that no stage produces (source files), params and cmd, per stage: `{label: hash or value}`.

    Labels are the ones `status_rows` gives: `path (stage)`, `params file:key (stage)`,
    `cmd (stage)`. Deps produced by another stage (data/raw, models, ...) are left out: the
    outputs comparison covers them, and on another CPU kind they may differ legitimately."""
    stages = (lock or {}).get("stages", {})
    produced = set(lock_outs(lock))
    inputs: dict[str, str] = {}
    for stage_name, stage in stages.items():
        for dep in stage.get("deps", []) or []:
            if not is_produced(dep["path"], produced):
                inputs[f"{dep['path']} ({stage_name})"] = _entry_hash(dep)
        for params_file, values in (stage.get("params") or {}).items():
            for key, value in (values or {}).items():
                inputs[f"{params_file}:{key} ({stage_name})"] = json.dumps(value, sort_keys=True)
    inputs.update({f"cmd ({name})": str(stage.get("cmd")) for name, stage in stages.items()})
    return inputs


def is_produced(dep: str, outs: Collection[str]) -> bool:
    """Whether a dep is, or is a folder holding, another stage's output (the aggregate stage's
    `runs`, which holds every extra seed's outputs): then its hash follows those outputs."""
    return any(out == dep or out.startswith(f"{dep}/") for out in outs)


def _entry_hash(entry: Mapping[str, Any]) -> str:
    kind = entry.get("hash", "md5")
    return str(entry.get(kind) or entry.get("md5") or entry.get("etag") or "?")


def metrics_files(dvc_yaml: Mapping[str, Any]) -> list[str]:
    """Paths declared under `metrics:` in a parsed dvc.yaml."""
    files = []
    for stage in (dvc_yaml or {}).get("stages", {}).values():
        for entry in stage.get("metrics", []) or []:
            files.append(entry if isinstance(entry, str) else next(iter(entry)))
    return files


# --------------------------------------------------------------------------- dvc status


def _status_items(status: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """`(stage, kind, name, state)` for every entry of parsed `dvc status --json` output.

    The output maps each stage to a list of `{"changed deps": {...}}`, `{"changed outs": {...}}`
    and plain strings ("changed command", "always changed"). A changed params file is a dep whose
    state is `{key: state}` (or a bare state when the stage has no params in dvc.lock).
    kind: "dep", "param", "out" or "stage" (a plain string entry, which is also its state)."""
    items: list[tuple[str, str, str, str]] = []
    for stage, entries in (status or {}).items():
        for entry in entries or []:
            if isinstance(entry, str):
                items.append((stage, "stage", entry, entry))
                continue
            for key, changes in entry.items():
                if key == "changed deps":
                    for path, state in (changes or {}).items():
                        if isinstance(state, Mapping):
                            items.extend((stage, "param", f"{path}:{param}", str(value)) for param, value in state.items())
                        else:
                            items.append((stage, "dep", path, str(state)))
                elif key == "changed outs":
                    items.extend((stage, "out", path, str(state)) for path, state in (changes or {}).items())
                else:
                    items.append((stage, "stage", key, str(changes)))
    return items


def status_rows(status: Mapping[str, Any], produced: Collection[str] = ()) -> list[Row]:
    """Drift rows from `dvc status --json` run in the fresh clone before `dvc repro`; `{}` gives none.

    Section "inputs" (stale lock): a changed source dep, param or command, labelled like
    `lock_inputs`. Section "committed": a git-held output whose bytes differ from dvc.lock
    ("modified") or that the commit lacks ("deleted"). Left out: outputs "not in cache" (cached
    outputs, which a fresh clone never has), deps that a stage produces (`produced`, and every
    path dvc status lists as an output: the outputs comparison covers them) and "always changed".
    The committed column says "dvc.lock" and the fresh column holds the state dvc status names."""
    items = _status_items(status)
    produced = set(produced) | {name for _, kind, name, _ in items if kind == "out"}
    rows: list[Row] = []
    for stage, kind, name, state in items:
        if kind == "out":
            if state == NOT_IN_CACHE:
                continue
            text = "missing in the commit (dvc.lock lists it)" if state == "deleted" else "committed file does not match dvc.lock"
            rows.append(Row("committed", name, "dvc.lock", state, text, True))
        elif (kind == "dep" and is_produced(name, produced)) or (kind == "stage" and state == ALWAYS_CHANGED):
            continue
        else:
            label = "cmd" if name == CHANGED_COMMAND else name
            change = "differs" if state in ("modified", CHANGED_COMMAND) else state
            rows.append(Row("inputs", f"{label} ({stage})", "dvc.lock", state, f"{change}: committed dvc.lock is stale", True))
    return sorted(rows, key=lambda row: (row.section, row.name))


def not_in_cache(status: Mapping[str, Any]) -> set[str]:
    """Outputs that `dvc status --json` reports "not in cache": in a fresh clone, the cached ones."""
    return {name for _, kind, name, state in _status_items(status) if kind == "out" and state == NOT_IN_CACHE}


# --------------------------------------------------------------------------- metrics helpers


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{"test": {"loss": 1}}` -> `{"test.loss": 1}` (dvc's own naming)."""
    if not isinstance(tree, Mapping):
        return {prefix: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


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
    status: Mapping[str, Any],
    committed_md5: Mapping[str, str] | None = None,
    tolerance: float = METRIC_ABS_TOLERANCE,
) -> list[Row]:
    """Every comparison row.

    `status` is the parsed `dvc status --json` of the fresh clone before `dvc repro`: it decides
    the inputs and committed sections (`status_rows`), and the locks give the values shown.
    The committed section lists every dvc.lock output except those "not in cache" (cached ones).
    `metrics` is `merge_metrics(...)`. `committed_md5` maps a committed output path to the md5
    of its committed bytes, shown for the outputs that dvc status reports changed."""
    if mode not in ("exact", "tolerant"):
        raise ValueError(f"mode must be exact or tolerant, not {mode!r}")
    rows: list[Row] = []
    old_outs, new_outs = lock_outs(committed_lock), lock_outs(fresh_lock)
    changed = {(row.section, row.name): row for row in status_rows(status, produced=set(old_outs) | set(new_outs))}

    old_in, new_in = lock_inputs(committed_lock), lock_inputs(fresh_lock)
    for name in sorted(set(old_in) | {name for section, name in changed if section == "inputs"}):
        old, new = old_in.get(name, MISSING), new_in.get(name, MISSING)
        row = changed.get(("inputs", name))
        if row is None:
            rows.append(Row("inputs", name, old, new, "same", False))
        else:
            rows.append(replace(row, committed=_show(old), fresh=_show(new)))

    held = (set(old_outs) - not_in_cache(status)) | {name for section, name in changed if section == "committed"}
    for name in sorted(held):
        locked = old_outs.get(name, MISSING)
        row = changed.get(("committed", name))
        if row is None:
            rows.append(Row("committed", name, locked, locked, "same", False))
        else:
            rows.append(replace(row, committed=_show(locked), fresh=(committed_md5 or {}).get(name, row.fresh)))

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
