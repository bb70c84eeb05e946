"""The README's results tables, generated from the committed results files (``results/*.json``).

``python -m bench.seeds`` runs the reproductions behind README tables 1-3 with several training seeds and
copies their results files into ``results/``. This module turns those files into Markdown: per model the mean and
sample standard deviation over the seeds (every per-seed row is in the files), seed 0's value with its 95 %
patient-bootstrap interval beside it, the cross-design matrix, and the wall time of the whole job. The README
holds each table between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``;
``python -m covidxray.results_tables`` rewrites those sections and ``--check`` lists the ones that disagree with
the files (the test suite runs the check). The notebooks show the same tables through :func:`markdown`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from covidxray.errors import DataError
from covidxray.metrics import format_metric, seed_summary
from covidxray.outputs import write_text
from covidxray.report import mean_std

RESULTS_DIR = Path("results")
README = Path("README.md")

FILES: dict[str, str] = {
    "table1": "table1-2020-split.json",
    "table2": "table2-patient-split.json",
    "table3": "table3-adult-normals.json",
    "cross": "table3-cross-design.json",
    "timing": "timing.json",
}
"""Results file of each table (in ``results/``)."""

MODEL_NAMES: dict[str, str] = {
    "baseline: logistic regression": "baseline: logistic regression",
    "baseline": "baseline",
    "scratch": "scratch CNN",
    "scratch-gap": "scratch GAP CNN",
    "vgg16": "VGG16 transfer",
}
"""How the README names each model of the results files."""

REPORTED_2020: tuple[tuple[str, str, str], ...] = (
    ("2020 notebook, scratch CNN (as reported)", "none", "97.06 %"),
    ("2020 notebook, VGG16 (as reported)", "imagenet", "98.24 %"),
)
"""The 2020 project's own accuracies (quoted from its notebooks; precision, recall and F1 were left blank)."""

SEED_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("accuracy", "accuracy", True),
    ("precision", "precision", True),
    ("recall", "recall", True),
    ("specificity", "specificity", True),
    ("f1", "F1", True),
    ("roc_auc", "ROC-AUC", False),
)
"""(metric key, column header, shown in percent) of the mean ± std columns."""

_SECTION = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def load_results(results_dir: str | Path = RESULTS_DIR) -> dict[str, Any]:
    """Every results file of :data:`FILES` in ``results_dir``, by table name; DataError naming a missing file."""
    results_dir = Path(results_dir)
    out: dict[str, Any] = {}
    for name, file in FILES.items():
        path = results_dir / file
        if not path.is_file():
            raise DataError(f"{path}: not found; run `python -m bench.seeds` (see the README's Results section) to "
                            "write the results files.")
        out[name] = json.loads(path.read_text(encoding="utf-8"))
    return out


def _model_name(row: Mapping[str, Any]) -> str:
    return MODEL_NAMES.get(str(row.get("model")), str(row.get("model")))


def _seed_runs(row: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The per-seed metrics of a row: its ``per_seed`` list, or the row's own metrics for a deterministic model."""
    return list(row.get("per_seed") or [row["metrics"]])


def seed_table(result: Mapping[str, Any], *, reported: Sequence[tuple[str, str, str]] = ()) -> str:
    """One design's table: per model the mean ± std over seeds of each metric, seed 0 with its interval, the
    epochs seed 0 ran and its wall time. ``reported`` rows (name, weights, accuracy) are quoted first."""
    header = (["model", "weights", "seeds"] + [f"{name} (mean ± std)" for _, name, _ in SEED_METRICS]
              + ["seed 0: accuracy [95 % CI]", "seed 0: ROC-AUC [95 % CI]", "seed 0: epochs run", "seed 0: wall time"])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for name, weights, accuracy in reported:
        lines.append("| " + " | ".join([name, weights, "", accuracy] + [""] * (len(header) - 4)) + " |")
    max_epochs = (result.get("config") or {}).get("epochs")
    for row in result["rows"]:
        runs = _seed_runs(row)
        deterministic = "per_seed" not in row
        summary = seed_summary(runs)
        cells = [_model_name(row), str(row.get("weights") or ""),
                 "no seed (deterministic)" if deterministic else str(len(runs))]
        for key, _, percent in SEED_METRICS:
            mean, std = summary.get(key, (float("nan"), float("nan")))
            cells.append(format_metric(mean, percent=percent) if deterministic else mean_std(mean, std, percent))
        ci = row.get("ci") or {}
        metrics = row["metrics"]
        cells.append(format_metric(metrics.get("accuracy"), ci.get("accuracy")))
        cells.append(format_metric(metrics.get("roc_auc"), ci.get("roc_auc"), percent=False))
        epochs = row.get("epochs_run")
        cells.append(f"{epochs} of {max_epochs}" if epochs is not None and max_epochs else "")
        cells.append(f"{row['wall_s']:.0f} s" if row.get("wall_s") is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_seed_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Every seed of every model of every design: accuracy, ROC-AUC and F1 (the rows behind the means)."""
    lines = ["| table | model | seed | accuracy | ROC-AUC | F1 |", "|---|---|---|---|---|---|"]
    for table, result in results.items():
        for row in result["rows"]:
            if "per_seed" not in row:
                continue
            for seed, m in enumerate(row["per_seed"]):
                lines.append(f"| {table} | {_model_name(row)} | {seed} | {format_metric(m.get('accuracy'))} | "
                             f"{format_metric(m.get('roc_auc'), percent=False)} | {format_metric(m.get('f1'))} |")
    return "\n".join(lines) + "\n"


def split_counts(result: Mapping[str, Any]) -> str:
    """"231 train, 41 val, 68 test images (28 covid)": the dataset's split sizes from a results file."""
    counts = result["dataset"]["counts"]
    n = {split: sum(counts[split].values()) for split in ("train", "val", "test")}
    return (f"{n['train']} train, {n['val']} val, {n['test']} test images ({counts['test']['covid']} covid); "
            f"manifest fingerprint {result['dataset']['fingerprint']}")


def cross_table(cross: Mapping[str, Any], designs: Mapping[str, tuple[str, str]]) -> str:
    """Each seed-0 model on its own and on the other design's test split. ``designs``: design -> (display name,
    who its normals are), in the order to show."""
    matrix = cross["matrix"]
    lines = ["| trained on | model | own test: accuracy | other test: accuracy | other test: ROC-AUC | "
             "other design's normals called COVID |", "|---|---|---|---|---|---|"]
    for trained, (shown, _) in designs.items():
        for model, by_design in matrix.items():
            cells = by_design.get(trained)
            if not cells:
                continue
            for other, cell in cells.items():
                if other == trained:
                    continue
                normals = int(cell["fp"]) + int(cell["tn"])
                lines.append(f"| {shown} | {MODEL_NAMES.get(model, model)} | "
                             f"{format_metric(cells[trained]['accuracy'])} | {format_metric(cell['accuracy'])} | "
                             f"{format_metric(cell['roc_auc'], percent=False)} | "
                             f"{int(cell['fp'])} of {normals} {designs.get(other, (other, other))[1]} normals |")
    return "\n".join(lines) + "\n"


def _setup(result: Mapping[str, Any]) -> str:
    config = result["config"]
    return (f"{config['seeds']} seeds (0-{config['seeds'] - 1}), {config['image_size']} px, at most "
            f"{config['epochs']} epochs (early stopping on validation), VGG16 weights `{config['weights']}`, "
            f"precision {config['precision']}")


def timing_text(timing: Mapping[str, Any]) -> str:
    """One paragraph: the wall time of the multi-seed job, per reproduction, and the machine it ran on."""
    wall = timing["wall_s"]
    cpu = timing.get("cpu") or {}
    versions = timing.get("versions") or {}
    soft = ", ".join(f"{k} {versions[k]}" for k in ("tensorflow", "keras") if k in versions)
    return (f"Wall time of the whole job (`python -m bench.seeds`, {timing['seeds']} seeds, "
            f"precision {timing['precision']}): **{wall['all'] / 60:.1f} minutes** ({wall['table1'] / 60:.1f} for "
            f"table 1, {wall['tables2-3'] / 60:.1f} for tables 2 and 3 with the cross-design evaluation), on a "
            f"{cpu.get('cores', '?')}-core {cpu.get('model', 'CPU')} (bf16 instructions: "
            f"{', '.join(cpu.get('bf16_flags') or []) or 'none'}){'; ' + soft if soft else ''}.\n")


def sections(results: Mapping[str, Any]) -> dict[str, str]:
    """Every generated README section, by marker name."""
    designs = {"original": ("original (pediatric normals)", "pediatric"), "adult-normals": ("adult-normals", "adult")}
    tables = {"table1": results["table1"], "table2": results["table2"], "table3": results["table3"]}
    return {
        "table1-setup": f"{split_counts(results['table1'])}; {_setup(results['table1'])}.\n",
        "table1": seed_table(results["table1"], reported=REPORTED_2020),
        "table2-setup": f"{split_counts(results['table2'])}; {_setup(results['table2'])}.\n",
        "table2": seed_table(results["table2"]),
        "table3-setup": f"{split_counts(results['table3'])}; {_setup(results['table3'])}.\n",
        "table3": seed_table(results["table3"]),
        "table3-cross": cross_table(results["cross"], designs),
        "per-seed": per_seed_table(tables),
        "timing": timing_text(results["timing"]),
    }


def markdown(names: Sequence[str], results_dir: str | Path = RESULTS_DIR) -> str:
    """The generated sections ``names`` (see :func:`sections`) one after the other, for a notebook to display."""
    generated = sections(load_results(results_dir))
    unknown = [name for name in names if name not in generated]
    if unknown:
        raise DataError(f"no results section {unknown}; the sections are {list(generated)}.")
    return "\n".join(generated[name] for name in names)


def update_text(text: str, generated: Mapping[str, str]) -> tuple[str, list[str]]:
    """``text`` with each marked section replaced by its generated body; also the names of those that changed.
    DataError when a generated section has no markers in ``text``."""
    missing = [name for name in generated if f"<!-- results:{name} -->" not in text]
    if missing:
        raise DataError(f"README markers missing for {missing}: add `<!-- results:NAME -->` and "
                        "`<!-- /results:NAME -->` lines around each generated section.")
    changed: list[str] = []

    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in generated:
            return match.group(0)
        if match.group("body") != generated[name]:
            changed.append(name)
        return match.group(1) + generated[name] + match.group(4)

    return _SECTION.sub(replace, text), changed


def check_readme(readme: str | Path = README, results_dir: str | Path = RESULTS_DIR) -> list[str]:
    """The README sections that differ from what the results files generate (empty: they agree)."""
    _, changed = update_text(Path(readme).read_text(encoding="utf-8"), sections(load_results(results_dir)))
    return changed


def update_readme(readme: str | Path = README, results_dir: str | Path = RESULTS_DIR) -> list[str]:
    """Rewrite the README's generated sections from the results files; returns the names of those that changed."""
    text, changed = update_text(Path(readme).read_text(encoding="utf-8"), sections(load_results(results_dir)))
    if changed:
        write_text(text, readme)
    return changed


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, compare) the README's generated results sections."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a section disagrees")
    args = parser.parse_args(argv)
    try:
        if args.check:
            changed = check_readme(args.readme, args.results)
            for name in changed:
                print(f"{args.readme}: section {name!r} disagrees with {args.results}/", file=sys.stderr)
            return 1 if changed else 0
        changed = update_readme(args.readme, args.results)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"updated {', '.join(changed)}" if changed else "README already agrees with the results files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
