"""Reproducibility gate: rerun the committed pipeline in a fresh clone and compare with the commit.

Command (from the project root): `python -m tools.repro_gate [--mode auto|exact|tolerant] [--keep] [--repo PATH]`.
Exit 0: reproduced. 1: drift. 2: could not compare.

* `compare.py`: the comparison, pure functions on parsed dicts (dvc.lock, `dvc status --json`,
  `dvc metrics diff --json`), and the report table. The unit tests call these directly.
* `run.py`: the clone, the dvc and git commands, `run_gate` and the command line.
"""
