"""Execute the project's notebooks with parameters (papermill), for the tests and for the rendered copies.

``python -m covidxray.notebooks --shared ../shared/data`` re-renders the committed notebooks from the real
runs on ``../shared/data``: the 2020 images, laid out again as the two public sources and split by patient.
It renders from a clean slate, in data-flow order: it refuses while ``dataset/``, ``runs/scratch`` etc. hold
results of an earlier run (a finished run would be reused, not retrained), unless ``--fresh`` moves them aside
into ``runs/before-render-<time>/`` (nothing is deleted). After each notebook, papermill's
``injected-parameters`` cell (which names paths on the rendering machine) is replaced by a Markdown cell saying
what the rendered run used, so the committed notebook keeps its defaults and runs as it is on a fresh clone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from covidxray.errors import DataError
from covidxray.outputs import KEPT_NAMES, claim_output, foreign_entries, refusal

NOTEBOOKS: tuple[str, ...] = (
    "Create_Data.ipynb",
    "Train_Scratch_CNN.ipynb",
    "Train_VGG16.ipynb",
    "Class_Activation_Maps.ipynb",
)
"""In pipeline order: each one uses what the previous ones wrote."""

RESULTS: dict[str, tuple[str, ...]] = {
    "Create_Data.ipynb": ("dataset", "dataset-original-split", "dataset-adult-normals", "runs/sources",
                          "runs/probes"),
    "Train_Scratch_CNN.ipynb": ("runs/scratch", "runs/scratch-gap"),
    "Train_VGG16.ipynb": ("runs/vgg16",),
    "Class_Activation_Maps.ipynb": (),
}
"""Folders (relative to the repository root) each notebook writes with its default parameters; a render starts
with all of them empty. Class_Activation_Images/ is committed: the notebook replaces the files it wrote there."""
CAM_DIR = "Class_Activation_Images"
NOTE_TAG = "rendered-parameters"
"""Tag of the Markdown cell that replaces papermill's ``injected-parameters`` cell."""
INJECTED_TAG = "injected-parameters"

SHARED_NOTES: dict[str, str] = {
    "SEED_DATASET": "the 2020 project's `Dataset/` folder",
    "SEED_METADATA": "the 2020 ieee8023 `metadata.csv` those COVID images were selected from",
    "NIH": "the NIH ChestX-ray14 sample, as adult normals",
}
"""What each path parameter of the rendered run stands for (the note names these, never the machine's path)."""


_TF_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWE]\d{4} \d\d:\d\d:\d\d|"
                       r"To enable the following instructions|WARNING:tensorflow:.*retracing)")


def strip_tf_noise(path: str | Path) -> None:
    """Drop TensorFlow's C++ start-up log lines (oneDNN, CUDA probing, graph attribute notices) from the
    notebook's stderr outputs: TensorFlow 2.21 writes them whatever TF_CPP_MIN_LOG_LEVEL says, and they carry
    no information about the run. Every other output is kept as it is."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                lines = [ln for ln in out["text"].splitlines(keepends=True) if not _TF_NOISE.match(ln)]
                if not "".join(lines).strip():
                    continue
                out["text"] = "".join(lines)
            kept.append(out)
        cell["outputs"] = kept
    nbformat.write(nb, str(path))


def run_notebook(
    notebook: str | Path,
    output: str | Path,
    *,
    parameters: dict[str, Any] | None = None,
    cwd: str | Path | None = None,
    timeout: int | None = None,
) -> Path:
    """Execute ``notebook`` top to bottom with ``parameters`` injected after its ``parameters`` cell."""
    import papermill

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MPLBACKEND", "Agg")
    papermill.execute_notebook(str(notebook), str(output), parameters=parameters or {}, kernel_name="python3",
                               cwd=None if cwd is None else str(cwd), progress_bar=False,
                               execution_timeout=timeout)
    strip_tf_noise(output)
    return Path(output)


def shared_parameters(shared: str) -> dict[str, dict[str, Any]]:
    """The parameters of the rendered run: the 2020 images split by patient, NIH adult normals for the second
    design, the real training settings (224 px, 20 epochs) in bfloat16 (as the multi-seed results behind the README's
    tables; on a CPU without bf16 instructions it is emulated and slow), hed VGG16 weights, the default heatmap
    sample."""
    seed = f"{shared}/seed-dataset"
    meta = f"{shared}/ieee8023-metadata/metadata-early.csv"
    real = {"EPOCHS": 20, "IMAGE_SIZE": 224, "PRECISION": "bfloat16"}
    return {
        "Create_Data.ipynb": {"SOURCES": "seed", "SEED_DATASET": seed, "SEED_METADATA": meta, "VIEWS": ["PA"],
                              "NIH": f"{shared}/nih14-sample"},
        "Train_Scratch_CNN.ipynb": dict(real),
        "Train_VGG16.ipynb": {"WEIGHTS": "hed", **real},
        "Class_Activation_Maps.ipynb": {},
    }


def _literal(value: Any) -> str:
    """``value`` as Python source (strings in double quotes, as papermill writes them)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


AS_COMMITTED: dict[str, str] = {
    "Create_Data.ipynb": "uses your data in `Chest_XRAY/` and `Covid_XRAY/`, else the embedded synthetic data",
    "Train_Scratch_CNN.ipynb": "trains on `dataset/` (from Create_Data.ipynb; built from the embedded synthetic "
                               "data when missing), with small settings when that data is synthetic",
    "Train_VGG16.ipynb": "trains on `dataset/` (from Create_Data.ipynb; built from the embedded synthetic data when "
                         "missing), with small settings when that data is synthetic",
    "Class_Activation_Maps.ipynb": "explains the models in `runs/` (a small one is trained on the synthetic data "
                                   "when there is none)",
}
"""What each notebook does when it is run as committed, with the defaults of its parameters cell."""


def rendered_note(name: str, parameters: Mapping[str, Any], shared: str,
                  notes: Mapping[str, str] = SHARED_NOTES) -> str:
    """The Markdown that says which parameters produced a rendered notebook's outputs, without any machine path:
    a value inside ``shared`` is named by what it is (``notes``), every other value is shown as Python."""
    root = shared.rstrip("/") + "/"
    parts = []
    for key, value in parameters.items():
        if isinstance(value, str) and (value == shared or value.startswith(root)):
            parts.append(f"`{key}` = {notes.get(key, 'a file')} (from the shared data folder beside the checkout)")
        else:
            parts.append(f"`{key} = {_literal(value)}`")
    used = ", ".join(parts) if parts else "the defaults above"
    return (f"*Rendered for the README with {used}; the outputs below are that run's. Run as committed, with the "
            f"defaults above, the notebook {AS_COMMITTED.get(name, 'uses the defaults above')}.*")


def replace_injected_cell(path: str | Path, note: str) -> None:
    """Replace papermill's ``injected-parameters`` cell of a rendered notebook by a Markdown cell with ``note``
    (an earlier note cell is dropped; with no injected cell the note goes after the ``parameters`` cell), and
    drop the parameter values and paths papermill records in the notebook's metadata. Outputs stay as they are."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    old_ids = [c.get("id") for c in nb.cells if NOTE_TAG in c.metadata.get("tags", [])]
    cells = [c for c in nb.cells if NOTE_TAG not in c.metadata.get("tags", [])]
    tags = [c.metadata.get("tags", []) for c in cells]
    at = next((i for i, t in enumerate(tags) if INJECTED_TAG in t), None)
    if at is None:
        params = next((i for i, t in enumerate(tags) if "parameters" in t), None)
        if params is None:
            raise DataError(f"{path}: no cell tagged 'parameters'; tag the notebook's parameters cell.")
        cells.insert(params + 1, None)
        at = params + 1
    cells[at] = nbformat.v4.new_markdown_cell(note, metadata={"tags": [NOTE_TAG]})
    if old_ids and old_ids[0]:
        cells[at]["id"] = old_ids[0]  # a re-render keeps the cell's id: no churn in the diff
    nb.cells = cells
    papermill = nb.metadata.get("papermill")
    if papermill is not None:
        for key in ("parameters", "input_path", "output_path"):
            papermill.pop(key, None)
    nbformat.write(nb, str(path))


def earlier_results(names: Sequence[str], root: str | Path = ".") -> list[Path]:
    """The result folders of ``names`` (see RESULTS) that hold anything besides a kept README.md."""
    root = Path(root)
    found = []
    for name in names:
        found += [root / rel for rel in RESULTS[name] if _holds_results(root / rel)]
    return found


def _holds_results(folder: Path) -> bool:
    """True when ``folder`` is a link or a file, or a folder with an entry besides a kept README.md."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        return True
    return folder.is_dir() and any(e.name not in KEPT_NAMES or not e.is_file() for e in folder.iterdir())


def move_aside(folders: Sequence[Path], root: str | Path = ".", *, stamp: str | None = None) -> Path:
    """Move the entries of ``folders`` (a kept README.md stays) into ``runs/before-render-<stamp>/<folder name>``
    and return that folder. Nothing is deleted: each folder's ownership record moves with its files, so every
    moved folder is again an output the tool recognises (named as a child in the new folder's record)."""
    root = Path(root)
    stamp = stamp or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = root / "runs" / f"before-render-{stamp}"
    names = [folder.name for folder in folders]
    if len(set(names)) != len(names):
        raise DataError(f"cannot move aside two folders of the same name: {names}")
    with claim_output(aside, "render", flag="--fresh") as out:
        for folder in folders:
            target = aside / folder.name
            if folder.is_symlink() or not folder.is_dir():
                shutil.move(str(folder), str(target))
            else:
                target.mkdir()
                for entry in sorted(folder.iterdir()):
                    if entry.name in KEPT_NAMES and entry.is_file() and not entry.is_symlink():
                        continue
                    shutil.move(str(entry), str(target / entry.name))
                if not any(folder.iterdir()):
                    folder.rmdir()
            out.add_child(folder.name)
    return aside


def prepare_clean_slate(names: Sequence[str], root: str | Path = ".", *, fresh: bool = False) -> Path | None:
    """Make sure the notebooks ``names`` render into empty result folders: refuse (DataError) while earlier
    results are there, unless ``fresh``, which moves them aside (see :func:`move_aside`); returns where they went.
    Entries of Class_Activation_Images/ that the tool did not write are refused either way (the notebook would
    refuse them after an hour of training)."""
    root = Path(root)
    if "Class_Activation_Maps.ipynb" in names:
        foreign = foreign_entries(root / CAM_DIR)
        if foreign:
            raise refusal(root / CAM_DIR, foreign, flag="the heatmap folder")
    found = earlier_results(names, root)
    if not found:
        return None
    if not fresh:
        listed = ", ".join(f"{p.relative_to(root).as_posix()}/" for p in found)
        raise DataError(f"earlier results in {listed}: a render must start from empty folders (a finished run "
                        "would be reused, not retrained). Pass --fresh to move them aside into "
                        "runs/before-render-<time>/ (nothing is deleted), or move them yourself.")
    return move_aside(found, root)


def render(names: Sequence[str], shared: str, *, fresh: bool = False, root: str | Path = ".") -> None:
    """Render ``names`` in place, in data-flow order, from a clean slate, with the parameters of the real run;
    each rendered notebook gets its note instead of papermill's injected cell."""
    order = [n for n in NOTEBOOKS if n in names]
    root = Path(root)
    if "Create_Data.ipynb" not in order and not (root / "dataset" / "manifest.csv").is_file():
        raise DataError(f"{root / 'dataset'}: no dataset; render Create_Data.ipynb first (the other notebooks "
                        "would build a synthetic one).")
    aside = prepare_clean_slate(order, root, fresh=fresh)
    if aside is not None:
        print(f"earlier results moved to {aside}/", flush=True)
    params = shared_parameters(shared)
    for name in order:
        print(f"executing {name}", flush=True)
        path = root / name
        run_notebook(path, path, parameters=params[name], cwd=root)
        replace_injected_cell(path, rendered_note(name, params[name], shared))


def main(argv: list[str] | None = None) -> int:
    """Render every notebook in place with the parameters of the real run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default="../shared/data", help="the folder with seed-dataset/ etc.")
    parser.add_argument("--only", nargs="*", default=None, choices=NOTEBOOKS,
                        help="notebook file names (default: all; always run in data-flow order)")
    parser.add_argument("--fresh", action="store_true",
                        help="move earlier results aside into runs/before-render-<time>/ before rendering")
    args = parser.parse_args(argv)
    try:
        render(args.only or NOTEBOOKS, args.shared, fresh=args.fresh)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
