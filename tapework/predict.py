"""Run an exported model on files: `python -m tapework.predict PATH [PATH ...] [--model DIR] [--top-k K] [--output FILE.csv|FILE.json]`
(also installed as the `tapework-predict` command).

PATH is a PNG or JPEG image, a folder of them, or (for a model trained on feature rows) a CSV
file whose header names exactly the training feature columns. Predictions come from the
SavedModel's serving signature, so they equal what the evaluate stage computes for the same
input. Inputs are checked against the model card first: image size and channels (or --resize),
pixel value range (or --rescale), CSV column names, and numbers in every cell. A problem is one
line on stderr and exit code 2; an --output file is written whole or not at all.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tapework.lean_import import skip_keras_extras

skip_keras_extras()  # before TensorFlow loads, as in every stage process: a user command pays the import each time

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402
import yaml  # noqa: E402

from tapework import catalogue  # noqa: E402
from tapework.cli import run_stage  # noqa: E402
from tapework.errors import DataError  # noqa: E402
from tapework.io import atomic_write_text  # noqa: E402
from tapework.serving import ServingModel, read_card  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG: what the first bytes must be
OUTPUT_FORMATS = (".csv", ".json")
# Where the model folder is when --model is not given: the export stage's `--export` argument in ./dvc.yaml.
DVC_FILE = Path("dvc.yaml")
EXPORT_STAGE, EXPORT_OPTION = "export", "--export"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tapework.predict",
        description="Predict with an exported tapework model (the export stage's SavedModel) on PNG/JPEG images, folders of them, or a CSV of feature rows.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="PATH", help="image file, folder of images, or CSV file")
    parser.add_argument("--model", type=Path, help="exported model folder (default: the export stage's folder in ./dvc.yaml)")
    parser.add_argument("--top-k", type=int, default=1, metavar="K", help="classes per input, most probable first (classification; default 1)")
    parser.add_argument("--output", type=Path, metavar="FILE", help="write the predictions to FILE.csv or FILE.json instead of printing a table")
    parser.add_argument("--rescale", action="store_true", help="map 0-255 pixel values onto the model's training range (the digits model was trained on 0-16)")
    parser.add_argument("--resize", action="store_true", help="convert images of another size or channel count to the model's (bilinear, antialiased; RGB to grayscale)")
    parser.add_argument("--dataset", choices=tuple(catalogue.DATASETS), help="refuse a model trained on any other data set")
    return parser.parse_args(argv)


def default_model_dir() -> Path:
    """The export stage's output folder, as ./dvc.yaml names it."""
    if not DVC_FILE.is_file():
        raise DataError(f"no --model given and no {DVC_FILE} in this folder to find the export stage's output: pass --model DIR")
    stage = (yaml.safe_load(DVC_FILE.read_text()) or {}).get("stages", {}).get(EXPORT_STAGE)
    words = shlex.split(stage["cmd"]) if isinstance(stage, dict) and "cmd" in stage else []
    if EXPORT_OPTION not in words[:-1]:
        raise DataError(f"no --model given and {DVC_FILE} has no `{EXPORT_STAGE}` stage with {EXPORT_OPTION} PATH: pass --model DIR")
    return Path(words[words.index(EXPORT_OPTION) + 1])


# --------------------------------------------------------------------------- images


def image_files(paths: list[Path]) -> list[Path]:
    """Each PATH that is a file, and the PNG/JPEG files (by suffix, sorted) of each folder."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(child for child in path.iterdir() if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{path} holds no PNG or JPEG files ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path} does not exist")
    return files


def _describe_shape(shape: tuple[int, ...]) -> str:
    height, width, channels = shape
    return f"{height}x{width} pixels with {channels} channel{'s' if channels != 1 else ''}"


def _convert_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """Gray(+alpha) / RGB(A) -> `channels` (1 or 3), dropping alpha."""
    have = int(image.shape[-1])
    color = image[..., :3] if have >= 3 else image[..., :1]  # alpha is the last channel of 2 and 4
    if channels == 1 and color.shape[-1] == 3:
        return tf.image.rgb_to_grayscale(color)
    if channels == 3 and color.shape[-1] == 1:
        return tf.image.grayscale_to_rgb(color)
    return color


def load_image(path: Path, shape: tuple[int, int, int], resize: bool) -> np.ndarray:
    """One image as uint8 [H, W, C] of the model's shape; another shape is an error unless `resize`."""
    data = path.read_bytes()
    if not data.startswith(IMAGE_SIGNATURES):
        raise DataError(f"{path} is not a PNG or JPEG image")
    try:
        image = tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)
    except (tf.errors.InvalidArgumentError, ValueError) as error:
        raise DataError(f"{path} could not be decoded as PNG or JPEG ({str(error).splitlines()[0]})") from None
    if tuple(image.shape) == shape:
        return image.numpy()
    if not resize:
        raise DataError(f"{path} is {_describe_shape(tuple(image.shape))}; the model takes {_describe_shape(shape)} (shape {list(shape)}): pass --resize to convert it")
    image = _convert_channels(image, shape[2])
    resized = tf.image.resize(tf.cast(image, tf.float32), shape[:2], method="bilinear", antialias=True)
    return np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)


def load_images(files: list[Path], card: dict[str, Any], rescale: bool, resize: bool) -> np.ndarray:
    """uint8 [N, H, W, C] in the card's value range; a file outside it is refused unless `rescale`."""
    shape = tuple(card["input"]["shape"][1:])
    low, high = card["input"]["value_range"]
    images = []
    for path in files:
        image = load_image(path, shape, resize)
        if rescale:
            # 0-255 onto [low, high], rounded to the integer levels the model was trained on.
            image = np.round(low + image.astype(np.float64) * (high - low) / 255).astype(np.uint8)
        elif image.min() < low or image.max() > high:
            raise DataError(
                f"{path} has pixel values {image.min()}-{image.max()}, but the model was trained on {low}-{high}: "
                f"pass --rescale to map 0-255 onto {low}-{high}"
            )
        images.append(image)
    return np.stack(images)


# --------------------------------------------------------------------------- CSV rows


def read_rows(path: Path, feature_names: list[str]) -> np.ndarray:
    """float32 [N, F] from a CSV whose header holds exactly the training feature columns (any order)."""
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file: the model takes feature rows from a CSV file")
    if path.suffix.lower() != ".csv":
        raise DataError(f"{path}: the model takes feature rows from a CSV file with columns {', '.join(feature_names)}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty: expected a header with columns {', '.join(feature_names)}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not a readable CSV file ({str(error).splitlines()[0]})") from None
    columns = [str(column) for column in frame.columns]
    missing = [name for name in feature_names if name not in columns]
    extra = [name for name in columns if name not in feature_names]
    if missing or extra:
        problems = [f"missing column(s) {', '.join(missing)}" if missing else "", f"unexpected column(s) {', '.join(extra)}" if extra else ""]
        raise DataError(f"{path}: {'; '.join(p for p in problems if p)}; the model takes exactly: {', '.join(feature_names)}")
    if frame.empty:
        raise DataError(f"{path} has a header but no rows")
    values = np.empty((len(frame), len(feature_names)), dtype=np.float32)
    for index, name in enumerate(feature_names):
        column = frame[name].str.strip()
        numbers = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(numbers))
        if len(bad):
            row, text = bad[0], column.iloc[bad[0]]
            if text == "":
                why = "is empty"
            elif math.isnan(numbers[row]) and text.lower() != "nan":
                why = f"'{text}' is not a number"
            else:
                why = f"'{text}' is not a finite number"
            raise DataError(f"{path} row {row + 1}, column '{name}': {why}")
        values[:, index] = numbers
    return values


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Prediction:
    source: str  # the image file, or the CSV file
    row: int | None  # CSV: data row, from 1
    ranked: list[tuple[int, str, float]]  # classification: (class index, name, probability), most probable first
    value: float | None  # regression: the prediction in the target's units


def rank(card: dict[str, Any], outputs: dict[str, np.ndarray], sources: list[tuple[str, int | None]], top_k: int) -> list[Prediction]:
    if card["task"] != "classification":
        return [Prediction(source, row, [], float(value)) for (source, row), value in zip(sources, outputs["prediction"])]
    names = card["class_names"]
    predictions = []
    for (source, row), probabilities, best in zip(sources, outputs["probabilities"], outputs["class_index"]):
        # Stable sort keeps the lower index first on equal probabilities; the top class is the signature's own.
        order = [int(best)] + [int(index) for index in np.argsort(-probabilities, kind="stable") if index != best]
        predictions.append(Prediction(source, row, [(index, names[index], float(probabilities[index])) for index in order[:top_k]], None))
    return predictions


def to_records(predictions: list[Prediction]) -> list[dict[str, Any]]:
    """One flat record per (input, rank): the rows of the CSV output and the table."""
    records = []
    for prediction in predictions:
        base: dict[str, Any] = {"file": prediction.source}
        if prediction.row is not None:
            base["row"] = prediction.row
        if prediction.value is not None:
            records.append({**base, "prediction": prediction.value})
        for position, (index, name, probability) in enumerate(prediction.ranked, start=1):
            records.append({**base, "rank": position, "class_index": index, "class": name, "probability": probability})
    return records


def format_table(predictions: list[Prediction], card: dict[str, Any], top_k: int) -> str:
    frame = pd.DataFrame(to_records(predictions))
    if "probability" in frame:
        frame["probability"] = frame["probability"].map(lambda value: f"{value:.4f}")
        frame = frame.drop(columns=["class_index"] + ([] if top_k > 1 else ["rank"]))
    else:
        target = card["target"] or {}
        frame = frame.rename(columns={"prediction": f"{target.get('name') or 'prediction'} ({target.get('units') or 'target units'})"})
    return frame.to_string(index=False)


def render_output(path: Path, predictions: list[Prediction], card: dict[str, Any]) -> str:
    records = to_records(predictions)
    if path.suffix.lower() == ".json":
        document = {"dataset": card["dataset"], "task": card["task"], "target": card["target"], "predictions": records}
        return json.dumps(document, indent=2) + "\n"
    buffer = io.StringIO()
    pd.DataFrame(records).to_csv(buffer, index=False, lineterminator="\n")
    return buffer.getvalue()


# --------------------------------------------------------------------------- the command


def predict_files(args: argparse.Namespace) -> None:
    if args.output is not None and args.output.suffix.lower() not in OUTPUT_FORMATS:
        raise DataError(f"--output {args.output}: name a .csv or .json file")
    model_dir = args.model if args.model is not None else default_model_dir()
    card = read_card(model_dir)
    if args.dataset is not None and card["dataset"] != args.dataset:
        raise DataError(f"{model_dir} holds a model trained on {card['dataset']}, not {args.dataset}: pass --model the folder exported from a {args.dataset} run")
    classes = len(card["class_names"] or [])
    if card["task"] == "classification" and not 1 <= args.top_k <= classes:
        raise DataError(f"--top-k {args.top_k}: the model has {classes} classes; choose 1 to {classes}")
    if card["task"] != "classification" and args.top_k != 1:
        raise DataError("--top-k applies to classification models; this one predicts a number")
    if card["input"]["kind"] == "image":
        files = image_files(args.inputs)
        inputs = load_images(files, card, args.rescale, args.resize)
        sources: list[tuple[str, int | None]] = [(str(path), None) for path in files]
    else:
        if args.rescale or args.resize:
            raise DataError("--rescale and --resize apply to image models; this one takes CSV feature rows")
        tables = [(path, read_rows(path, card["input"]["feature_names"])) for path in args.inputs]
        inputs = np.concatenate([rows for _, rows in tables])
        sources = [(str(path), row) for path, rows in tables for row in range(1, len(rows) + 1)]
    outputs = ServingModel(model_dir, card)(inputs)
    predictions = rank(card, outputs, sources, args.top_k)
    if args.output is None:
        print(format_table(predictions, card, args.top_k))
        return
    atomic_write_text(args.output, render_output(args.output, predictions, card))
    print(f"wrote {len(predictions)} prediction(s) to {args.output}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m tapework.predict` and `tapework-predict`: exits 0, or 2 with one line on stderr.
    Given `argv` (a call from Python) it ends by raising SystemExit, which the caller can catch."""
    run_stage(lambda: predict_files(parse_args(argv)), whole_process=argv is None)


if __name__ == "__main__":
    main()
