"""Results tables, figures and files of an evaluation, written atomically so a crash never leaves half a file.

Figures are built on matplotlib's object API with the Agg canvas (no pyplot state, no GUI, nothing shown);
each plot function returns its Figure and, given ``path``, also saves it as PNG.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from covidxray import LABELS
from covidxray.data.designs import PEDIATRIC_SOURCES
from covidxray.data.images import open_grayscale
from covidxray.data.licences import showable
from covidxray.data.manifest import check_frame
from covidxray.errors import DataError
from covidxray.metrics import calibration_bins, expected_calibration_error, format_metric, mean_std
from covidxray.outputs import atomic_write

CLASS_COLORS: dict[str, str] = {"normal": "tab:blue", "covid": "tab:red"}
"""One colour per class, the same in every figure."""

TABLE_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("accuracy", "accuracy", True),
    ("precision", "precision", True),
    ("recall", "recall", True),
    ("specificity", "specificity", True),
    ("f1", "F1", True),
    ("roc_auc", "ROC-AUC", False),
    ("pr_auc", "PR-AUC", False),
)
"""(metric key, column header, shown in percent) of the results table, in column order."""

DPI = 150


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Save ``fig`` as PNG atomically; returns the path."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))


def _figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        save_figure(fig, path)
    return fig


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _seed_cell(row: Mapping[str, Any]) -> str:
    seeds = row.get("seeds") or {}
    parts = [
        f"{name} {mean_std(*seeds[key], percent)}"
        for key, name, percent in (("accuracy", "acc", True), ("roc_auc", "AUC", False))
        if key in seeds
    ]
    text = ", ".join(parts)
    if text and row.get("n_seeds") is not None:
        text += f" ({row['n_seeds']} seeds)"
    return text


def _bootstrap_note(info: Mapping[str, Any]) -> str:
    level = round((1 - float(info.get("alpha", 0.05))) * 100)
    unit = "patients" if info.get("unit") == "patient" else "images"
    return f"{level} % percentile bootstrap intervals, {info.get('n_boot')} resamples of {unit}"


def results_table(rows: Sequence[Mapping[str, Any]], footnote: bool = True) -> str:
    """Markdown table, one row per model: value [95 % CI] for each metric, rates in percent, AUCs in 0..1.

    Each row is a ``summarize`` output plus "model", optional "weights" and "notes", and optionally
    "seeds" (a ``seed_summary`` output) with "n_seeds", which adds a "seeds (mean ± std)" column.
    """
    has_seeds = any(row.get("seeds") for row in rows)
    has_notes = any(row.get("notes") for row in rows)
    header = ["model", "weights"] + [name for _, name, _ in TABLE_METRICS] + ["n"]
    if has_seeds:
        header.append("seeds (mean ± std)")
    if has_notes:
        header.append("notes")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    notes: list[str] = []
    for row in rows:
        metrics = row.get("metrics", row)
        ci = row.get("ci") or {}
        cells = [row.get("model", ""), row.get("weights", "") or ""]
        cells += [format_metric(metrics.get(key), ci.get(key), percent=pct) for key, _, pct in TABLE_METRICS]
        n, n_pos = metrics.get("n"), metrics.get("n_pos")
        cells.append("" if n is None else f"{n}" + ("" if n_pos is None else f" ({n_pos} covid)"))
        if has_seeds:
            cells.append(_seed_cell(row))
        if has_notes:
            cells.append(row.get("notes", "") or "")
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        if row.get("bootstrap") and ci:
            note = _bootstrap_note(row["bootstrap"])
            if note not in notes:
                notes.append(note)
    text = "\n".join(lines) + "\n"
    if footnote:
        text += "\nRates in %, AUCs on a 0-1 scale; brackets: " + ("; ".join(notes) or "no intervals") + ".\n"
    return text


def plot_confusion(
    cm: Any,
    labels: Sequence[str] = LABELS,
    *,
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Confusion matrix (rows true, columns predicted) with counts and row percentages."""
    matrix = np.asarray(cm, dtype=np.int64)
    k = len(labels)
    if matrix.shape != (k, k):
        raise ValueError(f"the confusion matrix has shape {matrix.shape}, expected ({k}, {k}).")
    fig = _figure((3.8, 3.4))
    ax = fig.subplots()
    row_sums = matrix.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(row_sums > 0, matrix / row_sums, 0.0)
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            pct = format_metric(share[i, j]) if row_sums[i, 0] else "n/a"
            ax.text(j, i, f"{matrix[i, j]}\n({pct})", ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), labels)
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "Confusion matrix")
    return _finish(fig, path)


def _two_classes(y: np.ndarray) -> bool:
    return y.size > 0 and np.unique(y).size == 2


def _no_curve(ax: Axes, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)


def plot_roc_pr(
    y: Any,
    p_by_model: Mapping[str, Any],
    *,
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """ROC (left) and precision-recall (right) curves of several models on the same labels."""
    y_arr = np.asarray(y, dtype=np.int64).ravel()
    fig = _figure((10.0, 4.4))
    roc_ax, pr_ax = fig.subplots(1, 2)
    roc_ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="chance")
    if _two_classes(y_arr):
        prevalence = float(y_arr.mean())
        pr_ax.axhline(prevalence, ls="--", color="gray", lw=1, label=f"chance ({prevalence:.2f})")
        for name, p in p_by_model.items():
            q = np.asarray(p, dtype=np.float64).ravel()
            fpr, tpr, _ = roc_curve(y_arr, q)
            roc_ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {roc_auc_score(y_arr, q):.3f})")
            precision, recall, _ = precision_recall_curve(y_arr, q)
            pr_ax.step(recall, precision, where="post", lw=1.5,
                       label=f"{name} (AP {average_precision_score(y_arr, q):.3f})")
    else:
        for ax in (roc_ax, pr_ax):
            _no_curve(ax, "undefined: the labels hold one class")
    roc_ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (recall)",
               xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title="ROC")
    pr_ax.set(xlabel="recall (sensitivity)", ylabel="precision", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01),
              title="Precision-recall")
    for ax, where in ((roc_ax, "lower right"), (pr_ax, "lower left")):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc=where, fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def plot_reliability(
    y: Any,
    p_by_model: Mapping[str, Any],
    n_bins: int = 10,
    *,
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Reliability diagram (observed covid fraction vs mean predicted, per bin) over a histogram of p."""
    fig = _figure((5.5, 6.0))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfectly calibrated")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    for name, p in p_by_model.items():
        table = calibration_bins(y, p, n_bins)
        used = table[table["count"] > 0]
        ece = expected_calibration_error(y, p, n_bins)
        top.plot(used["mean_predicted"], used["observed_fraction"], marker="o", lw=1.5,
                 label=f"{name} (ECE {ece:.3f})")
        bottom.hist(np.asarray(p, dtype=np.float64).ravel(), bins=edges, histtype="step", lw=1.5, label=name)
    top.set(ylabel="observed covid fraction", xlim=(0, 1), ylim=(-0.01, 1.01),
            title=title or "Reliability diagram")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.set(xlabel="predicted P(covid)", ylabel="images")
    return _finish(fig, path)


_SKIP_HISTORY = {"epoch", "stage", "lr", "learning_rate"}
"""History columns that are bookkeeping, not curves: the training stage is drawn as a line where it changes."""


def _varies(series: pd.Series) -> bool:
    """True when ``series`` takes more than one value (NaN aside): a constant one says nothing as a curve."""
    return series.dropna().nunique() > 1


def plot_history(history: pd.DataFrame | str | Path, *, path: str | Path | None = None) -> Figure:
    """Training curves from a Keras history CSV or frame: one panel per metric, train vs validation. Over several
    epochs, a metric whose train and validation series are both constant gets no panel; where the ``stage`` column
    changes (the fine-tuning stage begins), a dashed vertical line in every panel marks the epoch."""
    if isinstance(history, (str, Path)):
        try:
            history = pd.read_csv(history)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise DataError(f"{history}: cannot read the training history ({exc}); "
                            "pass the history.csv a training run wrote.") from exc
    df = history
    bases = [c for c in df.columns if not c.startswith("val_") and c not in _SKIP_HISTORY]
    bases += [c[4:] for c in df.columns if c.startswith("val_") and c[4:] not in df.columns]
    preferred = ["loss", "accuracy", "auc"]
    bases = [b for b in preferred if b in bases] + [b for b in bases if b not in preferred]
    if not bases:
        raise DataError("the training history holds no metric columns (expected loss, accuracy, val_loss).")
    if len(df) > 1:  # one epoch: every metric is a single point, all shown
        bases = [b for b in bases if any(_varies(df[c]) for c in (b, f"val_{b}") if c in df.columns)] or bases
    x = df["epoch"] if "epoch" in df.columns else pd.Series(range(len(df)))
    changes = []
    if "stage" in df.columns and len(df) > 1:
        stage = df["stage"].to_numpy()
        changes = [(x.iloc[i], stage[i]) for i in range(1, len(df)) if stage[i] != stage[i - 1]]
    fig = _figure((4.2 * len(bases), 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(bases)))
    for ax, base in zip(axes, bases, strict=True):
        if base in df.columns:
            ax.plot(x, df[base], marker=".", label="train")
        if f"val_{base}" in df.columns:
            ax.plot(x, df[f"val_{base}"], marker=".", label="validation")
        for epoch, stage in changes:
            ax.axvline(epoch, color="0.4", linestyle="--", linewidth=1, label=f"stage {stage} from epoch {epoch}")
        ax.set(xlabel="epoch", ylabel=base, title=base)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _finish(fig, path)


def _labels_of(df: pd.DataFrame) -> pd.Series:
    if "label" in df.columns:
        return df["label"].astype(str)
    if "y" in df.columns:
        return df["y"].map(lambda v: LABELS[int(v)])
    raise DataError("the image table has no 'label' or 'y' column; pass a frame from load_labeled().")


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def sample_grid_picks(df: pd.DataFrame, n_per_class: int = 6, seed: int = 0) -> pd.DataFrame:
    """The rows :func:`plot_sample_grid` shows, class by class: at most ``n_per_class`` images of each class whose
    licence lets us show them (:func:`covidxray.data.licences.showable`), drawn at random with ``seed``. Pass them
    to :func:`covidxray.data.licences.attribution_table` for the grid's attribution."""
    labels = _labels_of(df)
    rng = np.random.default_rng(seed)
    picked = [df.iloc[:0]]
    for label in LABELS:
        rows = showable(df[(labels == label).to_numpy()])
        picks = rng.choice(len(rows), size=min(n_per_class, len(rows)), replace=False) if len(rows) else []
        picked.append(rows.iloc[[int(i) for i in picks]])
    return pd.concat(picked)


def plot_sample_grid(
    df: pd.DataFrame,
    n_per_class: int = 6,
    seed: int = 0,
    *,
    path: str | Path | None = None,
) -> Figure:
    """Random images of each class (one row per class), titled with source and view; seeded. Only images whose
    licence lets us show them are drawn (see :func:`sample_grid_picks`)."""
    check_frame(df, ("filepath",), what="the image table", fix="pass a frame from load_labeled()", allow_empty=True)
    labels = _labels_of(df)
    picks = sample_grid_picks(df, n_per_class, seed)
    pick_labels = _labels_of(picks)
    fig = _figure((2.0 * n_per_class, 2.3 * len(LABELS)))
    axes = np.asarray(fig.subplots(len(LABELS), n_per_class, squeeze=False))
    for r, label in enumerate(LABELS):
        n_class = int((labels == label).sum())
        shown = picks[(pick_labels == label).to_numpy()]
        for c in range(n_per_class):
            ax = axes[r, c]
            ax.set_axis_off()
            if c >= len(shown):
                continue
            row = shown.iloc[c]
            image = open_grayscale(row["filepath"])
            image.thumbnail((256, 256))
            ax.imshow(np.asarray(image), cmap="gray", vmin=0, vmax=255)
            caption = " · ".join(t for t in (_text(row.get("source")), _text(row.get("view"))) if t)
            ax.set_title(caption or Path(row["filepath"]).name, fontsize=8)
        if n_class and shown.empty:
            axes[r, 0].text(0.0, 0.5, f"no {label} image has a licence that lets us show it", fontsize=9,
                            transform=axes[r, 0].transAxes, va="center")
        axes[r, 0].text(-0.08, 0.5, f"{label} ({n_class})", transform=axes[r, 0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=11, color=CLASS_COLORS.get(label, "black"))
    return _finish(fig, path)


def _bar_by_class(
    ax: Axes, labels: pd.Series, groups: pd.Series, title: str, order: Sequence[str] = ()
) -> None:
    """Grouped bars: images per group, one bar per class, with counts on top."""
    table = pd.crosstab(groups, labels).reindex(columns=list(LABELS), fill_value=0)
    index = [g for g in order if g in table.index] + sorted(g for g in table.index if g not in order)
    table = table.reindex(index)
    x = np.arange(len(table))
    width = 0.4
    for i, label in enumerate(LABELS):
        bars = ax.bar(x + (i - 0.5) * width, table[label], width, label=label, color=CLASS_COLORS[label])
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, [str(g) for g in table.index], rotation=30, ha="right")
    ax.set(title=title, ylabel="images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)


def _unavailable(ax: Axes, title: str) -> None:
    ax.set_title(title)
    ax.set_axis_off()
    _no_curve(ax, "not available")


def age_unknown_note(df: pd.DataFrame, label: str) -> str | None:
    """"age unknown for all N <label> images (...)" when no image of the class has a known age, else None; for a
    class from a pediatric source the note says what the source describes (Kermany files carry no age)."""
    part = df[_labels_of(df) == label]
    ages = pd.to_numeric(part["age"], errors="coerce") if "age" in part.columns else pd.Series(dtype=float)
    if part.empty or ages.notna().any():
        return None
    note = f"age unknown for all {len(part)} {label} images"
    sources = sorted({_text(v) for v in part["source"]}) if "source" in part.columns else []
    if sources and all(s in PEDIATRIC_SOURCES for s in sources):
        described = "; ".join(PEDIATRIC_SOURCES[s] for s in sources)
        names = " and ".join(s.capitalize() for s in sources)
        note += f" ({names} files carry no age; the source describes children: {described})"
    return note


def _age_panel(ax: Axes, df: pd.DataFrame, labels: pd.Series, age: pd.Series) -> None:
    """Age histogram of the classes with known ages; a class without any gets a sentence instead of ``n=0``."""
    ax.set(title="Age", xlabel="years", ylabel="images")
    notes = [note for label in LABELS if (note := age_unknown_note(df, label))]
    known = [label for label in LABELS if age[(labels == label) & age.notna()].size]
    if known:
        edges = np.histogram_bin_edges(age.dropna(), bins=20)
        for label in known:
            sel = age[(labels == label) & age.notna()]
            ax.hist(sel, bins=edges, alpha=0.6, color=CLASS_COLORS[label], label=f"{label} (n={len(sel)})")
        ax.legend(fontsize=8, loc="upper right")
        if notes:
            ax.set_ylim(top=ax.get_ylim()[1] * 1.6)  # room for the notes above the bars
    else:
        ax.set_axis_off()
    if notes:
        text = "\n".join(textwrap.fill(note, 48) for note in notes)
        ax.text(0.02, 0.97 if known else 0.5, text, transform=ax.transAxes, fontsize=8, va="top" if known
                else "center", ha="left", bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})


def plot_distributions(df: pd.DataFrame, *, path: str | Path | None = None) -> Figure:
    """Dataset composition by class: per split, source, view and sex, age histogram, image size scatter.

    Panels whose column is missing or empty say "not available" instead of failing.
    """
    labels = _labels_of(df).reset_index(drop=True)
    df = df.reset_index(drop=True)
    fig = _figure((15.0, 8.5))
    axes = fig.subplots(2, 3).ravel()

    def column(name: str) -> pd.Series | None:
        if name not in df.columns:
            return None
        values = df[name].map(_text)
        return None if (values == "").all() else values.replace("", "unknown")

    for ax, name, title, order in (
        (axes[0], "split", "Images per split", ("train", "val", "test")),
        (axes[1], "source", "Images per source", ()),
        (axes[2], "view", "Images per view", ()),
        (axes[5], "sex", "Images per sex", ()),
    ):
        values = column(name)
        if values is None:
            _unavailable(ax, title)
        else:
            _bar_by_class(ax, labels, values, title, order)

    age = pd.to_numeric(df["age"], errors="coerce") if "age" in df.columns else None
    if age is None:
        _unavailable(axes[3], "Age")
    else:
        _age_panel(axes[3], df, labels, age)

    if not {"width", "height"} <= set(df.columns):
        _unavailable(axes[4], "Image size")
    else:
        width = pd.to_numeric(df["width"], errors="coerce")
        height = pd.to_numeric(df["height"], errors="coerce")
        for label in LABELS:
            sel = labels == label
            axes[4].scatter(width[sel], height[sel], s=6, alpha=0.5, color=CLASS_COLORS[label], label=label)
        axes[4].set(title="Image size", xlabel="width (px)", ylabel="height (px)")
        axes[4].legend(fontsize=8)
    return _finish(fig, path)
