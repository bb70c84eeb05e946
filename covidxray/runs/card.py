"""The model card that travels with a trained model: ``model.json`` for programs, ``model_card.md`` for people.

Both are written into the run folder at the end of training (and refreshed after the run's own test evaluation,
``RUN/eval-test``). They say what a model needs and what it gives, so it can be used without covidxray: the
architecture and weights, the input contract (size, channels, value range, how images are decoded and resized),
the output (one sigmoid unit, P(covid)), the decision threshold and how it was chosen, the training dataset's
fingerprint, its design and confounder warnings with the known shortcut, the validation (and test) metrics and
the intended use. ``covidxray.runs.load.load_run`` takes the threshold and input size from ``model.json``.

Everything is read from the run folder's own files (config.json, summary.json, threshold.json, provenance.json,
versions.json, every ``eval-*/metrics.json``), the evaluations written elsewhere that the card already lists, and the
training dataset's summary.json and manifest.csv, never recomputed. The card also carries what sharing a model needs:
the licences of the code and of each data source, the data sets' citations, the authors, when and with which versions
it was written, and a usage snippet. ``model.schema.json`` beside this module is the JSON Schema of ``model.json``;
every card is checked against it when written and when read (:func:`check_card`).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import keras
import pandas as pd
import tensorflow as tf

from covidxray import LABELS, __version__
from covidxray.data.designs import PEDIATRIC_SOURCES
from covidxray.data.manifest import MANIFEST_NAME, dataset_summary
from covidxray.errors import DataError, ModelError
from covidxray.metrics import COUNT_NAMES, METRIC_NAMES, format_metric
from covidxray.outputs import (
    OutputDir,
    amend_output,
    file_sha256,
    fingerprint,
    is_synthetic_artifact,
    json_text,
    read_json,
    synthetic_note,
)
from covidxray.runs.load import (
    CARD_FILE,
    CARD_TEXT,
    MODEL_FILE,
    SCHEMA_FILE,
    check_card,
    model_id,
    read_run_json,
)
from covidxray.training.pipeline import RESIZE_ANTIALIAS, RESIZE_METHOD

CARD_FORMAT = 1
INTENDED_USE = ("Research and teaching only: a study of how chest X-ray classifiers learn, and of the shortcuts "
                "they take. Not a diagnostic device and not validated for clinical use: do not use it to diagnose, "
                "screen, triage or treat anyone.")
LIMITATIONS: tuple[str, ...] = (
    "Trained on two classes only (normal, COVID-19): any other finding (bacterial or viral pneumonia, "
    "tuberculosis, effusion, devices) is forced into one of them.",
    "P(covid) is the model's score on data like its training data, not a calibrated clinical probability; "
    "check calibration on your own data (covidxray evaluate) before reading it as one.",
    "Metrics on the held-out test split come from the same sources as the training data and overstate "
    "performance on other hospitals, scanners and populations.",
)
_METHOD_NAMES = {"youden": "Youden's J (recall + specificity - 1, maximised)", "fixed": "a fixed value"}
_DECODE = ("each file is decoded once as the dataset build does (covidxray.data.images.check_image): EXIF orientation "
           "applied, 16-bit and float images rescaled by their range to 8 bits, transparency composited over black, "
           "colour converted to 8-bit grayscale")

REFERENCE_DIR = "eval-test"
"""The run's own test evaluation, inside the run folder (a run holds its evaluations)."""
EVAL_PREFIX = "eval-"
"""Evaluations inside a run folder are its ``eval-*`` child folders (``covidxray evaluate``'s default --out)."""

CODE_LICENCE = "MIT"
DATA_SOURCES: dict[str, dict[str, Any]] = {
    "kermany": {
        "name": "Kermany et al., Labeled OCT and Chest X-Ray Images (chest_xray), Mendeley Data v2",
        "licence": "CC BY 4.0", "doi": "10.17632/rscbjbr9sj.2"},
    "ieee8023": {
        "name": "ieee8023 covid-chestxray-dataset (Cohen et al.)",
        "licence": "per image: each image's licence is the `license` column of the data set's metadata.csv (they "
                   "differ from image to image, e.g. CC BY, CC BY-NC-SA, Apache 2.0, or none stated); check the "
                   "licences of the images you use", "doi": "10.48550/arXiv.2006.11988"},
    "nih": {
        "name": "NIH ChestX-ray14 (NIH Clinical Center)",
        "licence": "NIH Clinical Center terms: no restriction on use; cite the data set (Wang et al. 2017) and "
                   "acknowledge the NIH Clinical Center as its provider", "doi": "10.1109/CVPR.2017.369"},
    "synthetic": {
        "name": "covidxray's embedded synthetic data set (procedural images, not patient data)",
        "licence": "MIT (generated by covidxray)", "doi": None},
}
"""The data sources covidxray reads (covidxray.data.sources: ``SOURCE`` names) and their licences."""
PRESPLIT_SOURCES = ("kermany", "ieee8023")
"""The 2020 project's pre-split folders hold Kermany normals and ieee8023 COVID-19 images."""
DATA_CITATIONS: tuple[dict[str, Any], ...] = (
    {"source": "kermany", "authors": ["Kermany, Daniel", "Zhang, Kang", "Goldbaum, Michael"], "year": 2018,
     "title": "Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images for Classification",
     "where": "Mendeley Data, version 2", "doi": "10.17632/rscbjbr9sj.2"},
    {"source": "ieee8023", "authors": ["Cohen, Joseph Paul", "Morrison, Paul", "Dao, Lan", "Roth, Karsten",
                                       "Duong, Tim Q", "Ghassemi, Marzyeh"], "year": 2020,
     "title": "COVID-19 Image Data Collection: Prospective Predictions Are the Future",
     "where": "arXiv:2006.11988", "doi": "10.48550/arXiv.2006.11988"},
    {"source": "nih", "authors": ["Wang, Xiaosong", "Peng, Yifan", "Lu, Le", "Lu, Zhiyong", "Bagheri, Mohammadhadi",
                                  "Summers, Ronald M."], "year": 2017,
     "title": "ChestX-ray8: Hospital-Scale Chest X-Ray Database and Benchmarks on Weakly-Supervised "
              "Classification and Localization of Common Thorax Diseases",
     "where": "2017 IEEE Conference on Computer Vision and Pattern Recognition (CVPR)", "doi": "10.1109/CVPR.2017.369"},
)
"""The data sets' citations; the references of the repository's CITATION.cff (a test keeps the two equal)."""
HF_DATASETS = {"kermany": "kermany-chest-xray", "ieee8023": "ieee8023/covid-chestxray-dataset",
               "nih": "nih-chestxray14", "synthetic": "covidxray-synthetic"}
"""The names the model card's front matter gives the data sources (``datasets:`` of the Hugging Face hub)."""
SNIPPET_IMAGE = "xray.png"
"""The image file the card's usage snippet names."""


# ---------------------------------------------------------------------------------------------- reading the run


def _run_file(path: Path) -> dict:
    """A run file as a dict ({} when absent)."""
    return read_run_json(path) if path.is_file() else {}


def known_shortcut(design: dict | None, warnings: list[dict]) -> str | None:
    """The shortcut a design is known to offer (pediatric normals vs adult COVID-19), None when none is known.

    Read from the design (the ``original`` design takes its normals from a pediatric source) and from the
    ``pediatric_source`` confounder warnings, which say the same of any dataset built from such a source.
    """
    pediatric = [w["message"] for w in warnings if w.get("rule") == "pediatric_source"]
    if (design or {}).get("name") != "original" and not pediatric:
        return None
    children = "; ".join(PEDIATRIC_SOURCES.values())
    text = ("Pediatric normals vs adult COVID-19: the normal X-rays come from children (" + children + ") and the "
            "COVID-19 X-rays from adults (ieee8023, many of them figures cut from papers). The model can tell the "
            "classes apart by age, body size, hospital, file format or markings without seeing any sign of "
            "COVID-19, so its accuracy here says little about adults with and without COVID-19.")
    return text


def _training_data(dataset: dict | None, previous: dict | None) -> dict[str, Any]:
    """The design, confounder warnings and known shortcut of the training dataset, from its summary.json.

    Read only when the dataset is still there with the manifest the run recorded (same fingerprint); else the
    previous card's (a dataset moved or rebuilt since), else marked unavailable.
    """
    path = Path(dataset["path"]) if dataset and dataset.get("path") else None
    why = "the run records no dataset (a run of an older version)"
    if path is not None:
        manifest = path / MANIFEST_NAME
        if not manifest.is_file():
            why = f"{manifest} is gone"
        elif fingerprint(manifest) != dataset.get("fingerprint"):
            why = f"{manifest} changed since training (another fingerprint)"
        else:
            try:
                summary = dataset_summary(path)
            except DataError as exc:
                summary, why = {}, str(exc)
            else:
                why = f"{path / 'summary.json'} has no design (a dataset of an older version)"
            if summary.get("design"):
                design = {k: summary["design"].get(k) for k in ("name", "description", "notes")}
                warnings = list((summary.get("confounders") or {}).get("warnings") or [])
                return {"design": design, "confounder_warnings": [w.get("message", "") for w in warnings],
                        "shortcut": known_shortcut(design, warnings), "read_from": (path / "summary.json").as_posix()}
    if previous and previous.get("data"):
        return previous["data"]
    design = {"name": dataset.get("design")} if dataset and dataset.get("design") else None
    return {"design": design, "confounder_warnings": None, "shortcut": known_shortcut(design, []),
            "read_from": f"unavailable: {why}"}


def _training_sources(dataset: dict | None) -> dict[str, Any] | None:
    """The training split's images per source, and per licence where the manifest records one (a ``license``
    column); None when the dataset is not there with the manifest the run recorded."""
    path = Path(dataset["path"]) / MANIFEST_NAME if dataset and dataset.get("path") else None
    if path is None or not path.is_file() or fingerprint(path) != dataset.get("fingerprint"):
        return None
    try:
        manifest = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError):
        return None
    train = manifest[manifest["split"] == "train"] if "split" in manifest.columns else manifest
    sources = train["source"].value_counts().sort_index() if "source" in train.columns else pd.Series(dtype=int)
    licences = None
    if "license" in train.columns:
        licences = {k or "none stated": int(v) for k, v in train["license"].value_counts().sort_index().items()}
    return {"by_source": {str(k): int(v) for k, v in sources.items()}, "by_licence": licences}


def licence(sources: Iterable[str] | None, synthetic: bool, by_licence: dict[str, int] | None) -> dict[str, Any]:
    """The code's licence and each training data source's (every known source's when the sources are unknown)."""
    if synthetic:
        names: list[str] = ["synthetic"]
    elif sources is None:
        names = [n for n in DATA_SOURCES if n != "synthetic"]
    else:
        names = list(dict.fromkeys(n for s in sources for n in (PRESPLIT_SOURCES if s == "presplit" else (s,))))
    data = []
    for name in names:
        known = DATA_SOURCES.get(name)
        entry = {"source": name, "name": known["name"] if known else name,
                 "licence": known["licence"] if known else "not known to covidxray (your own data: check its terms)"}
        if name == "ieee8023":
            entry["training_images_by_licence"] = by_licence
        data.append(entry)
    return {"code": CODE_LICENCE, "data": data,
            "note": "The code is MIT; the model was trained on the images below, which keep their own licences and "
                    "terms: check them before sharing or using the model."
            + ("" if sources is not None or synthetic else " The training sources are not known (the dataset is "
               "not there): every source covidxray reads is listed.")}


def citation_text(ref: dict[str, Any]) -> str:
    """One citation as text: authors (year). Title. Where. doi."""
    return f"{'; '.join(ref['authors'])} ({ref['year']}). {ref['title']}. {ref['where']}. doi:{ref['doi']}"


@cache
def authors() -> list[str]:
    """The package's authors, from pyproject's ``[project].authors`` (the checkout's, else the installed
    metadata's); [] when neither says."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        try:
            people = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {}).get("authors") or []
        except (OSError, ValueError):
            people = []
        found = [" ".join(filter(None, (p.get("name"), f"<{p['email']}>" if p.get("email") else None)))
                 for p in people if isinstance(p, dict)]
        if found:
            return found
    try:
        meta = importlib.metadata.metadata("covidxray")
    except importlib.metadata.PackageNotFoundError:
        return []
    return [v for key in ("Author", "Author-email") for v in (meta.get_all(key) or []) if v]


def _evaluation(run_dir: Path, folder: Path, sha256: str, threshold: float,
                dataset: dict | None) -> dict[str, Any] | None:
    """One evaluation of this model (``folder/metrics.json``) with its intervals and per-source metrics; None
    without one, or when it evaluated another model file (one a resumed run has since replaced)."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    try:
        result = read_reference(path)
    except DataError:
        return None
    if result.get("model_id") != model_id(run_dir / MODEL_FILE, sha256):
        return None
    data = Path(str(result.get("data", "")))
    same = None
    if dataset and dataset.get("fingerprint") and (data / MANIFEST_NAME).is_file():
        same = result.get("kind") == "dataset" and fingerprint(data / MANIFEST_NAME) == dataset["fingerprint"]
    metrics = result["metrics"]
    rel = Path(os.path.relpath(folder.resolve(), run_dir.resolve())).as_posix()
    per_source = {str(name): {"n": (r.get("metrics") or {}).get("n"), "n_pos": (r.get("metrics") or {}).get("n_pos"),
                              "metrics": {k: (r.get("metrics") or {}).get(k) for k in METRIC_NAMES}}
                  for name, r in (result.get("per_source") or {}).items() if isinstance(r, dict)}
    return {
        "folder": rel,
        "inside_run": not rel.startswith(".."),
        "file": f"{rel}/metrics.json",
        "data": str(data),
        "split": result.get("split"),
        "kind": result.get("kind"),
        "training_dataset": same,
        "threshold": result.get("threshold"),
        "at_model_threshold": result.get("threshold") == threshold,
        "n": metrics.get("n"),
        "n_pos": metrics.get("n_pos"),
        "metrics": {k: metrics.get(k) for k in METRIC_NAMES},
        "ci": {k: (result.get("ci") or {}).get(k) for k in METRIC_NAMES},
        "bootstrap": result.get("bootstrap"),
        "skipped": (result.get("skipped") or {}).get("count", 0),
        "per_source": per_source or None,
    }


def _evaluations(run_dir: Path, sha256: str, threshold: float, dataset: dict | None, previous: dict | None,
                 outside: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every evaluation of this model the package can find: the run's ``eval-*`` folders, the folders outside it
    that the previous card listed, and ``outside`` (evaluations just written elsewhere)."""
    folders = [p for p in sorted(run_dir.glob(EVAL_PREFIX + "*")) if p.is_dir()]
    listed = [run_dir / e["folder"] for e in (previous or {}).get("evaluations") or []
              if isinstance(e, dict) and isinstance(e.get("folder"), str) and not e.get("inside_run")]
    seen: set[Path] = set()
    found = []
    for folder in [*folders, *listed, *map(Path, outside)]:
        key = folder.resolve()
        if key in seen:
            continue
        seen.add(key)
        entry = _evaluation(run_dir, folder, sha256, threshold, dataset)
        if entry is not None:
            found.append(entry)
    return found


def read_reference(path: str | Path) -> dict[str, Any]:
    """A metrics.json written by an evaluation (or the folder holding one); DataError when unusable."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise DataError(f"{path}: no reference evaluation there. Evaluate the run on its test split first "
                        "(`covidxray evaluate --model RUN`) or pass another metrics.json.")
    data = read_json(path, "rerun `covidxray evaluate --model RUN` to rewrite it.", what="the reference evaluation")
    if not isinstance(data.get("metrics"), dict):
        raise DataError(f"{path}: not a metrics.json written by `covidxray evaluate` (no 'metrics' entry); "
                        "pass the run's eval-test/metrics.json.")
    data["path"] = str(path)
    return data


def usage(run_name: str) -> dict[str, str]:
    """How to use the run, in Python and on the command line (the card shows both; a test runs them)."""
    python = (f'import covidxray\n\nrun = covidxray.open("{run_name}")  # this run folder\n'
              f'table = run.predict(["{SNIPPET_IMAGE}"])  # files, folders, CSV lists or pixel arrays\n'
              'print(table[["path", "p_covid", "pred"]])  # pred: covid when p_covid >= run.threshold\n')
    cli = f"covidxray predict --model {run_name} {SNIPPET_IMAGE} --out predictions"
    return {"python": python, "cli": cli}


def model_card(run_dir: str | Path, *, previous: dict | None = None,
               outside: Iterable[str | Path] = ()) -> dict[str, Any]:
    """The model card of a finished run folder as a dict (what ``model.json`` holds).

    ``previous`` is the card written before (its dataset facts and the evaluations it lists outside the run are
    kept); ``outside`` are evaluation folders outside the run to add.
    """
    run_dir = Path(run_dir)
    model_path = run_dir / MODEL_FILE
    sha256 = file_sha256(model_path)
    config = _run_file(run_dir / "config.json")
    summary = _run_file(run_dir / "summary.json")
    threshold = _run_file(run_dir / "threshold.json")
    provenance = _run_file(run_dir / "provenance.json")
    versions = _run_file(run_dir / "versions.json")
    size = int(summary.get("image_size") or config["image_size"])
    value = float(threshold.get("threshold", 0.5))
    dataset = provenance.get("dataset") or summary.get("dataset")
    architecture = {"name": config.get("model"), "weights": summary.get("weights") or {"spec": config.get("weights")}}
    synthetic = is_synthetic_artifact(run_dir)
    sources = _training_sources(dataset)
    if sources is None and previous and isinstance(previous.get("data"), dict):
        sources = previous["data"].get("training_sources")
    evaluations = _evaluations(run_dir, sha256, value, dataset, previous, outside)
    if config.get("model") == "vgg16":
        architecture.update(trainable_from=config.get("trainable_from"), finetune_epochs=config.get("finetune_epochs"),
                            finetune_from=config.get("finetune_from") if config.get("finetune_epochs") else None)
    return {
        "format": CARD_FORMAT,
        "model": {"id": model_id(model_path, sha256), "file": MODEL_FILE, "sha256": sha256, **architecture,
                  "mixed_precision": summary.get("mixed_precision", False),
                  "precision": summary.get("precision"),
                  "keras": versions.get("keras"), "tensorflow": versions.get("tensorflow"),
                  "covidxray": versions.get("covidxray", __version__)},
        "intended_use": INTENDED_USE,
        "synthetic": synthetic,
        "license": licence(None if sources is None else sources["by_source"], synthetic,
                           None if sources is None else sources["by_licence"]),
        "citations": [{**ref, "text": citation_text(ref)} for ref in DATA_CITATIONS],
        "authors": authors(),
        "written": {"date": datetime.date.today().isoformat(), "covidxray": __version__,
                    "keras": keras.__version__, "tensorflow": tf.__version__},
        "usage": usage(run_dir.name),
        "limitations": list(LIMITATIONS),
        "input": {
            "image_size": size,
            "shape": [None, size, size, 3],
            "dtype": "float32",
            "channels": 3,
            "color": "8-bit grayscale copied to all three channels",
            "value_range": [0, 255],
            "scaling": "none (the model rescales raw pixels itself)",
            "resize": {"method": RESIZE_METHOD, "antialias": RESIZE_ANTIALIAS, "to": [size, size],
                       "aspect": "stretched to the square (no crop, no padding)",
                       "rounding": "rounded to integers (8-bit) after resizing",
                       "function": "tf.image.resize"},
            "decode": _DECODE,
        },
        "output": {"shape": [None, 1], "activation": "sigmoid", "meaning": "P(covid): the model's probability "
                   "that the X-ray shows COVID-19 rather than a normal chest", "labels": list(LABELS),
                   "positive": LABELS[1]},
        "decision": {
            "threshold": value,
            "rule": f"{LABELS[1]} when p_covid >= threshold, else {LABELS[0]}",
            "method": threshold.get("method"),
            "split": threshold.get("split"),
            "youden_j": threshold.get("youden_j"),
            "note": threshold.get("note"),
            "chosen_by": "covidxray.metrics.choose_threshold on the validation split (threshold.json); "
                         "the test "
                         "split is never used in training or selection",
        },
        "training": {
            "dataset": dataset,
            "command": provenance.get("command"),
            "n_train": summary.get("n_train"),
            "n_train_covid": summary.get("n_train_covid"),
            "epochs_run": summary.get("epochs_run"),
            "best_epoch": summary.get("best_epoch"),
            "monitor": summary.get("monitor"),
            "stopped_early": summary.get("stopped_early"),
            "config": config,
        },
        "data": {**_training_data(dataset, previous), "training_sources": sources},
        "metrics": {
            "val": {k: threshold.get(k) for k in (*METRIC_NAMES, *COUNT_NAMES) if k in threshold},
            "test": next((e for e in evaluations if e["folder"] == REFERENCE_DIR), None),
        },
        "evaluations": evaluations,
    }


# ---------------------------------------------------------------------------------------------- the text


def _metric_line(name: str, value: Any, ci: Any = None) -> str:
    pct = name not in ("roc_auc", "pr_auc", "brier", "ece")
    return f"| {name} | {format_metric(value, ci, percent=pct)} |"


def render_model_card(card: dict[str, Any]) -> str:
    """``model_card.md``: the card's content for people, in Markdown."""
    model, inp, dec, train, data = card["model"], card["input"], card["decision"], card["training"], card["data"]
    weights = model.get("weights") or {}
    size = inp["image_size"]
    note = synthetic_note({"synthetic": card.get("synthetic")}, "this model and every number below")
    lines = [f"# Model card: {model['id']}", "", *([f"> **{note}**", ""] if note else []),
             f"**Intended use.** {card['intended_use']}", "",
             "## Model", "",
             f"- Architecture: `{model.get('name')}`; backbone weights: `{weights.get('spec')}`"
             + (f" (trainable from `{model['trainable_from']}`)" if model.get("trainable_from") else ""),
             f"- File: `{model['file']}`, sha256 `{model['sha256']}`",
             f"- Saved with Keras {model.get('keras')}, TensorFlow {model.get('tensorflow')}, "
             f"covidxray {model.get('covidxray')}", "",
             "## Input contract", "",
             f"- One batch of shape (n, {size}, {size}, 3), {inp['dtype']}, raw pixel values in [0, 255], scaling "
             f"{inp['scaling']}.",
             f"- {inp['color'].capitalize()}.",
             f"- Resized to {size} x {size} with {inp['resize']['function']} (method `{inp['resize']['method']}`, "
             f"antialias={inp['resize']['antialias']}), {inp['resize']['aspect']}, "
             f"{inp['resize']['rounding']}.",
             f"- Decoding: {inp['decode']}.", "",
             "## Output", "",
             f"- One sigmoid unit, shape (n, 1): {card['output']['meaning']}.",
             f"- Decision: {dec['rule']}; threshold **{dec['threshold']:.4f}**, chosen by "
             f"{_METHOD_NAMES.get(dec.get('method'), dec.get('method'))} with {dec['chosen_by']}.", ""]
    if dec.get("note"):
        lines += [f"- Note: {dec['note']}.", ""]
    dataset = train.get("dataset") or {}
    lines += ["## Training data", "",
              f"- Dataset: `{dataset.get('path')}`, manifest fingerprint `{dataset.get('fingerprint')}`, "
              f"design `{(data.get('design') or {}).get('name') or dataset.get('design')}`",
              f"- {train.get('n_train')} training images ({train.get('n_train_covid')} covid); best epoch "
              f"{train.get('best_epoch')} of {train.get('epochs_run')} by {train.get('monitor')}", ""]
    design = data.get("design") or {}
    lines += ["## Warnings", ""]
    if data.get("shortcut"):
        lines += [f"**Known shortcut.** {data['shortcut']}", ""]
    if design.get("description"):
        lines.append(f"- Design {design.get('name')}: {design['description']}.")
    warnings = data.get("confounder_warnings")
    if warnings is None:
        lines.append(f"- Confounder warnings: not known ({data.get('read_from')}).")
    else:
        lines.append(f"- Confounder warnings: {len(warnings)}" + ("" if warnings else
                                                                  " (classes balanced on the checks)"))
        lines += [f"  - {w}" for w in warnings]
    lines += [f"- {text}" for text in card["limitations"]]
    val = card["metrics"]["val"]
    lines += ["", "## Metrics", "", f"Validation (n = {val.get('n')}, {val.get('n_pos')} covid; at the threshold, "
              "which was chosen on these images, so optimistic):", "", "| metric | value |", "|---|---|"]
    lines += [_metric_line(k, val.get(k)) for k in METRIC_NAMES if k in val]
    lines += ["", "## Evaluations", ""]
    evaluations = card.get("evaluations") or []
    if not card["metrics"].get("test"):
        lines += ["Test: not evaluated yet (`covidxray evaluate --model RUN` writes eval-test/ and updates this "
                  "card).", ""]
    lines += [line for evaluation in evaluations for line in _evaluation_lines(evaluation)]
    if not evaluations:
        lines += ["No evaluation of this model found (`covidxray evaluate --model RUN --data DATA` adds one).", ""]
    lines += _sharing_lines(card)
    return "\n".join(_front_matter(card) + lines)


def _evaluation_lines(test: dict[str, Any]) -> list[str]:
    """One evaluation's paragraph, metric table and per-source table."""
    where = "the training dataset's held-out test split" if test.get("training_dataset") else \
        f"`{test['data']}` (split {test.get('split')}" + ("; not known to be the training dataset's test split)"
                                                        if test.get("split") == "test" else ")")
    title = "Test" if test["folder"] == REFERENCE_DIR else "Evaluation"
    thr = "" if test.get("at_model_threshold") else f", at threshold {test.get('threshold')} (not the model's)"
    lines = [f"### {test['folder']}", "",
             f"{title} on {where} (n = {test.get('n')}, {test.get('n_pos')} covid{thr}; 95 % bootstrap "
             f"intervals over {(test.get('bootstrap') or {}).get('unit', 'image')}s), from `{test['file']}`:",
             "", "| metric | value |", "|---|---|"]
    lines += [_metric_line(k, test["metrics"].get(k), test["ci"].get(k)) for k in METRIC_NAMES]
    per_source = test.get("per_source") or {}
    if per_source:
        names = list(per_source)
        lines += ["", "Per data source:", "", "| metric | " + " | ".join(f"{n} (n = {per_source[n]['n']})"
                                                                       for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        for k in METRIC_NAMES:
            pct = k not in ("roc_auc", "pr_auc", "brier", "ece")
            lines.append(f"| {k} | " + " | ".join(format_metric(per_source[n]["metrics"].get(k), percent=pct)
                                                   for n in names) + " |")
    return [*lines, ""]


def _sharing_lines(card: dict[str, Any]) -> list[str]:
    """Use (Python and command line), licences, citations, authors and how the card was written."""
    use, lic, written = card["usage"], card["license"], card["written"]
    lines = ["## Use", "", "In Python, with covidxray installed, from the folder that holds this run folder:", "",
             "```python", use["python"].rstrip("\n"), "```", "", "On the command line:", "", "```bash", use["cli"],
             "```", "", f"Without covidxray: see the README's plain-Keras lines. `{CARD_FILE}` holds this card for "
             f"programs (JSON Schema: covidxray/runs/{SCHEMA_FILE.name}).", "",
             "## Licence", "", f"- Code: {lic['code']} (covidxray).", f"- {lic['note']}"]
    for entry in lic["data"]:
        lines.append(f"- Data, `{entry['source']}` ({entry['name']}): {entry['licence']}.")
        by_licence = entry.get("training_images_by_licence")
        if by_licence:
            lines.append("  - This run's training images by licence: "
                         + ", ".join(f"{name}: {n}" for name, n in by_licence.items()) + ".")
        elif entry["source"] == "ieee8023":
            lines.append("  - The dataset's manifest does not record each image's licence: look the training "
                         "images up in metadata.csv.")
    lines += ["", "## Citations", "", "Cite the data sets the model was trained on:", ""]
    lines += [f"- {ref['text']}" for ref in card["citations"]]
    lines += ["", "## About this card", "",
              f"- Authors: {', '.join(card['authors']) or 'not recorded'}.",
              f"- Written {written['date']} by covidxray {written['covidxray']} (Keras {written['keras']}, "
              f"TensorFlow {written['tensorflow']}).", ""]
    return lines


def _front_matter(card: dict[str, Any]) -> list[str]:
    """The YAML front matter the Hugging Face hub reads (JSON strings are YAML strings)."""
    sources = [e["source"] for e in card["license"]["data"]]
    tags = ["chest-x-ray", "covid-19", "medical-imaging", "research-only", "not-for-clinical-use", "covidxray",
            *(["synthetic-data"] if card.get("synthetic") else [])]

    def block(key: str, values: Iterable[str]) -> list[str]:
        return [f"{key}:", *(f"- {json_text(v).strip()}" for v in values)]

    return ["---", "library_name: keras", "pipeline_tag: image-classification", "license: mit",
            *block("datasets", [HF_DATASETS.get(s, s) for s in sources]), *block("metrics", METRIC_NAMES),
            *block("tags", tags), "---", ""]


# ---------------------------------------------------------------------------------------------- writing


def drop_model_card(out: OutputDir) -> None:
    """Remove a run's card before its model changes (a resumed run writes a new one when it finishes)."""
    for name in (CARD_FILE, CARD_TEXT):
        out.remove(name)


def write_model_card(out: OutputDir, outside: Iterable[str | Path] = ()) -> dict[str, Any]:
    """Write ``model.json`` and ``model_card.md`` into a claimed run folder; returns the card.

    ``outside`` are evaluation folders outside the run to list (with those the previous card listed). The card
    keeps its previous date when nothing else in it changed.
    """
    path = out.path / CARD_FILE
    previous = read_run_json(path) if path.is_file() else None
    previous = previous if isinstance(previous, dict) else None
    card = model_card(out.path, previous=previous, outside=outside)
    if previous and isinstance(previous.get("written"), dict):
        kept = {**card, "written": {**card["written"], "date": previous["written"].get("date")}}
        if json_text(kept) == json_text(previous):
            card = kept
    check_card(card, path, "a bug in covidxray's card writer: please report it.")
    out.write_json(CARD_FILE, card, sort_keys=False)
    out.write_text(CARD_TEXT, render_model_card(card))
    return card


def refresh_model_card(run_dir: str | Path, evaluation: str | Path | None = None) -> str:
    """Rewrite a run's card (after an evaluation of it); returns one line saying what happened.

    ``evaluation`` is the folder just written: one outside the run is listed in the card from now on (relative
    to the run), as the run's own ``eval-*`` folders are. Only a run that already has a card is refreshed (older
    runs have no ownership record to write through). The run's record keeps its writer (`covidxray train`); the
    line says whether the card's bytes changed. A run folder holding files covidxray did not write is left alone,
    and the line says why.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CARD_FILE).is_file():
        return f"{run_dir} has no {CARD_FILE} (a run of an older version); not written"
    try:
        with amend_output(run_dir, "train", flag="--model") as out:
            write_model_card(out, outside=[] if evaluation is None else [evaluation])
            changed = list(out.amended or [])
    except (DataError, ModelError) as exc:
        return f"not updated: {exc}"
    if not changed:
        return f"unchanged ({run_dir / CARD_FILE} already says this)"
    return "updated " + " and ".join(str(run_dir / rel) for rel in changed)
