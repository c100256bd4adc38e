"""A stage's output set, replaced whole: every output new or every output old, also across a crash.

DVC clears a stage's outputs before running it unless they are `persist: true`; the train and
evaluate stages declare theirs persistent and replace them here instead, so a failed run (a
divergence, a crash, a kill, a full disk) leaves the last good set in place:

1. every output is written to a staged path beside its target (`.<name>.staged`);
2. all staged outputs are checked to exist, then a journal listing (staged, target) pairs is
   written atomically beside the first target;
3. each staged output is renamed over its target, then the journal is deleted.

A kill before step 2 leaves only staged leftovers, which the next run deletes: the old set
stands. A kill during step 3 leaves the journal, and the next run rolls it forward: the new set
stands. Renames cannot swap several folders in one step; the journal is what makes them one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tapework.errors import TapeworkError
from tapework.io import atomic_write_text, clear_stale, temp_pattern

log = logging.getLogger(__name__)

STAGED_SUFFIX = ".staged"
RETIRED_SUFFIX = ".retired"


def staged_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{STAGED_SUFFIX}")


def _retired_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{RETIRED_SUFFIX}")


def journal_path(stage: str, targets: Sequence[Path]) -> Path:
    return Path(targets[0]).parent / f".{stage}.outputs.journal"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace(staged: Path, target: Path) -> None:
    """Rename `staged` over `target`; a folder target is first moved aside (rename cannot replace a folder)."""
    if target.is_dir() and not target.is_symlink():
        retired = _retired_path(target)
        _remove(retired)
        os.replace(target, retired)
        os.replace(staged, target)
        shutil.rmtree(retired)
    else:
        os.replace(staged, target)


def recover(stage: str, targets: Sequence[Path]) -> str | None:
    """Finish or undo what an interrupted run of `stage` left: returns "rolled forward", "cleared" or None.

    Call it before writing, while holding the stage's lock (`exclusive`: no other writer is alive then).
    """
    targets = [Path(target) for target in targets]
    journal = journal_path(stage, targets)
    outcome = None
    if journal.is_file():
        for staged, target in json.loads(journal.read_text()):
            staged, target = Path(staged), Path(target)
            if staged.exists():
                _replace(staged, target)
            retired = _retired_path(target)
            if retired.exists() and target.exists():
                _remove(retired)
            elif retired.exists():  # killed between moving the old folder aside and renaming the new one in
                os.replace(retired, target)
        journal.unlink()
        outcome = "rolled forward"
        log.warning("%s: finished replacing the outputs an interrupted run had committed (%s)", stage, journal)
    for target in targets:
        staged = staged_path(target)
        for leftover in (staged, _retired_path(target)):
            if leftover.exists() or leftover.is_symlink():
                _remove(leftover)
                outcome = outcome or "cleared"
        # The temp files of atomic writes that a kill left beside a target or its staged copy.
        for name in (target.name, staged.name):
            if clear_stale(target.parent, temp_pattern(name, ".partial")):
                outcome = outcome or "cleared"
    if outcome == "cleared":
        log.info("%s: removed the partial outputs of an interrupted run; the last complete outputs stand", stage)
    return outcome


@contextmanager
def output_set(stage: str, targets: Sequence[Path]) -> Iterator[dict[Path, Path]]:
    """Yield `{target: staged path}`; write every output to its staged path. On a clean exit the
    set replaces the targets together; on an error the staged files are deleted and the old set stands."""
    targets = [Path(target) for target in targets]
    recover(stage, targets)
    staged = {target: staged_path(target) for target in targets}
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield staged
        missing = [str(target) for target, path in staged.items() if not path.exists()]
        if missing:
            raise RuntimeError(f"{stage}: outputs {', '.join(missing)} were not written")  # a bug in the stage
        journal = journal_path(stage, targets)
        atomic_write_text(journal, json.dumps([[str(path), str(target)] for target, path in staged.items()]))
        for target, path in staged.items():
            _replace(path, target)
        journal.unlink()
    except BaseException:
        if not journal_path(stage, targets).exists():
            for path in staged.values():
                if path.exists() or path.is_symlink():
                    _remove(path)
        raise


@contextmanager
def exclusive(stage: str, targets: Sequence[Path]) -> Iterator[None]:
    """Hold an OS lock (flock) on `stage`'s outputs for the whole run; a second writer is refused.

    The kernel releases the lock when its holder exits or is killed, so a crashed run never
    leaves a stale lock behind.
    """
    lock = journal_path(stage, targets).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "?"
        os.close(descriptor)
        raise TapeworkError(
            f"another {stage} run (PID {holder}) is writing {', '.join(str(target) for target in targets[:3])} in this "
            "workspace; wait for it to finish or stop it, then rerun"
        ) from None
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock
