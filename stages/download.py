"""DVC stage `download`: fetch the configured data set's verified raw files into the raw folder."""

import logging

from tapework.cli import PARAMS_FILE, run_stage, stage_paths
from tapework.datasets import fetch_dataset
from tapework.outputs import exclusive
from tapework.params import load_params


def main() -> None:
    paths = stage_paths("download", raw="folder for the verified raw files and manifest.json")
    params = load_params(PARAMS_FILE)  # validates the whole file before any work
    with exclusive("download", [paths.raw]):  # a second writer would clear this one's staging folder
        manifest = fetch_dataset(params.download, paths.raw)
    logging.getLogger("tapework").info("download: %s -> %s (%d verified file(s))", manifest["dataset"], paths.raw, len(manifest["files"]))


if __name__ == "__main__":
    run_stage(main)
