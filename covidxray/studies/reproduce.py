"""The results table in one call: dataset, trivial baseline, both models (N seeds), test evaluation, files.

Every row is labeled with what it used (model, backbone weights, split, seeds, epochs, image size) and the
machine and wall time are recorded, so a reader can tell exactly what a number means. The test split is read
only here, after training has finished with validation-only model selection.

The table carries the dataset's design and its confounder warnings. :func:`reproduce_designs` runs it for
several designs (``original``: pediatric normals; ``adult-normals``) and :func:`cross_design_evaluation` tests
each design's models on the other designs' test splits, so a reader sees how much of a score survives a change
of normals.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidxray import LABELS, limits
from covidxray.data.build import BuildConfig, SourceFolders, build_dataset
from covidxray.data.designs import get_design
from covidxray.data.images import DEFAULT_MAX_PIXELS
from covidxray.data.manifest import dataset_provenance, dataset_summary, read_manifest, split_frame
from covidxray.errors import DataError, ModelError
from covidxray.evaluation.baseline import baseline_probabilities, fit_baseline_with_threshold
from covidxray.evaluation.evaluate import evaluate_model, evaluate_predictions
from covidxray.evaluation.figures import plot_reliability, plot_roc_pr, results_table
from covidxray.metrics import format_metric, seed_summary
from covidxray.outputs import OutputDir, claim_output, synthetic_note
from covidxray.training.compute_dtype import PRECISIONS

DEFAULT_LR = {"scratch": 1e-3, "scratch-gap": 1e-3, "vgg16": 1e-4}
"""Adam learning rates: the Keras default for the scratch CNNs, lower for the pretrained backbone."""


@dataclass
class ReproduceConfig:
    """What to train and how; saved in results.json."""

    models: tuple[str, ...] = ("scratch", "vgg16")
    weights: str = "imagenet"
    """VGG16 backbone weights: imagenet, hed, none or a file."""
    epochs: int = 20
    image_size: int = 224
    batch_size: int = 32
    seeds: int = 1
    n_boot: int = 2000
    patience: int = 5
    augment: bool = True
    caps: dict[str, int] = field(default_factory=dict)
    views: tuple[str, ...] | None = None
    baseline_size: int = 32
    cache: str | None = "memory"
    design: str = "original"
    """Which images form each class (see covidxray.data.designs): original, adult-normals or all."""
    precision: str = "float32"
    """Compute precision of training and test predictions (see covidxray.training.compute_dtype)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Larger source images are skipped (and listed) by the dataset build (``--max-pixels``)."""

    def validate(self) -> None:
        """Raise ModelError naming each setting (and its ``covidxray reproduce`` flag) that is out of range."""
        from covidxray.training.models import MODEL_NAMES

        checks = [
            ("epochs", self.epochs, limits.POSITIVE_INT, "--epochs"),
            ("image_size", self.image_size, limits.IMAGE_SIZE, "--image-size"),
            ("batch_size", self.batch_size, limits.POSITIVE_INT, None),
            ("seeds", self.seeds, limits.POSITIVE_INT, "--seeds"),
            ("n_boot", self.n_boot, limits.N_BOOT, "--n-boot"),
            ("patience", self.patience, limits.NON_NEGATIVE_INT, None),
            ("baseline_size", self.baseline_size, limits.POSITIVE_INT, None),
            *((f"caps[{label!r}]", n, limits.POSITIVE_INT, "--cap") for label, n in self.caps.items()),
        ]
        problems = [p for name, value, valid, flag in checks if (p := limits.out_of_range(name, value, valid, flag))]
        problems += [f"caps: unknown label {label!r} (--cap LABEL=N takes one of {list(LABELS)})"
                     for label in self.caps if label not in LABELS]
        if self.precision not in PRECISIONS:
            problems.append(f"precision (--precision) must be one of {list(PRECISIONS)}")
        if not self.models:
            problems.append(f"models (--models) is empty; name at least one of {list(MODEL_NAMES)}")
        problems += [f"models (--models): unknown model {m!r}; use {list(MODEL_NAMES)}"
                     for m in self.models if m not in MODEL_NAMES]
        if problems:
            raise ModelError("bad reproduce settings: " + "; ".join(problems) + ".", usage=True)


def _build(config: ReproduceConfig, out_root: Path, sources: SourceFolders, data: str | Path | None,
           progress: bool) -> Path:
    if data is not None:
        return Path(data)
    bcfg = BuildConfig(caps=dict(config.caps), max_pixels=config.max_pixels)
    if config.views:
        bcfg.views = tuple(config.views)
    dataset = out_root / "dataset"
    build_dataset(dataset, **asdict(sources), design=config.design, config=bcfg, progress=progress)
    return dataset


def design_notes(summary: Mapping[str, Any]) -> str:
    """Markdown lines under a results table: the dataset's design, what it left out, its confounder warnings."""
    design = summary.get("design") or {}
    warnings = (summary.get("confounders") or {}).get("warnings")
    if not design and warnings is None:
        return ""
    lines = [""]
    if design:
        lines.append(f"Design: **{design['name']}** ({design['description']}).")
        lines.extend(f"- {note}" for note in design.get("notes", []))
    if warnings is not None:
        quiet = " (classes balanced on the checks: source, format, mode, view, sex, size, age)."
        lines.append(f"Confounder warnings: {len(warnings)}" + (":" if warnings else quiet))
        lines.extend(f"- {w['message']}" for w in warnings)
    return "\n".join(lines) + "\n"


def train_config(model: str, config: ReproduceConfig, seed: int):
    """The TrainConfig of one row of the table."""
    from covidxray.runs.train import TrainConfig

    return TrainConfig(model=model, weights=config.weights if model == "vgg16" else "none",
                       image_size=config.image_size, batch_size=config.batch_size, epochs=config.epochs,
                       lr=DEFAULT_LR.get(model, 1e-3), seed=seed, patience=config.patience, augment=config.augment,
                       cache=config.cache, precision=config.precision)


def reproduce(
    config: ReproduceConfig,
    out_root: str | Path,
    *,
    presplit: str | Path | None = None,
    metadata: str | Path | None = None,
    chest_xray: str | Path | None = None,
    covid_xray: str | Path | None = None,
    nih: str | Path | None = None,
    extra: Sequence[str | Path] = (),
    design: str | None = None,
    data: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (unless ``data``), train every model with every seed, evaluate once on test, write the table.

    ``design`` (default: ``config.design``) picks the images of each class from the given sources; the table
    ends with the dataset's design and confounder warnings.
    """

    config.validate()
    _check_weights(config)
    if design is not None:
        config = dataclasses.replace(config, design=get_design(design).name)
    out_root = Path(out_root)
    sources = SourceFolders(chest_xray, covid_xray, presplit, metadata, nih, tuple(extra))
    with claim_output(out_root, "reproduce", sources=[*sources.paths(), data]) as out:
        for folder in ("runs", "eval"):
            with claim_output(out_root / folder, "reproduce"):
                pass
        return _reproduce(config, out, sources, data=data, progress=progress)


def _reproduce(config: ReproduceConfig, out: OutputDir, sources: SourceFolders, *, data: str | Path | None,
               progress: bool) -> dict[str, Any]:
    """The table proper, written into the claimed ``out``."""
    from covidxray.runs.load import load_run, predict_dataframe, versions
    from covidxray.runs.train import dataset_record, train

    t0 = time.perf_counter()
    out_root = out.path
    dataset = _build(config, out_root, sources, data, progress)
    df = read_manifest(dataset)
    train_df, val_df, test_df = (split_frame(df, s) for s in ("train", "val", "test"))

    rows: list[dict[str, Any]] = []
    probs_by_model: dict[str, np.ndarray] = {}

    t = time.perf_counter()
    base, base_thr = fit_baseline_with_threshold(train_df, val_df, size=config.baseline_size)
    base_p = baseline_probabilities(base, test_df, size=config.baseline_size)
    row = evaluate_predictions(test_df, base_p, threshold=base_thr, name="baseline: logistic regression",
                               weights=f"{config.baseline_size}x{config.baseline_size} thumbnails",
                               n_boot=config.n_boot, out_dir=out_root / "eval" / "baseline",
                               notes="trivial baseline: raw grayscale thumbnails, no CNN")
    row["wall_s"] = round(time.perf_counter() - t, 1)
    rows.append(row)
    probs_by_model["baseline"] = base_p

    for model in config.models:
        per_seed: list[dict[str, Any]] = []
        first: dict[str, Any] | None = None
        for seed in range(config.seeds):
            tcfg = train_config(model, config, seed)
            run_dir = out_root / "runs" / f"{model}-s{seed}"
            t = time.perf_counter()
            summary = train(tcfg, dataset, run_dir, progress=progress, resume=True)
            keras_model, meta = load_run(run_dir, precision=config.precision)
            p = predict_dataframe(keras_model, test_df, config.image_size)
            thr = float(meta.get("threshold", 0.5))
            res = evaluate_predictions(test_df, p, threshold=thr, name=model, weights=tcfg.weights or "none",
                                       n_boot=config.n_boot if seed == 0 else 0,
                                       out_dir=out_root / "eval" / f"{model}-s{seed}")
            res["wall_s"] = round(time.perf_counter() - t, 1)
            res["epochs_run"] = summary.get("epochs_run", summary.get("epochs"))
            per_seed.append(res)
            if first is None:
                first = res
                probs_by_model[model] = p
        assert first is not None
        best = first.get("epochs_run")
        first["notes"] = (f"{config.epochs} epochs max (early stop on val), {config.image_size} px; "
                          f"threshold {first['threshold']:.2f} from val" + (f"; ran {best}" if best else ""))
        if config.seeds > 1:
            first["seeds"] = seed_summary([r["metrics"] for r in per_seed])
            first["n_seeds"] = config.seeds
        first["per_seed"] = [r["metrics"] for r in per_seed]
        rows.append(first)

    summary = dataset_summary(dataset)
    record = dataset_record(dataset)
    data = dataset_provenance(dataset)
    out.set_data(data)
    note = synthetic_note(data)
    table = ((f"**{note}**\n\n" if note else "") + results_table(rows) + design_notes(summary)
             + f"\nDataset: {record['path']} (manifest fingerprint {record['fingerprint']}).\n")
    y = test_df["y"].to_numpy()
    out.put("roc_pr.png", lambda tmp: plot_roc_pr(y, probs_by_model, path=tmp))
    out.put("reliability.png", lambda tmp: plot_reliability(y, probs_by_model, path=tmp))
    counts = {s: {lab: int(((df["split"] == s) & (df["label"] == lab)).sum()) for lab in ("normal", "covid")}
              for s in ("train", "val", "test")}
    result = {
        "config": {**asdict(config), "models": list(config.models)},
        "dataset": {**record, "counts": counts, "presplit": sources.presplit is not None,
                    "design": (summary.get("design") or {}).get("name", config.design if data is None else None),
                    "confounder_warnings": [w["message"] for w in
                                            (summary.get("confounders") or {}).get("warnings", [])]},
        "rows": rows,
        "synthetic": data["synthetic"],
        "table": table,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "versions": versions()},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    out.write_json("results.json", result)
    out.write_text("results.md", table)
    return result


_CROSS_METRICS = ("accuracy", "specificity", "recall", "roc_auc", "n", "n_pos", "tn", "fp")


def unseen_test_split(dataset: Path, trained_on: Path) -> tuple[pd.DataFrame, int]:
    """The test split of ``dataset`` without any image (sha256) or patient the other dataset trained or validated on."""
    test = split_frame(read_manifest(dataset), "test")
    if dataset.resolve() == trained_on.resolve():
        return test, 0
    seen = read_manifest(trained_on)
    seen = seen[seen["split"].isin(("train", "val"))]
    overlap = test["sha256"].isin(set(seen["sha256"])) | test["patient_id"].isin(set(seen["patient_id"]))
    return test[~overlap].reset_index(drop=True), int(overlap.sum())


def _write_labeled_csv(df: pd.DataFrame, out: OutputDir, name: str) -> Path:
    """A ``path,label,patient_id,source`` CSV of ``df`` in ``out`` with paths relative to it
    (covidxray.data.labeled_sets
    reads it)."""
    rel = [Path(os.path.relpath(f, out.path)).as_posix() for f in df["filepath"]]
    table = pd.DataFrame({"path": rel, "label": df["label"], "patient_id": df["patient_id"], "source": df["source"]})
    return out.write_csv(name, table)


def _cell(result: Mapping[str, Any]) -> dict[str, Any]:
    metrics = result["metrics"]
    return {k: metrics.get(k) for k in _CROSS_METRICS}


def cross_design_evaluation(
    trained: Mapping[str, tuple[str | Path, Mapping[str, str | Path]]],
    out_dir: str | Path,
    *,
    n_boot: int = 2000,
    baseline_size: int | None = 32,
) -> dict[str, Any]:
    """Evaluate every design's trained runs on every design's test split (its own and the others').

    ``trained`` maps a design name to (its built dataset, {model name: run folder}). Each run is tested with
    ``evaluate_model`` and the threshold it chose on its own validation split; ``baseline_size`` adds the
    thumbnail logistic regression trained on each design. On another design's test split, images and patients
    the model was trained or validated on are left out (the designs share their COVID-19 images) and the count
    is noted. Returns rows, a matrix {model: {trained on: {tested on: metrics}}}, notes and a Markdown table,
    also written to ``out_dir``/results.md and results.json.
    """

    out_dir = Path(out_dir)
    datasets = {d: Path(ds) for d, (ds, _) in trained.items()}
    with claim_output(out_dir, "reproduce", sources=datasets.values()) as out:
        return _cross(trained, datasets, out, n_boot=n_boot, baseline_size=baseline_size)


def _cross(trained: Mapping[str, tuple[str | Path, Mapping[str, str | Path]]], datasets: dict[str, Path],
           out: OutputDir, *, n_boot: int, baseline_size: int | None) -> dict[str, Any]:
    """The cross-design evaluation proper, written into the claimed ``out``."""
    from covidxray.evaluation.baseline import baseline_probabilities, fit_baseline_with_threshold

    out_dir = out.path
    rows: list[dict[str, Any]] = []
    matrix: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    left_out: dict[str, dict[str, int]] = {}
    for train_design, (_, runs) in trained.items():
        models: dict[str, Any] = {}
        if baseline_size:
            df = read_manifest(datasets[train_design])
            models["baseline"] = fit_baseline_with_threshold(split_frame(df, "train"), split_frame(df, "val"),
                                                             size=baseline_size)
        models.update({name: Path(run) for name, run in runs.items()})
        for test_design, test_dataset in datasets.items():
            test, n_out = unseen_test_split(test_dataset, datasets[train_design])
            left_out.setdefault(train_design, {})[test_design] = n_out
            tag = f"{train_design}-on-{test_design}"
            data: Path = test_dataset
            with claim_output(out_dir / tag, "reproduce") as tag_out:
                if n_out:
                    data = _write_labeled_csv(test, tag_out, "test-unseen.csv")
            notes = f"tested on {test_design} test" + (" (own design)" if test_design == train_design else "")
            notes += f" ({n_out} images seen in training left out)" if n_out else ""
            for name, model in models.items():
                if name == "baseline":
                    base, thr = model
                    p = baseline_probabilities(base, test, size=baseline_size)
                    res = evaluate_predictions(test, p, threshold=thr, name="baseline: logistic regression",
                                               weights=f"{baseline_size}x{baseline_size} thumbnails", n_boot=n_boot,
                                               out_dir=out_dir / tag / "baseline")
                else:
                    res = evaluate_model(model, data, split=None if n_out else "test", n_boot=n_boot,
                                         out_dir=out_dir / tag / name)
                    res = {k: v for k, v in res.items() if k not in ("data", "markdown")}
                res.update(model=f"{res['model']} (trained on {train_design})", notes=notes,
                           trained_on=train_design, tested_on=test_design)
                rows.append(res)
                matrix.setdefault(name, {}).setdefault(train_design, {})[test_design] = _cell(res)
    notes = _cross_notes(matrix, left_out)
    table = results_table(rows) + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    result = {"designs": list(trained), "rows": rows, "matrix": matrix, "left_out": left_out, "notes": notes,
              "table": table}
    out.write_json("results.json", result)
    out.write_text("results.md", table)
    return result


def _cross_notes(matrix: Mapping[str, Any], left_out: Mapping[str, Mapping[str, int]]) -> list[str]:
    """One sentence per model and pair of designs: its score at home and away, and how many normals it calls COVID."""
    notes = []
    for name, by_train in matrix.items():
        for train_design, by_test in by_train.items():
            home = by_test.get(train_design)
            for test_design, cell in by_test.items():
                if test_design == train_design or home is None:
                    continue
                normals = (cell["tn"] or 0) + (cell["fp"] or 0)
                called = f"{cell['fp']} of {normals}" if normals else "no normals"
                at_home, away = format_metric(home["accuracy"]), format_metric(cell["accuracy"])
                false_covid = format_metric(1 - cell["specificity"]) if normals else "n/a"
                notes.append(
                    f"{name} trained on {train_design}: accuracy {at_home} on its own test split, "
                    f"{away} on the {test_design} test split; it calls {false_covid} of the {test_design} normals "
                    f"COVID ({called}; {format_metric(1 - home['specificity'])} of its own)"
                    + (f"; {left_out[train_design][test_design]} images it had seen left out" if
                       left_out[train_design][test_design] else ""))
    return notes


def _check_weights(config: ReproduceConfig) -> None:
    """Fail before any work when the VGG16 weights of ``config`` cannot be had (e.g. ImageNet offline)."""
    if "vgg16" in config.models:
        from covidxray.training.backbones import check_weights_available

        check_weights_available(config.weights)


def reproduce_designs(
    config: ReproduceConfig,
    out_root: str | Path,
    *,
    designs: Sequence[str] = ("original", "adult-normals"),
    chest_xray: str | Path | None = None,
    covid_xray: str | Path | None = None,
    nih: str | Path | None = None,
    extra: Sequence[str | Path] = (),
    metadata: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run :func:`reproduce` once per design (``out_root/<design>/``), then the cross-design evaluation of the
    first seed's runs (``out_root/cross/``). Returns {"designs": {name: reproduce result}, "cross": ...}."""
    config.validate()
    _check_weights(config)
    out_root = Path(out_root)
    names = [get_design(d).name for d in designs]
    if len(set(names)) != len(names):
        raise DataError(f"designs {list(designs)}: each design once, please.")
    with claim_output(out_root, "reproduce", sources=[chest_xray, covid_xray, nih, *extra, metadata]):
        pass
    results = {d: reproduce(config, out_root / d, chest_xray=chest_xray, covid_xray=covid_xray, nih=nih,
                            extra=extra, metadata=metadata, design=d, progress=progress) for d in names}
    out: dict[str, Any] = {"designs": results}
    if len(names) > 1:
        trained = {d: (out_root / d / "dataset", {m: out_root / d / "runs" / f"{m}-s0" for m in config.models})
                   for d in names}
        out["cross"] = cross_design_evaluation(trained, out_root / "cross", n_boot=config.n_boot,
                                               baseline_size=config.baseline_size)
    return out
