"""One reader of labeled sets for build and evaluate, duplicates, path containment in every source reader, and the
one age parser and label table."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_image

from covidxray.data.build import build_dataset
from covidxray.data.labeled_sets import read_labeled
from covidxray.data.sources import read_generic, read_ieee8023, read_kermany, read_nih, read_presplit
from covidxray.data.sources.base import outside_reason, parse_age, parse_label
from covidxray.errors import DataError

LEAVES = "path leaves the source folder"


# ------------------------------------------------------------------------------------------------- labels and ages


@pytest.mark.parametrize("text", ["normal", "Normal", "NORMAL", " normal ", "no finding", "No Finding", "No_Finding",
                                  "0", "0.0"])
def test_normal_spellings(text):
    assert parse_label(text) == "normal"


@pytest.mark.parametrize("text", ["covid", "COVID", "Covid", "COVID-19", "covid19", "Covid_19", "COVID 19", "1"])
def test_covid_spellings(text):
    assert parse_label(text) == "covid"


@pytest.mark.parametrize("text", ["pneumonia", "", "2", "covid-20", "abnormal"])
def test_other_classes_are_not_labels(text):
    assert parse_label(text) is None


@pytest.mark.parametrize(("value", "years"), [
    ("45", 45.0), ("045Y", 45.0), ("45.0", 45.0), ("45.", 45.0), (" 58 ", 58.0), ("6M", 0.5), ("10d", 10 / 365.25),
    ("NaN", math.nan), ("nan", math.nan), ("", math.nan), ("N/A", math.nan), ("unknown", math.nan), (None, math.nan),
    (45.0, 45.0), (float("nan"), math.nan), (7, 7.0), ("414", math.nan), ("130", math.nan),
])
def test_parse_age_reads_what_each_source_writes(value, years):
    """generic CSVs ('45', '45.0', ''), ieee8023 ('45', ''), NIH ('045Y' in old copies, '58'), manifests (floats)."""
    got = parse_age(value)
    assert (math.isnan(got) and math.isnan(years)) or got == pytest.approx(years)


@pytest.mark.parametrize("value", ["adult", "-3", "45 years", "4-5", -3.0])
def test_parse_age_refuses_text_unless_lenient(value):
    with pytest.raises(ValueError, match="not a number of years"):
        parse_age(value)
    assert math.isnan(parse_age(value, strict=False))


# ------------------------------------------------------------------------------------------------- one reader


@pytest.fixture()
def mixed_csv(tmp_path) -> Path:
    """A CSV with every former disagreement: spellings, a missing file, blank patient ids, a split column, an
    unknown label and split, a file listed twice under the same label."""
    root = tmp_path / "site"
    rows = ["Path,LABEL,patient_id,age,split"]
    for i in range(12):
        write_image(root / "img" / f"f{i}.png", seed=300 + i)
        label = ("COVID-19", "No Finding", "covid19", "0", "Covid", "NORMAL")[i % 6]
        pid = f"p{i // 2}" if i % 3 else ""
        rows.append(f"img/f{i}.png,{label},{pid},{30 + i},{('', 'test', 'TRAIN')[i % 3]}")
    rows += ["img/missing.png,covid,,,", "img/f0.png,pneumonia,,,", "img/f1.png,normal,,,val2",
             "./img/f2.png,covid19,,,", "img/../img/f2.png,COVID,x,,"]
    csv_path = root / "labels.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


def test_build_and_evaluate_read_a_csv_the_same_way(mixed_csv, tmp_path):
    scan = read_generic(mixed_csv)
    labeled = read_labeled(mixed_csv, split=None)
    frame = labeled.frame
    assert len(scan.images) == len(frame) == 12
    assert [str(i.path.absolute()) for i in scan.images] == frame["filepath"].tolist()
    assert [i.label for i in scan.images] == frame["label"].tolist()
    assert [i.patient_id for i in scan.images] == frame["patient_id"].tolist()
    assert [i.source for i in scan.images] == frame["source"].tolist() == ["labels"] * 12
    assert scan.skipped == labeled.skipped
    assert frame["label"].tolist()[:6] == ["covid", "normal", "covid", "normal", "covid", "normal"]
    assert frame["patient_id"].tolist()[:3] == ["labels:img/f0.png", "labels:p0", "labels:p1"]
    reasons = dict(labeled.skipped)
    assert reasons["labels.csv, line 14"].startswith("image file not found (img/missing.png")
    assert reasons["labels.csv, line 15"].startswith("unknown label 'pneumonia'")
    assert reasons["labels.csv, line 16"].startswith("unknown split 'val2'")
    for line in (17, 18):
        assert reasons[f"labels.csv, line {line}"] == ("listed more than once (same file as line 4, which is used; "
                                                       "listed 3 times; counted once)")
    assert len(reasons) == 5

    summary = build_dataset(tmp_path / "ds", extra=[mixed_csv], design="all", progress=False)
    manifest = pd.read_csv(tmp_path / "ds" / "manifest.csv")
    assert sorted(manifest["patient_id"]) == sorted(frame["patient_id"])
    assert summary["counts"]["train"]["covid"] + summary["counts"]["train"]["normal"] > 0
    by_file = dict(zip(manifest["orig_path"], manifest["label"], strict=True))
    assert by_file == {i.rel_path: i.label for i in scan.images}
    rejected = pd.read_csv(tmp_path / "ds" / "rejected.csv")
    assert sorted(zip(rejected["item"], rejected["reason"], strict=True)) == sorted(labeled.skipped)


def test_split_column_selects_for_evaluate_and_is_recorded_for_the_build(mixed_csv):
    assert {i.split for i in read_generic(mixed_csv).images} == {None, "test", "train"}
    test = read_labeled(mixed_csv, split="test").frame
    assert [Path(f).name for f in test["filepath"]] == ["f1.png", "f4.png", "f7.png", "f10.png"]
    with pytest.raises(DataError, match=r"no image of split 'val' \(the set names \['test', 'train'\]\)"):
        read_labeled(mixed_csv, split="val")


def test_a_split_is_named_in_any_case_by_every_reader(mixed_csv, tiny_dataset, tmp_path):
    """One rule for split names (covidxray.data.manifest.split_name): a dataset, a CSV's split column, a split
    folder and the --split flag all read "TEST", "Test " and "test" alike."""
    for spelling in ("TEST", "Test ", "test"):
        assert read_labeled(tiny_dataset, split=spelling).frame.equals(read_labeled(tiny_dataset, split="test").frame)
        assert len(read_labeled(mixed_csv, split=spelling).frame) == 4
    folder = tmp_path / "site"
    for split, cls in (("Train", "covid"), ("TEST", "normal"), ("test", "covid")):
        write_image(folder / split / cls / f"{split}-{cls}.png", seed=len(split) + len(cls))
    assert {i.split for i in read_generic(folder).images} == {"train", "test"}
    assert len(read_labeled(folder, split="Test").frame) == 2


def test_a_file_listed_five_times_counts_once(tmp_path):
    root = tmp_path / "ext"
    for i in range(3):
        write_image(root / f"x{i}.png", seed=i)
    rows = ["path,label,patient_id", "x0.png,covid,a", "x1.png,normal,b", "x0.png,covid,c", "./x0.png,COVID,d",
            f"{(root / 'x0.png').resolve()},covid-19,e", "sub/../x0.png,covid,f", "x2.png,normal,g"]
    (root / "sub").mkdir()
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    labeled = read_labeled(root / "list.csv", split=None)
    assert [Path(f).name for f in labeled.frame["filepath"]] == ["x0.png", "x1.png", "x2.png"]
    assert labeled.frame["patient_id"].tolist() == ["list:a", "list:b", "list:g"]
    assert [item for item, _ in labeled.skipped] == [f"list.csv, line {n}" for n in (4, 5, 6, 7)]
    assert {reason for _, reason in labeled.skipped} == {
        "listed more than once (same file as line 2, which is used; listed 5 times; counted once)"}


def test_a_file_under_two_labels_is_refused(tmp_path):
    root = tmp_path / "ext"
    write_image(root / "x0.png")
    write_image(root / "x1.png", seed=1)
    (root / "list.csv").write_text("path,label\nx0.png,covid\nx1.png,normal\n./x0.png,normal\n")
    for read in (read_generic, read_labeled):
        with pytest.raises(DataError, match=r"list\.csv: the file .*x0\.png is listed with both labels "
                                            r"\(line 2: covid; line 4: normal\)\. A file has one label: fix"):
            read(root / "list.csv")


def test_a_file_linked_into_both_class_folders_is_refused(tmp_path):
    root = tmp_path / "ext"
    write_image(root / "covid" / "a.png")
    write_image(root / "normal" / "b.png", seed=1)
    os.symlink(root / "covid" / "a.png", root / "normal" / "a-again.png")
    with pytest.raises(DataError, match=r"listed with both labels \(covid/a\.png: covid; normal/a-again\.png: normal"):
        read_labeled(root)


# ------------------------------------------------------------------------------------------------- path safety


@pytest.fixture()
def outside(tmp_path) -> Path:
    """An image beside, not inside, the source folders."""
    return write_image(tmp_path / "outside.png", seed=99)


def test_outside_reason(tmp_path, outside):
    root = tmp_path / "src"
    write_image(root / "a.png")
    assert outside_reason(root / "a.png", root) is None
    assert outside_reason(root / "sub" / ".." / "a.png", root) is None
    assert outside_reason(root / ".." / "outside.png", root).startswith(LEAVES)
    assert outside_reason(outside, root).startswith(LEAVES)
    os.symlink(root / "loop", root / "loop")
    assert outside_reason(root / "loop", root) == "broken symbolic link or symlink loop"


def test_ieee8023_metadata_pointing_outside(tmp_path, outside):
    root = tmp_path / "covid"
    write_image(root / "images" / "a.png")
    os.symlink(outside, root / "images" / "link.png")
    rows = ["patientid,finding,view,modality,folder,filename,age,sex",
            "1,COVID-19,PA,X-ray,images,a.png,45,M",
            "2,COVID-19,PA,X-ray,images,../../outside.png,,",
            f"3,COVID-19,PA,X-ray,images,{outside},,",
            "4,COVID-19,PA,X-ray,images,link.png,,",
            "5,COVID-19,PA,X-ray,..,outside.png,,"]
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    scan = read_ieee8023(root)
    assert [i.rel_path for i in scan.images] == ["images/a.png"]
    skipped = dict(scan.skipped)
    assert set(skipped) == {"metadata.csv: ../../outside.png", f"metadata.csv: {outside}", "metadata.csv: link.png",
                            "metadata.csv: outside.png"}
    assert all(reason.startswith(LEAVES) for reason in skipped.values())


def test_kermany_symlink_pointing_outside(tmp_path, outside):
    root = tmp_path / "chest"
    normal = root / "chest_xray" / "train" / "NORMAL"
    write_image(normal / "IM-0001-0001.jpeg", fmt="JPEG")
    os.symlink(outside, normal / "IM-0002-0001.jpeg")
    scan = read_kermany(root)
    assert [i.path.name for i in scan.images] == ["IM-0001-0001.jpeg"]
    assert [(item, reason.split(" (")[0]) for item, reason in scan.skipped] == [
        ("chest_xray/train/NORMAL/IM-0002-0001.jpeg", LEAVES)]


def test_nih_symlink_pointing_outside(tmp_path, outside):
    root = tmp_path / "nih"
    write_image(root / "images" / "00000001_000.png")
    os.symlink(outside, root / "images" / "00000002_000.png")
    (root / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
        "00000001_000.png,No Finding,0,1,40,M,PA\n00000002_000.png,No Finding,0,2,41,F,PA\n"
        "../outside.png,No Finding,0,3,42,F,PA\n")
    scan = read_nih(root)
    assert [i.path.name for i in scan.images] == ["00000001_000.png"]
    skipped = dict(scan.skipped)
    assert skipped["Data_Entry_2017.csv: 00000002_000.png"].startswith(LEAVES)
    assert skipped["Data_Entry_2017.csv: ../outside.png"] == "listed in Data_Entry_2017.csv but not on disk"


def test_presplit_symlink_pointing_outside(tmp_path, outside):
    root = tmp_path / "presplit"
    write_image(root / "train" / "Covid" / "a.png")
    (root / "train" / "Normal").mkdir()
    os.symlink(outside, root / "train" / "Normal" / "b.png")
    scan = read_presplit(root)
    assert [i.rel_path for i in scan.images] == ["train/Covid/a.png"]
    assert scan.skipped[0][0] == "train/Normal/b.png" and scan.skipped[0][1].startswith(LEAVES)


def test_generic_csv_and_folder_pointing_outside_and_the_evaluate_exception(tmp_path, outside):
    root = tmp_path / "site"
    write_image(root / "normal" / "a.png")
    write_image(root / "covid" / "b.png", seed=1)
    os.symlink(outside, root / "covid" / "link.png")
    csv_path = root / "labels.csv"
    csv_path.write_text(f"path,label\nnormal/a.png,normal\n../outside.png,covid\n{outside},covid\ncovid/link.png,covid\n")
    scan = read_generic(csv_path)
    assert [i.rel_path for i in scan.images] == ["normal/a.png"]
    assert [item for item, _ in scan.skipped] == ["labels.csv, line 3", "labels.csv, line 4", "labels.csv, line 5"]
    assert all(reason.startswith(LEAVES) for _, reason in scan.skipped)
    folder = read_generic(root)
    assert sorted(i.rel_path for i in folder.images) == ["covid/b.png", "normal/a.png"]
    assert [(item, reason.split(" (")[0]) for item, reason in folder.skipped] == [("covid/link.png", LEAVES)]

    evaluated = read_labeled(csv_path, split=None)
    assert evaluated.skipped == [("labels.csv, line 4", "listed more than once (same file as line 3, which is used; "
                                                        "listed 3 times; counted once)"),
                                 ("labels.csv, line 5", "listed more than once (same file as line 3, which is used; "
                                                        "listed 3 times; counted once)")]
    assert [Path(f).name for f in evaluated.frame["filepath"]] == ["a.png", "outside.png"]


def test_build_lists_files_outside_a_source_in_rejected_csv(tmp_path, outside):
    root = tmp_path / "site"
    rows = ["path,label,patient_id"]
    for i in range(12):
        write_image(root / "img" / f"f{i}.png", seed=200 + i)
        rows.append(f"img/f{i}.png,{'covid' if i % 2 else 'normal'},p{i}")
    rows += ["../outside.png,covid,px", f"{outside},normal,py"]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    build_dataset(tmp_path / "ds", extra=[root / "labels.csv"], design="all", progress=False)
    manifest = pd.read_csv(tmp_path / "ds" / "manifest.csv")
    assert len(manifest) == 12 and "outside" not in " ".join(manifest["orig_path"])
    rejected = pd.read_csv(tmp_path / "ds" / "rejected.csv")
    assert rejected["item"].tolist() == ["labels.csv, line 14", "labels.csv, line 15"]
    assert rejected["reason"].str.startswith(LEAVES).all()
