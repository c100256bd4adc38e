"""Stage 3: hand-written GradientTape training -> models/ + metrics/train.json + history."""

import logging
import signal
from pathlib import Path

import _bootstrap  # noqa: F401  (puts the project root on sys.path)

from tapework.cli import run_stage
from tapework.io import atomic_write_text, write_json
from tapework.models import save_model
from tapework.params import load_params
from tapework.preprocess import load_prepared
from tapework.provenance import provenance
from tapework.training import history_table, is_chief, train

PREPARED_DIR = Path("data/prepared")
MODEL_DIR = Path("models")
CHECKPOINT_DIR = Path("checkpoints")
LOG_DIR = Path("logs")


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM (dvc, CI, schedulers) behaves like Ctrl-C: stop cleanly, keep the last checkpoint.
    raise KeyboardInterrupt


def main() -> None:
    params = load_params("params.yaml")
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell starts background jobs with it ignored
        signal.signal(signum, _interrupt)
    data = load_prepared(PREPARED_DIR)
    result = train(
        params.train,
        data,
        checkpoint_dir=CHECKPOINT_DIR,
        log_dir=LOG_DIR if params.train.tensorboard else None,
    )
    if not is_chief():
        return  # multi-worker: only the chief writes outputs
    save_model(result.model, result.config, MODEL_DIR)
    write_json("metrics/train.json", result.summary())
    write_json("metrics/train.provenance.json", provenance(params, "train", PREPARED_DIR / "meta.json", params.train.seed))
    atomic_write_text("metrics/train_history.tsv", history_table(result.history))
    logging.getLogger("tapework").info("trained %d epochs; kept epoch %d", len(result.history), result.best_epoch)


if __name__ == "__main__":
    run_stage(main)
