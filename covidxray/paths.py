"""Default locations of the project's data folders, relative to the working directory."""

from __future__ import annotations

from pathlib import Path

CHEST_XRAY_DIR = Path("Chest_XRAY")
"""Kermany et al. pediatric chest X-rays, as unzipped from Kaggle."""
COVID_XRAY_DIR = Path("Covid_XRAY")
"""ieee8023/covid-chestxray-dataset: metadata.csv + images/."""
DATASET_DIR = Path("dataset")
"""The built two-class dataset."""
CAM_DIR = Path("Class_Activation_Images")
"""Heatmap overlays."""
RUNS_DIR = Path("runs")
"""Training run folders."""
SYNTHETIC_CAM_DIR = RUNS_DIR / "Class_Activation_Images-synthetic"
"""Heatmaps of the embedded synthetic data (git-ignored, beside the runs): ``Class_Activation_Images/`` holds the
committed heatmaps of the real data."""


def has_files(folder: Path) -> bool:
    """True when ``folder`` holds anything besides a README (i.e. the user put data there)."""
    if not folder.is_dir():
        return False
    return any(p.name.lower() != "readme.md" and not p.name.startswith(".") for p in folder.iterdir())
