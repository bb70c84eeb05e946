"""The trivial baseline every results table carries: logistic regression on tiny grayscale thumbnails.

If a deep network barely beats a linear model on 32 x 32 pixels, its accuracy more likely reflects how the
sources differ (exposure, borders, text markers, children vs adults) than COVID-19 findings.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from covidxray.errors import DataError
from covidxray.images import to_grayscale_uint8


def open_gray(path: str | Path) -> Image.Image:
    """Open an image upright (EXIF orientation applied) as 8-bit grayscale ("L"), as the dataset build does.

    16-bit and float images are rescaled by their range, transparent ones composited over black.
    """
    try:
        with Image.open(path) as im:
            return to_grayscale_uint8(ImageOps.exif_transpose(im))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"{path}: cannot read the image ({exc}). Remove or replace the file, "
            "or rebuild the dataset with `covidxray data`."
        ) from exc


def thumbnails(paths: Iterable[str | Path], size: int = 32) -> np.ndarray:
    """Flattened ``size x size`` grayscale thumbnails in [0, 1], shape (n, size * size), float32.

    Each image is opened upright, converted to grayscale and resized with bilinear filtering (no aspect
    ratio preserved: the baseline should see what a squashing input pipeline sees).
    """
    if size < 1:
        raise ValueError("size must be at least 1.")
    rows = [
        np.asarray(open_gray(path).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32).ravel()
        for path in paths
    ]
    if not rows:
        return np.zeros((0, size * size), dtype=np.float32)
    return np.stack(rows) / np.float32(255.0)


def _check_frame(df: pd.DataFrame, what: str) -> None:
    missing = [c for c in ("filepath", "y") if c not in df.columns]
    if missing:
        raise DataError(
            f"the {what} table lacks column(s) {missing}; "
            "pass a frame from read_manifest() or load_labeled()."
        )
    if df.empty:
        raise DataError(f"the {what} table is empty; the baseline needs images.")


def fit_thumbnail_baseline(train_df: pd.DataFrame, size: int = 32, seed: int = 0) -> Pipeline:
    """Fit standardised logistic regression (L2, C = 1, fixed random_state) on ``size`` px thumbnails.

    Uses ``train_df["filepath"]`` and ``train_df["y"]`` (1 = covid); both classes must be present.
    """
    _check_frame(train_df, "training")
    y = train_df["y"].to_numpy(dtype=np.int64)
    if np.unique(y).size < 2:
        raise DataError(
            "the training table holds only one class; the baseline needs covid and normal images. "
            "Rebuild the dataset with both classes in the training split."
        )
    model = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=1.0, max_iter=5000, random_state=seed),
    )
    model.fit(thumbnails(train_df["filepath"], size), y)
    return model


def baseline_probabilities(model: Pipeline, df: pd.DataFrame, size: int = 32) -> np.ndarray:
    """P(covid) for each row of ``df`` (its ``filepath`` column), float64 of length len(df)."""
    if "filepath" not in df.columns:
        raise DataError("the evaluation table lacks a 'filepath' column; pass a frame from load_labeled().")
    if df.empty:
        return np.zeros(0, dtype=np.float64)
    covid = int(np.flatnonzero(model.classes_ == 1)[0])
    return model.predict_proba(thumbnails(df["filepath"], size))[:, covid].astype(np.float64)


def fit_baseline_with_threshold(
    train_df: pd.DataFrame, val_df: pd.DataFrame, size: int = 32, seed: int = 0
) -> tuple[Pipeline, float]:
    """The baseline fitted on train and its decision threshold chosen on validation (Youden's J), as for the CNNs."""
    from covidxray.metrics import choose_threshold

    model = fit_thumbnail_baseline(train_df, size=size, seed=seed)
    return model, choose_threshold(val_df["y"], baseline_probabilities(model, val_df, size=size))
