"""Run identity: which training run a checkpoint folder, a TensorBoard folder or a per-seed output
belongs to. Everything that must tell runs apart asks here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tapework.io import stable_hash
from tapework.params import TrainParams, to_plain

PACKAGE_DIR = Path(__file__).resolve().parent


def code_digest() -> str:
    """SHA-256 over the package's own source files: an edited module is other code."""
    return stable_hash({path.name: path.read_text() for path in sorted(PACKAGE_DIR.glob("*.py"))})


def run_fingerprint(train: TrainParams, meta: dict[str, Any]) -> str:
    """Same train params, same prepared data (meta.json holds every array's hash) and same code."""
    return stable_hash({"train": to_plain(train), "data": meta, "code": code_digest()})


def run_id(train: TrainParams, meta: dict[str, Any], repeat: bool = False) -> str:
    """A short readable name for the run: DVC's experiment name when DVC gives one, else model + fingerprint.

    `repeat` (a run of repeats.extra_seeds) appends the seed: every seed of one experiment shares
    DVC's experiment name.
    """
    name = os.environ.get("DVC_EXP_NAME") or f"{train.model}-{run_fingerprint(train, meta)[:12]}"
    return f"{name}-seed{train.seed}" if repeat else name


def run_checkpoint_dir(root: str | Path, train: TrainParams, meta: dict[str, Any]) -> Path:
    """`<root>/<model>-<fingerprint>`: one checkpoint folder per run.

    Runs never clear each other's checkpoints (the seeds of repeats.extra_seeds among them), and a
    killed run finds its own folder again: the name depends on params, data and code only, never
    on DVC's experiment name, which differs between a run and its rerun.
    """
    return Path(root) / f"{train.model}-{run_fingerprint(train, meta)[:16]}"
