"""Generic labeled sources: CSV (with bad rows) and class folders, and a build that lists what it skipped."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from conftest import write_image

from covidxray.data.build import build_dataset
from covidxray.data.manifest import read_manifest
from covidxray.data.sources import read_generic
from covidxray.errors import DataError


@pytest.fixture()
def labeled_csv(tmp_path):
    root = tmp_path / "hospital"
    for i in range(4):
        write_image(root / "img" / f"n{i}.png", seed=i)
        write_image(root / "img" / f"c{i}.jpeg", seed=10 + i, fmt="JPEG")
    (root / "img" / "notes.txt").write_text("not an image")
    rows = [
        "PATH,Label,patient_id,source,age,sex,view",
        "img/n0.png,normal,17,,45,male,PA",
        "img/n1.png,Normal,17,,46,F,PA",
        "img/n2.png,NORMAL,,,8M,,AP",
        "img/n3.png,normal,20,other-site,,female,",
        "img/c0.jpeg,COVID-19,c1,,60,M,AP Supine",
        "img/c1.jpeg,covid,c2,,,,",
        "",
        ",covid,c3,,,,",
        "img/c2.jpeg,pneumonia,c4,,,,",
        "img/missing.png,covid,c5,,,,",
        "img/c3.jpeg,covid,c6,,old,,",
        "img/n0.png,normal,18,,45,M,PA",
        "img/notes.txt,normal,19,,,,",
    ]
    csv_path = root / "labels.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


def test_csv_rows_and_optional_columns(labeled_csv):
    scan = read_generic(labeled_csv)
    got = {i.rel_path: i for i in scan.images}
    assert sorted(got) == ["img/c0.jpeg", "img/c1.jpeg", "img/n0.png", "img/n1.png", "img/n2.png", "img/n3.png"]
    n0 = got["img/n0.png"]
    assert (n0.label, n0.patient_id, n0.source, n0.age, n0.sex, n0.view) == ("normal", "labels:17", "labels", 45.0,
                                                                             "M", "PA")
    assert got["img/n1.png"].patient_id == n0.patient_id
    assert got["img/n2.png"].patient_id == "labels:img/n2.png" and got["img/n2.png"].age == pytest.approx(8 / 12)
    assert got["img/n3.png"].source == "other-site" and got["img/n3.png"].patient_id == "other-site:20"
    assert math.isnan(got["img/n3.png"].age) and got["img/n3.png"].sex == "F"
    assert got["img/c0.jpeg"].label == "covid" and got["img/c0.jpeg"].view == "AP Supine"
    assert scan.stats == {"labels.csv rows": 12, "labels.csv selected": 6, "labels.csv without patient_id": 1}


def test_csv_bad_rows_are_skipped_with_line_and_reason(labeled_csv):
    skipped = dict(read_generic(labeled_csv).skipped)
    assert skipped["labels.csv, line 9"] == "empty path"
    assert skipped["labels.csv, line 10"].startswith("unknown label 'pneumonia'")
    assert skipped["labels.csv, line 11"].startswith("image file not found (img/missing.png")
    assert "age 'old' is not a number of years" in skipped["labels.csv, line 12"]
    assert skipped["labels.csv, line 13"] == ("listed more than once (same file as line 2, which is used; listed 2 "
                                              "times; counted once)")
    assert skipped["labels.csv, line 14"].startswith("not an image file extension")
    assert len(skipped) == 6


def test_csv_header_and_empty_file_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.png,covid\n")
    with pytest.raises(DataError, match=r"bad\.csv: missing required column\(s\) \['path', 'label'\]"):
        read_generic(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label\n\n")
    with pytest.raises(DataError, match="empty.csv: no rows below the header"):
        read_generic(empty)
    with pytest.raises(DataError, match="no such file or folder"):
        read_generic(tmp_path / "nowhere")


def test_class_folders_direct_and_one_level_down(tmp_path):
    flat = tmp_path / "My Set"
    write_image(flat / "Normal" / "a.png")
    write_image(flat / "COVID-19" / "sub" / "b.png", seed=1)
    (flat / "Normal" / ".DS_Store").write_bytes(b"junk")
    (flat / "Normal" / "readme.txt").write_text("hello")
    write_image(flat / "pneumonia" / "p.png", seed=2)
    scan = read_generic(flat)
    assert sorted((i.rel_path, i.label, i.source, i.patient_id) for i in scan.images) == [
        ("COVID-19/sub/b.png", "covid", "my-set", "my-set:COVID-19/sub/b.png"),
        ("Normal/a.png", "normal", "my-set", "my-set:Normal/a.png"),
    ]
    skipped = dict(scan.skipped)
    assert skipped.pop("Normal/.DS_Store").startswith("OS or archive litter")
    assert skipped == {"Normal/readme.txt": "not an image file extension (.txt)",
                       "pneumonia": "unknown class folder (not normal/covid)"}
    split = tmp_path / "split"
    write_image(split / "train" / "normal" / "a.png")
    write_image(split / "test" / "covid" / "b.png", seed=1)
    scan = read_generic(split, source="Site B")
    assert sorted(i.rel_path for i in scan.images) == ["test/covid/b.png", "train/normal/a.png"]
    assert {i.source for i in scan.images} == {"site-b"}
    write_image(tmp_path / "none" / "x" / "a.png")
    with pytest.raises(DataError, match="no normal/ or covid/ subfolder"):
        read_generic(tmp_path / "none")


def test_build_from_csv_keeps_metadata_and_lists_bad_rows(tmp_path, labeled_csv):
    for i in range(4, 10):
        write_image(labeled_csv.parent / "img" / f"x{i}.png", seed=100 + i)
    extra = [f"img/x{i}.png,{'covid' if i % 2 else 'normal'},x{i},,{30 + i},,PA" for i in range(4, 10)]
    with labeled_csv.open("a") as f:
        f.write("\n".join(extra) + "\n")
    summary = build_dataset(tmp_path / "ds", extra=[labeled_csv], design="all", progress=False)
    df = read_manifest(tmp_path / "ds")
    assert len(df) == 12 and set(df["source"]) == {"labels", "other-site"}
    row = df[df["orig_path"] == "img/n0.png"].iloc[0]
    assert (row["patient_id"], row["age"], row["sex"], row["view"]) == ("labels:17", 45, "M", "PA")
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    rejected = pd.read_csv(tmp_path / "ds" / "rejected.csv")
    assert len(rejected) == 6 and set(rejected["source"]) == {"labels"}
    assert summary["source_stats"]["labels.csv without patient_id"] == 1
    assert summary["design"]["name"] == "all" and summary["design"]["excluded"] == []
    with pytest.raises(DataError, match="given twice"):
        build_dataset(tmp_path / "ds2", extra=[labeled_csv, labeled_csv], design="all", progress=False)
