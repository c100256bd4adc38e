"""The epoch loop: every model family learns, runs are bitwise reproducible, resume is exact."""

import dataclasses

import numpy as np
import pytest
from sklearn.datasets import load_digits

from tapework.errors import NonFiniteLossError
from tapework.models import weights_dict
from tapework.preprocess import RawDataset, prepare
from tests.conftest import make_params


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    raw = RawDataset(data.images.astype(np.uint8)[..., None], data.target, None, None, "classification", tuple(map(str, range(10))), None, (8, 8, 1))
    return prepare(raw, make_params({"preprocess.max_train_examples": 400}).preprocess, "digits")


def train_params(**changes):
    base = make_params({"train.model": "mlp", "train.epochs": 3, "train.batch_size": 32, "train.tensorboard": False, "train.steps_per_execution": 4}).train
    return dataclasses.replace(base, **changes)


def run_training(params, data, **kwargs):
    from tapework.training import train

    return train(params, data, **kwargs)


@pytest.mark.parametrize("model", ["mlp", "residual_mlp", "cnn", "vit"])
def test_every_model_builds_trains_and_lowers_the_loss(model, digits):
    params = train_params(model=model, epochs=3, learning_rate=0.003)
    result = run_training(params, digits)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0], losses
    assert result.history[-1]["val_accuracy"] > 0.3  # far above the 0.1 of chance on 10 classes


@pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "no-xla"])
def test_same_params_give_bitwise_identical_weights_and_history(digits, jit_compile):
    params = train_params(mlp=dataclasses.replace(make_params().train.mlp, dropout=0.3), jit_compile=jit_compile)
    first, second = run_training(params, digits), run_training(params, digits)
    assert first.history == second.history
    a, b = weights_dict(first.model), weights_dict(second.model)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "no-xla"])
def test_resumed_run_equals_uninterrupted_run_bitwise(digits, tmp_path, jit_compile):
    params = train_params(epochs=4, mlp=dataclasses.replace(make_params().train.mlp, dropout=0.3), schedule="cosine", jit_compile=jit_compile)
    straight = run_training(params, digits, checkpoint_dir=tmp_path / "straight")
    run_training(params, digits, checkpoint_dir=tmp_path / "resumed", stop_after_epochs=2)  # "crash" after epoch 2
    resumed = run_training(params, digits, checkpoint_dir=tmp_path / "resumed")
    assert resumed.history == straight.history
    a, b = weights_dict(straight.model), weights_dict(resumed.model)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


def test_checkpoint_from_other_params_is_not_resumed(digits, tmp_path):
    run_training(train_params(epochs=2), digits, checkpoint_dir=tmp_path / "ckpt")
    other = run_training(train_params(epochs=2, learning_rate=0.01), digits, checkpoint_dir=tmp_path / "ckpt")
    fresh = run_training(train_params(epochs=2, learning_rate=0.01), digits)
    assert other.history == fresh.history


def test_early_stopping_restores_the_best_weights(digits):
    # A huge learning rate makes validation loss bounce, so patience 1 trips early.
    stopping = make_params({"train.early_stopping.monitor": "val_loss", "train.early_stopping.patience": 1}).train.early_stopping
    params = train_params(epochs=12, optimizer="sgd", learning_rate=1.5, momentum=0.0, early_stopping=stopping)
    result = run_training(params, digits)
    losses = [row["val_loss"] for row in result.history]
    assert result.stopped_early and len(losses) < 12
    assert result.best_epoch == int(np.argmin(losses)) + 1
    assert result.summary()["val"]["loss"] == min(losses)


def test_non_finite_loss_stops_with_epoch_and_step():
    rng = np.random.default_rng(0)
    targets = rng.normal(size=200)
    targets[150] = np.nan
    raw = RawDataset(rng.normal(size=(200, 4)), targets, None, None, "regression", (), ("a", "b", "c", "d"), None)
    data = prepare(raw, make_params().preprocess, "fake")
    # meta statistics are NaN-free only if the NaN lands in val/test; force it into train instead.
    data.arrays["y_train"][5] = np.nan
    data.meta["target"] = {"offset": 0.0, "scale": 1.0}
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step \d+"):
        run_training(train_params(early_stopping=make_params({"download.dataset": "diabetes"}).train.early_stopping), data)


def test_mixed_precision_trains_on_cpu(digits):
    import keras

    try:
        result = run_training(train_params(mixed_precision=True, epochs=2), digits)
        assert np.isfinite(result.history[-1]["train_loss"])
        assert result.model.hidden[0].compute_dtype == "float16"
        assert result.model.head.compute_dtype == "float32"  # logits and loss stay float32
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.parametrize("supported", [True, False], ids=["bf16-cpu", "fallback"])
def test_bfloat16_trains_in_bfloat16_or_falls_back_to_float32_with_one_warning(digits, supported, monkeypatch, caplog):
    """On a CPU with bfloat16 units the hidden layers compute in bfloat16 (head and loss float32, no
    loss scaling); forced off, the run is bitwise the float32 run, with one warning line."""
    import keras

    from tapework import precision

    monkeypatch.setattr(precision, "cpu_has_bfloat16", lambda cpuinfo=precision.CPUINFO: supported)
    caplog.set_level("WARNING", logger="tapework.precision")
    try:
        result = run_training(train_params(mixed_precision="bfloat16", epochs=2), digits)
        hidden_dtype = result.model.hidden[0].compute_dtype
        assert result.model.head.compute_dtype == "float32"
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    warnings = [record.getMessage() for record in caplog.records]
    baseline = run_training(train_params(epochs=2), digits)
    if supported:
        assert hidden_dtype == "bfloat16" and not warnings
        assert np.isfinite(result.history[-1]["train_loss"]) and result.history != baseline.history
    else:
        assert hidden_dtype == "float32" and len(warnings) == 1 and "training in float32" in warnings[0] and "\n" not in warnings[0]
        assert result.history == baseline.history


def test_only_float16_gets_loss_scaling():
    import keras

    from tapework.optim import make_optimizer

    for setting, scaled in ((True, True), ("bfloat16", False), (False, False)):
        optimizer = make_optimizer(train_params(mixed_precision=setting), steps_per_epoch=10)
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) is scaled, setting


def test_cpu_bfloat16_detection_reads_x86_flags_and_arm_features(tmp_path):
    from tapework.precision import cpu_has_bfloat16

    cases = {
        "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n": True,
        "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n": False,
        "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n": True,
        "processor\t: 0\nFeatures\t: fp asimd\n": False,
    }
    for text, expected in cases.items():
        (tmp_path / "cpuinfo").write_text(text)
        assert cpu_has_bfloat16(tmp_path / "cpuinfo") is expected, text
    assert cpu_has_bfloat16(tmp_path / "missing") is False


def test_regularisation_options_run(digits):
    params = train_params(optimizer="adamw", weight_decay=0.01, l2=1e-4, clip_norm=1.0, label_smoothing=0.1, schedule="step", warmup_epochs=1)
    result = run_training(params, digits)
    assert result.history[0]["learning_rate"] != result.history[-1]["learning_rate"]


@pytest.fixture(scope="module")
def diabetes():
    from sklearn.datasets import load_diabetes

    data = load_diabetes(scaled=False)
    raw = RawDataset(data.data, data.target, None, None, "regression", (), tuple(data.feature_names), None)
    return prepare(raw, make_params({"download.dataset": "diabetes"}).preprocess, "diabetes")


def validation_errors(result, data):
    """|output - target| per element on the val split, in the units the Huber metric sees."""
    from tapework.batching import make_dataset
    from tapework.loop import Evaluator, task_spec
    from tapework.metrics import MetricSet

    spec = task_spec(data.meta)
    x_val, y_val = data.split("val")
    _, outputs = Evaluator(result.model, spec, MetricSet(spec.task, spec.num_classes, 1.0))(make_dataset(x_val, y_val, 64), collect_outputs=True)
    if spec.task == "classification":
        probabilities = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        return np.abs(probabilities - np.eye(spec.num_classes)[y_val]), 1.0
    return np.abs(outputs - y_val), data.meta["target"]["scale"]


@pytest.mark.parametrize("data_name", ["digits", "diabetes"])
def test_huber_delta_in_params_exercises_both_branches_on_real_data(data_name, request):
    """At the committed train.huber_delta both the quadratic and the linear side occur, and the
    reported val_huber is the textbook Huber of those errors with delta in the target's scale."""
    data = request.getfixturevalue(data_name)
    delta = make_params().train.huber_delta
    result = run_training(train_params(huber_delta=delta), data)
    errors, scale = validation_errors(result, data)
    threshold = delta * scale
    linear_share = float(np.mean(errors > threshold))
    assert 0.0 < linear_share < 1.0, f"{data_name}: share of errors beyond delta = {linear_share}"
    values = np.where(errors <= threshold, 0.5 * errors**2, threshold * errors - 0.5 * threshold**2)
    expected = values.reshape(len(values), -1).mean(axis=1).mean()
    assert result.history[-1]["val_huber"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("model", ["residual_mlp", "mlp"])
def test_mlp_families_train_for_regression(model, diabetes):
    result = run_training(train_params(model=model, epochs=3), diabetes)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0] and {"val_mae", "val_rmse", "val_r2"} <= set(result.history[-1])


@pytest.mark.parametrize("model", ["cnn", "vit"])
def test_image_families_build_for_regression(model):
    """cnn and vit serve regression too: one output, and a train step on image targets runs."""
    from tapework.models import build_model, model_config

    params = make_params({"train.model": model}).train
    config = model_config(params, (8, 8, 1), 1, [0.0], [1.0])
    model_instance = build_model(config)
    assert tuple(model_instance(np.zeros((2, 8, 8, 1), np.float32)).shape) == (2, 1)


@pytest.mark.parametrize(("monitor", "values", "best", "stops_at"), [
    ("val_loss", [1.0, 0.8, 0.9, 0.85, 0.7], 2, 4),  # lower is better; patience 2 runs out after epoch 4
    ("val_accuracy", [0.5, 0.7, 0.6, 0.9, 0.8], 4, None),  # higher is better; never two bad epochs in a row
])
def test_early_stopping_tracks_the_best_epoch_and_its_patience(monitor, values, best, stops_at):
    import keras

    from tapework.checkpoint import TrainingState
    from tapework.early_stopping import EarlyStopping

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    stopping = EarlyStopping(make_params({"train.early_stopping.monitor": monitor, "train.early_stopping.patience": 2}).train.early_stopping, TrainingState(model))
    stopped = None
    for epoch, value in enumerate(values, start=1):
        model.layers[0].kernel.assign(np.full((2, 1), float(epoch), np.float32))  # weights that name their epoch
        if stopping.update({"epoch": epoch, monitor: value}, model) and stopped is None:
            stopped = epoch
            break
    assert stopped == stops_at
    assert stopping.finish(model, len(values)) == best
    assert float(model.layers[0].kernel.numpy()[0, 0]) == best  # restore_best put the best epoch's weights back


@pytest.mark.parametrize("damage", ["truncated data", "zeroed index", "unfinished save"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(digits, tmp_path, damage, caplog):
    params = train_params(epochs=4)
    straight = run_training(params, digits, checkpoint_dir=tmp_path / "straight")
    folder = tmp_path / "resumed"
    run_training(params, digits, checkpoint_dir=folder, stop_after_epochs=3)  # "crash" after epoch 3
    if damage == "truncated data":
        data = next(folder.glob("ckpt-3.data-*"))
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif damage == "zeroed index":
        index = folder / "ckpt-3.index"
        index.write_bytes(bytes(index.stat().st_size))
    else:  # what a save killed by a full disk leaves: its temp folder, and the files it never finished
        (folder / "ckpt-4_temp").mkdir()
        for path in folder.glob("ckpt-3.*"):
            path.rename(folder / "ckpt-4_temp" / path.name)
    with caplog.at_level("INFO", logger="tapework"):
        resumed = run_training(params, digits, checkpoint_dir=folder)
    assert "resumed from" in caplog.text and "at epoch 2" in caplog.text
    assert resumed.history == straight.history
    assert not list(folder.glob("*_temp*"))
