"""Evaluation of a trained model on any labeled data: metrics with intervals, curves, calibration, files.

The test split of a built dataset, or an external folder/CSV (see :mod:`covidxray.labeled`). Intervals resample
patients where patient ids exist. Every result is written as JSON, a Markdown table, predictions CSV and plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidxray import LABELS
from covidxray.labeled import load_labeled
from covidxray.metrics import summarize
from covidxray.report import (
    plot_confusion,
    plot_reliability,
    plot_roc_pr,
    results_table,
    write_json,
    write_text,
)


def evaluate_predictions(
    df: pd.DataFrame,
    probs: np.ndarray,
    *,
    threshold: float,
    name: str,
    weights: str = "",
    n_boot: int = 2000,
    seed: int = 0,
    out_dir: str | Path | None = None,
    notes: str = "",
) -> dict[str, Any]:
    """Summarise one model's probabilities on ``df`` (columns y, patient_id, source); optionally write files."""
    probs = np.asarray(probs, dtype=np.float64).ravel()
    y = df["y"].to_numpy()
    groups = df["patient_id"].to_numpy() if "patient_id" in df.columns else None
    result = summarize(y, probs, threshold, groups=groups, n_boot=n_boot, seed=seed)
    result.update({"model": name, "weights": weights, "notes": notes})
    if "source" in df.columns and df["source"].nunique() > 1:
        result["per_source"] = {
            source: summarize(y[mask], probs[mask], threshold,
                              groups=None if groups is None else groups[mask], n_boot=n_boot, seed=seed)
            for source in sorted(df["source"].unique())
            if (mask := (df["source"] == source).to_numpy()).any()
        }
    if out_dir is not None:
        write_evaluation(out_dir, df, probs, result)
    return result


def write_evaluation(out_dir: str | Path, df: pd.DataFrame, probs: np.ndarray, result: dict[str, Any]) -> None:
    """metrics.json, results.md, predictions.csv, confusion/ROC-PR/reliability PNGs in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preds = pd.DataFrame({
        "filepath": [Path(p).name for p in df["filepath"]],
        "label": df["label"].to_numpy() if "label" in df.columns else [LABELS[i] for i in df["y"]],
        "patient_id": df["patient_id"].to_numpy() if "patient_id" in df.columns else "",
        "p_covid": np.round(probs, 6),
        "pred": np.where(probs >= result["threshold"], LABELS[1], LABELS[0]),
    })
    write_text(preds.to_csv(index=False, lineterminator="\n"), out_dir / "predictions.csv")
    write_json(result, out_dir / "metrics.json")
    write_text(results_table([result]), out_dir / "results.md")
    y = df["y"].to_numpy()
    name = result.get("model", "model")
    plot_confusion(result["confusion_matrix"], title=f"{name} (threshold {result['threshold']:.2f})",
                   path=out_dir / "confusion.png")
    plot_roc_pr(y, {name: probs}, path=out_dir / "roc_pr.png")
    plot_reliability(y, {name: probs}, path=out_dir / "reliability.png")


def evaluate_model(
    model_path: str | Path,
    data: str | Path,
    *,
    split: str | None = "test",
    out_dir: str | Path | None = None,
    n_boot: int = 2000,
    threshold: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Load a run (or .keras file), predict on ``data`` and summarise; the threshold defaults to the run's."""
    from covidxray.train import load_run, predict_dataframe

    model, meta = load_run(model_path)
    df = load_labeled(data, split=split)
    image_size = int(model.input_shape[1])
    probs = predict_dataframe(model, df, image_size)
    thr = float(threshold if threshold is not None else meta.get("threshold", 0.5))
    config = meta.get("config", {})
    name = config.get("model", Path(model_path).stem)
    if out_dir is None:
        base = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
        out_dir = base / f"eval-{split or 'all'}"
    result = evaluate_predictions(df, probs, threshold=thr, name=name, weights=str(config.get("weights", "")),
                                  n_boot=n_boot, seed=seed, out_dir=out_dir)
    result["data"] = str(data)
    result["split"] = split
    write_json(result, Path(out_dir) / "metrics.json")
    result["markdown"] = results_table([result])
    return result
