"""Sanity checks of the heatmaps: do they depend on the learned weights, and do they look at the lungs?

* :func:`randomization_check`: model-randomisation test (Adebayo et al. 2018). Heatmaps of the trained model
  are compared with those of the same architecture with fresh random weights; a high rank correlation means
  the method mostly shows image structure (edges), not what the model learned.
  It only applies to a model whose predictions separate the classes: with labels, a model whose ROC-AUC on
  the images is below 0.6, or whose probabilities hardly vary (5th to 95th percentile spread below 0.05), gets
  "not applicable / failed" (``passed`` false), whatever the correlation: a model no better than chance has
  learned nothing for its heatmaps to show.
* :func:`attention_distribution`: share of heatmap mass in the central thoracic box versus a fixed outer band.
* :func:`off_anatomy`: share of heatmap mass on what is not anatomy, measured per image with the masks of
  :mod:`covidxray.explain.regions`: padding and flat regions, burnt-in markers, the outside of the (estimated)
  body, and the outside of the (estimated) lung fields (the abdomen, mediastinum, neck and shoulders included).
  A fixed band misses padding above a pasted-in figure or a marker inside the frame; these masks do not.

Shortcut warning rule (:data:`MARGIN`, :data:`N_BOOT`, :data:`CONFIDENCE`, :data:`BOOTSTRAP_SEED`,
:data:`MIN_IMAGES`), per region (padding and markers with a rim around them, see
:func:`covidxray.explain.regions.measured_regions`; outside the body; outside the lung fields) and per group of
images (all, each class, each source): each image gives its *excess*, the share of heatmap mass in the region minus
the region's share of the image area. A region fires for a group when the lower end of the 95 % percentile
bootstrap interval (1000 resamples of the group's images, seed 0) of the mean excess is at least 0.10. A map spread
evenly over the image has an excess of 0 on every image, so it never fires, however large the region; a map that
puts its mass in a region fires there once the images agree.

Why a difference of 0.10 and not a ratio: the regions differ in size by a factor of 30 (markers about 2 % of a film,
outside the lung fields about 70 %), and a ratio cannot reach 1.25 for a region larger than 80 % of the image; a
difference reads the same for every region ("a tenth of the evidence moved into the region beyond an even spread")
and can be reached by any region under 90 % of the image. For the small regions it is close to the levels of the
earlier rule (padding, outside the body: about 1.5x their mean area; markers: more than 10 % of the mass on about 2 %
of the image); for the lung fields it adds the margin the earlier rule lacked, whose "more mass outside the lung
fields than their area" fired on a uniform map. The bootstrap interval keeps a few extreme images (or a group of
two) from firing on their own; a group needs :data:`MIN_IMAGES` non-empty maps to fire at all. The warning names
only the regions that fired, each with what it holds and the groups it fired for; checks.json holds the rule
(sentence and parameters), every group's mean mass and area shares, the intervals, and the shares of every image
under its file name.

:func:`write_checks` runs them all and writes them as JSON next to the overlays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from scipy.stats import pearsonr, spearmanr

from covidxray import LABELS
from covidxray.errors import ModelError
from covidxray.explain import regions as image_regions
from covidxray.explain.maps import as_image_batch, heatmaps, image_keys, resolve_method, safe_name
from covidxray.explain.regions import REGION_EXPLANATIONS, REGION_NAMES, REGIONS, mass_shares, measured_regions
from covidxray.metrics import binary_metrics
from covidxray.outputs import json_text, to_jsonable, write_text

LOW_CORRELATION = 0.5
"""Mean Spearman correlation (trained vs random weights) below which the randomisation check passes."""
BORDER_RATIO_LIMIT = 2.0
"""Warn when the border band holds more than this multiple of its area share of the heatmap mass."""
SHORTCUT_WARNING = (
    "shortcut warning: the model looks at the image border, where text, markers and collimation edges are"
)
TOP_FRACTION = 0.1
MIN_SEPARATION_AUC = 0.6
"""Below this ROC-AUC on the explained images the randomisation check does not apply (reported as failed)."""
MIN_PROB_SPREAD = 0.05
"""Below this spread of p(covid) (95th minus 5th percentile) the randomisation check does not apply."""
MARGIN = 0.10
"""A region fires when the lower bound of the mean excess (mass share minus area share) is at least this."""
N_BOOT = 1000
"""Bootstrap resamples of a group's images for the interval of its mean excess."""
CONFIDENCE = 0.95
"""Coverage of the percentile bootstrap interval; its lower end decides."""
BOOTSTRAP_SEED = 0
"""Seed of the bootstrap (the same resamples for every region, so the checks are deterministic)."""
MIN_IMAGES = 2
"""Fewest non-empty maps a group needs for an interval (and to fire); fewer: no interval, no warning."""
OFF_ANATOMY_WARNING = "shortcut warning: the heatmaps put more of their mass than an even spread would on"


# ------------------------------------------------------------ randomisation


def randomized_copy(model: keras.Model, seed: int = 0) -> keras.Model:
    """Same architecture, fresh weights: kernels from a seeded Glorot uniform, the rest re-initialised."""
    try:
        clone = keras.models.clone_model(model)
    except Exception as exc:
        raise ModelError(f"cannot clone model {model.name!r} for the randomisation check: {exc}") from exc
    for i, variable in enumerate(clone.weights):
        if variable.name.endswith("kernel") and len(variable.shape) >= 2:
            init = keras.initializers.GlorotUniform(seed=seed + i)
            variable.assign(init(tuple(variable.shape), dtype=variable.dtype))
    return clone


def _nan_to_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _correlation(fn: object, a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0.0 or np.ptp(b) == 0.0:
        return float("nan")
    return float(fn(a, b)[0])


def _top_iou(a: np.ndarray, b: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    k = max(1, int(round(fraction * a.size)))
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(top_a & top_b) / len(top_a | top_b)


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def compare_maps(trained: np.ndarray, random: np.ndarray) -> dict:
    """Per-image Spearman and Pearson correlations, mean absolute difference and top-10 % overlap (IoU)."""
    if trained.shape != random.shape:
        raise ValueError(f"map shapes differ: {trained.shape} vs {random.shape}.")
    spear, pear, mad, iou = [], [], [], []
    for a, b in zip(trained.reshape(len(trained), -1), random.reshape(len(random), -1), strict=True):
        spear.append(_correlation(spearmanr, a, b))
        pear.append(_correlation(pearsonr, a, b))
        mad.append(float(np.abs(a - b).mean()))
        iou.append(_top_iou(a, b))
    return {"spearman": spear, "pearson": pear, "mean_abs_diff": mad, "top10_iou": iou}


def randomization_check(
    model: keras.Model,
    images: object,
    method: str = "auto",
    seed: int = 0,
    *,
    layer: str | None = None,
    maps: np.ndarray | None = None,
    batch_size: int = 32,
    max_images: int | None = None,
    labels: object | None = None,
    probs: object | None = None,
) -> dict:
    """Model-randomisation sanity check: rank correlation of heatmaps from trained vs re-initialised weights.

    ``maps`` are the trained model's heatmaps when already computed; ``max_images`` caps the cost with evenly
    spaced images. A low mean Spearman correlation (< 0.5) means the heatmaps depend on the weights, as they
    must; correlations of constant (e.g. all-zero) maps are undefined and left out of the mean (counted in
    ``n_undefined``). With ``labels`` ("normal"/"covid" or 0/1 per image; ``probs`` = p(covid), predicted when
    None) the check first asks whether the model separates the classes at all (:func:`separation`); if not, it
    reports "not applicable / failed" and ``passed`` is False.
    """
    x = as_image_batch(images)
    sep = None
    if labels is not None:
        if probs is None:
            from covidxray.runs.load import predict_proba

            probs = predict_proba(model, x, batch_size=batch_size)
        sep = separation(labels, probs)
    if maps is not None and len(maps) != len(x):
        raise ValueError(f"{len(maps)} maps for {len(x)} images.")
    if max_images is not None and len(x) > max_images:
        keep = np.unique(np.linspace(0, len(x) - 1, max(1, max_images)).round().astype(int))
        x = x[keep]
        maps = None if maps is None else np.asarray(maps)[keep]
    used, name = resolve_method(model, method, layer)
    trained = heatmaps(model, x, used, name, batch_size=batch_size) if maps is None else np.asarray(maps)
    random = heatmaps(randomized_copy(model, seed), x, used, name, batch_size=batch_size)
    stats = compare_maps(np.asarray(trained, np.float64), np.asarray(random, np.float64))
    rho = stats["spearman"]
    mean_rho = _mean(rho)
    n_undefined = sum(not math.isfinite(v) for v in rho)
    if sep is not None and not sep["separates"]:
        passed = False
        text = f"not applicable / failed: {sep['reason']}; its heatmaps cannot show learned evidence."
    elif mean_rho is None:
        passed = None
        text = (
            "undefined: the trained or the random heatmaps are constant (e.g. all zero) for every image, "
            "so no rank correlation exists; look at the overlays."
        )
    elif mean_rho < LOW_CORRELATION:
        passed = True
        text = (
            f"passed: mean Spearman correlation {mean_rho:.2f} < {LOW_CORRELATION}: the heatmaps change "
            "when the "
            "weights are randomised, so they reflect what the model learned."
        )
    else:
        passed = False
        text = (
            f"failed: mean Spearman correlation {mean_rho:.2f} >= {LOW_CORRELATION}: heatmaps of a random "
            "model look alike, so they mostly show image structure (edges, bright regions), not the "
            "model's evidence."
        )
    return {
        "method": used,
        "layer": name,
        "seed": int(seed),
        "n_images": len(x),
        "spearman_mean": mean_rho,
        "spearman_median": _nan_to_none(float(np.nanmedian(rho))) if mean_rho is not None else None,
        "spearman_per_image": [_nan_to_none(v) for v in rho],
        "n_undefined": int(n_undefined),
        "pearson_mean": _mean(stats["pearson"]),
        "mean_abs_diff": _mean(stats["mean_abs_diff"]),
        "top10_iou_mean": _mean(stats["top10_iou"]),
        "random_all_zero": int(sum(float(m.max()) == 0.0 for m in random)),
        "threshold": LOW_CORRELATION,
        "separation": sep,
        "passed": passed,
        "interpretation": text,
    }


def _binary_labels(labels: object) -> np.ndarray:
    """0/1 per image from "normal"/"covid" strings or 0/1 numbers."""
    values = list(np.asarray(labels, dtype=object).reshape(-1))
    out = []
    for v in values:
        text = str(v).strip().lower()
        if text in (LABELS[1], "1", "1.0", "true"):
            out.append(1)
        elif text in (LABELS[0], "0", "0.0", "false"):
            out.append(0)
        else:
            raise ValueError(f"label {v!r} is neither {LABELS[0]!r} nor {LABELS[1]!r} (nor 0/1).")
    return np.asarray(out, dtype=np.int64)


def separation(labels: object, probs: object) -> dict:
    """Does the model tell the classes apart on these images? ROC-AUC (when both classes are present) and the
    spread of p(covid) (95th minus 5th percentile); ``separates`` is False below :data:`MIN_SEPARATION_AUC` or
    :data:`MIN_PROB_SPREAD`, with the ``reason`` in words."""
    y = _binary_labels(labels)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if len(p) != len(y):
        raise ValueError(f"{len(p)} probabilities for {len(y)} labels.")
    auc = binary_metrics(y, p)["roc_auc"] if len(y) and 0 < y.sum() < len(y) else float("nan")
    spread = float(np.percentile(p, 95) - np.percentile(p, 5)) if len(p) else 0.0
    reasons = []
    if math.isfinite(auc) and auc < MIN_SEPARATION_AUC:
        reasons.append(f"ROC-AUC {auc:.2f} on {len(p)} images, below {MIN_SEPARATION_AUC}")
    if spread < MIN_PROB_SPREAD:
        reasons.append(f"p(covid) spans only {spread:.3f} (5th-95th percentile), below {MIN_PROB_SPREAD}")
    reason = ("the model's predictions do not separate the classes (" + "; ".join(reasons) + ")") if reasons else ""
    return {"roc_auc": _nan_to_none(auc), "prob_spread": spread, "n_images": len(p),
            "min_roc_auc": MIN_SEPARATION_AUC, "min_prob_spread": MIN_PROB_SPREAD,
            "separates": not reasons, "reason": reason}


# ------------------------------------------------------------ attention


def region_masks(
    height: int, width: int, *, center_fraction: float = 0.6, border_fraction: float = 0.1
) -> dict[str, np.ndarray]:
    """Boolean (H, W) masks: central box, middle ring, border band and its four corner squares (a subset)."""
    if not 0.0 < center_fraction <= 1.0 or not 0.0 < border_fraction < 0.5:
        raise ValueError("need 0 < center_fraction <= 1 and 0 < border_fraction < 0.5.")
    if center_fraction + 2.0 * border_fraction > 1.0 + 1e-9:
        raise ValueError(
            f"center box ({center_fraction}) and border bands (2 x {border_fraction}) overlap; "
            "their sum must be <= 1."
        )
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    ch, cw = round(height * center_fraction), round(width * center_fraction)
    top, left = (height - ch) // 2, (width - cw) // 2
    center = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
    bh, bw = max(1, round(height * border_fraction)), max(1, round(width * border_fraction))
    edge_rows = (rows < bh) | (rows >= height - bh)
    edge_cols = (cols < bw) | (cols >= width - bw)
    border = (edge_rows | edge_cols) & ~center
    corners = edge_rows & edge_cols & ~center
    middle = ~center & ~border
    return {"center": center, "middle": middle, "border": border, "corners": corners}


def region_shares(
    maps: object, *, center_fraction: float = 0.6, border_fraction: float = 0.1
) -> pd.DataFrame:
    """Per map: share of heatmap mass per region (center + middle + border = 1); NaN for an all-zero map."""
    m = np.asarray(maps, dtype=np.float64)
    if m.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {m.shape}.")
    m = np.maximum(np.nan_to_num(m), 0.0)
    masks = region_masks(
        m.shape[1], m.shape[2], center_fraction=center_fraction, border_fraction=border_fraction
    )
    total = m.sum(axis=(1, 2))
    out = {"empty": total <= 0.0}
    for region, mask in masks.items():
        mass = (m * mask).sum(axis=(1, 2))
        out[f"{region}_share"] = np.divide(mass, total, out=np.full_like(total, np.nan), where=total > 0.0)
    return pd.DataFrame(out)


def _group_stats(shares: pd.DataFrame, area_border: float) -> dict:
    used = shares[~shares["empty"]]
    stats: dict = {"n_images": len(shares), "n_empty": int(shares["empty"].sum())}
    for region in ("center", "middle", "border", "corners"):
        stats[f"{region}_share"] = float(used[f"{region}_share"].mean()) if len(used) else None
    border = stats["border_share"]
    stats["border_ratio"] = border / area_border if border is not None else None
    stats["border_heavy"] = bool(border is not None and border > BORDER_RATIO_LIMIT * area_border)
    stats["n_border_heavy_images"] = int((used["border_share"] > BORDER_RATIO_LIMIT * area_border).sum())
    return stats


def _per_group(df: pd.DataFrame | None, shares: pd.DataFrame, stats: Callable[[pd.DataFrame], dict]
               ) -> Iterator[tuple[str, str, dict[str, dict]]]:
    """(column, result key, {value: stats of that group's rows}) per class and per source, when ``df`` has them."""
    if df is None:
        return
    if len(df) != len(shares):
        raise ValueError(f"df has {len(df)} rows but there are {len(shares)} maps.")
    for column, key in (("label", "per_class"), ("source", "per_source")):
        if column in df.columns:
            values = df[column].astype(str).to_numpy()
            yield column, key, {value: stats(shares[values == value].reset_index(drop=True))
                                for value in sorted(set(values))}


def attention_distribution(
    maps: object,
    df: pd.DataFrame | None = None,
    *,
    center_fraction: float = 0.6,
    border_fraction: float = 0.1,
) -> dict:
    """Heatmap mass in the central box vs the border band and corners: overall, per class and per source.

    Shares are means over non-empty maps of each map's mass fraction; ``warning`` is set when the border share
    exceeds 2x the border's area share overall or in any class or source group.
    """
    m = np.asarray(maps, dtype=np.float64)
    shares = region_shares(m, center_fraction=center_fraction, border_fraction=border_fraction)
    masks = region_masks(
        m.shape[1], m.shape[2], center_fraction=center_fraction, border_fraction=border_fraction
    )
    area = {region: float(mask.mean()) for region, mask in masks.items()}
    limit = BORDER_RATIO_LIMIT * area["border"]
    result: dict = {
        "center_fraction": center_fraction,
        "border_fraction": border_fraction,
        "area_share": area,
        "rule": (
            "warn when the mean share of heatmap mass in the border band "
            f"(outer {border_fraction:.0%} on each "
            f"side) exceeds {BORDER_RATIO_LIMIT:g}x the band's share of the image area "
            f"({area['border']:.3f} -> limit {limit:.3f}), overall or in any class or source"
        ),
        "overall": _group_stats(shares, area["border"]),
    }
    heavy = ["overall"] if result["overall"]["border_heavy"] else []
    for column, key, groups in _per_group(df, shares, lambda part: _group_stats(part, area["border"])):
        heavy.extend(f"{column}={value}" for value, stats in groups.items() if stats["border_heavy"])
        result[key] = groups
    result["warning"] = (
        f"{SHORTCUT_WARNING} (border share above {limit:.2f} for: {', '.join(heavy)})" if heavy else None
    )
    return result


# ------------------------------------------------------------ off anatomy


def off_anatomy_shares(images: object, maps: object) -> pd.DataFrame:
    """One row per image: ``<region>_share`` (heatmap mass) and ``<region>_area`` for the regions of
    :func:`covidxray.explain.regions.measured_regions` (padding and markers with their rim), and ``empty`` (an
    all-zero map: its shares are NaN)."""
    x = as_image_batch(images)
    m = np.asarray(maps, dtype=np.float64)
    if m.shape != x.shape[:3]:
        raise ValueError(f"maps shape {m.shape} does not match the images' {x.shape[:3]}.")
    rows = []
    for image, heat in zip(x, m, strict=True):
        row = mass_shares(heat, measured_regions(image_regions.region_masks(image)))
        row["empty"] = not np.isfinite(row[f"{REGIONS[0]}_share"])
        rows.append(row)
    columns = [f"{r}_{k}" for r in REGIONS for k in ("share", "area")] + ["empty"]
    return pd.DataFrame(rows, columns=columns)


def excess_interval(mass: object, area: object, *, n_boot: int = N_BOOT, confidence: float = CONFIDENCE,
                    seed: int = BOOTSTRAP_SEED) -> dict:
    """Mean mass share, mean area share and mean excess (mass minus area) of paired per-image shares, with
    percentile bootstrap intervals (images resampled with replacement, the same draws for mass and excess) of the
    mean mass share (``mass_ci``) and of the mean excess (``excess_ci``); ``fired`` when the excess interval's lower
    end is at least :data:`MARGIN`. NaN pairs (empty maps) are left out; fewer than :data:`MIN_IMAGES` pairs give no
    interval and never fire."""
    s = np.asarray(mass, dtype=np.float64).reshape(-1)
    a = np.asarray(area, dtype=np.float64).reshape(-1)
    if s.shape != a.shape:
        raise ValueError(f"{len(s)} mass shares for {len(a)} area shares.")
    keep = np.isfinite(s) & np.isfinite(a)
    s, a = s[keep], a[keep]
    out: dict = {"n_images": int(len(s)), "mass_share": float(s.mean()) if len(s) else None,
                 "area_share": float(a.mean()) if len(s) else None,
                 "excess": float((s - a).mean()) if len(s) else None, "mass_ci": None, "excess_ci": None,
                 "n_images_over_margin": int(((s - a) >= MARGIN).sum()), "fired": False}
    if len(s) >= MIN_IMAGES:
        draws = np.random.default_rng(seed).integers(0, len(s), size=(n_boot, len(s)))
        tails = [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2]
        out["mass_ci"] = [float(v) for v in np.percentile(s[draws].mean(axis=1), tails)]
        out["excess_ci"] = [float(v) for v in np.percentile((s - a)[draws].mean(axis=1), tails)]
        out["fired"] = bool(out["excess_ci"][0] >= MARGIN - 1e-12)
    return out


def _off_group(shares: pd.DataFrame) -> dict:
    used = shares[~shares["empty"].astype(bool)]
    stats: dict = {"n_images": len(shares), "n_empty": int(shares["empty"].astype(bool).sum()), "over": []}
    for region in REGIONS:
        result = excess_interval(used[f"{region}_share"], used[f"{region}_area"])
        result.pop("n_images")
        stats[region] = result
        if result["fired"]:
            stats["over"].append(region)
    return stats


def off_anatomy_rule() -> str:
    """The warning rule in one sentence, with its numbers (checks.json, the heatmap summaries, the notebook)."""
    return (f"a region fires for a group of images when the lower end of the {CONFIDENCE * 100:g} % bootstrap interval "
            f"({N_BOOT} resamples of the images, seed {BOOTSTRAP_SEED}) of the mean of (share of heatmap mass in "
            f"the region minus the region's share of the image area) is at least {MARGIN:.2f}; an even spread "
            f"(mass share = area share on every image) never fires, and a group needs at least {MIN_IMAGES} "
            "non-empty maps")


def off_anatomy_parameters() -> dict:
    """The rule's parameters by name, as checks.json stores them."""
    return {"statistic": "mean over images of (mass share - area share)", "margin": MARGIN, "n_boot": N_BOOT,
            "confidence": CONFIDENCE, "seed": BOOTSTRAP_SEED, "min_images": MIN_IMAGES,
            "interval": "percentile bootstrap over images"}


def off_anatomy_warning(fired: dict[str, list[str]]) -> str | None:
    """The warning sentence for ``fired`` ({region: groups it fired for}, in any order): only those regions,
    each with what it holds (:data:`covidxray.explain.regions.REGION_EXPLANATIONS`) and its groups; None when
    none fired."""
    parts = [f"{REGION_NAMES[r]} ({REGION_EXPLANATIONS[r]}) for {', '.join(fired[r])}"
             for r in REGIONS if fired.get(r)]
    if not parts:
        return None
    return (f"{OFF_ANATOMY_WARNING}: " + "; ".join(parts)
            + f" (lower {CONFIDENCE * 100:g} % bound of mass minus area at least {MARGIN:.2f})")


def _per_image(shares: pd.DataFrame, keys: list[str], files: list[str] | None) -> dict[str, list[dict]]:
    """Per region, one entry per image: its name (as in the overlay file name), overlay file, mass and area."""
    out: dict[str, list[dict]] = {}
    for region in REGIONS:
        rows = []
        for i, key in enumerate(keys):
            entry = {"image": key}
            if files is not None:
                entry["file"] = files[i]
            entry.update(mass=_nan_to_none(shares[f"{region}_share"].iloc[i]),
                         area=_nan_to_none(shares[f"{region}_area"].iloc[i]))
            rows.append(entry)
        out[region] = rows
    return out


def off_anatomy(images: object, maps: object, df: pd.DataFrame | None = None, *,
                files: list[str] | None = None) -> dict:
    """Heatmap mass on padding/flat regions, markers, outside the body and outside the lung fields vs their
    area: overall, per class and per source (``df`` columns "label", "source"), with the warning of the module's
    rule (None: no warning). ``per_image`` lists each region's shares under the image's name (from ``df``'s
    "path"/"filepath"/"name" column, as the overlay file names write it) and, with ``files``, its overlay file."""
    shares = off_anatomy_shares(images, maps)
    keys = image_keys(df) if df is not None else [f"image-{i}" for i in range(len(shares))]
    if len(keys) != len(shares) or (files is not None and len(files) != len(shares)):
        raise ValueError(f"{len(keys)} names and {len(files or keys)} files for {len(shares)} maps.")
    result: dict = {"rule": off_anatomy_rule(), "rule_parameters": off_anatomy_parameters(),
                    "regions": {r: {"name": REGION_NAMES[r], "explanation": REGION_EXPLANATIONS[r]}
                                for r in REGIONS},
                    "overall": _off_group(shares)}
    fired: dict[str, list[str]] = {r: ["all images"] for r in result["overall"]["over"]}
    for column, key, groups in _per_group(df, shares, _off_group):
        for value, stats in groups.items():
            for region in stats["over"]:
                fired.setdefault(region, []).append(f"{column}={value}")
        result[key] = groups
    result["per_image"] = _per_image(shares, keys, files)
    result["warning"] = off_anatomy_warning(fired)
    return result


# ------------------------------------------------------------ output


def checks_filename(model_name: str) -> str:
    """File name of a model's checks, e.g. ``scratch-gap__checks.json``."""
    return f"{safe_name(model_name, 'model', 60)}__checks.json"


def write_checks(
    model: keras.Model,
    images: object,
    out_dir: str | Path,
    *,
    model_name: str,
    df: pd.DataFrame | None = None,
    maps: np.ndarray | None = None,
    method: str = "auto",
    layer: str | None = None,
    seed: int = 0,
    batch_size: int = 32,
    max_random_images: int | None = 64,
    center_fraction: float = 0.6,
    border_fraction: float = 0.1,
    probs: object | None = None,
    split_labels: object | None = None,
    split_probs: object | None = None,
    explained: dict | None = None,
    files: list[str] | None = None,
) -> dict:
    """Run the checks, write them to ``out_dir/<model>__checks.json`` (atomically), return the same dict.

    ``maps`` (this model's heatmaps of ``images``, e.g. from :func:`covidxray.explain.maps.heatmaps`) save a pass;
    the randomisation check uses at most ``max_random_images`` of the images, and ``df["label"]`` with
    ``probs`` (p(covid), predicted when None) to ask first whether the model separates the classes.
    ``warning`` joins the border-band and the off-anatomy warnings (None: neither fired). ``split_labels`` and
    ``split_probs`` (every image of the split the sample was drawn from) replace them for that question: a sample
    stratified by outcome over-represents errors, so it must not decide whether the model separates the classes.
    ``explained`` (see :func:`covidxray.explain.render.explained_model`: run folder, test metrics, method and why)
    is stored as it is; ``files`` are the overlay file names of the images, stored beside each image's shares.
    """
    x = as_image_batch(images)
    used, name = resolve_method(model, method, layer)
    if maps is None:
        maps = heatmaps(model, x, used, name, batch_size=batch_size)
    labels = df["label"].tolist() if df is not None and "label" in df.columns else None
    if split_labels is not None and split_probs is not None:
        labels, probs = list(split_labels), split_probs
    attention = attention_distribution(maps, df, center_fraction=center_fraction, border_fraction=border_fraction)
    off = off_anatomy(x, maps, df, files=files)
    warnings = [w for w in (off["warning"], attention["warning"]) if w]
    result = {
        "model": model_name,
        "method": used,
        "layer": name,
        "explained": explained,
        "n_images": len(x),
        "randomization": randomization_check(
            model, x, used, seed, layer=name, maps=maps, batch_size=batch_size, max_images=max_random_images,
            labels=labels, probs=probs,
        ),
        "attention": attention,
        "off_anatomy": off,
        "warning": "; ".join(warnings) if warnings else None,
    }
    result = to_jsonable(result)
    write_text(json_text(result, sort_keys=False), Path(out_dir) / checks_filename(model_name))
    return result
