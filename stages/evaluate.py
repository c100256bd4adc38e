"""DVC stage `evaluate`: test-set metrics, per-class (or per-bin) report, plot data and a PNG summary."""

import dataclasses
import logging

from tapework.cli import run_stage, stage_params, stage_paths
from tapework.evaluation import ReportPaths, evaluate_model, write_reports
from tapework.history import read_history
from tapework.io import file_digest, write_json
from tapework.models import WEIGHTS_FILE, load_model
from tapework.outputs import exclusive, output_set
from tapework.preprocess import load_prepared
from tapework.provenance import provenance


def main() -> None:
    paths = stage_paths(
        "evaluate",
        seed=True,  # the seed the model was trained with, for the provenance JSON
        prepared="the preprocess stage's folder",
        models="the train stage's model folder",
        history="the train stage's history TSV (for the summary PNG)",
        metrics="output test metrics JSON",
        provenance="output provenance JSON",
        report="output per-class (or per-bin) TSV",
        confusion="output confusion plot CSV",
        predictions="output predicted-vs-actual plot CSV",
        summary="output summary PNG",
    )
    params = stage_params(paths)
    reports = ReportPaths(paths.metrics, paths.report, paths.confusion, paths.predictions, paths.summary)
    outputs = [*dataclasses.astuple(reports), paths.provenance]
    with exclusive("evaluate", outputs):
        data = load_prepared(paths.prepared)
        model, _ = load_model(paths.models)
        outcome = evaluate_model(model, data, params.evaluate.batch_size, params.train.huber_delta)
        history = read_history(paths.history)  # read before anything is written: a missing history changes nothing
        with output_set("evaluate", outputs) as staged:  # every report, plot and the provenance together, or none
            write_reports(outcome, data.meta, history, ReportPaths(*(staged[path] for path in dataclasses.astuple(reports))))
            model_hash = file_digest(paths.models / WEIGHTS_FILE)
            write_json(staged[paths.provenance], provenance(params, "evaluate", paths.prepared, params.train.seed, model_sha256=model_hash))
    logging.getLogger("tapework").info("test: %s", outcome.results)


if __name__ == "__main__":
    run_stage(main)
