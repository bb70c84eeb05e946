"""Read any labeled chest X-ray set for evaluation: a built dataset, class subfolders, or a CSV of paths.

Every form comes back as one table with columns filepath (absolute), y (1 = covid), label, patient_id and
source, so evaluation code never cares where the images came from. Files that are not used (litter, broken
links, and with :func:`decodable` also unreadable images) are listed with the reason, never dropped silently.
"""

from __future__ import annotations

import csv
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from covidxray import LABELS
from covidxray.errors import DataError, ImageError
from covidxray.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, check_image, skip_reason
from covidxray.manifest import MANIFEST_NAME, read_manifest, split_frame

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
)
"""File name endings counted as images in class subfolders."""

COLUMNS: list[str] = ["filepath", "y", "label", "patient_id", "source"]
"""Columns every table from load_labeled has (a dataset keeps its other manifest columns after them)."""

DEFAULT_SOURCE = "external"

KINDS: tuple[str, str, str] = ("dataset", "folders", "csv")
"""What ``data`` was: a built dataset (images already checked by the build), class folders, or a CSV."""


@dataclass
class LabeledSet:
    """A labeled image table (see :data:`COLUMNS`), what it was read from, and the files left out of it."""

    frame: pd.DataFrame
    kind: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(file, reason) of each file found but not used."""


_LAYOUTS = (
    "Use a built dataset folder (with manifest.csv), a folder with covid/ and normal/ subfolders "
    "(optionally one level deeper, e.g. test/covid), or a CSV with header 'path,label' "
    "(optional columns patient_id, source, split)."
)


def _frame(filepaths: list[str], labels: list[str], patients: list[str], sources: list[str]) -> pd.DataFrame:
    df = pd.DataFrame({"filepath": filepaths, "label": labels, "patient_id": patients, "source": sources})
    df["y"] = (df["label"] == "covid").astype("int64")
    return df[COLUMNS]


def _from_manifest(folder: Path, split: str | None) -> pd.DataFrame:
    df = read_manifest(folder.resolve())
    if split is not None:
        df = split_frame(df, split)
    df = df.reset_index(drop=True)
    if "patient_id" not in df.columns:
        df["patient_id"] = ""
    if "source" not in df.columns:
        df["source"] = ""
    df["patient_id"] = df["patient_id"].fillna("").astype(str)
    df["patient_id"] = df["patient_id"].where(df["patient_id"] != "", df["filepath"])
    df["source"] = df["source"].fillna("").astype(str).replace("", DEFAULT_SOURCE)
    return df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]


def _class_dirs(folder: Path) -> dict[str, list[Path]]:
    """Subfolders of ``folder`` named like a class (case-insensitive), grouped by canonical label."""
    found: dict[str, list[Path]] = {}
    for child in sorted(folder.iterdir()):
        if child.is_dir() and child.name.lower() in LABELS:
            found.setdefault(child.name.lower(), []).append(child)
    return found


def _class_root(folder: Path, split: str | None) -> Path:
    """The folder holding the class subfolders: ``folder`` itself or one child (the split's, if several)."""
    if _class_dirs(folder):
        return folder
    candidates = [
        c for c in sorted(folder.iterdir()) if c.is_dir() and not c.name.startswith(".") and _class_dirs(c)
    ]
    if len(candidates) == 1:
        return candidates[0]
    if split is not None:
        matching = [c for c in candidates if c.name.lower() == split.lower()]
        if len(matching) == 1:
            return matching[0]
    if candidates:
        names = [c.name for c in candidates]
        raise DataError(
            f"{folder}: several subfolders hold class folders ({names}) and none is named after the split "
            f"{split!r}. Point to one of them, e.g. {candidates[0]}."
        )
    raise DataError(f"{folder}: no manifest.csv and no covid/ or normal/ subfolder found. {_LAYOUTS}")


def _from_class_folders(folder: Path, split: str | None) -> LabeledSet:
    root = _class_root(folder.resolve(), split)
    filepaths: list[str] = []
    labels: list[str] = []
    skipped: list[tuple[str, str]] = []
    for label, dirs in _class_dirs(root).items():
        for d in dirs:
            for f in sorted(d.rglob("*")):
                if f.is_dir():
                    continue
                reason = skip_reason(f, f.relative_to(d))
                if reason is None:
                    filepaths.append(str(f))
                    labels.append(label)
                else:
                    skipped.append((str(f), reason))
    if not filepaths:
        raise DataError(
            f"{root}: the class folders hold no images (looked for {sorted(IMAGE_SUFFIXES)}"
            f"{f'; skipped {len(skipped)} other file(s)' if skipped else ''}). Copy the images into covid/ and normal/."
        )
    frame = _frame(filepaths, labels, list(filepaths), [DEFAULT_SOURCE] * len(filepaths))
    return LabeledSet(frame, "folders", skipped)


def _from_csv(path: Path, split: str | None) -> pd.DataFrame:
    base = path.parent.resolve()
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"{path}: cannot open the CSV ({exc}).") from exc
    with handle:
        reader = csv.DictReader(handle)
        header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
        missing = [c for c in ("path", "label") if c not in header]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {missing} in the header line (found {header}). "
                "The first line must be a header with at least 'path,label'."
            )
        reader.fieldnames = header
        filepaths: list[str] = []
        labels: list[str] = []
        patients: list[str] = []
        sources: list[str] = []
        missing_files: list[str] = []
        for row in reader:
            line = reader.line_num
            if all(not (v or "").strip() for k, v in row.items() if k is not None):
                continue
            row_split = (row.get("split") or "").strip().lower()
            if split is not None and "split" in header and row_split != split.lower():
                continue
            rel = (row.get("path") or "").strip()
            label = (row.get("label") or "").strip().lower()
            if not rel:
                raise DataError(f"{path}, line {line}: empty path. Fill in the path or delete the line.")
            if label not in LABELS:
                raise DataError(
                    f"{path}, line {line}: unknown label {row.get('label')!r}. "
                    f"Use one of {list(LABELS)} (any case)."
                )
            file = Path(rel)
            file = file if file.is_absolute() else base / file
            if not file.is_file():
                loop = " (broken symbolic link or symlink loop)" if file.is_symlink() else ""
                missing_files.append(f"line {line}: {file}{loop}")
                continue
            filepaths.append(str(file))
            labels.append(label)
            patient = (row.get("patient_id") or "").strip()
            patients.append(patient or str(file))
            sources.append((row.get("source") or "").strip() or DEFAULT_SOURCE)
    if missing_files:
        more = len(missing_files) - 5
        shown = "; ".join(missing_files[:5]) + (f"; and {more} more" if more > 0 else "")
        raise DataError(
            f"{path}: {len(missing_files)} image file(s) not found ({shown}). Relative paths are read from "
            "the CSV's folder; fix the paths or delete those lines."
        )
    if not filepaths:
        only = f" for split {split!r}" if split is not None and "split" in header else ""
        raise DataError(f"{path}: no image rows{only}. Add lines 'path,label' below the header.")
    return _frame(filepaths, labels, patients, sources)


def read_labeled(data: str | Path, split: str | None = "test") -> LabeledSet:
    """Labeled images for evaluation from a dataset folder, class subfolders or a CSV, with the files skipped.

    ``split`` selects the split of a built dataset (None = all rows), picks ``<folder>/<split>/`` when class
    folders sit one level deeper under several split folders, and filters a CSV that has a ``split`` column.
    ``patient_id`` defaults to the file path (each image its own patient) and ``source`` to "external".
    """
    path = Path(data)
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return LabeledSet(_from_manifest(path, split), "dataset")
        return _from_class_folders(path, split)
    if path.is_file():
        return LabeledSet(_from_csv(path, split), "csv")
    raise DataError(f"{path}: no such file or folder. {_LAYOUTS}")


def load_labeled(data: str | Path, split: str | None = "test") -> pd.DataFrame:
    """The table of :func:`read_labeled` alone (columns :data:`COLUMNS`, plus a dataset's manifest columns)."""
    return read_labeled(data, split).frame


@contextmanager
def decodable(
    labeled: LabeledSet, *, check: bool | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> Iterator[LabeledSet]:
    """The set restricted to images the input pipeline decodes as the dataset build would; a context manager.

    External images (``check`` defaults to True unless the set is a built dataset, whose files the build
    checked) go through :func:`covidxray.images.check_image` once: unusable ones (empty, truncated, not an
    image, too small or large, blank) move to ``skipped`` with the reason, and those TensorFlow would decode
    differently from the build (16-bit, CMYK, EXIF-rotated, other formats) are read from normalised 8-bit PNG
    copies in a temporary folder removed on exit. ``path`` names each row's original file. A DataError when
    no image is left.
    """
    frame = labeled.frame.reset_index(drop=True).copy()
    if "path" not in frame.columns:
        frame["path"] = frame["filepath"]
    if check is None:
        check = labeled.kind != "dataset"
    if not check:
        yield replace(labeled, frame=frame, skipped=list(labeled.skipped))
        return
    skipped = list(labeled.skipped)
    with tempfile.TemporaryDirectory(prefix="covidxray-images-") as tmp:
        keep: list[int] = []
        filepaths = frame["filepath"].astype(str).tolist()
        for i, file in enumerate(filepaths):
            try:
                info = check_image(file, max_pixels=max_pixels, min_side=min_side)
            except ImageError as exc:
                skipped.append((file, exc.reason))
                continue
            keep.append(i)
            if info.normalized_png is not None:
                copy = Path(tmp) / f"{i:06d}.png"
                copy.write_bytes(info.normalized_png)
                filepaths[i] = str(copy)
        frame["filepath"] = filepaths
        frame = frame.iloc[keep].reset_index(drop=True)
        if frame.empty:
            shown = "; ".join(f"{f}: {r}" for f, r in skipped[:3])
            raise DataError(f"none of the {len(labeled.frame)} image(s) can be used ({shown}). Replace the "
                            "files or point --data at other images.")
        yield replace(labeled, frame=frame, skipped=skipped)
