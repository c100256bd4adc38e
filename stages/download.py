"""DVC stage `download`: fetch the configured data set's verified raw files into data/raw."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python stages/download.py` from the repo root

from tapework.cli import run_stage  # noqa: E402
from tapework.datasets import fetch_dataset  # noqa: E402
from tapework.params import load_params  # noqa: E402

log = logging.getLogger("tapework.stages.download")
RAW_DIR = Path("data/raw")


def main() -> None:
    params = load_params("params.yaml")  # validates the whole file before any work
    manifest = fetch_dataset(params.download, RAW_DIR)
    log.info("download: %s -> %s (%d verified file(s))", manifest["dataset"], RAW_DIR, len(manifest["files"]))


if __name__ == "__main__":
    run_stage(main)
