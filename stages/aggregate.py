"""DVC stage `aggregate`: statistics over the runs of every seed (train.seed and repeats.extra_seeds).

The train.seed run is the one the train and evaluate stages make (its metrics at today's paths);
each extra seed's run is a `train_seed`/`evaluate_seed` stage of its own, writing under `--runs`
at the paths the `--seed-*` patterns give (`{seed}` stands for the seed).
"""

import logging

from tapework.cli import PARAMS_FILE, run_stage, stage_paths
from tapework.io import write_json
from tapework.params import load_params
from tapework.repeats import RunFiles, aggregate, per_seed_table, read_run, seed_files, write_spread


def main() -> None:
    paths = stage_paths(
        "aggregate",
        train_metrics="the train stage's metrics JSON (the train.seed run)",
        evaluate_metrics="the evaluate stage's metrics JSON (the train.seed run)",
        history="the train stage's history TSV (the train.seed run)",
        runs="the folder holding every extra seed's outputs",
        seed_train_metrics="an extra seed's train metrics JSON, relative to --runs, with {seed} for the seed",
        seed_evaluate_metrics="an extra seed's evaluate metrics JSON, relative to --runs, with {seed} for the seed",
        seed_history="an extra seed's history TSV, relative to --runs, with {seed} for the seed",
        metrics="output aggregate metrics JSON (mean, std, n and 95%% interval per metric)",
        per_seed="output JSON of every run's metrics by seed",
        spread="output per-epoch spread TSV for dvc plots",
    )
    params = load_params(PARAMS_FILE)
    patterns = RunFiles(paths.seed_train_metrics, paths.seed_evaluate_metrics, paths.seed_history)
    runs = [read_run(params.train.seed, RunFiles(paths.train_metrics, paths.evaluate_metrics, paths.history))]
    runs += [read_run(seed, seed_files(paths.runs, patterns, seed)) for seed in params.repeats.extra_seeds]
    write_json(paths.metrics, aggregate(runs))
    write_json(paths.per_seed, per_seed_table(runs))
    write_spread(paths.spread, runs)
    logging.getLogger("tapework").info("aggregate: %d run(s), seeds %s", len(runs), ", ".join(str(seed) for seed in params.seeds()))


if __name__ == "__main__":
    run_stage(main)
