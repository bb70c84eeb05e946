"""NIH ChestX-ray14, as downloaded: ``Data_Entry_2017.csv`` + ``images/*.png`` (or ``images_001/images/`` ...).

Adult normals: the default selection is ``Finding Labels == "No Finding"``, ``View Position`` PA or AP and
``Patient Age`` >= 18, so the normal class can be matched in age with the adult COVID-19 images. The label list's
column names contain commas (``OriginalImage[Width,Height]``), so a CSV reader sees 11 columns; only the five
columns used here are required, and a trailing empty column (some copies have one) is ignored. ``Patient ID`` is
a plain integer (``1300``) while file names carry 8 digits (``00001300_000.png``); patient ids become ``nih:1300``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from covidxray.data.images import is_junk
from covidxray.data.sources.base import SourceImage, SourceScan, listed_file_problem, parse_age, parse_sex, read_table
from covidxray.errors import DataError

SOURCE = "nih"
LABELS_CSV_NAMES: tuple[str, ...] = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
"""Names of the label list in the NIH download (2017 release and its 2020 revision)."""
REQUIRED_COLUMNS: tuple[str, ...] = ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "View Position")
NIH_VIEWS: tuple[str, ...] = ("PA", "AP")
"""Both projections NIH lists (all frontal)."""
NO_FINDING = "No Finding"
ADULT_AGE = 18.0


def find_labels_csv(folder: Path) -> Path:
    """The label list of an NIH download: ``Data_Entry_2017.csv`` (or its v2020 name) in ``folder``."""
    for name in LABELS_CSV_NAMES:
        if (folder / name).is_file():
            return folder / name
    others = sorted(p for p in folder.glob("Data_Entry_*.csv") if p.is_file()) if folder.is_dir() else []
    if others:
        return others[0]
    raise DataError(
        f"{folder}: no Data_Entry_2017.csv. Put the NIH ChestX-ray14 label list there beside images/ "
        "(https://nihcc.app.box.com/v/ChestXray-NIHCC), or pass its path as labels_csv."
    )


def read_labels(csv_path: Path) -> pd.DataFrame:
    """Read an NIH label list as text columns, whatever the trailing-comma variant; check the required columns."""
    return read_table(csv_path, REQUIRED_COLUMNS, "Use the Data_Entry_2017.csv that ships with NIH ChestX-ray14 "
                      "(re-download it if it is damaged).")


def nih_patient_id(value: str) -> str:
    """``"1300"`` and ``"00001300"`` -> ``"1300"``: the label list's integer, without the file names' zero padding."""
    value = value.strip()
    return str(int(value)) if value.isdigit() else value


def index_images(folder: Path) -> dict[str, Path]:
    """Image files of an NIH download by file name: ``images/``, ``images_NNN/images/`` or ``images_NNN/``."""
    found: dict[str, Path] = {}
    candidates = [folder / "images", *sorted(folder.glob("images_*/images")), *sorted(folder.glob("images_*"))]
    for sub in candidates:
        if not sub.is_dir():
            continue
        for path in sorted(sub.iterdir()):
            if path.is_file() and not is_junk(path.relative_to(folder)):
                found.setdefault(path.name, path)
    return found


def read_nih(
    folder: str | Path,
    *,
    views: Iterable[str] = NIH_VIEWS,
    min_age: float | None = ADULT_AGE,
    max_age: float | None = None,
    labels_csv: str | Path | None = None,
) -> SourceScan:
    """Select 'No Finding' rows of the NIH label list (view, age range) and pair each with its image as a normal.

    ``min_age`` / ``max_age`` bound ``Patient Age`` in years (None: no bound); a row whose age is unknown or not
    a number is left out whenever a bound is set, since it cannot be shown to be in range.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder. Pass the NIH ChestX-ray14 folder (Data_Entry_2017.csv + images/).")
    csv_path = Path(labels_csv) if labels_csv is not None else find_labels_csv(folder)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: not found; give the NIH label list Data_Entry_2017.csv.")
    df = read_labels(csv_path)
    wanted_views = {v.strip().upper() for v in views}
    files = index_images(folder)
    scan = SourceScan()
    counts = {"nih_rows": len(df), "nih_with_findings": 0, "nih_other_views": 0, "nih_age_out_of_range": 0,
              "nih_age_unknown": 0, "nih_selected": 0, "nih_missing_files": 0}
    bounded = min_age is not None or max_age is not None
    for rec in df.to_dict(orient="records"):
        name = rec["Image Index"]
        if not name or not rec["Patient ID"]:
            continue
        if rec["Finding Labels"] != NO_FINDING:
            counts["nih_with_findings"] += 1
            continue
        view = rec["View Position"].upper()
        if view not in wanted_views:
            counts["nih_other_views"] += 1
            continue
        age = parse_age(rec["Patient Age"], strict=False)
        if bounded and math.isnan(age):
            counts["nih_age_unknown"] += 1
            continue
        if (min_age is not None and age < min_age) or (max_age is not None and age > max_age):
            counts["nih_age_out_of_range"] += 1
            continue
        counts["nih_selected"] += 1
        path = files.get(name)
        problem = listed_file_problem(path, folder, csv_path.name)
        if problem is not None:
            counts["nih_missing_files"] += path is None
            scan.skipped.append((f"{csv_path.name}: {name}", problem))
            continue
        scan.images.append(
            SourceImage(
                path=path,
                rel_path=path.relative_to(folder).as_posix(),
                label="normal",
                patient_id=f"{SOURCE}:{nih_patient_id(rec['Patient ID'])}",
                source=SOURCE,
                view=view,
                sex=parse_sex(rec.get("Patient Gender", "")),
                age=age,
            )
        )
    scan.stats = counts
    return scan
