"""Using a trained model: `covidxray predict` on real files, the model card it reads, and plain Keras agreeing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, tree_digest, write_image

from covidxray.app.cli import main
from covidxray.app.predict import predict
from covidxray.errors import DataError, ModelError
from covidxray.evaluation.evaluate import evaluate_model
from covidxray.outputs import RECORD_NAME, file_sha256, foreign_entries
from covidxray.runs.load import load_run


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the trained tiny run (with its ownership record) that a test may change."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def _card(run: Path) -> dict:
    return json.loads((run / "model.json").read_text(encoding="utf-8"))


def test_a_trained_run_carries_its_model_card(tiny_run: Path) -> None:
    card = _card(tiny_run)
    sha = file_sha256(tiny_run / "model.keras")
    threshold = json.loads((tiny_run / "threshold.json").read_text())
    provenance = json.loads((tiny_run / "provenance.json").read_text())
    assert card["model"]["sha256"] == sha and card["model"]["id"] == f"{tiny_run.name}@{sha[:12]}"
    assert card["model"]["name"] == "scratch-gap" and card["model"]["weights"]["spec"] == "none"
    assert card["input"]["image_size"] == 32 and card["input"]["shape"] == [None, 32, 32, 3]
    assert card["input"]["channels"] == 3 and card["input"]["value_range"] == [0, 255]
    assert card["input"]["resize"]["method"] == "bilinear" and card["input"]["resize"]["antialias"] is True
    assert "grayscale copied to all three channels" in card["input"]["color"]
    assert card["output"]["activation"] == "sigmoid" and card["output"]["positive"] == "covid"
    assert card["decision"]["threshold"] == threshold["threshold"]
    assert card["decision"]["method"] == "youden" and card["decision"]["split"] == "val"
    assert card["training"]["dataset"] == provenance["dataset"]
    assert card["data"]["design"]["name"] == "original"
    assert card["data"]["shortcut"].startswith("Pediatric normals vs adult COVID-19")
    assert isinstance(card["data"]["confounder_warnings"], list) and card["data"]["confounder_warnings"]
    assert card["metrics"]["val"]["n"] == threshold["n"] and "roc_auc" in card["metrics"]["val"]
    assert card["metrics"]["test"] is None
    assert "not a diagnostic device" in card["intended_use"].lower()
    text = (tiny_run / "model_card.md").read_text(encoding="utf-8")
    for needle in ("Not a diagnostic device", "antialias=True", "[0, 255]", "Known shortcut", "threshold **",
                   provenance["dataset"]["fingerprint"], "Confounder warnings"):
        assert needle in text, needle
    assert foreign_entries(tiny_run) == []


def test_load_run_takes_the_threshold_from_model_json(run_copy: Path) -> None:
    card = _card(run_copy)
    card["decision"]["threshold"] = 0.123
    (run_copy / "model.json").write_text(json.dumps(card), encoding="utf-8")
    _, meta = load_run(run_copy)
    assert meta["threshold"] == 0.123 and meta["threshold_source"] == "model.json"
    assert meta["threshold_info"]["threshold"] != 0.123
    (run_copy / "model.json").unlink()
    _, meta = load_run(run_copy)
    assert meta["threshold_source"] == "threshold.json" and meta["threshold"] == meta["threshold_info"]["threshold"]


def test_a_card_of_another_model_file_is_refused(run_copy: Path) -> None:
    card = _card(run_copy)
    card["model"]["sha256"] = "0" * 64
    (run_copy / "model.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ModelError, match=r"model\.json: describes another model file .*--resume"):
        load_run(run_copy)


def test_predict_uses_model_json_threshold(run_copy: Path, tmp_path: Path) -> None:
    image = write_image(tmp_path / "x.png", size=(64, 64))
    p = predict(run_copy, [image], tmp_path / "before")["predictions"]["p_covid"][0]
    card = _card(run_copy)
    card["decision"]["threshold"] = min(1.0, p + 1e-3)
    (run_copy / "model.json").write_text(json.dumps(card), encoding="utf-8")
    result = predict(run_copy, [image], tmp_path / "out")
    row = result["predictions"].iloc[0]
    assert result["threshold_source"] == "model.json"
    assert row["threshold"] == card["decision"]["threshold"] and row["pred"] == "normal"
    card["decision"]["threshold"] = max(0.0, p - 1e-3)
    (run_copy / "model.json").write_text(json.dumps(card), encoding="utf-8")
    assert predict(run_copy, [image], tmp_path / "out")["predictions"]["pred"][0] == "covid"


def test_predict_files_folders_and_a_csv(tiny_run: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_image(src / "folder" / "a.png", seed=1)
    write_image(src / "folder" / "b.jpg", seed=2, mode="RGB")
    write_image(src / "folder" / "deep" / "c16.png", seed=3, mode="I;16")
    (src / "folder" / "corrupt.png").write_bytes(write_image(src / "tmp.png", seed=4).read_bytes()[:120])
    (src / "tmp.png").unlink()
    (src / "folder" / "notes.txt").write_text("not an image")
    (src / "folder" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    write_image(src / "d.png", seed=5)
    write_image(src / "listed" / "e.png", seed=6)
    (src / "list.csv").write_text("path,label\nd.png,normal\nlisted/e.png,\nmissing.png,covid\n", encoding="utf-8")
    before = tree_digest(src)

    result = predict(tiny_run, [src / "folder", src / "d.png", src / "list.csv"], tmp_path / "out")

    table = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False)
    # our columns, then the list's own (label), whose rows keep the path string as the list wrote it
    assert list(table.columns) == ["path", "p_covid", "pred", "threshold", "model", "model_data", "skipped", "heatmap",
                                   "label"]
    assert set(table["model_data"]) == {"SYNTHETIC"}  # tiny_run is trained on the embedded synthetic set
    listed = {r["path"]: r for r in table.to_dict("records")[-3:]}
    assert list(listed) == ["d.png", "listed/e.png", "missing.png"]
    assert [r["label"] for r in listed.values()] == ["normal", "", "covid"]
    rows = {Path(p).name: r for p, r in zip(table["path"][:-3], table.to_dict("records")[:-3], strict=True)}
    rows["e.png"] = listed["listed/e.png"]
    for name in ("a.png", "b.jpg", "c16.png", "d.png", "e.png"):
        row = rows[name]
        assert row["skipped"] == "" and 0.0 <= float(row["p_covid"]) <= 1.0, name
        assert row["pred"] == ("covid" if float(row["p_covid"]) >= row["threshold"] else "normal")
    assert "truncated or corrupt" in rows["corrupt.png"]["skipped"] and rows["corrupt.png"]["p_covid"] == ""
    assert rows["notes.txt"]["skipped"].startswith("not an image file extension")
    assert rows[".DS_Store"]["skipped"].startswith("OS or archive litter")
    assert listed["d.png"]["skipped"].startswith("listed more than once")
    assert listed["missing.png"]["skipped"].startswith("image file not found (list.csv, line 4")
    assert result["labels"] is True
    assert len(table) == 10 and (result["predicted"], result["skipped"]) == (5, 5)
    sha = file_sha256(tiny_run / "model.keras")
    assert set(table["model"]) == {f"{tiny_run.name}@{sha[:12]}"}
    assert set(table["threshold"]) == {_card(tiny_run)["decision"]["threshold"]}
    assert json.loads((tmp_path / "out" / RECORD_NAME).read_text())["verb"] == "predict"
    assert tree_digest(src) == before


def test_predict_on_the_command_line_with_heatmaps(tiny_run: Path, tmp_path: Path, capsys) -> None:
    one, two = write_image(tmp_path / "in" / "one.png", seed=1), write_image(tmp_path / "in" / "two.jpeg", seed=2)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(tiny_run), str(one), str(two), "--out", str(out), "--cam", "auto",
                 "--batch-size", "1"]) == 0
    printed = capsys.readouterr().out
    assert "one.png" in printed and "2 predicted, 0 skipped" in printed and "heatmaps (cam)" in printed
    table = pd.read_csv(out / "predictions.csv")
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == sorted(Path(h).name for h in table["heatmap"])
    assert all(name.startswith(f"heatmaps/{tiny_run.name}__") and "__true-unknown__pred-" in name
               for name in table["heatmap"])


def test_predict_refuses_an_out_holding_a_user_file(tiny_run: Path, tmp_path: Path, capsys) -> None:
    image = write_image(tmp_path / "x.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["predict", "--model", str(tiny_run), str(image), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "notes.txt" in err and "nothing was changed" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_predict_into_the_run_folder_is_refused(run_copy: Path, tmp_path: Path) -> None:
    before = tree_digest(run_copy)
    with pytest.raises(DataError, match=r"contains the source .*model\.keras"):
        predict(run_copy, [write_image(tmp_path / "x.png")], run_copy)
    assert tree_digest(run_copy) == before


def test_nothing_readable_is_one_error_and_nothing_is_written(tiny_run: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    out = tmp_path / "out"
    assert main(["predict", "--model", str(tiny_run), str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "none of the 1 image(s) can be used" in err and "empty file (0 bytes)" in err
    assert not out.exists()
    assert main(["predict", "--model", str(tiny_run), str(tmp_path / "nope.png"), "--out", str(out)]) == 1
    assert "nope.png: no such file or folder" in capsys.readouterr().err


def test_the_test_evaluation_updates_the_model_card(run_copy: Path, tiny_dataset: Path) -> None:
    result = evaluate_model(run_copy, tiny_dataset, n_boot=50)
    assert result["model_card"].startswith("updated")
    test = _card(run_copy)["metrics"]["test"]
    assert test["training_dataset"] is True and test["at_model_threshold"] is True
    assert test["n"] == result["metrics"]["n"] and test["metrics"]["roc_auc"] == result["metrics"]["roc_auc"]
    assert len(test["ci"]["accuracy"]) == 2
    assert "Test on the training dataset's held-out test split" in (run_copy / "model_card.md").read_text()
    assert foreign_entries(run_copy) == []


def test_the_readmes_six_lines_of_plain_keras_give_covidxrays_p_covid(tiny_run: Path, tmp_path: Path) -> None:
    """The README's code block, run as printed (paths swapped for the test's), agrees with `covidxray predict`."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Using a trained model"):]
    block = section[section.index("```python\n") + len("```python\n"):]
    block = block[:block.index("```")]
    assert len(block.strip().splitlines()) == 6
    image = write_image(tmp_path / "xray.png", size=(97, 81), seed=7)
    expected = predict(tiny_run, [image], tmp_path / "out")["predictions"]["p_covid"][0]
    code = block.replace('"runs/vgg16/model.keras"', repr(str(tiny_run / "model.keras"))).replace(
        '"xray.png"', repr(str(image)))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert abs(namespace["p_covid"] - expected) < 1e-5
    assert "runs/vgg16/model.json\"))[\"decision\"][\"threshold\"]" in section
    assert 0.0 <= _card(tiny_run)["decision"]["threshold"] <= 1.0


def test_a_user_file_in_the_run_leaves_its_card_alone_and_evaluate_works(run_copy: Path, tiny_dataset: Path) -> None:
    (run_copy / "notes.txt").write_text("mine")
    card = (run_copy / "model.json").read_bytes()
    result = evaluate_model(run_copy, tiny_dataset, n_boot=50)
    assert result["model_card"].startswith("not updated") and "notes.txt" in result["model_card"]
    assert "Model card: not updated" in result["markdown"]
    assert (run_copy / "eval-test" / "metrics.json").is_file()
    assert (run_copy / "model.json").read_bytes() == card and (run_copy / "notes.txt").read_text() == "mine"
