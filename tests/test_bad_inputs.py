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

Added for issue 16 (reliability):
- A, downloads without limits (tests/test_download.py): a mirror trickling one byte per 0.1 s
  (given up at download.deadline_seconds, with progress log lines), the same for the response
  headers (a watchdog shuts the connection at the deadline), a body without
  Content-Length far past the pinned size (cut off one byte past it, nothing kept), a
  Content-Length other than the pinned size, a full disk while writing, a download cache under a
  regular file or on a read-only mount, malformed TAPEWORK_MIRROR / download.mirror (bad IPv6
  bracket, non-numeric port, no host, ftp://, a space, file://host), and a real SIGKILL of a
  download subprocess (its staging folder and cache .partial cleared by the next run, a live
  run's kept); catalogue sizes against the shared files (tests/test_datasets.py)
- B, checks that could be switched off (tests/test_datasets.py, tests/test_parsers.py,
  tests/test_preprocess.py): a swapped all-zero labels file with its manifest entry deleted or
  rewritten, a gzip bomb behind a deleted manifest entry, an unlisted extra file, a manifest
  missing a file the loader reads; parse_idx on a 256 MB bomb (inflates 60,009 bytes), on a
  header claiming a terabyte, trailing data, a bad gzip trailer; meta.json edited (num_classes,
  class_names, a sha256 entry, its own hash), also with a recomputed self-hash; the streaming
  IDX reader (parsers.iter_idx) on each of parse_idx's refusals, a CRC error raised before the
  last chunk, a bomb stopped at its header's size; the idx data set's files against their
  download.idx.sha256 pins with the manifest entry dropped or rewritten, empty pins (the hashes
  to paste), labels past download.idx.class_names, image/label counts that disagree
- C, an unpinned or changed local CSV (tests/test_datasets.py; through dvc in this file), and a
  check_params stage that never opens the CSV (a FIFO as download.csv.path)
- D, silently wrong numbers: R² of a constant target, also with inexact constants over 40
  batches (tests/test_metrics.py, with `dvc metrics show/diff` on a file without r2; the
  pipeline end to end in this file), early stopping on that R² (this file), duplicate column
  names incl. the target twice (tests/test_parsers.py), features or targets beyond float32 and a
  minmax range beyond it (tests/test_preprocess.py)
- E, environment (tests/test_distribute.py; stage by stage in this file): a leftover TF_CONFIG
  with train.distribute none or mirrored, TF_CONFIG not JSON / not an object / malformed
  cluster / non-integer index / task outside the cluster, TAPEWORK_LOGICAL_CPUS abc / 0 / -2 /
  2.5 / 100000000, TAPEWORK_LOG_LEVEL=verbose, a malformed TAPEWORK_MIRROR, TAPEWORK_CACHE
  under a regular file
- F, params.yaml and prepared/model files (tests/test_params.py; stage by stage in this file):
  a latin-1 byte, a 0-byte or comments-only file, duplicate keys and sections, a tab, YAML 1.2
  scalars against DVC's own reader (1e-3, yes, 017, ...), batch sizes 2**31, 2**62, 2**63 and
  any integer key past 2**31-1, a batch larger than the data with drop_remainder, a truncated
  meta.json or model.json, a missing sha256 entry, shortened class_names, an edited num_classes
- G, prepared data as shards (tests/test_shards.py): a shard with one flipped byte, a truncated
  shard, a deleted shard and a meta.json listing one shard fewer, each refused by load_prepared
  before training starts with one line naming the file and the fix; params bad values for
  preprocess.format, shard_size, shards_above_mib and train.shuffle_window (tests/test_params.py)
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

import tapework.preprocess as preprocess_module
from tapework.errors import DataError
from tapework.io import save_npz
from tapework.models import build_model, load_model, save_model
from tapework.params import ParamsError
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
    # One params line: with download.dataset: idx the image size is only known from the files, not when params are checked.
    with pytest.raises(ParamsError, match=r"^params.yaml: train.vit.patch_size = 3 is invalid: must divide the 8x8 images of the prepared data"):
        build_model(config)


# --- issue 16: environment variables, params.yaml and prepared/model files, stage by stage ----------


def _edit_json(relative, change):
    def edit(repo):
        path = repo / relative
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return edit


def _truncate(relative):
    def edit(repo):
        path = repo / relative
        path.write_bytes(path.read_bytes()[:40])

    return edit


def _params_text(old, new):
    def edit(repo):
        path = repo / "params.yaml"
        path.write_text(path.read_text().replace(old, new, 1))

    return edit


def _params(changes):
    return lambda repo: update_params(repo / "params.yaml", changes)


def _cache_under_a_file(repo):
    (repo / "a-file").write_text("not a folder")
    update_params(repo / "params.yaml", {"download.dataset": "mnist", "download.mirror": str(repo / "no-mirror-needed")})


WORKER_1 = json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 1}})
# (id, stage, environment, edit of the repo, text the one error line holds)
STAGE_CASES = [
    ("tf-config-contradicts-params", "train", {"TF_CONFIG": WORKER_1}, None, "TF_CONFIG is set (worker 1 of a 2-process cluster) but train.distribute is 'none': unset TF_CONFIG"),
    ("tf-config-not-json", "train", {"TF_CONFIG": "{cluster: "}, None, "TF_CONFIG is invalid (not JSON: "),
    ("tf-config-task-outside-cluster", "train", {"TF_CONFIG": WORKER_1.replace('"index": 1', '"index": 7')}, None, "TF_CONFIG is invalid (task worker 7 is not in the cluster)"),
    ("logical-cpus-text", "train", {"TAPEWORK_LOGICAL_CPUS": "abc"}, None, "TAPEWORK_LOGICAL_CPUS='abc' is invalid: set it to an integer from 1 to 256"),
    ("logical-cpus-huge", "train", {"TAPEWORK_LOGICAL_CPUS": "100000000"}, None, "TAPEWORK_LOGICAL_CPUS='100000000' is invalid"),
    ("log-level", "check_params", {"TAPEWORK_LOG_LEVEL": "verbose"}, None, "TAPEWORK_LOG_LEVEL='verbose' is invalid: set it to DEBUG, INFO, WARNING or ERROR, or unset it"),
    ("mirror-malformed", "download", {"TAPEWORK_MIRROR": "http://[::1/mnist"}, _params({"download.dataset": "mnist"}), "TAPEWORK_MIRROR='http://[::1/mnist' is not a usable mirror (Invalid IPv6 URL)"),
    ("cache-under-a-file", "download", {"TAPEWORK_CACHE": "a-file/cache"}, _cache_under_a_file, "TAPEWORK_CACHE='a-file/cache' cannot hold downloads (Not a directory)"),
    ("params-latin-1", "check_params", {}, lambda repo: (repo / "params.yaml").write_bytes((repo / "params.yaml").read_bytes().replace(b"dataset:", b"datas\xe9t:", 1)), "params.yaml: not UTF-8 text (byte 0xe9 on line 2)"),
    ("params-empty", "check_params", {}, lambda repo: (repo / "params.yaml").write_bytes(b""), "params.yaml: empty (no keys at all)"),
    ("params-duplicate-key", "check_params", {}, _params_text("  epochs: 3\n", "  epochs: 3\n  epochs: 50\n"), "params.yaml: key `epochs` is set twice"),
    ("batch-size-2**63", "check_params", {}, _params({"train.batch_size": 2**63}), "train.batch_size = 9223372036854775808 is invalid: must be >= 1 and <= 2147483647"),
    ("evaluate-batch-size-2**62", "evaluate", {}, _params({"evaluate.batch_size": 2**62}), "evaluate.batch_size = 4611686018427387904 is invalid"),
    ("batch-larger-than-the-data", "train", {}, _params({"train.batch_size": 2**31 - 1, "train.drop_remainder": True}), "train.batch_size = 2147483647 with drop_remainder leaves no batch"),
    ("meta-truncated", "train", {}, _truncate("data/prepared/meta.json"), "meta.json is not valid JSON"),
    ("meta-sha256-entry-missing", "train", {}, _edit_json("data/prepared/meta.json", lambda meta: meta["sha256"].pop("x_val.npy")), "meta.json changed after preprocess wrote it"),
    ("meta-class-names-short", "evaluate", {}, _edit_json("data/prepared/meta.json", lambda meta: meta.update(class_names=meta["class_names"][:5])), "meta.json changed after preprocess wrote it"),
    ("meta-num-classes-edited", "train", {}, _edit_json("data/prepared/meta.json", lambda meta: meta.update(num_classes=5)), "meta.json changed after preprocess wrote it"),
    ("model-json-truncated", "evaluate", {}, _truncate("models/model.json"), "models/model.json is not valid JSON (Expecting"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "env", "edit", "expected"), [case[1:] for case in STAGE_CASES], ids=[case[0] for case in STAGE_CASES])
def test_bad_environment_params_or_files_stop_a_stage_with_one_line(tiny_trained, stage, env, edit, expected):
    repo = tiny_trained  # a copy of a tiny digits run: every stage's inputs exist
    if edit:
        edit(repo)
    outputs = {path: path.read_bytes() for path in sorted((repo / "models").iterdir())}
    result = run(stage_command(stage, repo), repo, check=False, timeout=120, **env)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
    assert "epoch 1/" not in result.stderr  # stopped before any training
    assert {path: path.read_bytes() for path in sorted((repo / "models").iterdir())} == outputs


@pytest.mark.slow
def test_leftover_tf_config_with_distribute_none_no_longer_trains_for_nothing(tiny_trained):
    """The chief rule applies only under multi_worker: without TF_CONFIG a `none` run writes its outputs."""
    repo = tiny_trained
    shutil.rmtree(repo / "models")
    run(stage_command("train", repo), repo)
    assert (repo / "models" / "model.json").is_file()


@pytest.mark.slow
def test_local_csv_needs_a_pin_and_an_edited_csv_is_seen(repo_copy, tmp_path):
    table = tmp_path / "table.csv"
    rows = [f"{i},{i % 5},{i % 2}\n" for i in range(120)]
    table.write_text("a,b,target\n" + "".join(rows))
    update_params(repo_copy / "params.yaml", {"download.dataset": "csv", "download.csv.path": str(table)})
    unpinned = run(["dvc", "repro", "download"], repo_copy, check=False)
    current = hashlib.sha256(table.read_bytes()).hexdigest()
    assert unpinned.returncode != 0 and f"set `sha256: {current}` under download.csv" in unpinned.stderr
    update_params(repo_copy / "params.yaml", {"download.csv.sha256": current})
    run(["dvc", "repro", "download"], repo_copy)
    table.write_text("a,b,target\n" + "".join(rows[:-1]))  # one row deleted
    edited = hashlib.sha256(table.read_bytes()).hexdigest()
    stale = run(["dvc", "repro", "--force", "download"], repo_copy, check=False)
    assert stale.returncode != 0 and f"SHA-256 {edited} differs from download.csv.sha256 {current}: the file changed" in stale.stderr
    update_params(repo_copy / "params.yaml", {"download.csv.sha256": edited})  # the fix the error names
    status = run(["dvc", "status", "download"], repo_copy).stdout
    assert re.search(r"params\.yaml:\s+modified:\s+download", status), status  # DVC sees the change (in its params section)
    run(["dvc", "repro", "download"], repo_copy)
    assert "data.csv" in json.loads((repo_copy / "data/raw/manifest.json").read_text())["files"]


@pytest.mark.slow
def test_constant_regression_target_reports_no_r2_and_dvc_metrics_still_work(repo_copy, tmp_path):
    table = tmp_path / "table.csv"
    table.write_text("a,b,y\n" + "".join(f"{i},{i % 7},5.0\n" for i in range(200)))
    update_params(repo_copy / "params.yaml", {
        "download.dataset": "csv", "download.csv.path": str(table), "download.csv.target": "y", "download.csv.task": "regression",
        "download.csv.sha256": hashlib.sha256(table.read_bytes()).hexdigest(), "preprocess.max_train_examples": 0,
    })
    result = run(["dvc", "repro"], repo_copy)
    assert "r2 is not defined: the target is constant" in result.stderr + result.stdout
    test = json.loads((repo_copy / "metrics/evaluate.json").read_text())["test"]
    train = json.loads((repo_copy / "metrics/train.json").read_text())
    assert "r2" not in test and "r2" not in train["train"] and "r2" not in train["val"] and "mae" in test
    assert "train_r2" not in (repo_copy / "metrics/train_history.tsv").read_text()
    shown = run(["dvc", "metrics", "show", "--json"], repo_copy)
    assert "metrics/evaluate.json" in shown.stdout


def test_early_stopping_on_an_r2_that_is_not_defined_is_one_line():
    """A constant validation target has no R² (MetricSet leaves val_r2 out): monitoring it is a clear error."""
    from tapework.checkpoint import TrainingState
    from tapework.early_stopping import EarlyStopping

    model = tiny_mlp()
    settings = make_params({"download.dataset": "diabetes", "train.early_stopping.monitor": "val_r2", "train.early_stopping.patience": 2}).train.early_stopping
    with pytest.raises(DataError, match=r"train\.early_stopping\.monitor = val_r2 has no value: it is not defined on this validation split \(a constant target\)\. Monitor val_loss"):
        EarlyStopping(settings, TrainingState(model)).update({"epoch": 1, "val_loss": 1.0}, model)
    switched_off = EarlyStopping(dataclasses.replace(settings, patience=0), TrainingState(model))
    assert switched_off.update({"epoch": 1, "val_loss": 1.0}, model) is False
