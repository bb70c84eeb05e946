"""The notebooks' helpers: where the data comes from, the synthetic fallback and its small settings, errors worded
for a notebook user, and the tables and figures whose text a reviewer reads."""

from __future__ import annotations

import pandas as pd
import pytest

from covidxray.app.notebook_helpers import (
    WEIGHTS_FIX,
    ensure_dataset,
    is_synthetic_dataset,
    notebook_message,
    probes_section,
    resolve_sources,
    run_facts,
    train_in_notebook,
    trained_runs,
    training_settings,
)
from covidxray.errors import ModelError
from covidxray.evaluation.figures import age_unknown_note, plot_distributions
from covidxray.runs.train import TrainConfig
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
