"""The export stage's logic: the trained model as a self-contained TensorFlow SavedModel, a TFLite
flat buffer converted from it, and a model card, built in a temp folder and renamed into place
only after both were loaded back and matched the evaluation routine on the test split.

The test metrics on the card and the reference outputs for that check come from one run of the
evaluate stage's routine (`evaluation.evaluate_model`, same batches), so the export needs no
file of the evaluate stage and runs beside it.

The SavedModel's serving signature (`serving.SIGNATURE_KEY`) takes the raw input the user has:
uint8 images [N, H, W, C] or float32 feature rows [N, F]; the model standardises them itself. It
returns `probabilities` and `class_index` (classification) or `prediction` in the target's own
units (regression). Loading it needs TensorFlow only: no tapework code, no Keras class.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tapework import catalogue
from tapework.errors import DataError
from tapework.evaluation import evaluate_model
from tapework.io import atomic_directory, atomic_write_bytes, write_json
from tapework.loop import TaskSpec, outputs_in_target_units, task_spec
from tapework.models import parameter_count, trainable_parameter_count
from tapework.preprocess import Prepared
from tapework.provenance import package_versions
from tapework.shards import RECORD_KEY
from tapework.serving import (
    CARD_FILE,
    CARD_FORMAT,
    INPUT_NAME,
    SAVED_MODEL_DIR,
    SIGNATURE_KEY,
    TFLITE_FILE,
    ServingModel,
    listed_files,
    output_names,
    run_tflite,
)

log = logging.getLogger(__name__)

EXTREMES_CHUNK_ROWS = 65_536  # training examples per read when the card's value range is measured

# Parity gates, checked on the whole test split before anything is written. Differences are
# absolute, in probability (classification) or in units of the target's standard deviation
# (regression). Measured: the SavedModel matches the evaluation routine bit for bit (0.0); TFLite
# (XNNPACK kernels) differs by a few 1e-7.
PARITY_TOLERANCE = 1e-5
# TFLite may flip the class of an example whose top two probabilities tie within its rounding.
MIN_TFLITE_AGREEMENT = 0.999
# SavedModel writes a random UUID into this file on every save; loading does not need it, and
# without it two exports of the same weights are byte-identical.
FINGERPRINT_FILE = "fingerprint.pb"


class ExportError(DataError):
    """The exported model does not reproduce the evaluated one; nothing was written."""


def check_model_matches_data(config: dict[str, Any], meta: dict[str, Any], models_dir: Path) -> None:
    """Refuse a model trained on other data than the prepared folder the card would describe.

    The model carries the input shape, output count and standardisation statistics of the data it
    was trained on; the statistics come from the training split, so other data (another data
    set, or the same one split or subsampled otherwise) shows in them.
    """
    spec = task_spec(meta)
    normalization = meta["normalization"]
    expected = {
        "input_shape": list(meta["input_shape"]),
        "outputs": spec.outputs,
        "offset": np.asarray(normalization["offset"], np.float32).tolist(),
        "scale": np.asarray(normalization["scale"], np.float32).tolist(),
    }
    for key, value in expected.items():
        if config.get(key) != value:
            raise DataError(f"{models_dir} holds a model trained on other data ({key} {config.get(key)}) than the prepared {meta['dataset']} data ({key} {value}): re-run the train stage (dvc repro)")


def _tf_variable(variable: Any) -> tf.Variable:
    """The tf.Variable behind a Keras variable."""
    value = getattr(variable, "value", variable)
    if not isinstance(value, tf.Variable):
        raise TypeError(f"model variable {variable.name} is not backed by a tf.Variable ({type(value).__name__})")
    return value


class ServingModule(tf.Module):
    """What the SavedModel holds: the serving function and the tf.Variables it reads, nothing else."""

    def __init__(self, model: keras.Model, spec: TaskSpec, input_shape: tuple[int, ...], image: bool) -> None:
        super().__init__(name="tapework_serving")
        signature = tf.TensorSpec([None, *input_shape], tf.uint8 if image else tf.float32, name=INPUT_NAME)

        @tf.autograph.experimental.do_not_convert  # no tensor control flow: skip AutoGraph's rewrite (see loop.plain_graph)
        def serve(inputs: tf.Tensor) -> dict[str, tf.Tensor]:
            outputs = outputs_in_target_units(spec, model(inputs, training=False))
            if spec.task == "classification":
                # argmax of the logits, as the evaluate stage takes it (the probabilities can round to a tie).
                return {"probabilities": tf.nn.softmax(outputs), "class_index": tf.argmax(outputs, axis=-1, output_type=tf.int64)}
            return {"prediction": outputs}

        self.serve = tf.function(serve, input_signature=[signature])
        # Track the plain tf.Variables the function reads. Tracked through Keras' variable wrappers
        # (the Keras model as an attribute), TFLite's converter keeps them as resource variables
        # instead of freezing them into constants, and the flat buffer then returns NaN (measured).
        self.model_variables = [_tf_variable(variable) for variable in model.variables]


def input_spec(data: Prepared) -> dict[str, Any]:
    """Shape, dtype and value range of the raw input, as the card states them."""
    meta = data.meta
    image = input_dtype(data) == np.uint8
    # Per-feature (tabular) or overall (image) minimum and maximum of the training inputs, read in chunks.
    low = high = None
    for inputs, _ in data.chunks("train", EXTREMES_CHUNK_ROWS):
        inputs = inputs.reshape(len(inputs), -1) if image else inputs
        low = inputs.min(axis=0) if low is None else np.minimum(low, inputs.min(axis=0))
        high = inputs.max(axis=0) if high is None else np.maximum(high, inputs.max(axis=0))
    spec: dict[str, Any] = {
        "name": INPUT_NAME,
        "kind": "image" if image else "tabular",
        "shape": [None, *meta["input_shape"]],
        "dtype": str(input_dtype(data)),
        "normalization": f"{meta['normalization']['method']}, applied inside the model: pass raw values",
    }
    if image:
        spec["layout"] = "NHWC"
        # The pixel values the model saw in training: digits are 0-16, the IDX and CIFAR sets 0-255.
        spec["value_range"] = [int(low.min()), int(high.max())]
    else:
        spec["feature_names"] = list(meta["feature_names"] or [])
        spec["value_range"] = [[float(lowest), float(highest)] for lowest, highest in zip(low, high)]
    return spec


def input_dtype(data: Prepared) -> np.dtype:
    """The prepared inputs' dtype: uint8 images or float32 features."""
    return np.dtype(data.meta[RECORD_KEY]["input_dtype"]) if data.sharded else data.split("train")[0].dtype


def output_spec(spec: TaskSpec) -> dict[str, Any]:
    if spec.task == "classification":
        return {
            "probabilities": {"shape": [None, spec.num_classes], "dtype": "float32", "meaning": "softmax over class_names, in order"},
            "class_index": {"shape": [None], "dtype": "int64", "meaning": "index into class_names of the most probable class"},
        }
    return {"prediction": {"shape": [None], "dtype": "float32", "meaning": "the target, in the units `target` names"}}


def target_description(dataset: str, task: str, csv_target: str) -> dict[str, Any] | None:
    """Regression: what the prediction is, from the catalogue (a user CSV: its target column)."""
    if task != "regression":
        return None
    entry = catalogue.DATASETS[dataset]
    if entry.format == "csv":
        return {"name": csv_target, "units": "as in the CSV's target column"}
    return {"name": entry.target_name, "units": entry.target_units}


def evaluated(model: keras.Model, data: Prepared, batch_size: int, huber_delta: float) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The evaluate stage's test metrics and its per-example outputs on the test split, as serving outputs."""
    outcome = evaluate_model(model, data, batch_size, huber_delta)
    if outcome.task == "classification":
        return outcome.results, {"probabilities": tf.nn.softmax(outcome.outputs).numpy(), "class_index": outcome.predicted}
    return outcome.results, {"prediction": outcome.outputs}


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], task: str, target_scale: float) -> dict[str, float]:
    """Largest absolute difference (probabilities, or predictions in target-scale units) and class agreement."""
    if task == "classification":
        return {
            "max_abs_difference": float(np.max(np.abs(candidate["probabilities"] - reference["probabilities"]))),
            "class_index_agreement": float(np.mean(candidate["class_index"] == reference["class_index"])),
        }
    return {"max_abs_difference": float(np.max(np.abs(candidate["prediction"] - reference["prediction"])) / target_scale)}


def check_parity(name: str, measured: dict[str, float], min_agreement: float) -> None:
    if not measured["max_abs_difference"] <= PARITY_TOLERANCE:
        raise ExportError(f"the {name} differs from the evaluated model by {measured['max_abs_difference']:.3g} on the test split (allowed {PARITY_TOLERANCE:g}); nothing was exported")
    agreement = measured.get("class_index_agreement", 1.0)
    if agreement < min_agreement:
        raise ExportError(f"the {name} agrees with the evaluated model's class on {agreement:.2%} of the test split (needs {min_agreement:.1%}); nothing was exported")


def export_model(
    model: keras.Model,
    config: dict[str, Any],
    data: Prepared,
    directory: str | Path,
    *,
    batch_size: int,
    huber_delta: float,
    csv_target: str,
    training: dict[str, Any],
) -> dict[str, Any]:
    """Write SavedModel, TFLite file and card into `directory` as one all-or-nothing folder; returns the card.

    `training` says where the model came from (data, params and weights hashes, seed): the card's `training`.
    """
    meta = data.meta
    spec = task_spec(meta)
    image = input_dtype(data) == np.uint8
    test_metrics, reference = evaluated(model, data, batch_size, huber_delta)
    x_test = data.split("test")[0]
    card: dict[str, Any] = {
        "format": CARD_FORMAT,
        "dataset": meta["dataset"],
        "task": spec.task,
        "input": input_spec(data),
        "outputs": output_spec(spec),
        "class_names": list(meta["class_names"]) if spec.task == "classification" else None,
        "target": target_description(meta["dataset"], spec.task, csv_target),
        "model": {
            "family": config["model"],
            "settings": config["settings"],
            "parameters": parameter_count(model),
            "trainable_parameters": trainable_parameter_count(model),
        },
        "training": training,
        "test_metrics": test_metrics,
        "serving": {"saved_model": SAVED_MODEL_DIR, "signature": SIGNATURE_KEY, "input": INPUT_NAME, "outputs": list(output_names(spec.task)), "tflite": TFLITE_FILE, "batch_size": batch_size},
        "packages": package_versions(),
    }
    with atomic_directory(directory) as temp:
        module = ServingModule(model, spec, tuple(meta["input_shape"]), image)
        saved_dir = temp / SAVED_MODEL_DIR
        tf.saved_model.save(module, str(saved_dir), signatures={SIGNATURE_KEY: module.serve})
        (saved_dir / FINGERPRINT_FILE).unlink(missing_ok=True)
        flat_buffer = tf.lite.TFLiteConverter.from_saved_model(str(saved_dir), signature_keys=[SIGNATURE_KEY]).convert()
        atomic_write_bytes(temp / TFLITE_FILE, flat_buffer)
        card["files"] = listed_files(temp)
        # Load both back as a user would and hold them against the evaluation routine.
        served = ServingModel(temp, card)(x_test)
        saved_parity = compare(reference, served, spec.task, spec.target_scale)
        check_parity("SavedModel", saved_parity, 1.0)
        tflite_parity = compare(served, run_tflite(temp / TFLITE_FILE, x_test), spec.task, spec.target_scale)
        check_parity("TFLite model", tflite_parity, MIN_TFLITE_AGREEMENT)
        card["parity"] = {
            "examples": len(x_test),
            "saved_model_vs_evaluation": saved_parity,
            "tflite_vs_saved_model": tflite_parity,
            "tolerance": PARITY_TOLERANCE,
        }
        write_json(temp / CARD_FILE, card)
    log.info("export: parity on %d test examples: SavedModel %s, TFLite %s", len(x_test), saved_parity, tflite_parity)
    return card
