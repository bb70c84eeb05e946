"""The 2020 project's training pipeline, reimplemented faithfully on today's Keras (the baseline of the bench).

As in its notebooks (``Models/Scratch Model.ipynb``, ``Models/Transfer Learning Model.ipynb``):
``ImageDataGenerator(rescale=1/255, width_shift_range=0.2, height_shift_range=0.1, shear_range=0.2,
zoom_range=0.1, horizontal_flip=True)`` reading the image files with ``flow_from_directory`` every epoch
(``target_size=(224, 224)``, ``batch_size=32``, ``class_mode="binary"``; validation ``rescale=1/255``, batch
24), Adam with Keras' defaults, binary cross-entropy, a weights checkpoint written every epoch; the
Sequential scratch CNN with the 2020 dropouts; VGG16 (``include_top=False``) with the 2020 head
(GAP, Flatten, Dropout 0.5, Dense 256, Dropout 0.5, Dense 1 sigmoid) fed ``x/255`` and its first 17 layers
(everything before ``block5_conv3``) frozen, so the frozen backbone is recomputed on every image of every
step.

Deliberate differences, the same for both sides of the comparison: the folders are a built dataset's
``train``/``val``/``test`` (the original validated on its test folder), class order is fixed to
normal=0/covid=1 (the original's alphabetical order made covid=0), and the backbone weights come from a
covidxray weights spec (``hed`` offline) instead of a download.
"""

from __future__ import annotations

import time
from pathlib import Path

import keras
import numpy as np
from tensorflow.keras.preprocessing.image import ImageDataGenerator

from bench.measure import EpochTimer
from covidxray.training.backbones import read_vgg16_weights

CLASSES = ["normal", "covid"]
TRAIN_AUGMENT = {"rescale": 1.0 / 255, "width_shift_range": 0.2, "height_shift_range": 0.1, "shear_range": 0.2,
                 "zoom_range": 0.1, "horizontal_flip": True}
FROZEN_LAYERS = 17
"""``for i in range(17): vgg.layers[i].trainable = False``: input and every layer before block5_conv3."""


def scratch_model(image_size: int = 224) -> keras.Model:
    """The 2020 Sequential CNN, layer for layer, compiled as in the notebook."""
    model = keras.Sequential([
        keras.Input((image_size, image_size, 3)),
        keras.layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
        keras.layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
        keras.layers.MaxPooling2D(pool_size=(2, 2)),
        keras.layers.Dropout(0.5),
        keras.layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
        keras.layers.MaxPooling2D(pool_size=(2, 2)),
        keras.layers.Dropout(0.25),
        keras.layers.Conv2D(128, kernel_size=(3, 3), activation="relu"),
        keras.layers.MaxPooling2D(pool_size=(2, 2)),
        keras.layers.Dropout(0.3),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dropout(0.25),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(loss="binary_crossentropy", optimizer="adam", metrics=["accuracy"])
    return model


def vgg16_model(image_size: int = 224, weights: str = "hed") -> keras.Model:
    """The 2020 VGG16 transfer model (inputs x/255, no VGG preprocessing), backbone weights from ``weights``."""
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    conv = read_vgg16_weights(weights)
    if conv is not None:
        for name, values in conv.items():
            base.get_layer(name).set_weights(values)
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(0.5)(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    x = keras.layers.Dropout(0.5)(x)
    out = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(base.input, out)
    for layer in model.layers[:FROZEN_LAYERS]:
        layer.trainable = False
    model.compile(loss="binary_crossentropy", optimizer="adam", metrics=["accuracy"])
    return model


def build(kind: str, image_size: int, weights: str) -> keras.Model:
    """``kind`` is "scratch" or "vgg16"."""
    return scratch_model(image_size) if kind == "scratch" else vgg16_model(image_size, weights)


def generators(dataset_dir: str | Path, image_size: int, seed: int = 0, batch_size: int = 32) -> tuple:
    """(train, val) directory iterators of a built dataset, augmenting the training images as in 2020."""
    root = Path(dataset_dir)
    train = ImageDataGenerator(**TRAIN_AUGMENT).flow_from_directory(
        str(root / "train"), target_size=(image_size, image_size), batch_size=batch_size, class_mode="binary",
        classes=CLASSES, seed=seed)
    val = ImageDataGenerator(rescale=1.0 / 255).flow_from_directory(
        str(root / "val"), target_size=(image_size, image_size), batch_size=24, class_mode="binary",
        classes=CLASSES, seed=seed)
    return train, val


def train(model: keras.Model, dataset_dir: str | Path, image_size: int, epochs: int, checkpoint_dir: str | Path,
          seed: int = 0) -> dict:
    """``model.fit`` on the generators as the notebook did; per-epoch and total wall seconds."""
    train_gen, val_gen = generators(dataset_dir, image_size, seed)
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    checkpoint = keras.callbacks.ModelCheckpoint(str(Path(checkpoint_dir) / "model_{epoch}.weights.h5"),
                                                 monitor="val_accuracy", save_weights_only=True)
    timer = EpochTimer()
    t0 = time.perf_counter()
    model.fit(train_gen, epochs=epochs, validation_data=val_gen, callbacks=[checkpoint, timer], verbose=0)
    return {"epoch_seconds": timer.seconds, "total_seconds": time.perf_counter() - t0,
            "n_train": int(train_gen.samples)}


def predict_folder(model: keras.Model, folder: str | Path, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, P(covid)) for every image under ``folder/{normal,covid}``, read and scaled the 2020 way."""
    it = ImageDataGenerator(rescale=1.0 / 255).flow_from_directory(
        str(folder), target_size=(image_size, image_size), batch_size=32, class_mode="binary", classes=CLASSES,
        shuffle=False)
    prob = model.predict(it, verbose=0)[:, 0]
    return it.classes.astype(int), prob.astype(np.float64)


def load_folder(folder: str | Path, image_size: int) -> np.ndarray:
    """Every image under ``folder/{normal,covid}`` as the original model's input (x/255), in a float32 array."""
    it = ImageDataGenerator(rescale=1.0 / 255).flow_from_directory(
        str(folder), target_size=(image_size, image_size), batch_size=64, class_mode="binary", classes=CLASSES,
        shuffle=False)
    return np.concatenate([it[i][0] for i in range(len(it))]).astype(np.float32)
