"""Any other labeled chest X-ray set: a folder of class subfolders, or a CSV of paths and labels.

The one reader of labeled sets: the dataset build (``--extra``) and evaluation (``--data``) both use it, so a
set reads the same way in both.

* Folder: class subfolders (``normal/``, ``covid/``, any spelling in
:data:`~covidxray.data.sources.base.LABEL_ALIASES`),
  directly or one level down (``train/normal``, ``test/covid``; a ``train``/``val``/``test`` parent is recorded
  as the image's split).
* CSV: a header with ``path,label`` and optionally ``patient_id,source,age,sex,view,split`` (any order, any
  case). Relative paths are read from the CSV's folder.

Rows and files that cannot be used (empty path, unknown label, missing file, age that is not a number, unknown
split) are skipped with the line number or file and the reason: the build lists them in rejected.csv, evaluation
in skipped.csv. A file listed several times (same resolved path) is used once, the other listings skipped with
the reason; a file listed under both labels is a DataError. A row without ``patient_id`` is its own patient.
The ``split`` is recorded, never acted on here: the build re-splits by patient, evaluation selects by it.

DICOM files (``.dcm``) fill what the CSV or folder does not give from their header: PatientID (scoped to the
source like any given id), ViewPosition, PatientAge (``045Y``, ``006M``) and PatientSex. What the CSV says wins.

The source name (the manifest's ``source`` column and the patient-id prefix) is the CSV row's ``source``, else
the ``source`` argument, else the CSV's file stem or the folder's name.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from covidxray.data.images import IMAGE_EXTENSIONS, dicom_tags, is_junk, skip_reason
from covidxray.data.manifest import SPLITS, split_name
from covidxray.data.sources.base import (
    SourceImage,
    SourceScan,
    outside_reason,
    parse_age,
    parse_label,
    parse_sex,
    read_table,
)
from covidxray.errors import DataError

CSV_COLUMNS: tuple[str, ...] = ("path", "label", "patient_id", "source", "age", "sex", "view", "split")
"""Columns a CSV source may have; path and label are required, the others optional."""
_FIX_CSV = (f"The first line must be a header with at least 'path,label' (optional: {', '.join(CSV_COLUMNS[2:])}); "
            "save the file as UTF-8 CSV.")


def source_name(text: str) -> str:
    """A source name safe in patient ids and messages: ``[A-Za-z0-9._-]``, lower case."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()).strip("-._").lower()
    return name or "external"


def default_source(path: str | Path) -> str:
    """The source name of a generic source that does not name one: the CSV's file stem or the folder's name."""
    path = Path(path)
    return source_name(path.resolve().name if path.is_dir() else path.stem)


def generic_patient_id(source: str, given: str, rel_path: str) -> str:
    """``<source>:<id>`` from the given id, else from the file's path (each such image is its own patient).

    An id that already starts with ``<source>:`` (a list written from a built dataset's manifest) is kept.
    """
    pid = given or rel_path
    return pid if pid.startswith(f"{source}:") else f"{source}:{pid}"


def _own_patient(image: SourceImage) -> bool:
    """True when nothing named the image's patient (no id in the list or the DICOM header): it is its own."""
    return image.patient_id == generic_patient_id(image.source, "", image.rel_path)


def _header_values(file: Path, values: dict[str, str]) -> dict[str, str]:
    """What the file's DICOM header adds to ``values``: its patient_id, view, age and sex where ``values`` has none
    (empty for other files)."""
    return {key: value for key, value in dicom_tags(file).items() if not values.get(key)}


def read_generic(path: str | Path, *, source: str | None = None, confine: bool = True) -> SourceScan:
    """Read a CSV of ``path,label[,patient_id,source,age,sex,view,split]`` or a folder of class subfolders.

    ``confine`` skips files that resolve outside the CSV's folder or the class-folder root ("path leaves the
    source folder"), as for every source the build copies from; evaluation passes False, since its CSV is the
    user's own list and may point anywhere (absolute paths, ``..``).
    """
    path = Path(path)
    name = source_name(source) if source else default_source(path)
    if path.is_dir():
        return _read_folder(path, name, confine)
    if path.is_file():
        return _read_csv(path, name, confine)
    raise DataError(
        f"{path}: no such file or folder. Give a folder with normal/ and covid/ subfolders, or a CSV with a "
        f"'path,label' header (optional columns {', '.join(CSV_COLUMNS[2:])})."
    )


@dataclass(frozen=True)
class _Listing:
    """One usable row or file, before duplicates are resolved."""

    image: SourceImage
    item: str
    """How rejected.csv / skipped.csv names it: ``labels.csv, line 3`` or ``covid/a.png``."""
    where: str
    """How a message about a duplicate names it: ``line 3`` or ``covid/a.png``."""


def _subfolders(folder: Path, root: Path) -> list[Path]:
    return [d for d in sorted(folder.iterdir()) if d.is_dir() and not is_junk(d.relative_to(root))]


def _class_folders(folder: Path, root: Path) -> list[tuple[Path, str]]:
    found = ((d, parse_label(d.name)) for d in _subfolders(folder, root))
    return [(d, label) for d, label in found if label is not None]


def _read_folder(folder: Path, source: str, confine: bool) -> SourceScan:
    scan = SourceScan()
    parents = [folder] if _class_folders(folder, folder) else _subfolders(folder, folder)
    class_dirs = [cd for parent in parents for cd in _class_folders(parent, folder)]
    if not class_dirs:
        raise DataError(f"{folder}: no normal/ or covid/ subfolder (also looked one level down, e.g. "
                        "train/normal). Put the images in class subfolders, or pass a CSV 'path,label'.")
    for parent in parents:
        for d in _subfolders(parent, folder):
            if parse_label(d.name) is None:
                scan.skipped.append((d.relative_to(folder).as_posix(), "unknown class folder (not normal/covid)"))
    listings: list[_Listing] = []
    for class_dir, label in class_dirs:
        split = split_name(class_dir.parent.name) if class_dir.parent != folder else None
        for file in sorted(class_dir.rglob("*")):
            rel = file.relative_to(folder)
            if file.is_dir():
                continue
            reason = skip_reason(file, rel) or (outside_reason(file, folder) if confine else None)
            if reason is not None:
                scan.skipped.append((rel.as_posix(), reason))
                continue
            header = _header_values(file, {})
            image = SourceImage(path=file, rel_path=rel.as_posix(), label=label, source=source,
                                patient_id=generic_patient_id(source, header.get("patient_id", ""), rel.as_posix()),
                                view=header.get("view", ""), sex=parse_sex(header.get("sex", "")),
                                age=parse_age(header.get("age", ""), strict=False),
                                split=split if split in SPLITS else None)
            listings.append(_Listing(image, rel.as_posix(), rel.as_posix()))
    _use_once(listings, scan, folder)
    scan.stats = {f"{folder.name}/ files": len(scan.images),
                  f"{folder.name}/ without patient_id": sum(_own_patient(i) for i in scan.images)}
    return scan


def _read_csv(csv_path: Path, default: str, confine: bool) -> SourceScan:
    base = csv_path.parent
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: cannot read the CSV as UTF-8 text ({exc}); save it as UTF-8.") from exc
    df = read_table(csv_path, ("path", "label"), _FIX_CSV, text=text, lower=True, keep_blank_lines=True)
    scan = SourceScan()
    listings: list[_Listing] = []
    rows = without_pid = 0
    for index, values in enumerate(df.to_dict(orient="records")):
        if not any(values.values()):
            continue
        rows += 1
        line = index + 2
        item = f"{csv_path.name}, line {line}"
        result = _csv_row(values, base, default, confine)
        if isinstance(result, str):
            scan.skipped.append((item, result))
            continue
        without_pid += _own_patient(result)
        listings.append(_Listing(result, item, f"line {line}"))
    if rows == 0:
        raise DataError(f"{csv_path}: no rows below the header. Add lines 'path,label'.")
    _use_once(listings, scan, csv_path)
    scan.stats = {f"{csv_path.name} rows": rows, f"{csv_path.name} selected": len(scan.images),
                  f"{csv_path.name} without patient_id": without_pid}
    return scan


def _csv_row(values: dict[str, str], base: Path, default: str, confine: bool) -> SourceImage | str:
    """The image one CSV row names, or the reason it cannot be used."""
    rel, raw_label = values.get("path", ""), values.get("label", "")
    if not rel:
        return "empty path"
    label = parse_label(raw_label)
    if label is None:
        return f"unknown label {raw_label!r} (use normal or covid; also Normal, COVID-19, No Finding, 0/1)"
    split = split_name(values.get("split", "")) or None
    if split is not None and split not in SPLITS:
        return f"unknown split {values['split']!r} (use {', '.join(SPLITS)}, or leave it blank)"
    try:
        age = parse_age(values.get("age", ""))
    except ValueError as exc:
        return str(exc)
    file = Path(rel)
    file = file if file.is_absolute() else base / file
    if not file.is_file():
        loop = "; a broken symbolic link or symlink loop" if file.is_symlink() else ""
        return f"image file not found ({rel}; relative paths are read from the CSV's folder{loop})"
    if file.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file extension ({file.suffix or 'none'})"
    reason = outside_reason(file, base) if confine else None
    if reason is not None:
        return reason
    header = _header_values(file, values)
    if "age" in header:
        age = parse_age(header["age"], strict=False)
    values = {**values, **header}
    source = source_name(values["source"]) if values.get("source") else default
    rel_path = _stable_rel(rel, base)
    return SourceImage(path=file, rel_path=rel_path, label=label, source=source, split=split,
                       patient_id=generic_patient_id(source, values.get("patient_id", ""), rel_path),
                       view=values.get("view", ""), sex=parse_sex(values.get("sex", "")), age=age)


def _use_once(listings: list[_Listing], scan: SourceScan, where: Path) -> None:
    """Add each file once to ``scan.images`` (the first listing), skip its other listings with the reason, and
    refuse a file listed under both labels: no rule could say which label is right."""
    groups: dict[Path, list[_Listing]] = {}
    for listing in listings:
        groups.setdefault(listing.image.path.resolve(), []).append(listing)
    for file, group in groups.items():
        if len({g.image.label for g in group}) > 1:
            listed = "; ".join(f"{g.where}: {g.image.label}" for g in group)
            raise DataError(f"{where}: the file {file} is listed with both labels ({listed}). A file has one "
                            "label: fix the wrong line(s) or delete them.")
    for listing in listings:
        group = groups[listing.image.path.resolve()]
        if listing is group[0]:
            scan.images.append(listing.image)
        else:
            scan.skipped.append((listing.item, f"listed more than once (same file as {group[0].where}, which is "
                                               f"used; listed {len(group)} times; counted once)"))


def _stable_rel(rel: str, base: Path) -> str:
    """The path as the manifest records it: as written when relative, else relative to the CSV's folder if below it."""
    path = Path(rel)
    if not path.is_absolute():
        return posixpath.normpath(path.as_posix())
    try:
        return path.relative_to(base.absolute()).as_posix()
    except ValueError:
        return path.as_posix()
