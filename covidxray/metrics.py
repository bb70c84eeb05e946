"""Binary classification metrics with bootstrap confidence intervals, calibration and threshold choice.

Every metric is computed by one weighted, vectorised routine: the point estimate uses weight 1 per image and
each bootstrap resample uses the number of times an image was drawn, so point estimates and intervals can
never disagree on a definition. Undefined values (an AUC with one class, a precision without positive
predictions) are NaN, never an exception or a warning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from covidxray import LABELS
from covidxray.progress import progress_bar

METRIC_NAMES: tuple[str, ...] = (
    "accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "roc_auc",
    "pr_auc",
    "brier",
    "ece",
)
"""Metrics that get a bootstrap interval; all lie in [0, 1]."""

COUNT_NAMES: tuple[str, ...] = ("n", "n_pos", "tp", "fp", "tn", "fn")
"""Counts reported next to the metrics (no interval)."""

ECE_BINS = 10
"""Equal-width probability bins used for the expected calibration error."""

_CHUNK_ELEMENTS = 1_000_000
"""Bootstrap resamples are processed in chunks of about this many (resample, image) weights."""


def _as_arrays(y_true: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels (0/1) and probabilities ([0, 1], finite) of equal length; return float64 arrays."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    q = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != q.shape:
        raise ValueError(f"y_true has {y.size} values but the probabilities have {q.size}.")
    if y.size and not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must hold only 0 (normal) and 1 (covid).")
    if q.size and (not np.isfinite(q).all() or q.min() < 0.0 or q.max() > 1.0):
        raise ValueError("probabilities must be finite and lie in [0, 1]; check the model output.")
    return y, q


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each probability; p == 1 falls into the last bin."""
    return np.clip(np.floor(p * n_bins).astype(np.int64), 0, n_bins - 1)


def _metric_arrays(
    y: np.ndarray, p: np.ndarray, threshold: float, w: np.ndarray, n_bins: int = ECE_BINS
) -> dict[str, np.ndarray]:
    """All metrics for each row of the weight matrix ``w`` (resamples x images), one array entry per row."""
    pos = y == 1.0
    pred = p >= threshold
    tp = w @ (pos & pred).astype(np.float64)
    fp = w @ (~pos & pred).astype(np.float64)
    fn = w @ (pos & ~pred).astype(np.float64)
    tn = w @ (~pos & ~pred).astype(np.float64)
    n = tp + fp + fn + tn
    n_pos = tp + fn
    n_neg = fp + tn

    onehot = np.zeros((y.size, n_bins))
    onehot[np.arange(y.size), _bin_index(p, n_bins)] = 1.0
    gap = w @ (onehot * (p - y)[:, None])

    order = np.argsort(p, kind="mergesort")
    ps, ys = p[order], y[order]
    ws = w[:, order]
    if y.size:
        starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
        ends = np.r_[starts[1:], y.size] - 1
    else:
        ends = np.zeros(0, dtype=np.int64)
    neg_end = np.cumsum(ws * (1.0 - ys), axis=1)[:, ends]
    pos_end = np.cumsum(ws * ys, axis=1)[:, ends]
    zero = np.zeros((w.shape[0], min(1, ends.size)))
    neg_before = np.concatenate([zero, neg_end[:, :-1]], axis=1)
    pos_before = np.concatenate([zero, pos_end[:, :-1]], axis=1)
    neg_in = neg_end - neg_before
    pos_in = pos_end - pos_before

    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (pos_in * (neg_before + 0.5 * neg_in)).sum(axis=1) / (n_pos * n_neg)
        tp_at = n_pos[:, None] - pos_before
        fp_at = n_neg[:, None] - neg_before
        prec_at = tp_at / (tp_at + fp_at)
        ap = np.where(pos_in > 0, pos_in * prec_at, 0.0).sum(axis=1) / n_pos
        out = {
            "accuracy": (tp + tn) / n,
            "precision": tp / (tp + fp),
            "recall": tp / n_pos,
            "specificity": tn / n_neg,
            "f1": 2 * tp / (2 * tp + fp + fn),
            "roc_auc": np.where((n_pos > 0) & (n_neg > 0), auc, np.nan),
            "pr_auc": np.where(n_pos > 0, ap, np.nan),
            "brier": (w @ (p - y) ** 2) / n,
            "ece": np.abs(gap).sum(axis=1) / n,
        }
    out.update({"n": n, "n_pos": n_pos, "tp": tp, "fp": fp, "tn": tn, "fn": fn})
    return out


def binary_metrics(y_true: Any, p_covid: Any, threshold: float = 0.5) -> dict[str, float]:
    """Point estimates of all metrics; an image is predicted covid when ``p_covid >= threshold``.

    Returns accuracy, precision, recall (sensitivity), specificity, f1, roc_auc, pr_auc (average precision),
    brier, ece (10 equal-width bins) as floats (NaN when undefined) and the counts n, n_pos, tp, fp, tn, fn
    as ints.
    """
    y, p = _as_arrays(y_true, p_covid)
    arrays = _metric_arrays(y, p, float(threshold), np.ones((1, y.size)))
    result: dict[str, float] = {name: float(arrays[name][0]) for name in METRIC_NAMES}
    result.update({name: int(round(float(arrays[name][0]))) for name in COUNT_NAMES})
    return result


def _resample_weights(
    rng: np.random.Generator, b: int, codes: np.ndarray, n_units: int
) -> np.ndarray:
    """Weights (b x images): how often each image is drawn when ``n_units`` clusters are drawn."""
    draws = rng.integers(0, n_units, size=(b, n_units))
    flat = (draws + np.arange(b)[:, None] * n_units).ravel()
    unit_counts = np.bincount(flat, minlength=b * n_units).reshape(b, n_units).astype(np.float64)
    return unit_counts[:, codes]


def bootstrap_distribution(
    y_true: Any,
    p_covid: Any,
    threshold: float = 0.5,
    *,
    groups: Any = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Each metric on ``n_boot`` resamples (arrays of length n_boot, NaN where undefined in a resample).

    With ``groups`` (one patient id per image) whole patients are drawn with replacement, so correlated
    images of one patient do not pass for independent evidence.
    """
    y, p = _as_arrays(y_true, p_covid)
    if n_boot < 1:
        raise ValueError("n_boot must be at least 1.")
    if groups is None:
        codes = np.arange(y.size)
    else:
        groups_arr = np.asarray(groups, dtype=object).ravel()
        if groups_arr.size != y.size:
            raise ValueError(f"groups has {groups_arr.size} values but there are {y.size} images.")
        codes = pd.factorize(pd.Series(groups_arr).astype(str))[0]
    n_units = int(codes.max()) + 1 if codes.size else 0
    dist = {name: np.full(n_boot, np.nan) for name in METRIC_NAMES}
    if n_units == 0:
        return dist
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CHUNK_ELEMENTS // max(y.size, n_units)))
    with progress_bar(desc="bootstrap", total=n_boot, unit="resample") as bar:
        for start in range(0, n_boot, chunk):
            b = min(chunk, n_boot - start)
            arrays = _metric_arrays(y, p, float(threshold), _resample_weights(rng, b, codes, n_units))
            for name in METRIC_NAMES:
                dist[name][start : start + b] = arrays[name]
            bar.update(b)
    return dist


def bootstrap_ci(
    y_true: Any,
    p_covid: Any,
    threshold: float = 0.5,
    *,
    groups: Any = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile ``1 - alpha`` intervals for every metric in METRIC_NAMES; deterministic given ``seed``.

    With ``groups`` (patient ids) this is a cluster bootstrap over patients. Resamples where a metric is
    undefined (e.g. no covid image drawn, for the AUC) are left out of that metric's interval; a metric
    undefined in every resample gets (NaN, NaN).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must lie strictly between 0 and 1.")
    dist = bootstrap_distribution(y_true, p_covid, threshold, groups=groups, n_boot=n_boot, seed=seed)
    out: dict[str, tuple[float, float]] = {}
    for name, values in dist.items():
        finite = values[~np.isnan(values)]
        if finite.size == 0:
            out[name] = (math.nan, math.nan)
        else:
            lo, hi = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
            out[name] = (float(lo), float(hi))
    return out


def calibration_bins(y_true: Any, p: Any, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Reliability table over equal-width bins: bin_lo, bin_hi, mean_predicted, observed_fraction, count.

    Empty bins are kept (count 0, NaN means) so tables of different models line up.
    """
    y, q = _as_arrays(y_true, p)
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1.")
    idx = _bin_index(q, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_p = np.bincount(idx, weights=q, minlength=n_bins) / count
        frac = np.bincount(idx, weights=y, minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return pd.DataFrame(
        {
            "bin_lo": edges[:-1],
            "bin_hi": edges[1:],
            "mean_predicted": mean_p,
            "observed_fraction": frac,
            "count": count.astype(np.int64),
        }
    )


def expected_calibration_error(y_true: Any, p: Any, n_bins: int = ECE_BINS) -> float:
    """Count-weighted mean |mean predicted - observed fraction| over equal-width bins; NaN without images."""
    table = calibration_bins(y_true, p, n_bins)
    total = int(table["count"].sum())
    if total == 0:
        return math.nan
    used = table[table["count"] > 0]
    return float((used["count"] * (used["mean_predicted"] - used["observed_fraction"]).abs()).sum() / total)


THRESHOLD_METHODS: tuple[str, ...] = ("youden", "fixed")
"""How a decision threshold is chosen: Youden's J on validation, or a fixed value (0.5 by default)."""



def youden_cut_points(p: Any) -> np.ndarray:
    """Every distinct decision a threshold can make on scores ``p``, ascending: the lowest score (everything
    covid), then the midpoints between consecutive distinct scores. J is constant between cut points."""
    s = np.unique(np.asarray(p, dtype=np.float64))
    return np.concatenate([s[:1], (s[:-1] + s[1:]) / 2])


def choose_threshold(
    y_true: Any,
    p: Any,
    method: str = "youden",
    *,
    fixed: float = 0.5,
    split: str = "val",
) -> dict[str, Any]:
    """The decision threshold (predict covid when ``p >= threshold``), chosen on validation data, never on test.

    The one rule every model of the package uses (CNN runs, the thumbnail baseline, the probes). ``youden``
    maximises Youden's J = recall + specificity - 1 over :func:`youden_cut_points`; among equally good cut
    points the one nearest 0.5 wins (then the lower). When ``y_true`` holds one class only J is undefined: the
    threshold falls back to 0.5 and a ``note`` says so. ``fixed`` uses ``fixed``.

    Returns method, split, threshold, youden_j (J at the threshold, NaN with one class), note (only after a
    fallback) and the :func:`binary_metrics` of ``(y_true, p)`` at the threshold.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"unknown threshold method {method!r}; use one of {list(THRESHOLD_METHODS)}.")
    if method == "fixed" and not 0.0 <= fixed <= 1.0:
        raise ValueError(f"the fixed threshold must lie in [0, 1], got {fixed}.")
    y, q = _as_arrays(y_true, p)
    info: dict[str, Any] = {"method": method, "split": split}
    pos, neg = np.sort(q[y == 1.0]), np.sort(q[y == 0.0])
    if method == "fixed":
        threshold = float(fixed)
    elif pos.size and neg.size:
        cands = youden_cut_points(q)
        tpr = 1.0 - np.searchsorted(pos, cands, side="left") / pos.size
        fpr = 1.0 - np.searchsorted(neg, cands, side="left") / neg.size
        j = tpr - fpr
        best = np.flatnonzero(j >= j.max() - 1e-12)
        threshold = float(cands[best[np.argmin(np.abs(cands[best] - 0.5))]])
    else:
        threshold = 0.5
        info["note"] = f"{split} holds one class only: Youden's J is undefined, fell back to 0.5"
    metrics = binary_metrics(y, q, threshold)
    info["threshold"] = threshold
    info["youden_j"] = metrics["recall"] + metrics["specificity"] - 1.0
    info.update(metrics)
    return info


def summarize(
    y_true: Any,
    p: Any,
    threshold: float = 0.5,
    groups: Any = None,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Point estimates, bootstrap intervals and the confusion matrix of one model on one evaluation set.

    Keys: threshold, metrics (binary_metrics), ci (name -> [lo, hi]; empty when n_boot == 0),
    confusion_matrix ([[tn, fp], [fn, tp]]: rows true, columns predicted, in LABELS order), labels, and
    bootstrap (n_boot, alpha, seed, unit "patient" or "image", n_units).
    """
    y, q = _as_arrays(y_true, p)
    metrics = binary_metrics(y, q, threshold)
    ci: dict[str, list[float]] = {}
    if n_boot > 0:
        intervals = bootstrap_ci(y, q, threshold, groups=groups, n_boot=n_boot, alpha=alpha, seed=seed)
        ci = {name: [lo, hi] for name, (lo, hi) in intervals.items()}
    if groups is None:
        n_units = int(y.size)
    else:
        n_units = int(pd.Series(np.asarray(groups, dtype=object).ravel()).astype(str).nunique())
    return {
        "threshold": float(threshold),
        "metrics": metrics,
        "ci": ci,
        "confusion_matrix": [[metrics["tn"], metrics["fp"]], [metrics["fn"], metrics["tp"]]],
        "labels": list(LABELS),
        "bootstrap": {
            "n_boot": int(n_boot),
            "alpha": float(alpha),
            "seed": int(seed),
            "unit": "image" if groups is None else "patient",
            "n_units": n_units,
        },
    }


def _is_missing(x: Any) -> bool:
    """None or NaN, of any float type (a Python float, a numpy float32 or float64)."""
    return x is None or (isinstance(x, (float, np.floating)) and math.isnan(x))


def _metric_scale(percent: bool) -> tuple[float, int, str]:
    """(scale, decimals, unit) of a printed metric: rates in percent with one decimal, AUCs on 0-1 with three."""
    return (100.0, 1, " %") if percent else (1.0, 3, "")


def mean_std(mean: Any, std: Any, percent: bool) -> str:
    """"96.5 ± 1.2 %" (rates) or "0.993 ± 0.004" (AUCs); "n/a" for a missing mean, "± n/a" for one seed."""
    if mean is None or math.isnan(mean):
        return "n/a"
    scale, digits, unit = _metric_scale(percent)
    spread = "n/a" if std is None or math.isnan(std) else f"{std * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {spread}{unit}"


def format_share(value: float | None) -> str:
    """A share of a whole on 0-1 with two decimals ("0.12"), "n/a" when missing: heatmap mass and area shares."""
    return "n/a" if _is_missing(value) else f"{value:.2f}"


def format_metric(value: float | None, ci: Sequence[float] | None = None, *, percent: bool = True) -> str:
    """Human-readable value with interval: "97.1 % [92.6, 100.0]" (rates) or "0.981 [0.962, 0.995]" (AUCs).

    NaN values read "n/a"; a missing or NaN interval is left out.
    """
    if _is_missing(value):
        return "n/a"
    scale, digits, unit = _metric_scale(percent)
    text = f"{value * scale:.{digits}f}{unit}"
    if ci is not None and len(ci) == 2 and not any(_is_missing(c) for c in ci):
        text += f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"
    return text


def seed_summary(runs: Iterable[Mapping[str, Any]]) -> dict[str, tuple[float, float]]:
    """Mean and sample standard deviation (ddof=1; NaN for a single run) of each metric over training seeds.

    Accepts binary_metrics dicts or summarize outputs (their "metrics" entry is used); only metrics present
    in every run are summarised, and NaN values are skipped.
    """
    dicts = [run.get("metrics", run) for run in runs]
    if not dicts:
        return {}
    names = [k for k in dicts[0] if all(k in d for d in dicts) and isinstance(dicts[0][k], (int, float))]
    out: dict[str, tuple[float, float]] = {}
    for name in names:
        values = np.array([float(d[name]) for d in dicts])
        values = values[~np.isnan(values)]
        mean = float(values.mean()) if values.size else math.nan
        std = float(values.std(ddof=1)) if values.size > 1 else math.nan
        out[name] = (mean, std)
    return out
