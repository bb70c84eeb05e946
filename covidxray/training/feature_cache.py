"""Frozen-backbone caching: compute the frozen part of VGG16 once, train only the trainable tail on its output.

With everything before ``block5_conv3`` frozen (the original project's choice), close to 90 % of the FLOPs of
a training step are the frozen forward pass, whose result never changes. Training end to end recomputes it for
every image in every epoch. Here it runs once per distinct input: once per validation image and, with
augmentation on, once per cached augmented *view* of each training image (view 0 is the image itself, views
1.. are random ImageDataGenerator-style transforms; each epoch draws one view per image). Training activations
are stored as float16 (14x14x512 at 224 px: 196 KiB per view; covidxray.runs.train keeps the few validation ones in
float32), in memory or, past ``memory_limit`` bytes or on request, in a file read back batch by batch, so
memory does not grow with the data set beyond that cache.

The model is split without copying weights: ``frozen_part`` and ``tail_part`` call the very layer objects of
the full flat model, so training the tail trains the full model, which is saved as usual and takes images.

``frozen -> float16 -> tail`` equals the full model up to the float16 rounding of the activations; the tests
check this against the uncached model.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from covidxray.errors import ModelError
from covidxray.progress import progress_bar
from covidxray.tfenv import traced
from covidxray.training.compute_dtype import with_precision
from covidxray.training.pipeline import AugmentConfig, make_dataset

FEATURE_DTYPE = np.float16
FEATURE_MEMORY_LIMIT = 2 * 1024**3
"""Feature caches larger than this (bytes) go to a file instead of memory."""

CACHEABLE_FROM = "block5_conv3"
"""Caching applies when the first trainable layer is this one or a later one."""


def can_cache(model: keras.Model, trainable_from: str | None) -> bool:
    """Whether ``model`` trained from ``trainable_from`` has a frozen prefix worth caching.

    True for a vgg16 model whose first trainable layer is ``block5_conv3`` or later and whose every layer
    before it is frozen (so its output is a fixed function of the image).
    """
    names = [layer.name for layer in model.layers]
    if trainable_from is None or trainable_from not in names or CACHEABLE_FROM not in names:
        return False
    start = names.index(trainable_from)
    if start < names.index(CACHEABLE_FROM):
        return False
    return not any(layer.trainable and layer.trainable_weights for layer in model.layers[:start])


def _cut_index(model: keras.Model, trainable_from: str) -> int:
    names = [layer.name for layer in model.layers]
    if trainable_from not in names:
        raise ModelError(f"no layer {trainable_from!r} to split the model at.")
    start = names.index(trainable_from)
    if start < 2:
        raise ModelError(f"{trainable_from!r} is the model's first layer: there is no frozen part to cache.")
    return start


def frozen_part(model: keras.Model, trainable_from: str) -> keras.Model:
    """Images -> activations of the layer just before ``trainable_from`` (sharing the model's layers)."""
    start = _cut_index(model, trainable_from)
    return keras.Model(model.input, model.layers[start - 1].output, name=f"{model.name}_frozen")


def tail_part(model: keras.Model, trainable_from: str) -> keras.Model:
    """Activations -> P(covid): ``trainable_from`` and every later layer, the very layer objects of ``model``.

    Only for a model whose layers from the cut on form a plain chain and are used in this model alone (a
    freshly built one): the tail is rebuilt by calling them in order.
    """
    start = _cut_index(model, trainable_from)
    chain = model.layers[start - 1:]
    for prev, layer in zip(chain, chain[1:], strict=False):
        if layer.input is not prev.output:
            raise ModelError(f"{model.name}: layer {layer.name!r} does not follow {prev.name!r} directly; only a "
                             "plain chain of layers after the cut can be trained on cached activations.")
    shape = tuple(model.layers[start - 1].output.shape[1:])
    x = inputs = keras.Input(shape, dtype="float32", name="features")
    for layer in model.layers[start:]:
        x = layer(x)
    return keras.Model(inputs, x, name=f"{model.name}_tail")


def conv_flops(model: keras.Model) -> float:
    """Multiply-add FLOPs (2 per MAC) of the model's Conv2D and Dense layers for one input."""
    total = 0.0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            out = layer.output.shape
            k = int(np.prod(layer.kernel_size))
            total += 2.0 * out[1] * out[2] * out[3] * k * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            total += 2.0 * layer.input.shape[-1] * layer.units
    return total


class FeatureStore:
    """Activations (float16 unless ``dtype`` says otherwise), ``views`` x ``n`` items of ``shape``: a numpy
    array, or a file read with pread.

    The file form (a new, uniquely named file in ``directory``) keeps resident memory flat (no memory map whose
    pages would count as resident); it is deleted by ``close``.
    """

    def __init__(self, n: int, views: int, shape: tuple[int, ...], directory: str | Path | None = None,
                 name: str = "features", dtype: type = FEATURE_DTYPE) -> None:
        self.n, self.views, self.shape = int(n), int(views), tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.item_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.path: Path | None = None
        self._array: np.ndarray | None = None
        self._fd: int | None = None
        if directory is None:
            self._array = np.zeros((self.views, self.n, *self.shape), self.dtype)
        else:
            Path(directory).mkdir(parents=True, exist_ok=True)
            self._fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".f16", dir=directory)
            self.path = Path(path)
            os.ftruncate(self._fd, self.nbytes)

    @property
    def nbytes(self) -> int:
        """Size of the whole cache in bytes."""
        return self.views * self.n * self.item_bytes

    @property
    def on_disk(self) -> bool:
        """True when the activations live in a file."""
        return self.path is not None

    def write(self, view: int, start: int, batch: np.ndarray) -> None:
        """Store ``batch`` (k, *shape) as items ``start .. start+k-1`` of ``view``."""
        batch = np.ascontiguousarray(batch, dtype=self.dtype)
        if self._array is not None:
            self._array[view, start:start + len(batch)] = batch
            return
        offset = (view * self.n + start) * self.item_bytes
        data = batch.tobytes()
        while data:
            written = os.pwrite(self._fd, data, offset)
            data, offset = data[written:], offset + written

    def read(self, views: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Items ``index[i]`` of view ``views[i]``, as a float32 (k, *shape) array."""
        views, index = np.asarray(views, np.int64), np.asarray(index, np.int64)
        if self._array is not None:
            return self._array[views, index].astype(np.float32)
        if self._fd is None:
            raise ModelError("the feature cache has been closed.")
        out = np.empty((len(index), *self.shape), self.dtype)
        flat = out.reshape(len(index), -1)
        for i, (v, j) in enumerate(zip(views, index, strict=True)):
            raw = os.pread(self._fd, self.item_bytes, int((v * self.n + j) * self.item_bytes))
            flat[i] = np.frombuffer(raw, self.dtype)
        return out.astype(np.float32)

    def close(self) -> None:
        """Release the memory or delete the file."""
        self._array = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.path.unlink(missing_ok=True)


@dataclass
class ExtractionStats:
    """What one extraction cost: images through the frozen part, seconds, and the implied GFLOP/s."""

    images: int
    seconds: float
    gflop_per_image: float

    @property
    def images_per_second(self) -> float:
        """Frozen-part forward passes per second."""
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    @property
    def gflops(self) -> float:
        """Achieved GFLOP/s of the frozen part's convolutions."""
        return self.images_per_second * self.gflop_per_image

    def to_dict(self) -> dict:
        """Plain dict, for timing files."""
        return {"images": self.images, "seconds": self.seconds, "gflop_per_image": self.gflop_per_image,
                "images_per_second": self.images_per_second, "gflops": self.gflops}


def extractor(frozen: keras.Model, jit_compile: bool = False, dtype: type = FEATURE_DTYPE,
              precision: str | None = None) -> Callable[[tf.Tensor], tf.Tensor]:
    """A compiled call images -> activations of ``frozen`` as ``dtype`` (inference mode, any batch size),
    computed in ``precision`` (float32, bfloat16, float16, auto; None: the model's own policy)."""
    frozen = with_precision(frozen, precision)
    spec = tf.TensorSpec((None, *frozen.input_shape[1:]), tf.float32)
    out = tf.as_dtype(np.dtype(dtype))
    return traced(lambda x: tf.cast(frozen(x, training=False), out), spec, jit_compile=bool(jit_compile))


def extract_features(
    frozen: keras.Model,
    df: pd.DataFrame,
    *,
    image_size: int,
    views: int = 1,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    batch_size: int = 32,
    directory: str | Path | None = None,
    on_disk: bool = False,
    name: str = "features",
    memory_limit: int = FEATURE_MEMORY_LIMIT,
    jit_compile: bool = False,
    dtype: type = FEATURE_DTYPE,
    precision: str | None = None,
) -> tuple[FeatureStore, ExtractionStats]:
    """Activations of ``frozen`` for every row of ``df`` (in order): view 0 plain, views 1.. augmented.

    Each image is decoded once per call and streamed through the frozen part ``views`` times (augmentation
    seeded with ``seed``, drawn in a fixed order: same seed, same views). The store lives in memory unless
    ``on_disk`` or it would exceed ``memory_limit`` bytes; then in a new file ``directory/<name>-*.f16``.
    ``precision`` is the compute precision of the frozen part (None: its own policy; bfloat16 about doubles the
    throughput on a CPU with bf16 instructions); the store holds ``dtype`` whatever it is.
    Decode errors propagate as tf.errors (the caller names the file).
    """
    views = max(1, int(views))
    if views > 1 and (augment is None or augment.is_identity):
        raise ModelError("more than one cached view needs augmentation (augment=True).")
    shape = tuple(frozen.output.shape[1:])
    item_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    disk = on_disk or views * len(df) * item_bytes > memory_limit
    if disk and directory is None:
        raise ModelError(f"the feature cache needs {views * len(df) * item_bytes / 2**30:.1f} GiB, more than the "
                         f"{memory_limit / 2**30:.1f} GiB memory limit: give a directory for it.")
    store = FeatureStore(len(df), views, shape, directory if disk else None, name=name, dtype=dtype)
    run = extractor(frozen, jit_compile, dtype, precision)
    transform = augment.augmenter(seed) if views > 1 else None
    ds = make_dataset(df, image_size=image_size, batch_size=batch_size, training=False, cache=None)
    gflop = conv_flops(frozen) / 1e9
    count, start, t0 = 0, 0, time.perf_counter()
    try:
        for x, _ in progress_bar(ds, desc=name, total=-(-len(df) // batch_size), unit="batch"):
            store.write(0, start, run(x).numpy())
            if transform is not None:
                gray = x[..., :1]
                for v in range(1, views):
                    store.write(v, start, run(tf.image.grayscale_to_rgb(transform(gray))).numpy())
            start += len(x)
            count += len(x) * views
    except BaseException:
        store.close()
        raise
    return store, ExtractionStats(images=count, seconds=time.perf_counter() - t0, gflop_per_image=gflop)


class FeatureBatches:
    """Batches of (activations float32, labels (k, 1)) from a FeatureStore, as a ``tf.data.Dataset``.

    Training: every pass shuffles the items and draws one stored view per item, both from a numpy generator
    seeded with (``seed``, ``epoch``); pass ``callback()`` to the training loop so that ``epoch`` follows its
    epoch index (a resumed run then sees the same batches as an uninterrupted one). Otherwise: view 0, in order.
    """

    def __init__(self, store: FeatureStore, labels: np.ndarray, *, batch_size: int, training: bool, seed: int = 0,
                 first_epoch: int = 0) -> None:
        self.store, self.batch_size, self.training, self.seed = store, int(batch_size), training, int(seed)
        self.labels = np.asarray(labels, np.float32).reshape(-1, 1)
        if len(self.labels) != store.n:
            raise ModelError(f"{len(self.labels)} labels for {store.n} cached items.")
        self.epoch = int(first_epoch)

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(item index, view) for every position of ``epoch``'s pass."""
        n = self.store.n
        if not self.training:
            return np.arange(n), np.zeros(n, np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(n), rng.integers(0, self.store.views, n)

    def callback(self) -> keras.callbacks.Callback:
        """A Keras callback that sets ``epoch`` at the start of every training epoch."""
        batches = self

        class _Epoch(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
                batches.epoch = int(epoch)

        return _Epoch()

    def _batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        index, views = self.order(self.epoch)
        for i in range(0, len(index), self.batch_size):
            sl = slice(i, i + self.batch_size)
            yield self.store.read(views[sl], index[sl]), self.labels[index[sl]]

    def dataset(self) -> tf.data.Dataset:
        """The batches, one pass per iteration, with a known length and prefetching."""
        spec = (tf.TensorSpec((None, *self.store.shape), tf.float32), tf.TensorSpec((None, 1), tf.float32))
        steps = -(-self.store.n // self.batch_size)
        ds = tf.data.Dataset.from_generator(self._batches, output_signature=spec)
        return ds.apply(tf.data.experimental.assert_cardinality(steps)).prefetch(2)


def predict_cached(tail: keras.Model, store: FeatureStore, batch_size: int = 32, view: int = 0) -> np.ndarray:
    """P(covid) of ``tail`` for every item of one view of ``store``, in order, through a compiled call."""
    spec = tf.TensorSpec((None, *store.shape), tf.float32)
    fn = traced(lambda x: tail(x, training=False), spec)
    out = []
    for i in range(0, store.n, batch_size):
        index = np.arange(i, min(i + batch_size, store.n))
        out.append(fn(tf.constant(store.read(np.full(len(index), view), index))).numpy()[:, 0])
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)
