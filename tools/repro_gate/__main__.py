"""`python -m tools.repro_gate [--mode auto|exact|tolerant] [--keep] [--repo PATH]`, from the project root.

Clones committed HEAD into a temp folder, runs `dvc status --json` and `dvc repro --force` there
and compares with the commit. Exit 0: reproduced. 1: drift (the table marks each entry that
differs with `!`). 2: could not compare (clone or dvc failed; a failing stage's stderr tail is
printed). Comparison and tolerance: tools/repro_gate/compare.py.
"""

import sys

from tools.repro_gate.run import main

if __name__ == "__main__":
    sys.exit(main())
