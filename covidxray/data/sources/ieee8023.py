"""ieee8023/covid-chestxray-dataset, as cloned or unzipped: ``metadata.csv`` + ``images/`` (+ ``volumes/``).

Both metadata schemas are read: the early 2020 one (``finding == "COVID-19"``) and the current one with
hierarchical findings (``Pneumonia/Viral/COVID-19``) and an ``RT_PCR_positive`` column. The file is not always
UTF-8, so the reader falls back to cp1252 and latin-1. Default selection: COVID-19, X-ray, frontal views.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from covidxray.data.licences import metadata_link
from covidxray.data.sources.base import SourceImage, SourceScan, listed_file_problem, parse_age, parse_sex, read_table
from covidxray.errors import DataError

SOURCE = "ieee8023"
REQUIRED_COLUMNS: tuple[str, ...] = ("patientid", "finding", "view", "filename")
FRONTAL_VIEWS: tuple[str, ...] = ("PA", "AP", "AP Supine", "AP semi erect", "AP Erect")
"""Frontal projections; ``("PA",)`` reproduces the 2020 project's selection."""
DEFAULT_FINDINGS: tuple[str, ...] = ("COVID-19",)
_ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")


def read_metadata(csv_path: str | Path) -> pd.DataFrame:
    """Read an ieee8023 ``metadata.csv`` of either schema, whatever its encoding; check the required columns."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(
            f"{csv_path}: not found. Put the ieee8023 covid-chestxray-dataset there (metadata.csv + images/), "
            "e.g. with `covidxray download`."
        )
    raw = csv_path.read_bytes()
    text = None
    for encoding in _ENCODINGS:
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    assert text is not None  # latin-1 decodes any bytes
    return read_table(csv_path, REQUIRED_COLUMNS, "Use the metadata.csv that ships with "
                      "ieee8023/covid-chestxray-dataset (re-download it if it is damaged).", text=text)


def finding_matches(finding: str, wanted: Iterable[str]) -> bool:
    """True when any part of a finding (``"COVID-19, ARDS"``, ``"Pneumonia/Viral/COVID-19"``) is wanted."""
    parts = {p.strip().lower() for chunk in finding.split("/") for p in chunk.split(",")}
    return any(w.strip().lower() in parts for w in wanted)


def _locate(root: Path, folder: str, filename: str) -> Path | None:
    """The image file named in a metadata row: in its ``folder`` column first, then images/ and volumes/."""
    for sub in dict.fromkeys([folder or "images", "images", "volumes"]):
        candidate = root / sub / filename
        if candidate.is_file():
            return candidate
    return None


def read_ieee8023(
    folder: str | Path,
    *,
    findings: Iterable[str] = DEFAULT_FINDINGS,
    views: Iterable[str] = FRONTAL_VIEWS,
    modality: str = "X-ray",
    metadata: str | Path | None = None,
) -> SourceScan:
    """Select rows of ``metadata.csv`` (finding, X-ray, view) and pair each with its image file as a COVID image."""
    folder = Path(folder)
    csv_path = Path(metadata) if metadata is not None else folder / "metadata.csv"
    df = read_metadata(csv_path)
    wanted_views = {v.strip().lower() for v in views}
    findings = tuple(findings)
    scan = SourceScan()
    counts = {"metadata_rows": len(df), "selected_rows": 0, "missing_files": 0}
    has_modality = "modality" in df.columns
    for row in df.itertuples(index=False):
        rec = row._asdict()
        filename = rec["filename"]
        if not filename or not rec["patientid"]:
            continue
        if not rec["finding"]:
            scan.skipped.append((f"metadata.csv: {filename}", "blank finding (cannot tell COVID-19 from other rows)"))
            continue
        if not finding_matches(rec["finding"], findings):
            continue
        if has_modality and rec["modality"].lower() != modality.lower():
            continue
        if not rec["view"]:
            scan.skipped.append((f"metadata.csv: {filename}", "blank view (cannot tell a frontal from a lateral film)"))
            continue
        if rec["view"].lower() not in wanted_views:
            continue
        counts["selected_rows"] += 1
        path = _locate(folder, rec.get("folder", ""), filename)
        problem = listed_file_problem(path, folder, "metadata.csv")
        if problem is not None:
            counts["missing_files"] += path is None
            scan.skipped.append((f"metadata.csv: {filename}", problem))
            continue
        scan.images.append(
            SourceImage(
                path=path,
                rel_path=path.relative_to(folder).as_posix() if path.is_relative_to(folder) else filename,
                label="covid",
                patient_id=f"{SOURCE}:{rec['patientid']}",
                source=SOURCE,
                view=rec["view"],
                sex=parse_sex(rec.get("sex", "")),
                age=parse_age(rec.get("age", ""), strict=False),
                license=rec.get("license", ""),
                source_url=metadata_link(rec.get("url", ""), rec.get("doi", "")),
            )
        )
    scan.stats = counts
    return scan


def metadata_by_filename(csv_path: str | Path) -> dict[str, dict[str, str]]:
    """Map each file name of a metadata.csv to its row (used to give pre-split COVID images patient ids)."""
    df = read_metadata(csv_path)
    return {row["filename"]: row for row in df.to_dict(orient="records") if row["filename"]}
