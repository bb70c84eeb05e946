"""Shortcut probes: can the label of a built dataset be read without looking at the lungs?

* Source probe (after Maguolo & Nanni 2021, "A critic evaluation of methods for COVID-19 automatic detection
  from X-ray images"): the scratch CNN is trained on a copy of the dataset whose central thoracic region is
  blacked out, so only borders, corners, burnt-in text and markers remain. If it still tells the classes apart,
  the images carry the label outside the lungs (the source, the scanner, the figure it was cut from).
* Image-statistics probe: logistic regression on trivial image statistics (original width, height, aspect
  ratio, mean and standard deviation of the intensity, file format and Pillow mode), trained on the train split.

Both are scored on the test split, at a decision threshold chosen on the validation split by
:func:`covidxray.metrics.choose_threshold`, with the accuracy and ROC-AUC and their patient-level
bootstrap intervals
(:func:`covidxray.metrics.summarize`), next to the chance level (the majority-class rate of the test split).
Accuracy far above chance is a warning: a classifier of this dataset can score well without any COVID-19
finding. The probes say nothing about the lungs themselves.
"""

from __future__ import annotations

import hashlib
import io
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from covidxray.data.images import image_header, open_grayscale
from covidxray.data.manifest import MANIFEST_NAME, dataset_provenance, read_manifest, split_frame
from covidxray.errors import DataError
from covidxray.metrics import choose_threshold, format_metric, summarize
from covidxray.outputs import staged_output, synthetic_note, write_csv, write_json, write_text
from covidxray.progress import progress_bar

DEFAULT_BORDER = 0.15
"""Share of each side kept by the source probe; the central (1 - 2 * border) box of every image is blacked out."""
DEFAULT_EPOCHS = 10
SHORTCUT_MARGIN = 0.10
"""A probe warns when its accuracy is at least this far above chance and its interval excludes chance."""
MASKED_MAX_SIDE = 256
"""Masked copies are stored at most this many pixels on their longer side (the probe trains at 64 px)."""
STATS_NUMERIC: tuple[str, ...] = ("width", "height", "aspect_ratio", "mean_intensity", "std_intensity")
STATS_CATEGORICAL: tuple[str, ...] = ("format", "mode")
PROBES_JSON = "probes.json"
PROBES_MD = "probes.md"


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[covidxray.probe] {message}", file=sys.stderr, flush=True)


def mask_center(gray: np.ndarray, border: float = DEFAULT_BORDER) -> np.ndarray:
    """A copy of a (H, W) image with everything but a frame of ``border`` x each side set to 0 (black)."""
    if not 0.0 < border < 0.5:
        raise ValueError(f"border must lie strictly between 0 and 0.5, got {border}.")
    out = np.array(gray, copy=True)
    h, w = out.shape[:2]
    top, left = math.ceil(border * h), math.ceil(border * w)
    out[top:max(top, h - top), left:max(left, w - left)] = 0
    return out


def chance_level(y: Any) -> float:
    """The accuracy of always predicting the majority class (NaN without labels)."""
    y = np.asarray(y).astype(int).ravel()
    return float(max(y.mean(), 1.0 - y.mean())) if y.size else math.nan


def _split_frames(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    df = read_manifest(data_dir)
    train, test = split_frame(df, "train"), split_frame(df, "test")
    if train["y"].nunique() < 2:
        raise DataError(f"{data_dir / MANIFEST_NAME}: the train split holds one class only; the probes need both. "
                        "Rebuild the dataset with `covidxray data`.")
    return train, test


def _score(name: str, df: pd.DataFrame, probs: np.ndarray, threshold: float, *, n_boot: int, seed: int) -> dict:
    """Accuracy and ROC-AUC with intervals, the chance level, and whether that reads as a shortcut."""
    y = df["y"].to_numpy()
    groups = df["patient_id"].to_numpy() if "patient_id" in df.columns else None
    summary = summarize(y, probs, threshold, groups=groups, n_boot=n_boot, seed=seed)
    metrics, ci = summary["metrics"], summary["ci"]
    chance = chance_level(y)
    accuracy = metrics["accuracy"]
    acc_ci = ci.get("accuracy", [math.nan, math.nan])
    shortcut = bool(accuracy >= chance + SHORTCUT_MARGIN and acc_ci[0] > chance)
    warning = None
    if shortcut:
        auc = format_metric(metrics["roc_auc"], ci.get("roc_auc"), percent=False)
        warning = (f"WARNING: the {name} reaches {format_metric(accuracy, acc_ci)} accuracy on test (chance "
                   f"{format_metric(chance)}; ROC-AUC {auc}): the labels can be read without looking at the lungs.")
    return {
        "accuracy": accuracy,
        "accuracy_ci": acc_ci,
        "roc_auc": metrics["roc_auc"],
        "roc_auc_ci": ci.get("roc_auc", [math.nan, math.nan]),
        "chance": chance,
        "n_test": int(len(y)),
        "n_test_covid": int(y.sum()),
        "threshold": float(threshold),
        "shortcut": shortcut,
        "warning": warning,
        "summary": summary,
    }


# ------------------------------------------------------------------------------------------ source probe


def masked_dataset(data_dir: str | Path, out_dir: str | Path, *, border: float = DEFAULT_BORDER,
                   max_side: int = MASKED_MAX_SIDE) -> Path:
    """Write a copy of a built dataset whose images have their central region blacked out; returns ``out_dir``.

    Every image becomes an 8-bit grayscale PNG (at most ``max_side`` px on its longer side, aspect ratio kept)
    under the same ``split/label/`` folders; ``manifest.csv`` keeps every column and row of the original, with
    ``path`` and ``sha256`` updated. The source dataset is only read.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    read_manifest(data_dir)
    manifest = pd.read_csv(data_dir / MANIFEST_NAME, dtype=str, keep_default_na=False)
    paths, shas = [], []
    for rel in progress_bar(manifest["path"], desc="masking", unit="image"):
        gray = open_grayscale(data_dir / rel)
        if max(gray.size) > max_side:
            scale = max_side / max(gray.size)
            gray = gray.resize((max(1, round(gray.width * scale)), max(1, round(gray.height * scale))),
                               Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        Image.fromarray(mask_center(np.asarray(gray), border)).save(buf, format="PNG")
        new = Path(rel).with_suffix(".png").as_posix()
        dest = out_dir / new
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(buf.getvalue())
        paths.append(new)
        shas.append(hashlib.sha256(buf.getvalue()).hexdigest())
    manifest["path"] = paths
    if "sha256" in manifest.columns:
        manifest["sha256"] = shas
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(manifest, out_dir / MANIFEST_NAME)
    return out_dir


def source_probe(
    data_dir: str | Path,
    *,
    image_size: int = 64,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    border: float = DEFAULT_BORDER,
    batch_size: int = 32,
    lr: float = 1e-3,
    n_boot: int = 2000,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the scratch CNN on the dataset with the centre of every image blacked out; score it on test.

    Everything it writes (the masked copy, the run) lives in a temporary folder removed afterwards. The
    threshold is the run's own, chosen on the (masked) validation split.
    """
    from covidxray.runs.load import load_run, predict_dataframe
    from covidxray.runs.train import TrainConfig, train

    data_dir = Path(data_dir)
    _split_frames(data_dir)
    config = TrainConfig(model="scratch", weights="none", image_size=image_size, batch_size=batch_size,
                         epochs=epochs, lr=lr, seed=seed, augment=False, patience=max(3, epochs // 2))
    with tempfile.TemporaryDirectory(prefix="covidxray-probe-") as tmp:
        _say(progress, f"source probe: blacking out the centre of every image of {data_dir}")
        masked = masked_dataset(data_dir, Path(tmp) / "dataset", border=border)
        _say(progress, f"source probe: training the scratch CNN on the borders ({image_size} px, {epochs} epochs)")
        train(config, masked, Path(tmp) / "run", progress=False)
        model, meta = load_run(Path(tmp) / "run")
        test = split_frame(read_manifest(masked), "test")
        probs = predict_dataframe(model, test, image_size)
        result = _score("source probe", test, probs, meta["threshold"], n_boot=n_boot, seed=seed)
        result["threshold_info"] = meta["threshold_info"]
    h = 1.0 - 2.0 * border
    result.update({
        "probe": "source",
        "what": f"image borders only: the central {h:.0%} x {h:.0%} of every image blacked out; scratch CNN, "
                f"{image_size} px, {epochs} epochs",
        "config": {"image_size": image_size, "epochs": epochs, "seed": seed, "border": border,
                   "batch_size": batch_size, "lr": lr},
    })
    return result


# ------------------------------------------------------------------------------------------ statistics probe


def _intensity(path: str) -> tuple[float, float]:
    """Mean and std of the grayscale intensity of a file (of a copy at most 256 px on its longer side)."""
    arr = np.asarray(open_grayscale(path, max_side=256), dtype=np.float64)
    return float(arr.mean()), float(arr.std())


def image_statistics(df: pd.DataFrame) -> pd.DataFrame:
    """One row per manifest row: width, height, aspect ratio, mean and std intensity, format, mode.

    Size, format and mode are the original file's (manifest columns width/height/format/mode) when the
    manifest has them, else those of the dataset file; intensities come from the dataset file.
    """
    rows = []
    for _, row in progress_bar(df.iterrows(), desc="image statistics", total=len(df), unit="image"):
        mean, std = _intensity(str(row["filepath"]))
        w, h, fmt, mode = image_header(str(row["filepath"]))
        width = _number(row.get("width"), w)
        height = _number(row.get("height"), h)
        rows.append({
            "width": width,
            "height": height,
            "aspect_ratio": width / height if height else math.nan,
            "mean_intensity": mean,
            "std_intensity": std,
            "format": str(row.get("format") or fmt),
            "mode": str(row.get("mode") or mode),
        })
    return pd.DataFrame(rows, columns=[*STATS_NUMERIC, *STATS_CATEGORICAL])


def _number(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return float(default)
    return number if math.isfinite(number) else float(default)


def stats_probe(data_dir: str | Path, *, seed: int = 0, n_boot: int = 2000, progress: bool = False) -> dict[str, Any]:
    """Logistic regression on trivial image statistics, fitted on train and scored on test at the threshold
    chosen on val (:func:`covidxray.metrics.choose_threshold`, the rule every model of the package uses)."""
    data_dir = Path(data_dir)
    train, test = _split_frames(data_dir)
    val = split_frame(read_manifest(data_dir), "val")
    _say(progress, f"statistics probe: reading {len(train) + len(val) + len(test)} images of {data_dir}")
    x_train, x_val, x_test = image_statistics(train), image_statistics(val), image_statistics(test)
    model = Pipeline([
        ("features", ColumnTransformer([
            ("numeric", StandardScaler(), list(STATS_NUMERIC)),
            ("categorical", OneHotEncoder(handle_unknown="ignore"), list(STATS_CATEGORICAL)),
        ])),
        ("logreg", LogisticRegression(C=1.0, max_iter=5000, random_state=seed)),
    ])
    model.fit(x_train, train["y"].to_numpy())
    covid = int(np.flatnonzero(model.classes_ == 1)[0])
    threshold = choose_threshold(val["y"], model.predict_proba(x_val)[:, covid])
    probs = model.predict_proba(x_test)[:, covid].astype(np.float64)
    result = _score("image-statistics probe", test, probs, threshold["threshold"], n_boot=n_boot, seed=seed)
    result["threshold_info"] = threshold
    names = model.named_steps["features"].get_feature_names_out()
    coefs = model.named_steps["logreg"].coef_[0]
    order = np.argsort(-np.abs(coefs))
    result.update({
        "probe": "statistics",
        "what": "logistic regression on width, height, aspect ratio, mean and std intensity, file format and mode",
        "weights": {str(names[i]).split("__", 1)[-1]: float(coefs[i]) for i in order},
        "means": {label: x_train[train["label"].to_numpy() == label][list(STATS_NUMERIC)].mean().to_dict()
                  for label in sorted(train["label"].unique())},
    })
    return result


# ------------------------------------------------------------------------------------------ both


def probe_cells(result: dict[str, Any], key: str) -> list[str]:
    """One probe's table cells: name, what it sees, accuracy [CI], ROC-AUC [CI], chance, verdict."""
    r = result[key]
    verdict = "labels readable without the lungs" if r["shortcut"] else "not far above chance"
    return [key, r["what"], format_metric(r["accuracy"], r["accuracy_ci"]),
            format_metric(r["roc_auc"], r["roc_auc_ci"], percent=False), format_metric(r["chance"]), verdict]


def probes_markdown(result: dict[str, Any], heading: str | None = None) -> str:
    """A short Markdown verdict: one table row per probe, then the warnings (or that there are none).

    ``heading`` replaces the default first line (``# Shortcut probes: <dataset folder>``), e.g. in a notebook
    section that names the design instead of the folder."""
    lines = [heading or f"# Shortcut probes: {result['data']}", "",
             "| probe | what it sees | accuracy [95 % CI] | ROC-AUC [95 % CI] | chance | n test | verdict |",
             "|---|---|---|---|---|---|---|"]
    for key in ("source", "statistics"):
        cells = probe_cells(result, key)
        lines.append("| " + " | ".join([*cells[:5], str(result[key]["n_test"]), cells[5]]) + " |")
    lines.append("")
    if result["warnings"]:
        lines += [*result["warnings"], "",
                  "A model trained on this dataset can score well without any COVID-19 finding; judge its "
                  "accuracy against these probes and evaluate it on external data."]
    else:
        lines.append(f"Neither probe is more than {SHORTCUT_MARGIN:.0%} above chance with an interval that "
                     "excludes chance. That does not prove the absence of shortcuts, only of these two.")
    lines += ["", "Chance: the majority-class rate of the test split. Brackets: 95 % bootstrap intervals "
              "(patients resampled)."]
    return "\n".join(lines) + "\n"


def run_probes(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    image_size: int = 64,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    border: float = DEFAULT_BORDER,
    batch_size: int = 32,
    n_boot: int = 2000,
    progress: bool = True,
) -> dict[str, Any]:
    """Run both probes on a built dataset; write ``probes.json`` and ``probes.md`` into ``out_dir``.

    Returns {"data", "source", "statistics", "warnings", "markdown"}; each probe has accuracy, roc_auc with
    their intervals (``*_ci``), chance, shortcut (bool) and warning. The dataset is only read.
    """
    data_dir = Path(data_dir)
    _split_frames(data_dir)
    data = dataset_provenance(data_dir)
    with staged_output(out_dir, "probe", sources=[data_dir], data=data) as tmp:
        stats = stats_probe(data_dir, seed=seed, n_boot=n_boot, progress=progress)
        source = source_probe(data_dir, image_size=image_size, epochs=epochs, seed=seed, border=border,
                              batch_size=batch_size, n_boot=n_boot, progress=progress)
        result: dict[str, Any] = {"data": str(data_dir), "source": source, "statistics": stats,
                                  "warnings": [r["warning"] for r in (source, stats) if r["warning"]]}
        note = synthetic_note(data)
        result["markdown"] = (f"**{note}**\n\n" if note else "") + probes_markdown(result)
        write_json({k: v for k, v in result.items() if k != "markdown"}, tmp / PROBES_JSON)
        write_text(result["markdown"], tmp / PROBES_MD)
    for warning in result["warnings"]:
        _say(progress, warning)
    return result
