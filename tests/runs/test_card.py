"""The model card ready to share: schema, licences, citations, usage that runs, every evaluation, front matter."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import jsonschema
import keras
import pandas as pd
import pytest
import tensorflow as tf
import tomllib
import yaml
from conftest import write_image

from covidxray import __version__
from covidxray.app.cli import main
from covidxray.app.predict import predict
from covidxray.data.manifest import read_manifest
from covidxray.errors import ModelError
from covidxray.evaluation.evaluate import evaluate_model
from covidxray.runs.card import DATA_CITATIONS, licence
from covidxray.runs.load import SCHEMA_FILE, load_run

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


@pytest.fixture()
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "runs" / "scratch-gap", symlinks=True))


def _card(run: Path) -> dict:
    return json.loads((run / "model.json").read_text(encoding="utf-8"))


def _block(text: str, language: str) -> str:
    start = text.index(f"```{language}\n") + len(f"```{language}\n")
    return text[start:text.index("```", start)]


def test_a_fresh_card_fits_the_schema_and_carries_what_sharing_needs(run_copy: Path, tiny_dataset: Path) -> None:
    card = _card(run_copy)
    jsonschema.Draft202012Validator(SCHEMA).validate(card)
    assert set(card) == set(SCHEMA["properties"]), "the writer and the schema list different fields"
    assert card["license"]["code"] == "MIT"
    assert [e["source"] for e in card["license"]["data"]] == ["synthetic"]  # tiny_run trains on the synthetic set
    train = read_manifest(tiny_dataset).query("split == 'train'")
    assert card["data"]["training_sources"]["by_source"] == train["source"].value_counts().sort_index().to_dict()
    assert {c["doi"] for c in card["citations"]} == {c["doi"] for c in DATA_CITATIONS}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert card["authors"] == [a["name"] for a in project["authors"]]
    assert card["written"]["covidxray"] == __version__
    assert (card["written"]["keras"], card["written"]["tensorflow"]) == (keras.__version__, tf.__version__)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", card["written"]["date"])
    text = (run_copy / "model_card.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert (front["library_name"], front["pipeline_tag"], front["license"]) == ("keras", "image-classification",
                                                                                  "mit")
    assert front["datasets"] == ["covidxray-synthetic"] and "roc_auc" in front["metrics"]
    assert {"chest-x-ray", "covid-19", "synthetic-data"} <= set(front["tags"])
    for needle in ("## Licence", "Code: MIT", "## Citations", "doi:10.17632/rscbjbr9sj.2", "## About this card",
                   f"Keras {keras.__version__}", "covidxray contributors", "Test: not evaluated yet"):
        assert needle in text, needle


def test_each_source_gets_its_licence() -> None:
    data = {e["source"]: e for e in licence(["ieee8023", "kermany", "nih"], False, {"CC BY 4.0": 3, "none": 1})["data"]}
    assert data["kermany"]["licence"] == "CC BY 4.0"
    assert "`license` column of the data set's metadata.csv" in data["ieee8023"]["licence"]
    assert data["ieee8023"]["training_images_by_licence"] == {"CC BY 4.0": 3, "none": 1}
    assert "no restrictions on use" in data["nih"]["licence"] and "cite" in data["nih"]["licence"]
    assert [e["source"] for e in licence(["presplit"], False, None)["data"]] == ["kermany", "ieee8023"]
    assert "not known to covidxray" in licence(["hospital-a"], False, None)["data"][0]["licence"]
    unknown = licence(None, False, None)
    assert [e["source"] for e in unknown["data"]] == ["kermany", "ieee8023", "nih"] and "not known" in unknown["note"]
    assert licence(["kermany"], True, None)["data"][0]["licence"].startswith("MIT")


def test_the_cards_usage_snippets_run(run_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    """The card's Python block and command line, run as printed from the folder holding the run."""
    text = (run_copy / "model_card.md").read_text(encoding="utf-8")
    code, command = _block(text, "python"), _block(text, "bash").strip()
    assert code == _card(run_copy)["usage"]["python"] and "covidxray.open(" in code and ".predict(" in code
    monkeypatch.chdir(run_copy.parent)
    image = write_image(run_copy.parent / "xray.png", size=(97, 81), seed=3)
    namespace: dict = {}
    exec(compile(code, "model_card.md", "exec"), namespace)
    table = namespace["table"]
    expected = predict(run_copy, [image], tmp_path / "expected")["predictions"]["p_covid"][0]
    assert len(table) == 1 and abs(table["p_covid"][0] - expected) < 1e-6
    argv = shlex.split(command)
    assert argv[:2] == ["covidxray", "predict"]
    capsys.readouterr()
    assert main([*argv[1:], "--quiet"]) == 0, capsys.readouterr().err
    written = pd.read_csv(run_copy.parent / "predictions" / "predictions.csv")
    assert abs(written["p_covid"][0] - expected) < 1e-5


def test_every_evaluation_of_the_run_is_in_its_card(run_copy: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """Before: an evaluation on other data, or written outside the run, left the card saying "not evaluated"."""
    test = read_manifest(tiny_dataset).query("split == 'test'").reset_index(drop=True)
    csv = tmp_path / "external.csv"
    pd.DataFrame({"path": test["filepath"], "label": test["label"], "patient_id": test["patient_id"],
                  "source": ["hospital-a" if i % 2 else "hospital-b" for i in range(len(test))]}).to_csv(csv)
    outside = tmp_path / "elsewhere" / "ext"
    result = evaluate_model(run_copy, csv, split=None, out_dir=outside, n_boot=20)
    assert result["model_card"].startswith("updated"), result["model_card"]
    card = _card(run_copy)
    [entry] = card["evaluations"]
    assert entry["folder"] == "../../elsewhere/ext" and entry["inside_run"] is False
    assert entry["n"] == len(test) and set(entry["per_source"]) == {"hospital-a", "hospital-b"}
    assert card["metrics"]["test"] is None
    text = (run_copy / "model_card.md").read_text(encoding="utf-8")
    assert "### ../../elsewhere/ext" in text and "hospital-a (n = " in text and "Test: not evaluated yet" in text

    evaluate_model(run_copy, tiny_dataset, n_boot=20)  # the run's own test evaluation, eval-test/
    evaluate_model(run_copy, tiny_dataset, split="val", n_boot=20)  # eval-val/
    card = _card(run_copy)
    folders = [e["folder"] for e in card["evaluations"]]
    assert folders == ["eval-test", "eval-val", "../../elsewhere/ext"]
    assert card["metrics"]["test"]["folder"] == "eval-test" and card["metrics"]["test"]["training_dataset"] is True
    jsonschema.Draft202012Validator(SCHEMA).validate(card)
    text = (run_copy / "model_card.md").read_text(encoding="utf-8")
    assert "Test: not evaluated yet" not in text
    for folder in folders:
        assert f"### {folder}" in text, folder
    shutil.rmtree(outside)  # gone: dropped at the next refresh
    evaluate_model(run_copy, tiny_dataset, split="val", n_boot=20)
    assert [e["folder"] for e in _card(run_copy)["evaluations"]] == ["eval-test", "eval-val"]


TAMPERED = {
    "threshold as a string": (lambda c: c["decision"].update(threshold="0.3"), r"decision\.threshold is '0\.3'"),
    "no output": (lambda c: c.pop("output"), r"field '\(the card\)' does not fit the model card schema "
                                             r"\('output' is a required property\)"),
    "a date as a number": (lambda c: c["written"].update(date=20260101), r"field 'written\.date' does not fit"),
    "a bad format": (lambda c: c.update(format="1"), r"field 'format' does not fit"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_card_is_refused_on_read_naming_the_file_and_field(run_copy: Path, case: str) -> None:
    tamper, message = TAMPERED[case]
    card = _card(run_copy)
    tamper(card)
    (run_copy / "model.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ModelError, match=r"scratch-gap.model\.json: " + message) as info:
        load_run(run_copy)
    assert "\n" not in str(info.value)
