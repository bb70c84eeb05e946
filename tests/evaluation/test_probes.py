"""Shortcut probes on small datasets built here: one with planted shortcuts, one whose labels are pure chance."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tree_digest
from PIL import Image

import covidxray.evaluation.shortcut_probes as probes_module
from covidxray import metrics
from covidxray.data.manifest import MANIFEST_COLUMNS, read_manifest
from covidxray.errors import DataError
from covidxray.evaluation.shortcut_probes import (
    PROBES_JSON,
    PROBES_MD,
    chance_level,
    mask_center,
    masked_dataset,
    run_probes,
    stats_probe,
)
from covidxray.outputs import RECORD_NAME

SPLIT_SIZES = {"train": 100, "val": 20, "test": 30}
"""Images per class and split."""


def make_probe_dataset(root: Path, *, planted: bool, seed: int = 0) -> Path:
    """A built-dataset folder of noise images; with ``planted`` every covid image (and only those) carries a
    bright square in its top-left corner and is a larger PNG while normals are JPEGs; without it the label
    is independent of the pixels, the size and the format."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in SPLIT_SIZES.items():
        for label in ("normal", "covid"):
            for i in range(n):
                covid = label == "covid"
                w, h = (72, 64) if planted and covid else (64, 64)
                if not planted and rng.random() < 0.5:
                    w = 72
                gray = np.clip(rng.uniform(70, 170) + rng.normal(0, 12, (h, w)), 0, 255).astype(np.uint8)
                if planted and covid:
                    gray[:10, :10] = 255
                fmt = ("PNG" if covid else "JPEG") if planted else ("PNG" if rng.random() < 0.5 else "JPEG")
                rel = f"{split}/{label}/img{i:03d}.{'png' if fmt == 'PNG' else 'jpeg'}"
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(gray).save(path, format=fmt)
                rows.append({"path": rel, "label": label, "split": split,
                             "patient_id": f"synthetic:{split}-{label}-{i}", "source": "synthetic",
                             "view": "PA", "sex": "", "age": "",
                             "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "width": w, "height": h,
                             "format": fmt, "mode": "L", "orig_path": rel, "dup_group": f"g{len(rows):05d}"})
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(root / "manifest.csv", index=False, lineterminator="\n")
    return root


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return make_probe_dataset(tmp_path_factory.mktemp("planted") / "dataset", planted=True)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return make_probe_dataset(tmp_path_factory.mktemp("clean") / "dataset", planted=False)


def test_mask_center_keeps_only_a_frame():
    img = np.full((20, 40), 200, np.uint8)
    out = mask_center(img, 0.25)
    assert out[5:15, 10:30].max() == 0 and out[:5].min() == 200 and out[:, :10].min() == 200
    assert out[15:].min() == 200 and out[:, 30:].min() == 200 and img.min() == 200, "input unchanged"
    with pytest.raises(ValueError):
        mask_center(img, 0.5)


def test_chance_level():
    assert chance_level([0, 0, 0, 1]) == 0.75 and chance_level([1, 0]) == 0.5


def test_masked_dataset_keeps_the_manifest(planted, tmp_path):
    before = tree_digest(planted)
    out = masked_dataset(planted, tmp_path / "masked", border=0.2)
    assert tree_digest(planted) == before, "the dataset is only read"
    src = pd.read_csv(planted / "manifest.csv", dtype=str, keep_default_na=False)
    new = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(new.columns) == list(src.columns) and len(new) == len(src)
    assert (new.drop(columns=["path", "sha256"]) == src.drop(columns=["path", "sha256"])).all().all()
    df = read_manifest(out)
    for file in df["filepath"]:
        gray = np.asarray(Image.open(file))
        h, w = gray.shape
        assert (h, w) in ((64, 64), (64, 72))
        assert gray[13:h - 13, 15:w - 15].max() == 0 and gray[:12].max() > 0
    covid = np.asarray(Image.open(df.query("label == 'covid'")["filepath"].iloc[0]))
    assert covid[:8, :8].min() == 255, "the corner marker survives the mask"
    assert all(hashlib.sha256(Path(f).read_bytes()).hexdigest() == s
               for f, s in zip(df["filepath"], df["sha256"], strict=True))


def test_stats_probe_reads_planted_size_and_format(planted):
    result = stats_probe(planted, n_boot=200)
    assert result["shortcut"] and result["accuracy"] >= 0.95 and result["chance"] == 0.5
    assert result["accuracy_ci"][0] > 0.5 and result["roc_auc"] >= 0.95
    assert "WARNING" in result["warning"] and "%" in result["warning"]
    assert set(result["weights"]) >= {"width", "aspect_ratio", "format_PNG", "format_JPEG"}
    chosen = result["threshold_info"]
    assert chosen["split"] == "val" and chosen["n"] == 2 * SPLIT_SIZES["val"], "threshold chosen on val, not test"
    assert result["threshold"] == chosen["threshold"] == result["summary"]["threshold"]
    assert probes_module.choose_threshold is metrics.choose_threshold


def test_stats_probe_is_at_chance_without_a_shortcut(clean):
    result = stats_probe(clean, n_boot=200)
    assert not result["shortcut"] and result["warning"] is None
    assert abs(result["accuracy"] - result["chance"]) <= 0.2
    assert result["roc_auc_ci"][0] <= 0.5 <= result["roc_auc_ci"][1]


def test_run_probes_warns_on_a_planted_marker(planted, tmp_path):
    before = tree_digest(planted)
    out = tmp_path / "probes"
    result = run_probes(planted, out, image_size=32, epochs=6, seed=0, batch_size=16, n_boot=200, progress=False)
    assert tree_digest(planted) == before
    source = result["source"]
    assert source["shortcut"] and source["accuracy"] >= 0.8 and source["accuracy_ci"][0] > source["chance"]
    assert len(result["warnings"]) == 2 and all("WARNING" in w for w in result["warnings"])
    assert sorted(p.name for p in out.iterdir()) == [RECORD_NAME, PROBES_JSON, PROBES_MD]
    saved = json.loads((out / PROBES_JSON).read_text())
    assert saved["source"]["accuracy"] == pytest.approx(source["accuracy"])
    assert "labels readable without the lungs" in (out / PROBES_MD).read_text()
    assert not list(tmp_path.glob(".*tmp*")), "no staging folder left behind"


@pytest.mark.slow  # full suite only: keeps the quick gate under 3 minutes
def test_run_probes_at_chance_on_labels_without_a_shortcut(clean, tmp_path):
    result = run_probes(clean, tmp_path / "probes", image_size=32, epochs=6, seed=0, batch_size=16, n_boot=200,
                        progress=False)
    assert result["warnings"] == []
    for key in ("source", "statistics"):
        r = result[key]
        assert not r["shortcut"] and abs(r["accuracy"] - r["chance"]) <= 0.2, (key, r["accuracy"])
    assert "Neither probe" in result["markdown"]


def test_probes_refuse_a_folder_without_manifest_and_a_one_class_train_split(tmp_path, planted):
    with pytest.raises(DataError, match="no manifest"):
        run_probes(tmp_path / "nothing", tmp_path / "out", progress=False)
    one = tmp_path / "one"
    one.mkdir()
    df = pd.read_csv(planted / "manifest.csv", dtype=str, keep_default_na=False)
    df[~((df["split"] == "train") & (df["label"] == "covid"))].to_csv(one / "manifest.csv", index=False)
    with pytest.raises(DataError, match="one class"):
        stats_probe(one)
    assert not (tmp_path / "out").exists()
