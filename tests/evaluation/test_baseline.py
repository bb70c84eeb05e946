"""The thumbnail baseline: thumbnails are upright grayscale in [0, 1] and a trivial signal is learned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import covidxray.evaluation.baseline as baseline_module
from covidxray import metrics
from covidxray.errors import DataError, ImageError
from covidxray.evaluation.baseline import (
    baseline_probabilities,
    fit_baseline_with_threshold,
    fit_thumbnail_baseline,
    thumbnails,
)
from covidxray.metrics import binary_metrics


def _image_set(folder: Path, n_per_class: int, seed: int) -> pd.DataFrame:
    """Bright covid and dark normal noisy images of varied size and mode."""
    rng = np.random.default_rng(seed)
    rows = []
    for y, base in ((0, 70), (1, 150)):
        for i in range(n_per_class):
            h, w = (int(v) for v in rng.integers(40, 90, 2))
            arr = np.clip(base + rng.normal(0, 30, (h, w)), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
            if i % 3 == 1:
                img = img.convert("RGB")
            path = folder / f"{y}_{i}.png"
            img.save(path)
            rows.append({"filepath": str(path), "y": y})
    return pd.DataFrame(rows)


def test_thumbnails_shape_range_and_orientation(tmp_path: Path) -> None:
    arr = np.zeros((20, 40), dtype=np.uint8)
    arr[:, :20] = 255
    plain = tmp_path / "plain.png"
    Image.fromarray(arr).save(plain)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(rotated, exif=exif, quality=100)
    deep = tmp_path / "deep.png"
    Image.fromarray(arr.astype(np.uint16) * 16).save(deep)

    x = thumbnails([plain, rotated, deep], size=8)
    assert x.shape == (3, 64) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    plain_img, rotated_img, deep_img = (row.reshape(8, 8) for row in x)
    assert plain_img[:, 0].mean() > 0.9 and plain_img[:, -1].mean() < 0.1
    assert rotated_img[0, :].mean() > 0.8 and rotated_img[-1, :].mean() < 0.2
    assert deep_img[:, 0].mean() > 0.9
    assert thumbnails([], size=8).shape == (0, 64)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError, match=r"broken\.png: cannot be read as an image .*covidxray data"):
        thumbnails([bad])
    with pytest.raises(ImageError, match="missing.png"):
        thumbnails([tmp_path / "missing.png"])


def test_baseline_separates_bright_from_dark(tmp_path: Path) -> None:
    train = _image_set(tmp_path, 20, seed=0)
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    test = _image_set(test_dir, 10, seed=1)
    model = fit_thumbnail_baseline(train, size=16, seed=0)
    p = baseline_probabilities(model, test, size=16)
    assert p.shape == (20,) and p.dtype == np.float64
    m = binary_metrics(test["y"], p)
    assert m["accuracy"] >= 0.9 and m["roc_auc"] >= 0.95
    again = baseline_probabilities(fit_thumbnail_baseline(train, size=16, seed=0), test, size=16)
    np.testing.assert_allclose(p, again)


def test_baseline_input_errors(tmp_path: Path) -> None:
    one_class = _image_set(tmp_path, 3, seed=0).query("y == 1")
    with pytest.raises(DataError, match="one class"):
        fit_thumbnail_baseline(one_class, size=8)
    with pytest.raises(DataError, match="filepath"):
        fit_thumbnail_baseline(pd.DataFrame({"y": [0, 1]}))
    with pytest.raises(DataError, match="the training table is empty"):
        fit_thumbnail_baseline(pd.DataFrame({"filepath": [], "y": []}))
    with pytest.raises(DataError, match=r"the evaluation table lacks column\(s\) \['filepath'\]"):
        baseline_probabilities(None, pd.DataFrame({"y": [0]}))  # type: ignore[arg-type]


def test_baseline_threshold_is_the_one_rule(tmp_path: Path) -> None:
    """The baseline's threshold comes from metrics.choose_threshold itself, on its validation probabilities: a
    cut point between two scores (the old baseline rule returned an actual score, 0.80 on the example)."""
    assert baseline_module.choose_threshold is metrics.choose_threshold
    assert metrics.choose_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])["threshold"] == pytest.approx(0.6)
    train = _image_set(tmp_path, 8, seed=0)
    (tmp_path / "val").mkdir()
    val = _image_set(tmp_path / "val", 3, seed=1)
    model, threshold = fit_baseline_with_threshold(train, val, size=8)
    p = baseline_probabilities(model, val, size=8)
    assert threshold == metrics.choose_threshold(val["y"], p)["threshold"]
    s = np.unique(p)
    assert threshold not in set(p) and any(a < threshold < b for a, b in zip(s[:-1], s[1:], strict=True))
    with pytest.warns(UserWarning, match="one class only"):
        _, fallback = fit_baseline_with_threshold(train, val[val["y"] == 1], size=8)
    assert fallback == 0.5
