"""Retention of the per-run checkpoint folders, and `python -m tapework.checkpoints {list,prune}`.

Each training run keeps its checkpoints in `<root>/<model>-<fingerprint>` (`runs.run_checkpoint_dir`),
so folders accumulate, one per configuration ever trained. The rule (params.yaml `checkpoints:`),
applied by the train stage's chief at the start of every run and by `prune`: among the run folders
other than the current run's, remove one that was last written (its newest file's mtime) more than
`keep_days` ago, or that is not among the `keep_runs` most recently written; 0 turns either limit off.

A run holds an exclusive flock on `<root>/<name>.lock` (beside its folder, which
`CheckpointStore.clear` may delete whole) for the whole of its training. A folder whose lock a live
process holds is never removed; the kernel drops the lock when its holder dies, SIGKILL included.
A pruner locks the lock file before it removes the folder, so a run starting meanwhile waits for it
and then starts afresh. No TensorFlow here: listing and pruning take milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from tapework import io
from tapework.cli import PARAMS_FILE, run_stage
from tapework.errors import TapeworkError
from tapework.params import CheckpointsParams, load_params

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
# The text file tf.train.CheckpointManager keeps in each folder; it names the latest checkpoint,
# and CheckpointStore numbers each checkpoint by its epoch.
STATE_FILE = "checkpoint"
LATEST = re.compile(r'^model_checkpoint_path:\s*"[^"]*?(\d+)"\s*$', re.MULTILINE)
SECONDS_PER_DAY = 86_400.0
# Where the checkpoints root is written: the train stage's option in dvc.yaml.
TRAIN_STAGE, ROOT_OPTION = "train", "--checkpoints"


class CheckpointsError(TapeworkError):
    """A checkpoints root or setting the clean-up command cannot use; the message says what to do."""


@dataclass(frozen=True)
class RunFolder:
    path: Path
    newest: float  # mtime of its newest file (of the folder itself when it holds none)
    size: int  # bytes in its files

    def age_days(self, now: float) -> float:
        return max(now - self.newest, 0.0) / SECONDS_PER_DAY

    def epoch(self) -> int | None:
        """The epoch of the latest checkpoint, from the CheckpointManager's text file (None: no checkpoint)."""
        try:
            match = LATEST.search((self.path / STATE_FILE).read_text(encoding="utf-8", errors="replace"))
        except OSError:
            return None
        return int(match.group(1)) if match else None


def lock_path(folder: Path) -> Path:
    """`<root>/<name>.lock`: beside the run folder, so removing the folder never removes its lock."""
    return folder.parent / f"{folder.name}{LOCK_SUFFIX}"


def _scan(folder: Path) -> RunFolder:
    newest, size = None, 0
    for parent, _, names in os.walk(folder):
        for name in names:
            try:
                stat = os.lstat(os.path.join(parent, name))
            except FileNotFoundError:  # a run replaced it meanwhile
                continue
            size += stat.st_size
            newest = stat.st_mtime if newest is None else max(newest, stat.st_mtime)
    if newest is None:
        newest = os.lstat(folder).st_mtime
    return RunFolder(folder, newest, size)


def run_folders(root: Path) -> list[RunFolder]:
    """The run folders under `root`, most recently written first (ties by name, so the order is fixed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    folders = []
    for entry in os.scandir(root):
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        with contextlib.suppress(FileNotFoundError):  # removed by another pruner meanwhile
            folders.append(_scan(Path(entry.path)))
    return sorted(folders, key=lambda folder: (-folder.newest, folder.path.name))


def holder(folder: Path) -> int | None:
    """The pid of the live process holding `folder`'s lock, 0 if unknown; None when no process holds it."""
    lock = lock_path(folder)
    try:
        fd = os.open(lock, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        if io.try_lock(fd, wait=False):
            return None
        text = os.read(fd, 32).decode("ascii", errors="replace").strip()
        return int(text) if text.isdigit() else 0
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold(folder: Path) -> Iterator[None]:
    """This run's lock on `folder` for the whole block: no pruner removes the folder meanwhile.

    A second live run of the same configuration waits here until the first one ends (it then
    resumes from the first one's checkpoints); a pruner holds the lock only while it removes.
    """
    folder = Path(folder)
    lock = lock_path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not io.try_lock(fd, wait=False) and io.fcntl is not None:
                pid = holder(folder)
                log.info("checkpoint folder %s is in use by another run%s; waiting for it to end", folder, f" (pid {pid})" if pid else "")
                io.try_lock(fd, wait=True)
            # A pruner may have removed the lock file (and the folder) before we locked it: take a new one.
            if io.still_at(lock, fd):
                break
        except BaseException:  # Ctrl-C or SIGTERM while waiting
            os.close(fd)
            raise
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))  # for `list`: who holds it
        yield
    finally:
        os.close(fd)


def _remove_unless_held(folder: Path) -> bool:
    """Remove `folder` and its lock file while holding that lock; False (nothing removed) if a live run holds it."""
    lock = lock_path(folder)
    try:
        # Created when missing, so a run starting now locks the same file and waits for the removal.
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError:
        return False
    try:
        if not io.try_lock(fd, wait=False) or not io.still_at(lock, fd):
            return False
        shutil.rmtree(folder)
        lock.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def _clear_stray_locks(root: Path, current: Path | None) -> None:
    """Lock files whose folder is gone and that no live run holds (a run that ended before its first save)."""
    for lock in sorted(root.glob(f"*{LOCK_SUFFIX}")):
        folder = root / lock.name[: -len(LOCK_SUFFIX)]
        if folder == current or folder.exists():
            continue
        try:
            fd = os.open(lock, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if io.try_lock(fd, wait=False) and io.still_at(lock, fd) and not folder.exists():
                lock.unlink(missing_ok=True)
                log.debug("removed stray lock file %s", lock)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Removal:
    folder: RunFolder
    reason: str


def doomed(folders: Sequence[RunFolder], keep_runs: int, keep_days: float, now: float) -> list[Removal]:
    """The rule: which of `folders` (most recently written first, the current run's left out) go, and why."""
    removals = []
    for rank, folder in enumerate(folders):
        if keep_days and folder.age_days(now) > keep_days:
            reason = f"older than keep_days = {keep_days:g}"
        elif keep_runs and rank >= keep_runs:
            reason = f"not among the keep_runs = {keep_runs} most recently written"
        else:
            continue
        removals.append(Removal(folder, reason))
    return removals


def prune(
    root: Path,
    keep_runs: int,
    keep_days: float,
    *,
    current: Path | None = None,
    everything: bool = False,
    dry_run: bool = False,
    now: float | None = None,
) -> list[Removal]:
    """Apply the rule under `root` (every unlocked folder with `everything`); returns what was (or would be) removed.

    `current`, the running run's folder, is never removed and does not count towards `keep_runs`.
    Each removal logs one INFO line; a folder a live run holds is kept whatever the rule says.
    """
    root = Path(root)
    now = time.time() if now is None else now
    current = Path(current) if current is not None else None
    others = [folder for folder in run_folders(root) if current is None or folder.path.name != current.name]
    candidates = [Removal(folder, "--all") for folder in others] if everything else doomed(others, keep_runs, keep_days, now)
    removed = []
    for removal in candidates:
        folder = removal.folder
        where = f"checkpoint folder {folder.path} (last written {folder.age_days(now):.1f} days ago, {io.format_bytes(folder.size, binary=True)})"
        if dry_run:
            if holder(folder.path) is None:
                log.info("would remove %s: %s", where, removal.reason)
                removed.append(removal)
            continue
        try:
            gone = _remove_unless_held(folder.path)
        except OSError as error:
            log.warning("could not remove %s (%s); remove it by hand", where, error.strerror or error)
            continue
        if gone:
            log.info("removed %s: %s", where, removal.reason)
            removed.append(removal)
        else:
            log.debug("kept %s: a live run holds it", where)
    if not dry_run and root.is_dir():
        _clear_stray_locks(root, current)
    return removed


@contextlib.contextmanager
def claim_run_folder(folder: Path, retention: CheckpointsParams) -> Iterator[None]:
    """The train stage's chief: hold this run's folder for the block, and first prune the others by the rule."""
    with hold(folder):
        prune(Path(folder).parent, retention.keep_runs, retention.keep_days, current=Path(folder))
        yield


# --- the command ----------------------------------------------------------------------------------


def _age(days: float) -> str:
    hours = days * 24
    if hours < 2:
        return f"{hours * 60:.0f} min"
    return f"{hours:.1f} h" if days < 2 else f"{days:.1f} days"


def default_root(repo: Path) -> Path:
    """The train stage's `--checkpoints` folder, read from `repo`'s dvc.yaml (the one place paths are written)."""
    try:
        stages = (yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages", {})
        words = shlex.split(stages[TRAIN_STAGE]["cmd"])
        return repo / words[words.index(ROOT_OPTION) + 1]
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError, ValueError, IndexError):
        raise CheckpointsError(f"{repo / 'dvc.yaml'} names no `{ROOT_OPTION}` folder for the {TRAIN_STAGE} stage; pass --root PATH") from None


def list_folders(root: Path, now: float | None = None) -> str:
    now = time.time() if now is None else now
    folders = run_folders(root)
    if not folders:
        return f"{root}: no run folders"
    rows = [("run folder", "size", "epoch", "last written", "state")]
    for folder in folders:
        pid = holder(folder.path)
        state = "free" if pid is None else f"in use (pid {pid})" if pid else "in use"
        epoch = folder.epoch()
        rows.append((folder.path.name, io.format_bytes(folder.size, binary=True), "-" if epoch is None else str(epoch), f"{_age(folder.age_days(now))} ago", state))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(width) if column in (1, 2) else cell.ljust(width) for column, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in rows]
    total = sum(folder.size for folder in folders)
    return "\n".join([*lines, f"{len(folders)} run folder(s), {io.format_bytes(total, binary=True)} in {root}"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tapework.checkpoints",
        description="List or prune the per-run checkpoint folders. A folder a live run holds is never removed.",
    )
    parser.add_argument("--repo", type=Path, default=Path("."), help="the project (default: the current folder): its dvc.yaml and params.yaml")
    parser.add_argument("--root", type=Path, help="the checkpoints folder (default: the train stage's --checkpoints in dvc.yaml)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="each run folder: size, latest checkpoint's epoch, when last written, whether a run holds it")
    pruning = commands.add_parser("prune", help="remove run folders by the retention rule (defaults: params.yaml checkpoints:)")
    pruning.add_argument("--keep-runs", type=int, metavar="N", help="keep the N most recently written folders; 0 = no count limit (default: checkpoints.keep_runs)")
    pruning.add_argument("--keep-days", type=float, metavar="D", help="remove folders last written more than D days ago; 0 = no age limit (default: checkpoints.keep_days)")
    pruning.add_argument("--all", dest="everything", action="store_true", help="remove every folder no live run holds")
    pruning.add_argument("--dry-run", action="store_true", help="only log what would be removed")
    args = parser.parse_args(argv)
    root = args.root if args.root is not None else default_root(args.repo)
    if args.command == "list":
        print(list_folders(root))
        return
    keep_runs, keep_days = args.keep_runs, args.keep_days
    if keep_runs is None or keep_days is None:
        retention = load_params(args.repo / PARAMS_FILE).checkpoints
        keep_runs = retention.keep_runs if keep_runs is None else keep_runs
        keep_days = retention.keep_days if keep_days is None else keep_days
    if keep_runs < 0 or not 0 <= keep_days < float("inf"):
        raise CheckpointsError(f"--keep-runs {keep_runs} --keep-days {keep_days:g}: both must be 0 (no limit) or more")
    removed = prune(root, keep_runs, keep_days, everything=args.everything, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(removed)} run folder(s), {io.format_bytes(sum(removal.folder.size for removal in removed), binary=True)}; {len(run_folders(root)) - (len(removed) if args.dry_run else 0)} kept in {root}")


if __name__ == "__main__":
    run_stage(main)
