"""DVC stage `check_params`: validate the whole params.yaml before any other stage runs.

DVC deletes a stage's outputs just before it runs that stage, so a typo caught inside `train`
would already have cost the last good model. Every stage depends on this one, which imports no
TensorFlow and takes well under a second: an invalid value stops `dvc repro` / `dvc exp run`
here, with every earlier result still in place. Its output holds no values (the same bytes for
every valid params.yaml), so a valid change reruns only the stages that read the changed keys.
"""

from tapework.cli import PARAMS_FILE, run_stage, stage_paths
from tapework.io import atomic_write_text
from tapework.params import load_params


def main() -> None:
    paths = stage_paths("check_params", stamp="output written once params.yaml is valid (every other stage depends on it)")
    load_params(PARAMS_FILE)
    atomic_write_text(paths.stamp, f"{PARAMS_FILE} is valid\n")


if __name__ == "__main__":
    run_stage(main)
