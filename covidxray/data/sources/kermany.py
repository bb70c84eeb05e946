"""Kermany et al. "Chest X-Ray Images (Pneumonia)" (Kaggle), as unzipped: ``chest_xray/{train,val,test}/{NORMAL,...}``.

Only the NORMAL images are used (the project is two-class Normal vs COVID). The Kaggle split is ignored: the
build re-splits by patient. The Kaggle zip nests a second copy at ``chest_xray/chest_xray/`` and carries
``__MACOSX/`` litter; both are tolerated (the outermost copy is read, litter is ignored).
"""

from __future__ import annotations

import re
from pathlib import Path

from covidxray.data.images import skip_reason
from covidxray.data.sources.base import SourceImage, SourceScan, outside_reason
from covidxray.errors import DataError

SOURCE = "kermany"
_SPLITS = ("train", "val", "test")
_PATIENT_PATTERNS = (
    re.compile(r"^(?P<pid>(?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE),
    re.compile(r"^(?P<pid>person\d+)_", re.IGNORECASE),
)


def kermany_patient_id(filename: str) -> str | None:
    """Patient id from a Kermany file name: ``IM-0115-0001.jpeg`` -> ``IM-0115``, ``person1_virus_6`` -> ``person1``."""
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(Path(filename).name)
        if match:
            return match.group("pid")
    return None


def _subdir(folder: Path, name: str) -> Path | None:
    """The child of ``folder`` called ``name``, compared case-insensitively."""
    if not folder.is_dir():
        return None
    for child in sorted(folder.iterdir()):
        if child.is_dir() and child.name.lower() == name.lower():
            return child
    return None


def find_kermany_root(folder: Path) -> Path:
    """The folder holding ``{train,val,test}/NORMAL``: ``folder``, ``folder/chest_xray`` or a nested copy below it."""
    candidates = [folder]
    inner = _subdir(folder, "chest_xray")
    if inner is not None:
        candidates.append(inner)
        nested = _subdir(inner, "chest_xray")
        if nested is not None:
            candidates.append(nested)
    for candidate in candidates:
        if any(_subdir(split, "NORMAL") for s in _SPLITS if (split := _subdir(candidate, s)) is not None):
            return candidate
    raise DataError(
        f"{folder}: no Kermany chest X-rays found (expected chest_xray/train/NORMAL/*.jpeg). "
        "Download 'Chest X-Ray Images (Pneumonia)' from Kaggle and unzip it there, or run `covidxray download`."
    )


def read_kermany(folder: str | Path) -> SourceScan:
    """List the NORMAL images of a Kermany download, with a patient id derived from each file name."""
    folder = Path(folder)
    root = find_kermany_root(folder)
    scan = SourceScan()
    for split in _SPLITS:
        split_dir = _subdir(root, split)
        normal_dir = _subdir(split_dir, "NORMAL") if split_dir is not None else None
        if normal_dir is None:
            continue
        for path in sorted(normal_dir.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if path.is_dir():
                continue
            reason = skip_reason(path, path.relative_to(folder)) or outside_reason(path, folder)
            if reason is not None:
                scan.skipped.append((rel, reason))
                continue
            pid = kermany_patient_id(path.name) or path.stem
            scan.images.append(
                SourceImage(path=path, rel_path=rel, label="normal", patient_id=f"{SOURCE}:{pid}", source=SOURCE)
            )
    scan.stats = {"kermany_normal_files": len(scan.images)}
    return scan
