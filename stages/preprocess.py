"""Stage 2: raw files -> deterministic train/val/test arrays + meta.json (data/prepared)."""

import logging
from pathlib import Path

import _bootstrap  # noqa: F401  (puts the project root on sys.path)

from tapework.cli import run_stage
from tapework.datasets import load_raw
from tapework.params import load_params
from tapework.preprocess import prepare, write_prepared

RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")


def main() -> None:
    params = load_params("params.yaml")
    raw = load_raw(params.download.dataset, RAW_DIR, params.download.csv)
    prepared = prepare(raw, params.preprocess, params.download.dataset)
    write_prepared(prepared, PREPARED_DIR)
    logging.getLogger("tapework").info("prepared %s: %s", params.download.dataset, prepared.meta["counts"])


if __name__ == "__main__":
    run_stage(main)
