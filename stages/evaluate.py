"""Stage 4: test-set metrics, per-class (or per-bin) report, plot data and a PNG summary."""

import logging
from pathlib import Path

import _bootstrap  # noqa: F401  (puts the project root on sys.path)

from tapework.cli import run_stage
from tapework.evaluation import evaluate_model, write_reports
from tapework.models import load_model
from tapework.params import load_params
from tapework.io import write_json
from tapework.preprocess import load_prepared
from tapework.provenance import file_sha256, provenance

PREPARED_DIR = Path("data/prepared")
MODEL_DIR = Path("models")


def main() -> None:
    params = load_params("params.yaml")
    data = load_prepared(PREPARED_DIR)
    model, _ = load_model(MODEL_DIR)
    outcome = evaluate_model(model, data, params.evaluate.batch_size, params.train.huber_delta)
    write_reports(outcome, data.meta, history_path=Path("metrics/train_history.tsv"))
    model_hash = file_sha256(MODEL_DIR / "model.weights.npz")
    write_json("metrics/evaluate.provenance.json", provenance(params, "evaluate", PREPARED_DIR / "meta.json", params.train.seed, model_sha256=model_hash))
    logging.getLogger("tapework").info("test: %s", outcome.results)


if __name__ == "__main__":
    run_stage(main)
