"""The four notebooks: as committed they carry no machine path and run top to bottom in a fresh clone; with
injected parameters they run on the synthetic data; the render starts from a clean slate."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nbformat
import pytest
from conftest import REPO, fresh_clone, tree_digest

from covidxray.app.render_notebooks import (
    INJECTED_TAG,
    NOTE_TAG,
    NOTEBOOKS,
    WIDGET_VIEW,
    prepare_clean_slate,
    render,
    rendered_note,
    replace_injected_cell,
    run_notebook,
    shared_parameters,
    strip_render_noise,
)
from covidxray.errors import DataError
from covidxray.outputs import RECORD_NAME, claim_output, foreign_entries
from covidxray.paths import SYNTHETIC_CAM_DIR

SYNTHETIC_LINE = ("no data in Chest_XRAY/ and Covid_XRAY/: using the embedded SYNTHETIC data; numbers say nothing "
                  "about X-rays")


def _parameter_cells(path):
    nb = nbformat.read(path, as_version=4)
    return [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]


def _text_outputs(nb) -> str:
    """Every text a notebook's code cells showed (streams, plain text, Markdown), joined."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            parts.append(out.get("text", ""))
            data = out.get("data", {})
            parts += [data.get("text/plain", ""), data.get("text/markdown", "")]
    return "\n".join(p if isinstance(p, str) else "".join(p) for p in parts)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_each_notebook_has_one_parameters_cell(name):
    assert len(_parameter_cells(REPO / name)) == 1


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_names_no_machine_path_and_has_no_injected_cell(name):
    text = (REPO / name).read_text(encoding="utf-8")
    assert "../shared" not in text and "shared/data" not in text
    nb = nbformat.read(REPO / name, as_version=4)
    assert not [c for c in nb.cells if INJECTED_TAG in c.metadata.get("tags", [])]
    assert "parameters" not in nb.metadata.get("papermill", {})


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_holds_no_widget_state(name):
    """A saved progress-bar widget shows readers a bar frozen at 0 %: the render strips them."""
    nb = nbformat.read(REPO / name, as_version=4)
    assert "widgets" not in nb.metadata
    assert not [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
                if WIDGET_VIEW in out.get("data", {})]


def test_render_pass_strips_widgets_and_tensorflow_noise_with_the_cli_filter_and_keeps_the_rest(tmp_path):
    path = tmp_path / "nb.ipynb"
    nb = nbformat.v4.new_notebook()
    bar = nbformat.v4.new_output("display_data", data={WIDGET_VIEW: {"model_id": "abc"},
                                                       "text/plain": "bootstrap:   0%|          | 0/2000"})
    noise = nbformat.v4.new_output("stream", name="stderr", text=(
        "I0000 00:00:1796649938.740790    8737 cpu_feature_guard.cc:210] This TensorFlow binary is optimized to "
        "use available CPU instructions\n"))
    real = nbformat.v4.new_output("stream", name="stderr", text="WARNING:tensorflow:5 out of the last 5 calls to "
                                  "<function f> triggered tf.function retracing.\n")
    kept = nbformat.v4.new_output("stream", name="stdout", text="epoch 1/5\n")
    nb.cells = [nbformat.v4.new_code_cell("run()", outputs=[bar, noise, real, kept])]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nbformat.write(nb, str(path))
    strip_render_noise(path)
    cleaned = nbformat.read(path, as_version=4)
    assert "widgets" not in cleaned.metadata
    # the one TensorFlow filter (covidxray.tfenv): start-up noise goes, a retracing warning is a real one and stays
    assert [out.get("text") for out in cleaned.cells[0].outputs] == [real["text"], "epoch 1/5\n"]


def test_render_execution_numbers_cells_consecutively_with_no_tcp_warning_and_no_widgets(tmp_path, capfd):
    """A tiny notebook through the renderer's own steps (execute, then the injected cell becomes the note): the
    counts run 1, 2, 3 with no gap where the injected cell was, ipykernel has nothing to say about unencrypted TCP
    (the kernel talks over IPC), and no widget output or widget state is kept."""
    pytest.importorskip("ipywidgets")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("X = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_markdown_cell("text"),
                nbformat.v4.new_code_cell("import os\nprint(X, os.getcwd())"),
                nbformat.v4.new_code_cell("import ipywidgets\nfrom IPython.display import display\n"
                                          "display(ipywidgets.IntProgress(value=3, max=10))\nX + 1")]
    source, out = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, str(source))
    (tmp_path / "work").mkdir()  # the kernel runs in another folder than this process
    run_notebook(source, out, parameters={"X": 2}, cwd=tmp_path / "work", timeout=120)
    replace_injected_cell(out, rendered_note("x.ipynb", {"X": 2}, "S"))
    done = nbformat.read(out, as_version=4)
    code = [c for c in done.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == [1, 2, 3]
    assert code[1].outputs[0]["text"] == f"2 {tmp_path / 'work'}\n"
    assert [o["execution_count"] for o in code[2].outputs if o["output_type"] == "execute_result"] == [3]
    assert not [o for c in code for o in c.outputs if WIDGET_VIEW in o.get("data", {})]
    assert "widgets" not in done.metadata
    printed = capfd.readouterr()
    assert "without encryption" not in printed.err + printed.out + out.read_text(encoding="utf-8")
    assert not list(tmp_path.rglob("kernel-*"))  # the IPC sockets lived in a private folder, now gone


def _rendered_like(path: Path) -> Path:
    """A small notebook as papermill leaves it: parameters cell, injected cell, one output."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('DATA = None', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell('# Parameters\nDATA = "../shared/data/seed-dataset"\n',
                                          metadata={"tags": [INJECTED_TAG]}),
                nbformat.v4.new_code_cell("print(1)", outputs=[nbformat.v4.new_output("stream", text="1\n")])]
    nb.metadata["papermill"] = {"parameters": {"DATA": "../shared/data/seed-dataset"}}
    nbformat.write(nb, str(path))
    return path


def test_injected_cell_becomes_a_note_without_paths_and_outputs_stay(tmp_path):
    path = _rendered_like(tmp_path / "n.ipynb")
    note = rendered_note("Create_Data.ipynb", {"SEED_DATASET": "../shared/data/seed-dataset", "VIEWS": ["PA"],
                                               "SOURCES": "seed"}, "../shared/data")
    assert "shared/data" not in note and '`VIEWS = ["PA"]`' in note and '`SOURCES = "seed"`' in note
    assert "the 2020 project's `Dataset/` folder" in note
    ids = set()
    for _ in range(2):  # a second run (a re-render of a rendered notebook) keeps one note, with the same id
        replace_injected_cell(path, note)
        ids.add(nbformat.read(path, as_version=4).cells[1]["id"])
    assert len(ids) == 1
    nb = nbformat.read(path, as_version=4)
    assert [c.cell_type for c in nb.cells] == ["code", "markdown", "code"]
    assert nb.cells[1].metadata["tags"] == [NOTE_TAG] and nb.cells[1].source == note
    assert nb.cells[2].outputs[0]["text"] == "1\n"
    assert "../shared" not in path.read_text(encoding="utf-8")


def test_render_passes_the_real_training_settings():
    params = shared_parameters("S")
    for name in ("Train_Scratch_CNN.ipynb", "Train_VGG16.ipynb"):
        assert params[name]["EPOCHS"] == 20 and params[name]["IMAGE_SIZE"] == 224
    assert params["Train_VGG16.ipynb"]["WEIGHTS"] == "hed"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_rendered_parameter_is_one_of_the_notebooks_parameters(name):
    """A rendered parameter the notebook does not define would be injected and silently ignored."""
    cell = next(c for c in nbformat.read(REPO / name, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    defined = {line.split("=", 1)[0].strip() for line in cell.source.splitlines() if "=" in line}
    assert set(shared_parameters("S")[name]) <= defined


def _earlier_render(root: Path) -> None:
    """What an earlier render leaves: a dataset (the repository's README kept), a training run, a user's file."""
    (root / "dataset").mkdir(parents=True)
    (root / "dataset" / "README.md").write_text("kept\n")
    with claim_output(root / "dataset", "data") as out:
        out.write_text("manifest.csv", "path,label,split\n")
    with claim_output(root / "runs" / "scratch", "train") as out:
        out.write_text("summary.json", "{}\n")
    (root / "runs" / "scratch-gap").mkdir(parents=True)
    (root / "runs" / "scratch-gap" / "notes.txt").write_text("the user's\n")


def test_render_refuses_earlier_results_and_fresh_moves_them_aside(tmp_path):
    _earlier_render(tmp_path)
    before = tree_digest(tmp_path)
    fix = r"--fresh \(make notebooks FRESH=1\)"
    with pytest.raises(DataError, match=r"dataset/, runs/scratch/, runs/scratch-gap/.*" + fix):
        prepare_clean_slate(NOTEBOOKS, tmp_path)
    assert tree_digest(tmp_path) == before
    aside = prepare_clean_slate(NOTEBOOKS, tmp_path, fresh=True)
    assert aside.parent == tmp_path / "runs" and aside.name.startswith("before-render-")
    assert sorted(p.name for p in aside.iterdir()) == [RECORD_NAME, "dataset", "scratch", "scratch-gap"]
    assert (tmp_path / "dataset" / "README.md").read_text() == "kept\n"
    assert not (tmp_path / "runs" / "scratch").exists() and not (tmp_path / "runs" / "scratch-gap").exists()
    prefix = f"runs/{aside.name}/"
    moved = {k.removeprefix(prefix): v for k, v in tree_digest(tmp_path).items() if k.startswith(prefix)}
    moved.pop(RECORD_NAME)
    assert moved == {k.removeprefix("runs/"): v for k, v in before.items() if k != "dataset/README.md"}
    assert foreign_entries(aside) == ["scratch-gap/notes.txt"]  # the tool's outputs stay recognised as its own
    assert prepare_clean_slate(NOTEBOOKS, tmp_path) is None


def test_render_refuses_foreign_heatmaps_and_a_missing_dataset(tmp_path):
    (tmp_path / "Class_Activation_Images").mkdir()
    (tmp_path / "Class_Activation_Images" / "mine.png").write_bytes(b"x")
    with pytest.raises(DataError, match="mine.png"):
        prepare_clean_slate(["Class_Activation_Maps.ipynb"], tmp_path, fresh=True)
    with pytest.raises(DataError, match="render Create_Data.ipynb first"):
        render(["Train_Scratch_CNN.ipynb"], "S", root=tmp_path)


@pytest.mark.slow
def test_notebooks_run_top_to_bottom_on_synthetic_data(tmp_path):
    from covidxray.data.synthetic import make_synthetic_nih

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
        replace_injected_cell(out, rendered_note(name, params[name], str(tmp_path)))  # as the render does
        text = out.read_text(encoding="utf-8")
        assert INJECTED_TAG not in text and str(nih) not in text and str(tmp_path) not in text
    assert (tmp_path / "dataset" / "manifest.csv").is_file()
    assert (tmp_path / "dataset-adult-normals" / "manifest.csv").is_file()
    assert (tmp_path / "runs" / "probes" / "adult-normals" / "probes.json").is_file()
    assert (tmp_path / "runs" / "scratch" / "model.keras").is_file()
    assert (tmp_path / "runs" / "vgg16" / "model.keras").is_file()
    cams = tmp_path / SYNTHETIC_CAM_DIR  # the synthetic data's heatmaps, never Class_Activation_Images/
    checks = json.loads((cams / "vgg16__checks.json").read_text())
    assert "randomization" in checks and "attention" in checks
    assert list(cams.glob("scratch__*__true-*__pred-*__p*.png"))  # the table models (Grad-CAM)
    assert not (tmp_path / "Class_Activation_Images").exists()


@pytest.mark.slow
def test_committed_notebooks_run_as_they_are_in_a_fresh_clone(tmp_path, monkeypatch):
    """No parameter injection: each committed notebook, in data-flow order, in a copy of the repository with
    nothing beside it, falls back to the synthetic data with small settings and says so."""
    from nbclient import NotebookClient

    clone = fresh_clone(tmp_path / "clone")
    assert not (clone.parent / "shared").exists()
    committed = tree_digest(clone)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))  # no cached ImageNet weights
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    texts, seconds = {}, {}
    for name in NOTEBOOKS:
        nb = nbformat.read(clone / name, as_version=4)
        start = time.perf_counter()
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(clone)}}).execute()
        seconds[name] = round(time.perf_counter() - start, 1)
        texts[name] = _text_outputs(nb)
    print("seconds per notebook:", seconds)
    assert SYNTHETIC_LINE in texts["Create_Data.ipynb"]
    assert "### original design" in texts["Create_Data.ipynb"]
    for name in ("Train_Scratch_CNN.ipynb", "Train_VGG16.ipynb"):
        assert "**SYNTHETIC** data: training 5 epochs at 64 px" in texts[name]
    assert "[covidxray.runs.train] epoch 5/5 - " in texts["Train_Scratch_CNN.ipynb"]  # one progress line per epoch
    assert (clone / "runs" / "scratch" / "model.keras").is_file()
    assert (clone / "runs" / "scratch-gap" / "model.keras").is_file()
    if not (clone / "runs" / "vgg16" / "model.keras").is_file():  # offline: no ImageNet weights
        assert '`WEIGHTS` in the parameters cell (`"hed"` works offline' in texts["Train_VGG16.ipynb"]
        assert "--weights" not in texts["Train_VGG16.ipynb"]
    assert "'scratch'" in texts["Class_Activation_Maps.ipynb"]
    assert f"heatmaps go to `{SYNTHETIC_CAM_DIR.as_posix()}/`" in texts["Class_Activation_Maps.ipynb"]
    assert list((clone / SYNTHETIC_CAM_DIR).glob("scratch__*__true-*__pred-*__p*.png"))
    after = tree_digest(clone)
    assert {rel: after.get(rel) for rel in committed} == committed  # no committed file changed or went away
