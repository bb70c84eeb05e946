"""The classifiers: flat Keras functional models from raw [0, 255] RGB pixels to P(covid).

Conventions other modules rely on: input (B, H, W, 3) float32 raw pixels; preprocessing inside the model (so a
saved ``.keras`` file takes images directly and loads with plain ``keras.models.load_model``); no nested models,
so every layer can be fetched by name; the last Dense layer is the linear ``"logit"`` followed by the sigmoid
``"prob"`` (output (B, 1)); the scratch CNNs name their last conv layer ``"last_conv"``; the VGG16 conv layers
carry the standard Keras names ``block1_conv1`` ... ``block5_conv3``.
"""

from __future__ import annotations

import keras

from covidxray.errors import ModelError
from covidxray.limits import MIN_IMAGE_SIZE
from covidxray.training.backbones import VGG16_CONV_LAYERS, load_vgg16_backbone_weights

MODEL_NAMES: tuple[str, ...] = ("scratch", "scratch-gap", "vgg16")
"""``scratch``: the original project's CNN; ``scratch-gap``: its convs with a global-average-pooling head
(exact CAM); ``vgg16``: VGG16 conv base with the original GAP-Dropout-Dense(256)-Dropout head."""

VGG16_MEAN_BGR: tuple[float, float, float] = (103.939, 116.779, 123.68)
"""ImageNet channel means that ``keras.applications.vgg16.preprocess_input`` subtracts (BGR order)."""

_VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


class _Seeds:
    """Distinct, reproducible seeds for each initializer and dropout layer of one model."""

    def __init__(self, seed: int) -> None:
        self.seed = seed * 1000
        self.count = 0

    def next(self) -> int:
        self.count += 1
        return self.seed + self.count

    def glorot(self) -> keras.initializers.Initializer:
        return keras.initializers.GlorotUniform(seed=self.next())

    def he(self) -> keras.initializers.Initializer:
        return keras.initializers.HeNormal(seed=self.next())


def _head(x: keras.KerasTensor, seeds: _Seeds) -> keras.KerasTensor:
    x = keras.layers.Dense(1, kernel_initializer=seeds.glorot(), name="logit", dtype="float32")(x)
    return keras.layers.Activation("sigmoid", name="prob", dtype="float32")(x)


def _scratch_convs(x: keras.KerasTensor, seeds: _Seeds, *, he_init: bool = False) -> keras.KerasTensor:
    """The original project's conv stack, up to and including ``last_conv`` (valid padding, ReLU).

    ``he_init`` uses He-normal kernels (suited to ReLU) instead of Keras' Glorot default: without a dense
    layer after the pooling, Glorot-initialised ReLU features start too small for the GAP head to learn.
    """

    def conv(filters: int, name: str) -> keras.layers.Conv2D:
        init = seeds.he() if he_init else seeds.glorot()
        return keras.layers.Conv2D(filters, 3, activation="relu", kernel_initializer=init, name=name)

    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(x)
    x = conv(32, "conv1")(x)
    x = conv(64, "conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Dropout(0.25, seed=seeds.next(), name="dropout1")(x)
    x = conv(64, "conv3")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Dropout(0.25, seed=seeds.next(), name="dropout2")(x)
    return conv(128, "last_conv")(x)


def _scratch(inputs: keras.KerasTensor, dropout: float, seeds: _Seeds) -> keras.KerasTensor:
    x = _scratch_convs(inputs, seeds)
    x = keras.layers.MaxPooling2D(name="pool3")(x)
    x = keras.layers.Dropout(0.25, seed=seeds.next(), name="dropout3")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(64, activation="relu", kernel_initializer=seeds.glorot(), name="fc")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, seed=seeds.next(), name="dropout_fc")(x)
    return _head(x, seeds)


def _scratch_gap(inputs: keras.KerasTensor, dropout: float, seeds: _Seeds) -> keras.KerasTensor:
    x = _scratch_convs(inputs, seeds, he_init=True)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, seed=seeds.next(), name="dropout_gap")(x)
    return _head(x, seeds)


def vgg16_preprocess(x: keras.KerasTensor) -> keras.KerasTensor:
    """``keras.applications.vgg16.preprocess_input`` from built-in parts (RGB->BGR, minus the ImageNet means).

    A ``keras.ops.flip`` node plus a ``Rescaling`` layer named ``"vgg16_preprocess"``: both serialise with the
    model, so ``keras.models.load_model`` needs no custom objects.
    """
    x = keras.ops.flip(x, axis=-1)
    return keras.layers.Rescaling(1.0, offset=[-m for m in VGG16_MEAN_BGR], name="vgg16_preprocess")(x)


def _vgg16(inputs: keras.KerasTensor, dropout: float, seeds: _Seeds) -> keras.KerasTensor:
    x = vgg16_preprocess(inputs)
    for block, (filters, n_convs) in enumerate(_VGG16_BLOCKS, start=1):
        for i in range(1, n_convs + 1):
            x = keras.layers.Conv2D(filters, 3, activation="relu", padding="same", kernel_initializer=seeds.glorot(),
                                    name=f"block{block}_conv{i}")(x)
        x = keras.layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, seed=seeds.next(), name="dropout_gap")(x)
    x = keras.layers.Dense(256, activation="relu", kernel_initializer=seeds.glorot(), name="head_dense")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, seed=seeds.next(), name="dropout_head")(x)
    return _head(x, seeds)


def set_trainable_from(model: keras.Model, layer_name: str | None) -> None:
    """Freeze every layer before ``layer_name`` and unfreeze it and all after it (None: everything trainable).

    The preprocessing layers have no weights, so they stay fixed whatever this does. Recompile afterwards.
    """
    names = [layer.name for layer in model.layers]
    if layer_name is not None and layer_name not in names:
        choices = [n for n in names if n in VGG16_CONV_LAYERS] or names
        raise ModelError(f"no layer {layer_name!r} to train from; choose one of {choices} (or None for all).")
    start = 0 if layer_name is None else names.index(layer_name)
    for i, layer in enumerate(model.layers):
        layer.trainable = i >= start


def build_model(
    name: str,
    *,
    image_size: int = 224,
    weights: str = "none",
    trainable_from: str | None = "block5_conv3",
    dropout: float = 0.5,
    seed: int = 0,
) -> keras.Model:
    """Build one of ``MODEL_NAMES`` for (image_size, image_size, 3) raw-pixel inputs, uncompiled.

    ``weights`` (a backbone spec, see covidxray.training.backbones) and ``trainable_from`` (layers before it are frozen;
    the original project trained only ``block5_conv3`` and the head) apply to ``vgg16`` only; the scratch
    models train every layer and accept only ``weights="none"``. ``seed`` fixes the initial weights and the
    dropout masks without touching global random state.
    """
    if name not in MODEL_NAMES:
        raise ModelError(f"unknown model {name!r}; choose one of {list(MODEL_NAMES)}.")
    if image_size < MIN_IMAGE_SIZE:
        raise ModelError(f"image size {image_size} is too small; use at least {MIN_IMAGE_SIZE} pixels.")
    if not 0.0 <= dropout < 1.0:
        raise ModelError(f"dropout must be in [0, 1), got {dropout}.")
    if name != "vgg16" and weights.lower() != "none":
        raise ModelError(f"the {name!r} model is trained from scratch and has no pretrained weights; "
                         f"pass --weights none (got {weights!r}).", usage=True)
    seeds = _Seeds(seed)
    inputs = keras.Input((image_size, image_size, 3), dtype="float32", name="image")
    builder = {"scratch": _scratch, "scratch-gap": _scratch_gap, "vgg16": _vgg16}[name]
    model = keras.Model(inputs, builder(inputs, dropout, seeds), name=name.replace("-", "_"))
    if name == "vgg16":
        load_vgg16_backbone_weights(model, weights)
        set_trainable_from(model, trainable_from)
    return model


def compile_model(model: keras.Model, lr: float, *, jit_compile: bool | str = "auto") -> keras.Model:
    """Adam + binary cross-entropy on probabilities (``from_logits=False``: the output is a sigmoid), with
    accuracy and ROC AUC as metrics (logged as ``accuracy``/``auc``, ``val_accuracy``/``val_auc``)."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr),
        loss=keras.losses.BinaryCrossentropy(from_logits=False),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
        jit_compile=jit_compile,
    )
    return model
