"""Shared entry-point plumbing for the stage scripts: their path arguments, logging and clean failure."""

from __future__ import annotations

import argparse
import atexit
import errno
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from tapework.errors import EnvironmentSettingError, TapeworkError
from tapework.params import Params, ParamsError, load_params

log = logging.getLogger("tapework")

# Exit codes: 2 = bad params or input the user must fix, 3 = training diverged, 130 = interrupted.
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# Storage faults the user fixes outside the project: one line, not a traceback.
STORAGE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
}
STORAGE_FIX = "free space or fix the permissions, then rerun; the previous outputs are unchanged"
# DVC's params file; each stage validates all of it before any work.
PARAMS_FILE = Path("params.yaml")


def stage_paths(stage: str, *, seed: bool = False, **paths: str) -> argparse.Namespace:
    """The stage's input and output paths, from its command line (`--name PATH` each, all required).

    dvc.yaml is the one place these paths are written: each stage's `cmd` passes them, and its
    `deps` and `outs` list the same paths (tests/test_dvc_yaml.py checks that they agree).
    With `seed`, the stage also takes `--seed N`: the per-seed stages of `repeats.extra_seeds`
    run the same script with their own seed and paths (read the params with `stage_params`).
    """
    parser = argparse.ArgumentParser(prog=f"stages/{stage}.py", description=f"DVC stage `{stage}` (run it with `dvc repro {stage}`).")
    for name, help_text in paths.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=True, metavar="PATH", help=help_text)
    if seed:
        parser.add_argument("--seed", type=int, default=None, metavar="N", help="run with train.seed = N (a seed of repeats.extra_seeds); default: train.seed")
    return parser.parse_args()


def stage_params(arguments: argparse.Namespace) -> Params:
    """params.yaml, validated whole, with train.seed replaced by the stage's `--seed` when it has one."""
    params = load_params(PARAMS_FILE)
    seed = getattr(arguments, "seed", None)
    return params if seed is None else params.with_seed(seed)


def configure_logging() -> None:
    setting = os.environ.get("TAPEWORK_LOG_LEVEL", "")
    level = setting.strip().upper() or "INFO"
    if level not in logging.getLevelNamesMapping():
        raise EnvironmentSettingError(f"TAPEWORK_LOG_LEVEL={setting!r} is invalid: set it to DEBUG, INFO, WARNING or ERROR, or unset it (INFO).")
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)  # TF's checkpoint code logs at INFO every save
    # TensorFlow's Python logger: its INFO is per-call chatter (tf.distribute's "Reduce to ..."), and the
    # handler it adds when TensorFlow logs before this configuration would print every record twice.
    tensorflow_logger = logging.getLogger("tensorflow")
    tensorflow_logger.setLevel(logging.WARNING)
    tensorflow_logger.handlers.clear()


def exit_now(code: int) -> NoReturn:
    """End the process with `code` without the interpreter's teardown.

    Once TensorFlow is loaded, Python's teardown (finalising thousands of modules and objects,
    TensorFlow's thread pools and static destructors) takes 0.6 to 1 s and does nothing a stage
    needs: by now every output is written and closed. The exit handlers still run first, in their
    usual order (TensorFlow's, logging's flush, then the stderr filter's drain: tapework.quiet), and
    the standard streams are flushed, as `multiprocessing` ends its child processes.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass  # no stream, or it is closed: nothing left to write
    os._exit(code)


def run_stage(main: Callable[[], None], *, whole_process: bool = True) -> None:
    """Run a stage's main(); turn user-fixable errors into one line on stderr and a non-zero exit.

    With `whole_process` (the process is the stage or command), every outcome it handles ends
    through `exit_now`; otherwise (called from Python, as a library) through `sys.exit`, which
    the caller can catch. A bug's traceback always takes Python's usual exit.
    """
    end = exit_now if whole_process else sys.exit
    try:
        configure_logging()
        main()
    except (ParamsError, TapeworkError) as error:
        print(f"error: {error}", file=sys.stderr)
        end(getattr(error, "exit_code", EXIT_USER_ERROR))
    except KeyboardInterrupt:
        print("interrupted: no partial output was written; rerun the stage to continue", file=sys.stderr)
        end(EXIT_INTERRUPTED)
    except OSError as error:
        if error.errno not in STORAGE_ERRORS:
            raise  # anything else is a bug or an unexpected fault: keep its traceback
        where = error.filename or "an output"
        print(f"error: {STORAGE_ERRORS[error.errno]} while writing {where}; {STORAGE_FIX}", file=sys.stderr)
        end(EXIT_USER_ERROR)
    end(0)
