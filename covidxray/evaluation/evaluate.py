"""Evaluation of a trained model on any labeled data: metrics with intervals, curves, calibration, files.

The test split of a built dataset, or an external folder/CSV (see :mod:`covidxray.data.labeled_sets`). Intervals
resample
patients where patient ids exist. Every result is written as JSON, a Markdown table, predictions CSV and plots;
an external evaluation is compared metric by metric with the run's own (internal) test evaluation. Output is
staged inside the claimed output folder and swapped in only when complete (see :mod:`covidxray.outputs`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidxray import LABELS
from covidxray.data.images import DEFAULT_MAX_PIXELS
from covidxray.data.labeled_sets import decodable, read_labeled
from covidxray.data.manifest import input_provenance
from covidxray.evaluation.figures import (
    plot_confusion,
    plot_reliability,
    plot_roc_pr,
    results_table,
)
from covidxray.metrics import METRIC_NAMES, format_metric, summarize
from covidxray.outputs import (
    data_provenance,
    provenance,
    staged_output,
    synthetic_note,
    write_csv,
    write_json,
    write_text,
)
from covidxray.runs.card import REFERENCE_DIR, read_reference

SKIPPED_FILE = "skipped.csv"




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
    about: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Summarise one model's probabilities on ``df`` (columns y, patient_id, source); optionally write files.

    ``about`` adds what the evaluation was of (``data``, ``split``, ``kind``, ``model_id``, ``precision``), as
    :func:`evaluate_model` records it, so that a run's model card can list an evaluation written this way."""
    probs = np.asarray(probs, dtype=np.float64).ravel()
    y = df["y"].to_numpy()
    groups = df["patient_id"].to_numpy() if "patient_id" in df.columns else None
    result = summarize(y, probs, threshold, groups=groups, n_boot=n_boot, seed=seed)
    result.update({"model": name, "weights": weights, "notes": notes, **(about or {})})
    if "source" in df.columns and df["source"].nunique() > 1:
        result["per_source"] = {
            source: summarize(y[mask], probs[mask], threshold,
                              groups=None if groups is None else groups[mask], n_boot=n_boot, seed=seed)
            for source in sorted(df["source"].unique())
            if (mask := (df["source"] == source).to_numpy()).any()
        }
    if out_dir is not None:
        with staged_output(out_dir, "evaluate") as tmp:
            write_evaluation(tmp, df, probs, result)
    return result


def write_evaluation(out_dir: str | Path, df: pd.DataFrame, probs: np.ndarray, result: dict[str, Any]) -> None:
    """metrics.json, results.md, predictions.csv, confusion/ROC-PR/reliability PNGs in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = df["path"] if "path" in df.columns else df["filepath"]
    preds = pd.DataFrame({
        "filepath": [Path(str(p)).name for p in names],
        "label": df["label"].to_numpy() if "label" in df.columns else [LABELS[i] for i in df["y"]],
        "patient_id": df["patient_id"].to_numpy() if "patient_id" in df.columns else "",
        "p_covid": np.round(probs, 6),
        "pred": np.where(probs >= result["threshold"], LABELS[1], LABELS[0]),
    })
    write_csv(preds, out_dir / "predictions.csv")
    write_json({k: v for k, v in result.items() if k != "markdown"}, out_dir / "metrics.json")
    write_text(result.get("markdown") or results_table([result]), out_dir / "results.md")
    y = df["y"].to_numpy()
    name = result.get("model", "model")
    plot_confusion(result["confusion_matrix"], title=f"{name} (threshold {result['threshold']:.2f})",
                   path=out_dir / "confusion.png")
    plot_roc_pr(y, {name: probs}, path=out_dir / "roc_pr.png")
    plot_reliability(y, {name: probs}, path=out_dir / "reliability.png")


def change_vs(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, float | None]:
    """Per metric: this evaluation's value minus the reference's (None where either is undefined)."""
    out: dict[str, float | None] = {}
    for name in METRIC_NAMES:
        new, old = result["metrics"].get(name), reference["metrics"].get(name)
        defined = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (new, old))
        out[name] = float(new) - float(old) if defined else None
    return out


def _default_reference(meta: dict[str, Any], out_dir: Path) -> Path | None:
    candidate = Path(meta["run_dir"]) / REFERENCE_DIR / "metrics.json"
    if not candidate.is_file() or candidate.parent.resolve() == out_dir.resolve():
        return None
    return candidate


def _markdown(result: dict[str, Any]) -> str:
    """Results table, per-source rows, the change against the internal test and the files skipped."""
    text = results_table([result])
    note = synthetic_note(result.get("provenance"))
    if note:
        text = f"**{note}**\n\n" + text
    if "trained_on" in result:
        ds = result["trained_on"]
        text += ("\nTrained on: " + (f"{ds['path']} (manifest fingerprint {ds['fingerprint']})" if ds else
                                     "a dataset the model file does not record") + ".\n")
    n, n_pos = result["metrics"]["n"], result["metrics"]["n_pos"]
    if n_pos in (0, n):
        only = LABELS[1] if n_pos else LABELS[0]
        text += (f"\nThe data holds only {only} images: ROC-AUC, PR-AUC and the rates of the other class are "
                 "undefined (n/a).\n")
    if result.get("per_source"):
        rows = [{**r, "model": f"{result['model']} · {source}", "weights": result.get("weights", "")}
                for source, r in result["per_source"].items()]
        text += "\nPer source:\n\n" + results_table(rows, footnote=False)
    if result.get("change_vs_internal"):
        ref = result["reference"]
        lines = [f"\nChange against the internal test evaluation ({ref['path']}, n = {ref['n']}):\n",
                 "| metric | internal | here | change |", "|---|---|---|---|"]
        for name, change in result["change_vs_internal"].items():
            pct = name not in ("roc_auc", "pr_auc", "brier", "ece")
            delta = "n/a" if change is None else (f"{change * 100:+.1f} points" if pct else f"{change:+.3f}")
            lines.append(f"| {name} | {format_metric(ref['metrics'].get(name), percent=pct)} | "
                         f"{format_metric(result['metrics'].get(name), percent=pct)} | {delta} |")
        text += "\n".join(lines) + "\n"
    skipped = result.get("skipped") or {}
    if skipped.get("count"):
        reasons = "; ".join(f"{reason}: {n}" for reason, n in skipped["reasons"].items())
        text += (f"\nSkipped {skipped['count']} file(s), not in the metrics ({reasons}); each file and reason is "
                 f"in {SKIPPED_FILE}.\n")
    return text


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0]


def evaluate_model(
    model_path: str | Path,
    data: str | Path,
    *,
    split: str | None = "test",
    out_dir: str | Path | None = None,
    n_boot: int = 2000,
    threshold: float | None = None,
    seed: int = 0,
    reference: str | Path | None = None,
    precision: str = "float32",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Load a run (or .keras file), predict on ``data`` and summarise; the threshold defaults to the run's.
    External images over ``max_pixels`` pixels are skipped.

    External images that cannot be used are skipped and listed (``skipped`` in the result, ``skipped.csv``).
    ``reference`` is the metrics.json of the run's own test evaluation (default: ``RUN/eval-test/metrics.json``
    when it exists and is not the folder written now); the result then has ``change_vs_internal`` per metric.
    ``precision`` is the model's compute precision (see covidxray.training.compute_dtype; default float32); the result's
    ``precision`` says what was used and why. A run with a model card lists every evaluation of it, this one
    included wherever it was written (``model_card`` in the result says whether the card changed).
    """
    from covidxray.runs.load import load_run, predict_dataframe
    from covidxray.runs.train import run_dataset

    model, meta = load_run(model_path, precision=precision)
    trained_on = run_dataset(meta["run_dir"])
    image_size = meta["image_size"]
    labeled = read_labeled(data, split=split, max_pixels=max_pixels)
    thr = float(threshold if threshold is not None else meta.get("threshold", 0.5))
    config = meta.get("config", {})
    name = config.get("model", Path(model_path).stem)
    if out_dir is None:
        out_dir = Path(meta["run_dir"]) / f"eval-{split or 'all'}"
    out_dir = Path(out_dir)
    ref_path = Path(reference) if reference is not None else _default_reference(meta, out_dir)
    ref = read_reference(ref_path) if ref_path is not None else None
    used = input_provenance(data)
    prov = provenance(fingerprint=used["fingerprint"], synthetic=used["synthetic"], source=used["source"],
                      model=data_provenance(meta["run_dir"], "run"))
    with staged_output(out_dir, "evaluate", sources=[data, meta["model_path"]], data=prov) as tmp, \
            decodable(labeled) as usable:
        df = usable.frame
        probs = predict_dataframe(model, df, image_size)
        result = evaluate_predictions(df, probs, threshold=thr, name=name, weights=str(config.get("weights", "")),
                                      n_boot=n_boot, seed=seed)
        result.update({"data": str(data), "split": split, "kind": usable.kind, "trained_on": trained_on,
                       "model_id": meta["model_id"], "precision": meta["precision"], "provenance": prov})
        result["skipped"] = {"count": len(usable.skipped),
                             "reasons": dict(sorted(Counter(_reason_kind(r) for _, r in usable.skipped).items()))}
        if ref is not None:
            result["reference"] = {"path": ref["path"], "data": ref.get("data"), "split": ref.get("split"),
                                   "n": ref["metrics"].get("n"), "metrics": ref["metrics"]}
            result["change_vs_internal"] = change_vs(result, ref)
        result["markdown"] = _markdown(result)
        write_evaluation(tmp, df, probs, result)
        write_skipped(usable.skipped, tmp / SKIPPED_FILE)
    if meta["card"] is not None:
        from covidxray.runs.card import refresh_model_card

        result["model_card"] = refresh_model_card(meta["run_dir"], evaluation=out_dir)
        result["markdown"] += f"\nModel card: {result['model_card']}.\n"
    return result


def write_skipped(skipped: list[tuple[str, str]], path: str | Path) -> Path:
    """The files left out, one line each with the reason (a header alone when none was)."""
    table = pd.DataFrame(skipped, columns=["file", "reason"])
    return write_csv(table, path)
