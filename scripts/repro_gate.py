#!/usr/bin/env python
"""Reproducibility gate: clone committed HEAD into a temp dir, `dvc repro --force` it, compare with the commit.

    python scripts/repro_gate.py [--mode auto|exact|tolerant] [--keep] [--repo PATH]

Exit 0: reproduced. 1: drift (the table marks each entry that differs with `!`). 2: could not
compare (clone or dvc repro failed; the failing stage's stderr tail is printed).
Logic and tolerance: tapework/gate.py.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tapework.gate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_repo=ROOT))
