"""The dataset manifest: one row per image of a built dataset, the contract between the build and training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

import pandas as pd

from covidxray import LABELS
from covidxray.errors import DataError
from covidxray.outputs import fingerprint, provenance, read_json

MANIFEST_NAME = "manifest.csv"
SUMMARY_NAME = "summary.json"
REJECTED_NAME = "rejected.csv"
SPLITS: tuple[str, str, str] = ("train", "val", "test")

MANIFEST_COLUMNS: list[str] = [
    "path",  # relative to the dataset folder, POSIX separators: "train/covid/x_1a2b3c4d.png"
    "label",  # "normal" | "covid"
    "split",  # "train" | "val" | "test"
    "patient_id",  # "<source>:<id>", unique across sources
    "source",  # "kermany" | "ieee8023" | "presplit" | "synthetic" | ...
    "view",  # "PA", "AP", "AP Supine", "" when unknown
    "sex",  # "M" | "F" | ""
    "age",  # years as float, NaN when unknown
    "sha256",  # of the file's bytes as written in the dataset
    "width",  # of the decoded image, after EXIF orientation
    "height",
    "format",  # original file format: "JPEG", "PNG", ...
    "mode",  # original Pillow mode: "L", "RGB", "RGBA", "I;16", "CMYK", "P"
    "orig_path",  # the source file, relative to its source root
    "dup_group",  # images with the same dup_group are exact or near duplicates (always in one split)
    "dicom_scaling",  # DICOM files: how values became gray levels ("bits_stored", "window", ...; see
    # covidxray.data.images.DICOM_SCALING); "" for other files
    "license",  # as the source's metadata states it per image ("" if not); see covidxray.data.licences
    "source_url",  # where the source says the image was published (metadata url or doi), "" if not stated
]


def check_frame(
    df: pd.DataFrame,
    columns: Sequence[str] = ("filepath", "y"),
    *,
    what: str = "the image table",
    fix: str = "pass a frame from read_manifest() or load_labeled()",
    rows: int | None = None,
    allow_empty: bool = False,
) -> None:
    """Raise DataError unless ``df`` can be used as a table of images: it has ``columns``, holds rows (unless
    ``allow_empty``), exactly ``rows`` of them when given (to align with images or probabilities), and only known
    labels in its ``label`` column. ``what`` names the table in the message, ``fix`` says what to do.
    """
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{what} lacks column(s) {missing}; {fix}.")
    if df.empty and not allow_empty:
        raise DataError(f"{what} is empty; it needs at least one image.")
    if rows is not None and len(df) != rows:
        raise DataError(f"{what} has {len(df)} rows but there are {rows} images; they must be aligned row by row.")
    if "label" in columns:
        bad = sorted(set(map(str, df["label"])) - set(LABELS))
        if bad:
            raise DataError(f"{what} has unknown label(s) {bad}; labels must be one of {list(LABELS)}.")


def read_manifest(dataset_dir: str | Path) -> pd.DataFrame:
    """Read ``dataset_dir/manifest.csv`` and add an absolute ``filepath`` column and an integer ``y`` (1 = covid)."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{path}: no manifest. Build the dataset first: `covidxray data --out {dataset_dir}` "
            f"(or `covidxray data --presplit DIR --out {dataset_dir}`)."
        )
    df = pd.read_csv(
        path,
        dtype={"patient_id": str, "view": str, "sex": str, "dup_group": str, "dicom_scaling": str, "license": str,
               "source_url": str},
        keep_default_na=False,
        na_values={"age": [""]},
    )
    check_frame(df, ("path", "label", "split"), what=str(path), fix="rebuild it with `covidxray data`",
                allow_empty=True)
    df["filepath"] = [str(dataset_dir / p) for p in df["path"]]
    check_inside(df["path"], dataset_dir, path)
    df["y"] = (df["label"] == "covid").astype("int64")
    return df


def check_inside(paths: Sequence[object] | pd.Series, dataset_dir: Path, manifest: Path) -> None:
    """Raise DataError unless every manifest ``path`` names a file inside ``dataset_dir``: relative, without
    ``..``, and not resolving out of the folder through a symbolic link (of the file or of a folder on the way).

    A dataset folder must not make the tool read any image on disk; the error names the manifest file and the
    row (its line in the file). A user's own evaluation CSV is not a manifest and may name any file.
    """
    root = dataset_dir.resolve()
    resolved: dict[Path, bool] = {}

    def inside(target: Path) -> bool:
        try:
            return target.resolve().is_relative_to(root)
        except (OSError, RuntimeError):
            return False

    for index, value in enumerate(paths):
        rel = str(value)
        pure = PurePosixPath(rel.replace("\\", "/"))
        problem = None
        if not rel.strip() or pure == PurePosixPath("."):
            problem = "empty"
        elif pure.is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
            problem = "an absolute path"
        elif ".." in pure.parts:
            problem = "a path with '..'"
        else:
            file = dataset_dir / pure
            parent = file.parent
            if parent not in resolved:
                resolved[parent] = inside(parent)
            if not resolved[parent] or (file.is_symlink() and not inside(file)):
                problem = "a symbolic link that resolves outside the dataset folder"
        if problem:
            raise DataError(f"{manifest}, line {index + 2}: path {rel!r} is {problem}; a dataset's images lie "
                            f"inside its folder ({dataset_dir}). Rebuild the dataset with `covidxray data`, or pass "
                            "your own list of images as a CSV to evaluate/predict instead.")


def split_name(split: str) -> str:
    """The canonical spelling of a split name: ``"TEST "`` and ``"Test"`` are ``"test"`` (a manifest, a CSV's
    ``split`` column, a folder name and the ``--split`` flag all go through here)."""
    return str(split).strip().lower()


def split_frame(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rows of one split (any case, see :func:`split_name`), in manifest order; a clear error when the split is
    unknown or empty."""
    split = split_name(split)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {list(SPLITS)}.")
    part = df[df["split"] == split].reset_index(drop=True)
    if part.empty:
        raise DataError(f"the {split!r} split of the dataset is empty; rebuild with a larger dataset or other sizes.")
    return part


def dataset_summary(dataset: str | Path) -> dict:
    """The dataset's summary.json ({} when there is none, e.g. a dataset built by an older version)."""
    path = Path(dataset) / SUMMARY_NAME
    if not path.is_file():
        return {}
    return read_json(path, "rebuild the dataset with `covidxray data`.", what="the dataset summary")


def dataset_provenance(dataset: str | Path) -> dict:
    """The data a dataset folder holds, for the records of what is made from it (see
    :func:`covidxray.outputs.provenance`): its manifest's fingerprint and whether it is the embedded synthetic set."""
    dataset = Path(dataset)
    manifest = dataset / MANIFEST_NAME
    return provenance(fingerprint=fingerprint(manifest) if manifest.is_file() else None,
                      synthetic=bool(dataset_summary(dataset).get("synthetic")), source=dataset.as_posix())


def input_provenance(data: str | Path) -> dict:
    """The provenance of what a verb reads as labelled images: a dataset folder's (see :func:`dataset_provenance`),
    or a CSV file's fingerprint (a user's own list, never the embedded synthetic set by itself)."""
    data = Path(data)
    if data.is_dir():
        return dataset_provenance(data)
    return provenance(fingerprint=fingerprint(data) if data.is_file() else None, synthetic=False,
                      source=data.as_posix())
