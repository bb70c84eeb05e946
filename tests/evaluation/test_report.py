"""Report files (tables, figures, JSON) and load_labeled on each accepted input layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from covidxray.data.labeled_sets import COLUMNS, load_labeled
from covidxray.data.manifest import MANIFEST_COLUMNS, MANIFEST_NAME
from covidxray.errors import DataError
from covidxray.evaluation.figures import (
    plot_confusion,
    plot_distributions,
    plot_history,
    plot_reliability,
    plot_roc_pr,
    plot_sample_grid,
    results_table,
)
from covidxray.metrics import seed_summary, summarize
from covidxray.outputs import write_json, write_text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(path: Path, value: int, size: tuple[int, int] = (48, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    arr = np.clip(value + rng.normal(0, 20, (size[1], size[0])), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _dataset(root: Path) -> Path:
    """A tiny built dataset: manifest.csv plus its images, 2 per class and split."""
    rows = []
    for split in ("train", "val", "test"):
        for label, value in (("normal", 60), ("covid", 170)):
            for i in range(2):
                rel = f"{split}/{label}/{label}_{split}_{i}.png"
                _png(root / rel, value + i, size=(48 + 8 * i, 40))
                rows.append({
                    "path": rel, "label": label, "split": split,
                    "patient_id": f"{'ieee8023' if label == 'covid' else 'kermany'}:{split}{i // 2}",
                    "source": "ieee8023" if label == "covid" else "kermany",
                    "view": "PA" if i == 0 else "", "sex": "F" if i else "M",
                    "age": 40.0 + i if label == "covid" else "",
                    "sha256": "0" * 64, "width": 48 + 8 * i, "height": 40, "format": "PNG", "mode": "L",
                    "orig_path": rel, "dup_group": rel, "license": "CC BY 4.0" if label == "covid" else "",
                })
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(root / MANIFEST_NAME, index=False)
    return root


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


# --- results table and files -------------------------------------------------------------------------------


def test_results_table_columns_and_cells() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p = np.clip(0.4 * y + 0.6 * rng.random(60), 0, 1)
    cnn = summarize(y, p, 0.5, groups=np.arange(60) // 2, n_boot=100)
    runs = [summarize(y, np.clip(p + d, 0, 1), 0.5, n_boot=0) for d in (0.0, 0.02, -0.02)]
    rows = [
        {**cnn, "model": "scratch CNN", "weights": "none", "seeds": seed_summary(runs), "n_seeds": 3},
        {**summarize(y, p, 0.5, n_boot=100), "model": "thumbnail baseline", "weights": "-", "notes": "a | b"},
    ]
    table = results_table(rows)
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model", "weights", "accuracy", "precision", "recall", "specificity", "F1", "ROC-AUC",
                      "PR-AUC", "n", "seeds (mean ± std)", "notes"]
    first = [c.strip() for c in lines[2].strip("|").split("|")]
    assert first[0] == "scratch CNN"
    assert first[2].endswith("]") and " % [" in first[2]
    assert first[7].startswith("0.") and "%" not in first[7]
    assert first[9].startswith("60 (")
    assert "(3 seeds)" in first[10]
    assert "a \\| b" in lines[3]
    assert "resamples of patients" in table and "resamples of images" in table

    plain = results_table([{**summarize(y, p, n_boot=0), "model": "m"}], footnote=False)
    assert "seeds" not in plain and "notes" not in plain and len(plain.splitlines()) == 3


def test_write_json_and_text(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "metrics.json"
    write_json({"b": np.float32(0.5), "a": [np.int64(3), float("nan")], "c": np.arange(2), "t": (1, np.inf),
                "p": Path("x/y")}, out)
    text = out.read_text()
    assert json.loads(text) == {"a": [3, None], "b": 0.5, "c": [0, 1], "p": "x/y", "t": [1, None]}
    assert text.index('"a"') < text.index('"b"') and text.endswith("\n") and "NaN" not in text
    write_text("hello\n", tmp_path / "r.md")
    assert (tmp_path / "r.md").read_text() == "hello\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["metrics.json", "r.md", "sub"]
    with pytest.raises(TypeError):
        write_json({"x": object()}, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists() and not list(tmp_path.glob(".*tmp"))


# --- figures -----------------------------------------------------------------------------------------------


def test_metric_plots_write_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 80)
    models = {"cnn": np.clip(0.5 * y + 0.5 * rng.random(80), 0, 1), "baseline": rng.random(80)}
    figs = {
        "cm.png": plot_confusion([[30, 5], [4, 41]], path=tmp_path / "cm.png"),
        "roc.png": plot_roc_pr(y, models, path=tmp_path / "roc.png"),
        "rel.png": plot_reliability(y, models, path=tmp_path / "rel.png"),
        "one.png": plot_roc_pr(np.ones(5), {"m": rng.random(5)}, path=tmp_path / "one.png"),
    }
    for name, fig in figs.items():
        assert isinstance(fig, Figure)
        assert _is_png(tmp_path / name), name
    assert len(figs["roc.png"].axes) == 2
    with pytest.raises(ValueError):
        plot_confusion([[1, 2, 3]])


def test_plot_history_from_csv(tmp_path: Path) -> None:
    csv = tmp_path / "history.csv"
    pd.DataFrame({"epoch": range(4), "loss": [1.0, 0.7, 0.5, 0.4], "accuracy": [0.5, 0.7, 0.8, 0.85],
                  "val_loss": [1.1, 0.8, 0.7, 0.7], "val_accuracy": [0.5, 0.6, 0.7, 0.7],
                  "auc": [0.5, 0.7, 0.8, 0.9], "val_auc": [0.5, 0.6, 0.7, 0.8],
                  "learning_rate": [1e-3] * 4}).to_csv(csv, index=False)
    fig = plot_history(csv, path=tmp_path / "history.png")
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy", "auc"]
    assert _is_png(tmp_path / "history.png")
    with pytest.raises(DataError, match="history"):
        plot_history(tmp_path / "nope.csv")


def test_dataset_plots(tmp_path: Path) -> None:
    df = load_labeled(_dataset(tmp_path / "ds"), split=None)
    grid = plot_sample_grid(df, n_per_class=4, seed=0, path=tmp_path / "grid.png")
    titles = [ax.get_title() for ax in grid.axes if ax.get_title()]
    assert any(t == "ieee8023 · PA" for t in titles) and any(t == "kermany" for t in titles)
    assert _is_png(tmp_path / "grid.png")
    plot_distributions(df, path=tmp_path / "dist.png")
    assert _is_png(tmp_path / "dist.png")
    minimal = df[["filepath", "y"]]
    plot_distributions(minimal, path=tmp_path / "dist_min.png")
    plot_sample_grid(minimal, n_per_class=8, path=tmp_path / "grid_min.png")
    assert _is_png(tmp_path / "dist_min.png") and _is_png(tmp_path / "grid_min.png")


# --- load_labeled ------------------------------------------------------------------------------------------


def test_load_labeled_from_dataset(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    test = load_labeled(root)
    assert list(test.columns[: len(COLUMNS)]) == COLUMNS
    assert len(test) == 4 and set(test["label"]) == {"normal", "covid"}
    assert all(Path(f).is_absolute() and Path(f).is_file() for f in test["filepath"])
    assert (test["y"] == (test["label"] == "covid")).all()
    assert "view" in test.columns
    assert len(load_labeled(root, split=None)) == 12
    assert len(load_labeled(root, split="val")) == 4


def test_load_labeled_from_class_folders(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    _png(flat / "Covid" / "a.png", 180)
    _png(flat / "Covid" / "sub" / "b.jpg", 180)
    _png(flat / "NORMAL" / "c.png", 60)
    (flat / "NORMAL" / "notes.txt").write_text("not an image")
    (flat / "NORMAL" / ".hidden.png").write_bytes(b"")
    df = load_labeled(flat)
    assert list(df.columns) == COLUMNS
    assert sorted(df["label"]) == ["covid", "covid", "normal"]
    assert sorted(df["patient_id"]) == ["flat:Covid/a.png", "flat:Covid/sub/b.jpg", "flat:NORMAL/c.png"]
    assert (df["source"] == "flat").all()

    nested = tmp_path / "nested"
    for split in ("train", "test"):
        _png(nested / split / "Covid" / f"{split}.png", 180)
        _png(nested / split / "Normal" / f"{split}.png", 60)
    df = load_labeled(nested, split="test")
    assert len(df) == 2 and all("/test/" in Path(f).as_posix() for f in df["filepath"])
    assert len(load_labeled(nested, split=None)) == 4
    with pytest.raises(DataError, match=r"no image of split 'val' \(the set names \['test', 'train'\]\)"):
        load_labeled(nested, split="val")

    one = tmp_path / "one"
    _png(one / "external_set" / "covid" / "x.png", 180)
    assert len(load_labeled(one)) == 1

    with pytest.raises(DataError, match="no normal/ or covid/ subfolder"):
        load_labeled(tmp_path / "one" / "external_set" / "covid")
    with pytest.raises(DataError, match="no such file"):
        load_labeled(tmp_path / "absent")


def test_load_labeled_from_csv(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "a.png", 180)
    _png(tmp_path / "imgs" / "b.png", 60)
    other = _png(tmp_path / "elsewhere" / "c.png", 60)
    csv = tmp_path / "list.csv"
    csv.write_text(f"path,label,patient_id\nimgs/a.png,COVID,p1\nimgs/b.png,Normal,\n\n{other},normal,p3\n")
    df = load_labeled(csv)
    assert list(df.columns) == COLUMNS
    assert list(df["y"]) == [1, 0, 0]
    assert df["patient_id"].tolist() == ["list:p1", "list:imgs/b.png", "list:p3"]
    assert (df["source"] == "list").all()
    assert Path(df["filepath"][0]) == (tmp_path / "imgs" / "a.png").resolve()

    split_csv = tmp_path / "split.csv"
    split_csv.write_text("path,label,source,split\nimgs/a.png,covid,siteA,test\nimgs/b.png,normal,siteA,train\n")
    df = load_labeled(split_csv, split="test")
    assert len(df) == 1 and df["source"][0] == "sitea"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("path,label\nimgs/a.png,covid\nimgs/a.png,normal\n",
         r"bad\.csv: the file .*a\.png is listed with both labels \(line 2: covid; line 3: normal\)"),
        ("file,class\nimgs/a.png,covid\n", r"bad\.csv: missing required column\(s\) \['path', 'label'\]"),
        ("path,label\nimgs/zzz.png,normal\n",
         r"bad\.csv: no usable image \(1 skipped; bad\.csv, line 2: image file not found \(imgs/zzz\.png"),
        ("path,label\n", r"bad\.csv: no rows below the header"),
        ("path,label\n,covid\n", r"bad\.csv: no usable image \(1 skipped; bad\.csv, line 2: empty path"),
    ],
)
def test_load_labeled_csv_errors(tmp_path: Path, text: str, match: str) -> None:
    _png(tmp_path / "imgs" / "a.png", 180)
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    with pytest.raises(DataError, match=match):
        load_labeled(csv)


def test_manifest_with_blank_patient_ids_falls_back_to_paths(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds")
    manifest = pd.read_csv(root / MANIFEST_NAME)
    manifest["patient_id"] = ""
    manifest["source"] = ""
    manifest.to_csv(root / MANIFEST_NAME, index=False)
    df = load_labeled(root)
    assert (df["patient_id"] == df["filepath"]).all() and (df["source"] == "external").all()
    assert not any(isinstance(v, float) and math.isnan(v) for v in df["patient_id"])
