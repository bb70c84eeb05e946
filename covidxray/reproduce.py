"""The results table in one call: dataset, trivial baseline, both models (N seeds), test evaluation, files.

Every row is labeled with what it used (model, backbone weights, split, seeds, epochs, image size) and the
machine and wall time are recorded, so a reader can tell exactly what a number means. The test split is read
only here, after training has finished with validation-only model selection.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covidxray.baseline import baseline_probabilities, fit_thumbnail_baseline
from covidxray.build import BuildConfig, build_dataset
from covidxray.evaluate import evaluate_predictions
from covidxray.manifest import read_manifest, split_frame
from covidxray.metrics import choose_threshold, seed_summary
from covidxray.report import plot_reliability, plot_roc_pr, results_table, write_json, write_text

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


def _build(config: ReproduceConfig, out_root: Path, *, presplit, metadata, chest_xray, covid_xray, data,
           progress: bool) -> Path:
    if data is not None:
        return Path(data)
    bcfg = BuildConfig(caps=dict(config.caps))
    if config.views:
        bcfg.views = tuple(config.views)
    dataset = out_root / "dataset"
    build_dataset(dataset, chest_xray=chest_xray, covid_xray=covid_xray, presplit=presplit, metadata=metadata,
                  config=bcfg, progress=progress)
    return dataset


def train_config(model: str, config: ReproduceConfig, seed: int):
    """The TrainConfig of one row of the table."""
    from covidxray.train import TrainConfig

    return TrainConfig(model=model, weights=config.weights if model == "vgg16" else "none",
                       image_size=config.image_size, batch_size=config.batch_size, epochs=config.epochs,
                       lr=DEFAULT_LR.get(model, 1e-3), seed=seed, patience=config.patience, augment=config.augment,
                       cache=config.cache)


def reproduce(
    config: ReproduceConfig,
    out_root: str | Path,
    *,
    presplit: str | Path | None = None,
    metadata: str | Path | None = None,
    chest_xray: str | Path | None = None,
    covid_xray: str | Path | None = None,
    data: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (unless ``data``), train every model with every seed, evaluate once on test, write the table."""
    from covidxray.train import load_run, predict_dataframe, train, versions

    t0 = time.perf_counter()
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    dataset = _build(config, out_root, presplit=presplit, metadata=metadata, chest_xray=chest_xray,
                     covid_xray=covid_xray, data=data, progress=progress)
    df = read_manifest(dataset)
    train_df, val_df, test_df = (split_frame(df, s) for s in ("train", "val", "test"))

    rows: list[dict[str, Any]] = []
    probs_by_model: dict[str, np.ndarray] = {}

    t = time.perf_counter()
    base = fit_thumbnail_baseline(train_df, size=config.baseline_size)
    base_thr = choose_threshold(val_df["y"], baseline_probabilities(base, val_df, size=config.baseline_size))
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
            summary = train(tcfg, dataset, run_dir, progress=progress)
            keras_model, meta = load_run(run_dir)
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

    table = results_table(rows)
    y = test_df["y"].to_numpy()
    plot_roc_pr(y, probs_by_model, path=out_root / "roc_pr.png")
    plot_reliability(y, probs_by_model, path=out_root / "reliability.png")
    counts = {s: {lab: int(((df["split"] == s) & (df["label"] == lab)).sum()) for lab in ("normal", "covid")}
              for s in ("train", "val", "test")}
    result = {
        "config": {**asdict(config), "models": list(config.models)},
        "dataset": {"counts": counts, "presplit": presplit is not None},
        "rows": rows,
        "table": table,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "versions": versions()},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    write_json(result, out_root / "results.json")
    write_text(table, out_root / "results.md")
    return result
