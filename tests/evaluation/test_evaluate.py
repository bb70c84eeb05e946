"""Evaluation, heatmap rendering and the reproduce command on a small real model trained here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import tree_digest

from covidxray.data.manifest import read_manifest
from covidxray.errors import DataError
from covidxray.evaluation.evaluate import evaluate_model
from covidxray.explain.render import checks_table, render_model_cams
from covidxray.studies.reproduce import ReproduceConfig, reproduce


def test_evaluate_on_the_test_split_writes_every_file(tiny_run, tiny_dataset, tmp_path):
    out = tmp_path / "eval"
    result = evaluate_model(tiny_run, tiny_dataset, out_dir=out, n_boot=200)
    for name in ("metrics.json", "results.md", "predictions.csv", "confusion.png", "roc_pr.png", "reliability.png"):
        assert (out / name).is_file(), name
    test = read_manifest(tiny_dataset).query("split == 'test'")
    assert result["metrics"]["n"] == len(test)
    for key in ("accuracy", "recall", "specificity", "f1", "roc_auc"):
        lo, hi = result["ci"][key]
        assert lo <= result["metrics"][key] <= hi, key
    assert result["bootstrap"]["unit"] == "patient"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["threshold"] == result["threshold"]


def test_evaluate_on_an_external_csv_reports_each_source(tiny_run, tiny_dataset, tmp_path):
    test = read_manifest(tiny_dataset).query("split == 'test'").reset_index(drop=True)
    csv = tmp_path / "external.csv"
    pd.DataFrame({
        "path": test["filepath"],
        "label": test["label"].str.upper(),
        "patient_id": test["patient_id"],
        "source": ["hospital-a" if i % 2 else "hospital-b" for i in range(len(test))],
    }).to_csv(csv, index=False)
    result = evaluate_model(tiny_run, csv, split=None, out_dir=tmp_path / "ext", n_boot=100)
    assert set(result["per_source"]) == {"hospital-a", "hospital-b"}
    assert sum(r["metrics"]["n"] for r in result["per_source"].values()) == len(test)


def test_evaluate_counts_a_file_listed_five_times_once(tiny_run, tiny_dataset, tmp_path):
    test = read_manifest(tiny_dataset).query("split == 'test'").reset_index(drop=True)
    paths = [*test["filepath"], *[test["filepath"][0]] * 4]
    csv = tmp_path / "repeated.csv"
    pd.DataFrame({"path": paths, "label": [*test["label"], *[test["label"][0]] * 4]}).to_csv(csv, index=False)
    out = tmp_path / "rep"
    result = evaluate_model(tiny_run, csv, split=None, out_dir=out, n_boot=50)
    assert result["metrics"]["n"] == len(test) and result["bootstrap"]["n_units"] == len(test)
    assert result["skipped"] == {"count": 4, "reasons": {"listed more than once": 4}}
    assert "listed more than once: 4" in result["markdown"]
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped["reason"].str.endswith("listed 5 times; counted once)").all()


def test_cams_for_a_trained_run(tiny_run, tiny_dataset, tmp_path):
    out = tmp_path / "cams"
    result = render_model_cams(tiny_run, tiny_dataset, out_dir=out, limit=6, name="scratch-gap")
    assert result["method"] == "cam" and result["images"] == 6
    overlays = list(out.glob("scratch-gap__*__true-*__pred-*__p*.png"))
    assert len(overlays) == 6
    assert (out / "scratch-gap__summary.png").is_file() and (out / "scratch-gap__checks.json").is_file()
    table = checks_table({"scratch-gap": result})
    assert 0.0 <= float(table.loc["scratch-gap", "border mass"]) <= 1.0


@pytest.mark.slow  # full suite only: keeps the quick gate under 3 minutes
def test_reproduce_with_two_seeds(tiny_dataset, tmp_path):
    config = ReproduceConfig(models=("scratch-gap",), weights="none", epochs=1, image_size=32, batch_size=16,
                             seeds=2, n_boot=50)
    result = reproduce(config, tmp_path / "rep", data=tiny_dataset, progress=False)
    assert [r["model"] for r in result["rows"]] == ["baseline: logistic regression", "scratch-gap"]
    row = result["rows"][1]
    assert row["n_seeds"] == 2 and len(row["per_seed"]) == 2 and "accuracy" in row["seeds"]
    assert "seeds (mean ± std)" in result["table"]
    assert (tmp_path / "rep" / "results.md").read_text() == result["table"]
    assert json.loads((tmp_path / "rep" / "results.json").read_text())["machine"]["versions"]["tensorflow"]


def test_evaluate_into_the_run_folder_is_refused_and_the_run_stays(tiny_run, tiny_dataset, tmp_path):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    before = tree_digest(run)
    with pytest.raises(DataError, match=r"--out .*run contains the source .*model\.keras"):
        evaluate_model(run, tiny_dataset, out_dir=run, n_boot=0)
    assert tree_digest(run) == before
