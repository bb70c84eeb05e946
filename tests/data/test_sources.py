"""Source readers on the real layouts: Kermany (with the Kaggle zip's quirks), ieee8023 (both schemas), pre-split."""

from __future__ import annotations

import shutil

import pytest
from conftest import write_image

from covidxray.data.sources import kermany_patient_id, read_ieee8023, read_kermany, read_presplit
from covidxray.data.sources.ieee8023 import finding_matches, read_metadata
from covidxray.errors import DataError

EARLY_HEADER = (
    "patientid,offset,sex,age,finding,survival,intubated,intubation_present,went_icu,in_icu,"
    "needed_supplemental_O2,extubated,temperature,pO2_saturation,leukocyte_count,neutrophil_count,"
    "lymphocyte_count,view,modality,date,location,folder,filename,doi,url,license,clinical_notes,other_notes,"
)


@pytest.mark.parametrize("name, expected", [
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
    ("person1_bacteria_1.jpeg", "person1"),
    ("person1_virus_6.jpeg", "person1"),
    ("person1950_bacteria_4881.jpeg", "person1950"),
    ("random.jpeg", None),
])
def test_kermany_patient_ids(name, expected):
    assert kermany_patient_id(name) == expected


def test_kermany_reader_tolerates_zip_nesting_and_junk(tmp_path):
    root = tmp_path / "Chest_XRAY"
    base = root / "chest_xray"
    write_image(base / "train" / "NORMAL" / "IM-0115-0001.jpeg")
    write_image(base / "train" / "NORMAL" / "IM-0115-0002.jpeg", seed=1)
    write_image(base / "test" / "NORMAL" / "NORMAL2-IM-1427-0001.jpeg", seed=2)
    write_image(base / "train" / "PNEUMONIA" / "person1_virus_6.jpeg", seed=3)
    write_image(base / "chest_xray" / "train" / "NORMAL" / "IM-0115-0001.jpeg")  # the zip's nested copy
    (base / "train" / "NORMAL" / ".DS_Store").write_bytes(b"junk")
    (base / "train" / "NORMAL" / "._IM-0115-0001.jpeg").write_bytes(b"resource fork")
    write_image(root / "__MACOSX" / "chest_xray" / "train" / "NORMAL" / "IM-0999-0001.jpeg")
    (base / "train" / "NORMAL" / "notes.txt").write_text("hello")
    scan = read_kermany(root)
    rels = sorted(i.rel_path for i in scan.images)
    assert rels == ["chest_xray/test/NORMAL/NORMAL2-IM-1427-0001.jpeg", "chest_xray/train/NORMAL/IM-0115-0001.jpeg",
                    "chest_xray/train/NORMAL/IM-0115-0002.jpeg"]
    assert {i.patient_id for i in scan.images} == {"kermany:IM-0115", "kermany:NORMAL2-IM-1427"}
    assert all(i.label == "normal" and i.source == "kermany" for i in scan.images)
    skipped = dict(scan.skipped)
    assert set(skipped) == {"chest_xray/train/NORMAL/notes.txt", "chest_xray/train/NORMAL/.DS_Store",
                            "chest_xray/train/NORMAL/._IM-0115-0001.jpeg"}
    assert skipped["chest_xray/train/NORMAL/notes.txt"].startswith("not an image file extension")
    assert "litter" in skipped["chest_xray/train/NORMAL/.DS_Store"]


def test_kermany_reader_only_nested(tmp_path):
    write_image(tmp_path / "chest_xray" / "chest_xray" / "val" / "NORMAL" / "IM-0001-0001.jpeg")
    assert len(read_kermany(tmp_path).images) == 1


def test_kermany_reader_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no Kermany chest X-rays found"):
        read_kermany(tmp_path)


def _write_early(root, rows):
    root.mkdir(parents=True, exist_ok=True)
    lines = [EARLY_HEADER]
    for pid, finding, view, modality, folder, filename in rows:
        cells = [pid, "0", "M", "60", finding] + [""] * 12 + [view, modality, "", "", folder, filename, "", "", "",
                                                              "", "", ""]
        lines.append(",".join(f'"{c}"' if "," in c else c for c in cells))
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")


def test_ieee8023_early_schema_default_and_pa_selection(tmp_path):
    root = tmp_path / "Covid_XRAY"
    _write_early(root, [
        ("1", "COVID-19", "PA", "X-ray", "images", "a.jpeg"),
        ("1", "COVID-19", "AP Supine", "X-ray", "images", "b.png"),
        ("2", "COVID-19, ARDS", "AP", "X-ray", "images", "c.jpg"),
        ("3", "COVID-19", "L", "X-ray", "images", "d.jpeg"),
        ("4", "COVID-19", "Axial", "CT", "volumes", "e.nii.gz"),
        ("5", "SARS", "PA", "X-ray", "images", "f.jpeg"),
        ("6", "COVID-19", "PA", "X-ray", "images", "missing.jpeg"),
        ("7", "", "", "X-ray", "images", "g.jpeg"),
    ])
    for name in ("a.jpeg", "b.png", "c.jpg", "d.jpeg", "f.jpeg", "g.jpeg"):
        write_image(root / "images" / name)
    scan = read_ieee8023(root)
    assert sorted(i.rel_path for i in scan.images) == ["images/a.jpeg", "images/b.png", "images/c.jpg"]
    assert {i.patient_id for i in scan.images} == {"ieee8023:1", "ieee8023:2"}
    assert sorted(scan.skipped) == [
        ("metadata.csv: g.jpeg", "blank finding (cannot tell COVID-19 from other rows)"),
        ("metadata.csv: missing.jpeg", "listed in metadata.csv but not on disk"),
    ]
    pa = read_ieee8023(root, views=("PA",))
    assert [i.rel_path for i in pa.images] == ["images/a.jpeg"]
    assert pa.images[0].age == 60 and pa.images[0].sex == "M"


def test_ieee8023_latest_schema_hierarchical_findings_and_volumes(tmp_path, synthetic_sources):
    scan = read_ieee8023(synthetic_sources.covid_xray)
    assert scan.images, "the synthetic latest-schema source yields COVID images"
    assert all(i.label == "covid" and i.view in ("PA", "AP", "AP Supine") for i in scan.images)
    df = read_metadata(synthetic_sources.covid_xray / "metadata.csv")
    assert "RT_PCR_positive" in df.columns
    assert finding_matches("Pneumonia/Viral/COVID-19", ["COVID-19"])
    assert not finding_matches("Pneumonia/Viral/SARS", ["COVID-19"])


def test_ieee8023_latin1_metadata(tmp_path):
    root = tmp_path / "c"
    _write_early(root, [("1", "COVID-19", "PA", "X-ray", "images", "caf\u00e9.jpeg")])
    text = (root / "metadata.csv").read_text()
    (root / "metadata.csv").write_bytes(text.encode("latin-1"))
    write_image(root / "images" / "caf\u00e9.jpeg")
    assert [i.path.name for i in read_ieee8023(root).images] == ["caf\u00e9.jpeg"]


def test_ieee8023_missing_column_names_file_and_fix(tmp_path):
    (tmp_path / "metadata.csv").write_text("patientid,finding,filename\n1,COVID-19,a.jpeg\n")
    with pytest.raises(DataError, match=r"metadata.csv: missing required column\(s\) \['view'\]"):
        read_ieee8023(tmp_path)


def test_ieee8023_no_metadata(tmp_path):
    with pytest.raises(DataError, match="metadata.csv: not found"):
        read_ieee8023(tmp_path)


@pytest.mark.shared
def test_ieee8023_real_metadata_versions(tmp_path, shared_data):
    """Both real metadata versions select COVID-19 frontal X-rays; PA-only on the early one gives the seed's 141."""
    meta = shared_data / "ieee8023-metadata"
    early = read_metadata(meta / "metadata-early.csv")
    latest = read_metadata(meta / "metadata-latest.csv")
    assert len(early) == 372 and len(latest) == 950
    for df, pa_count in ((early, 141), (latest, 196)):
        covid = df["finding"].map(lambda f: finding_matches(f, ["COVID-19"]))
        sel = df[covid & (df["view"] == "PA") & (df["modality"] == "X-ray")]
        assert len(sel) >= pa_count
    # The reader itself against the early metadata, with the images laid out as the seed's Covid files
    root = tmp_path / "Covid_XRAY"
    (root / "images").mkdir(parents=True)
    for split in ("train", "test"):
        for f in (shared_data / "seed-dataset" / split / "Covid").iterdir():
            shutil.copyfile(f, root / "images" / f.name)
    scan = read_ieee8023(root, views=("PA",), metadata=meta / "metadata-early.csv", findings=("COVID-19",))
    exact = [i for i in scan.images if early.set_index("filename").loc[i.path.name, "finding"] == "COVID-19"]
    assert len(exact) == 140  # the seed's 141 minus the one file missing from shared/


def test_presplit_reader_with_metadata(tmp_path):
    root = tmp_path / "Dataset"
    write_image(root / "train" / "Covid" / "a.jpeg")
    write_image(root / "test" / "Covid" / "b.jpeg", seed=1)
    write_image(root / "train" / "Normal" / "IM-0001-0001.jpeg", seed=2)
    write_image(root / "test" / "Normal" / "other.png", seed=3)
    (root / "train" / "Other").mkdir()
    _write_early(tmp_path / "meta", [("9", "COVID-19", "PA", "X-ray", "images", "a.jpeg")])
    scan = read_presplit(root, metadata=tmp_path / "meta" / "metadata.csv")
    by_name = {i.path.name: i for i in scan.images}
    assert by_name["a.jpeg"].patient_id == "ieee8023:9" and by_name["a.jpeg"].split == "train"
    assert by_name["b.jpeg"].patient_id == "presplit:b" and by_name["b.jpeg"].split == "test"
    assert by_name["IM-0001-0001.jpeg"].patient_id == "kermany:IM-0001"
    assert by_name["other.png"].label == "normal"
    assert scan.skipped == [("train/Other", "unknown class folder (not Covid/Normal)")]


def test_presplit_reader_wrong_layout(tmp_path):
    with pytest.raises(DataError, match="no train/ or test/ folder"):
        read_presplit(tmp_path)
