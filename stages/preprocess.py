"""DVC stage `preprocess`: raw files -> deterministic train/val/test arrays or shards + meta.json."""

import logging

from tapework.cli import PARAMS_FILE, run_stage, stage_paths
from tapework.datasets import stream_raw
from tapework.outputs import exclusive
from tapework.params import load_params
from tapework.preprocess import prepare, prepared_format, write_prepared, write_shards


def main() -> None:
    paths = stage_paths("preprocess", raw="the download stage's folder", prepared="output folder for the arrays or shards and meta.json")
    params = load_params(PARAMS_FILE)
    dataset = params.download.dataset
    with exclusive("preprocess", [paths.prepared]):  # a second writer would clear this one's temp folder
        source = stream_raw(params.download, paths.raw)  # inputs streamed where the format allows (IDX)
        kind = prepared_format(params.preprocess, source)
        if kind == "arrays":
            prepared = prepare(source.materialize(), params.preprocess, dataset)
            write_prepared(prepared, paths.prepared)
            meta = prepared.meta
        else:
            meta = write_shards(source, params.preprocess, dataset, paths.prepared)
    logging.getLogger("tapework").info("prepared %s as %s: %s", dataset, kind, meta["counts"])


if __name__ == "__main__":
    run_stage(main)
