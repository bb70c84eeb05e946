"""Read any labeled chest X-ray set for evaluation: a built dataset, class subfolders, or a CSV of paths.

Every form comes back as one table with columns filepath (absolute), y (1 = covid), label, patient_id and
source, so evaluation code never cares where the images came from. Files that are not used (litter, broken
links, and with :func:`decodable` also unreadable images) are listed with the reason, never dropped silently.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from covidxray.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, IMAGE_EXTENSIONS, check_image
from covidxray.data.manifest import MANIFEST_NAME, read_manifest, split_frame, split_name
from covidxray.data.sources.base import SourceImage
from covidxray.data.sources.generic import read_generic
from covidxray.errors import DataError, ImageError

COLUMNS: list[str] = ["filepath", "y", "label", "patient_id", "source"]
"""Columns every table from load_labeled has (a dataset keeps its other manifest columns after them)."""

DEFAULT_SOURCE = "external"
"""The source of a built dataset's rows that name none."""

KINDS: tuple[str, str, str] = ("dataset", "folders", "csv")
"""What ``data`` was: a built dataset (images already checked by the build), class folders, or a CSV."""


@dataclass
class LabeledSet:
    """A labeled image table (see :data:`COLUMNS`), what it was read from, and the files left out of it."""

    frame: pd.DataFrame
    kind: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(file, reason) of each file found but not used."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Larger images are skipped by :func:`decodable` (a verb's ``--max-pixels``)."""


_LAYOUTS = (
    "Use a built dataset folder (with manifest.csv), a folder with covid/ and normal/ subfolders "
    "(optionally one level deeper, e.g. test/covid), or a CSV with header 'path,label' "
    "(optional columns patient_id, source, age, sex, view, split)."
)


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


def select_split(images: list[SourceImage], split: str | None, data: Path) -> list[SourceImage]:
    """The images of ``split`` when the set names splits (a ``split`` column, ``train/`` and ``test/`` folders);
    all of them when ``split`` is None or the set names none. A DataError when the set has no image of it."""
    named = sorted({i.split for i in images if i.split})
    if split is None or not named:
        return images
    chosen = [i for i in images if split_name(i.split or "") == split_name(split)]
    if not chosen:
        raise DataError(f"{data}: no image of split {split!r} (the set names {named}). Pass one of those as the "
                        "split (--split), or no split for every image.", usage=True)
    return chosen


def _from_generic(path: Path, split: str | None) -> LabeledSet:
    """Class folders or a CSV, read by the build's own reader (:func:`covidxray.data.sources.generic.read_generic`);
    unlike a build source, the list may point outside its folder (the user's own choice)."""
    scan = read_generic(path, confine=False)
    images = select_split(scan.images, split, path)
    if not images:
        shown = ("; ".join(f"{item}: {reason}" for item, reason in scan.skipped[:3]) if scan.skipped
                 else f"looked for {', '.join(sorted(IMAGE_EXTENSIONS))} files")
        raise DataError(f"{path}: no usable image ({len(scan.skipped)} skipped; {shown}). Fix or add the rows or "
                        f"files. {_LAYOUTS}")
    frame = pd.DataFrame({
        "filepath": [str(i.path.absolute()) for i in images],
        "label": [i.label for i in images],
        "patient_id": [i.patient_id for i in images],
        "source": [i.source for i in images],
    })
    frame["y"] = (frame["label"] == "covid").astype("int64")
    return LabeledSet(frame[COLUMNS], "folders" if path.is_dir() else "csv", list(scan.skipped))


def read_labeled(data: str | Path, split: str | None = "test", *,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> LabeledSet:
    """Labeled images for evaluation from a dataset folder, class subfolders or a CSV, with the files skipped.

    ``split`` selects the split of a built dataset, or of class folders / a CSV that name splits (see
    :func:`select_split`); None = all rows. Folders and CSVs are read exactly as the dataset build reads an
    ``--extra`` source (same labels, patient ids, sources and skips), except that a CSV may list files
    outside its folder. ``max_pixels`` is the size limit :func:`decodable` applies to the set's images.
    """
    path = Path(data)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return LabeledSet(_from_manifest(path, split), "dataset", max_pixels=max_pixels)
    if path.exists():
        return replace(_from_generic(path, split), max_pixels=max_pixels)
    raise DataError(f"{path}: no such file or folder. {_LAYOUTS}")


def load_labeled(data: str | Path, split: str | None = "test") -> pd.DataFrame:
    """The table of :func:`read_labeled` alone (columns :data:`COLUMNS`, plus a dataset's manifest columns)."""
    return read_labeled(data, split).frame


@contextmanager
def decodable(
    labeled: LabeledSet, *, check: bool | None = None, max_pixels: int | None = None,
    min_side: int = DEFAULT_MIN_SIDE, fix: str = "Replace the files or point --data at other images.",
) -> Iterator[LabeledSet]:
    """The set restricted to images the input pipeline decodes as the dataset build would; a context manager.

    External images (``check`` defaults to True unless the set is a built dataset, whose files the build
    checked) go through :func:`covidxray.data.images.check_image` once (``max_pixels``: the set's own limit when
    None): unusable ones (empty, truncated, not an
    image, too small or large, blank) move to ``skipped`` with the reason, and those TensorFlow would decode
    differently from the build (16-bit, CMYK, EXIF-rotated, DICOM, other formats) are read from normalised 8-bit
    PNG copies in a temporary folder removed on exit. ``path`` names each row's original file. A DataError when
    no image is left, ending in ``fix``.
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
                info = check_image(file, max_pixels=max_pixels or labeled.max_pixels, min_side=min_side)
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
            raise DataError(f"none of the {len(labeled.frame)} image(s) can be used ({shown}). {fix}")
        yield replace(labeled, frame=frame, skipped=skipped)
