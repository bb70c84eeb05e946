"""The four notebooks run top to bottom on the synthetic data, with tiny settings, in pipeline order."""

from __future__ import annotations

import json

import nbformat
import pytest
from conftest import REPO

from covidxray.notebooks import NOTEBOOKS, run_notebook

pytestmark = pytest.mark.slow


def _parameter_cells(path):
    nb = nbformat.read(path, as_version=4)
    return [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_each_notebook_has_one_parameters_cell(name):
    assert len(_parameter_cells(REPO / name)) == 1


def test_notebooks_run_top_to_bottom_on_synthetic_data(tmp_path):
    from covidxray.synthetic import make_synthetic_nih

    nih = make_synthetic_nih(tmp_path / "nih", n_patients=30)
    params = {
        "Create_Data.ipynb": {"SOURCES": "synthetic", "SYNTHETIC_PATIENTS": [40, 30], "NIH": str(nih),
                              "PROBE_EPOCHS": 1, "PROBE_IMAGE_SIZE": 32},
        "Train_Scratch_CNN.ipynb": {"EPOCHS": 2, "IMAGE_SIZE": 32, "BATCH_SIZE": 16, "N_BOOT": 50},
        "Train_VGG16.ipynb": {"WEIGHTS": "hed", "EPOCHS": 1, "IMAGE_SIZE": 32, "BATCH_SIZE": 16, "N_BOOT": 50},
        "Class_Activation_Maps.ipynb": {"LIMIT": 4},
    }
    for name in NOTEBOOKS:
        out = run_notebook(REPO / name, tmp_path / name, parameters=params[name], cwd=tmp_path, timeout=600)
        nb = nbformat.read(out, as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, f"{name}: {errors}"
    assert (tmp_path / "dataset" / "manifest.csv").is_file()
    assert (tmp_path / "dataset-adult-normals" / "manifest.csv").is_file()
    assert (tmp_path / "runs" / "probes" / "adult-normals" / "probes.json").is_file()
    assert (tmp_path / "runs" / "scratch" / "model.keras").is_file()
    assert (tmp_path / "runs" / "vgg16" / "model.keras").is_file()
    checks = json.loads((tmp_path / "Class_Activation_Images" / "vgg16__checks.json").read_text())
    assert "randomization" in checks and "attention" in checks
    assert list((tmp_path / "Class_Activation_Images").glob("scratch-gap__*__true-*__pred-*__p*.png"))
