"""Study designs (original vs adult-normals), the confounder warnings, and the cross-design evaluation."""

from __future__ import annotations

import json

import pytest

from covidxray.data.build import BuildConfig, build_dataset
from covidxray.data.designs import RULES, apply_design, confounders, format_design
from covidxray.data.manifest import read_manifest
from covidxray.data.sources import SourceImage
from covidxray.data.synthetic import make_synthetic_labeled, make_synthetic_nih, make_synthetic_sources
from covidxray.errors import DataError
from covidxray.studies.reproduce import ReproduceConfig, reproduce_designs, unseen_test_split


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
    return make_synthetic_nih(tmp_path_factory.mktemp("nih") / "NIH", 30, seed=0, size=96)


@pytest.fixture(scope="module")
def adult(tmp_path_factory, synthetic_sources, nih):
    out = tmp_path_factory.mktemp("adult") / "dataset"
    summary = build_dataset(out, chest_xray=synthetic_sources.chest_xray, covid_xray=synthetic_sources.covid_xray,
                            nih=nih, design="adult-normals", progress=False)
    return out, summary


def test_adult_normals_has_no_pediatric_image(adult, synthetic_sources, nih):
    out, summary = adult
    df = read_manifest(out)
    assert set(df["source"]) == {"nih", "ieee8023"}
    normals = df[df["label"] == "normal"]
    assert (normals["source"] == "nih").all() and (normals["age"] >= 18).all()
    assert not (df["age"] < 18).any() and df.loc[df["label"] == "covid", "source"].eq("ieee8023").all()
    assert normals["patient_id"].str.fullmatch(r"nih:\d+").all()
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(df["split"]) == {"train", "val", "test"}
    (kermany,) = summary["design"]["excluded"]
    assert kermany["source"] == "kermany" and kermany["label"] == "normal" and kermany["images"] > 50
    assert "pediatric source" in summary["design"]["notes"][0]
    assert summary["confounders"]["by_class_source"]["normal/nih"]["age"]["share_under_18"] == 0
    first = (out / "manifest.csv").read_bytes()
    again = build_dataset(out, chest_xray=synthetic_sources.chest_xray, covid_xray=synthetic_sources.covid_xray,
                          nih=nih, design="adult-normals", progress=False)
    assert (out / "manifest.csv").read_bytes() == first and again == json.loads((out / "summary.json").read_text())


def test_original_design_ignores_nih_with_a_note(tmp_path, synthetic_sources, nih):
    legacy = build_dataset(tmp_path / "legacy", chest_xray=synthetic_sources.chest_xray,
                           covid_xray=synthetic_sources.covid_xray, progress=False)
    summary = build_dataset(tmp_path / "orig", chest_xray=synthetic_sources.chest_xray,
                            covid_xray=synthetic_sources.covid_xray, nih=nih, design="original", progress=False)
    assert (tmp_path / "orig" / "manifest.csv").read_bytes() == (tmp_path / "legacy" / "manifest.csv").read_bytes()
    assert legacy["design"]["name"] == "original" and legacy["design"]["notes"] == []
    assert [e["source"] for e in summary["design"]["excluded"]] == ["nih"]
    rules = {(w["rule"], w["factor"]) for w in summary["confounders"]["warnings"]}
    assert {("categorical", "source"), ("pediatric_source", "source/kermany"), ("age_unknown", "age/normal")} <= rules
    lines = format_design(summary)
    assert any("left out by design original" in line and "nih" in line for line in lines)
    assert any(line.startswith("  WARNING classes differ in source: normal 100% kermany") for line in lines)


def test_designs_refuse_what_they_cannot_build(tmp_path, synthetic_sources, nih):
    with pytest.raises(DataError, match=r"design adult-normals: no normal images left .*--nih DIR"):
        build_dataset(tmp_path / "a", chest_xray=synthetic_sources.chest_xray,
                      covid_xray=synthetic_sources.covid_xray, design="adult-normals", progress=False)
    with pytest.raises(DataError, match="unknown design 'children'"):
        build_dataset(tmp_path / "b", chest_xray=synthetic_sources.chest_xray,
                      covid_xray=synthetic_sources.covid_xray, design="children", progress=False)
    with pytest.raises(DataError, match="not both"):
        build_dataset(tmp_path / "c", presplit=synthetic_sources.chest_xray, nih=nih, progress=False)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("plant, expected", [
    ((), set()),
    (("format", "size"), {("categorical", "format"), ("categorical", "mode"), ("size", "width"), ("size", "height")}),
    (("age",), {("age", "age")}),
])
def test_warnings_fire_on_planted_differences_only(tmp_path, plant, expected):
    csv_path = make_synthetic_labeled(tmp_path / "set", n_per_class=12, plant=plant)
    summary = build_dataset(tmp_path / "ds", extra=[csv_path], design="all",
                            config=BuildConfig(near_duplicate_bits=0), progress=False)
    warnings = summary["confounders"]["warnings"]
    assert {(w["rule"], w["factor"]) for w in warnings} == expected
    assert all(w["rule"] in RULES and w["value"] > w["limit"] for w in warnings)
    if not plant:
        assert format_design(summary)[-1] == "confounder warnings: 0 (classes balanced on the checks)"


def _img(label: str, source: str, age: float = float("nan"), view: str = "", sex: str = "") -> SourceImage:
    return SourceImage(path=None, rel_path=f"{label}-{source}-{age}-{view}", label=label,  # type: ignore[arg-type]
                       patient_id=f"{source}:{label}{age}", source=source, view=view, sex=sex, age=age)


def test_adult_normals_rules_on_single_images():
    images = [_img("normal", "kermany"), _img("normal", "nih", 40.0, "PA"), _img("normal", "site", 12.0),
              _img("normal", "site"), _img("covid", "ieee8023", 50.0, "L"), _img("covid", "ieee8023", 9.0, "AP"),
              _img("covid", "ieee8023", view="AP Supine"), _img("covid", "site", 70.0)]
    kept, report = apply_design("adult-normals", images)
    assert [(i.label, i.source, i.age) for i in kept][:1] == [("normal", "nih", 40.0)]
    assert {(i.source, i.view) for i in kept if i.label == "covid"} == {("ieee8023", "AP Supine"), ("site", "")}
    reasons = {(e["source"], e["reason"].split(" (")[0]) for e in report["excluded"]}
    assert reasons == {("kermany", "pediatric source"), ("site", "age under 18"), ("ieee8023", "age under 18"),
                       ("site", "normal image of unknown age"), ("ieee8023", "not a frontal view")}
    kept_original, report_original = apply_design("original", images[:1] + images[4:])
    assert len(kept_original) == 4 and report_original["excluded"][0]["source"] == "site"


def test_confounder_rules_on_rows():
    def row(label, **kw):
        base = {"label": label, "source": "s", "age": "50", "format": "PNG", "mode": "L", "view": "", "sex": "",
                "width": 100, "height": 100}
        return {**base, **kw}

    rows = [row("normal", view="PA", sex="F") for _ in range(5)] + [row("covid", view="AP") for _ in range(5)]
    result = confounders(rows)
    assert [w["factor"] for w in result["warnings"]] == ["view"]  # sex known for one class only: not compared
    assert result["by_class"]["normal"]["age"] == {"known": 5, "unknown": 0, "median": 50.0, "q1": 50.0, "q3": 50.0,
                                                   "min": 50.0, "max": 50.0, "share_under_18": 0.0}
    rows = [row("normal", age="40", width=140) for _ in range(5)] + [row("covid", age="55") for _ in range(5)]
    assert confounders(rows)["warnings"] == []  # gap 15 and ratio 1.4: at, not over, the limits
    rows = [row("normal", age=str(a)) for a in (3, 4, 5, 6, 30)]
    rows += [row("covid", age=str(a)) for a in (8, 9, 40, 50, 60)]
    assert {w["factor"] for w in confounders(rows)["warnings"]} == {"age", "share_under_18"}


@pytest.mark.slow
def test_reproduce_designs_and_cross_evaluation(tmp_path):
    sources = make_synthetic_sources(tmp_path / "src", n_normal_patients=24, n_covid_patients=24, seed=1)
    nih = make_synthetic_nih(tmp_path / "NIH", 36, seed=1, size=64)
    config = ReproduceConfig(models=("scratch-gap",), weights="none", epochs=1, image_size=32, batch_size=16,
                             n_boot=20, augment=False, cache=None)
    result = reproduce_designs(config, tmp_path / "rep", chest_xray=sources.chest_xray,
                               covid_xray=sources.covid_xray, nih=nih, progress=False)
    original, adult = result["designs"]["original"], result["designs"]["adult-normals"]
    assert original["dataset"]["design"] == "original" and adult["dataset"]["design"] == "adult-normals"
    assert "Design: **adult-normals**" in adult["table"] and "left out by design adult-normals" in adult["table"]
    assert "pediatric data set" in original["table"]
    cross = result["cross"]
    assert set(cross["matrix"]) == {"baseline", "scratch-gap"}
    for model in cross["matrix"].values():
        assert set(model) == {"original", "adult-normals"}
        assert all(set(by_test) == {"original", "adult-normals"} for by_test in model.values())
    assert len(cross["rows"]) == 8 and len(cross["notes"]) == 4
    assert "scratch-gap (trained on original)" in cross["table"]
    assert any(n.startswith("baseline trained on original:") and "adult-normals normals COVID" in n
               for n in cross["notes"])
    assert (tmp_path / "rep" / "cross" / "results.md").read_text() == cross["table"]
    n_test = cross["matrix"]["scratch-gap"]["original"]["adult-normals"]["n"]
    assert n_test == adult["dataset"]["counts"]["test"]["normal"] + adult["dataset"]["counts"]["test"]["covid"] \
        - cross["left_out"]["original"]["adult-normals"]


def test_unseen_test_leaves_out_what_the_model_saw(tmp_path, synthetic_sources):
    for seed in (0, 1):
        build_dataset(tmp_path / f"s{seed}", chest_xray=synthetic_sources.chest_xray,
                      covid_xray=synthetic_sources.covid_xray, config=BuildConfig(seed=seed), progress=False)
    own, n_own = unseen_test_split(tmp_path / "s0", tmp_path / "s0")
    other, n_out = unseen_test_split(tmp_path / "s1", tmp_path / "s0")
    seen = read_manifest(tmp_path / "s0").query("split != 'test'")
    n_test = (read_manifest(tmp_path / "s1")["split"] == "test").sum()
    assert n_own == 0 and n_out > 0 and len(other) + n_out == n_test
    assert not other["sha256"].isin(seen["sha256"]).any() and not other["patient_id"].isin(seen["patient_id"]).any()
    assert len(own) > 0


@pytest.mark.shared
def test_shared_data_adult_normals(tmp_path, shared_data):
    from covidxray.data.presplit_layout import presplit_as_sources

    chest, covid = presplit_as_sources(shared_data / "seed-dataset",
                                       shared_data / "ieee8023-metadata" / "metadata-early.csv", tmp_path / "src")
    summary = build_dataset(tmp_path / "ds", chest_xray=chest, covid_xray=covid, nih=shared_data / "nih14-sample",
                            design="adult-normals", progress=False)
    df = read_manifest(tmp_path / "ds")
    assert "kermany" not in set(df["source"]) and (df.loc[df["label"] == "normal", "source"] == "nih").sum() == 100
    assert not (df["age"] < 18).any() and (df.groupby("patient_id")["split"].nunique() == 1).all()
    factors = {w["factor"] for w in summary["confounders"]["warnings"]}
    assert {"source", "format", "mode", "view", "age"} <= factors
