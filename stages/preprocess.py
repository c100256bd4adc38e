"""DVC stage `preprocess`: raw files -> deterministic train/val/test arrays + meta.json."""

import logging

from tapework.cli import PARAMS_FILE, run_stage, stage_paths
from tapework.datasets import load_raw
from tapework.outputs import exclusive
from tapework.params import load_params
from tapework.preprocess import prepare, write_prepared


def main() -> None:
    paths = stage_paths("preprocess", raw="the download stage's folder", prepared="output folder for the arrays and meta.json")
    params = load_params(PARAMS_FILE)
    with exclusive("preprocess", [paths.prepared]):  # a second writer would clear this one's temp folder
        raw = load_raw(params.download, paths.raw)
        prepared = prepare(raw, params.preprocess, params.download.dataset)
        write_prepared(prepared, paths.prepared)
    logging.getLogger("tapework").info("prepared %s: %s", params.download.dataset, prepared.meta["counts"])


if __name__ == "__main__":
    run_stage(main)
