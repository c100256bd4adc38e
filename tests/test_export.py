"""Export and predict in-process, on small made-up data sets: every model family round-trips
through SavedModel and TFLite with parity against the evaluation routine, the SavedModel loads
without tapework, the predict command's checks and outputs, and the bad inputs of both.

The end-to-end runs (dvc repro, push/pull, real Fashion-MNIST) are in tests/test_export_pipeline.py.
"""

import ast
import csv
import importlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from tapework import predict
from tapework.errors import DataError
from tapework.evaluation import evaluate_model
from tapework.export import PARITY_TOLERANCE, ExportError, check_model_matches_data, evaluated, export_model
from tapework.io import file_digest
from tapework.models import build_model, layer_summary, model_config, parameter_count
from tapework.preprocess import META_FILE, RawDataset, prepare, write_prepared
from tapework.serving import CARD_FILE, SAVED_MODEL_DIR, TFLITE_FILE, ServingModel, read_card, run_tflite
from tests.conftest import ROOT, make_params

FAMILY_SETTINGS = {
    "mlp": {"train.mlp.hidden_units": [16], "train.mlp.dropout": 0.1},
    "residual_mlp": {"train.residual_mlp.width": 16, "train.residual_mlp.blocks": 1, "train.residual_mlp.head_units": [8], "train.residual_mlp.dropout": 0.1},
    "cnn": {"train.cnn.filters": [4], "train.cnn.dense_units": 8, "train.cnn.dropout": 0.1},
    "vit": {"train.vit.patch_size": 4, "train.vit.embed_dim": 8, "train.vit.num_heads": 2, "train.vit.num_blocks": 1, "train.vit.mlp_dim": 16, "train.vit.dropout": 0.1},
}
FEATURES = ("age", "bmi", "bp", "s1")


def digit_like_images(count=240, seed=0):
    """8x8x1 uint8 images with values 0-16 (the digits range) and 3 classes."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 17, (count, 8, 8, 1), dtype=np.uint8)
    return RawDataset(images, rng.integers(0, 3, count), None, None, "classification", ("zero", "one", "two"), None, (8, 8, 1))


def feature_rows(count=240, seed=0):
    rng = np.random.default_rng(seed)
    rows = rng.normal(50, 10, (count, len(FEATURES)))
    return RawDataset(rows, rows @ np.array([1.0, 2.0, -1.0, 0.5]) + 100, None, None, "regression", (), FEATURES, None)


def prepared(tmp_path, raw, dataset):
    """A prepared folder on disk (the export reads meta.json's hash) and its Prepared."""
    from tapework.preprocess import load_prepared

    write_prepared(prepare(raw, make_params().preprocess, dataset), tmp_path / "prepared")
    return load_prepared(tmp_path / "prepared")


def model_for(data, family="mlp", seed=0):
    params = make_params({"train.model": family, "train.seed": seed, **FAMILY_SETTINGS[family]})
    outputs = data.meta["num_classes"] or 1
    normalization = data.meta["normalization"]
    config = model_config(params.train, tuple(data.meta["input_shape"]), outputs, normalization["offset"], normalization["scale"])
    return build_model(config), config


def training_for(tmp_path, data):
    return {"dataset": data.meta["dataset"], "seed": 0, "data_sha256": file_digest(tmp_path / "prepared" / META_FILE), "params_sha256": "0" * 64, "model_sha256": "f" * 64}


def export(tmp_path, data, model, config, target="export"):
    return export_model(
        model, config, data, tmp_path / target, batch_size=32, huber_delta=0.5, csv_target="target",
        training=training_for(tmp_path, data),
    )


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    """One exported 0-16 image classifier, shared by the predict tests."""
    tmp_path = tmp_path_factory.mktemp("digits")
    data = prepared(tmp_path, digit_like_images(), "digits")
    model, config = model_for(data)
    export(tmp_path, data, model, config)
    return tmp_path / "export", data


@pytest.fixture(scope="module")
def tabular_export(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tabular")
    data = prepared(tmp_path, feature_rows(), "diabetes")
    model, config = model_for(data)
    export(tmp_path, data, model, config)
    return tmp_path / "export", data


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("family", sorted(FAMILY_SETTINGS))
def test_every_image_family_exports_with_bitwise_saved_model_and_close_tflite(tmp_path, family):
    data = prepared(tmp_path, digit_like_images(), "digits")
    model, config = model_for(data, family)
    card = export(tmp_path, data, model, config)
    folder = tmp_path / "export"
    assert sorted(path.name for path in folder.iterdir()) == sorted([CARD_FILE, SAVED_MODEL_DIR, TFLITE_FILE])
    assert not (folder / SAVED_MODEL_DIR / "fingerprint.pb").exists()  # holds a random id: left out
    assert card == json.loads((folder / CARD_FILE).read_text())
    assert card["input"] == {"name": "inputs", "kind": "image", "shape": [None, 8, 8, 1], "dtype": "uint8", "layout": "NHWC", "value_range": [0, 16], "normalization": card["input"]["normalization"]}
    assert card["class_names"] == ["zero", "one", "two"] and card["target"] is None
    assert card["model"]["family"] == family and card["model"]["parameters"] == parameter_count(model) > 0
    assert card["test_metrics"] == evaluate_model(model, data, 32, 0.5).results  # the evaluate stage's routine and numbers
    assert card["training"] == training_for(tmp_path, data)

    x_test = data.split("test")[0]
    _, reference = evaluated(model, data, 32, 0.5)
    served = ServingModel(folder)(x_test)
    np.testing.assert_array_equal(served["probabilities"], reference["probabilities"])  # bitwise
    np.testing.assert_array_equal(served["class_index"], reference["class_index"])
    lite = run_tflite(folder / TFLITE_FILE, x_test)
    assert np.max(np.abs(lite["probabilities"] - served["probabilities"])) <= PARITY_TOLERANCE
    np.testing.assert_array_equal(lite["class_index"], served["class_index"])
    parity = card["parity"]
    assert parity["examples"] == len(x_test) and parity["saved_model_vs_evaluation"]["max_abs_difference"] == 0.0
    assert parity["tflite_vs_saved_model"]["max_abs_difference"] == float(np.max(np.abs(lite["probabilities"] - served["probabilities"])))


def test_regression_export_predicts_in_target_units_with_the_catalogue_target(tmp_path):
    data = prepared(tmp_path, feature_rows(), "diabetes")
    model, config = model_for(data)
    card = export(tmp_path, data, model, config)
    assert card["task"] == "regression" and card["class_names"] is None
    assert card["target"] == {"name": "disease progression one year after baseline", "units": "score (25 to 346)"}
    assert card["input"]["feature_names"] == list(FEATURES) and card["input"]["dtype"] == "float32"
    assert len(card["input"]["value_range"]) == len(FEATURES)
    x_test = data.split("test")[0]
    served = ServingModel(tmp_path / "export")(x_test)
    reference = evaluated(model, data, 32, 0.5)[1]["prediction"]
    np.testing.assert_array_equal(served["prediction"], reference)
    scale = data.meta["target"]["scale"]
    # In the target's units: the raw model output times the target's scale plus its offset.
    raw_output = model(x_test, training=False).numpy().reshape(-1)
    np.testing.assert_allclose(served["prediction"], raw_output * scale + data.meta["target"]["offset"], rtol=1e-6)
    lite = run_tflite(tmp_path / "export" / TFLITE_FILE, x_test)["prediction"]
    assert np.max(np.abs(lite - served["prediction"])) / scale <= PARITY_TOLERANCE


def test_saved_model_loads_and_runs_in_a_process_without_tapework(tmp_path, digits_export):
    folder, data = digits_export
    x_test = data.split("test")[0]
    np.save(tmp_path / "x.npy", x_test)
    code = (
        "import sys, numpy as np, tensorflow as tf\n"
        "signature = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
        "outputs = signature(inputs=tf.constant(np.load(sys.argv[2])))\n"
        "np.savez(sys.argv[3], **{name: value.numpy() for name, value in outputs.items()})\n"
        "assert not [name for name in sys.modules if name.split('.')[0] == 'tapework'], 'tapework was imported'\n"
    )
    # -I: no current folder or PYTHONPATH on sys.path, so nothing of the checkout is importable by accident.
    result = subprocess.run([sys.executable, "-I", "-c", code, str(folder / SAVED_MODEL_DIR), str(tmp_path / "x.npy"), str(tmp_path / "out.npz")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as outside:
        inside = ServingModel(folder)(x_test)
        assert sorted(outside.files) == ["class_index", "probabilities"]
        for name in outside.files:
            np.testing.assert_array_equal(outside[name], inside[name])


def test_failed_parity_check_writes_nothing_and_keeps_the_previous_export(tmp_path, monkeypatch):
    import tapework.export as export_module

    data = prepared(tmp_path, digit_like_images(), "digits")
    model, config = model_for(data)
    export(tmp_path, data, model, config)
    before = {path: path.read_bytes() for path in (tmp_path / "export").rglob("*") if path.is_file()}

    def drifting_tflite(model_file, inputs):
        outputs = run_tflite(model_file, inputs)
        outputs["probabilities"] = outputs["probabilities"] + 1e-3
        return outputs

    monkeypatch.setattr(export_module, "run_tflite", drifting_tflite)
    with pytest.raises(ExportError, match=r"the TFLite model differs from the evaluated model by 0\.001.*nothing was exported"):
        export(tmp_path, data, model, config)
    assert {path: path.read_bytes() for path in (tmp_path / "export").rglob("*") if path.is_file()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export", "prepared"]  # no partial folder left


def test_model_from_other_data_is_refused(tmp_path):
    digits = prepared(tmp_path, digit_like_images(), "digits")
    _, config = model_for(digits)
    check_model_matches_data(config, digits.meta, Path("models"))
    other = prepare(digit_like_images(seed=5), make_params().preprocess, "digits")  # same data set, other images
    with pytest.raises(DataError, match=r"models holds a model trained on other data \(offset \[[0-9.]+\]\) than the prepared digits data \(offset \[[0-9.]+\]\): re-run the train stage"):
        check_model_matches_data(config, other.meta, Path("models"))
    wider = prepare(RawDataset(np.zeros((100, 4, 4, 1), np.uint8), np.arange(100) % 3, None, None, "classification", ("a", "b", "c"), None, (4, 4, 1)), make_params().preprocess, "digits")
    with pytest.raises(DataError, match=r"\(input_shape \[8, 8, 1\]\) than the prepared digits data \(input_shape \[4, 4, 1\]\)"):
        check_model_matches_data(config, wider.meta, Path("models"))


def test_residual_mlp_parameter_count_and_summary():
    """The seed's residual MLP (width 256, 2 blocks, head 64-32) on 28x28x1 input with 10 classes."""
    settings = {"train.residual_mlp.width": 256, "train.residual_mlp.blocks": 2, "train.residual_mlp.head_units": [64, 32]}
    train = make_params({"train.model": "residual_mlp", **settings}).train
    model = build_model(model_config(train, (28, 28, 1), 10, [0.0], [1.0]))
    def dense(inputs, units):
        return inputs * units + units  # kernel + bias

    expected = dense(784, 256) + 2 * 2 * dense(256, 256) + dense(256, 64) + dense(64, 32) + dense(32, 10)
    assert parameter_count(model) == expected == 482_986
    lines = layer_summary(model)
    assert lines[-1].split()[:2] == ["total", "482,986"]
    assert sum(int(line.split()[-1].replace(",", "")) for line in lines[1:-1]) == expected  # the layers add up


def test_no_keras_fit_evaluate_or_predict_call_in_the_package_or_stages():
    banned = {"fit", "evaluate", "predict", "predict_on_batch", "train_on_batch", "test_on_batch", "predict_step"}
    for source in [*(ROOT / "tapework").glob("*.py"), *(ROOT / "stages").glob("*.py")]:
        tree = ast.parse(source.read_text())
        calls = [node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in banned]
        assert not calls, f"{source.relative_to(ROOT)} calls .{calls[0]}(): predictions come from the serving signature or loop.Evaluator"
        assert ".predict(" not in source.read_text(), source


# --------------------------------------------------------------------------- predict


def test_console_script_is_the_predict_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["tapework-predict"].partition(":")
    assert getattr(importlib.import_module(module), name) is predict.main


def run_predict(capsys, *argv):
    """`python -m tapework.predict ARGV` in-process: (exit code, stdout, the error lines of stderr)."""
    with pytest.raises(SystemExit) as ended:
        predict.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return ended.value.code, out, [line for line in err.splitlines() if line.startswith("error:")]


def write_pngs(folder, images, prefix="test"):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{prefix}{index:04d}.png"
        path.write_bytes(tf.io.encode_png(image).numpy())
        paths.append(path)
    return paths


def test_predict_on_a_folder_of_pngs_equals_the_serving_signature(tmp_path, capsys, digits_export):
    folder, data = digits_export
    x_test = data.split("test")[0][:12]
    write_pngs(tmp_path / "images", x_test)
    served = ServingModel(folder)(x_test)
    names = read_card(folder)["class_names"]

    code, out, errors = run_predict(capsys, tmp_path / "images", "--model", folder)
    assert code == 0 and not errors
    rows = out.splitlines()
    assert rows[0].split() == ["file", "class", "probability"] and len(rows) == 1 + len(x_test)
    for row, index, probabilities in zip(rows[1:], served["class_index"], served["probabilities"]):
        assert row.split()[1:] == [names[index], f"{probabilities[index]:.4f}"]

    code, out, _ = run_predict(capsys, tmp_path / "images", "--model", folder, "--top-k", "3", "--output", tmp_path / "out.csv")
    assert code == 0 and "wrote 12 prediction(s)" in out
    records = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert len(records) == 3 * len(x_test)
    for position, record in enumerate(records):
        example, rank = divmod(position, 3)
        order = np.argsort(-served["probabilities"][example], kind="stable")
        assert record["file"] == str(tmp_path / "images" / f"test{example:04d}.png") and int(record["rank"]) == rank + 1
        assert int(record["class_index"]) == order[rank] and record["class"] == names[order[rank]]
        assert np.float32(float(record["probability"])) == served["probabilities"][example][order[rank]]  # exact float32
    assert int(records[0]["class_index"]) == served["class_index"][0]

    code, _, _ = run_predict(capsys, tmp_path / "images" / "test0003.png", "--model", folder, "--output", tmp_path / "out.json")
    document = json.loads((tmp_path / "out.json").read_text())
    assert code == 0 and document["dataset"] == "digits" and document["task"] == "classification"
    assert [record["class_index"] for record in document["predictions"]] == [int(served["class_index"][3])]


def test_predict_refuses_a_0_255_picture_for_a_0_16_model_unless_rescaled(tmp_path, capsys, digits_export):
    folder, data = digits_export
    image = data.split("test")[0][0]
    bright = (image.astype(np.float64) * 255 / 16).round().astype(np.uint8)  # the same picture as a normal 0-255 PNG
    (path,) = write_pngs(tmp_path, [bright])
    code, _, errors = run_predict(capsys, path, "--model", folder)
    assert code == 2 and errors == [f"error: {path} has pixel values {bright.min()}-{bright.max()}, but the model was trained on 0-16: pass --rescale to map 0-255 onto 0-16"]
    code, out, _ = run_predict(capsys, path, "--model", folder, "--rescale", "--output", tmp_path / "rescaled.json")
    assert code == 0
    rescaled = json.loads((tmp_path / "rescaled.json").read_text())["predictions"][0]
    assert rescaled["class_index"] == int(ServingModel(folder)(image[None])["class_index"][0])  # rescaling restores the 0-16 picture


def test_predict_wrong_size_is_one_line_naming_the_shape_and_resize_converts(tmp_path, capsys, digits_export):
    folder, _ = digits_export
    (path,) = write_pngs(tmp_path, [np.full((16, 12, 3), 8, np.uint8)])
    code, _, errors = run_predict(capsys, path, "--model", folder)
    assert code == 2 and errors == [f"error: {path} is 16x12 pixels with 3 channels; the model takes 8x8 pixels with 1 channel (shape [8, 8, 1]): pass --resize to convert it"]
    code, out, errors = run_predict(capsys, path, "--model", folder, "--resize")
    assert code == 0 and not errors and len(out.splitlines()) == 2
    jpeg = tmp_path / "photo.JPG"  # JPEG too, whatever the suffix's case
    jpeg.write_bytes(tf.io.encode_jpeg(np.full((8, 8, 1), 9, np.uint8)).numpy())
    code, out, errors = run_predict(capsys, tmp_path, "--model", folder, "--resize")
    assert code == 0 and not errors and [line.split()[0] for line in out.splitlines()[1:]] == [str(jpeg), str(path)]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: (tmp / "notes.png", (tmp / "notes.png").write_text("not a picture"))[0], "notes.png is not a PNG or JPEG image"),
        (lambda tmp: (tmp / "empty", (tmp / "empty").mkdir())[0], "empty holds no PNG or JPEG files (.png, .jpg, .jpeg)"),
        (lambda tmp: (tmp / "cut.png", (tmp / "cut.png").write_bytes(tf.io.encode_png(np.zeros((8, 8, 1), np.uint8)).numpy()[:30]))[0], "cut.png could not be decoded as PNG or JPEG"),
        (lambda tmp: tmp / "missing.png", "missing.png does not exist"),
    ],
    ids=["not-an-image", "empty-folder", "truncated-png", "missing-file"],
)
def test_predict_bad_image_input_is_one_line_and_exit_2(tmp_path, capsys, digits_export, make, message):
    folder, _ = digits_export
    code, out, errors = run_predict(capsys, make(tmp_path), "--model", folder)
    assert code == 2 and out == "" and len(errors) == 1 and message in errors[0], errors


def test_predict_model_from_another_dataset_or_damaged_is_refused(tmp_path, capsys, digits_export):
    folder, data = digits_export
    write_pngs(tmp_path / "images", data.split("test")[0][:2])
    code, _, errors = run_predict(capsys, tmp_path / "images", "--model", folder, "--dataset", "fashion_mnist")
    assert code == 2 and errors == [f"error: {folder} holds a model trained on digits, not fashion_mnist: pass --model the folder exported from a fashion_mnist run"]

    damaged = tmp_path / "damaged"
    subprocess.run(["cp", "-r", str(folder), str(damaged)], check=True)
    tflite = damaged / TFLITE_FILE
    tflite.write_bytes(tflite.read_bytes()[:-1] + b"\0")
    code, _, errors = run_predict(capsys, tmp_path / "images", "--model", damaged)
    assert code == 2 and errors == [f"error: {tflite} does not match the SHA-256 in {CARD_FILE}; re-run `dvc repro export` or `dvc pull`"]

    code, _, errors = run_predict(capsys, tmp_path / "images", "--model", tmp_path / "images")
    assert code == 2 and errors == [f"error: {tmp_path / 'images' / CARD_FILE} is missing: {tmp_path / 'images'} is not an exported model (dvc repro export writes one; dvc pull fetches one)"]


def test_predict_without_model_uses_the_export_stage_folder_of_dvc_yaml(tmp_path, capsys, digits_export, monkeypatch):
    folder, data = digits_export
    write_pngs(tmp_path / "images", data.split("test")[0][:1])
    monkeypatch.chdir(tmp_path)
    code, _, errors = run_predict(capsys, "images")
    assert code == 2 and errors == ["error: no --model given and no dvc.yaml in this folder to find the export stage's output: pass --model DIR"]
    (tmp_path / "dvc.yaml").write_text(f"stages:\n  export:\n    cmd: python -m stages.export --export {folder}\n")
    code, out, errors = run_predict(capsys, "images")
    assert code == 0 and not errors and "images/test0000.png" in out
    monkeypatch.chdir(ROOT)  # the project's own dvc.yaml: the export stage's declared output
    outs = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["export"]["outs"]
    assert [predict.default_model_dir()] == [Path(out) for out in outs]


def write_table(path, header, rows):
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_predict_csv_rows_by_column_name_in_target_units(tmp_path, capsys, tabular_export):
    folder, data = tabular_export
    x_test = data.split("test")[0][:5]
    order = [3, 1, 0, 2]  # columns in another order than training: matched by name
    path = write_table(tmp_path / "rows.csv", [FEATURES[i] for i in order], [[repr(float(value)) for value in row[order]] for row in x_test])
    code, out, errors = run_predict(capsys, path, "--model", folder, "--output", tmp_path / "out.csv")
    assert code == 0 and not errors
    records = list(csv.DictReader((tmp_path / "out.csv").open()))
    served = ServingModel(folder)(x_test)["prediction"]
    assert [int(record["row"]) for record in records] == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(np.array([float(record["prediction"]) for record in records], np.float32), served)
    code, out, _ = run_predict(capsys, path, "--model", folder)
    assert code == 0 and "disease progression one year after baseline (score (25 to 346))" in out.splitlines()[0]


@pytest.mark.parametrize(
    ("header", "cell", "message"),
    [
        (("age", "bmi", "bp"), None, "missing column(s) s1; the model takes exactly: age, bmi, bp, s1"),
        (("age", "bmi", "bp", "s1", "sex"), None, "unexpected column(s) sex; the model takes exactly: age, bmi, bp, s1"),
        (FEATURES, "NaN", "row 2, column 'bp': 'NaN' is not a finite number"),
        (FEATURES, "high", "row 2, column 'bp': 'high' is not a number"),
        (FEATURES, "", "row 2, column 'bp': is empty"),
    ],
    ids=["missing-column", "extra-column", "nan", "text", "empty-cell"],
)
def test_predict_bad_csv_is_one_line_naming_the_column(tmp_path, capsys, tabular_export, header, cell, message):
    folder, _ = tabular_export
    rows = [["1.5"] * len(header) for _ in range(3)]
    if cell is not None:
        rows[1][header.index("bp")] = cell
    path = write_table(tmp_path / "bad.csv", header, rows)
    code, out, errors = run_predict(capsys, path, "--model", folder, "--output", tmp_path / "out.csv")
    assert code == 2 and errors == [f"error: {path}: {message}" if "column(s)" in message else f"error: {path} {message}"]
    assert not (tmp_path / "out.csv").exists()  # nothing half-written


def test_predict_options_that_do_not_fit_the_model_are_refused(tmp_path, capsys, tabular_export, digits_export):
    folder, _ = tabular_export
    path = write_table(tmp_path / "rows.csv", FEATURES, [["1"] * 4])
    assert run_predict(capsys, path, "--model", folder, "--top-k", "2")[2] == ["error: --top-k applies to classification models; this one predicts a number"]
    assert run_predict(capsys, path, "--model", folder, "--rescale")[2] == ["error: --rescale and --resize apply to image models; this one takes CSV feature rows"]
    assert run_predict(capsys, path, "--model", folder, "--output", tmp_path / "out.txt")[2] == [f"error: --output {tmp_path / 'out.txt'}: name a .csv or .json file"]
    image_model, _ = digits_export
    assert run_predict(capsys, path, "--model", image_model, "--top-k", "4")[2] == ["error: --top-k 4: the model has 3 classes; choose 1 to 3"]
    assert run_predict(capsys, path, "--model", image_model)[2] == [f"error: {path} is not a PNG or JPEG image"]
