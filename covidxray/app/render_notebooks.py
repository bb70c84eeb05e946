"""Execute the project's notebooks with parameters (papermill), for the tests and for the rendered copies.

``python -m covidxray.app.render_notebooks --shared ../shared/data`` re-renders the committed notebooks from the real
runs on ``../shared/data``: the 2020 images, laid out again as the two public sources and split by patient.
It renders from a clean slate, in data-flow order: it refuses while ``dataset/``, ``runs/scratch`` etc. hold
results of an earlier run (a finished run would be reused, not retrained), unless ``--fresh`` moves them aside
into ``runs/before-render-<time>/`` (nothing is deleted). After each notebook, papermill's
``injected-parameters`` cell (which names paths on the rendering machine) is replaced by a Markdown cell saying
what the rendered run used, so the committed notebook keeps its defaults and runs as it is on a fresh clone.

The committed files change only when every notebook succeeded: a missing or incomplete ``--shared`` folder is
refused before any work, and the notebooks execute into a staging folder, ``runs/render-<time>/`` (the heatmap
notebook writes into a copy of ``Class_Activation_Images/`` there), whose files are swapped into place at the end.
A failed render says which notebook failed and replaces nothing; its staging folder stays for inspection.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from covidxray.errors import CovidXrayError, DataError
from covidxray.outputs import KEPT_NAMES, atomic_write, claim_output, foreign_entries, refusal
from covidxray.tfenv import noise_pattern

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
    "Class_Activation_Maps.ipynb": ("runs/cam-fallback-scratch",),
}
"""Folders (relative to the repository root) each notebook writes with its default parameters; a render starts
with all of them empty. Class_Activation_Images/ is committed: see COMMITTED_OUTPUTS."""
CAM_DIR = "Class_Activation_Images"
COMMITTED_OUTPUTS: dict[str, dict[str, str]] = {"Class_Activation_Maps.ipynb": {"OUT": CAM_DIR}}
"""Committed folders a notebook writes, by the parameter that names each: a render points that parameter at a
copy in its staging folder and swaps the copy in only when every notebook succeeded."""
RENDER_PREFIX = "render-"
"""Staging folders of renders: ``runs/render-<time>/`` (git-ignored)."""
SHARED_FIX = ("pass the folder that holds seed-dataset/, ieee8023-metadata/metadata-early.csv and nih14-sample/ "
              "(make notebooks SHARED=DIR)")
NOTE_TAG = "rendered-parameters"
"""Tag of the Markdown cell that replaces papermill's ``injected-parameters`` cell."""
INJECTED_TAG = "injected-parameters"

SHARED_NOTES: dict[str, str] = {
    "SEED_DATASET": "the 2020 project's `Dataset/` folder",
    "SEED_METADATA": "the 2020 ieee8023 `metadata.csv` those COVID images were selected from",
    "NIH": "the NIH ChestX-ray14 sample, as adult normals",
}
"""What each path parameter of the rendered run stands for (the note names these, never the machine's path)."""


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
"""The output type of a live Jupyter widget (a tqdm bar): a rendered file can only show it frozen, so never kept."""


def strip_render_noise(path: str | Path) -> None:
    """Drop what a rendered notebook cannot show truthfully: the lines of TensorFlow's start-up noise from the
    stderr outputs (the command line's own filter, :func:`covidxray.tfenv.noise_pattern`: real errors such as an
    out-of-memory line or a retracing warning stay), and saved widget state and widget outputs (progress bars a
    reader would see frozen at 0 %). Every other output is kept as it is."""
    import nbformat

    noise = re.compile(noise_pattern())
    nb = nbformat.read(str(path), as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if WIDGET_VIEW in out.get("data", {}):
                continue
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                lines = [ln for ln in out["text"].splitlines(keepends=True) if not noise.match(ln.rstrip("\n"))]
                if not "".join(lines).strip():
                    continue
                out["text"] = "".join(lines)
            kept.append(out)
        cell["outputs"] = kept
    nbformat.write(nb, str(path))


def kernel_config(sockets: str | Path | None) -> Any:
    """The kernel manager's settings for a render: with ``sockets`` (a private folder, on a POSIX system), the
    kernel talks over IPC sockets there instead of unencrypted TCP on localhost, so ipykernel has no reason to warn
    ("Kernel is running over TCP without encryption") on every run; the socket paths are absolute, since the
    kernel runs in the notebook's folder and the client in this one."""
    from traitlets.config import Config

    if sockets is None:
        return Config()
    return Config({"KernelManager": {"transport": "ipc", "ip": str(Path(sockets).resolve() / "kernel")}})


def run_notebook(
    notebook: str | Path,
    output: str | Path,
    *,
    parameters: dict[str, Any] | None = None,
    cwd: str | Path | None = None,
    timeout: int | None = None,
) -> Path:
    """Execute ``notebook`` top to bottom with ``parameters`` injected after its ``parameters`` cell; the kernel
    talks over private IPC sockets (see :func:`kernel_config`), widget state is never stored, and the noise a
    rendered file cannot show truthfully is stripped (:func:`strip_render_noise`)."""
    import papermill

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MPLBACKEND", "Agg")
    with tempfile.TemporaryDirectory(prefix="covidxray-kernel-") as sockets:
        papermill.execute_notebook(str(notebook), str(output), parameters=parameters or {}, kernel_name="python3",
                                   cwd=None if cwd is None else str(cwd), progress_bar=False,
                                   execution_timeout=timeout, store_widget_state=False,
                                   config=kernel_config(sockets if os.name == "posix" else None))
    strip_render_noise(output)
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
    "Class_Activation_Maps.ipynb": "explains the models in `runs/` (with none, a small fallback model trained into "
                                   "`runs/cam-fallback-scratch/`, never into a training notebook's folder); "
                                   "heatmaps of the synthetic data go to `runs/Class_Activation_Images-synthetic/`, "
                                   "never over the committed ones",
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


def renumber_executions(nb: Any) -> None:
    """Number the executed code cells of ``nb`` 1, 2, 3, ... in order (their ``execute_result`` outputs too): a
    replaced injected cell leaves no gap (In [1] then In [3]). Cells that never ran keep no number."""
    count = 0
    for cell in nb.cells:
        if cell.cell_type != "code" or cell.get("execution_count") is None:
            continue
        count += 1
        cell["execution_count"] = count
        for out in cell.get("outputs", []):
            if out.get("output_type") == "execute_result":
                out["execution_count"] = count


def replace_injected_cell(path: str | Path, note: str) -> None:
    """Replace papermill's ``injected-parameters`` cell of a rendered notebook by a Markdown cell with ``note``
    (an earlier note cell is dropped; with no injected cell the note goes after the ``parameters`` cell), number
    the executed cells consecutively again (:func:`renumber_executions`), and drop the parameter values and paths
    papermill records in the notebook's metadata. Outputs stay as they are."""
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
    renumber_executions(nb)
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
                        "would be reused, not retrained). Pass --fresh (make notebooks FRESH=1) to move them aside "
                        "into runs/before-render-<time>/ (nothing is deleted), or move them yourself.")
    return move_aside(found, root)


class RenderError(CovidXrayError):
    """A notebook of a render failed; nothing committed was replaced."""


def check_shared(parameters: Mapping[str, Mapping[str, Any]], shared: str) -> None:
    """Refuse (DataError), before any work, a ``shared`` folder that lacks a file or folder that ``parameters``
    (per notebook) point into; with none pointing into it (only Create_Data.ipynb reads it), nothing is checked."""
    root = shared.rstrip("/") + "/"
    needed = sorted({value for params in parameters.values() for value in params.values()
                     if isinstance(value, str) and value.startswith(root)})
    if not needed:
        return
    if not Path(shared).is_dir():
        raise DataError(f"--shared {shared}: no such folder; {SHARED_FIX}.")
    missing = [value[len(root):] for value in needed if not Path(value).exists()]
    if missing:
        raise DataError(f"--shared {shared}: {', '.join(missing)} not found there; {SHARED_FIX}.")


def swap_in(staged: Path, final: Path, replaced: Sequence[str] = ()) -> None:
    """Put every file of ``staged`` into ``final``, each replaced in one rename (:func:`atomic_write`), and remove
    the files named in ``replaced`` (those ``staged`` started with) that are no longer in ``staged``; other entries
    of ``final`` stay. ``staged`` is removed. Both hold files only (a committed output folder is flat)."""
    entries = sorted(staged.iterdir())
    nested = [e.name for e in entries if e.is_dir() or e.is_symlink()]
    if nested:
        raise DataError(f"{staged}: holds {', '.join(nested)}, not plain files; a committed output folder is flat. "
                        f"Move them out, then render again ({final} is unchanged).")
    for entry in entries:
        atomic_write(final / entry.name, lambda tmp, entry=entry: shutil.copyfile(entry, tmp))
    for name in sorted(set(replaced) - {e.name for e in entries}):
        if (final / name).is_file() and not (final / name).is_symlink():
            (final / name).unlink()
    for entry in entries:
        entry.unlink()
    staged.rmdir()


def _rename_in_text(path: Path, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` everywhere in the file at ``path`` (the staging path in a rendered notebook's
    outputs becomes the committed folder it was swapped into)."""
    text = path.read_text(encoding="utf-8")
    if old in text:
        path.write_text(text.replace(old, new), encoding="utf-8")


def _failure(name: str, exc: Exception) -> str:
    """What went wrong in notebook ``name``, in one line: the cell and the error papermill reports, else the
    exception."""
    cell = getattr(exc, "exec_count", None)
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename is not None:
        where = f"cell [{cell}]" if cell is not None else "a cell"
        return f"{name}: {where} raised {ename}: {str(evalue).splitlines()[0] if evalue else ''}".rstrip(": ")
    return f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


def _new_stage(root: Path) -> Path:
    """A new, empty ``runs/render-<time>[-N]/`` under ``root``, returned relative to ``root``."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (root / "runs").mkdir(exist_ok=True)
    for n in range(1, 1000):
        rel = Path("runs") / f"{RENDER_PREFIX}{stamp}{'' if n == 1 else f'-{n}'}"
        try:
            (root / rel).mkdir()
        except FileExistsError:
            continue
        return rel
    raise DataError(f"{root / 'runs'}: 999 render folders of {stamp}; remove runs/{RENDER_PREFIX}{stamp}*.")


def render(names: Sequence[str], shared: str, *, fresh: bool = False, root: str | Path = ".",
           parameters: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Render ``names`` in data-flow order, from a clean slate, with the parameters of the real run (or
    ``parameters``, per notebook); each rendered notebook gets its note instead of papermill's injected cell.

    The notebooks execute into ``runs/render-<time>/`` and their committed outputs (COMMITTED_OUTPUTS) into copies
    there; all of it is swapped into place only when every notebook succeeded. A failure raises RenderError and
    leaves every committed notebook and output as it was (results folders such as ``dataset/`` and ``runs/scratch``
    keep what the notebooks wrote before it, as after any run)."""
    order = [n for n in NOTEBOOKS if n in names]
    root = Path(root)
    params = {**shared_parameters(shared), **(parameters or {})}
    check_shared({name: params[name] for name in order}, shared)
    if "Create_Data.ipynb" not in order and not (root / "dataset" / "manifest.csv").is_file():
        raise DataError(f"{root / 'dataset'}: no dataset; render Create_Data.ipynb first (the other notebooks "
                        "would build a synthetic one).")
    aside = prepare_clean_slate(order, root, fresh=fresh)
    if aside is not None:
        print(f"earlier results moved to {aside}/", flush=True)
    stage_rel = _new_stage(root)
    stage = root / stage_rel
    copied: dict[str, list[str]] = {}
    for name in order:
        for folder in COMMITTED_OUTPUTS.get(name, {}).values():
            if (root / folder).is_dir():
                shutil.copytree(root / folder, stage / folder, symlinks=True)
            copied[folder] = sorted(e.name for e in (root / folder).iterdir()) if (root / folder).is_dir() else []
    for name in order:
        print(f"executing {name} into {stage_rel.as_posix()}/", flush=True)
        staged = {key: (stage_rel / folder).as_posix() for key, folder in COMMITTED_OUTPUTS.get(name, {}).items()}
        try:
            run_notebook(root / name, stage / name, parameters={**params[name], **staged}, cwd=root)
        except Exception as exc:  # papermill's execution error, a dead kernel, a timeout: the render stops here
            raise RenderError(
                f"{_failure(name, exc)}; nothing committed was replaced (the notebooks and "
                f"{', '.join(f'{f}/' for f in copied) or 'their outputs'} are as they were). The executed copy is "
                f"{(stage_rel / name).as_posix()}; fix the cause and render again (--fresh moves this run's "
                "results aside).") from exc
        replace_injected_cell(stage / name, rendered_note(name, params[name], shared))
        for key, folder in COMMITTED_OUTPUTS.get(name, {}).items():
            _rename_in_text(stage / name, staged[key], folder)
    for folder, before in copied.items():
        swap_in(stage / folder, root / folder, before)
    for name in order:
        atomic_write(root / name, lambda tmp, name=name: shutil.copyfile(stage / name, tmp))
        (stage / name).unlink()
    stage.rmdir()
    print(f"rendered {', '.join(order)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Render the notebooks with the parameters of the real run; exit 2 on a usage error (a missing --shared
    folder, earlier results), 1 when a notebook fails (nothing committed replaced)."""
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
    except RenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
