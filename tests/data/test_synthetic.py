"""The synthetic sources: real layouts and schemas, determinism, mixed formats, and learnable classes."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from covidxray.data.synthetic import (
    EARLY_COLUMNS,
    LATEST_COLUMNS,
    MARKER_NAME,
    SyntheticSources,
    chest_image,
    is_synthetic,
    make_synthetic_presplit,
    make_synthetic_sources,
)
from covidxray.errors import DataError

NORMAL_NAME = re.compile(r"^(NORMAL2-)?IM-\d{4}-\d{4}\.jpeg$")
PNEUMONIA_NAME = re.compile(r"^person\d+_(bacteria|virus)_\d+\.jpeg$")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSources:
    return make_synthetic_sources(tmp_path_factory.mktemp("syn"))


def _metadata(covid_root: Path) -> pd.DataFrame:
    return pd.read_csv(covid_root / "metadata.csv", dtype=str, keep_default_na=False)


def _selected(df: pd.DataFrame) -> pd.DataFrame:
    """The default selection: COVID-19, X-ray, frontal view."""
    covid = df["finding"].str.endswith("COVID-19")
    return df[covid & (df["modality"] == "X-ray") & df["view"].isin(["PA", "AP", "AP Supine"])]


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _thumb(path: Path, side: int = 16) -> np.ndarray:
    with Image.open(path) as im:
        small = im.convert("L").resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float64) / 255


def test_default_layout_and_counts(sources: SyntheticSources) -> None:
    assert sources.chest_xray.name == "Chest_XRAY" and sources.covid_xray.name == "Covid_XRAY"
    assert is_synthetic(sources.chest_xray) and is_synthetic(sources.covid_xray)
    n_files = sum(1 for p in sources.chest_xray.parent.rglob("*") if p.is_file() and p.name != MARKER_NAME)
    assert 150 <= n_files <= 220


def test_kermany_layout(sources: SyntheticSources) -> None:
    base = sources.chest_xray / "chest_xray"
    patients: dict[str, set[str]] = {}
    sizes = set()
    for split in ("train", "val", "test"):
        normals = sorted((base / split / "NORMAL").iterdir())
        pneumonia = sorted((base / split / "PNEUMONIA").iterdir())
        assert normals and pneumonia
        assert all(PNEUMONIA_NAME.match(p.name) for p in pneumonia)
        for p in normals:
            assert NORMAL_NAME.match(p.name), p.name
            patients.setdefault(p.name.rsplit("-", 1)[0], set()).add(split)
            with Image.open(p) as im:
                assert (im.format, im.mode) == ("JPEG", "L")
                sizes.add(im.size)
    assert len(patients) == 60
    assert all(len(splits) == 1 for splits in patients.values()), "a patient in two splits"
    n_images = sum(1 for _ in base.glob("*/NORMAL/*"))
    assert n_images > len(patients), "no patient with two films"
    assert len(sizes) > 10 and any(w != h for w, h in sizes)
    assert all(160 <= s <= 320 for size in sizes for s in size)


@pytest.mark.parametrize("schema", ["latest", "early"])
def test_metadata_schema(tmp_path: Path, schema: str) -> None:
    src = make_synthetic_sources(tmp_path, n_normal_patients=4, n_covid_patients=12, schema=schema, seed=3)
    header = (src.covid_xray / "metadata.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header.endswith("other_notes,")
    raw = pd.read_csv(src.covid_xray / "metadata.csv")
    expected = list(LATEST_COLUMNS if schema == "latest" else EARLY_COLUMNS)
    assert list(raw.columns[:-1]) == expected
    assert raw.columns[-1].startswith("Unnamed") and raw.iloc[:, -1].isna().all()
    if schema == "latest":
        assert raw.columns[raw.columns.get_loc("finding") + 1] == "RT_PCR_positive"
        assert {"Pneumonia/Viral/COVID-19", "Pneumonia/Bacterial/Streptococcus", "No Finding", "todo"} <= set(
            raw["finding"])
    else:
        assert "RT_PCR_positive" not in raw.columns
        assert {"COVID-19", "SARS", "Streptococcus", "No Finding"} <= set(raw["finding"])

    df = _metadata(src.covid_xray)
    selected = _selected(df)
    assert selected["patientid"].nunique() == 12
    assert selected.groupby("patientid").size().between(1, 3).all()
    assert (selected.groupby("patientid").size() > 1).any()
    assert set(df["sex"]) <= {"M", "F"} and df["age"].astype(int).between(25, 85).all()
    covid = df[df["finding"].str.endswith("COVID-19")]
    assert (covid["view"] == "L").any(), "no lateral rows to drop"
    ct = df[df["modality"] == "CT"]
    assert not ct.empty and set(ct["view"]) == {"Axial"} and set(ct["folder"]) == {"volumes"}
    assert set(df["folder"]) == {"images", "volumes"}
    assert df["filename"].is_unique
    for folder, name in zip(df["folder"], df["filename"], strict=True):
        assert (src.covid_xray / folder / name).is_file(), f"{folder}/{name} missing"
    on_disk = {p.name for p in (src.covid_xray / "images").iterdir()}
    assert on_disk == set(df.loc[df["folder"] == "images", "filename"])


def test_mixed_formats(sources: SyntheticSources) -> None:
    df = _metadata(sources.covid_xray)
    found = set()
    for name in _selected(df)["filename"]:
        with Image.open(sources.covid_xray / "images" / name) as im:
            found.add((im.format, im.mode))
    assert {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "RGBA")} <= found
    exts = {Path(n).suffix for n in df["filename"]}
    assert {".jpeg", ".jpg", ".png"} <= exts


def test_deterministic_and_idempotent(tmp_path: Path) -> None:
    kw = {"n_normal_patients": 6, "n_covid_patients": 6, "seed": 7}
    make_synthetic_sources(tmp_path / "a", **kw)
    make_synthetic_sources(tmp_path / "b", **kw)
    first = _hashes(tmp_path / "a")
    assert first == _hashes(tmp_path / "b")
    make_synthetic_sources(tmp_path / "a", **kw)
    assert _hashes(tmp_path / "a") == first
    stale = tmp_path / "a" / "Covid_XRAY" / "images" / "stale.png"
    stale.write_bytes(b"x")
    with pytest.raises(DataError, match="stale.png"):
        make_synthetic_sources(tmp_path / "a", **kw)
    assert stale.read_bytes() == b"x"
    stale.unlink()
    make_synthetic_sources(tmp_path / "c", **{**kw, "seed": 8})
    assert _hashes(tmp_path / "c") != first

    make_synthetic_presplit(tmp_path / "p", n_per_class=6, seed=1)
    make_synthetic_presplit(tmp_path / "q", n_per_class=6, seed=1)
    assert _hashes(tmp_path / "p") == _hashes(tmp_path / "q")


def test_presplit_layout(tmp_path: Path) -> None:
    root = make_synthetic_presplit(tmp_path / "Dataset", n_per_class=10, test_fraction=0.2)
    assert root == tmp_path / "Dataset"
    for cls in ("Covid", "Normal"):
        assert len(list((root / "train" / cls).iterdir())) == 8
        assert len(list((root / "test" / cls).iterdir())) == 2
    assert all(NORMAL_NAME.match(p.name) for p in root.glob("*/Normal/*"))


def test_classes_are_separable(tmp_path: Path) -> None:
    root = make_synthetic_presplit(tmp_path, n_per_class=50, seed=11)
    paths = sorted(root.glob("*/*/*"))
    x = np.stack([_thumb(p).ravel() for p in paths])
    y = np.array([p.parent.name == "Covid" for p in paths], dtype=int)
    scores = cross_val_score(LogisticRegression(max_iter=2000), x, y, cv=5)
    assert scores.mean() > 0.8, scores  # chance is 0.5; a CNN does better than raw thumbnails


def test_chest_image_contract() -> None:
    a = chest_image(np.random.default_rng(5), covid=True, size=(200, 170))
    b = chest_image(np.random.default_rng(5), covid=True, size=(200, 170))
    assert a.shape == (200, 170) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert a.min() < 40 and a.max() > 150
    normal = chest_image(np.random.default_rng(5), covid=False, size=(200, 170))
    assert not np.array_equal(a, normal)
    with pytest.raises(ValueError):
        chest_image(np.random.default_rng(0), covid=False, size=(8, 8))


def test_lung_fields_brighter_in_covid() -> None:
    def lower_lungs(covid: bool) -> float:
        values = []
        for i in range(20):
            img = chest_image(np.random.default_rng(100 + i), covid=covid, size=(200, 200)).astype(float)
            values.append(img[110:150, 30:70].mean() + img[110:150, 130:170].mean())
        return float(np.mean(values))

    assert lower_lungs(True) > lower_lungs(False) + 20


def test_refuses_foreign_data(tmp_path: Path) -> None:
    real = tmp_path / "Chest_XRAY"
    real.mkdir()
    (real / "chest_xray.zip").write_bytes(b"real data")
    with pytest.raises(DataError, match="covidxray did not write"):
        make_synthetic_sources(tmp_path)
    assert (real / "chest_xray.zip").read_bytes() == b"real data"
    assert not (tmp_path / "Covid_XRAY").exists()


def test_readme_is_kept(tmp_path: Path) -> None:
    (tmp_path / "Covid_XRAY").mkdir()
    (tmp_path / "Covid_XRAY" / "README.md").write_text("put the data here\n")
    make_synthetic_sources(tmp_path, n_normal_patients=2, n_covid_patients=2)
    assert (tmp_path / "Covid_XRAY" / "README.md").read_text() == "put the data here\n"


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="schema"):
        make_synthetic_sources(tmp_path, schema="2021")
    with pytest.raises(ValueError):
        make_synthetic_sources(tmp_path, n_covid_patients=0)
    with pytest.raises(ValueError):
        make_synthetic_presplit(tmp_path, test_fraction=1.0)
