"""NIH ChestX-ray14 reader: the synthetic layout (filters, patient ids, ages, file locations) and the shared sample."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from covidxray.data.sources import parse_age, read_nih
from covidxray.data.sources.nih import nih_patient_id
from covidxray.data.synthetic import NIH_HEADER, make_synthetic_nih
from covidxray.errors import DataError

N_PATIENTS = 15


@pytest.fixture(scope="module")
def nih_root(tmp_path_factory) -> Path:
    return make_synthetic_nih(tmp_path_factory.mktemp("nih") / "NIH", N_PATIENTS, seed=0, size=64)


def _expected(min_age: float | None = 18, views: tuple[str, ...] = ("PA", "AP")) -> set[str]:
    """File names make_synthetic_nih documents as 'No Finding' within the filters."""
    names = set()
    for i in range(N_PATIENTS):
        age = 3 + i % 14 if i % 5 == 4 else 18 + (i * 13) % 60
        for k in range(1 + i % 3):
            view = "PA" if (i + k) % 2 == 0 else "AP"
            if k != 1 and (min_age is None or age >= min_age) and view in views:
                names.add(f"{1000 + 7 * i:08d}_{k:03d}.png")
    return names


def test_default_selection_is_adult_no_finding_frontal(nih_root):
    scan = read_nih(nih_root)
    assert {i.path.name for i in scan.images} == _expected()
    assert all(i.label == "normal" and i.source == "nih" and i.age >= 18 for i in scan.images)
    assert scan.stats["nih_rows"] == sum(1 + i % 3 for i in range(N_PATIENTS))
    assert scan.stats["nih_with_findings"] == sum(1 for i in range(N_PATIENTS) if i % 3 >= 1)
    assert scan.stats["nih_age_out_of_range"] > 0 and scan.skipped == []
    first = next(i for i in scan.images if i.path.name == "00001000_000.png")
    assert (first.patient_id, first.age, first.sex, first.view, first.rel_path) == (
        "nih:1000", 18.0, "F", "PA", "images/00001000_000.png")
    for img in scan.images:
        assert img.patient_id == f"nih:{int(img.path.name[:8])}"


def test_age_and_view_filters(nih_root):
    with_children = read_nih(nih_root, min_age=None)
    assert {i.path.name for i in with_children.images} == _expected(min_age=None)
    assert any(i.age < 18 for i in with_children.images)
    pa = read_nih(nih_root, views=("pa",))
    assert {i.path.name for i in pa.images} == _expected(views=("PA",))
    young = read_nih(nih_root, min_age=18, max_age=40)
    assert young.images and all(18 <= i.age <= 40 for i in young.images)


def test_unknown_age_trailing_column_split_folders_and_missing_files(tmp_path, nih_root):
    root = tmp_path / "NIH"
    (root / "images_001" / "images").mkdir(parents=True)
    for png in sorted((nih_root / "images").glob("*.png")):
        shutil.copyfile(png, root / "images_001" / "images" / png.name)
    lines = (nih_root / "Data_Entry_2017.csv").read_text().splitlines()
    rows = [line + "," for line in lines]  # a copy of the list with a trailing empty column
    rows[1] = rows[1].replace(",18,F,", ",,F,")  # 00001000_000.png: age unknown
    (root / "Data_Entry_2017.csv").write_text("\n".join(rows) + "\n")
    (root / "images_001" / "images" / "00001007_000.png").unlink()
    scan = read_nih(root)
    names = {i.path.name for i in scan.images}
    assert names == _expected() - {"00001000_000.png", "00001007_000.png"}
    assert scan.stats["nih_age_unknown"] == 1 and scan.stats["nih_missing_files"] == 1
    assert scan.skipped == [("Data_Entry_2017.csv: 00001007_000.png", "listed in Data_Entry_2017.csv but not on disk")]
    assert all(i.rel_path.startswith("images_001/images/") for i in scan.images)
    unbounded = read_nih(root, min_age=None)
    assert any(i.path.name == "00001000_000.png" and math.isnan(i.age) for i in unbounded.images)


def test_bad_label_lists_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no Data_Entry_2017.csv"):
        read_nih(tmp_path)
    (tmp_path / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels,Patient ID\nx.png,No Finding,1\n")
    with pytest.raises(DataError, match=r"Data_Entry_2017\.csv: missing required column\(s\) \['Patient Age'"):
        read_nih(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        read_nih(tmp_path / "nope")


def test_make_synthetic_nih_writes_the_nih_header_and_is_idempotent(tmp_path):
    root = make_synthetic_nih(tmp_path / "n", 3, seed=1, size=48)
    first = {p.name: p.read_bytes() for p in (root / "images").iterdir()}
    assert (root / "Data_Entry_2017.csv").read_text().splitlines()[0] == NIH_HEADER
    make_synthetic_nih(root, 3, seed=1, size=48)
    assert {p.name: p.read_bytes() for p in (root / "images").iterdir()} == first


@pytest.mark.parametrize("text, years", [("58", 58.0), ("058Y", 58.0), ("45.5", 45.5), ("6M", 0.5), ("", math.nan),
                                         ("414", math.nan)])
def test_parse_age(text, years):
    assert parse_age(text) == years or (math.isnan(years) and math.isnan(parse_age(text)))


def test_parse_age_rejects_text_and_patient_ids_drop_padding():
    with pytest.raises(ValueError, match="not a number of years"):
        parse_age("adult")
    assert nih_patient_id("00001300") == nih_patient_id("1300") == "1300"


@pytest.mark.shared
def test_shared_nih_sample(shared_data):
    root = shared_data / "nih14-sample"
    scan = read_nih(root)
    assert len(scan.images) == 100 and scan.skipped == []
    assert len({i.patient_id for i in scan.images}) == 100
    for img in scan.images:
        assert img.patient_id == f"nih:{int(img.path.name[:8])}"
    ages = sorted(i.age for i in scan.images)
    assert ages[0] == 18 and ages[-1] == 80 and (ages[49] + ages[50]) / 2 == 44.5
    assert sum(i.view == "AP" for i in scan.images) == 55 and sum(i.view == "PA" for i in scan.images) == 45
    assert sum(i.sex == "F" for i in scan.images) == 56 and sum(i.sex == "M" for i in scan.images) == 44
    assert len(read_nih(root, views=("PA",)).images) == 45
    assert all(i.age <= 30 for i in read_nih(root, max_age=30).images)
