"""The tf.data input pipeline: image files -> (B, H, W, 3) float32 batches of raw pixel values in [0, 255].

Every image is decoded by the package's one reader, :func:`covidxray.data.images.open_grayscale` (the one
the baseline, the probes and the figures use), and resized by the same TensorFlow ops in training, evaluation
and CAM (``decode_gray``), so no model or figure sees pixels decoded differently from a model's training pixels.
Grayscale X-rays are replicated to three channels explicitly; model-specific scaling (x/255, VGG16 mean
subtraction) lives inside the models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from covidxray.data.images import open_grayscale
from covidxray.data.manifest import check_frame
from covidxray.errors import ImageError

AUTOTUNE = tf.data.AUTOTUNE
RESIZE_METHOD = "bilinear"
RESIZE_ANTIALIAS = True
"""How :func:`decode_gray` resizes every image to the model's square size (aspect ratio not kept); model cards
state it, so that a model can be used without covidxray."""


@dataclass(frozen=True)
class AugmentConfig:
    """Random training-time augmentation; the defaults reproduce the original project's ImageDataGenerator.

    ``width_shift``/``height_shift`` are fractions of the image size, ``zoom`` the +- fraction of independent
    x/y scaling (ImageDataGenerator's ``zoom_range=0.1`` -> [0.9, 1.1]). ``shear`` is an angle range in DEGREES,
    because that is how ImageDataGenerator reads ``shear_range``: the original 0.2 is a tiny +-0.2 degree shear.
    Empty borders are filled with the nearest pixel, ImageDataGenerator's default. ``augmenter`` composes all of
    it into ONE affine resampling per image, as ImageDataGenerator does (one bilinear pass, no extra smoothing,
    about 3x cheaper than chaining the Keras layers, 9x with ``make_dataset`` augmenting one channel before
    replicating it: augmentation competes with the model for the same cores); ``layers`` gives the equivalent
    chain of Keras layers.
    """

    width_shift: float = 0.2
    height_shift: float = 0.1
    shear: float = 0.2
    zoom: float = 0.1
    horizontal_flip: bool = True

    @classmethod
    def none(cls) -> AugmentConfig:
        """No augmentation at all."""
        return cls(width_shift=0.0, height_shift=0.0, shear=0.0, zoom=0.0, horizontal_flip=False)

    @property
    def is_identity(self) -> bool:
        """True when no transform is enabled."""
        return self == AugmentConfig.none()

    def to_dict(self) -> dict:
        """Plain dict, for config files."""
        return asdict(self)

    def layers(self, seed: int = 0) -> list[keras.layers.Layer]:
        """The same augmentation as a chain of Keras preprocessing layers, each seeded from ``seed``.

        For use inside a model; one resampling per layer (the input pipeline uses the cheaper ``augmenter``).
        """
        out: list[keras.layers.Layer] = []
        if self.horizontal_flip:
            out.append(keras.layers.RandomFlip("horizontal", seed=seed))
        if self.width_shift or self.height_shift:
            out.append(keras.layers.RandomTranslation(self.height_shift, self.width_shift, fill_mode="nearest",
                                                      seed=seed + 1))
        if self.shear:
            factor = math.tan(math.radians(abs(self.shear)))
            out.append(keras.layers.RandomShear(x_factor=factor, y_factor=0.0, fill_mode="nearest", seed=seed + 2))
        if self.zoom:
            out.append(keras.layers.RandomZoom(self.zoom, self.zoom, fill_mode="nearest", seed=seed + 3))
        return out

    def augmenter(self, seed: int = 0) -> Callable[[tf.Tensor], tf.Tensor]:
        """A function (B, H, W, C) float images -> the same, each image through one random affine transform.

        Draws come from a ``tf.random.Generator`` seeded with ``seed`` whose state advances with every call, so a
        fresh draw per batch and epoch, reproducible run to run when the calls are made in a fixed order (a
        sequential ``Dataset.map``). Output pixel (x, y) samples the input at ``A (p - c) + c + t`` (c: the image
        centre; A: shear times zoom; t: the shift), mirrored in x for flipped images; bilinear, nearest fill.
        """
        rng = tf.random.Generator.from_seed(seed)
        cfg = self

        def draw(n: tf.Tensor, bound: float) -> tf.Tensor:
            if not bound:
                return tf.zeros([n], tf.float32)
            return rng.uniform([n], -abs(bound), abs(bound), dtype=tf.float32)

        def apply(images: tf.Tensor) -> tf.Tensor:
            shape = tf.shape(images)
            n = shape[0]
            h, w = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
            tx = draw(n, cfg.width_shift) * w
            ty = draw(n, cfg.height_shift) * h
            shear = draw(n, math.radians(cfg.shear))
            zx, zy = 1.0 + draw(n, cfg.zoom), 1.0 + draw(n, cfg.zoom)
            flip = (rng.uniform([n], 0.0, 1.0, dtype=tf.float32) < 0.5) if cfg.horizontal_flip \
                else tf.zeros([n], tf.bool)
            cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
            a0, a1 = zx, -tf.sin(shear) * zy
            b0, b1 = tf.zeros_like(zx), tf.cos(shear) * zy
            a2 = cx + tx - (a0 * cx + a1 * cy)
            b2 = cy + ty - (b0 * cx + b1 * cy)
            sign = tf.where(flip, -1.0, 1.0)
            a2 = tf.where(flip, a0 * (w - 1.0) + a2, a2)
            b2 = tf.where(flip, b0 * (w - 1.0) + b2, b2)
            zeros = tf.zeros_like(zx)
            transforms = tf.stack([sign * a0, a1, a2, sign * b0, b1, b2, zeros, zeros], axis=1)
            out = tf.raw_ops.ImageProjectiveTransformV3(
                images=images, transforms=transforms, output_shape=shape[1:3], fill_value=0.0,
                interpolation="BILINEAR", fill_mode="NEAREST")
            return tf.clip_by_value(out, 0.0, 255.0)

        return apply


def resize_gray(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """An (h, w, 1) grayscale image in [0, 255] -> (s, s, 1) uint8, resized with antialiasing and rounded: the
    input contract's resize, for decoded files and for arrays alike."""
    image = tf.image.resize(image, [image_size, image_size], method=RESIZE_METHOD, antialias=RESIZE_ANTIALIAS)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _read_gray(path: bytes) -> np.ndarray:
    """One file -> (h, w, 1) uint8 through the package's one image reader (see :func:`decode_gray`)."""
    return np.asarray(open_grayscale(path.decode()), dtype=np.uint8)[..., None]


def decode_gray(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """Read one file -> (s, s, 1) uint8 grayscale, resized with antialiasing (the cached, compact form).

    Decoding is :func:`covidxray.data.images.open_grayscale`, the reader of the baseline, the probes and the
    figures, so every stage sees the same gray levels (TensorFlow's own RGB-to-gray rounds differently by one
    level), and DICOM files are read as the dataset build reads them."""
    image = tf.numpy_function(_read_gray, [path], tf.uint8, stateful=False)
    image.set_shape([None, None, 1])
    return resize_gray(image, image_size)


def arrays_to_model_input(arrays: Sequence[np.ndarray] | np.ndarray, image_size: int) -> np.ndarray:
    """Pixel arrays -> the model's (n, s, s, 3) float32 input, by the same resize as files. Each array is one
    grayscale image, (h, w) or (h, w, 1), with values in [0, 255] (8-bit pixel values; a float array in that
    range works too); (h, w, 3) RGB is converted to gray first (``tf.image.rgb_to_grayscale``)."""
    out = []
    for index, array in enumerate(list(arrays)):
        image = np.asarray(array)
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3) or min(image.shape[:2]) < 1:
            raise ValueError(f"image {index}: shape {image.shape}; give (h, w), (h, w, 1) or (h, w, 3) pixels")
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 255:
            raise ValueError(f"image {index}: values outside [0, 255]; give raw 8-bit pixel values")
        tensor = tf.constant(image, dtype=tf.float32)
        if image.shape[-1] == 3:
            tensor = tf.image.rgb_to_grayscale(tensor)
        out.append(gray_to_model_input(resize_gray(tensor, image_size)).numpy())
    return np.stack(out) if out else np.zeros((0, image_size, image_size, 3), np.float32)


def gray_to_model_input(image: tf.Tensor) -> tf.Tensor:
    """uint8 (..., 1) -> float32 (..., 3) raw pixel values in [0, 255], channels replicated explicitly."""
    return tf.image.grayscale_to_rgb(tf.cast(image, tf.float32))


def _path_dataset(paths: Sequence[str], image_size: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(tf.constant([str(p) for p in paths], dtype=tf.string))
    return ds.map(lambda p: decode_gray(p, image_size), num_parallel_calls=AUTOTUNE, deterministic=True)


def find_unreadable(paths: Sequence[str]) -> list[tuple[str, str]]:
    """Decode every file, one by one, and return (path, reason) for those the image reader cannot read.

    Slow; only used to name the culprit after a batched decode failed.
    """
    bad = []
    for p in paths:
        try:
            open_grayscale(p)
        except ImageError as exc:
            bad.append((str(p), exc.reason))
    return bad


IMAGE_READ_ERRORS: tuple[type[Exception], ...] = (tf.errors.InvalidArgumentError, tf.errors.NotFoundError,
                                                  tf.errors.UnknownError)
"""What iterating a dataset of image files raises when a file cannot be read (UnknownError: the image reader
raised inside ``tf.numpy_function``); callers pass it to :func:`raise_unreadable`, which names the file."""


def raise_unreadable(paths: Sequence[str], exc: Exception) -> NoReturn:
    """Turn a decode failure inside tf.data into an ImageError naming the first bad file."""
    bad = find_unreadable(paths)
    if bad:
        path, reason = bad[0]
        more = f" ({len(bad) - 1} more unreadable file(s))" if len(bad) > 1 else ""
        raise ImageError(path, f"{reason}{more}") from exc
    raise exc


def load_images(paths: Sequence[str | Path], image_size: int, batch_size: int = 64) -> np.ndarray:
    """Decode files into an (n, s, s, 3) float32 array in [0, 255] with exactly the training pipeline's ops."""
    paths = [str(p) for p in paths]
    if not paths:
        return np.zeros((0, image_size, image_size, 3), np.float32)
    ds = _path_dataset(paths, image_size).batch(batch_size).map(gray_to_model_input).prefetch(AUTOTUNE)
    try:
        return np.concatenate([b.numpy() for b in ds], axis=0)
    except IMAGE_READ_ERRORS as exc:
        raise_unreadable(paths, exc)


def make_dataset(
    df: pd.DataFrame,
    *,
    image_size: int = 224,
    batch_size: int = 32,
    training: bool = False,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    cache: str | None = "memory",
) -> tf.data.Dataset:
    """A dataset of (images (B, s, s, 3) float32 in [0, 255], labels (B, 1) float32) from manifest rows.

    Files are decoded and resized once, cached as compact uint8 grayscale (``cache="memory"``, a file path
    prefix for an on-disk cache, or None), shuffled with ``seed`` when ``training``, batched, and only then
    augmented on the graph (training only), so augmentation is fresh every epoch. A disk cache is keyed by its
    file name alone: use a new name when the data or the image size changes.
    """
    check_frame(df, ("filepath", "y"), what="the data frame", fix="read it with covidxray.data.manifest.read_manifest")
    paths = [str(p) for p in df["filepath"]]
    labels = np.asarray(df["y"], dtype=np.float32).reshape(-1, 1)
    images = _path_dataset(paths, image_size)
    ds = tf.data.Dataset.zip((images, tf.data.Dataset.from_tensor_slices(labels)))
    if cache == "memory":
        ds = ds.cache()
    elif cache:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        ds = ds.cache(str(cache))
    if training:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if training and augment is not None and not augment.is_identity:
        transform = augment.augmenter(seed)

        def apply(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            # One channel: the three model channels are equal, so augmenting before replicating is exact and
            # three times cheaper.
            return tf.image.grayscale_to_rgb(transform(tf.cast(x, tf.float32))), y

        # Sequential on purpose: the draws come from one stateful generator, and parallel calls would race for
        # it (nondeterministic). Each call transforms a whole batch, so this is not a bottleneck.
        ds = ds.map(apply, num_parallel_calls=None)
    else:
        ds = ds.map(lambda x, y: (gray_to_model_input(x), y), num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.prefetch(AUTOTUNE)
