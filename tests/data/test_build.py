"""Dataset build: patient-level split, leakage guarantees, bad files, idempotency and the untouched sources."""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter

import pandas as pd
import pytest
from conftest import tree_digest, write_image
from hypothesis import given, settings
from hypothesis import strategies as st

from covidxray.data.build import BuildConfig, build_dataset
from covidxray.data.manifest import MANIFEST_COLUMNS, check_frame, read_manifest
from covidxray.data.split import SPLIT_STRICTNESS, assign_splits, group_ids, near_duplicate_pairs
from covidxray.errors import DataError


@pytest.fixture(scope="module")
def built(tmp_path_factory, synthetic_sources):
    out = tmp_path_factory.mktemp("built") / "dataset"
    before = {"chest": tree_digest(synthetic_sources.chest_xray), "covid": tree_digest(synthetic_sources.covid_xray)}
    summary = build_dataset(out, chest_xray=synthetic_sources.chest_xray, covid_xray=synthetic_sources.covid_xray,
                            progress=False)
    return out, summary, before


def test_layout_manifest_and_summary(built):
    out, summary, _ = built
    df = read_manifest(out)
    assert list(pd.read_csv(out / "manifest.csv").columns) == MANIFEST_COLUMNS
    assert set(df["split"]) == {"train", "val", "test"} and set(df["label"]) == {"normal", "covid"}
    for row in df.itertuples():
        assert (out / row.path).is_file()
        assert row.path.startswith(f"{row.split}/{row.label}/")
    assert (out / "rejected.csv").is_file() and (out / "summary.json").is_file()
    assert summary["images"] == len(df)
    assert set(df["source"]) == {"kermany", "ieee8023"}
    assert (df.loc[df["source"] == "ieee8023", "label"] == "covid").all()


def test_split_is_patient_level_and_stratified(built):
    out, summary, _ = built
    df = read_manifest(out)
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    assert (df.groupby("dup_group")["split"].nunique() == 1).all()
    assert summary["leakage"]["patients_in_several_splits"] == []
    share = df.groupby("label")["split"].apply(lambda s: (s == "test").mean())
    assert share.between(0.12, 0.3).all(), share


def test_sources_untouched_and_rebuild_is_byte_identical(built, synthetic_sources, tmp_path):
    out, _, before = built
    first = (out / "manifest.csv").read_bytes()
    build_dataset(out, chest_xray=synthetic_sources.chest_xray, covid_xray=synthetic_sources.covid_xray,
                  progress=False)
    assert (out / "manifest.csv").read_bytes() == first
    assert tree_digest(synthetic_sources.chest_xray) == before["chest"]
    assert tree_digest(synthetic_sources.covid_xray) == before["covid"]
    other = tmp_path / "again"
    build_dataset(other, chest_xray=synthetic_sources.chest_xray, covid_xray=synthetic_sources.covid_xray,
                  progress=False)
    assert (other / "manifest.csv").read_bytes() == first
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_seed_changes_the_split(built, synthetic_sources, tmp_path):
    out, _, _ = built
    build_dataset(tmp_path / "s1", chest_xray=synthetic_sources.chest_xray, covid_xray=synthetic_sources.covid_xray,
                  config=BuildConfig(seed=1), progress=False)
    assert (tmp_path / "s1" / "manifest.csv").read_bytes() != (out / "manifest.csv").read_bytes()


def test_bad_files_are_rejected_and_listed(tmp_path, synthetic_sources):
    chest = tmp_path / "chest"
    shutil.copytree(synthetic_sources.chest_xray, chest)
    covid = tmp_path / "covid"
    shutil.copytree(synthetic_sources.covid_xray, covid)
    normal = next((chest / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))
    (normal.parent / "IM-9990-0001.jpeg").write_bytes(b"")
    (normal.parent / "IM-9991-0001.jpeg").write_text("not an image")
    (normal.parent / "IM-9992-0001.jpeg").write_bytes(normal.read_bytes()[:300])
    shutil.copyfile(normal, normal.parent / "IM-9993-0001.jpeg")  # exact duplicate of another patient's file
    before = tree_digest(chest)
    summary = build_dataset(tmp_path / "ds", chest_xray=chest, covid_xray=covid, progress=False)
    rejected = pd.read_csv(tmp_path / "ds" / "rejected.csv")
    reasons = dict(zip(rejected["item"].str.rsplit("/", n=1).str[-1], rejected["reason"], strict=True))
    assert reasons["IM-9990-0001.jpeg"].startswith("empty file")
    assert reasons["IM-9991-0001.jpeg"].startswith("not an image")
    assert "truncated" in reasons["IM-9992-0001.jpeg"] or "corrupt" in reasons["IM-9992-0001.jpeg"]
    assert "exact duplicate" in reasons["IM-9993-0001.jpeg"]
    assert summary["leakage"]["exact_duplicates_removed"] == 1
    assert tree_digest(chest) == before


def test_caps_and_view_filter(tmp_path, synthetic_sources):
    summary = build_dataset(tmp_path / "ds", chest_xray=synthetic_sources.chest_xray,
                            covid_xray=synthetic_sources.covid_xray,
                            config=BuildConfig(caps={"normal": 30}, views=("PA",)), progress=False)
    df = read_manifest(tmp_path / "ds")
    assert 20 <= (df["label"] == "normal").sum() <= 30
    assert set(df.loc[df["label"] == "covid", "view"]) == {"PA"}
    assert summary["config"]["views"] == ["PA"]


def test_refuses_to_replace_a_foreign_folder(tmp_path, synthetic_sources):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="covidxray did not write"):
        build_dataset(out, chest_xray=synthetic_sources.chest_xray, covid_xray=synthetic_sources.covid_xray,
                      progress=False)
    assert (out / "thesis.tex").read_text() == "precious"


def test_failed_build_keeps_the_previous_dataset(tmp_path, synthetic_sources, monkeypatch):
    out = tmp_path / "ds"
    build_dataset(out, chest_xray=synthetic_sources.chest_xray, covid_xray=synthetic_sources.covid_xray,
                  progress=False)
    before = tree_digest(out)
    import covidxray.data.build as build_module

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(build_module, "write_csv", boom)
    with pytest.raises(OSError, match="disk full"):
        build_dataset(out, chest_xray=synthetic_sources.chest_xray, covid_xray=synthetic_sources.covid_xray,
                      config=BuildConfig(seed=3), progress=False)
    assert tree_digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_near_duplicates_stay_in_one_split(tmp_path):
    """Two patients whose images are near copies form one group, whatever the seed."""
    from PIL import Image

    root = tmp_path / "Dataset"
    for i in range(12):
        write_image(root / "train" / "Normal" / f"IM-{i:04d}-0001.jpeg", seed=i, size=(128, 128))
        write_image(root / "train" / "Covid" / f"c{i}.png", seed=100 + i, size=(128, 128))
    src = root / "train" / "Covid" / "c0.png"
    Image.open(src).resize((120, 120)).save(root / "train" / "Covid" / "c0-copy.jpeg", quality=90)
    write_image(root / "test" / "Covid" / "t.png", seed=500, size=(128, 128))
    write_image(root / "test" / "Normal" / "IM-0500-0001.jpeg", seed=501, size=(128, 128))
    for seed in range(6):
        out = tmp_path / f"ds{seed}"
        summary = build_dataset(out, presplit=root, config=BuildConfig(seed=seed, val_fraction=0.5), progress=False)
        df = read_manifest(out)
        pair = df[df["orig_path"].isin(["train/Covid/c0.png", "train/Covid/c0-copy.jpeg"])]
        assert len(pair) == 2 and pair["split"].nunique() == 1 and pair["dup_group"].nunique() == 1
        assert len(summary["leakage"]["near_duplicate_pairs"]) == 1
        assert set(df.loc[df["orig_path"].str.startswith("test/"), "split"]) == {"test"}


def test_check_frame_is_the_one_table_check(tmp_path):
    """Baseline, pipeline, explain, report and read_manifest check their tables with manifest.check_frame."""
    df = pd.DataFrame({"filepath": ["a.png", "b.png"], "y": [0, 1], "label": ["normal", "covid"]})
    check_frame(df)
    check_frame(df, ("label",), rows=2)
    check_frame(df.iloc[:0], allow_empty=True)
    with pytest.raises(DataError, match=r"the training table lacks column\(s\) \['y'\]; pass a frame from"):
        check_frame(df.drop(columns="y"), what="the training table")
    with pytest.raises(DataError, match="the image table is empty"):
        check_frame(df.iloc[:0])
    with pytest.raises(DataError, match="has 2 rows but there are 3 images"):
        check_frame(df, ("label",), rows=3)
    with pytest.raises(DataError, match=r"unknown label\(s\) \['pneumonia'\]"):
        check_frame(df.assign(label=["normal", "pneumonia"]), ("label",))
    (tmp_path / "manifest.csv").write_text("path,label\na.png,covid\n")
    with pytest.raises(DataError, match=r"manifest\.csv lacks column\(s\) \['split'\]; rebuild it"):
        read_manifest(tmp_path)


def test_split_helpers():
    pids = ["a", "a", "b", "c", "d"]
    groups = group_ids(pids, [(2, 3)])
    assert groups[0] == groups[1] and groups[2] == groups[3] and groups[4] not in groups[:4]
    splits = assign_splits(["x"] * 5, groups, [str(i) for i in range(5)], fractions={"test": 0.4}, seed=0)
    assert splits[0] == splits[1] and splits[2] == splits[3]
    hashes = [bytes([0] * 32), bytes([1] + [0] * 31), bytes([255] * 32)]
    assert near_duplicate_pairs(hashes, 2) == [(0, 1, 1)]


def _straddling(groups: list[int], splits: list[str]) -> list[int]:
    seen: dict[int, set[str]] = {}
    for g, split in zip(groups, splits, strict=True):
        seen.setdefault(g, set()).add(split)
    return sorted(g for g, names in seen.items() if len(names) > 1)


@st.composite
def split_inputs(draw: st.DrawFn, max_images: int = 120) -> dict:
    """Random images in random groups (some holding both labels), random keys, fractions, seed and fixed splits."""
    n = draw(st.integers(1, max_images))
    n_groups = draw(st.integers(1, n))
    groups = draw(st.lists(st.integers(0, n_groups - 1), min_size=n, max_size=n))
    labels = draw(st.lists(st.sampled_from(["normal", "covid"]), min_size=n, max_size=n))
    keys = [f"k{i:04d}" for i in draw(st.permutations(range(n)))]
    test = draw(st.floats(0.0, 0.5))
    fractions = {"test": test, "val": draw(st.floats(0.0, 1.0 - test))}
    fixed = None
    if draw(st.booleans()):
        fixed = draw(st.lists(st.sampled_from([None, None, None, "test", "val", "train"]), min_size=n, max_size=n))
    return {"labels": labels, "groups": groups, "keys": keys, "fractions": fractions, "fixed": fixed,
            "seed": draw(st.integers(0, 2**16))}


@settings(max_examples=300, deadline=None, database=None)
@given(case=split_inputs())
def test_no_group_straddles_two_splits(case: dict) -> None:
    """Whatever the labels inside a group (one patient with a normal and a covid film) and whatever is fixed."""
    splits = assign_splits(case["labels"], case["groups"], case["keys"], fractions=case["fractions"],
                           seed=case["seed"], fixed=case["fixed"])
    assert len(splits) == len(case["labels"])
    assert set(splits) <= {*case["fractions"], "train"}
    assert _straddling(case["groups"], splits) == []
    if case["fixed"] is not None:
        for g in set(case["groups"]):
            decided = {f for f, h in zip(case["fixed"], case["groups"], strict=True) if h == g and f is not None}
            if decided:  # the whole group goes to the strictest split any of its images is fixed to
                want = min(decided, key=SPLIT_STRICTNESS.index)
                assert {s for s, h in zip(splits, case["groups"], strict=True) if h == g} == {want}


@settings(max_examples=60, deadline=None, database=None)
@given(seed=st.integers(0, 2**16), test=st.floats(0.05, 0.4), val=st.floats(0.05, 0.3),
       mixed=st.floats(0.0, 0.3), data=st.data())
def test_fractions_are_honoured_per_label_for_large_inputs(seed: int, test: float, val: float, mixed: float,
                                                           data: st.DataObject) -> None:
    """About 2000 images in groups of 1-4: each split holds its share of each label to within a few groups."""
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=700, max_size=700))
    labels, groups = [], []
    for g, size in enumerate(sizes):
        main = "covid" if g % 3 == 0 else "normal"
        other = "normal" if main == "covid" else "covid"
        for j in range(size):
            labels.append(other if j == size - 1 and size > 2 and (g * 0.61803) % 1 < mixed else main)
            groups.append(g)
    keys = [f"s:{i:05d}" for i in range(len(labels))]
    splits = assign_splits(labels, groups, keys, fractions={"test": test, "val": val}, seed=seed)
    assert _straddling(groups, splits) == []
    for label in ("normal", "covid"):
        n = labels.count(label)
        counts = Counter(s for s, lab in zip(splits, labels, strict=True) if lab == label)
        for name, frac in (("test", test), ("val", val)):
            assert abs(counts[name] - frac * n) <= 0.03 * n + 8, (label, name, counts, n)


def test_mixed_group_goes_whole_to_one_split():
    """One patient with films of both labels (the case that straddled in 22 of 50 seeds before)."""
    labels = ["normal", "covid", "covid"] + ["normal", "covid"] * 20
    groups = [0, 0, 0] + list(range(1, 41))
    keys = [f"k{i:03d}" for i in range(len(labels))]
    for seed in range(50):
        splits = assign_splits(labels, groups, keys, fractions={"test": 0.3, "val": 0.2}, seed=seed)
        assert len(set(splits[:3])) == 1, seed
    fixed = ["val", None, "test"] + [None] * 40
    splits = assign_splits(labels, groups, keys, fractions={"test": 0.3}, seed=0, fixed=fixed)
    assert splits[:3] == ["test"] * 3, "images fixed to val and test: the whole group goes to test"
    with pytest.raises(ValueError, match="unknown fixed split"):
        assign_splits(labels, groups, keys, fractions={}, seed=0, fixed=["holdout"] + [None] * 42)


def test_split_unchanged_for_inputs_without_mixed_groups():
    """Byte-identical to the split before mixed groups were handled, so datasets built then stay as they were."""
    labels, groups, keys, fixed = [], [], [], []
    for i in range(300):
        g = (i * 7919) % 113
        labels.append("covid" if g % 3 == 0 else "normal")
        groups.append(g)
        keys.append(f"src:{(i * 31) % 300:04d}.png")
        fixed.append("test" if g % 17 == 0 else None)
    digests = []
    for fx in (None, fixed):
        splits = assign_splits(labels, groups, keys, fractions={"test": 0.2, "val": 0.15}, seed=3, fixed=fx)
        digests.append(hashlib.sha256(",".join(splits).encode()).hexdigest())
    assert digests == ["5bca23d0f1a8863eec1123b4da36b6e28b30f45a991f9fd6f7dd3e755cf742eb",
                       "cca5c1ade0f6058e4fa5ea551f917ef9b63d7d8a9ccb98547d3dff3fef0093bc"]


@pytest.mark.shared
def test_seed_dataset_import_keeps_its_split(tmp_path, shared_data):
    seed = shared_data / "seed-dataset"
    summary = build_dataset(tmp_path / "ds", presplit=seed,
                            metadata=shared_data / "ieee8023-metadata" / "metadata-early.csv", progress=False)
    df = read_manifest(tmp_path / "ds")
    assert len(df) == 340 and summary["rejected"] == 0
    assert (df["split"] == "test").sum() == 68
    assert set(df.loc[df["orig_path"].str.startswith("test/"), "split"]) == {"test"}
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    assert df.loc[df["label"] == "covid", "patient_id"].str.startswith("ieee8023:").all()
    assert df.loc[df["label"] == "normal", "patient_id"].str.startswith("kermany:").all()
    manifest = pd.read_csv(seed / "MANIFEST.csv")
    assert sorted(df["orig_path"]) == sorted(manifest["split"] + "/" + manifest["label"] + "/" + manifest["filename"])
    pairs = {frozenset((p["a"].rsplit("/", 1)[-1], p["b"].rsplit("/", 1)[-1]))
             for p in summary["leakage"]["near_duplicate_pairs"]}
    assert frozenset(("AR-1.jpg", "AR-2.jpg")) in pairs
    assert frozenset(("4-x-day1.jpg", "extubation-1.jpg")) in pairs


def test_group_ids_match_connected_components_named_by_their_smallest_image():
    """Against an independent reference (scipy.sparse.csgraph): images of one patient or linked as duplicates
    share a group, and a group is named by its smallest image index, whatever the order of the links."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(7)
    n = 300
    pids = [f"p{rng.integers(0, 120)}" for _ in range(n)]
    links = [tuple(int(v) for v in rng.integers(0, n, 2)) for _ in range(60)]
    edges = links + [(i, j) for i in range(n) for j in range(i) if pids[i] == pids[j]]
    rows, cols = zip(*edges, strict=True)
    _, component = connected_components(coo_matrix((np.ones(len(edges)), (rows, cols)), shape=(n, n)),
                                         directed=False)
    smallest = {c: min(i for i in range(n) if component[i] == c) for c in set(component)}
    assert group_ids(pids, links) == [smallest[c] for c in component]
    assert group_ids(pids, links[::-1]) == group_ids(pids, links)
