"""DVC stage `train`: hand-written GradientTape training -> model, train metrics, history, provenance."""

import contextlib
import logging
import signal

from tapework.checkpoints import claim_run_folder
from tapework.cli import run_stage, stage_params, stage_paths
from tapework.history import write_history
from tapework.io import write_json
from tapework.models import layer_summary, parameter_count, save_model
from tapework.outputs import exclusive, output_set
from tapework.preprocess import load_prepared
from tapework.provenance import provenance
from tapework.runs import run_checkpoint_dir, run_id
from tapework.tensorboard import run_log_dir
from tapework.training import is_chief, train


log = logging.getLogger("tapework")


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM (dvc, CI, schedulers) behaves like Ctrl-C: stop cleanly, keep the last checkpoint.
    raise KeyboardInterrupt


def main() -> None:
    paths = stage_paths(
        "train",
        seed=True,
        prepared="the preprocess stage's folder",
        models="output folder for model.json and model.weights.npz",
        metrics="output metrics JSON (final train and kept-epoch val metrics)",
        history="output per-epoch history TSV",
        provenance="output provenance JSON",
        checkpoints="folder for resumable checkpoints, one subfolder per run (not a DVC output)",
        logs="folder for TensorBoard event files, one subfolder per run (not a DVC output)",
    )
    params = stage_params(paths)
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell starts background jobs with it ignored
        signal.signal(signum, _interrupt)
    outputs = [paths.models, paths.metrics, paths.history, paths.provenance]
    chief = is_chief(params.train.distribute)  # multi-worker: only the chief writes outputs, so only it takes their lock
    with exclusive("train", outputs) if chief else contextlib.nullcontext():
        data = load_prepared(paths.prepared)
        log_dir = run_log_dir(paths.logs, run_id(params.train, data.meta, repeat=paths.seed is not None)) if params.train.tensorboard else None
        checkpoint_dir = run_checkpoint_dir(paths.checkpoints, params.train, data.meta)
        # The chief holds its run's folder while it trains, and first removes other runs' folders by params.yaml `checkpoints:`.
        with claim_run_folder(checkpoint_dir, params.checkpoints) if chief else contextlib.nullcontext():
            result = train(params.train, data, checkpoint_dir=checkpoint_dir, log_dir=log_dir)
        if not chief:
            return
        for line in layer_summary(result.model):
            log.info(line)
        with output_set("train", outputs) as staged:  # all four replaced together, or none
            save_model(result.model, result.config, staged[paths.models])
            write_json(staged[paths.metrics], {**result.summary(), "parameters": parameter_count(result.model)})
            write_json(staged[paths.provenance], provenance(params, "train", paths.prepared, params.train.seed))
            write_history(staged[paths.history], result.history)
    log.info("trained %d epochs; kept epoch %d", len(result.history), result.best_epoch)


if __name__ == "__main__":
    run_stage(main)
