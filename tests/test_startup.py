"""What a stage process does around its work: the import hook (tapework/lean_import.py) skips Keras's
optional integrations while TensorFlow loads (importable afterwards, no number changes), and
run_stage ends the process through exit_now (exit handlers run, streams flushed, no teardown)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from tapework.lean_import import SKIPPED, SkipWhileLoading
from tests.conftest import ROOT, run


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """`watched` tries `extra` as Keras tries scikit-learn, and records whether it got it."""
    (tmp_path / "watched").mkdir()
    (tmp_path / "watched" / "__init__.py").write_text(textwrap.dedent("""
        try:
            import extra.sub
        except ImportError:
            extra = None
        GOT_EXTRA = extra is not None
    """))
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "__init__.py").write_text("")
    (tmp_path / "extra" / "sub.py").write_text("VALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("watched", "extra", "extra.sub"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    hook = SkipWhileLoading(frozenset({"extra"}), frozenset({"watched"}))
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    yield hook
    for name in ("watched", "extra", "extra.sub"):
        sys.modules.pop(name, None)


def test_skipped_only_while_the_watched_package_imports(fake_packages):
    import watched

    assert watched.GOT_EXTRA is False and "extra" not in sys.modules
    assert fake_packages.loading == 0
    assert type(watched.__loader__).__name__ == "SourceFileLoader" and watched.__spec__.loader is watched.__loader__  # the real loader stays

    import extra.sub  # after the watched import: a normal import

    assert extra.sub.VALUE == 7


def test_a_package_imported_before_is_left_alone(fake_packages):
    import extra.sub  # noqa: F401  (already loaded when `watched` asks for it)
    import watched

    assert watched.GOT_EXTRA is True


def test_a_failing_watched_import_does_not_leave_the_skip_on(fake_packages, tmp_path):
    (tmp_path / "watched" / "__init__.py").write_text("raise RuntimeError('broken package')\n")
    with pytest.raises(RuntimeError, match="broken package"):
        import watched  # noqa: F401
    assert fake_packages.loading == 0

    import extra.sub

    assert extra.sub.VALUE == 7


# Runs in a fresh interpreter: the stages package (which installs the hook), TensorFlow, a forward
# and backward pass, then the skipped packages, imported as the download and evaluate stages do.
PROBE = """
import json, sys
{install}
import numpy as np
import tensorflow as tf
import keras
loaded = sorted(name for name in {skipped!r} if name in sys.modules)
keras.utils.set_random_seed(3)
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
with tf.GradientTape() as tape:
    loss = tf.reduce_mean(tf.square(model(x)))
gradients = tape.gradient(loss, model.trainable_variables)
import sklearn.datasets, matplotlib.pyplot, pandas, scipy.special
print(json.dumps({{"loaded_with_tensorflow": loaded, "loss": float(loss).hex(),
                  "gradients": [g.numpy().tobytes().hex() for g in gradients],
                  "digits": int(sklearn.datasets.load_digits().target.sum())}}))
"""


@pytest.mark.slow
def test_stage_processes_load_tensorflow_without_the_extras_and_compute_the_same_bits():
    hooked, plain = (
        json.loads(run([sys.executable, "-c", PROBE.format(install=install, skipped=sorted(SKIPPED))], ROOT).stdout.splitlines()[-1])
        for install in ("import stages", "")
    )
    assert hooked["loaded_with_tensorflow"] == []
    assert plain["loaded_with_tensorflow"], "TensorFlow no longer imports any of them: the hook saves nothing, drop it"
    assert (hooked["loss"], hooked["gradients"], hooked["digits"]) == (plain["loss"], plain["gradients"], plain["digits"])


# A stage-like process that ends through run_stage: an exit handler, unflushed output on both
# streams, then main()'s outcome (returns, a user error, an interrupt).
EXIT_SCRIPT = """
import atexit, sys
import stages
from tapework.cli import run_stage
from tapework.errors import DataError
atexit.register(lambda: open(sys.argv[2], "w").write("exit handler ran"))
def main():
    sys.stdout.write("partial stdout line, no newline")
    if sys.argv[1] == "error":
        raise DataError("the data is wrong")
    if sys.argv[1] == "interrupt":
        raise KeyboardInterrupt
run_stage(main)
print("never printed: run_stage does not return")
"""


@pytest.mark.parametrize(("outcome", "code", "stderr_line"), [("done", 0, None), ("error", 2, "error: the data is wrong"), ("interrupt", 130, "interrupted: no partial output")])
def test_run_stage_exits_with_its_code_after_the_exit_handlers_and_flushes_both_streams(tmp_path, outcome, code, stderr_line):
    marker = tmp_path / "marker"
    result = run([sys.executable, "-c", EXIT_SCRIPT, outcome, str(marker)], ROOT, check=False)
    assert result.returncode == code, result.stderr
    assert result.stdout == "partial stdout line, no newline"
    assert marker.read_text() == "exit handler ran"
    if stderr_line:
        assert stderr_line in result.stderr


def test_the_predict_command_loads_tensorflow_without_the_extras_too():
    probe = "import sys, tapework.predict; print(sorted(name for name in %r if name in sys.modules))" % sorted(SKIPPED - {"pandas"})
    assert run([sys.executable, "-c", probe], ROOT).stdout.strip() == "[]"  # pandas: predict reads CSV files with it


AUTOGRAPH_PROBE = """
import json
import numpy as np
import tensorflow as tf
from tensorflow.python.autograph.impl import api
from tapework.batching import make_dataset
from tapework.loop import Evaluator, TaskSpec, make_train_function
from tapework.metrics import MetricSet
from tests.test_loop import tiny_mlp
import keras

converted = []
original = api._convert_actual
def record(entity, program_ctx):
    converted.append(entity.__qualname__)
    return original(entity, program_ctx)
api._convert_actual = record

rng = np.random.default_rng(0)
x = rng.normal(size=(10, 5)).astype(np.float32)
for task in ("classification", "regression"):
    outputs = 3 if task == "classification" else 1
    model = tiny_mlp(features=5, hidden=4, classes=outputs, dropout=0.5, l2=0.01)
    spec = TaskSpec(task, outputs)
    optimizer = keras.optimizers.Adam()
    y = rng.integers(0, 3, size=10).astype(np.int32) if task == "classification" else rng.normal(size=10).astype(np.float32)
    for jit_compile, stack in ((False, 0), (True, 0), (True, 2)):
        run = make_train_function(model, optimizer, spec, MetricSet(task, 3, 1.0), steps_per_execution=2, jit_compile=jit_compile, stacked=bool(stack), full_batch=4)
        run(iter(make_dataset(x, y, 4, seed=0, stack=stack)))
    evaluator = Evaluator(model, spec, MetricSet(task, 3, 1.0), steps_per_execution=2)
    evaluator(make_dataset(x, y, 4))
    evaluator(make_dataset(x, y, 4), collect_outputs=True)
print(json.dumps(sorted(set(converted))))
"""


def test_autograph_rewrites_only_the_functions_with_tensor_control_flow():
    # Each AutoGraph conversion costs ~30 ms at a process's first trace; the step's leaf functions
    # (loss, gradients, update, metrics, batch gathering) are plain graphs and must stay unconverted.
    # Both tasks, every grouping of steps and both evaluation paths, in one fresh process.
    converted = json.loads(run([sys.executable, "-c", AUTOGRAPH_PROBE], ROOT).stdout.splitlines()[-1])
    assert converted == sorted(["_full_batches_compiled.<locals>.dispatch", "_multi_step.<locals>.run", "_stacked_steps.<locals>.run", "_stacked_steps.<locals>.steps_of_stack", "make_train_function.<locals>.train_step"])
