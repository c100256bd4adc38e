"""The exported model as a user runs it: the files of an export folder, its model card, the
SavedModel's serving signature and the TFLite interpreter. Nothing here builds a Keras model.

An export folder holds SAVED_MODEL_DIR (a TensorFlow SavedModel whose SIGNATURE_KEY signature
takes the raw input: uint8 images [N, H, W, C] or float32 feature rows [N, F]), TFLITE_FILE
(converted from it) and CARD_FILE (what the model is, and the SHA-256 of every other file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from tapework.errors import DataError
from tapework.io import file_digest

SAVED_MODEL_DIR = "saved_model"
TFLITE_FILE = "model.tflite"
CARD_FILE = "model_card.json"
SIGNATURE_KEY = "serving_default"
INPUT_NAME = "inputs"
CARD_FORMAT = "tapework-model-card/1"  # bumped when a reader of older cards would misread a new one


def output_names(task: str) -> tuple[str, ...]:
    """The serving signature's outputs: probabilities and class index, or the prediction in target units."""
    return ("probabilities", "class_index") if task == "classification" else ("prediction",)


def read_card(directory: str | Path) -> dict[str, Any]:
    """The model card of an export folder; a missing folder, card or foreign JSON is a DataError."""
    directory = Path(directory)
    path = directory / CARD_FILE
    if not directory.is_dir():
        raise DataError(f"{directory} is not a folder: pass --model the folder the export stage writes (dvc repro export)")
    if not path.is_file():
        raise DataError(f"{path} is missing: {directory} is not an exported model (dvc repro export writes one; dvc pull fetches one)")
    try:
        card = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error}); re-run `dvc repro export` or `dvc pull`") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise DataError(f"{path} is not a tapework model card (expected format {CARD_FORMAT}); re-run `dvc repro export`")
    return card


def verify_files(directory: str | Path, card: dict[str, Any]) -> None:
    """Every file the card lists has the SHA-256 the card records: no mixed or damaged export folder."""
    directory = Path(directory)
    for name, expected in sorted(card["files"].items()):
        path = directory / name
        if not path.is_file():
            raise DataError(f"{path} is missing but {CARD_FILE} lists it; re-run `dvc repro export` or `dvc pull`")
        if file_digest(path) != expected:
            raise DataError(f"{path} does not match the SHA-256 in {CARD_FILE}; re-run `dvc repro export` or `dvc pull`")


def listed_files(directory: str | Path) -> dict[str, str]:
    """`{relative posix path: SHA-256}` of every file under `directory` except the card itself."""
    directory = Path(directory)
    files = sorted(path for path in directory.rglob("*") if path.is_file() and path.name != CARD_FILE)
    return {path.relative_to(directory).as_posix(): file_digest(path) for path in files}


class ServingModel:
    """An export folder's SavedModel signature, run in batches of the card's batch size."""

    def __init__(self, directory: str | Path, card: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.card = card if card is not None else read_card(self.directory)
        verify_files(self.directory, self.card)
        # Keep the loaded object: the signature reads variables it owns.
        self._loaded = tf.saved_model.load(str(self.directory / SAVED_MODEL_DIR))
        self._signature = self._loaded.signatures[SIGNATURE_KEY]
        self.batch_size = int(self.card["serving"]["batch_size"])

    def __call__(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs for every row of `inputs` (the dtype and shape the card's input spec names)."""
        names = output_names(self.card["task"])
        batches = [self._signature(**{INPUT_NAME: tf.constant(inputs[start : start + self.batch_size])}) for start in range(0, len(inputs), self.batch_size)]
        return {name: np.concatenate([batch[name].numpy() for batch in batches]) for name in names}


def run_tflite(model: bytes | str | Path, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """The TFLite flat buffer's serving signature on `inputs`, with LiteRT's interpreter (ai-edge-litert).

    LiteRT is the supported successor of tf.lite.Interpreter, which TensorFlow 2.21 marks for deletion.
    """
    from ai_edge_litert.interpreter import Interpreter  # only the TFLite checks need it

    content = model if isinstance(model, bytes) else Path(model).read_bytes()
    runner = Interpreter(model_content=content).get_signature_runner(SIGNATURE_KEY)
    return {name: np.asarray(value) for name, value in runner(**{INPUT_NAME: inputs}).items()}
