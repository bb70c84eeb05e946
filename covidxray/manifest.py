"""The dataset manifest: one row per image of a built dataset, the contract between the build and training."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covidxray import LABELS
from covidxray.errors import DataError

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
]


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
        dtype={"patient_id": str, "view": str, "sex": str, "dup_group": str},
        keep_default_na=False,
        na_values={"age": [""]},
    )
    missing = [c for c in ("path", "label", "split") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; rebuild it with `covidxray data`.")
    bad = sorted(set(df["label"]) - set(LABELS))
    if bad:
        raise DataError(f"{path}: unknown label(s) {bad}; labels must be one of {list(LABELS)}.")
    df["filepath"] = [str(dataset_dir / p) for p in df["path"]]
    df["y"] = (df["label"] == "covid").astype("int64")
    return df


def split_frame(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rows of one split, in manifest order; a clear error when the split is empty."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {list(SPLITS)}.")
    part = df[df["split"] == split].reset_index(drop=True)
    if part.empty:
        raise DataError(f"the {split!r} split of the dataset is empty; rebuild with a larger dataset or other sizes.")
    return part
