"""A folder already split like the 2020 project's ``Dataset/``: ``{train,test}/{Covid,Normal}/*``.

Imported as is, keeping its train/test split, so the original results can be reproduced on the exact images.
Patient ids come from an ieee8023 ``metadata.csv`` when one is given (matched by file name) and from Kermany
file names; any other image is its own patient.
"""

from __future__ import annotations

import math
from pathlib import Path

from covidxray.data.images import skip_reason
from covidxray.data.licences import metadata_link
from covidxray.data.manifest import split_name
from covidxray.data.sources.base import SourceImage, SourceScan, outside_reason, parse_age, parse_label, parse_sex
from covidxray.data.sources.ieee8023 import metadata_by_filename
from covidxray.data.sources.kermany import kermany_patient_id
from covidxray.errors import DataError

SOURCE = "presplit"
_SPLITS = ("train", "val", "test")


def read_presplit(folder: str | Path, *, metadata: str | Path | None = None) -> SourceScan:
    """List ``{train,val,test}/{Covid,Normal}`` images with their split, label and best-known patient id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder. Pass a pre-split dataset folder laid out as train|test/Covid|Normal.")
    meta = metadata_by_filename(metadata) if metadata is not None else {}
    scan = SourceScan()
    found_split = False
    for split_dir in sorted(p for p in folder.iterdir() if p.is_dir() and split_name(p.name) in _SPLITS):
        found_split = True
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            label = parse_label(class_dir.name)
            if label is None:
                scan.skipped.append(
                    (class_dir.relative_to(folder).as_posix(), "unknown class folder (not Covid/Normal)")
                )
                continue
            for path in sorted(class_dir.rglob("*")):
                rel = path.relative_to(folder)
                if path.is_dir():
                    continue
                reason = skip_reason(path, rel) or outside_reason(path, folder)
                if reason is not None:
                    scan.skipped.append((rel.as_posix(), reason))
                    continue
                scan.images.append(_presplit_image(path, rel.as_posix(), label, split_name(split_dir.name), meta))
    if not found_split:
        raise DataError(
            f"{folder}: no train/ or test/ folder. A pre-split dataset is laid out as train|test/Covid|Normal."
        )
    scan.stats = {
        "presplit_files": len(scan.images),
        "matched_metadata": sum(i.source == "ieee8023" for i in scan.images),
    }
    return scan


def _presplit_image(path: Path, rel: str, label: str, split: str, meta: dict[str, dict[str, str]]) -> SourceImage:
    row = meta.get(path.name)
    if row is not None:
        return SourceImage(
            path=path,
            rel_path=rel,
            label=label,
            patient_id=f"ieee8023:{row['patientid']}",
            source="ieee8023",
            view=row.get("view", ""),
            sex=parse_sex(row.get("sex", "")),
            age=parse_age(row.get("age", ""), strict=False),
            split=split,
            license=row.get("license", ""),
            source_url=metadata_link(row.get("url", ""), row.get("doi", "")),
        )
    kermany = kermany_patient_id(path.name)
    if kermany is not None:
        return SourceImage(
            path=path, rel_path=rel, label=label, patient_id=f"kermany:{kermany}", source="kermany", split=split
        )
    return SourceImage(
        path=path,
        rel_path=rel,
        label=label,
        patient_id=f"{SOURCE}:{path.stem}",
        source=SOURCE,
        age=math.nan,
        split=split,
    )
