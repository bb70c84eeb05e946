"""Any other labeled chest X-ray set: a folder of class subfolders, or a CSV of paths and labels.

* Folder: ``normal/`` and ``covid/`` (any case; ``covid-19`` too), directly or one level down
  (``train/normal``, ``test/covid``; the build re-splits, so the folder's own split is ignored). Each image is its
  own patient, since a folder says nothing about patients.
* CSV: a header with ``path,label`` and optionally ``patient_id,source,age,sex,view`` (any order, any case).
  Relative paths are read from the CSV's folder. Rows that cannot be used (empty path, unknown label, missing
  file, age that is not a number, a path listed twice) are skipped with the line number and the reason, and the
  build lists them in rejected.csv.

The source name (the manifest's ``source`` column and the patient-id prefix) is the CSV row's ``source``, else
the ``source`` argument, else the CSV's file stem or the folder's name.
"""

from __future__ import annotations

import csv
import posixpath
import re
from pathlib import Path

from covidxray.errors import DataError
from covidxray.images import IMAGE_EXTENSIONS, is_junk, skip_reason
from covidxray.sources.base import SourceImage, SourceScan, parse_age, parse_sex

CSV_COLUMNS: tuple[str, ...] = ("path", "label", "patient_id", "source", "age", "sex", "view")
"""Columns a CSV source may have; path and label are required, the others optional."""
LABEL_NAMES: dict[str, str] = {"normal": "normal", "covid": "covid", "covid-19": "covid", "covid19": "covid"}
"""Class names accepted in folders and CSV labels (compared case-insensitively)."""


def source_name(text: str) -> str:
    """A source name safe in patient ids and messages: ``[A-Za-z0-9._-]``, lower case."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()).strip("-._").lower()
    return name or "external"


def default_source(path: str | Path) -> str:
    """The source name of a generic source that does not name one: the CSV's file stem or the folder's name."""
    path = Path(path)
    return source_name(path.resolve().name if path.is_dir() else path.stem)


def read_generic(path: str | Path, *, source: str | None = None) -> SourceScan:
    """Read a CSV of ``path,label[,patient_id,source,age,sex,view]`` or a folder of class subfolders."""
    path = Path(path)
    name = source_name(source) if source else default_source(path)
    if path.is_dir():
        return _read_folder(path, name)
    if path.is_file():
        return _read_csv(path, name)
    raise DataError(
        f"{path}: no such file or folder. Give a folder with normal/ and covid/ subfolders, or a CSV with a "
        "'path,label' header (optional columns patient_id, source, age, sex, view)."
    )


def _subfolders(folder: Path, root: Path) -> list[Path]:
    return [d for d in sorted(folder.iterdir()) if d.is_dir() and not is_junk(d.relative_to(root))]


def _class_folders(folder: Path, root: Path) -> list[tuple[Path, str]]:
    return [(d, LABEL_NAMES[d.name.lower()]) for d in _subfolders(folder, root) if d.name.lower() in LABEL_NAMES]


def _read_folder(folder: Path, source: str) -> SourceScan:
    scan = SourceScan()
    parents = [folder] if _class_folders(folder, folder) else _subfolders(folder, folder)
    class_dirs = [cd for parent in parents for cd in _class_folders(parent, folder)]
    if not class_dirs:
        raise DataError(f"{folder}: no normal/ or covid/ subfolder (also looked one level down, e.g. "
                        "train/normal). Put the images in class subfolders, or pass a CSV 'path,label'.")
    for parent in parents:
        for d in _subfolders(parent, folder):
            if d.name.lower() not in LABEL_NAMES:
                scan.skipped.append((d.relative_to(folder).as_posix(), "unknown class folder (not normal/covid)"))
    for class_dir, label in class_dirs:
        for file in sorted(class_dir.rglob("*")):
            rel = file.relative_to(folder)
            if file.is_dir():
                continue
            reason = skip_reason(file, rel)
            if reason is not None:
                scan.skipped.append((rel.as_posix(), reason))
                continue
            scan.images.append(SourceImage(path=file, rel_path=rel.as_posix(), label=label,
                                           patient_id=f"{source}:{rel.as_posix()}", source=source))
    scan.stats = {f"{folder.name}/ files": len(scan.images), f"{folder.name}/ without patient_id": len(scan.images)}
    return scan


def _read_csv(csv_path: Path, default_source: str) -> SourceScan:
    base = csv_path.parent
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: cannot read the CSV as UTF-8 text ({exc}); save it as UTF-8.") from exc
    reader = csv.DictReader(text.splitlines())
    header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {missing} in the header line (found {header}). The first "
                        f"line must be a header with at least 'path,label' (optional: {', '.join(CSV_COLUMNS[2:])}).")
    reader.fieldnames = header
    scan = SourceScan()
    seen: dict[Path, int] = {}
    rows = without_pid = 0
    for row in reader:
        line = reader.line_num
        values = {k: (v or "").strip() for k, v in row.items() if k is not None and isinstance(v, str)}
        if not any(values.values()):
            continue
        rows += 1
        item = f"{csv_path.name}, line {line}"
        rel, raw_label = values.get("path", ""), values.get("label", "")
        if not rel:
            scan.skipped.append((item, "empty path"))
            continue
        label = LABEL_NAMES.get(raw_label.lower())
        if label is None:
            scan.skipped.append((item, f"unknown label {raw_label!r} (use normal or covid)"))
            continue
        try:
            age = parse_age(values.get("age", ""))
        except ValueError as exc:
            scan.skipped.append((item, str(exc)))
            continue
        file = Path(rel)
        file = file if file.is_absolute() else base / file
        if not file.is_file():
            scan.skipped.append((item, f"image file not found ({rel}; relative paths are read from the CSV's folder)"))
            continue
        key = file.resolve()
        if key in seen:
            scan.skipped.append((item, f"path listed twice (first on line {seen[key]})"))
            continue
        seen[key] = line
        if file.suffix.lower() not in IMAGE_EXTENSIONS:
            scan.skipped.append((item, f"not an image file extension ({file.suffix or 'none'})"))
            continue
        source = source_name(values["source"]) if values.get("source") else default_source
        rel_path = _stable_rel(rel, base)
        pid = values.get("patient_id", "")
        without_pid += not pid
        scan.images.append(SourceImage(
            path=file, rel_path=rel_path, label=label, patient_id=f"{source}:{pid or rel_path}", source=source,
            view=values.get("view", ""), sex=parse_sex(values.get("sex", "")), age=age,
        ))
    if rows == 0:
        raise DataError(f"{csv_path}: no rows below the header. Add lines 'path,label'.")
    scan.stats = {f"{csv_path.name} rows": rows, f"{csv_path.name} selected": len(scan.images),
                  f"{csv_path.name} without patient_id": without_pid}
    return scan


def _stable_rel(rel: str, base: Path) -> str:
    """The path as the manifest records it: as written when relative, else relative to the CSV's folder if below it."""
    path = Path(rel)
    if not path.is_absolute():
        return posixpath.normpath(path.as_posix())
    try:
        return path.relative_to(base.absolute()).as_posix()
    except ValueError:
        return path.as_posix()
