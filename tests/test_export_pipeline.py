"""The export stage under `dvc repro` in throwaway copies of the repo: parity with the evaluate
stage on every test example (digits, and the real Fashion-MNIST), the predict command on PNG
files, the export stage's bad inputs, and the DVC remote round trip (push, fresh clone, pull,
`dvc artifacts get`)."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from tapework.batching import make_dataset
from tapework.catalogue import FASHION_CLASSES
from tapework.export import PARITY_TOLERANCE
from tapework.io import file_digest
from tapework.loop import Evaluator, task_spec
from tapework.metrics import MetricSet
from tapework.models import load_model
from tapework.params import load_params
from tapework.preprocess import load_prepared
from tapework.serving import TFLITE_FILE, ServingModel, run_tflite
from tests.conftest import ROOT, run, shared_data, stage_command, update_params

MODEL_DIR = "export/model"  # the export stage's output, as dvc.yaml declares it
ARTIFACT = "tapework-model"
# The documented default remote (.dvc/config): a folder in the user's cache, outside every clone.
REMOTE_IN_HOME = Path(".cache/tapework/dvc-remote")


def test_dvc_yaml_declares_the_exported_model_as_a_model_artifact_and_a_local_default_remote(tmp_path):
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert dvc_yaml["stages"]["export"]["outs"] == [MODEL_DIR]
    artifact = dvc_yaml["artifacts"][ARTIFACT]
    assert artifact["path"] == MODEL_DIR and artifact["type"] == "model" and artifact["desc"] and artifact["labels"]
    # Committed as ~/...: each user's own folder, no machine-specific path in the repo.
    assert f"url = ~/{REMOTE_IN_HOME.as_posix()}" in (ROOT / ".dvc/config").read_text().splitlines()[-1]
    config = run(["dvc", "config", "--project", "--list"], ROOT, HOME=str(tmp_path)).stdout.splitlines()
    assert "core.remote=storage" in config and f"remote.storage.url={tmp_path / REMOTE_IN_HOME}" in config


def commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message], repo)


def cached_outputs(repo: Path) -> list[str]:
    """Every output dvc.yaml declares without `cache: false`: what `dvc push` sends to the remote.
    Per-seed (matrix) stages are left out: with repeats.extra_seeds at [] they are no stage at all."""
    paths = []
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        if "matrix" in stage:
            continue
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                path, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
                if (options or {}).get("cache", True):
                    paths.append(path)
    return paths


def evaluate_stage_outputs(repo: Path) -> tuple[np.ndarray, list[str]]:
    """The evaluate stage's per-example outputs on the test split (its Evaluator, its batches) and its predicted class names."""
    params = load_params(repo / "params.yaml")
    data = load_prepared(repo / "data/prepared")
    model, _ = load_model(repo / "models")
    spec = task_spec(data.meta)
    x_test, y_test = data.split("test")
    metrics = MetricSet(spec.task, spec.num_classes, params.train.huber_delta, target_scale=spec.target_scale, with_confusion=True)
    results, logits = Evaluator(model, spec, metrics)(make_dataset(x_test, y_test, params.evaluate.batch_size), collect_outputs=True)
    stage_results = json.loads((repo / "metrics/evaluate.json").read_text())["test"]
    assert results["loss"] == stage_results["loss"] and results["accuracy"] == stage_results["accuracy"]  # the stage's own numbers
    predicted = [row["predicted"] for row in csv.DictReader((repo / "plots/confusion.csv").open())]
    return logits, predicted


def check_parity(repo: Path, min_tflite_agreement: float) -> dict[str, float]:
    """SavedModel = evaluate stage bit for bit; TFLite within PARITY_TOLERANCE and at least `min_tflite_agreement` equal classes."""
    logits, predicted = evaluate_stage_outputs(repo)
    x_test = load_prepared(repo / "data/prepared").split("test")[0]
    served = ServingModel(repo / MODEL_DIR)(x_test)
    names = json.loads((repo / MODEL_DIR / "model_card.json").read_text())["class_names"]
    np.testing.assert_array_equal(served["probabilities"], tf.nn.softmax(logits).numpy())
    np.testing.assert_array_equal(served["class_index"], np.argmax(logits, axis=-1))
    assert [names[index] for index in served["class_index"]] == predicted
    lite = run_tflite(repo / MODEL_DIR / TFLITE_FILE, x_test)
    bound = float(np.max(np.abs(lite["probabilities"] - served["probabilities"])))
    agreement = float(np.mean(lite["class_index"] == served["class_index"]))
    assert bound <= PARITY_TOLERANCE and agreement >= min_tflite_agreement, (bound, agreement)
    card = json.loads((repo / MODEL_DIR / "model_card.json").read_text())
    assert card["parity"]["tflite_vs_saved_model"] == {"max_abs_difference": bound, "class_index_agreement": agreement}
    # The card's numbers and hashes are the evaluate and train stages' own.
    assert card["test_metrics"] == json.loads((repo / "metrics/evaluate.json").read_text())["test"]
    trained = json.loads((repo / "metrics/train.provenance.json").read_text())
    assert card["training"] == {key: trained[key] for key in ("dataset", "seed", "data_sha256", "params_sha256")} | {"model_sha256": file_digest(repo / "models/model.weights.npz")}
    return {"examples": len(x_test), "tflite_max_abs_difference": bound, "tflite_class_agreement": agreement}


def write_test_pngs(repo: Path, folder: Path, count: int) -> list[Path]:
    images = load_prepared(repo / "data/prepared").split("test")[0][:count]
    folder.mkdir(parents=True)
    paths = [folder / f"test{index:05d}.png" for index in range(len(images))]
    for path, image in zip(paths, images):
        path.write_bytes(tf.io.encode_png(image).numpy())
    return paths


def predict_files(repo: Path, *argv: str, **env: str) -> list[dict]:
    """`python -m tapework.predict ARGV --output predictions.json` run in `repo`, with its default model."""
    output = repo.parent / f"{repo.name}-predictions.json"
    run(["python", "-m", "tapework.predict", *argv, "--output", str(output)], repo, **env)
    return json.loads(output.read_text())["predictions"]


@pytest.mark.slow
def test_export_stage_refuses_missing_corrupt_or_foreign_model_files(tiny_trained):
    repo_copy = tiny_trained  # a trained tiny digits model
    shutil.rmtree(repo_copy / "export")
    command = stage_command("export", repo_copy)
    models = repo_copy / "models"
    saved = {path.name: path.read_bytes() for path in models.iterdir()}

    def refused(expected: str) -> None:
        result = run(command, repo_copy, check=False)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
        assert not (repo_copy / "export").exists() or not any((repo_copy / "export").iterdir())  # nothing half-written
        for name, data in saved.items():
            (models / name).write_bytes(data)

    (models / "model.json").unlink()
    refused("models/model.json is missing: run the train stage first")
    weights = models / "model.weights.npz"
    weights.write_bytes(weights.read_bytes()[:1000])
    refused("models/model.weights.npz is not a valid array archive")
    (models / "model.json").write_text("{not json")
    refused("models/model.json is not valid JSON")
    (models / "model.json").write_text('{"model": "mlp"}')  # JSON, but not a model config
    refused("models does not hold a model this code can rebuild")
    # Prepared data of another data set beside the digits model.
    update_params(repo_copy / "params.yaml", {"download.dataset": "diabetes"})
    run(stage_command("download", repo_copy), repo_copy)
    run(stage_command("preprocess", repo_copy), repo_copy)
    refused("models holds a model trained on other data (input_shape [8, 8, 1]) than the prepared diabetes data (input_shape [10])")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_push_fresh_clone_pull_round_trips_every_output_and_the_model_predicts_the_same(tiny_trained, tmp_path):
    repo_copy = tiny_trained  # a tiny run's outputs, not yet committed
    home = tmp_path / "home"  # the default remote lives under ~: keep it inside this test
    home.mkdir()
    digits = check_parity(repo_copy, min_tflite_agreement=1.0)  # every digits test example: same class in TFLite
    assert digits["examples"] == 359
    commit(repo_copy, "run")
    run(["dvc", "push"], repo_copy, HOME=str(home))
    remote = home / REMOTE_IN_HOME
    assert remote.is_dir() and any(path.is_file() for path in remote.rglob("*"))
    assert not run(["git", "status", "--porcelain"], repo_copy).stdout  # the remote is outside the repo

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo_copy), str(clone)], tmp_path)
    assert not (clone / "export").exists() and not (clone / "models").exists()
    run(["dvc", "pull"], clone, HOME=str(home))
    assert json.loads(run(["dvc", "status", "--json"], clone, HOME=str(home)).stdout) == {}  # everything up to date
    cached = cached_outputs(repo_copy)
    assert cached == ["data/params.ok", "data/raw", "data/prepared", "models", MODEL_DIR]
    for path in cached:
        files = [repo_copy / path] if (repo_copy / path).is_file() else (repo_copy / path).rglob("*")
        originals = sorted(p.relative_to(repo_copy) for p in files if p.is_file())
        pulled = [clone / path] if (clone / path).is_file() else (clone / path).rglob("*")
        assert originals and originals == sorted(p.relative_to(clone) for p in pulled if p.is_file()), path
        for name in originals:
            assert (repo_copy / name).read_bytes() == (clone / name).read_bytes(), name

    write_test_pngs(repo_copy, tmp_path / "pngs", 40)
    here = predict_files(repo_copy, str(tmp_path / "pngs"), "--top-k", "3")
    assert len(here) == 3 * 40 and here == predict_files(clone, str(tmp_path / "pngs"), "--top-k", "3")

    # A registered version is what `dvc artifacts get` resolves (GTO's tag), fetched from the remote.
    run(["git", "config", "user.email", "t@t"], repo_copy)
    run(["git", "config", "user.name", "t"], repo_copy)
    run(["gto", "register", ARTIFACT], repo_copy, HOME=str(home))
    run(["dvc", "artifacts", "get", str(repo_copy), ARTIFACT, "-o", str(tmp_path / "fetched")], tmp_path, HOME=str(home))
    exported = sorted(p.relative_to(repo_copy / MODEL_DIR) for p in (repo_copy / MODEL_DIR).rglob("*") if p.is_file())
    assert exported == sorted(p.relative_to(tmp_path / "fetched") for p in (tmp_path / "fetched").rglob("*") if p.is_file())
    assert all((repo_copy / MODEL_DIR / name).read_bytes() == (tmp_path / "fetched" / name).read_bytes() for name in exported)
    fetched = predict_files(repo_copy, str(tmp_path / "pngs"), "--top-k", "3", "--model", str(tmp_path / "fetched"))
    assert fetched == here


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_fashion_mnist_export_matches_evaluate_and_predicts_png_files_the_same(repo_copy, tmp_path):
    update_params(
        repo_copy / "params.yaml",
        {
            "download.dataset": "fashion_mnist",
            "download.mirror": str(shared_data("fashion-mnist")),
            "preprocess.max_train_examples": 0,
            "train.mlp.hidden_units": [128, 64],  # the committed default model, trained briefly
            "train.batch_size": 64,
            "train.epochs": 3,
        },
    )
    run(["dvc", "repro"], repo_copy)
    card = json.loads((repo_copy / MODEL_DIR / "model_card.json").read_text())
    assert card["dataset"] == "fashion_mnist" and card["class_names"] == list(FASHION_CLASSES)
    assert card["input"]["shape"] == [None, 28, 28, 1] and card["input"]["value_range"] == [0, 255]
    parity = check_parity(repo_copy, min_tflite_agreement=0.999)
    assert parity["examples"] == 10000

    count = 500
    write_test_pngs(repo_copy, tmp_path / "pngs", count)
    predictions = predict_files(repo_copy, str(tmp_path / "pngs"))
    evaluated = [row["predicted"] for row in csv.DictReader((repo_copy / "plots/confusion.csv").open())][:count]
    assert [record["file"] for record in predictions] == [str(tmp_path / "pngs" / f"test{index:05d}.png") for index in range(count)]
    assert [record["class"] for record in predictions] == evaluated
    x_test = load_prepared(repo_copy / "data/prepared").split("test")[0][:count]
    served = ServingModel(repo_copy / MODEL_DIR)(x_test)["probabilities"]
    assert [np.float32(record["probability"]) for record in predictions] == [row.max() for row in served]
