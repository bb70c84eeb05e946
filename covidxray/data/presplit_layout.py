"""Lay a pre-split folder out again as the two public sources, to rebuild it with a patient-level split.

The 2020 project's ``Dataset/`` holds Kermany normals and ieee8023 COVID images already split by file order.
Putting the normals back into a Kermany ``chest_xray/train/NORMAL`` folder and the COVID images beside the
ieee8023 ``metadata.csv`` they came from lets the normal build split the same images by patient instead.
Files are hard-linked (or copied where links are not possible), never symlinked: the source readers skip files
that resolve outside their folder. The pre-split folder is only read.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from covidxray.data.images import IMAGE_EXTENSIONS, is_junk
from covidxray.data.sources.base import parse_label
from covidxray.errors import DataError


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    try:
        os.link(src.resolve(), dest)
    except OSError:
        shutil.copyfile(src, dest)


def presplit_as_sources(presplit: str | Path, metadata: str | Path, out_root: str | Path) -> tuple[Path, Path]:
    """Write ``out_root/Chest_XRAY`` (normals) and ``out_root/Covid_XRAY`` (COVID + metadata); return both."""
    presplit, metadata, out_root = Path(presplit), Path(metadata), Path(out_root)
    if not metadata.is_file():
        raise DataError(f"{metadata}: not found; give the ieee8023 metadata.csv the COVID images came from.")
    chest = out_root / "Chest_XRAY"
    covid = out_root / "Covid_XRAY"
    normal_dir = chest / "chest_xray" / "train" / "NORMAL"
    count = 0
    for path in sorted(presplit.rglob("*")):
        rel = path.relative_to(presplit)
        if not path.is_file() or is_junk(rel) or path.suffix.lower() not in IMAGE_EXTENSIONS or len(rel.parts) < 3:
            continue
        label = parse_label(rel.parts[-2])
        if label == "normal":
            _link(path, normal_dir / path.name)
        elif label == "covid":
            _link(path, covid / "images" / path.name)
        else:
            continue
        count += 1
    if count == 0:
        raise DataError(f"{presplit}: no images in train|test/Covid|Normal folders.")
    covid.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(metadata, covid / "metadata.csv")
    return chest, covid
