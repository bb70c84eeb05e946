"""Metrics agree with scikit-learn, are NaN where undefined, and bootstrap intervals behave as they should."""

from __future__ import annotations

import math
import re
import time
import warnings

import numpy as np
import pytest
from conftest import REPO
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from covidxray.metrics import (
    METRIC_NAMES,
    _metric_arrays,
    binary_metrics,
    bootstrap_ci,
    calibration_bins,
    choose_threshold,
    expected_calibration_error,
    format_metric,
    seed_summary,
    summarize,
    youden_cut_points,
)


def _scores(n: int, seed: int = 0, signal: float = 0.35, ties: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(signal * y + rng.random(n) * (1 - signal), 0, 1)
    return y, (np.round(p, 2) if ties else p)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_binary_metrics_match_sklearn(threshold: float) -> None:
    y, p = _scores(300)
    m = binary_metrics(y, p, threshold)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (tn, fp, fn, tp)
    assert m["n"] == 300 and m["n_pos"] == int(y.sum())
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p))
    assert m["ece"] == pytest.approx(expected_calibration_error(y, p))


def test_weighted_resample_equals_explicit_resample() -> None:
    """The vectorised bootstrap path (weights) gives the same numbers as metrics on the drawn images."""
    y, p = _scores(120, seed=3)
    rng = np.random.default_rng(1)
    for _ in range(5):
        idx = rng.integers(0, y.size, y.size)
        w = np.bincount(idx, minlength=y.size).astype(float)[None, :]
        arrays = _metric_arrays(y.astype(float), p, 0.5, w)
        direct = binary_metrics(y[idx], p[idx], 0.5)
        for name in METRIC_NAMES:
            assert arrays[name][0] == pytest.approx(direct[name], nan_ok=True), name


def test_undefined_values_are_nan_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        only_covid = binary_metrics([1, 1, 1], [0.2, 0.3, 0.4])
        no_pred = binary_metrics([0, 1, 1, 0], [0.1, 0.2, 0.3, 0.4])
        empty = binary_metrics([], [])
        ci = bootstrap_ci([1, 1, 1, 1], [0.9, 0.8, 0.7, 0.6], n_boot=50)
    assert math.isnan(only_covid["roc_auc"]) and math.isnan(only_covid["specificity"])
    assert math.isnan(only_covid["precision"]) and only_covid["recall"] == 0.0
    assert math.isnan(no_pred["precision"]) and no_pred["f1"] == 0.0 and no_pred["specificity"] == 1.0
    assert empty["n"] == 0 and all(math.isnan(empty[k]) for k in METRIC_NAMES)
    assert all(math.isnan(v) for v in ci["roc_auc"]) and ci["recall"] == (1.0, 1.0)


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError):
        binary_metrics([0, 1], [0.5])
    with pytest.raises(ValueError):
        binary_metrics([0, 2], [0.5, 0.5])
    with pytest.raises(ValueError):
        binary_metrics([0, 1], [0.5, 1.5])


def test_bootstrap_contains_point_estimate_and_narrows_with_more_data() -> None:
    widths = {}
    for n in (50, 2000):
        y, p = _scores(n, seed=n, ties=False)
        point = binary_metrics(y, p)
        ci = bootstrap_ci(y, p, n_boot=500, seed=0)
        for name in ("accuracy", "recall", "specificity", "f1", "roc_auc", "pr_auc", "brier"):
            lo, hi = ci[name]
            assert lo <= point[name] <= hi, (n, name)
        widths[n] = {name: ci[name][1] - ci[name][0] for name in ci}
    for name in ("accuracy", "roc_auc", "f1"):
        assert widths[2000][name] < widths[50][name] / 3, name


def test_bootstrap_is_deterministic_by_seed() -> None:
    y, p = _scores(200)
    assert bootstrap_ci(y, p, n_boot=300, seed=7) == bootstrap_ci(y, p, n_boot=300, seed=7)
    assert bootstrap_ci(y, p, n_boot=300, seed=7) != bootstrap_ci(y, p, n_boot=300, seed=8)


def test_one_image_per_group_equals_plain_bootstrap() -> None:
    y, p = _scores(150)
    plain = bootstrap_ci(y, p, n_boot=200, seed=2)
    grouped = bootstrap_ci(y, p, n_boot=200, seed=2, groups=[f"p{i}" for i in range(150)])
    assert plain == grouped


def test_cluster_bootstrap_is_wider_for_correlated_images() -> None:
    """40 patients with 10 near-identical images each: resampling images overstates the evidence."""
    rng = np.random.default_rng(0)
    n_pat, per = 40, 10
    y_pat = np.repeat([0, 1], n_pat // 2)
    correct = rng.random(n_pat) < 0.75
    p_pat = np.where(correct == (y_pat == 1), 0.8, 0.2)
    y = np.repeat(y_pat, per)
    p = np.clip(np.repeat(p_pat, per) + rng.normal(0, 0.01, n_pat * per), 0, 1)
    groups = np.repeat(np.arange(n_pat), per)
    plain = bootstrap_ci(y, p, n_boot=1000, seed=0)
    cluster = bootstrap_ci(y, p, n_boot=1000, seed=0, groups=groups)
    for name in ("accuracy", "roc_auc"):
        assert (cluster[name][1] - cluster[name][0]) > 2 * (plain[name][1] - plain[name][0]), name


def test_bootstrap_is_fast_enough() -> None:
    y, p = _scores(1000, ties=False)
    start = time.perf_counter()
    bootstrap_ci(y, p, n_boot=2000, groups=np.arange(1000) // 3)
    assert time.perf_counter() - start < 5.0


def test_calibration_bins_and_ece() -> None:
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.05, 0.15, 0.95, 1.0, 0.55, 0.55])
    table = calibration_bins(y, p, n_bins=10)
    assert list(table.columns) == ["bin_lo", "bin_hi", "mean_predicted", "observed_fraction", "count"]
    assert len(table) == 10 and table["count"].sum() == 6
    assert table.loc[9, "count"] == 2 and table.loc[9, "observed_fraction"] == 1.0
    assert table.loc[5, "mean_predicted"] == pytest.approx(0.55) and table.loc[5, "observed_fraction"] == 0.5
    assert math.isnan(table.loc[3, "mean_predicted"]) and table.loc[3, "count"] == 0
    expected = (0.05 + 0.15 + 2 * 0.025 + 2 * 0.05) / 6
    assert expected_calibration_error(y, p, 10) == pytest.approx(expected)
    assert binary_metrics(y, p)["ece"] == pytest.approx(expected)


EXAMPLE_Y, EXAMPLE_P = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
"""J = 0.5 at the cut points 0.225 and 0.6: the one nearer 0.5 wins (an actual-score rule, ties high, gave 0.8)."""


def test_choose_threshold() -> None:
    info = choose_threshold(EXAMPLE_Y, EXAMPLE_P)
    assert info["threshold"] == pytest.approx(0.6) and info["youden_j"] == pytest.approx(0.5)
    assert info["method"] == "youden" and info["split"] == "val" and "note" not in info
    assert info["recall"] == 0.5 and info["specificity"] == 1.0 and info["roc_auc"] == 0.75 and info["n_pos"] == 2
    assert set(METRIC_NAMES) <= set(info)
    y = np.array([0, 0, 0, 1, 1, 1])
    separable = choose_threshold(y, [0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    assert separable["threshold"] == pytest.approx(0.45) and separable["youden_j"] == 1.0
    tied = choose_threshold(y, [0.1, 0.5, 0.3, 0.4, 0.7, 0.9])
    assert tied["youden_j"] == pytest.approx(2 / 3) and tied["threshold"] == pytest.approx(0.6)  # 0.35 ties
    fixed = choose_threshold(y, [0.1, 0.5, 0.3, 0.4, 0.7, 0.9], "fixed", fixed=0.42, split="train")
    assert fixed["threshold"] == 0.42 and fixed["split"] == "train" and fixed["accuracy"] == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="unknown threshold method"):
        choose_threshold(y, y, "f1")
    with pytest.raises(ValueError, match="lie in"):
        choose_threshold(y, y, "fixed", fixed=1.5)


@pytest.mark.parametrize("y", [[1, 1, 1], [0, 0], []])
def test_choose_threshold_falls_back_to_half_with_one_class(y: list[int]) -> None:
    info = choose_threshold(y, np.linspace(0, 1, len(y)))
    assert info["threshold"] == 0.5 and "one class" in info["note"] and math.isnan(info["youden_j"])


def _youden(y: np.ndarray, p: np.ndarray, t: float) -> float:
    m = binary_metrics(y, p, t)
    return m["recall"] + m["specificity"] - 1.0


@settings(max_examples=200, deadline=None, database=None)
@given(data=st.data())
def test_choose_threshold_maximises_youden_among_all_cut_points(data: st.DataObject) -> None:
    n = data.draw(st.integers(2, 40))
    y = np.array(data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    assume(0 < y.sum() < n)
    grid = data.draw(st.sampled_from([4, 20, 1000]))  # coarse grids give many tied scores
    p = np.array(data.draw(st.lists(st.integers(0, grid), min_size=n, max_size=n))) / grid
    info = choose_threshold(y, p)
    t = info["threshold"]
    cuts = np.concatenate([np.unique(p), [1.0 + 1e-9]])  # every decision p >= c can make, and "none covid"
    best = max(_youden(y, p, c) for c in cuts)
    assert info["youden_j"] == pytest.approx(best, abs=1e-9)
    assert _youden(y, p, t) == pytest.approx(best, abs=1e-9)
    assert info["tp"] + info["fp"] == int((p >= t).sum()), "predict covid when p >= threshold"
    assert info["accuracy"] == pytest.approx(float(((p >= t) == (y == 1)).mean()))
    s = np.unique(p)
    assert t == s[0] or any(np.isclose(t, (a + b) / 2) for a, b in zip(s[:-1], s[1:], strict=True)), "a cut point"
    optimal = [c for c in youden_cut_points(p) if _youden(y, p, c) >= best - 1e-9]
    assert abs(t - 0.5) <= min(abs(c - 0.5) for c in optimal) + 1e-12, "ties go to the cut point nearest 0.5"


def test_summarize_format_and_seed_summary() -> None:
    y, p = _scores(80)
    s = summarize(y, p, 0.5, groups=np.arange(80) // 2, n_boot=200, seed=1)
    m = s["metrics"]
    assert s["confusion_matrix"] == [[m["tn"], m["fp"]], [m["fn"], m["tp"]]]
    assert s["labels"] == ["normal", "covid"]
    assert s["bootstrap"]["unit"] == "patient" and s["bootstrap"]["n_units"] == 40
    assert set(s["ci"]) == set(METRIC_NAMES)
    assert summarize(y, p, 0.5, n_boot=0)["ci"] == {}

    assert format_metric(0.971, (0.926, 1.0)) == "97.1 % [92.6, 100.0]"
    assert format_metric(0.98123, (0.9601, 0.995), percent=False) == "0.981 [0.960, 0.995]"
    assert format_metric(float("nan"), (0.1, 0.2)) == "n/a"
    assert format_metric(0.5, (float("nan"), float("nan"))) == "50.0 %"

    runs = [{"accuracy": 0.9, "roc_auc": 0.95}, {"accuracy": 0.8, "roc_auc": float("nan")}, s]
    summary = seed_summary(runs[:2])
    assert summary["accuracy"][0] == pytest.approx(0.85)
    assert summary["accuracy"][1] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert summary["roc_auc"][0] == pytest.approx(0.95) and math.isnan(summary["roc_auc"][1])
    assert seed_summary([s, s])["accuracy"] == (m["accuracy"], 0.0)


def test_one_threshold_rule_in_the_source() -> None:
    """The decision threshold has one definition: a second copy (there were two, giving 0.60 and 0.80 on the example
    above) must not come back under any name."""
    root = REPO
    names = r"\w*youden\w*|\w*choose_threshold\w*|\w*(?:best|optimal|pick)_threshold\w*"
    pattern = re.compile(rf"^\s*def\s+({names})\s*\(", re.MULTILINE)
    found = [(path.relative_to(root).as_posix(), m.group(1))
             for folder in ("covidxray", "bench") for path in sorted((root / folder).rglob("*.py"))
             for m in pattern.finditer(path.read_text(encoding="utf8"))]
    assert found == [("covidxray/metrics.py", "youden_cut_points"),
                     ("covidxray/metrics.py", "choose_threshold")]


def test_a_missing_number_reads_n_a_in_any_float_type():
    """NaN as a Python float, a numpy float32 or float64, or None: "n/a", never "nan %" (one format for all)."""
    from covidxray.explain.regions import format_mass_area
    from covidxray.metrics import format_share

    for missing in (None, float("nan"), np.float32("nan"), np.float64("nan")):
        assert format_metric(missing) == "n/a" and format_metric(missing, percent=False) == "n/a"
        assert format_share(missing) == "n/a"
    assert format_metric(np.float32(0.5)) == "50.0 %" and format_share(np.float32(0.125)) == "0.12"
    assert format_mass_area({"mass_share": 0.734, "area_share": np.float32("nan")}) == "0.73 (n/a)"
