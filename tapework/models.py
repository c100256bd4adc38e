"""Subclassed keras.Model families, built from params plus the prepared data's shape.

A saved model is `model.json` (this builder's arguments) plus a weights file, so loading
never deserialises code: the project's own builder makes the layers, then the weights fill them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from tapework import catalogue
from tapework.errors import DataError
from tapework.io import load_npz, read_json, save_npz, write_json
from tapework.params import ParamsError, TrainParams, to_plain

CONFIG_FILE = "model.json"  # the builder's arguments
WEIGHTS_FILE = "model.weights.npz"  # every model variable, deterministic bytes


@keras.saving.register_keras_serializable(package="tapework")
class Standardize(layers.Layer):
    """(x - offset) / scale with constants from preprocess, so raw uint8 images go straight in."""

    def __init__(self, offset: Any, scale: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.offset_values = np.asarray(offset, dtype="float32")
        self.scale_values = np.asarray(scale, dtype="float32")

    def call(self, inputs: Any) -> Any:
        inputs = ops.cast(inputs, self.compute_dtype)
        # Multiply by the reciprocal: one fused op instead of a division per element.
        inverse = ops.cast(1.0 / self.scale_values, self.compute_dtype)
        return (inputs - ops.cast(self.offset_values, self.compute_dtype)) * inverse


class Dropout(layers.Dropout):
    """keras.layers.Dropout with its random generator named (Philox) instead of auto-selected.

    On TensorFlow's CPU and GPU kernels auto-select *is* Philox, so the masks are bit-identical to
    Keras' own Dropout (tested). Under XLA on CPU, auto-select compiles to a generator that took
    1.9 ms per 64x128 mask against 35 us for Philox (measured), which made an XLA train step
    (train.jit_compile) four times slower than an uncompiled one.
    """

    def __init__(self, rate: float, seed: int, **kwargs: Any) -> None:
        super().__init__(rate, seed=seed, **kwargs)

    def call(self, inputs: Any, training: bool = False) -> Any:
        if not training or self.rate == 0:
            return inputs
        seed = self.seed_generator.next()
        if seed.dtype != tf.int32:
            # The cast Keras' TensorFlow backend applies: stateless ops want int32 seeds.
            seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
        return tf.nn.experimental.stateless_dropout(inputs, rate=self.rate, seed=seed, rng_alg="philox")


def _regularizer(l2: float) -> Any:
    return keras.regularizers.L2(l2) if l2 > 0 else None


class MLP(keras.Model):
    """Flatten -> [Dense(relu) -> Dropout] * n -> Dense(outputs)."""

    def __init__(self, standardize: Standardize, *, input_shape: tuple[int, ...], outputs: int, l2: float, seed: int, hidden_units: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        self.standardize = standardize
        self.flatten = layers.Flatten()
        self.hidden = [layers.Dense(units, activation="relu", kernel_regularizer=_regularizer(l2)) for units in hidden_units]
        self.dropouts = [Dropout(dropout, seed=seed + index) for index in range(len(hidden_units))]
        # float32 head: under mixed precision the logits and the loss stay in full precision.
        self.head = layers.Dense(outputs, dtype="float32", kernel_regularizer=_regularizer(l2))

    def call(self, inputs: Any, training: bool = False) -> Any:
        hidden = self.flatten(self.standardize(inputs))
        for dense, dropout in zip(self.hidden, self.dropouts):
            hidden = dropout(dense(hidden), training=training)
        return self.head(hidden)


class ResidualBlock(layers.Layer):
    """relu(x + Dense(Dense(x))): the identity path keeps gradients flowing through depth."""

    def __init__(self, width: int, dropout: float, l2: float, seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.first = layers.Dense(width, activation="relu", kernel_regularizer=_regularizer(l2))
        self.second = layers.Dense(width, kernel_regularizer=_regularizer(l2))
        self.dropout = Dropout(dropout, seed=seed)

    def call(self, inputs: Any, training: bool = False) -> Any:
        residual = self.second(self.dropout(self.first(inputs), training=training))
        return ops.relu(inputs + residual)


class ResidualMLP(keras.Model):
    """Flatten -> Dense(width) -> residual blocks -> head units -> outputs."""

    def __init__(self, standardize: Standardize, *, input_shape: tuple[int, ...], outputs: int, l2: float, seed: int, width: int, blocks: int, head_units: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        self.standardize = standardize
        self.flatten = layers.Flatten()
        self.stem = layers.Dense(width, activation="relu", kernel_regularizer=_regularizer(l2))
        self.blocks = [ResidualBlock(width, dropout, l2, seed + index) for index in range(blocks)]
        self.neck = [layers.Dense(units, activation="relu", kernel_regularizer=_regularizer(l2)) for units in head_units]
        self.head = layers.Dense(outputs, dtype="float32", kernel_regularizer=_regularizer(l2))

    def call(self, inputs: Any, training: bool = False) -> Any:
        hidden = self.stem(self.flatten(self.standardize(inputs)))
        for block in self.blocks:
            hidden = block(hidden, training=training)
        for dense in self.neck:
            hidden = dense(hidden)
        return self.head(hidden)


class CNN(keras.Model):
    """[Conv(relu) -> MaxPool2] per filter count -> Dense -> Dropout -> outputs."""

    def __init__(self, standardize: Standardize, *, input_shape: tuple[int, ...], outputs: int, l2: float, seed: int, filters: tuple[int, ...], kernel_size: int, dense_units: int, dropout: float) -> None:
        super().__init__()
        self.standardize = standardize
        self.convolutions = [
            layers.Conv2D(count, kernel_size, padding="same", activation="relu", kernel_regularizer=_regularizer(l2)) for count in filters
        ]
        # Pool only while the map is at least 2 wide, so small inputs (8x8 digits) still work.
        self.pool = layers.MaxPooling2D(2, padding="same")
        self.flatten = layers.Flatten()
        self.dense = layers.Dense(dense_units, activation="relu", kernel_regularizer=_regularizer(l2))
        self.dropout = Dropout(dropout, seed=seed)
        self.head = layers.Dense(outputs, dtype="float32", kernel_regularizer=_regularizer(l2))

    def call(self, inputs: Any, training: bool = False) -> Any:
        hidden = self.standardize(inputs)
        for convolution in self.convolutions:
            hidden = convolution(hidden)
            if hidden.shape[1] is not None and hidden.shape[1] >= 2:
                hidden = self.pool(hidden)
        hidden = self.dense(self.flatten(hidden))
        return self.head(self.dropout(hidden, training=training))


class TransformerBlock(layers.Layer):
    """Pre-norm encoder block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_dim: int, dropout: float, l2: float, seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.attention_norm = layers.LayerNormalization(epsilon=1e-6)
        self.attention = layers.MultiHeadAttention(num_heads, embed_dim // num_heads, dropout=dropout, seed=seed, kernel_regularizer=_regularizer(l2))
        self.mlp_norm = layers.LayerNormalization(epsilon=1e-6)
        self.mlp_in = layers.Dense(mlp_dim, activation="gelu", kernel_regularizer=_regularizer(l2))
        self.mlp_out = layers.Dense(embed_dim, kernel_regularizer=_regularizer(l2))
        self.dropout = Dropout(dropout, seed=seed + 1)

    def call(self, inputs: Any, training: bool = False) -> Any:
        normed = self.attention_norm(inputs)
        hidden = inputs + self.attention(normed, normed, training=training)
        update = self.mlp_out(self.dropout(self.mlp_in(self.mlp_norm(hidden)), training=training))
        return hidden + update


class VisionTransformer(keras.Model):
    """Patch embedding (strided conv) + learned positions -> encoder blocks -> mean pool -> outputs."""

    def __init__(self, standardize: Standardize, *, input_shape: tuple[int, ...], outputs: int, l2: float, seed: int, patch_size: int, embed_dim: int, num_heads: int, num_blocks: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        height, width, _ = input_shape
        if height % patch_size or width % patch_size:
            # params validation cannot check this for the idx data set: its image size is in the files' headers
            raise ParamsError(f"params.yaml: train.vit.patch_size = {patch_size} is invalid: must divide the {height}x{width} images of the prepared data. Fix `train.vit.patch_size` in params.yaml.")
        self.num_patches = (height // patch_size) * (width // patch_size)
        self.standardize = standardize
        # A conv with stride = kernel = patch size is exactly "split into patches + linear projection".
        self.patchify = layers.Conv2D(embed_dim, patch_size, strides=patch_size, kernel_regularizer=_regularizer(l2))
        self.to_sequence = layers.Reshape((self.num_patches, embed_dim))
        self.positions = layers.Embedding(self.num_patches, embed_dim)
        self.blocks = [TransformerBlock(embed_dim, num_heads, mlp_dim, dropout, l2, seed + 2 * index) for index in range(num_blocks)]
        self.final_norm = layers.LayerNormalization(epsilon=1e-6)
        self.pool = layers.GlobalAveragePooling1D()
        self.head = layers.Dense(outputs, dtype="float32", kernel_regularizer=_regularizer(l2))

    def call(self, inputs: Any, training: bool = False) -> Any:
        tokens = self.to_sequence(self.patchify(self.standardize(inputs)))
        tokens = tokens + self.positions(ops.arange(self.num_patches))
        for block in self.blocks:
            tokens = block(tokens, training=training)
        return self.head(self.pool(self.final_norm(tokens)))


def model_config(train: TrainParams, input_shape: tuple[int, ...], outputs: int, offset: Any, scale: Any) -> dict[str, Any]:
    """Everything needed to rebuild the model: written to models/model.json by train."""
    return {
        "model": train.model,
        "settings": to_plain(getattr(train, train.model)),
        "input_shape": list(input_shape),
        "outputs": outputs,
        "l2": train.l2,
        "seed": train.seed,
        "offset": np.asarray(offset, dtype="float32").tolist(),
        "scale": np.asarray(scale, dtype="float32").tolist(),
    }


def build_model(config: dict[str, Any]) -> keras.Model:
    """Instantiate and build (create variables for) the model described by `config`."""
    settings = dict(config["settings"])
    for key, value in settings.items():
        if isinstance(value, list):
            settings[key] = tuple(value)
    family = catalogue.MODELS.get(config["model"])
    if family is None:
        raise ValueError(f"unknown model '{config['model']}' in model config; expected one of {', '.join(catalogue.MODELS)}")
    builder = globals()[family.builder]  # a class of this module, named by the catalogue entry
    standardize = Standardize(config["offset"], config["scale"])
    model = builder(
        standardize, input_shape=tuple(config["input_shape"]), outputs=config["outputs"], l2=config["l2"], seed=config["seed"], **settings
    )
    model(np.zeros((1, *config["input_shape"]), dtype="float32"))  # creates every variable
    return model


def weights_dict(model: keras.Model) -> dict[str, np.ndarray]:
    """Model variables, trainable and dropout RNG state (`weights` would miss the RNG), keyed by build position and short name.

    Not by path: Keras numbers layer names per process (dense_3, dense_17...), which would make
    the file's bytes depend on what else the process built.
    """
    return {f"{index:04d}|{variable.name}": np.asarray(variable.numpy()) for index, variable in enumerate(model.variables)}


def assign_weights(model: keras.Model, weights: dict[str, np.ndarray]) -> None:
    """Load arrays saved by `weights_dict` into a model made by the same builder; shapes must match."""
    variables = model.variables
    if len(weights) != len(variables):
        raise ValueError(f"weights file holds {len(weights)} arrays but the model has {len(variables)} variables; was it trained with other params?")
    for (name, array), variable in zip(sorted(weights.items()), variables):
        if tuple(array.shape) != tuple(variable.shape):
            raise ValueError(f"weights entry {name} has shape {array.shape} but the model expects {tuple(variable.shape)}; retrain")
        variable.assign(array)



def parameter_count(model: keras.Model) -> int:
    """Trainable plus non-trainable weights (Keras' count; the dropout RNG state is not a parameter)."""
    return int(model.count_params())


def trainable_parameter_count(model: keras.Model) -> int:
    return sum(int(np.prod(variable.shape)) for variable in model.trainable_weights)


def layer_summary(model: keras.Model) -> list[str]:
    """One line per top-level layer (name, class, parameters), then the total: what train logs.

    Keras' own `summary()` prints "?" for the output shapes of a subclassed model, so this lists
    what is known for certain: each layer's parameter count.
    """
    rows = [(f"{layer.name} ({type(layer).__name__})", layer.count_params()) for layer in model.layers]
    width = max(len(name) for name, _ in rows)
    trainable = trainable_parameter_count(model)
    lines = [f"model {model.name}: layer, parameters"]
    lines += [f"  {name:<{width}}  {count:>12,}" for name, count in rows]
    lines.append(f"  {'total':<{width}}  {parameter_count(model):>12,} ({trainable:,} trainable)")
    return lines


def save_model(model: keras.Model, config: dict[str, Any], directory: str | Path) -> None:
    """CONFIG_FILE (builder arguments) + WEIGHTS_FILE (deterministic bytes) in `directory`."""
    directory = Path(directory)
    save_npz(directory / WEIGHTS_FILE, weights_dict(model))
    write_json(directory / CONFIG_FILE, config)


def load_model(directory: str | Path) -> tuple[keras.Model, dict[str, Any]]:
    """Rebuild with the project's own builder, then fill in weights: no code is deserialised."""
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise DataError(f"{directory / name} is missing: run the train stage first (dvc repro train)")
    try:
        config = read_json(directory / CONFIG_FILE)
    except ValueError as error:  # truncated, not JSON, not UTF-8
        raise DataError(f"{directory / CONFIG_FILE} is not valid JSON ({error}); re-run the train stage") from None
    try:
        model = build_model(config)
        assign_weights(model, load_npz(directory / WEIGHTS_FILE))
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{directory} does not hold a model this code can rebuild ({error}); re-run the train stage") from None
    return model, config
