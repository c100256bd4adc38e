"""Bad input and faults: the pipeline says exactly what is wrong, exits non-zero, and loses nothing.

Catalogue of bad inputs tried across the suite (see each file for the cases):
- params.yaml: every key with at least one bad value, cross-key contradictions, unknown keys,
  YAML syntax, missing file (tests/test_params.py; stage-level in tests/test_pipeline.py)
- downloads: corrupt byte, truncated body, 404, 500s, stalled then dropped connection, refused
  connection, unpinned URL, missing local file, path-traversal / absolute / symlink archives
  (tests/test_download.py, tests/test_datasets.py)
- parsers: wrong IDX magic, truncated IDX, trailing bytes, corrupt gzip, count mismatch, partial
  CIFAR records, bad CIFAR labels, CSV without target / with text features / with NaN / empty
  (tests/test_parsers.py)
- this file: unsafe or corrupt model files, tampered raw and prepared data, a diverging run,
  kills and failures in the middle of writing outputs
- interruptions of train (SIGKILL, SIGTERM) and resume (tests/test_pipeline.py)
"""

import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest

import tapework.preprocess as preprocess_module
from tapework.errors import DataError
from tapework.io import save_npz
from tapework.models import build_model, load_model, save_model
from tapework.preprocess import load_prepared, prepare, write_prepared
from tests.conftest import make_params, run, shared_data, stage_command, tool_env, update_params
from tests.test_loop import tiny_mlp
from tests.test_preprocess import fake_images


def saved_model(directory):
    model = tiny_mlp()
    config = {"model": "mlp", "settings": {"hidden_units": [5], "dropout": 0.0}, "input_shape": [6], "outputs": 3, "l2": 0.0, "seed": 0, "offset": [0.0] * 6, "scale": [1.0] * 6}
    save_model(model, config, directory)
    return model, config


def test_weights_file_carrying_pickled_objects_is_refused_not_executed(tmp_path):
    saved_model(tmp_path)
    marker = tmp_path / "executed"
    # np.savez pickles object arrays; loading one with pickle allowed would run code.
    np.savez(tmp_path / "model.weights.npz", payload=np.array([_Exploit(marker)], dtype=object))
    with pytest.raises(DataError, match="not a valid array archive"):
        load_model(tmp_path)
    assert not marker.exists()


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_truncated_weights_file_is_a_clear_error(tmp_path):
    saved_model(tmp_path)
    weights = tmp_path / "model.weights.npz"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    with pytest.raises(DataError, match="not a valid array archive"):
        load_model(tmp_path)


def test_weights_from_another_architecture_are_refused(tmp_path):
    saved_model(tmp_path)
    other = tiny_mlp(hidden=7)
    save_npz(tmp_path / "model.weights.npz", {f"{i:04d}|w": v.numpy() for i, v in enumerate(other.variables)})
    with pytest.raises(DataError, match="retrain"):
        load_model(tmp_path)


def test_model_config_naming_an_unknown_family_is_refused(tmp_path):
    _, config = saved_model(tmp_path)
    (tmp_path / "model.json").write_text(__import__("json").dumps({**config, "model": "os.system"}))
    with pytest.raises(DataError, match="unknown model 'os.system'"):
        load_model(tmp_path)
    with pytest.raises(DataError, match="run the train stage first"):
        load_model(tmp_path / "nothing-here")


def test_failed_write_keeps_the_previous_prepared_folder_intact(tmp_path, monkeypatch):
    target = tmp_path / "prepared"
    write_prepared(prepare(fake_images(seed=1), make_params().preprocess, "fake"), target)
    before = {path.name: path.read_bytes() for path in target.iterdir()}
    calls = []

    def failing_save(path, array):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return original(path, array)

    original = preprocess_module.save_array
    monkeypatch.setattr(preprocess_module, "save_array", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_prepared(prepare(fake_images(seed=2), make_params().preprocess, "fake"), target)
    assert {path.name: path.read_bytes() for path in target.iterdir()} == before
    assert [path.name for path in tmp_path.iterdir()] == ["prepared"]  # no partial folder left
    load_prepared(target)


def test_folder_left_by_a_killed_run_is_cleared_on_the_next_write(tmp_path):
    stale = tmp_path / ".prepared.abc123.partial"
    stale.mkdir()
    (stale / "x_train.npy").write_bytes(b"half")
    write_prepared(prepare(fake_images(), make_params().preprocess, "fake"), tmp_path / "prepared")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prepared"]


@pytest.mark.slow
def test_sigkill_during_preprocess_never_leaves_a_trusted_partial_output(repo_copy):
    update_params(repo_copy / "params.yaml", {"download.dataset": "fashion_mnist", "download.mirror": str(shared_data("fashion-mnist")), "preprocess.max_train_examples": 0})
    run(stage_command("download", repo_copy), repo_copy)
    process = subprocess.Popen(stage_command("preprocess", repo_copy), cwd=repo_copy, env=tool_env(), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    # Kill once the stage has started writing (its temp folder exists), i.e. mid-output.
    while not list((repo_copy / "data").glob(".prepared.*.partial")):
        assert process.poll() is None and time.monotonic() < deadline, "preprocess finished before it could be killed"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (repo_copy / "data/prepared").exists()
    run(stage_command("preprocess", repo_copy), repo_copy)
    assert load_prepared(repo_copy / "data/prepared").meta["counts"]["test"] == 10000
    assert not list((repo_copy / "data").glob(".prepared.*"))


@pytest.mark.slow
def test_diverging_run_exits_3_naming_epoch_and_step_and_writes_nothing(repo_copy):
    update_params(repo_copy / "params.yaml", {"download.dataset": "diabetes", "train.optimizer": "sgd", "train.learning_rate": 10.0, "train.momentum": 0.99})
    run(["dvc", "repro", "preprocess"], repo_copy)
    result = run(stage_command("train", repo_copy), repo_copy, check=False)
    assert result.returncode == 3
    assert "error: non-finite loss at epoch 1, step 4" in result.stderr
    assert not (repo_copy / "models").exists() and not (repo_copy / "metrics").exists()
    # on_nonfinite: skip drops the bad steps, but the weights it kept already blow up validation:
    # the run is still refused rather than written as a result.
    update_params(repo_copy / "params.yaml", {"train.on_nonfinite": "skip", "train.epochs": 1})
    skipped = run(stage_command("train", repo_copy), repo_copy, check=False)
    assert skipped.returncode == 3
    assert re.search(r"epoch 1: skipped [1-9]\d* step\(s\) with a non-finite loss", skipped.stderr)
    assert "error: epoch 1 produced non-finite metrics" in skipped.stderr
    assert not (repo_copy / "models").exists() and not (repo_copy / "metrics").exists()


@pytest.mark.slow
def test_tampered_raw_or_prepared_data_is_refused_by_the_next_stage(repo_copy):
    run(["dvc", "repro", "preprocess"], repo_copy)
    raw = repo_copy / "data/raw/digits.npz"
    original = raw.read_bytes()
    raw.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    result = run(stage_command("preprocess", repo_copy), repo_copy, check=False)
    assert result.returncode == 2 and "digits.npz" in result.stderr
    raw.write_bytes(original)
    array = repo_copy / "data/prepared/x_test.npy"
    array.write_bytes(array.read_bytes()[:-5])
    for stage in ("train", "evaluate"):
        result = run(stage_command(stage, repo_copy), repo_copy, check=False)
        assert result.returncode == 2 and "x_test.npy does not match the hash in meta.json" in result.stderr, result.stderr


def test_build_model_rejects_an_impossible_vit_patch(tmp_path):
    config = {"model": "vit", "settings": {"patch_size": 3, "embed_dim": 8, "num_heads": 2, "num_blocks": 1, "mlp_dim": 8, "dropout": 0.0}, "input_shape": [8, 8, 1], "outputs": 10, "l2": 0.0, "seed": 0, "offset": [0.0], "scale": [1.0]}
    with pytest.raises(ValueError, match="patch_size = 3 must divide"):
        build_model(config)
