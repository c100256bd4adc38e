"""params.yaml validation: every key is tried with a bad value; each error names key, value and fix."""

import dataclasses
import difflib
import re
import typing
from pathlib import Path

import pytest
import yaml

from tapework.params import Params, ParamsError, TrainParams, load_params, parse_params, parse_yaml, read_raw, with_overrides

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = read_raw(ROOT / "params.yaml")

# key -> bad values (each must be rejected with a message naming the key)
BAD_VALUES = {
    "download.dataset": ["imagenet", 3, ""],
    "download.mirror": [5, ["a"]],
    "download.retries": [-1, 21, 1.5, "3"],
    "download.backoff_seconds": [-0.1, 61, "x"],
    "download.timeout_seconds": [0.0, 601, True],
    "download.deadline_seconds": [0.0, -1.0, 86_401, "1h", 1.0],  # 1.0: below timeout_seconds (30)
    "download.csv": ["file.csv", 3],
    "download.csv.path": [7],
    "download.csv.target": ["", 1],
    "download.csv.task": ["clustering"],
    "download.csv.sha256": ["abc", "Z" * 64],
    "download.idx": ["folder", 3],
    "download.idx.path": [7],
    "download.idx.sha256": ["abc"],
    "download.idx.sha256.train_images": ["abc", "Z" * 64, 5],
    "download.idx.sha256.train_labels": ["0" * 63],
    "download.idx.sha256.test_images": ["A" * 64],
    "download.idx.sha256.test_labels": [["0" * 64]],
    "download.idx.class_names": ["cat", [1, 2], ["a", "a"], ["only"], ["a", ""], [None, "b"]],
    "preprocess": [[1, 2]],
    "preprocess.seed": [-1, 2**31, 0.5],
    "preprocess.val_fraction": [0.0, 1.0, -0.2, 1.5, "half"],
    "preprocess.test_fraction": [0.0, 1.0],
    "preprocess.normalization": ["zscore"],
    "preprocess.max_train_examples": [-5, 1],
    "preprocess.format": ["tfrecord", "", True],
    "preprocess.shard_size": [0, -1, 2**31, 1.5],
    "preprocess.shards_above_mib": [-1.0, "big"],
    "train.seed": [-3, None],
    "train.model": ["resnet", 1],
    "train.mlp": [[128]],
    "train.mlp.hidden_units": [[], [0], [128, -1], "128", [1.5]],
    "train.mlp.dropout": [1.0, -0.1],
    "train.residual_mlp": [256],
    "train.cnn": [True],
    "train.vit": ["small"],
    "train.residual_mlp.width": [0],
    "train.residual_mlp.blocks": [-1],
    "train.residual_mlp.head_units": [[0]],
    "train.residual_mlp.dropout": [1.2],
    "train.cnn.filters": [[], [0]],
    "train.cnn.kernel_size": [0],
    "train.cnn.dense_units": [0],
    "train.cnn.dropout": [1.0],
    "train.vit.patch_size": [0],
    "train.vit.embed_dim": [0],
    "train.vit.num_heads": [0],
    "train.vit.num_blocks": [0],
    "train.vit.mlp_dim": [0],
    "train.vit.dropout": [-1.0],
    "train.epochs": [0, -1, 2.5, 100_001],
    "train.batch_size": [0, -64, "64x", 2**31, 2**63],
    "train.drop_remainder": ["yes", 1],
    "train.optimizer": ["rmsprop", "adamm"],
    "train.learning_rate": [0.0, -0.001, float("nan"), float("inf"), 11.0],
    "train.momentum": [1.0, -0.5],
    "train.weight_decay": [-0.1, 2.0],
    "train.l2": [-1e-4],
    "train.schedule": ["linear"],
    "train.warmup_epochs": [-1],
    "train.decay_rate": [0.0, 1.5],
    "train.decay_epochs": [0],
    "train.min_learning_rate": [-1.0],
    "train.clip_norm": [-1.0],
    "train.label_smoothing": [1.0, -0.1],
    "train.huber_delta": [0.0, -1.0],
    "train.early_stopping": ["on"],
    "train.early_stopping.monitor": ["val_f1", "loss"],
    "train.early_stopping.patience": [-1],
    "train.early_stopping.min_delta": [-0.01],
    "train.early_stopping.restore_best": ["true"],
    "train.steps_per_execution": [0, 10_001],
    "train.shuffle_window": [0, -10, 2**31],
    "train.jit_compile": [0, "yes", "xla", None],
    "train.jit_min_steps": [-1, 1.5, "many", None, 2**63],
    "train.mixed_precision": ["no", "float16", "bf16"],
    "train.on_nonfinite": ["ignore"],
    "train.distribute": ["tpu"],
    "train.checkpoint_every": [0],
    "train.tensorboard": ["off"],
    "train.histogram_every": [-1],
    "evaluate.batch_size": [0, 2**62],
    "repeats.extra_seeds": [[-1], [7, 7], [2**31], ["7"], [1.5], "7,8", {"a": 7}],
    "repeats.primary_metric": ["test.accuracy"],
    "repeats.primary_metric.classification": ["test.rmse", "accuracy", "test.macro_f1x", "val.macro_f1", 3],
    "repeats.primary_metric.regression": ["test.accuracy", "test.macro_f1", ""],
    "checkpoints.keep_runs": [-1, 1.5, "16", True, 2**31],
    "checkpoints.keep_days": [-1.0, -0.5, 36_501, "30d", float("nan"), float("inf"), False],
    "checkpoints": [16, "30 days"],
    "download": ["digits"],
    "train": [None and 0 or 5],
    "evaluate": [[]],
    "repeats": [[7, 8]],
}

# Cross-key rules: (changes, key named in the error)
BAD_COMBINATIONS = [
    ({"download.dataset": "california_housing", "train.model": "cnn"}, "train.model"),
    ({"download.dataset": "diabetes", "train.model": "vit"}, "train.model"),
    ({"download.dataset": "csv", "download.csv.path": ""}, "download.csv.path"),
    ({"download.dataset": "csv", "download.csv.path": "x.csv", "download.csv.task": "regression", "train.model": "cnn"}, "train.model"),
    ({"download.dataset": "diabetes", "train.early_stopping.monitor": "val_accuracy"}, "train.early_stopping.monitor"),
    ({"download.dataset": "digits", "train.early_stopping.monitor": "val_r2"}, "train.early_stopping.monitor"),
    ({"download.dataset": "diabetes", "train.label_smoothing": 0.1}, "train.label_smoothing"),
    ({"train.optimizer": "adam", "train.weight_decay": 0.01}, "train.weight_decay"),
    ({"train.epochs": 3, "train.warmup_epochs": 3}, "train.warmup_epochs"),
    ({"train.learning_rate": 0.001, "train.min_learning_rate": 0.01}, "train.min_learning_rate"),
    ({"train.model": "vit", "train.vit.embed_dim": 64, "train.vit.num_heads": 5}, "train.vit.num_heads"),
    ({"train.model": "vit", "train.vit.patch_size": 3}, "train.vit.patch_size"),
    ({"train.distribute": "mirrored", "train.clip_norm": 1.0}, "train.clip_norm"),
    ({"train.distribute": "multi_worker", "train.mixed_precision": True}, "train.mixed_precision"),
    ({"train.model": "cnn", "train.jit_compile": True}, "train.jit_compile"),
    ({"train.seed": 7, "repeats.extra_seeds": [3, 7]}, "repeats.extra_seeds"),  # the train.seed run is always one of the repeats
    ({"train.seed": 7, "repeats.extra_seeds": [3, 42]}, None),
    ({"download.dataset": "digits", "train.model": "cnn", "train.cnn.filters": [8, 8, 8, 8, 8]}, None),
    # Every model family serves both tasks where its input kind fits the data.
    ({"download.dataset": "diabetes", "train.model": "residual_mlp", "train.early_stopping.monitor": "val_loss"}, None),
    ({"download.dataset": "california_housing", "train.model": "residual_mlp"}, None),
]


def nested(changes):
    """The committed params.yaml with `changes` (dotted keys) applied, as `dvc exp run -S` would."""
    return with_overrides(COMMITTED, changes)


def all_keys(cls=Params, prefix=""):
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        yield key
        if dataclasses.is_dataclass(hints[field.name]):
            yield from all_keys(hints[field.name], key + ".")


def test_table_covers_every_key():
    missing = sorted(set(all_keys()) - set(BAD_VALUES))
    assert not missing, f"add bad values for: {missing}"


CASES = [(key, value) for key, values in BAD_VALUES.items() for value in values]


@pytest.mark.parametrize(("key", "value"), CASES, ids=[f"{k}={v!r}" for k, v in CASES])
def test_bad_value_is_rejected_naming_key_and_value(key, value):
    with pytest.raises(ParamsError) as error:
        parse_params(nested({key: value}))
    message = str(error.value)
    assert f"{key}" in message
    assert "\n" not in message
    assert "params.yaml" in message


@pytest.mark.parametrize(("changes", "key"), BAD_COMBINATIONS)
def test_cross_key_rules(changes, key):
    if key is None:  # a valid combination: deep CNNs on 8x8 inputs stop pooling at 1x1
        parse_params(nested(changes))
        return
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_params(nested(changes))


def test_unknown_key_suggests_the_closest_name():
    with pytest.raises(ParamsError, match=r"unknown key `train\.learning_rat`\. Did you mean `train\.learning_rate`\?"):
        parse_params(nested({"train.learning_rat": 0.1}))
    with pytest.raises(ParamsError, match=r"Did you mean `preprocess`\?"):
        parse_params({"preproces": {}})


def test_committed_params_file_is_valid_and_complete():
    params = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params.to_dict() == parse_params(raw).to_dict()
    # params.yaml spells out every key so `dvc params diff` shows every change.
    spelled = {key for key in all_keys() if _lookup(raw, key) is not _MISSING}
    assert spelled == set(all_keys())


_MISSING = object()


def _lookup(raw, dotted):
    node = raw
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def test_integral_floats_are_accepted_for_integers_and_ints_for_floats():
    params = parse_params(nested({"train.epochs": 3.0, "train.learning_rate": 1}))
    assert params.train.epochs == 3 and isinstance(params.train.epochs, int)
    assert params.train.learning_rate == 1.0 and isinstance(params.train.learning_rate, float)


def test_yaml_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, True),  # the committed default: auto, mlp, one device
        ({"train.model": "residual_mlp"}, True),
        ({"train.model": "cnn"}, False),
        ({"train.model": "vit"}, False),
        ({"train.distribute": "mirrored"}, False),
        ({"train.jit_compile": False}, False),
        ({"train.jit_compile": True, "train.model": "vit"}, True),
        ({"train.jit_compile": True, "train.distribute": "mirrored"}, True),
    ],
)
def test_jit_compile_auto_resolves_by_model_and_strategy(changes, expected):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    train = parse_params(raw).train
    assert train.use_xla(run_steps=train.jit_min_steps) is expected  # a run just long enough for auto
    # A shorter run: auto leaves XLA off (its compile would cost more than it saves); true and false stay.
    assert train.use_xla(run_steps=train.jit_min_steps - 1) is (expected and train.jit_compile is True)


@pytest.mark.parametrize("key", ["train.epochs", "train.early_stopping.patience", "download.csv.sha256", "evaluate"])
def test_a_deleted_key_is_an_error_not_a_silent_default(key):
    raw = nested({})
    *parents, leaf = key.split(".")
    node = raw
    for name in parents:
        node = node[name]
    del node[leaf]
    with pytest.raises(ParamsError, match=rf"missing key `{key.replace('.', '[.]')}`.*git show HEAD:params.yaml"):
        parse_params(raw)


def test_params_classes_carry_no_defaults():
    """params.yaml is the only source of values: the dataclasses cannot be built without them."""
    with pytest.raises(TypeError, match="missing"):
        TrainParams()
    pending, seen = [Params], []
    while pending:
        cls = pending.pop()
        seen.append(cls)
        assert all(field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING for field in dataclasses.fields(cls)), cls
        pending.extend(hint for hint in typing.get_type_hints(cls).values() if dataclasses.is_dataclass(hint))
    assert len(seen) == 16  # Params, its six sections, csv, idx and its sha256, early_stopping, the four model sections and primary_metric


def test_overrides_apply_dotted_keys_to_a_copy():
    changed = with_overrides(COMMITTED, {"train.epochs": 2, "train.mlp.dropout": 0.5})
    assert changed["train"]["epochs"] == 2 and changed["train"]["mlp"]["dropout"] == 0.5
    assert COMMITTED["train"]["epochs"] != 2 or COMMITTED["train"]["mlp"]["dropout"] != 0.5
    assert load_params(ROOT / "params.yaml", {"train.epochs": 2}).train.epochs == 2


@pytest.mark.parametrize("override", ["train.learning_rate=0.003", "download.mirror=/srv/mirror", "train.mlp.hidden_units=[256,64]"])
def test_dvc_exp_run_set_changes_one_line_of_params_yaml(tmp_path, override):
    """params.yaml is written in the style DVC's `-S` rewrite produces, so a one-key change is a one-line diff."""
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` calls

    copy = tmp_path / "params.yaml"
    copy.write_text((ROOT / "params.yaml").read_text())
    apply_overrides(str(copy), [override])
    before, after = (ROOT / "params.yaml").read_text().splitlines(), copy.read_text().splitlines()
    changed = [line for line in difflib.unified_diff(before, after, lineterm="", n=0) if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert len(changed) == 2, "\n".join(changed)  # one line out, one line in (a list: one line per item)


# --- issue 16: reading params.yaml --------------------------------------------------------------


def committed_text():
    return (ROOT / "params.yaml").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (committed_text().replace("# Every number", "# \xe9very number").encode("latin-1"), r"not UTF-8 text \(byte 0xe9 on line 1\)\. Save it as UTF-8"),
        (b"", r"empty \(no keys at all\)\. Restore it"),
        (b"# only a comment\n\n", r"empty \(no keys at all\)"),
        (committed_text().replace("  epochs: 20\n", "  epochs: 20\n  epochs: 5\n").encode(), r"key `epochs` is set twice \(lines \d+ and \d+\); delete one of them"),
        (committed_text().replace("download:\n", "evaluate:\n  batch_size: 8\ndownload:\n", 1).encode(), r"key `evaluate` is set twice \(lines 5 and \d+\)"),
        (b"train: [unclosed\n", r"not valid YAML \(expected ',' or '\]', but got '<stream end>' at line 2, column 1\)\. Fix the syntax\."),
        (b"train:\n\tepochs: 3\n", r"not valid YAML \(found character '\\t' that cannot start any token at line 2, column 1\)"),
    ],
    ids=["latin-1", "empty", "comments-only", "duplicate-key", "duplicate-section", "syntax", "tab"],
)
def test_unreadable_params_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(ParamsError, match=message) as error:
        load_params(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "1.0e-3", "+1e-3", "0.001"])
def test_yaml_1_2_floats_are_numbers(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(committed_text().replace("learning_rate: 0.001", f"learning_rate: {text}"))
    assert load_params(path).train.learning_rate == 0.001


def test_scalars_read_as_dvc_reads_them():
    """`dvc params diff` reads params.yaml with ruamel.yaml (YAML 1.2): every scalar must come out the same here."""
    from dvc.utils.serialize import parse_yaml as dvc_parse

    scalars = [
        "1e-3", "1E3", "1e+3", "-1e3", "1.e3", "1.0e-3", ".5e2", ".5e-2", ".5", "-.5", "1_000", "1.5", "1.", ".inf", "-.inf",
        ".nan", "1:30", "0x1f", "0o17", "017", "-017", "0b101", "yes", "no", "on", "off", "y", "True", "true", "FALSE", "~",
        "null", "", "2e", "e3", "123456789012345678901234567890", "9223372036854775808", "2001-12-14", "a b",
    ]
    for scalar in scalars:
        ours, theirs = parse_yaml(f"k: {scalar}")["k"], dvc_parse(f"k: {scalar}", "params.yaml")["k"]
        same = ours == theirs or (ours != ours and theirs != theirs)  # nan
        assert same and type(ours) is type(theirs), (scalar, ours, theirs)


def test_batch_sizes_beyond_int32_are_refused_before_any_work():
    for key, value in (("train.batch_size", 2**63), ("evaluate.batch_size", 2**62), ("train.batch_size", 2**31)):
        with pytest.raises(ParamsError, match=rf"{re.escape(key)} = {value} is invalid: must be >= 1 and <= 2147483647"):
            parse_params(nested({key: value}))
    assert parse_params(nested({"train.batch_size": 2**31 - 1})).train.batch_size == 2**31 - 1
    with pytest.raises(ParamsError, match=r"train\.decay_epochs = 4611686018427387904 is invalid: must be >= 1 and <= 2147483647"):
        parse_params(nested({"train.decay_epochs": 2**62}))  # every integer key has that ceiling


def test_seeds_and_primary_metric_follow_the_task():
    params = parse_params(nested({"repeats.extra_seeds": [8, 7]}))
    assert params.seeds() == (7, 8, 42) and params.repeats.extra_seeds == (8, 7)
    assert params.primary_metric() == COMMITTED["repeats"]["primary_metric"]["classification"]
    regression = parse_params(nested({"download.dataset": "diabetes"}))
    assert regression.primary_metric() == COMMITTED["repeats"]["primary_metric"]["regression"]
    assert parse_params(nested({})).seeds() == (COMMITTED["train"]["seed"],)  # the committed default: one run


def test_with_seed_replaces_only_the_train_seed():
    params = parse_params(nested({"repeats.extra_seeds": [7, 8]}))
    seeded = params.with_seed(7)
    assert seeded.train.seed == 7 and dataclasses.replace(seeded.train, seed=params.train.seed) == params.train
    assert seeded.repeats == params.repeats and seeded.evaluate == params.evaluate
    for bad in (-1, 2**31, True, 1.5):
        with pytest.raises(ParamsError, match="--seed"):
            params.with_seed(bad)
