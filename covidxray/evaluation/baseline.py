"""The trivial baseline every results table carries: logistic regression on tiny grayscale thumbnails.

If a deep network barely beats a linear model on 32 x 32 pixels, its accuracy more likely reflects how the
sources differ (exposure, borders, text markers, children vs adults) than COVID-19 findings.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from covidxray.data.images import open_grayscale
from covidxray.data.manifest import check_frame
from covidxray.errors import DataError
from covidxray.metrics import choose_threshold


def thumbnails(paths: Iterable[str | Path], size: int = 32) -> np.ndarray:
    """Flattened ``size x size`` grayscale thumbnails in [0, 1], shape (n, size * size), float32.

    Each image is opened upright, converted to grayscale and resized with bilinear filtering (no aspect
    ratio preserved: the baseline should see what a squashing input pipeline sees).
    """
    if size < 1:
        raise ValueError("size must be at least 1.")
    rows = [
        np.asarray(open_grayscale(path).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32).ravel()
        for path in paths
    ]
    if not rows:
        return np.zeros((0, size * size), dtype=np.float32)
    return np.stack(rows) / np.float32(255.0)


def fit_thumbnail_baseline(train_df: pd.DataFrame, size: int = 32, seed: int = 0) -> Pipeline:
    """Fit standardised logistic regression (L2, C = 1, fixed random_state) on ``size`` px thumbnails.

    Uses ``train_df["filepath"]`` and ``train_df["y"]`` (1 = covid); both classes must be present.
    """
    check_frame(train_df, ("filepath", "y"), what="the training table")
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
    check_frame(df, ("filepath",), what="the evaluation table", allow_empty=True)
    if df.empty:
        return np.zeros(0, dtype=np.float64)
    covid = int(np.flatnonzero(model.classes_ == 1)[0])
    return model.predict_proba(thumbnails(df["filepath"], size))[:, covid].astype(np.float64)


def fit_baseline_with_threshold(
    train_df: pd.DataFrame, val_df: pd.DataFrame, size: int = 32, seed: int = 0
) -> tuple[Pipeline, float]:
    """The baseline fitted on train and its decision threshold chosen on validation by the rule the CNNs use
    (:func:`covidxray.metrics.choose_threshold`); a one-class validation split falls back to 0.5 with a
    warning."""
    check_frame(val_df, ("filepath", "y"), what="the validation table")
    model = fit_thumbnail_baseline(train_df, size=size, seed=seed)
    chosen = choose_threshold(val_df["y"], baseline_probabilities(model, val_df, size=size))
    if "note" in chosen:
        warnings.warn(f"thumbnail baseline: {chosen['note']}", stacklevel=2)
    return model, chosen["threshold"]
