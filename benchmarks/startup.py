"""What a stage process pays around its work: importing TensorFlow, with and without the stage
processes' import hook (tapework/lean_import.py, which skips Keras's optional integrations), and
ending the process once TensorFlow is loaded, through Python's exit or tapework.cli.exit_now.

    python benchmarks/startup.py              # 7 rounds
    python benchmarks/startup.py --quick      # smoke test: one round, `import tensorflow` and the exit only

Each figure is one fresh interpreter (`python -c`), timed from the parent from start to exit, the
two variants alternated within every round so that both see the same machine; the medians and
their ratio are printed. What is imported:

* tensorflow: `import tensorflow`, after the stage processes' log level and stderr filter
  (tapework.quiet), without and with the hook;
* stage <verb>: the stage module, `stages.<verb>`, with everything it imports. The hook is part
  of the stages package, so the "without" variant stands in for that package (the same log
  level and stderr filter) and imports the stage module without running its `__init__`;
* exit: the stages package and TensorFlow imported and one op run, then `sys.exit(0)` (Python's
  teardown) against `exit_now(0)` (run_stage's exit). The difference of the two is the teardown.

No figure is asserted anywhere: the tests run --quick only to see that it runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.machine import machine_description  # noqa: E402
from tools.workspace import run  # noqa: E402

STAGES = ("train", "evaluate", "export")  # the stages that import TensorFlow

PRELUDE = "import sys; sys.path.insert(0, {root!r})\nfrom tapework.quiet import quiet_stage_process\nquiet_stage_process()\n"
WITH_HOOK = "from tapework.lean_import import skip_keras_extras\nskip_keras_extras()\n"
# The stages package without its __init__ (which would install the hook): a bare package object.
BARE_STAGES = "import types\nstages = types.ModuleType('stages'); stages.__path__ = [{folder!r}]; sys.modules['stages'] = stages\n"


def programs(target: str) -> dict[str, str]:
    """The two `python -c` programs (without, with the hook) that import `target`."""
    prelude = PRELUDE.format(root=str(ROOT))
    if target == "tensorflow":
        return {"without": prelude + "import tensorflow\n", "with": prelude + WITH_HOOK + "import tensorflow\n"}
    if target == "exit":
        work = prelude + WITH_HOOK + "import tensorflow as tf\ntf.ones([2]).numpy()\n"
        return {"without": work + "sys.exit(0)\n", "with": work + "from tapework.cli import exit_now\nexit_now(0)\n"}
    stage = f"import stages.{target}\n"
    return {"without": prelude + BARE_STAGES.format(folder=str(ROOT / "stages")) + stage, "with": prelude + WITH_HOOK + stage}


def seconds(program: str) -> float:
    """Wall time of one fresh interpreter running `program` (start to exit)."""
    start = time.perf_counter()
    run([sys.executable, "-c", program], ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="one round, tensorflow and the exit only (a smoke test)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    print(f"machine: {machine_description()}; {rounds} round(s), each figure a fresh interpreter, variants alternated")
    rows = []
    targets = ["tensorflow", "exit"] if args.quick else ["tensorflow", *(f"stage {verb}" for verb in STAGES), "exit"]
    for target in targets:
        variants = programs(target.removeprefix("stage "))
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, program in variants.items():
                times[name].append(seconds(program))
        without, with_ = statistics.median(times["without"]), statistics.median(times["with"])
        if target == "exit":
            rows.append({"exit": "after tensorflow", "python_exit_seconds": without, "exit_now_seconds": with_, "samples": times})
            print(f"EXIT python_exit_s={without:.2f} exit_now_s={with_:.2f} teardown_s={without - with_:.2f}")
        else:
            rows.append({"import": target, "without_hook_seconds": without, "with_hook_seconds": with_, "samples": times})
            print(f"IMPORT what={target.replace(' ', '_')} without_hook_s={without:.2f} with_hook_s={with_:.2f} ratio={with_ / without:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_description(), "rounds": rounds, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
