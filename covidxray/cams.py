"""``covidxray cam``: heatmaps of one trained model over a labeled image set, with the two sanity checks.

Loads the run, picks the images (default: the test split), predicts, computes the maps once, and writes the
overlays, the summary grid and ``<model>__checks.json`` into ``Class_Activation_Images/``. External images that
cannot be used are skipped and listed in ``<model>__skipped.csv``; the files are written to a temporary folder
and moved into place only when all of them are done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidxray import paths
from covidxray.evaluate import write_skipped
from covidxray.explain import heatmaps, render_cams, resolve_method, safe_name
from covidxray.explain_checks import write_checks
from covidxray.labeled import decodable, read_labeled
from covidxray.outputs import staged_output


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
    precision: str = "float32",
) -> dict[str, Any]:
    """Write overlays, grid and checks for one model; return the checks, the files and the files skipped.

    ``precision`` is the compute precision of the model (see covidxray.precision; default float32).
    """
    from covidxray.model_io import load_run, predict_proba
    from covidxray.pipeline import load_images

    model, meta = load_run(model_path, precision=precision)
    image_size = meta["image_size"]
    config = meta.get("config", {})
    name = name or config.get("model") or Path(model_path).stem
    method, layer = resolve_method(model, method, layer)
    labeled = read_labeled(data, split=split)
    prefix = f"{safe_name(name, 'model', 60)}__"
    with staged_output(out_dir, "cam", sources=[data], prefix=prefix) as tmp, decodable(labeled) as usable:
        df = pick_images(usable.frame, limit, seed)
        images = load_images(df["filepath"].tolist(), image_size)
        probs = predict_proba(model, images)
        threshold = float(meta.get("threshold", 0.5))
        maps = heatmaps(model, images, method=method, layer=layer)
        files = render_cams(model, images, df, tmp, model_name=name, threshold=threshold, method=method,
                            probs=probs, layer=layer, maps=maps)
        checks = write_checks(model, images, tmp, model_name=name, df=df, maps=maps, method=method, layer=layer,
                              seed=seed)
        write_skipped(usable.skipped, tmp / skipped_filename(name))
    return {"model": name, "method": method, "layer": layer, "images": len(df), "threshold": threshold,
            "mean_probability": float(np.mean(probs)) if len(probs) else float("nan"),
            "files": len(files), "checks": checks, "skipped": [list(s) for s in usable.skipped],
            "precision": meta["precision"]}


def skipped_filename(model_name: str) -> str:
    """File listing the images a model's heatmaps left out, e.g. ``scratch-gap__skipped.csv``."""
    return f"{safe_name(model_name, 'model', 60)}__skipped.csv"


def side_by_side(
    runs: dict[str, str | Path],
    data: str | Path = paths.DATASET_DIR,
    *,
    split: str | None = "test",
    n: int = 4,
    seed: int = 0,
    path: str | Path | None = None,
):
    """One row per image (half covid, half normal, seeded), one column per model: the same X-ray explained by
    each model, with its probability. Returns the matplotlib Figure (saved atomically when ``path`` is given)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from covidxray.model_io import load_run, predict_proba
    from covidxray.outputs import claim_output
    from covidxray.pipeline import load_images
    from covidxray.report import save_figure

    with decodable(read_labeled(data, split=split)) as usable:
        df = pick_images(usable.frame, n, seed)
        fig = Figure(figsize=(3.2 * (len(runs) + 1), 3.2 * len(df)), dpi=90)
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(df), len(runs) + 1, squeeze=False)
        for col, (name, run) in enumerate(runs.items(), start=1):
            model, meta = load_run(run)
            images = load_images(df["filepath"].tolist(), meta["image_size"])
            probs = predict_proba(model, images)
            method, layer = resolve_method(model, "auto", None)
            maps = heatmaps(model, images, method=method, layer=layer)
            for row in range(len(df)):
                gray = images[row, ..., 0]
                if col == 1:
                    axes[row, 0].imshow(gray, cmap="gray")
                    axes[row, 0].set_title(f"truth: {df['label'][row]}", fontsize=9)
                    axes[row, 0].set_axis_off()
                ax = axes[row, col]
                ax.imshow(gray, cmap="gray")
                ax.imshow(maps[row], cmap="jet", alpha=0.45, vmin=0, vmax=1,
                          extent=(-0.5, gray.shape[1] - 0.5, gray.shape[0] - 0.5, -0.5))
                ax.set_title(f"{name} ({method})\np(covid) = {probs[row]:.2f}", fontsize=9)
                ax.set_axis_off()
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        with claim_output(path.parent, "cam", sources=[data]) as out:
            out.put(path.name, lambda tmp: save_figure(fig, tmp))
    return fig


def checks_table(results: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per model: randomisation correlation and where the heatmap mass is (overall, per class and source)."""
    rows = []
    for name, result in results.items():
        rnd, att = result["checks"]["randomization"], result["checks"]["attention"]
        row: dict[str, Any] = {
            "model": name,
            "method": result["method"],
            "randomisation spearman (mean)": rnd.get("spearman_mean"),
            "randomisation check passed": rnd.get("passed"),
            "center mass": att["overall"]["center_share"],
            "border mass": att["overall"]["border_share"],
            "corner mass": att["overall"]["corners_share"],
            "border area": att["area_share"]["border"],
        }
        for key, prefix in (("per_class", "border mass, "), ("per_source", "border mass, ")):
            for group, stats in (att.get(key) or {}).items():
                row[prefix + group] = stats["border_share"]
        row["warning"] = att.get("warning") or ""
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")
