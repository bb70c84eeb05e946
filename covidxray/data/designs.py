"""Study designs (which images of the given sources make up each class) and the confounders a design leaves.

The 2020 design takes its normals from children (Kermany) and its COVID-19 images from adults (ieee8023, many of
them figures cut from papers). A model trained on it can tell the classes apart by age, source, file format,
colour mode or image size without looking at the lungs. Two presets and a pass-through:

* ``original``: Kermany normals vs ieee8023 COVID-19 (what the 2020 project did; a pre-split import counts too).
* ``adult-normals``: normals only from adults (NIH, or generic sources whose rows give an age >= 18), COVID-19
  from ieee8023 frontal X-rays; pediatric sources and any image of a known age under 18 are left out.
* ``all``: every image of every given source, as labeled.

Whatever a design leaves out is reported in the build summary, never dropped silently. :func:`confounders`
then measures what still differs between the classes and warns, stating the rule of each warning.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from covidxray import LABELS
from covidxray.data.sources.base import SourceImage, parse_age
from covidxray.data.sources.ieee8023 import FRONTAL_VIEWS
from covidxray.errors import DataError

ADULT_AGE = 18.0
PEDIATRIC_SOURCES: dict[str, str] = {"kermany": "Kermany et al. 2018, children aged 1-5 years"}
"""Sources known to hold only children's images, with the reference; their images carry no age."""
ORIGINAL_SOURCES: frozenset[str] = frozenset({"kermany", "ieee8023", "presplit"})
FRONTAL: frozenset[str] = frozenset(v.upper() for v in (*FRONTAL_VIEWS, "PA", "AP"))

TVD_LIMIT = 0.3
"""Warn when the classes' shares of a categorical factor differ by more than this total variation distance."""
SIZE_RATIO_LIMIT = 1.5
"""Warn when the classes' median widths or heights differ by more than this factor."""
AGE_GAP_LIMIT = 15.0
"""Warn when the classes' median ages differ by more than this many years."""
UNDER_18_GAP_LIMIT = 0.3
"""Warn when the classes' shares of children (known age < 18) differ by more than this."""
MIN_KNOWN = 5
"""Ages, views and sexes are compared only when each class has at least this many known values."""
AGE_UNKNOWN_LIMIT = 0.5
"""Warn when a class has no known age for more than this share of its images."""
CATEGORICAL_FACTORS: tuple[str, ...] = ("source", "format", "mode", "view", "sex")
SPARSE_FACTORS: frozenset[str] = frozenset({"view", "sex"})
"""Often unrecorded: compared on the images where they are known (an unknown value is not something to read)."""
RULES: dict[str, str] = {
    "categorical": f"the classes' shares of the values of {', '.join(CATEGORICAL_FACTORS)} differ by a total "
                   f"variation distance > {TVD_LIMIT} (view and sex: among images where known, with at least "
                   f"{MIN_KNOWN} per class)",
    "size": f"the classes' median width or height differ by a factor > {SIZE_RATIO_LIMIT}",
    "age": f"the classes' median ages differ by > {AGE_GAP_LIMIT:g} years, or their shares under 18 by "
           f"> {UNDER_18_GAP_LIMIT} (with at least {MIN_KNOWN} known ages per class)",
    "age_unknown": f"a class has no known age for > {AGE_UNKNOWN_LIMIT:.0%} of its images",
    "pediatric_source": "a source known to hold only children's images supplies one class and not the other",
}
"""When each warning fires (stated in every summary, so a reader can judge the thresholds)."""


@dataclass(frozen=True)
class Design:
    """A named rule for which images of the given sources form each class."""

    name: str
    description: str


DESIGNS: dict[str, Design] = {
    "original": Design("original", "Kermany (pediatric) normals vs ieee8023 COVID-19: the 2020 project's design; "
                                   "images of other sources are left out"),
    "adult-normals": Design("adult-normals", "normals from adults only (NIH; generic sources with age >= 18) vs "
                                             "ieee8023 frontal COVID-19 X-rays; pediatric sources and known ages "
                                             "under 18 left out"),
    "all": Design("all", "every image of every given source, as labeled (no design filter)"),
}


def get_design(name: str) -> Design:
    """The design called ``name``; a DataError listing the choices otherwise."""
    if name not in DESIGNS:
        raise DataError(f"unknown design {name!r}; use one of {sorted(DESIGNS)}.")
    return DESIGNS[name]


def _is_frontal(view: str) -> bool:
    return not view or view.strip().upper() in FRONTAL


def exclusion_reason(design: str, image: SourceImage) -> str | None:
    """Why ``design`` leaves ``image`` out, or None when it is kept."""
    if design == "all":
        return None
    if design == "original":
        if image.source not in ORIGINAL_SOURCES:
            return "not a source of the original design (Kermany normals vs ieee8023 COVID-19)"
        return None
    if design == "adult-normals":
        if image.source in PEDIATRIC_SOURCES:
            return f"pediatric source ({PEDIATRIC_SOURCES[image.source]})"
        if not math.isnan(image.age) and image.age < ADULT_AGE:
            return f"age under {ADULT_AGE:g}"
        if not _is_frontal(image.view):
            return f"not a frontal view ({image.view})"
        if image.label == "normal" and math.isnan(image.age):
            return "normal image of unknown age (adult-normals keeps normals of known age >= 18 only)"
        return None
    get_design(design)
    return None


def apply_design(design: str, images: Sequence[SourceImage]) -> tuple[list[SourceImage], dict[str, Any]]:
    """Keep the images ``design`` uses; return them and a report (selected candidates per class/source before
    the image checks, what was left out and why, one note per group left out).

    Raises DataError when a class ends up empty, naming the sources that would fill it.
    """
    spec = get_design(design)
    kept: list[SourceImage] = []
    left_out: Counter[tuple[str, str, str]] = Counter()
    for image in images:
        reason = exclusion_reason(design, image)
        if reason is None:
            kept.append(image)
        else:
            left_out[(image.source, image.label, reason)] += 1
    excluded = [{"source": s, "label": lab, "reason": r, "images": n} for (s, lab, r), n in sorted(left_out.items())]
    notes = [f"left out by design {design}: {e['images']} {e['label']} image(s) of {e['source']}: {e['reason']}"
             for e in excluded]
    kept_counts = Counter((i.label, i.source) for i in kept)
    report = {
        "name": spec.name,
        "description": spec.description,
        "selected": {f"{lab}/{src}": n for (lab, src), n in sorted(kept_counts.items())},
        "excluded": excluded,
        "notes": notes,
    }
    for label in LABELS:
        if images and not any(i.label == label for i in kept):
            hint = {"normal": "adult normals with --nih DIR or --extra CSV|DIR (rows with age >= 18)",
                    "covid": "COVID-19 images with --covid-xray DIR (ieee8023) or --extra CSV|DIR"}[label]
            why = "; ".join(notes) or "the sources hold none"
            raise DataError(f"design {design}: no {label} images left ({why}). Give {hint}, or choose another "
                            f"design ({', '.join(sorted(DESIGNS))}).")
    return kept, report


def _round(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 4)


def age_stats(ages: Iterable[float]) -> dict[str, Any]:
    """Count of known and unknown ages, median, quartiles, range and share under 18 (of the known ones)."""
    values = list(ages)
    known = np.array([a for a in values if not math.isnan(a)], dtype=np.float64)
    out: dict[str, Any] = {"known": int(known.size), "unknown": len(values) - int(known.size)}
    if known.size:
        q1, med, q3 = np.percentile(known, [25, 50, 75])
        out.update(median=_round(med), q1=_round(q1), q3=_round(q3), min=_round(known.min()),
                   max=_round(known.max()), share_under_18=_round(float((known < ADULT_AGE).mean())))
    else:
        out.update(median=None, q1=None, q3=None, min=None, max=None, share_under_18=None)
    return out


def _shares(values: Sequence[str]) -> dict[str, float]:
    counts = Counter(v or "unknown" for v in values)
    total = sum(counts.values())
    return {k: round(n / total, 4) for k, n in sorted(counts.items())} if total else {}


def _tvd(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def _describe_shares(shares: Mapping[str, float], top: int = 3) -> str:
    ordered = sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{share:.0%} {value}" for value, share in ordered[:top])
    return text + (", ..." if len(ordered) > top else "")


def confounders(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What differs between the classes besides the disease: per class and per class/source, and warnings.

    ``rows`` are manifest rows (label, source, age, format, mode, view, sex, width, height). Each warning names
    its rule (see :data:`RULES`); a balanced dataset gives none.
    """
    by_class: dict[str, dict[str, Any]] = {}
    for label in LABELS:
        part = [r for r in rows if r["label"] == label]
        ages = (parse_age(r.get("age"), strict=False) for r in part)
        entry: dict[str, Any] = {"images": len(part), "age": age_stats(ages)}
        for factor in CATEGORICAL_FACTORS:
            entry[factor] = _shares([str(r.get(factor, "") or "") for r in part])
        for side in ("width", "height"):
            entry[f"median_{side}"] = _round(float(np.median([float(r[side]) for r in part]))) if part else None
        by_class[label] = entry
    by_class_source: dict[str, dict[str, Any]] = {}
    for label, source in sorted({(r["label"], r["source"]) for r in rows}):
        part = [r for r in rows if r["label"] == label and r["source"] == source]
        by_class_source[f"{label}/{source}"] = {"images": len(part),
                                                "age": age_stats(parse_age(r.get("age"), strict=False) for r in part)}
    return {"by_class": by_class, "by_class_source": by_class_source, "rules": dict(RULES),
            "warnings": _warnings(by_class, rows)}


def _warnings(by_class: Mapping[str, Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    a, b = (by_class[label] for label in LABELS)
    if not a["images"] or not b["images"]:
        return []
    warnings: list[dict[str, Any]] = []

    def warn(rule: str, factor: str, value: float, limit: float, message: str) -> None:
        warnings.append({"rule": rule, "factor": factor, "value": round(value, 4), "limit": limit,
                         "message": message})

    names = LABELS
    for factor in CATEGORICAL_FACTORS:
        sa, sb = a[factor], b[factor]
        if factor in SPARSE_FACTORS:
            known = [[str(r.get(factor) or "") for r in rows if r["label"] == label and r.get(factor)]
                     for label in names]
            if min(len(k) for k in known) < MIN_KNOWN:
                continue
            sa, sb = (_shares(k) for k in known)
        tvd = _tvd(sa, sb)
        if tvd > TVD_LIMIT:
            where = " (where known)" if factor in SPARSE_FACTORS else ""
            warn("categorical", factor, tvd, TVD_LIMIT,
                 f"classes differ in {factor}{where}: {names[0]} {_describe_shares(sa)}; "
                 f"{names[1]} {_describe_shares(sb)} (total variation distance {tvd:.2f} > {TVD_LIMIT})")
    for side in ("width", "height"):
        ma, mb = a[f"median_{side}"], b[f"median_{side}"]
        if ma and mb:
            ratio = max(ma, mb) / min(ma, mb)
            if ratio > SIZE_RATIO_LIMIT:
                warn("size", side, ratio, SIZE_RATIO_LIMIT,
                     f"classes differ in image {side}: median {names[0]} {ma:g} px, {names[1]} {mb:g} px "
                     f"(ratio {ratio:.2f} > {SIZE_RATIO_LIMIT})")
    age_a, age_b = a["age"], b["age"]
    if age_a["known"] >= MIN_KNOWN and age_b["known"] >= MIN_KNOWN:
        gap = abs(age_a["median"] - age_b["median"])
        if gap > AGE_GAP_LIMIT:
            warn("age", "age", gap, AGE_GAP_LIMIT,
                 f"classes differ in age: median {names[0]} {age_a['median']:g} years, {names[1]} "
                 f"{age_b['median']:g} years (gap {gap:.1f} > {AGE_GAP_LIMIT:g})")
        child_gap = abs(age_a["share_under_18"] - age_b["share_under_18"])
        if child_gap > UNDER_18_GAP_LIMIT:
            warn("age", "share_under_18", child_gap, UNDER_18_GAP_LIMIT,
                 f"classes differ in children: under 18 {names[0]} {age_a['share_under_18']:.0%}, {names[1]} "
                 f"{age_b['share_under_18']:.0%} (difference {child_gap:.2f} > {UNDER_18_GAP_LIMIT})")
    for label, entry in zip(names, (a, b), strict=True):
        unknown = entry["age"]["unknown"] / entry["images"]
        if unknown > AGE_UNKNOWN_LIMIT:
            warn("age_unknown", f"age/{label}", unknown, AGE_UNKNOWN_LIMIT,
                 f"age unknown for {unknown:.0%} of {label} images: the age check covers only the rest")
    for source, reference in sorted(PEDIATRIC_SOURCES.items()):
        labels = {r["label"] for r in rows if r["source"] == source}
        if len(labels) == 1:
            (label,) = labels
            warn("pediatric_source", f"source/{source}", 1.0, 1.0,
                 f"{label} images come from {source}, a pediatric data set ({reference}), the other class does "
                 "not: the classes differ in age by design")
    return warnings


def format_design(summary: Mapping[str, Any]) -> list[str]:
    """Printable lines: the design, what it left out, the age per class and source, and the confounder warnings."""
    lines: list[str] = []
    design = summary.get("design") or {}
    if design:
        lines.append(f"design {design['name']}: {design['description']}")
        lines.extend(f"  {note}" for note in design.get("notes", []))
    conf = summary.get("confounders") or {}
    for key, entry in sorted((conf.get("by_class_source") or {}).items()):
        age = entry["age"]
        if age["known"]:
            lines.append(f"  age {key}: {entry['images']} images, median {age['median']:g} "
                         f"[{age['q1']:g}-{age['q3']:g}], {age['share_under_18']:.0%} under 18, "
                         f"{age['unknown']} unknown")
        else:
            lines.append(f"  age {key}: {entry['images']} images, age unknown")
    warnings = conf.get("warnings") or []
    lines.append(f"confounder warnings: {len(warnings)}" + ("" if warnings else " (classes balanced on the checks)"))
    lines.extend(f"  WARNING {w['message']}" for w in warnings)
    return lines
