"""The per-epoch history file (metrics/train_history.tsv): its writer and its reader, one format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tapework.errors import DataError
from tapework.io import atomic_write_text


def history_table(history: list[dict[str, Any]]) -> str:
    """Per-epoch history as TSV: one row per epoch, floats as repr (round-trip exact).

    No wall-clock columns, so identical runs give identical bytes.
    """
    columns = list(history[0])
    lines = ["\t".join(columns)]
    for row in history:
        lines.append("\t".join(repr(row[column]) if isinstance(row[column], float) else str(row[column]) for column in columns))
    return "\n".join(lines) + "\n"


def write_history(path: str | Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(path, history_table(history))


def read_history(path: str | Path) -> Any:
    """The history file as a pandas DataFrame (one row per epoch)."""
    import pandas as pd  # imported here: the train stage writes the file without needing pandas

    if not Path(path).is_file():
        raise DataError(f"{path} is missing: run the train stage first (dvc repro train)")
    return pd.read_csv(path, sep="\t")
