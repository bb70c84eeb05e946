"""The model card that travels with a trained model: ``model.json`` for programs, ``model_card.md`` for people.

Both are written into the run folder at the end of training (and refreshed after the run's own test evaluation,
``RUN/eval-test``). They say what a model needs and what it gives, so it can be used without covidxray: the
architecture and weights, the input contract (size, channels, value range, how images are decoded and resized),
the output (one sigmoid unit, P(covid)), the decision threshold and how it was chosen, the training dataset's
fingerprint, its design and confounder warnings with the known shortcut, the validation (and test) metrics and
the intended use. ``covidxray.runs.load.load_run`` takes the threshold and input size from ``model.json``.

Everything is read from the run folder's own files (config.json, summary.json, threshold.json, provenance.json,
versions.json, eval-test/metrics.json) and the training dataset's summary.json, never recomputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from covidxray import LABELS, __version__
from covidxray.data.designs import PEDIATRIC_SOURCES
from covidxray.data.manifest import MANIFEST_NAME, dataset_summary
from covidxray.errors import DataError
from covidxray.metrics import COUNT_NAMES, METRIC_NAMES, format_metric
from covidxray.outputs import (
    OutputDir,
    amend_output,
    file_sha256,
    fingerprint,
    is_synthetic_artifact,
    read_json,
    synthetic_note,
)
from covidxray.runs.load import CARD_FILE, CARD_TEXT, MODEL_FILE, model_id, read_run_json
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


def _test_metrics(run_dir: Path, sha256: str, threshold: float, dataset: dict | None) -> dict[str, Any] | None:
    """The run's own test evaluation (``eval-test/metrics.json``) with its intervals; None without one, or when
    it evaluated another model file (one a resumed run has since replaced)."""
    path = run_dir / REFERENCE_DIR / "metrics.json"
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
    return {
        "file": f"{REFERENCE_DIR}/metrics.json",
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
    }


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


def model_card(run_dir: str | Path, *, previous: dict | None = None) -> dict[str, Any]:
    """The model card of a finished run folder as a dict (what ``model.json`` holds).

    ``previous`` is the card written before (its dataset facts are kept when the dataset cannot be read now).
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
        "synthetic": is_synthetic_artifact(run_dir),
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
        "data": _training_data(dataset, previous),
        "metrics": {
            "val": {k: threshold.get(k) for k in (*METRIC_NAMES, *COUNT_NAMES) if k in threshold},
            "test": _test_metrics(run_dir, sha256, value, dataset),
        },
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
    test = card["metrics"].get("test")
    if test:
        where = "the training dataset's held-out test split" if test.get("training_dataset") else \
            f"`{test['data']}` (split {test.get('split')}; not known to be the training dataset's test split)"
        thr = "" if test.get("at_model_threshold") else f", at threshold {test.get('threshold')} (not the model's)"
        lines += ["", f"Test on {where} (n = {test.get('n')}, {test.get('n_pos')} covid{thr}; 95 % bootstrap "
                  f"intervals over {(test.get('bootstrap') or {}).get('unit', 'image')}s), from `{test['file']}`:",
                  "", "| metric | value |", "|---|---|"]
        lines += [_metric_line(k, test["metrics"].get(k), test["ci"].get(k)) for k in METRIC_NAMES]
    else:
        lines += ["", "Test: not evaluated yet (`covidxray evaluate --model RUN` writes eval-test/ and updates "
                  "this card)."]
    lines += ["", "## Use", "", f"`covidxray predict --model RUN IMAGES... --out DIR` (see the README for six "
              f"lines of plain Keras). `{CARD_FILE}` holds this card for programs.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- writing


def drop_model_card(out: OutputDir) -> None:
    """Remove a run's card before its model changes (a resumed run writes a new one when it finishes)."""
    for name in (CARD_FILE, CARD_TEXT):
        out.remove(name)


def write_model_card(out: OutputDir) -> dict[str, Any]:
    """Write ``model.json`` and ``model_card.md`` into a claimed run folder; returns the card."""
    path = out.path / CARD_FILE
    previous = read_run_json(path) if path.is_file() else None
    card = model_card(out.path, previous=previous)
    out.write_json(CARD_FILE, card, sort_keys=False)
    out.write_text(CARD_TEXT, render_model_card(card))
    return card


def refresh_model_card(run_dir: str | Path) -> str:
    """Rewrite a run's card (after its test evaluation); returns one line saying what happened.

    Only a run that already has a card is refreshed (older runs have no ownership record to write through). The
    run's record keeps its writer (`covidxray train`); the line says whether the card's bytes changed. A run
    folder holding files covidxray did not write is left alone, and the line says why.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CARD_FILE).is_file():
        return f"{run_dir} has no {CARD_FILE} (a run of an older version); not written"
    try:
        with amend_output(run_dir, "train", flag="--model") as out:
            write_model_card(out)
            changed = list(out.amended or [])
    except DataError as exc:
        return f"not updated: {exc}"
    if not changed:
        return f"unchanged ({run_dir / CARD_FILE} already says this)"
    return "updated " + " and ".join(str(run_dir / rel) for rel in changed)
