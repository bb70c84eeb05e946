"""The notebooks' helpers: where the data comes from, the synthetic fallback and its small settings, errors worded
for a notebook user, and the tables and figures whose text a reviewer reads."""

from __future__ import annotations

import json

import nbformat
import pandas as pd
import pytest
from conftest import REPO

from covidxray.app.notebook_helpers import (
    FALLBACK_NOTE,
    FOLDER_FIX,
    HEATMAP_NOTEBOOK,
    NOTEBOOK_FIX,
    WEIGHTS_FIX,
    ensure_dataset,
    evaluate_runs,
    heatmap_folder,
    heatmap_runs,
    is_synthetic_dataset,
    notebook_message,
    probes_section,
    resolve_sources,
    run_facts,
    train_in_notebook,
    trained_runs,
    training_settings,
    weights_used,
)
from covidxray.errors import ModelError
from covidxray.evaluation.figures import age_unknown_note, plot_distributions, plot_history
from covidxray.outputs import foreign_entries
from covidxray.runs.train import RunFolderTaken, TrainConfig, train
from covidxray.training.backbones import resolve_vgg16_weights


def test_auto_sources_say_synthetic_in_so_many_words(tmp_path):
    (tmp_path / "Chest_XRAY").mkdir()
    (tmp_path / "Chest_XRAY" / "README.md").write_text("put the data here\n")
    sources = resolve_sources("auto", chest_xray=tmp_path / "Chest_XRAY", covid_xray=tmp_path / "Covid_XRAY",
                              work_dir=tmp_path / "work", synthetic_patients=(8, 6))
    assert sources.description == (f"no data in {(tmp_path / 'Chest_XRAY').as_posix()}/ and "
                                   f"{(tmp_path / 'Covid_XRAY').as_posix()}/: using the embedded SYNTHETIC data; "
                                   "numbers say nothing about X-rays")
    assert sources.chest_xray.is_relative_to(tmp_path / "work")


def test_auto_sources_use_real_folders_when_both_hold_data(synthetic_sources, tmp_path):
    sources = resolve_sources("auto", chest_xray=synthetic_sources.chest_xray,
                              covid_xray=synthetic_sources.covid_xray, work_dir=tmp_path / "work")
    assert sources.chest_xray == synthetic_sources.chest_xray and sources.description.startswith("real downloads")
    assert not (tmp_path / "work").exists()


def test_missing_dataset_is_built_from_synthetic_data_with_small_settings(tmp_path, capsys):
    data = tmp_path / "dataset"
    assert ensure_dataset(data, work_dir=tmp_path / "sources", synthetic_patients=(12, 10)) == data
    assert capsys.readouterr().out.strip() == (f"No dataset at `{data.as_posix()}/`: built one from the embedded "
                                               "synthetic data (run Create_Data.ipynb for real data).")
    assert (data / "manifest.csv").is_file() and is_synthetic_dataset(data)
    ensure_dataset(data, work_dir=tmp_path / "sources")
    assert capsys.readouterr().out == ""  # an existing dataset is used as it is
    assert training_settings(data) == (5, 64)
    assert "**SYNTHETIC** data: training 5 epochs at 64 px (small settings" in capsys.readouterr().out
    assert training_settings(data, 3, 32) == (3, 32)


def test_real_dataset_keeps_the_real_settings(tiny_dataset, tmp_path, capsys):
    assert is_synthetic_dataset(tiny_dataset)  # built from the synthetic sources: the build records it
    other = tmp_path / "older"
    other.mkdir()
    (other / "summary.json").write_text("{}")
    assert not is_synthetic_dataset(other)
    assert training_settings(other) == (20, 224)
    assert capsys.readouterr().out == "training 20 epochs at 224 px\n"


def test_package_errors_are_worded_for_a_notebook(tmp_path):
    with pytest.raises(ModelError) as info:
        resolve_vgg16_weights(str(tmp_path / "missing.h5"))
    text = notebook_message(str(info.value))
    assert "--weights" not in text and 'set `WEIGHTS = "imagenet"`' in text
    assert notebook_message("pass --weights none (got x).") == 'set `WEIGHTS = "none"` (got x).'
    assert notebook_message("or pass `--weights PATH` to that file, or `--weights hed` for") == (
        'or set `WEIGHTS = "path/to/weights.h5"` to that file, or `WEIGHTS = "hed"` for')
    assert notebook_message("epochs (--epochs) is 0; lr (--lr) is 2") == "epochs (`EPOCHS`) is 0; lr (`LR`) is 2"
    assert notebook_message("pass resume=True (--resume) to continue.") == "pass resume=True to continue."
    command = "run `covidxray data --out d` or pass --out"
    assert notebook_message(command) == "run `covidxray data --out d` or set `RUNS`"


def test_train_in_notebook_shows_the_notebook_fix_and_carries_on(tiny_dataset, tmp_path, capsys):
    cfg = TrainConfig(model="vgg16", weights=str(tmp_path / "missing.h5"), epochs=1, image_size=32)
    assert train_in_notebook(cfg, tiny_dataset, tmp_path / "vgg16") is None
    out = capsys.readouterr().out
    assert WEIGHTS_FIX in out and "--weights" not in out and not (tmp_path / "vgg16").exists()
    bad = TrainConfig(model="scratch-gap", weights="none", epochs=0, image_size=32)
    assert train_in_notebook(bad, tiny_dataset, tmp_path / "scratch") is None
    out = capsys.readouterr().out
    assert "epochs (`EPOCHS`) is 0" in out and "parameters cell" in out
    assert trained_runs({"vgg16": tmp_path / "vgg16"}) == {}
    assert "holds no trained model: **vgg16** is left out" in capsys.readouterr().out
    assert run_facts(None) is None
    assert run_facts({"epochs_run": 3, "best_epoch": 2, "other": 1}) == {"epochs_run": 3, "best_epoch": 2}


def test_trained_runs_keep_runs_with_a_model(tiny_run):
    assert trained_runs({"scratch-gap": tiny_run}) == {"scratch-gap": tiny_run}


def test_probe_sections_are_headed_by_the_design_not_the_folder():
    probe = {"what": "x", "accuracy": 0.5, "accuracy_ci": None, "roc_auc": 0.5, "roc_auc_ci": None, "chance": 0.5,
             "n_test": 10, "shortcut": False}
    result = {"data": "dataset-adult-normals", "source": probe, "statistics": probe, "warnings": []}
    text = probes_section({"original": result, "adult-normals": result})
    assert "### original design" in text and "### adult-normals design" in text
    assert "# Shortcut probes" not in text and "dataset-adult-normals" not in text


def test_age_panel_explains_a_class_without_ages(tmp_path):
    df = pd.DataFrame({"label": ["normal"] * 3 + ["covid"] * 2, "source": ["kermany"] * 3 + ["ieee8023"] * 2,
                       "age": [None, None, None, 40.0, 61.0], "split": "train"})
    note = age_unknown_note(df, "normal")
    assert note.startswith("age unknown for all 3 normal images (Kermany files carry no age; the source describes "
                           "children")
    assert "1-5 years" in note and age_unknown_note(df, "covid") is None
    fig = plot_distributions(df, path=tmp_path / "d.png")
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("age unknown for all 3 normal" in t.replace("\n", " ") for t in texts)
    legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert "normal (n=0)" not in legend and "covid (n=2)" in legend


def _tiny(model: str, batch_size: int = 32) -> TrainConfig:
    return TrainConfig(model=model, weights="none", epochs=1, image_size=32, batch_size=batch_size, augment=False)


@pytest.mark.slow  # full suite only: keeps the quick gate under 3 minutes
def test_heatmap_notebook_first_then_training_the_fallback_blocks_nothing(tiny_dataset, tmp_path, capsys):
    """Class_Activation_Maps.ipynb before Train_Scratch_CNN.ipynb: its fallback model goes into a folder of its own,
    so the training notebook trains its runs, the evaluation holds every model, and the heatmaps then explain the
    real run; the fallback folder says who made it, and the data is called SYNTHETIC."""
    runs = {"scratch": tmp_path / "runs" / "scratch", "vgg16": tmp_path / "runs" / "vgg16"}
    fallback = tmp_path / "runs" / "cam-fallback-scratch"
    assert heatmap_runs(runs, tiny_dataset, fallback_epochs=1, image_size=32) == {"scratch": fallback}
    shown = capsys.readouterr().out
    assert "**fallback** scratch model (1 epochs on the embedded **SYNTHETIC** data), trained now" in shown
    assert f"`{fallback.as_posix()}/`, its own folder" in shown
    assert not runs["scratch"].exists()  # the training notebook's folder is left alone
    note = json.loads((fallback / FALLBACK_NOTE).read_text())
    assert note["fallback"] is True and note["made_by"] == HEATMAP_NOTEBOOK
    assert foreign_entries(fallback) == []  # the note is recorded as the package's own file
    heatmap_folder(tiny_dataset, tmp_path / "cams")
    assert "**SYNTHETIC** data: its heatmaps go to" in capsys.readouterr().out
    assert heatmap_runs(runs, tiny_dataset, fallback_epochs=1, image_size=32) == {"scratch": fallback}
    assert "trained earlier" in capsys.readouterr().out  # reused, not trained again

    scratch_runs = {"scratch": runs["scratch"], "scratch-gap": tmp_path / "runs" / "scratch-gap"}
    for name, run in scratch_runs.items():  # the training notebook, with its own batch size
        assert train_in_notebook(_tiny(name), tiny_dataset, run) is not None
    assert "cannot resume" not in capsys.readouterr().out
    rows, _, _ = evaluate_runs(tiny_dataset, trained_runs(scratch_runs), n_boot=10, baseline=False)
    assert [row["model"] for row in rows] == ["scratch", "scratch-gap"]
    card = json.loads((runs["scratch"] / "model.json").read_text())
    # the card knows its test metrics
    assert card["metrics"]["test"]["metrics"]["accuracy"] == pytest.approx(rows[0]["metrics"]["accuracy"])
    assert heatmap_runs(runs, tiny_dataset) == {"scratch": runs["scratch"]}  # now the real run


def test_a_run_with_other_settings_is_refused_naming_the_folder_to_move(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "runs" / "scratch-gap"
    train(_tiny("scratch-gap", batch_size=16), tiny_dataset, run, progress=False)
    with pytest.raises(RunFolderTaken) as info:
        train(_tiny("scratch-gap"), tiny_dataset, run, resume=True, progress=False)
    message = str(info.value)
    assert message.startswith(f"{run}: cannot resume with a different config; changed: ['batch_size']. This folder "
                              "holds another run, trained by `")
    assert "batch_size=16 (this training: 32)" in message and "last epoch saved 20" in message
    assert f"move or rename {run.as_posix()}/ (it is kept as it is) or train into another folder (--out)" in message
    assert train_in_notebook(_tiny("scratch-gap"), tiny_dataset, run) is None
    shown = capsys.readouterr().out
    assert FOLDER_FIX in shown and NOTEBOOK_FIX not in shown and "--out" not in shown
    assert "train into another folder (`RUNS`)" in shown


def _code_cell(notebook: str, marker: str) -> str:
    """The source of the one code cell of a committed notebook that contains ``marker``."""
    nb = nbformat.read(REPO / notebook, as_version=4)
    (source,) = [c.source for c in nb.cells if c.cell_type == "code" and marker in c.source]
    return source


def test_vgg16_training_cell_prints_the_weights_used_and_nothing_when_they_failed(tiny_dataset, tiny_run, tmp_path,
                                                                                  capsys):
    """The committed training cell of Train_VGG16.ipynb, run with weights that cannot be had (as ImageNet offline):
    the Markdown error, and no "backbone weights" line naming the weights that were only asked for."""
    cell = _code_cell("Train_VGG16.ipynb", "train_in_notebook(cfg")
    params = {"DATA": tiny_dataset, "RUNS": str(tmp_path), "WEIGHTS": str(tmp_path / "missing.h5"), "EPOCHS": 1,
              "IMAGE_SIZE": 32, "BATCH_SIZE": 16, "LR": 1e-4, "TRAINABLE_FROM": "block5_conv3", "FINETUNE_EPOCHS": 0,
              "SEED": 0, "AUGMENT": False, "HORIZONTAL_FLIP": False, "PATIENCE": 0, "PRECISION": "float32"}
    scope = {"TrainConfig": TrainConfig, "train_in_notebook": train_in_notebook, "weights_used": weights_used,
             "run_facts": run_facts, **params}
    exec(cell, scope)
    shown = capsys.readouterr().out
    assert WEIGHTS_FIX in shown and "backbone weights" not in shown and scope["USED_WEIGHTS"] is None
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert weights_used(summary) == "none" and weights_used(None) is None
    assert weights_used({"weights": {"spec": "hed", "path": None, "layers": 13}}) == "hed"


def test_history_plot_has_no_stage_panel_and_marks_the_stage_change(tmp_path):
    history = pd.DataFrame({"epoch": [1, 2, 3, 4], "stage": [1, 1, 2, 2], "lr": [1e-4, 1e-4, 1e-5, 1e-5],
                            "loss": [0.9, 0.7, 0.6, 0.5], "val_loss": [1.0, 0.8, 0.7, 0.7],
                            "accuracy": [0.5, 0.5, 0.5, 0.5], "val_accuracy": [0.5, 0.5, 0.5, 0.5],
                            "auc": [0.5, 0.6, 0.7, 0.8], "val_auc": [0.5, 0.55, 0.6, 0.7]})
    fig = plot_history(history, path=tmp_path / "history.png")
    assert [ax.get_title() for ax in fig.axes] == ["loss", "auc"]  # no stage panel, no flat accuracy panel
    for ax in fig.axes:
        assert "stage 2 from epoch 3" in [t.get_text() for t in ax.get_legend().get_texts()]
    one_stage = plot_history(history.assign(stage=1))
    assert "stage" not in [ax.get_title() for ax in one_stage.axes]
    assert not any("stage" in t.get_text() for ax in one_stage.axes for t in ax.get_legend().get_texts())
    assert [ax.get_title() for ax in plot_history(history.head(1)).axes] == ["loss", "accuracy", "auc"]
