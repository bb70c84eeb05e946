"""Build the two-class dataset: sources -> design -> checked images -> de-duplicated, patient-level split.

Writes ``{out}/{train,val,test}/{normal,covid}/``, ``manifest.csv`` (one row per image), ``rejected.csv`` (files
skipped, with the reason) and ``summary.json`` (counts, leakage checks, the design with what it left out, and the
confounders: age, source, format, mode and size per class, with warnings). Sources are only read. The output
is claimed through :mod:`covidxray.outputs`: a folder holding anything the tool did not write is refused before any
work, the new build is staged inside it and swapped in entry by entry, so a failed build leaves the previous dataset
intact, and the same inputs always give a byte-identical manifest.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from covidxray import LABELS
from covidxray.data.designs import apply_design, confounders, get_design
from covidxray.data.download import read_download_record
from covidxray.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, CheckedImage, check_image
from covidxray.data.licences import SYNTHETIC_LICENCE, SYNTHETIC_LINK
from covidxray.data.manifest import (
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    REJECTED_NAME,
    SPLITS,
    SUMMARY_NAME,
    dataset_provenance,
)
from covidxray.data.sources import (
    FRONTAL_VIEWS,
    NIH_VIEWS,
    SourceImage,
    SourceScan,
    read_generic,
    read_ieee8023,
    read_kermany,
    read_nih,
    read_presplit,
)
from covidxray.data.sources.generic import default_source
from covidxray.data.split import assign_splits, cap_groups, group_ids, near_duplicate_pairs
from covidxray.data.synthetic import is_synthetic
from covidxray.errors import DataError, ImageError
from covidxray.outputs import OutputDir, claim_output, json_text, write_csv
from covidxray.progress import progress_bar


@dataclass
class BuildConfig:
    """Parameters of a dataset build; saved in summary.json."""

    seed: int = 0
    test_fraction: float = 0.2
    """Share of each class's images (whole patients) held out for the final test; ignored for pre-split imports."""
    val_fraction: float = 0.15
    """Share of the remaining (training) images carved out for validation: model selection uses only these."""
    caps: dict[str, int] = field(default_factory=dict)
    """Most images per class, e.g. {"normal": 200} as the 2020 project; whole patients are kept or dropped."""
    views: tuple[str, ...] = FRONTAL_VIEWS
    """ieee8023 views to select; ("PA",) reproduces the 2020 project."""
    findings: tuple[str, ...] = ("COVID-19",)
    nih_views: tuple[str, ...] = NIH_VIEWS
    """NIH ``View Position`` values to select."""
    nih_min_age: float | None = 18.0
    """Youngest NIH patient (years) to select; None for no bound. Rows of unknown age are left out when bounded."""
    nih_max_age: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    near_duplicate_bits: int = 12
    """Two images whose 256-bit difference hashes differ in at most this many bits are near duplicates (0-24,
    see :data:`covidxray.limits.MAX_NEAR_DUP_BITS`)."""

    def validate(self) -> None:
        """Raise DataError naming each setting (and its ``covidxray data`` flag) that is out of range."""
        from covidxray import limits

        checks = [
            ("seed", self.seed, limits.SEED, "--seed"),
            ("test_fraction", self.test_fraction, limits.FRACTION, "--test-fraction"),
            ("val_fraction", self.val_fraction, limits.FRACTION, "--val-fraction"),
            ("max_pixels", self.max_pixels, limits.POSITIVE_INT, "--max-pixels"),
            ("min_side", self.min_side, limits.POSITIVE_INT, None),
            ("near_duplicate_bits", self.near_duplicate_bits, limits.NEAR_DUP_BITS, "--near-dup-bits"),
            *((f"caps[{label!r}]", n, limits.POSITIVE_INT, "--cap") for label, n in self.caps.items()),
        ]
        if self.nih_min_age is not None:
            checks.append(("nih_min_age", self.nih_min_age, limits.AGE, "--nih-min-age"))
        if self.nih_max_age is not None:
            checks.append(("nih_max_age", self.nih_max_age, limits.AGE, "--nih-max-age"))
        problems = [p for name, value, valid, flag in checks if (p := limits.out_of_range(name, value, valid, flag))]
        problems += [f"caps: unknown label {label!r} (--cap LABEL=N takes one of {list(LABELS)})"
                     for label in self.caps if label not in LABELS]
        ages = (self.nih_min_age, self.nih_max_age)
        if not problems and None not in ages and ages[0] > ages[1]:
            problems.append(f"nih_min_age (--nih-min-age) {self.nih_min_age} is above nih_max_age (--nih-max-age) "
                            f"{self.nih_max_age}; no NIH patient could be kept")
        if not problems and self.max_pixels < self.min_side**2:
            problems.append(f"max_pixels (--max-pixels) {self.max_pixels} is below {self.min_side}x{self.min_side} "
                            f"= {self.min_side**2}, the smallest image accepted; every image would be refused")
        if problems:
            raise DataError("bad dataset build settings: " + "; ".join(problems) + ".", usage=True)


@dataclass
class _Candidate:
    image: SourceImage
    checked: CheckedImage


def _safe_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._") or "image"
    return stem[:80]


def _check_all(images: list[SourceImage], config: BuildConfig, progress: bool) -> tuple[list[_Candidate], list]:
    """Decode every candidate once (two threads: Pillow releases the GIL while decoding)."""

    def work(img: SourceImage) -> CheckedImage | ImageError:
        try:
            return check_image(img.path, max_pixels=config.max_pixels, min_side=config.min_side)
        except ImageError as exc:
            return exc

    good: list[_Candidate] = []
    rejected: list[tuple[str, str, str]] = []
    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(work, images)
        for img, res in progress_bar(zip(images, results, strict=True), total=len(images), desc="checking images",
                                     enabled=progress, unit="img"):
            if isinstance(res, ImageError):
                rejected.append((img.source, img.rel_path, res.reason))
            else:
                good.append(_Candidate(img, res))
    return good, rejected


def _drop_exact_duplicates(cands: list[_Candidate], rejected: list) -> tuple[list[_Candidate], int]:
    """Keep one file per sha256 (the first by source and path); a copy with another label drops both."""
    by_sha: dict[str, list[_Candidate]] = {}
    for c in sorted(cands, key=lambda c: (c.image.source, c.image.rel_path)):
        by_sha.setdefault(c.checked.sha256, []).append(c)
    kept: list[_Candidate] = []
    removed = 0
    for group in by_sha.values():
        first = group[0]
        if len({c.image.label for c in group}) > 1:
            for c in group:
                rejected.append((c.image.source, c.image.rel_path, "identical file appears with both labels"))
            removed += len(group)
            continue
        kept.append(first)
        for c in group[1:]:
            rejected.append((c.image.source, c.image.rel_path,
                             f"exact duplicate of {first.image.source}:{first.image.rel_path}"))
            removed += 1
    return kept, removed


@dataclass(frozen=True)
class SourceFolders:
    """The sources a build reads, in one record (threaded as one argument, never as six)."""

    chest_xray: str | Path | None = None
    """Kermany et al. (pediatric normals), as unzipped from Kaggle."""
    covid_xray: str | Path | None = None
    """ieee8023 covid-chestxray-dataset (metadata.csv + images/)."""
    presplit: str | Path | None = None
    """A pre-split folder (train|test/Covid|Normal), kept with its split; excludes the others."""
    metadata: str | Path | None = None
    """An ieee8023 metadata.csv for --covid-xray or --presplit (patient ids)."""
    nih: str | Path | None = None
    """NIH ChestX-ray14 (adult normals)."""
    extra: tuple[str | Path, ...] = ()
    """Generic sources: CSV lists or class folders."""

    def paths(self) -> list[str | Path | None]:
        """Every folder or file given (None for those not), for the check that an output lies outside them."""
        return [self.chest_xray, self.covid_xray, self.presplit, self.metadata, self.nih, *self.extra]

    def synthetic(self) -> bool:
        """True when any image folder given is the embedded synthetic set."""
        return any(is_synthetic(s) for s in (self.chest_xray, self.covid_xray, self.presplit, self.nih)
                   if s is not None)


def collect_sources(
    sources: SourceFolders, config: BuildConfig | None = None,
) -> tuple[list[SourceImage], list[tuple[str, str, str]], dict[str, int]]:
    """Read the given sources; return candidate images, skipped entries (source, item, reason) and counts."""
    config = config or BuildConfig()
    chest_xray, covid_xray, presplit = sources.chest_xray, sources.covid_xray, sources.presplit
    metadata, nih, extra = sources.metadata, sources.nih, [Path(e) for e in sources.extra]
    scans: list[tuple[str, SourceScan]] = []
    if presplit is not None:
        if chest_xray is not None or covid_xray is not None or nih is not None or extra:
            raise DataError("give either --presplit or sources (--chest-xray, --covid-xray, --nih, --extra), not "
                            "both: a pre-split folder keeps its own split. To re-split it with other sources, lay it "
                            "out as sources first (covidxray.data.presplit_layout.presplit_as_sources).", usage=True)
        scans.append(("presplit", read_presplit(presplit, metadata=metadata)))
    else:
        if nih is None and not extra and (chest_xray is None or covid_xray is None):
            raise DataError("a dataset needs both sources: --chest-xray DIR (normals) and --covid-xray DIR (COVID), "
                            "or adult normals with --nih DIR / --extra CSV|DIR.", usage=True)
        if chest_xray is not None:
            scans.append(("kermany", read_kermany(chest_xray)))
        if covid_xray is not None:
            scans.append(("ieee8023", read_ieee8023(covid_xray, findings=config.findings, views=config.views,
                                                    metadata=metadata)))
        elif metadata is not None:
            raise DataError(f"{metadata}: --metadata needs --covid-xray (or --presplit) to apply to.", usage=True)
        if nih is not None:
            scans.append(("nih", read_nih(nih, views=config.nih_views, min_age=config.nih_min_age,
                                          max_age=config.nih_max_age)))
        resolved = [e.resolve() for e in extra]
        for e, r in zip(extra, resolved, strict=True):
            if resolved.count(r) > 1:
                raise DataError(f"{e}: given twice as --extra; give each extra source once.", usage=True)
            scans.append((default_source(e), read_generic(e)))
    images: list[SourceImage] = []
    skipped: list[tuple[str, str, str]] = []
    stats: dict[str, int] = {}
    for name, scan in scans:
        images.extend(scan.images)
        skipped.extend((name, item, reason) for item, reason in scan.skipped)
        stats.update(scan.stats)
    return images, skipped, stats


def build_dataset(
    out_dir: str | Path,
    *,
    chest_xray: str | Path | None = None,
    covid_xray: str | Path | None = None,
    presplit: str | Path | None = None,
    metadata: str | Path | None = None,
    nih: str | Path | None = None,
    extra: Sequence[str | Path] = (),
    design: str = "original",
    config: BuildConfig | None = None,
    progress: bool = True,
) -> dict:
    """Build ``out_dir`` from the given sources (or a pre-split folder) under ``design``; return the summary.

    ``nih`` is an NIH ChestX-ray14 folder (adult 'No Finding' frontal images by default, see BuildConfig);
    ``extra`` are generic sources (CSV or class folders, see :mod:`covidxray.data.sources.generic`); ``design`` is
    one of :data:`covidxray.data.designs.DESIGNS` and decides which of the images make up each class.
    """
    config = config or BuildConfig()
    config.validate()
    out_dir = Path(out_dir)
    get_design(design)
    sources = SourceFolders(chest_xray, covid_xray, presplit, metadata, nih, tuple(extra))
    with claim_output(out_dir, "data", sources=sources.paths()) as out:
        summary = _build(out, sources, design=design, config=config, progress=progress)
    return summary


def _build(out: OutputDir, sources: SourceFolders, *, design: str, config: BuildConfig, progress: bool) -> dict:
    """The build proper, writing into the claimed output ``out``."""
    download = read_download_record(sources.covid_xray) if sources.covid_xray is not None else None
    images, rejected, stats = collect_sources(sources, config)
    if not images:
        raise DataError("no images found in the given sources; check the folders (see their README.md).")
    images, design_report = apply_design(design, images)
    cands, bad = _check_all(images, config, progress)
    rejected.extend(bad)
    cands, n_exact = _drop_exact_duplicates(cands, rejected)
    cands.sort(key=lambda c: (c.image.source, c.image.rel_path))

    pairs = near_duplicate_pairs([c.checked.dhash for c in cands], config.near_duplicate_bits)
    cross = {i for a, b, _ in pairs if cands[a].image.label != cands[b].image.label for i in (a, b)}
    for i in sorted(cross):
        c = cands[i]
        rejected.append((c.image.source, c.image.rel_path, "near duplicate of an image with the other label"))
    if cross:
        cands, pairs = _keep(cands, pairs, [i not in cross for i in range(len(cands))])
    keys, labels, groups = _grouping(cands, pairs)
    if config.caps:
        cands, pairs = _keep(cands, pairs, cap_groups(labels, groups, keys, config.caps, config.seed))
        keys, labels, groups = _grouping(cands, pairs)

    if sources.presplit is not None:
        fixed = [c.image.split if c.image.split in ("test", "val") else None for c in cands]
        has_val = any(f == "val" for f in fixed)
        fractions = {} if has_val else {"val": config.val_fraction}
        splits = assign_splits(labels, groups, keys, fractions=fractions, seed=config.seed, fixed=fixed)
    else:
        test = config.test_fraction
        val = config.val_fraction * (1.0 - test)
        splits = assign_splits(labels, groups, keys, fractions={"test": test, "val": val}, seed=config.seed)

    _check_training_classes(labels, splits, sources.presplit, rejected)
    rows = _manifest_rows(cands, splits, groups, synthetic=sources.synthetic())
    summary = _summary(rows, rejected, stats, n_exact, pairs, cands, config, sources.presplit is not None)
    summary["design"] = design_report
    summary["confounders"] = confounders(rows)
    summary["synthetic"] = sources.synthetic()
    if download is not None:
        summary["sources"] = {"ieee8023": {"download": download}}
    _write_output(out, cands, rows, rejected, summary)
    out.set_data(dataset_provenance(out.path))
    return summary


def _keep(cands: list[_Candidate], pairs: list, keep: list[bool]) -> tuple[list[_Candidate], list]:
    """The kept candidates, and the duplicate pairs between them renumbered to the new positions."""
    remap = {old: new for new, old in enumerate(i for i, k in enumerate(keep) if k)}
    kept = [c for c, k in zip(cands, keep, strict=True) if k]
    return kept, [(remap[a], remap[b], d) for a, b, d in pairs if a in remap and b in remap]


def _grouping(cands: list[_Candidate], pairs: list) -> tuple[list[str], list[str], list[int]]:
    """Stable keys, labels and split groups (same patient or duplicates) of the candidates."""
    keys = [f"{c.image.source}:{c.image.rel_path}" for c in cands]
    labels = [c.image.label for c in cands]
    groups = group_ids([c.image.patient_id for c in cands], [(a, b) for a, b, _ in pairs])
    return keys, labels, groups


def _check_training_classes(labels: list[str], splits: list[str], presplit, rejected: list) -> None:
    """Refuse a dataset whose training split lacks a class: no model can learn from it, so nothing is written."""
    present = {lab for lab, split in zip(labels, splits, strict=True) if split == "train"}
    for label in LABELS:
        if label in present:
            continue
        where = (f"{Path(presplit) / 'train' / label.capitalize()}" if presplit is not None
                 else f"the {label} source")
        raise DataError(f"no {label} image in the training split: {where} is empty or all its files were rejected "
                        f"({len(rejected)} rejected in all). Add images of that class or fix the files; nothing "
                        "was written.")


def _manifest_rows(cands: list[_Candidate], splits: list[str], groups: list[int], *, synthetic: bool) -> list[dict]:
    """One manifest row per image; the images of the embedded synthetic data are ours (MIT), whatever licence
    their generated metadata names."""
    group_name: dict[int, str] = {}
    for g in groups:  # cands are sorted by (source, path), so names do not depend on input order
        group_name.setdefault(g, f"g{len(group_name):05d}")
    rows = []
    for c, split, g in zip(cands, splits, groups, strict=True):
        img, chk = c.image, c.checked
        ext = ".png" if chk.normalized_png is not None else Path(img.path.name).suffix.lower()
        ext = ".jpeg" if ext == ".jpg" else ext
        rows.append({
            "path": f"{split}/{img.label}/{_safe_stem(img.path.name)}_{chk.sha256[:8]}{ext}",
            "label": img.label,
            "split": split,
            "patient_id": img.patient_id,
            "source": img.source,
            "view": img.view,
            "sex": img.sex,
            "age": "" if math.isnan(img.age) else f"{img.age:g}",
            "sha256": chk.sha256 if chk.normalized_png is None else _sha(chk.normalized_png),
            "width": chk.width,
            "height": chk.height,
            "format": chk.format,
            "mode": chk.mode,
            "orig_path": img.rel_path,
            "dup_group": group_name[g],
            "dicom_scaling": chk.dicom_scaling,
            "license": SYNTHETIC_LICENCE if synthetic else img.license,
            "source_url": SYNTHETIC_LINK if synthetic else img.source_url,
        })
    return rows


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _summary(rows, rejected, stats, n_exact, pairs, cands, config: BuildConfig, presplit: bool) -> dict:
    split_of_patient: dict[str, set[str]] = {}
    split_of_group: dict[str, set[str]] = {}
    for r in rows:
        split_of_patient.setdefault(r["patient_id"], set()).add(r["split"])
        split_of_group.setdefault(r["dup_group"], set()).add(r["split"])
    counts = {s: {lab: sum(1 for r in rows if r["split"] == s and r["label"] == lab) for lab in LABELS} for s in SPLITS}
    per = {}
    for key in ("source", "view", "format", "mode"):
        c = Counter((r["split"], r["label"], r[key] or "unknown") for r in rows)
        per[key] = {f"{s}/{lab}/{v}": n for (s, lab, v), n in sorted(c.items())}
    patients = {s: {lab: len({r["patient_id"] for r in rows if r["split"] == s and r["label"] == lab})
                    for lab in LABELS} for s in SPLITS}
    near_pairs = [
        {"a": f"{cands[a].image.source}:{cands[a].image.rel_path}",
         "b": f"{cands[b].image.source}:{cands[b].image.rel_path}", "bits": d}
        for a, b, d in pairs
    ]
    return {
        "config": {**asdict(config), "views": list(config.views), "findings": list(config.findings),
                   "nih_views": list(config.nih_views), "presplit": presplit},
        "images": len(rows),
        "counts": counts,
        "patients": patients,
        "per": per,
        "source_stats": stats,
        "rejected": len(rejected),
        "rejected_reasons": dict(sorted(Counter(_reason_kind(r[2]) for r in rejected).items())),
        "leakage": {
            "patients_in_several_splits": sorted(p for p, s in split_of_patient.items() if len(s) > 1),
            "duplicate_groups_in_several_splits": sorted(g for g, s in split_of_group.items() if len(s) > 1),
            "exact_duplicates_removed": n_exact,
            "near_duplicate_pairs": near_pairs,
        },
    }


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0].split(" of ")[0]


def _write_output(out: OutputDir, cands, rows, rejected, summary) -> None:
    """Write the whole dataset into a staging folder, then swap it in place of the previous build."""
    stage = out.stage()
    for c, row in zip(cands, rows, strict=True):
        dest = stage / row["path"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        if c.checked.normalized_png is not None:
            dest.write_bytes(c.checked.normalized_png)
        else:
            shutil.copyfile(c.image.path, dest)
    order = sorted(range(len(rows)), key=lambda i: rows[i]["path"])
    write_csv([rows[i] for i in order], stage / MANIFEST_NAME, MANIFEST_COLUMNS)
    write_csv([dict(zip(("source", "item", "reason"), r, strict=True)) for r in sorted(rejected)],
              stage / REJECTED_NAME, ["source", "item", "reason"])
    (stage / SUMMARY_NAME).write_text(json_text(summary), encoding="utf-8")
    out.commit_stage()


