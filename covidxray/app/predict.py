"""``covidxray predict``: P(covid) for any chest X-ray files with a trained model, read as training read its images.

Inputs are image files, folders (searched recursively) and CSV lists with a ``path`` column (relative paths are
read from the CSV's folder; a built dataset's manifest.csv works). Every file is checked and decoded once as the
dataset build does (:func:`covidxray.data.labeled_sets.decodable`): any file
:func:`covidxray.data.images.check_image` can read
is predicted, odd formats (16-bit, CMYK, EXIF-rotated, ...) through normalised 8-bit copies; a file that cannot
be used is skipped with the reason, never fatal. The threshold and the input size come from the run's model card
(``model.json``; see :func:`covidxray.runs.load.load_run`).

The output folder gets ``predictions.csv`` (one row per file found, in input order: path, p_covid, pred,
threshold, model, skipped, heatmap) and, with a heatmap method, one overlay PNG per image under ``heatmaps/``.
It is staged and swapped in whole (:mod:`covidxray.outputs`), so a failed run leaves the previous output.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidxray import LABELS
from covidxray.data.images import DEFAULT_MAX_PIXELS, skip_reason
from covidxray.data.labeled_sets import LabeledSet, decodable
from covidxray.data.sources.base import parse_label, read_table
from covidxray.errors import DataError
from covidxray.outputs import SYNTHETIC, data_provenance, provenance, staged_output, write_csv

PREDICTIONS_FILE = "predictions.csv"
HEATMAP_DIR = "heatmaps"
COLUMNS: list[str] = ["path", "p_covid", "pred", "threshold", "model", "model_data", "skipped", "heatmap"]
"""Columns of predictions.csv; p_covid, pred and heatmap are empty for a skipped file."""
CHUNK = 256
"""Images decoded into memory at once for heatmaps (predictions stream through the input pipeline)."""
_INPUTS = "Give image files, folders of images, or a CSV with a 'path' column."


# ---------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Entry:
    """One file the inputs name: what the output calls it, the file to read, why it is not used, and the row's
    other columns when it came from a CSV list (kept beside the predictions)."""

    shown: str
    """The path as the user gave it (a CSV's own string, relative or not; a file found in a folder)."""
    file: str
    """The file to read (a CSV's relative path joined to the CSV's folder)."""
    reason: str | None = None
    """Why it is not predicted (None: it is)."""
    columns: tuple[tuple[str, str], ...] = ()
    """The CSV row's other columns, in the CSV's order and names."""


def _csv_entries(csv_path: Path) -> list[Entry]:
    """One entry per row of a CSV list (a ``path`` column in any case; blank lines skipped), with its other
    columns; a row without an existing file carries the reason."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: cannot read the CSV as UTF-8 text ({exc}); save it as UTF-8.") from exc
    fix = "The first line must be a header with a 'path' column (other columns are kept); save it as UTF-8 CSV."
    table = read_table(csv_path, (), fix, text=text, keep_blank_lines=True)
    column = next((c for c in table.columns if c.lower() == "path"), None)
    if column is None:
        raise DataError(f"{csv_path}: missing required column(s) ['path'] (has {list(table.columns)[:8]}...). {fix}")
    others = [c for c in table.columns if c != column]
    entries: list[Entry] = []
    for index, rel in enumerate(table[column]):
        columns = tuple((c, table[c].iloc[index]) for c in others)
        if not rel:
            if any(table.iloc[index]):
                item = f"{csv_path.name}, line {index + 2}"
                entries.append(Entry(item, item, "empty path", columns))
            continue
        file = Path(rel) if Path(rel).is_absolute() else csv_path.parent / rel
        if file.is_file():
            entries.append(Entry(rel, str(file), None, columns))
        else:
            loop = "; a broken symbolic link or symlink loop" if file.is_symlink() else ""
            entries.append(Entry(rel, str(file), f"image file not found ({csv_path.name}, line {index + 2}; "
                                                 f"relative paths are read from the CSV's folder{loop})", columns))
    return entries


def collect_inputs(inputs: Sequence[str | Path]) -> list[Entry]:
    """Every file the inputs name, in order, as :class:`Entry`: a reason for one that is not used (litter or a
    non-image file in a folder, a CSV row without a file, a file listed again).

    A named file is always tried (its format is judged by decoding it); in folders, files are picked as the
    dataset build picks them (:func:`covidxray.data.images.skip_reason`). A DataError when an input does not exist or
    nothing at all is found.
    """
    if not inputs:
        raise DataError(f"no input given. {_INPUTS}")
    entries: list[Entry] = []
    first: dict[Path, str] = {}

    def add(entry: Entry) -> None:
        if entry.reason is None:
            key = Path(entry.file).resolve()
            if key in first:
                entry = Entry(entry.shown, entry.file, f"listed more than once (same file as {first[key]}, "
                                                       "predicted once)", entry.columns)
            else:
                first[key] = entry.shown
        entries.append(entry)

    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                if not file.is_dir():
                    add(Entry(str(file), str(file), skip_reason(file, file.relative_to(path))))
        elif path.is_file() and path.suffix.lower() == ".csv":
            for entry in _csv_entries(path):
                add(entry)
        elif path.is_file():
            add(Entry(str(path), str(path)))
        elif path.is_symlink():
            add(Entry(str(path), str(path), "broken symbolic link or symlink loop"))
        else:
            raise DataError(f"{path}: no such file or folder. {_INPUTS}")
    if not entries:
        raise DataError(f"no file found in {', '.join(map(str, inputs))} (empty folders or CSV). {_INPUTS}")
    return entries


# ---------------------------------------------------------------------------------------------- heatmaps


def _write_heatmaps(model: Any, frame: pd.DataFrame, probs: np.ndarray, folder: Path, *, name: str,
                    method: str, layer: str, threshold: float, image_size: int, batch_size: int,
                    truths: dict[str, str] | None = None) -> list[str]:
    """One overlay PNG per row of ``frame`` into ``folder``, decoded ``CHUNK`` images at a time; their names.
    ``truths`` (file -> label) names a file's overlay by its true label, else ``true-unknown``."""
    from covidxray.evaluation.figures import save_figure
    from covidxray.explain.maps import HEATMAP_DPI, cam_filename, heatmaps, overlay_figure
    from covidxray.training.pipeline import load_images

    folder.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    taken: set[str] = set()
    for start in range(0, len(frame), CHUNK):
        part = frame.iloc[start:start + CHUNK]
        images = load_images(part["filepath"].tolist(), image_size, batch_size)
        maps = heatmaps(model, images, method, layer, batch_size=batch_size)
        for i, original in enumerate(part["path"]):
            p = float(probs[start + i])
            pred = LABELS[int(p >= threshold)]
            truth = (truths or {}).get(original, "unknown")
            filename, copy = cam_filename(name, original, truth, pred, p), 1
            while filename in taken:
                copy += 1
                filename = cam_filename(name, f"{Path(original).stem}-{copy}", truth, pred, p)
            taken.add(filename)
            title = f"{name} ({method}): predicted {pred}, p(covid) = {p:.2f} (threshold {threshold:.2f})"
            save_figure(overlay_figure(images[i], maps[i], title=title), folder / filename, dpi=HEATMAP_DPI)
            names.append(f"{HEATMAP_DIR}/{filename}")
    return names


# ---------------------------------------------------------------------------------------------- predict


def model_data_word(meta: dict[str, Any]) -> str:
    """What a run's model was trained on, for ``predictions.csv``: SYNTHETIC, real, or unknown (no record)."""
    data = data_provenance(meta["run_dir"], "run")
    return "unknown" if data is None else SYNTHETIC if data.get("synthetic") else "real"


def predict_entries(model: Any, meta: dict[str, Any], entries: Sequence[Entry], *,
                    batch_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS, fix: str = _INPUTS,
                    heatmap_folder: Path | None = None, method: str | None = None,
                    layer: str | None = None, progress: bool = True) -> pd.DataFrame:
    """The predictions table, in memory: :data:`COLUMNS` and then the input CSV's own columns (renamed
    ``input_<name>`` where a name is one of ours), one row per entry of :func:`collect_inputs`, in order, ``path``
    as the user wrote it. Every file is checked and decoded once as the build does and predicted at the run's
    threshold; with ``heatmap_folder`` and ``method``, one overlay PNG per predicted image is written there, named
    by its true label where the CSV has a ``label`` column. ``fix`` ends the error when no file is usable;
    ``progress`` allows a bar over the batches on a terminal (:mod:`covidxray.progress`)."""
    from covidxray.runs.load import predict_dataframe

    threshold, size, model_name = float(meta["threshold"]), int(meta["image_size"]), meta["model_id"]
    wanted = [e.file for e in entries if e.reason is None]
    if not wanted:
        shown = "; ".join(f"{e.shown}: {e.reason}" for e in entries[:3])
        raise DataError(f"none of the {len(entries)} file(s) found is an image to predict ({shown}). {fix}")
    labeled = LabeledSet(pd.DataFrame({"filepath": wanted, "y": 0}), kind="files", max_pixels=max_pixels)
    heat: dict[str, str] = {}
    with decodable(labeled, check=True, fix=fix) as usable:
        frame = usable.frame
        probs = predict_dataframe(model, frame, size, batch_size, bar="predicting" if progress else None)
        if heatmap_folder is not None and method is not None:
            files = _write_heatmaps(model, frame, probs, heatmap_folder, name=model_name.split("@")[0],
                                    method=method, layer=layer, threshold=threshold, image_size=size,
                                    batch_size=batch_size, truths=_labels(entries))
            heat = dict(zip(frame["path"], files, strict=True))
    p_of = dict(zip(frame["path"], probs, strict=True))
    unusable = dict(usable.skipped)
    data_word = model_data_word(meta)
    extra = list(dict.fromkeys(name for e in entries for name, _ in e.columns))
    rename = {name: f"input_{name}" if name in COLUMNS else name for name in extra}
    rows = []
    for e in entries:
        p = p_of.get(e.file) if e.reason is None else None
        rows.append({"path": e.shown, "p_covid": None if p is None else round(float(p), 6),
                     "pred": "" if p is None else LABELS[int(p >= threshold)], "threshold": threshold,
                     "model": model_name, "model_data": data_word,
                     "skipped": e.reason or unusable.get(e.file, ""),
                     "heatmap": heat.get(e.file, "") if e.reason is None else "",
                     **{rename[name]: value for name, value in e.columns}})
    return pd.DataFrame(rows, columns=[*COLUMNS, *rename.values()])


def _labels(entries: Sequence[Entry]) -> dict[str, str]:
    """The true label of each file whose CSV row has a ``label`` column that reads as one (normal, covid)."""
    out = {}
    for e in entries:
        given = next((value for name, value in e.columns if name.lower() == "label"), None)
        label = parse_label(given) if given else None
        if label is not None:
            out[e.file] = label
    return out


def has_labels(table: pd.DataFrame) -> bool:
    """True when the predictions carry a ``label`` column of the input list (then `evaluate` gives metrics)."""
    return any(str(c).lower() in ("label", "input_label") for c in table.columns[len(COLUMNS):])


def predict(
    model_path: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    cam: str | None = None,
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict every image the inputs name with a run folder or .keras file; write ``predictions.csv`` (and
    heatmaps with ``cam``, one of :data:`covidxray.explain.maps.METHODS`) into ``out_dir``. Images over ``max_pixels``
    pixels are skipped; ``progress`` allows a bar over the batches on a terminal. (In memory, without writing:
    :meth:`covidxray.app.api.Run.predict`.)

    Returns the model id, threshold (and the file it came from), image size, heatmap method, counts of files
    predicted and skipped, the seconds taken and ``predictions`` (the table written).
    """
    from covidxray.explain.maps import resolve_method
    from covidxray.runs.load import load_run

    started = time.perf_counter()
    model, meta = load_run(model_path)
    method = layer = None
    if cam is not None:
        method, layer = resolve_method(model, cam, None, fix=(
            f"predict cannot draw its heatmaps: leave out --cam {cam} to get the predictions alone, or draw "
            f"heatmaps with `covidxray cam --model {model_path} --layer NAME`"))
    entries = collect_inputs(inputs)
    out_dir = Path(out_dir)
    prov = provenance(fingerprint=None, synthetic=False, source="images",
                      model=data_provenance(meta["run_dir"], "run"))
    with staged_output(out_dir, "predict", sources=[*inputs, meta["model_path"]], data=prov) as tmp:
        table = predict_entries(model, meta, entries, batch_size=batch_size, max_pixels=max_pixels,
                                fix=f"Nothing was written. {_INPUTS}", heatmap_folder=tmp / HEATMAP_DIR,
                                method=method, layer=layer, progress=progress)
        write_csv(table, tmp / PREDICTIONS_FILE)
    return {"model": meta["model_id"], "model_path": meta["model_path"], "threshold": float(meta["threshold"]),
            "threshold_source": meta["threshold_source"], "image_size": int(meta["image_size"]), "cam": method,
            "out": str(out_dir), "predicted": int(table["p_covid"].notna().sum()),
            "skipped": int(table["p_covid"].isna().sum()), "seconds": time.perf_counter() - started,
            "labels": has_labels(table), "predictions": table}


def format_predictions(result: dict[str, Any], limit: int = 20) -> list[str]:
    """A short table for the terminal: the model and threshold, up to ``limit`` rows, the counts and the files."""
    table = result["predictions"]
    lines = [f"model {result['model']}, threshold {result['threshold']:.4f} (from {result['threshold_source']}), "
             f"{result['image_size']} px"]
    width = min(60, max([len("path"), *(len(str(p)) for p in table["path"][:limit])]))
    lines.append(f"{'path':<{width}}  p_covid  pred")
    for row in table.head(limit).itertuples(index=False):
        path = row.path if len(row.path) <= width else "..." + row.path[-(width - 3):]
        result_text = f"{row.p_covid:7.4f}  {row.pred}" if row.skipped == "" else f"      -  skipped: {row.skipped}"
        lines.append(f"{path:<{width}}  {result_text}")
    if len(table) > limit:
        lines.append(f"... {len(table) - limit} more rows in {PREDICTIONS_FILE}")
    cams = f" and {result['predicted']} heatmaps ({result['cam']}) in {HEATMAP_DIR}/" if result["cam"] else ""
    lines.append(f"{result['predicted']} predicted, {result['skipped']} skipped; {PREDICTIONS_FILE}{cams} written to "
                 f"{result['out']}/")
    if result.get("labels"):
        lines.append(f"the list has a label column: `covidxray evaluate --model {result['model_path']} --data "
                     "LIST.csv` gives the metrics with their intervals")
    return lines


def prediction_records(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON Lines of a prediction run (``covidxray predict --format jsonl``): one object per row of
    predictions.csv with its columns (``event``: ``prediction`` first; an input column named ``event`` comes as
    ``input_event``), then the summary (``event``: ``done``, the output folder, the counts and the model)."""
    records = [{"event": "prediction", **{"input_event" if name == "event" else name: value
                                          for name, value in row.items()}}
               for row in result["predictions"].to_dict(orient="records")]
    records.append({"event": "done", **{k: v for k, v in result.items() if k != "predictions"}})
    return records
