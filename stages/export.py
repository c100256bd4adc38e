"""DVC stage `export`: the trained model as a SavedModel, a TFLite flat buffer and a model card, for use outside this project."""

import logging

from tapework.cli import PARAMS_FILE, run_stage, stage_paths
from tapework.export import check_model_matches_data, export_model
from tapework.io import file_digest
from tapework.models import WEIGHTS_FILE, load_model
from tapework.params import load_params
from tapework.preprocess import load_prepared
from tapework.provenance import provenance

# What the card's `training` keeps of the train stage's provenance: where the model came from.
TRAINING_KEYS = ("dataset", "seed", "data_sha256", "params_sha256")


def main() -> None:
    paths = stage_paths(
        "export",
        prepared="the preprocess stage's folder (test split for the metrics and the parity check, class and feature names)",
        models="the train stage's model folder",
        export="output folder: SavedModel, TFLite file and model card",
    )
    params = load_params(PARAMS_FILE)
    data = load_prepared(paths.prepared)
    model, config = load_model(paths.models)
    check_model_matches_data(config, data.meta, paths.models)
    # The same hashes as the train stage's provenance file (same function, same params section).
    trained = provenance(params, "train", paths.prepared, params.train.seed)
    training = {key: trained[key] for key in TRAINING_KEYS} | {"model_sha256": file_digest(paths.models / WEIGHTS_FILE)}
    card = export_model(
        model,
        config,
        data,
        paths.export,
        batch_size=params.evaluate.batch_size,
        huber_delta=params.train.huber_delta,
        csv_target=params.download.csv.target,
        training=training,
    )
    logging.getLogger("tapework").info("exported %s %s (%d parameters) to %s", card["dataset"], card["model"]["family"], card["model"]["parameters"], paths.export)


if __name__ == "__main__":
    run_stage(main)
