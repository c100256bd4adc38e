"""params.yaml -> validated, frozen dataclasses.

Every stage loads the *whole* file through :func:`load_params` before it does any work,
so a typo or an out-of-range value anywhere fails fast, names the key, the value and
what is allowed, and no output file is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Data sets the pipeline knows, with their task. `csv` takes its task from download.csv.task.
DATASET_TASKS: dict[str, str | None] = {
    "digits": "classification",  # scikit-learn's bundled 8x8 digits: offline default
    "diabetes": "regression",  # scikit-learn's bundled diabetes: offline regression
    "mnist": "classification",
    "fashion_mnist": "classification",
    "cifar10": "classification",
    "california_housing": "regression",
    "csv": None,
}
# Image data sets and their (height, width, channels): the only ones cnn / vit accept.
IMAGE_SHAPES = {"digits": (8, 8, 1), "mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}

# Which tasks each model family can be trained for.
MODEL_TASKS: dict[str, tuple[str, ...]] = {
    "mlp": ("classification", "regression"),
    "residual_mlp": ("classification",),
    "cnn": ("classification",),
    "vit": ("classification",),
}
IMAGE_MODELS = {"cnn", "vit"}
CLASSIFICATION_MONITORS = ("val_loss", "val_accuracy", "val_huber")
REGRESSION_MONITORS = ("val_loss", "val_mae", "val_rmse", "val_r2", "val_huber")


class ParamsError(ValueError):
    """A params.yaml problem: the message names the key, the value and the fix."""


def _spec(default: Any = dataclasses.MISSING, *, factory: Any = None, **rules: Any) -> Any:
    """A dataclass field carrying its validation rules (choices, min, max, ...) as metadata."""
    if factory is not None:
        return field(default_factory=factory, metadata=rules)
    return field(default=default, metadata=rules)


@dataclass(frozen=True)
class CsvParams:
    path: str = _spec("", help="local path, file:// or http(s):// URL of a CSV file")
    target: str = _spec("target", nonempty=True)
    task: str = _spec("classification", choices=("classification", "regression"))
    sha256: str = _spec("", sha256=True, help="optional pin; required for http(s) URLs")


@dataclass(frozen=True)
class DownloadParams:
    dataset: str = _spec("digits", choices=tuple(DATASET_TASKS))
    mirror: str = _spec("", help="base URL or folder replacing the canonical host; env TAPEWORK_MIRROR wins")
    retries: int = _spec(4, min=0, max=20)
    backoff_seconds: float = _spec(1.0, min=0.0, max=60.0)
    timeout_seconds: float = _spec(30.0, min=0.1, max=600.0, min_exclusive=False)
    csv: CsvParams = _spec(factory=CsvParams)


@dataclass(frozen=True)
class PreprocessParams:
    seed: int = _spec(42, min=0, max=2**31 - 1)
    val_fraction: float = _spec(0.1, min=0.0, max=1.0, min_exclusive=True, max_exclusive=True)
    test_fraction: float = _spec(0.2, min=0.0, max=1.0, min_exclusive=True, max_exclusive=True)
    normalization: str = _spec("standard", choices=("standard", "minmax", "none"))
    max_train_examples: int = _spec(0, min=0, help="0 keeps every training example")


@dataclass(frozen=True)
class EarlyStoppingParams:
    monitor: str = _spec("val_loss", choices=tuple(dict.fromkeys(CLASSIFICATION_MONITORS + REGRESSION_MONITORS)))
    patience: int = _spec(0, min=0, help="0 turns early stopping off")
    min_delta: float = _spec(0.0, min=0.0)
    restore_best: bool = _spec(True)


@dataclass(frozen=True)
class MlpParams:
    hidden_units: tuple[int, ...] = _spec((128, 64), each_min=1, nonempty=True)
    dropout: float = _spec(0.1, min=0.0, max=1.0, max_exclusive=True)


@dataclass(frozen=True)
class ResidualMlpParams:
    width: int = _spec(256, min=1)
    blocks: int = _spec(2, min=0)
    head_units: tuple[int, ...] = _spec((64, 32), each_min=1)
    dropout: float = _spec(0.0, min=0.0, max=1.0, max_exclusive=True)


@dataclass(frozen=True)
class CnnParams:
    filters: tuple[int, ...] = _spec((32, 64), each_min=1, nonempty=True)
    kernel_size: int = _spec(3, min=1)
    dense_units: int = _spec(128, min=1)
    dropout: float = _spec(0.25, min=0.0, max=1.0, max_exclusive=True)


@dataclass(frozen=True)
class VitParams:
    patch_size: int = _spec(4, min=1)
    embed_dim: int = _spec(64, min=1)
    num_heads: int = _spec(4, min=1)
    num_blocks: int = _spec(2, min=1)
    mlp_dim: int = _spec(128, min=1)
    dropout: float = _spec(0.1, min=0.0, max=1.0, max_exclusive=True)


@dataclass(frozen=True)
class TrainParams:
    seed: int = _spec(42, min=0, max=2**31 - 1)
    model: str = _spec("mlp", choices=tuple(MODEL_TASKS))
    mlp: MlpParams = _spec(factory=MlpParams)
    residual_mlp: ResidualMlpParams = _spec(factory=ResidualMlpParams)
    cnn: CnnParams = _spec(factory=CnnParams)
    vit: VitParams = _spec(factory=VitParams)
    epochs: int = _spec(10, min=1, max=100_000)
    batch_size: int = _spec(64, min=1)
    drop_remainder: bool = _spec(False)
    optimizer: str = _spec("adam", choices=("adam", "adamw", "sgd"))
    learning_rate: float = _spec(0.001, min=0.0, max=10.0, min_exclusive=True)
    momentum: float = _spec(0.9, min=0.0, max=1.0, max_exclusive=True)
    weight_decay: float = _spec(0.0, min=0.0, max=1.0)
    l2: float = _spec(0.0, min=0.0, max=1.0)
    schedule: str = _spec("constant", choices=("constant", "cosine", "exponential", "step"))
    warmup_epochs: int = _spec(0, min=0)
    decay_rate: float = _spec(0.5, min=0.0, max=1.0, min_exclusive=True)
    decay_epochs: int = _spec(1, min=1)
    min_learning_rate: float = _spec(0.0, min=0.0)
    clip_norm: float = _spec(0.0, min=0.0, help="0 turns global-norm clipping off")
    label_smoothing: float = _spec(0.0, min=0.0, max=1.0, max_exclusive=True)
    huber_delta: float = _spec(1.0, min=0.0, min_exclusive=True)
    early_stopping: EarlyStoppingParams = _spec(factory=EarlyStoppingParams)
    steps_per_execution: int = _spec(1, min=1, max=10_000)
    jit_compile: bool | str = _spec("auto", choices=("auto",), help="true, false or auto (see TrainParams.use_xla)")
    mixed_precision: bool = _spec(False)
    on_nonfinite: str = _spec("error", choices=("error", "skip"))
    distribute: str = _spec("none", choices=("none", "mirrored", "multi_worker"))
    checkpoint_every: int = _spec(1, min=1)
    tensorboard: bool = _spec(True)
    histogram_every: int = _spec(1, min=0, help="epochs between weight histograms; 0 turns them off")

    def use_xla(self) -> bool:
        """Whether train steps are XLA-compiled: `jit_compile` resolved, `auto` by measurement.

        `auto` compiles the single-device step of the MLP families, where fusing the optimizer
        and metric updates pays (README, Performance). Not cnn: XLA has no deterministic max-pool
        gradient, and op determinism is always on. Not vit: slower compiled on CPU (6.4 s against
        3.9 s per 100 steps, measured). Not under a strategy, where only the forward and backward
        pass would be compiled, which changes the numbers the distributed tests compare.
        """
        if self.jit_compile == "auto":
            return self.model in ("mlp", "residual_mlp") and self.distribute == "none"
        return bool(self.jit_compile)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = _spec(256, min=1)


@dataclass(frozen=True)
class Params:
    download: DownloadParams = _spec(factory=DownloadParams)
    preprocess: PreprocessParams = _spec(factory=PreprocessParams)
    train: TrainParams = _spec(factory=TrainParams)
    evaluate: EvaluateParams = _spec(factory=EvaluateParams)

    def task(self) -> str:
        """`classification` or `regression` for the configured data set."""
        return DATASET_TASKS[self.download.dataset] or self.download.csv.task

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


def to_plain(value: Any) -> Any:
    """Dataclass tree -> plain dict/list/scalars (tuples become lists), for JSON and hashing."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    return value


def _describe(value: Any) -> str:
    return repr(value) if not isinstance(value, str) else f"'{value}'"


def _fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ParamsError(f"params.yaml: {key} = {_describe(value)} is invalid: {allowed}. Fix `{key}` in params.yaml.")


def _check_number(key: str, value: Any, kind: type, rules: dict[str, Any]) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(key, value, f"expected {'an integer' if kind is int else 'a number'}")
    if kind is int and not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            _fail(key, value, "expected an integer")
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            _fail(key, value, "expected a finite number")
    low, high = rules.get("min"), rules.get("max")
    low_open, high_open = rules.get("min_exclusive", False), rules.get("max_exclusive", False)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lower = "" if low is None else f"{'>' if low_open else '>='} {low}"
        upper = "" if high is None else f"{'<' if high_open else '<='} {high}"
        _fail(key, value, "must be " + " and ".join(part for part in (lower, upper) if part))
    return value


def _check_value(key: str, value: Any, annotation: Any, rules: dict[str, Any]) -> Any:
    if annotation == bool | str:  # a switch with named modes besides true/false (e.g. jit_compile: auto)
        if not isinstance(value, bool) and value not in rules["choices"]:
            _fail(key, value, f"expected true, false or {' or '.join(rules['choices'])}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            _fail(key, value, "expected true or false")
        return value
    if annotation in (int, float):
        return _check_number(key, value, annotation, rules)
    if annotation is str:
        if value is None:
            value = ""
        if not isinstance(value, str):
            _fail(key, value, "expected a string")
        if "choices" in rules and value not in rules["choices"]:
            hint = difflib.get_close_matches(value, rules["choices"], n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            _fail(key, value, f"must be one of {', '.join(rules['choices'])}{suggestion}")
        if rules.get("nonempty") and not value:
            _fail(key, value, "must not be empty")
        if rules.get("sha256") and value and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
            _fail(key, value, "must be empty or 64 lowercase hexadecimal digits (a SHA-256)")
        return value
    if typing.get_origin(annotation) is tuple:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            _fail(key, value, "expected a list of integers, e.g. [128, 64]")
        if rules.get("nonempty") and not value:
            _fail(key, value, "must hold at least one entry")
        item_rules = {"min": rules.get("each_min")}
        return tuple(_check_number(f"{key}[{index}]", item, int, item_rules) for index, item in enumerate(value))
    if dataclasses.is_dataclass(annotation):
        return build_section(annotation, value, key)
    raise TypeError(f"unsupported params annotation {annotation!r} for {key}")  # a bug here, not a user error


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    """Validate one mapping against a params dataclass: unknown keys, types, ranges."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        _fail(prefix or "params.yaml", raw, "expected a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            suggestion = f" Did you mean `{_join(prefix, hint[0])}`?" if hint else ""
            raise ParamsError(
                f"params.yaml: unknown key `{_join(prefix, str(key))}`.{suggestion} "
                f"Allowed keys{f' in `{prefix}`' if prefix else ''}: {', '.join(fields)}."
            )
    values = {}
    for name, spec in fields.items():
        if name in raw:
            values[name] = _check_value(_join(prefix, name), raw[name], hints[name], dict(spec.metadata))
    return cls(**values)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _cross_check(params: Params) -> None:
    """Rules that span keys or sections."""
    task = params.task()
    train = params.train
    dataset = params.download.dataset
    if dataset == "csv" and not params.download.csv.path:
        _fail("download.csv.path", "", "the csv data set needs a path or URL")
    if task not in MODEL_TASKS[train.model]:
        _fail(
            "train.model",
            train.model,
            f"it is a {'/'.join(MODEL_TASKS[train.model])} model but data set '{dataset}' is a {task} task; "
            f"use one of {', '.join(m for m, tasks in MODEL_TASKS.items() if task in tasks)}",
        )
    if train.model in IMAGE_MODELS and dataset not in IMAGE_SHAPES:
        _fail("train.model", train.model, f"it needs image data but '{dataset}' is tabular; use mlp or residual_mlp")
    if train.model == "vit":
        if train.vit.embed_dim % train.vit.num_heads:
            _fail("train.vit.num_heads", train.vit.num_heads, f"must divide train.vit.embed_dim = {train.vit.embed_dim}")
        height, width, _ = IMAGE_SHAPES[dataset]
        if height % train.vit.patch_size or width % train.vit.patch_size:
            _fail("train.vit.patch_size", train.vit.patch_size, f"must divide the {height}x{width} images of '{dataset}'")
    monitors = CLASSIFICATION_MONITORS if task == "classification" else REGRESSION_MONITORS
    if train.early_stopping.monitor not in monitors:
        _fail("train.early_stopping.monitor", train.early_stopping.monitor, f"for a {task} task use one of {', '.join(monitors)}")
    if task == "regression" and train.label_smoothing:
        _fail("train.label_smoothing", train.label_smoothing, "label smoothing only applies to classification; set 0")
    if train.optimizer != "adamw" and train.weight_decay:
        _fail("train.weight_decay", train.weight_decay, "decoupled weight decay needs optimizer: adamw (use train.l2 for others)")
    if train.warmup_epochs >= train.epochs and train.warmup_epochs:
        _fail("train.warmup_epochs", train.warmup_epochs, f"must be smaller than train.epochs = {train.epochs}")
    if train.min_learning_rate > train.learning_rate:
        _fail("train.min_learning_rate", train.min_learning_rate, f"must not exceed train.learning_rate = {train.learning_rate}")
    if train.distribute != "none" and train.clip_norm:
        _fail("train.clip_norm", train.clip_norm, "clipping is not replica-safe in Keras 3 (it clips each replica's partial gradient); set 0 with train.distribute")
    if train.jit_compile is True and train.model == "cnn":
        _fail("train.jit_compile", True, "XLA has no deterministic max-pool gradient (cnn) and op determinism is always on; use auto or false")
    if train.distribute != "none" and train.mixed_precision:
        _fail("train.mixed_precision", train.mixed_precision, "loss scaling is not replica-safe in Keras 3; set false with train.distribute")
    if params.preprocess.max_train_examples and params.preprocess.max_train_examples < 2:
        _fail("preprocess.max_train_examples", params.preprocess.max_train_examples, "must be 0 (all) or at least 2")


def parse_params(raw: Any) -> Params:
    """Validate an already-parsed params mapping (the whole file)."""
    params = build_section(Params, raw, "")
    _cross_check(params)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raises ParamsError with a one-line fix on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found. Run the stage from the project root, where params.yaml lives.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML ({error}). Fix the syntax.") from None
    return parse_params(raw)
