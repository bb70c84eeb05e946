"""The tf.data input pipeline: decoding, shapes, ranges, augmentation only in training, caches."""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from covidxray.errors import DataError, ImageError
from covidxray.training.pipeline import AugmentConfig, load_images, make_dataset

SIZE = 32


def _write(path: Path, mode: str, size: tuple[int, int], seed: int) -> Path:
    """A textured 8-bit image (a gradient plus noise) saved in the given Pillow mode."""
    rng = np.random.default_rng(seed)
    w, h = size
    gray = np.add.outer(np.linspace(20, 200, h), np.linspace(0, 40, w)) + rng.normal(0, 10, (h, w))
    img = Image.fromarray(gray.clip(0, 255).astype(np.uint8), mode="L")
    if mode != "L":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    """One file per supported kind, all of different sizes."""
    return [
        _write(tmp_path / "gray.png", "L", (50, 40), 0),
        _write(tmp_path / "rgb.png", "RGB", (33, 61), 1),
        _write(tmp_path / "rgba.png", "RGBA", (70, 45), 2),
        _write(tmp_path / "gray.jpg", "L", (64, 64), 3),
        _write(tmp_path / "rgb.jpg", "RGB", (40, 90), 4),
    ]


@pytest.fixture
def frame(tmp_path: Path) -> pd.DataFrame:
    """Twelve distinct grayscale images with alternating labels, as a manifest-like frame."""
    paths = [_write(tmp_path / "ds" / f"img_{i}.png", "L", (40 + i, 48), 10 + i) for i in range(12)]
    return pd.DataFrame({"filepath": [str(p) for p in paths], "y": [i % 2 for i in range(12)]})


def test_load_images_all_modes_to_three_equal_channels(files: list[Path]) -> None:
    x = load_images(files, SIZE)
    assert x.shape == (len(files), SIZE, SIZE, 3) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 255.0
    assert np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2])
    for i, path in enumerate(files):
        ref = np.asarray(Image.open(path).convert("L").resize((SIZE, SIZE), Image.BILINEAR), np.float32)
        assert np.abs(ref - x[i, ..., 0]).mean() < 3.0, path.name  # same picture as Pillow sees it


def test_load_images_names_an_unreadable_file(tmp_path: Path, files: list[Path]) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(ImageError) as info:
        load_images([*files, bad], SIZE)
    assert info.value.path == str(bad)


def test_dataset_shapes_labels_and_order(frame: pd.DataFrame) -> None:
    ds = make_dataset(frame, image_size=SIZE, batch_size=5, training=False)
    batches = list(ds)
    assert [len(x) for x, _ in batches] == [5, 5, 2]
    x, y = batches[0]
    assert x.shape == (5, SIZE, SIZE, 3) and x.dtype.name == "float32"
    assert y.shape == (5, 1) and y.dtype.name == "float32"
    labels = np.concatenate([y.numpy()[:, 0] for _, y in batches])
    assert labels.tolist() == frame["y"].astype(float).tolist()
    images = np.concatenate([x.numpy() for x, _ in batches])
    assert np.array_equal(images, load_images(frame["filepath"], SIZE))  # same ops as evaluation


def test_augmentation_only_in_training(frame: pd.DataFrame) -> None:
    ref = load_images(frame["filepath"], SIZE)
    plain = np.concatenate([x for x, _ in make_dataset(frame, image_size=SIZE, batch_size=4,
                                                       augment=AugmentConfig(), training=False)])
    assert np.array_equal(plain, ref)
    aug = make_dataset(frame, image_size=SIZE, batch_size=4, augment=AugmentConfig(), training=True, seed=1)
    x_aug = np.concatenate([x for x, _ in aug])
    assert x_aug.shape == ref.shape and x_aug.min() >= 0.0 and x_aug.max() <= 255.0
    assert not any(np.array_equal(a, r) for a in x_aug for r in ref)
    shuffled = make_dataset(frame, image_size=SIZE, batch_size=4, augment=AugmentConfig.none(), training=True)
    x_shuf = np.concatenate([x for x, _ in shuffled])
    assert all(any(np.array_equal(a, r) for r in ref) for a in x_shuf)  # only reordered


def test_augmentation_is_seeded(frame: pd.DataFrame) -> None:
    def epochs(seed: int) -> list[np.ndarray]:
        ds = make_dataset(frame, image_size=SIZE, batch_size=6, augment=AugmentConfig(), training=True, seed=seed)
        return [x.numpy() for _ in range(2) for x, _ in ds]

    a, b = epochs(3), epochs(3)
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert not np.array_equal(a[0], a[2])  # a new draw every epoch


def test_augment_config_reproduces_the_original() -> None:
    cfg = AugmentConfig()
    assert (cfg.width_shift, cfg.height_shift, cfg.shear, cfg.zoom, cfg.horizontal_flip) == (0.2, 0.1, 0.2, 0.1, True)
    kinds = {type(layer).__name__: layer for layer in cfg.layers(seed=0)}
    assert set(kinds) == {"RandomFlip", "RandomTranslation", "RandomShear", "RandomZoom"}
    assert kinds["RandomShear"].x_factor[1] == pytest.approx(math.tan(math.radians(0.2)))
    assert AugmentConfig.none().is_identity and AugmentConfig.none().layers() == []
    assert isinstance(kinds["RandomZoom"], keras.layers.Layer)


def test_disk_cache_serves_images_without_the_files(tmp_path: Path, frame: pd.DataFrame) -> None:
    cache = tmp_path / "cache" / "train"
    first = np.concatenate([x for x, _ in make_dataset(frame, image_size=SIZE, batch_size=4, cache=str(cache))])
    assert list(cache.parent.glob("train*.index"))
    for p in frame["filepath"]:
        Path(p).unlink()
    again = np.concatenate([x for x, _ in make_dataset(frame, image_size=SIZE, batch_size=4, cache=str(cache))])
    assert np.array_equal(first, again)


def test_no_cache_and_bad_frames(frame: pd.DataFrame) -> None:
    x, _ = next(iter(make_dataset(frame, image_size=SIZE, batch_size=3, cache=None)))
    assert x.shape == (3, SIZE, SIZE, 3)
    with pytest.raises(DataError):
        make_dataset(frame.drop(columns="y"), image_size=SIZE)
    with pytest.raises(DataError):
        make_dataset(frame.iloc[:0], image_size=SIZE)


def test_augmenter_flip_only_mirrors_or_keeps_each_image() -> None:
    x = np.random.default_rng(0).uniform(0, 255, (16, 20, 24, 1)).astype(np.float32)
    flip = AugmentConfig(width_shift=0.0, height_shift=0.0, shear=0.0, zoom=0.0, horizontal_flip=True)
    out = flip.augmenter(seed=1)(tf.constant(x)).numpy()
    mirrored = [np.allclose(o, i[:, ::-1], atol=1e-3) for o, i in zip(out, x, strict=True)]
    kept = [np.allclose(o, i, atol=1e-3) for o, i in zip(out, x, strict=True)]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True)) and any(mirrored) and any(kept)


def test_augmenter_shifts_along_the_right_axes() -> None:
    rows = np.broadcast_to(np.linspace(0, 255, 20)[:, None, None], (4, 20, 24, 1)).astype(np.float32)
    cols = np.broadcast_to(np.linspace(0, 255, 24)[None, :, None], (4, 20, 24, 1)).astype(np.float32)
    width = AugmentConfig(width_shift=0.3, height_shift=0.0, shear=0.0, zoom=0.0, horizontal_flip=False)
    height = AugmentConfig(width_shift=0.0, height_shift=0.3, shear=0.0, zoom=0.0, horizontal_flip=False)
    # a width shift moves columns only, so horizontal stripes stay put (nearest fill), and vice versa
    np.testing.assert_allclose(width.augmenter(0)(tf.constant(rows)).numpy(), rows, atol=1e-3)
    assert not np.allclose(width.augmenter(0)(tf.constant(cols)).numpy(), cols, atol=1.0)
    np.testing.assert_allclose(height.augmenter(0)(tf.constant(cols)).numpy(), cols, atol=1e-3)
    assert not np.allclose(height.augmenter(0)(tf.constant(rows)).numpy(), rows, atol=1.0)


def test_augmented_training_batches_keep_equal_channels(frame: pd.DataFrame) -> None:
    ds = make_dataset(frame, image_size=SIZE, batch_size=6, augment=AugmentConfig(), training=True, seed=2)
    for x, _ in ds:
        x = x.numpy()
        assert x.shape[-1] == 3 and np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2])
