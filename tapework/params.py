"""params.yaml -> validated, frozen dataclasses.

Every stage loads the *whole* file through :func:`load_params` before it does any work,
so a typo or an out-of-range value anywhere fails fast, names the key, the value and
what is allowed, and no output file is touched.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tapework import catalogue


class ParamsError(ValueError):
    """A params.yaml problem: the message names the key, the value and the fix."""


# TensorFlow sizes tensor dimensions in int32 on many paths: no count or size here needs more.
MAX_INT = 2**31 - 1
MAX_BATCH_SIZE = MAX_INT  # a batch larger than the split is one batch of the whole split


def _spec(**rules: Any) -> Any:
    """A dataclass field carrying its validation rules (choices, min, max, ...) as metadata.

    No defaults: params.yaml is the only place a value is set, so a deleted key is an error,
    never a silent fallback to a second set of defaults.
    """
    return field(metadata=rules)


@dataclass(frozen=True)
class CsvParams:
    path: str = _spec(help="local path, file:// or http(s):// URL of a CSV file")
    target: str = _spec(nonempty=True)
    task: str = _spec(choices=catalogue.TASKS)
    sha256: str = _spec(sha256=True, help="the file's pin; the download stage refuses an empty one and prints the hash to paste")


@dataclass(frozen=True)
class IdxPinsParams:
    train_images: str = _spec(sha256=True, help="SHA-256 of train-images-idx3-ubyte.gz")
    train_labels: str = _spec(sha256=True, help="SHA-256 of train-labels-idx1-ubyte.gz")
    test_images: str = _spec(sha256=True, help="SHA-256 of t10k-images-idx3-ubyte.gz")
    test_labels: str = _spec(sha256=True, help="SHA-256 of t10k-labels-idx1-ubyte.gz")


@dataclass(frozen=True)
class IdxParams:
    path: str = _spec(help="folder, file:// or http(s):// base URL holding the four canonical IDX file names")
    sha256: IdxPinsParams = _spec(help="each file's pin; the download stage refuses empty ones and prints the hashes to paste")
    class_names: tuple[str, ...] = _spec(distinct=True, help='names in label order; [] = "0".."K-1", K = largest label + 1')


@dataclass(frozen=True)
class DownloadParams:
    dataset: str = _spec(choices=tuple(catalogue.DATASETS))
    mirror: str = _spec(help="base URL or folder replacing the canonical host; env TAPEWORK_MIRROR wins")
    retries: int = _spec(min=0, max=20)
    backoff_seconds: float = _spec(min=0.0, max=60.0)
    timeout_seconds: float = _spec(min=0.1, max=600.0, min_exclusive=False)
    deadline_seconds: float = _spec(min=0.0, max=86_400.0, min_exclusive=True, help="whole download of one file, retries included")
    csv: CsvParams = _spec()
    idx: IdxParams = _spec()


@dataclass(frozen=True)
class PreprocessParams:
    seed: int = _spec(min=0, max=2**31 - 1)
    val_fraction: float = _spec(min=0.0, max=1.0, min_exclusive=True, max_exclusive=True)
    test_fraction: float = _spec(min=0.0, max=1.0, min_exclusive=True, max_exclusive=True)
    normalization: str = _spec(choices=catalogue.NORMALIZATIONS)
    max_train_examples: int = _spec(min=0, help="0 keeps every training example")
    format: str = _spec(choices=catalogue.PREPARED_FORMATS, help="arrays (whole .npy arrays), shards (streamed record files) or auto")
    shard_size: int = _spec(min=1, max=MAX_INT, help="examples per shard file")
    shards_above_mib: float = _spec(min=0.0, help="auto: shards when the inputs exceed this many MiB, arrays otherwise")


@dataclass(frozen=True)
class EarlyStoppingParams:
    monitor: str = _spec(choices=tuple(dict.fromkeys(name for names in catalogue.MONITORS.values() for name in names)))
    patience: int = _spec(min=0, help="0 turns early stopping off")
    min_delta: float = _spec(min=0.0)
    restore_best: bool = _spec()


@dataclass(frozen=True)
class MlpParams:
    hidden_units: tuple[int, ...] = _spec(each_min=1, nonempty=True)
    dropout: float = _spec(min=0.0, max=1.0, max_exclusive=True)


@dataclass(frozen=True)
class ResidualMlpParams:
    width: int = _spec(min=1)
    blocks: int = _spec(min=0)
    head_units: tuple[int, ...] = _spec(each_min=1)
    dropout: float = _spec(min=0.0, max=1.0, max_exclusive=True)


@dataclass(frozen=True)
class CnnParams:
    filters: tuple[int, ...] = _spec(each_min=1, nonempty=True)
    kernel_size: int = _spec(min=1)
    dense_units: int = _spec(min=1)
    dropout: float = _spec(min=0.0, max=1.0, max_exclusive=True)


@dataclass(frozen=True)
class VitParams:
    patch_size: int = _spec(min=1)
    embed_dim: int = _spec(min=1)
    num_heads: int = _spec(min=1)
    num_blocks: int = _spec(min=1)
    mlp_dim: int = _spec(min=1)
    dropout: float = _spec(min=0.0, max=1.0, max_exclusive=True)


@dataclass(frozen=True)
class TrainParams:
    seed: int = _spec(min=0, max=2**31 - 1)
    model: str = _spec(choices=tuple(catalogue.MODELS))
    mlp: MlpParams = _spec()
    residual_mlp: ResidualMlpParams = _spec()
    cnn: CnnParams = _spec()
    vit: VitParams = _spec()
    epochs: int = _spec(min=1, max=100_000)
    batch_size: int = _spec(min=1, max=MAX_BATCH_SIZE)
    drop_remainder: bool = _spec()
    optimizer: str = _spec(choices=catalogue.OPTIMIZERS)
    learning_rate: float = _spec(min=0.0, max=10.0, min_exclusive=True)
    momentum: float = _spec(min=0.0, max=1.0, max_exclusive=True)
    weight_decay: float = _spec(min=0.0, max=1.0)
    l2: float = _spec(min=0.0, max=1.0)
    schedule: str = _spec(choices=catalogue.SCHEDULES)
    warmup_epochs: int = _spec(min=0)
    decay_rate: float = _spec(min=0.0, max=1.0, min_exclusive=True)
    decay_epochs: int = _spec(min=1)
    min_learning_rate: float = _spec(min=0.0)
    clip_norm: float = _spec(min=0.0, help="0 turns global-norm clipping off")
    label_smoothing: float = _spec(min=0.0, max=1.0, max_exclusive=True)
    huber_delta: float = _spec(min=0.0, min_exclusive=True, help="in units of the target's scale (tapework/metrics.py, HuberMetric)")
    early_stopping: EarlyStoppingParams = _spec()
    shuffle_window: int = _spec(min=1, max=MAX_INT, help="shards: examples shuffled together per window (whole shards, at least one)")
    steps_per_execution: int = _spec(min=1, max=10_000)
    jit_compile: bool | str = _spec(choices=("auto",), help="true, false or auto (see TrainParams.use_xla)")
    jit_min_steps: int = _spec(min=0, max=MAX_INT, help="auto compiles with XLA only for runs of at least this many train steps")
    mixed_precision: bool | str = _spec(choices=("bfloat16",), help="false (float32), true (float16 with loss scaling) or bfloat16")
    on_nonfinite: str = _spec(choices=catalogue.NONFINITE_POLICIES)
    distribute: str = _spec(choices=catalogue.STRATEGIES)
    checkpoint_every: int = _spec(min=1)
    tensorboard: bool = _spec()
    histogram_every: int = _spec(min=0, help="epochs between weight histograms; 0 turns them off")

    def use_xla(self, run_steps: int) -> bool:
        """Whether train steps are XLA-compiled: `jit_compile` resolved, `auto` by measurement.

        `auto` follows the model family's catalogue entry (`ModelFamily.xla_auto`), on one device
        only (under a strategy just the forward and backward pass could be compiled, which
        changes the numbers the distributed tests compare), and only for a run of at least
        `jit_min_steps` train steps (`run_steps`: epochs x batches per epoch): XLA's compile costs
        seconds in the first epoch, more than a short run gains.
        """
        if self.jit_compile == "auto":
            return catalogue.MODELS[self.model].xla_auto and self.distribute == "none" and run_steps >= self.jit_min_steps
        return bool(self.jit_compile)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = _spec(min=1, max=MAX_BATCH_SIZE)


@dataclass(frozen=True)
class PrimaryMetricParams:
    classification: str = _spec(choices=catalogue.split_metrics("classification"))
    regression: str = _spec(choices=catalogue.split_metrics("regression"))


@dataclass(frozen=True)
class RepeatsParams:
    extra_seeds: tuple[int, ...] = _spec(each_min=0, each_max=2**31 - 1, distinct=True, help="seeds run beside train.seed")
    primary_metric: PrimaryMetricParams = _spec()


@dataclass(frozen=True)
class CheckpointsParams:
    """Retention of the per-run checkpoint folders (tapework/checkpoints.py); never part of a run's identity."""

    keep_runs: int = _spec(min=0, help="other runs' folders kept, most recently written first; 0 = no count limit")
    keep_days: float = _spec(min=0.0, max=36_500.0, help="a folder not written for longer is removed; 0 = no age limit")


@dataclass(frozen=True)
class Params:
    download: DownloadParams = _spec()
    preprocess: PreprocessParams = _spec()
    train: TrainParams = _spec()
    evaluate: EvaluateParams = _spec()
    repeats: RepeatsParams = _spec()
    checkpoints: CheckpointsParams = _spec()

    def task(self) -> str:
        """`classification` or `regression` for the configured data set."""
        return catalogue.dataset_task(self.download.dataset, self.download.csv.task)

    def seeds(self) -> tuple[int, ...]:
        """Every seed of this configuration, ascending: train.seed and repeats.extra_seeds."""
        return tuple(sorted((self.train.seed, *self.repeats.extra_seeds)))

    def primary_metric(self) -> str:
        """The metric `python -m tapework.compare` gives its verdict on, for this data set's task."""
        return getattr(self.repeats.primary_metric, self.task())

    def with_seed(self, seed: int) -> Params:
        """These params with train.seed = `seed`: one run of repeats.extra_seeds (its stages pass `--seed`)."""
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**31 - 1:
            raise ParamsError(f"--seed {seed!r} is invalid: a seed is an integer from 0 to {2**31 - 1}, like train.seed in params.yaml.")
        return dataclasses.replace(self, train=dataclasses.replace(self.train, seed=seed))

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
    if kind is int and high is None:
        high = MAX_INT
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
    if annotation == tuple[str, ...]:
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) and item for item in value):
            _fail(key, value, "expected a list of non-empty strings, e.g. [cat, dog]")
        if rules.get("distinct") and len(set(value)) != len(value):
            _fail(key, list(value), "each entry must appear once")
        return tuple(value)
    if typing.get_origin(annotation) is tuple:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            _fail(key, value, "expected a list of integers, e.g. [128, 64]")
        if rules.get("nonempty") and not value:
            _fail(key, value, "must hold at least one entry")
        item_rules = {"min": rules.get("each_min"), "max": rules.get("each_max")}
        items = tuple(_check_number(f"{key}[{index}]", item, int, item_rules) for index, item in enumerate(value))
        if rules.get("distinct") and len(set(items)) != len(items):
            _fail(key, list(value), "each entry must appear once")
        return items
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
    missing = [name for name in fields if name not in raw]
    if missing:
        keys = ", ".join(f"`{_join(prefix, name)}`" for name in missing)
        raise ParamsError(
            f"params.yaml: missing key{'s' if len(missing) > 1 else ''} {keys}. Every key must be set: "
            "copy it from the committed params.yaml (`git show HEAD:params.yaml`)."
        )
    return cls(**{name: _check_value(_join(prefix, name), raw[name], hints[name], dict(spec.metadata)) for name, spec in fields.items()})


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _cross_check(params: Params) -> None:
    """Rules that span keys or sections."""
    task = params.task()
    train = params.train
    dataset = params.download.dataset
    if dataset == "csv" and not params.download.csv.path:
        _fail("download.csv.path", "", "the csv data set needs a path or URL")
    if dataset == "idx" and not params.download.idx.path:
        _fail("download.idx.path", "", "the idx data set needs a folder or base URL holding its four IDX files")
    if len(params.download.idx.class_names) == 1:
        _fail("download.idx.class_names", list(params.download.idx.class_names), "classification needs at least two classes; give two or more names, or [] for 0..K-1")
    family, spec = catalogue.MODELS[train.model], catalogue.DATASETS[dataset]
    if task not in family.tasks:
        _fail("train.model", train.model, f"it serves {'/'.join(family.tasks)} but data set '{dataset}' is a {task} task")
    if spec.input_kind not in family.inputs:
        usable = ", ".join(name for name, other in catalogue.MODELS.items() if spec.input_kind in other.inputs)
        _fail("train.model", train.model, f"it needs {'/'.join(family.inputs)} data but '{dataset}' is {spec.input_kind}; use {usable}")
    if train.model == "vit":
        if train.vit.embed_dim % train.vit.num_heads:
            _fail("train.vit.num_heads", train.vit.num_heads, f"must divide train.vit.embed_dim = {train.vit.embed_dim}")
    if train.model == "vit" and spec.image_shape is not None:  # None: the shape is in the files' headers (idx)
        height, width, _ = spec.image_shape
        if height % train.vit.patch_size or width % train.vit.patch_size:
            _fail("train.vit.patch_size", train.vit.patch_size, f"must divide the {height}x{width} images of '{dataset}'")
    monitors = catalogue.MONITORS[task]
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
        _fail("train.clip_norm", train.clip_norm, "clipping is not replica-safe in Keras 3 (it clips each replica's partial gradient before they are summed, which is not the single-device clip); set 0 with train.distribute")
    if train.jit_compile is True and not family.xla_allowed:
        _fail("train.jit_compile", True, f"XLA cannot compile {train.model} deterministically (no deterministic max-pool gradient) and op determinism is always on; use auto or false")
    if train.distribute != "none" and train.mixed_precision is True:
        _fail("train.mixed_precision", train.mixed_precision, "loss scaling is not replica-safe in Keras 3 (LossScaleOptimizer judges overflow from the first replica's gradients only); set false with train.distribute")
    if params.download.deadline_seconds < params.download.timeout_seconds:
        _fail("download.deadline_seconds", params.download.deadline_seconds, f"must be at least download.timeout_seconds = {params.download.timeout_seconds}")
    if train.seed in params.repeats.extra_seeds:
        _fail("repeats.extra_seeds", list(params.repeats.extra_seeds), f"must not hold train.seed = {train.seed}: that run is always one of the repeats")
    if params.preprocess.max_train_examples and params.preprocess.max_train_examples < 2:
        _fail("preprocess.max_train_examples", params.preprocess.max_train_examples, "must be 0 (all) or at least 2")


def parse_params(raw: Any) -> Params:
    """Validate an already-parsed params mapping (the whole file)."""
    params = build_section(Params, raw, "")
    _cross_check(params)
    return params


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, made to read params.yaml as DVC (ruamel.yaml, YAML 1.2) reads it.

    PyYAML speaks YAML 1.1, where `1e-3` is a string, `yes`/`on` are booleans, `017` is octal and
    a duplicate key silently keeps the last value; `dvc params diff` would then show other values
    than this pipeline runs with. Here scalars resolve by YAML 1.2's rules (the same patterns as
    ruamel.yaml's) and a duplicate key is an error.
    """

    yaml_implicit_resolvers: dict[Any, Any] = {}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges may repeat keys on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # construct_mapping below reports it
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise ParamsError(
                    f"{key_node.start_mark.name}: key `{key}` is set twice (lines {first_line[key]} and {line}); "
                    "delete one of them."
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """YAML 1.2 integers: 0b, 0o and 0x prefixes; a leading zero alone is still decimal."""
        text = str(self.construct_scalar(node)).replace("_", "")
        sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.lstrip("+"))
        for prefix, base in (("0b", 2), ("0o", 8), ("0x", 16)):
            if digits.startswith(prefix):
                return sign * int(digits[2:], base)
        return sign * int(digits)


_ParamsLoader.add_constructor("tag:yaml.org,2002:int", _ParamsLoader.construct_yaml_int)
# YAML 1.2 core-schema resolvers, as ruamel.yaml (DVC's reader) writes them.
for _tag, _pattern, _first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    (
        "float",
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        "-+0123456789.",
    ),
    ("int", r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?[0-9_]+|[-+]?0x[0-9a-fA-F_]+)$", "-+0123456789"),
    ("merge", r"^(?:<<)$", "<"),
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    (
        "timestamp",
        r"""^(?:[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]
        |[0-9][0-9][0-9][0-9]-[0-9][0-9]?-[0-9][0-9]?(?:[Tt]|[ \t]+)[0-9][0-9]?:[0-9][0-9]:[0-9][0-9](?:\.[0-9]*)?
        (?:[ \t]*(?:Z|[-+][0-9][0-9]?(?::[0-9][0-9])?))?)$""",
        "0123456789",
    ),
):
    _ParamsLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern, re.X), list(_first))


def parse_yaml(text: str, name: str = "params.yaml") -> Any:
    """YAML text -> plain data, read as DVC reads params.yaml; errors are one-line ParamsErrors."""
    try:
        loader = _ParamsLoader(text)
        loader.name = name
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(error.problem or error.context or error).split())
        raise ParamsError(f"{name}: not valid YAML ({problem}{where}). Fix the syntax.") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{name}: not valid YAML ({' '.join(str(error).split())}). Fix the syntax.") from None


def read_raw(path: str | Path) -> Any:
    """params.yaml parsed but not validated (for overrides before `parse_params`)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found. Run the stage from the project root, where params.yaml lives.")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ParamsError(f"{path}: cannot read it ({error.strerror or error}). Check its permissions.") from None
    try:
        text = data.decode("utf-8")  # what DVC reads it as, whatever the locale
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ParamsError(
            f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}). Save it as UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8`), or remove that character."
        ) from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raise ParamsError(f"{path}: empty (no keys at all). Restore it: `git checkout {path}`.")
    return raw


def with_overrides(raw: Any, changes: dict[str, Any]) -> Any:
    """A copy of a parsed params mapping with dotted keys set (`{"train.epochs": 3}`), as `dvc exp run -S` does."""
    raw = copy.deepcopy(raw)
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


def load_params(path: str | Path, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml (with optional dotted overrides); raises ParamsError with a one-line fix."""
    return parse_params(with_overrides(read_raw(path), overrides or {}))
