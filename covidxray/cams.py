"""``covidxray cam``: heatmaps of one trained model over a labeled image set, with the two sanity checks.

Loads the run, picks the images (default: the test split), predicts, computes the maps once, and writes the
overlays, the summary grid and ``<model>__checks.json`` into ``Class_Activation_Images/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidxray import paths
from covidxray.explain import heatmaps, render_cams, resolve_method
from covidxray.explain_checks import write_checks
from covidxray.labeled import load_labeled


def pick_images(df: pd.DataFrame, limit: int | None, seed: int = 0) -> pd.DataFrame:
    """At most ``limit`` rows, balanced between classes and chosen with a fixed seed (all rows when None)."""
    if limit is None or len(df) <= limit:
        return df.reset_index(drop=True)
    per_class = max(1, limit // max(1, df["y"].nunique()))
    parts = [g.sample(n=min(len(g), per_class), random_state=seed) for _, g in df.groupby("y", sort=True)]
    return pd.concat(parts).sort_index().reset_index(drop=True)


def render_model_cams(
    model_path: str | Path,
    data: str | Path = paths.DATASET_DIR,
    *,
    split: str | None = "test",
    out_dir: str | Path = paths.CAM_DIR,
    method: str = "auto",
    layer: str | None = None,
    limit: int | None = None,
    name: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write overlays, grid and checks for one model; return the checks and the list of files."""
    from covidxray.pipeline import load_images
    from covidxray.train import load_run, predict_proba

    model, meta = load_run(model_path)
    config = meta.get("config", {})
    name = name or config.get("model") or Path(model_path).stem
    df = pick_images(load_labeled(data, split=split), limit, seed)
    image_size = int(model.input_shape[1])
    images = load_images(df["filepath"].tolist(), image_size)
    probs = predict_proba(model, images)
    threshold = float(meta.get("threshold", 0.5))
    method, layer = resolve_method(model, method, layer)
    maps = heatmaps(model, images, method=method, layer=layer)
    files = render_cams(model, images, df, out_dir, model_name=name, threshold=threshold, method=method,
                        probs=probs, layer=layer, maps=maps)
    checks = write_checks(model, images, out_dir, model_name=name, df=df, maps=maps, method=method, layer=layer,
                          seed=seed)
    return {"model": name, "method": method, "layer": layer, "images": len(df), "threshold": threshold,
            "mean_probability": float(np.mean(probs)) if len(probs) else float("nan"),
            "files": len(files), "checks": checks}
