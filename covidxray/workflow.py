"""Small conveniences the notebooks and the demo share: where the data comes from, and tables about it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from covidxray import LABELS, paths
from covidxray.errors import DataError
from covidxray.manifest import SPLITS


@dataclass(frozen=True)
class Sources:
    """The two source folders a build reads, and a sentence saying what they are."""

    chest_xray: Path
    covid_xray: Path
    description: str


def resolve_sources(
    mode: str = "auto",
    *,
    chest_xray: str | Path = paths.CHEST_XRAY_DIR,
    covid_xray: str | Path = paths.COVID_XRAY_DIR,
    seed_dataset: str | Path | None = None,
    seed_metadata: str | Path | None = None,
    work_dir: str | Path = paths.RUNS_DIR / "sources",
    synthetic_patients: tuple[int, int] = (60, 40),
) -> Sources:
    """Pick the sources: ``folders`` (the user's downloads), ``seed`` (the 2020 images laid out as the two
    public sources), ``synthetic`` (generated; ``synthetic_patients`` = normal and COVID patients), or ``auto``
    (folders when they hold data, else synthetic)."""
    chest_xray, covid_xray, work_dir = Path(chest_xray), Path(covid_xray), Path(work_dir)
    if mode == "auto":
        mode = "folders" if paths.has_files(chest_xray) and paths.has_files(covid_xray) else "synthetic"
    if mode == "folders":
        return Sources(chest_xray, covid_xray, f"real downloads in {chest_xray}/ and {covid_xray}/")
    if mode == "seed":
        from covidxray.relayout import presplit_as_sources

        if seed_dataset is None or seed_metadata is None:
            raise DataError("mode 'seed' needs seed_dataset (the 2020 Dataset/ folder) and seed_metadata "
                            "(the ieee8023 metadata.csv it was selected from).")
        chest, covid = presplit_as_sources(seed_dataset, seed_metadata, work_dir / "seed")
        return Sources(chest, covid, "the 2020 project's images, laid out again as the two public sources "
                       "(Kermany normals; ieee8023 COVID images with their 2020 metadata)")
    if mode == "synthetic":
        from covidxray.synthetic import make_synthetic_sources

        n_normal, n_covid = synthetic_patients
        layout = make_synthetic_sources(work_dir / "synthetic", n_normal_patients=n_normal, n_covid_patients=n_covid)
        return Sources(layout.chest_xray, layout.covid_xray,
                       "the embedded SYNTHETIC data (procedural images; numbers say nothing about X-rays)")
    raise DataError(f"unknown sources mode {mode!r}; use auto, folders, seed or synthetic.")


def counts_table(df: pd.DataFrame) -> pd.DataFrame:
    """Images and patients per split and class, with totals: the first table a reader wants."""
    rows = []
    for split in SPLITS:
        part = df[df["split"] == split]
        row: dict[str, object] = {"split": split}
        for label in LABELS:
            sub = part[part["label"] == label]
            row[f"{label} images"] = len(sub)
            row[f"{label} patients"] = sub["patient_id"].nunique()
        rows.append(row)
    table = pd.DataFrame(rows).set_index("split")
    table.loc["total"] = table.sum()
    table.loc["total", [f"{lab} patients" for lab in LABELS]] = [
        df.loc[df["label"] == lab, "patient_id"].nunique() for lab in LABELS
    ]
    return table


def crosstab(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Images per class and value of ``column`` (source, format, mode, view): where classes differ trivially."""
    values = df[column].replace("", "unknown").fillna("unknown")
    return pd.crosstab(values, df["label"]).reindex(columns=list(LABELS), fill_value=0)


def evaluate_runs(
    data: str | Path,
    runs: dict[str, str | Path],
    *,
    n_boot: int = 2000,
    baseline: bool = True,
    baseline_size: int = 32,
) -> tuple[list[dict], dict[str, object], pd.DataFrame]:
    """Evaluate trained runs once on the test split, with the trivial thumbnail baseline as the first row.

    Returns the results-table rows, the test probabilities per model, and the test frame. Thresholds come
    from each run (chosen on validation); the baseline's is chosen on validation here.
    """
    from covidxray.baseline import baseline_probabilities, fit_baseline_with_threshold
    from covidxray.evaluate import evaluate_predictions
    from covidxray.manifest import read_manifest, split_frame
    from covidxray.model_io import load_run, predict_dataframe
    from covidxray.train import check_trained_on

    df = read_manifest(data)
    train_df, val_df, test_df = (split_frame(df, s) for s in SPLITS)
    rows: list[dict] = []
    probs: dict[str, object] = {}
    if baseline:
        base, thr = fit_baseline_with_threshold(train_df, val_df, size=baseline_size)
        p = baseline_probabilities(base, test_df, size=baseline_size)
        rows.append(evaluate_predictions(test_df, p, threshold=thr, name="baseline: logistic regression",
                                         weights=f"{baseline_size}x{baseline_size} thumbnails", n_boot=n_boot))
        probs["baseline"] = p
    for name, run in runs.items():
        check_trained_on(run, data)
        model, meta = load_run(run)
        p = predict_dataframe(model, test_df, int(model.input_shape[1]))
        config = meta.get("config", {})
        rows.append(evaluate_predictions(test_df, p, threshold=float(meta.get("threshold", 0.5)), name=name,
                                         weights=str(config.get("weights", "")), n_boot=n_boot,
                                         out_dir=Path(run) / "eval-test"))
        probs[name] = p
    return rows, probs, test_df


def ensure_demo_run(
    run_dir: str | Path,
    data: str | Path,
    *,
    model: str = "scratch-gap",
    epochs: int = 5,
    image_size: int = 64,
    work_dir: str | Path = paths.RUNS_DIR / "sources",
) -> Path:
    """A trained run at ``run_dir``: the existing one, or a small one trained now (building a synthetic
    dataset at ``data`` first when there is none), so the explanation notebook always runs top to bottom."""
    from covidxray.build import build_dataset
    from covidxray.train import TrainConfig, check_trained_on, train

    run_dir, data = Path(run_dir), Path(data)
    if (run_dir / "model.keras").is_file():
        check_trained_on(run_dir, data)
        return run_dir
    if not (data / "manifest.csv").is_file():
        sources = resolve_sources("synthetic", work_dir=work_dir, synthetic_patients=(160, 130))
        build_dataset(data, chest_xray=sources.chest_xray, covid_xray=sources.covid_xray, progress=False)
    train(TrainConfig(model=model, weights="none", epochs=epochs, image_size=image_size, batch_size=16, lr=1e-3),
          data, run_dir, progress=False)
    return run_dir


def layer_table(model) -> pd.DataFrame:
    """The model's layers as a plain table (name, type, output shape, parameters, trainable), for notebooks."""
    rows = []
    for layer in model.layers:
        shape = getattr(getattr(layer, "output", None), "shape", None)
        rows.append({"layer": layer.name, "type": type(layer).__name__,
                     "output shape": "" if shape is None else str(tuple(shape)),
                     "parameters": layer.count_params() if layer.built else 0, "trainable": layer.trainable})
    table = pd.DataFrame(rows).set_index("layer")
    table.attrs["total"] = int(table["parameters"].sum())
    return table


def design_table(summaries: dict[str, dict]) -> pd.DataFrame:
    """Designs side by side: images per class, where each class comes from, its age, and the confounder warnings."""
    columns = {}
    for name, summary in summaries.items():
        conf = summary.get("confounders") or {}
        col: dict[str, object] = {}
        for label in LABELS:
            n = sum(summary["counts"][s][label] for s in SPLITS)
            by_class = (conf.get("by_class") or {}).get(label, {})
            sources = by_class.get("source") or {}
            age = by_class.get("age") or {}
            col[f"{label}: images"] = n
            col[f"{label}: sources"] = ", ".join(f"{k} {v:.0%}" for k, v in sorted(sources.items()))
            col[f"{label}: median age"] = age.get("median") if age.get("known") else "unknown"
        warnings = conf.get("warnings") or []
        col["confounder warnings"] = len(warnings)
        for i, warning in enumerate(warnings, start=1):
            col[f"warning {i}"] = warning["message"]
        columns[name] = col
    return pd.DataFrame(columns).fillna("")
