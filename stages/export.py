"""DVC stage `export`: the trained model as a SavedModel, a TFLite flat buffer and a model card, for use outside this project."""

import logging

from tapework.cli import PARAMS_FILE, run_stage, stage_paths
from tapework.export import check_model_matches_data, export_model, read_stage_json
from tapework.io import file_digest
from tapework.models import WEIGHTS_FILE, load_model
from tapework.params import load_params
from tapework.preprocess import META_FILE, load_prepared


def main() -> None:
    paths = stage_paths(
        "export",
        prepared="the preprocess stage's folder (test split for the parity check, class and feature names)",
        models="the train stage's model folder",
        train_provenance="the train stage's provenance JSON (the data and params the model came from)",
        test_metrics="the evaluate stage's metrics JSON (test metrics for the card)",
        export="output folder: SavedModel, TFLite file and model card",
    )
    params = load_params(PARAMS_FILE)
    data = load_prepared(paths.prepared)
    train_provenance = read_stage_json(paths.train_provenance, "train", ("dataset", "seed", "data_sha256", "params_sha256"))
    test_metrics = read_stage_json(paths.test_metrics, "evaluate", ("test",))
    model, config = load_model(paths.models)
    check_model_matches_data(config, data.meta, train_provenance, file_digest(paths.prepared / META_FILE), paths.models)
    card = export_model(
        model,
        config,
        data,
        paths.export,
        batch_size=params.evaluate.batch_size,
        huber_delta=params.train.huber_delta,
        csv_target=params.download.csv.target,
        test_metrics=test_metrics["test"],
        train_provenance=train_provenance,
        model_sha256=file_digest(paths.models / WEIGHTS_FILE),
    )
    logging.getLogger("tapework").info("exported %s %s (%d parameters) to %s", card["dataset"], card["model"]["family"], card["model"]["parameters"], paths.export)


if __name__ == "__main__":
    run_stage(main)
