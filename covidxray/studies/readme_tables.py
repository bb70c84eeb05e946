"""The README's results tables, generated from the committed results files (``results/*.json``).

``python -m bench.seeds`` runs the reproductions behind README tables 1-3 with several training seeds and
copies their results files into ``results/``. This module turns those files into Markdown: per model the mean and
sample standard deviation over the seeds (every per-seed row is in the files), seed 0's value with its 95 %
patient-bootstrap interval beside it, the cross-design matrix, and the wall time of the whole job. The README
holds each table between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``;
``python -m covidxray.studies.readme_tables`` rewrites those sections and ``--check`` lists the ones that disagree with
the files (the test suite runs the check). The Speed section comes the same way from the benchmark's results files
(``bench/results.json``, ``bench/precision_results.json``), the scaling section from ``python -m bench --scaling``'s
``bench/scaling_results.json`` (a line saying what to run while it is absent) and the heatmap table from the checks the
heatmap notebook writes (``Class_Activation_Images/*__checks.json``). The notebooks show the tables through
:func:`markdown`.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from covidxray import limits, paths
from covidxray.errors import DataError
from covidxray.evaluation.figures import TABLE_METRICS
from covidxray.explain.regions import REGION_NAMES, format_mass_area
from covidxray.metrics import format_metric, mean_std, seed_summary
from covidxray.outputs import read_json, write_text

RESULTS_DIR = Path("results")
README = Path("README.md")
BENCH_FILES: dict[str, Path] = {"speed": Path("bench/results.json"), "precision": Path("bench/precision_results.json")}
"""The benchmark results files (``python -m bench``, ``python -m bench --precision``) the Speed section is made of."""
SCALING_FILE = Path("bench/scaling_results.json")
"""``python -m bench --scaling``'s results file, the scaling section's source (optional: the section says how to make
it)."""

FILES: dict[str, str] = {
    "table1": "table1-2020-split.json",
    "table2": "table2-patient-split.json",
    "table3": "table3-adult-normals.json",
    "cross": "table3-cross-design.json",
    "timing": "timing.json",
    "probes-original": "probes-original.json",
    "probes-adult-normals": "probes-adult-normals.json",
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

SEED_METRICS: tuple[tuple[str, str, bool], ...] = tuple(m for m in TABLE_METRICS if m[0] != "pr_auc")
"""(metric key, column header, shown in percent) of the mean ± std columns."""

_SECTION = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


_BENCH_FIX = "restore the file (`git checkout -- FILE`) or rerun `python -m bench` to write it again"
_CHECKS_FIX = "restore the file (`git checkout -- FILE`) or rerun Class_Activation_Maps.ipynb (or `covidxray cam`)"
_RESULTS_FIX = "restore the file (`git checkout -- FILE`) or rerun `python -m bench.seeds` to write it again"
_RATES: tuple[str, ...] = tuple(key for key, _, _ in TABLE_METRICS)
"""Metrics of the results files that are shares in [0, 1] (NaN or null: undefined, shown as n/a)."""
_TABLES = ("table1", "table2", "table3")


def read_results_file(path: str | Path, fix: str = _RESULTS_FIX) -> dict[str, Any]:
    """One results file as a JSON object; a DataError naming it and ``fix`` (FILE: the path) when it cannot be
    read, is not JSON or not an object."""
    path = Path(path)
    return read_json(path, fix.replace("FILE", str(path)) + ".", what="the results file")


def _check_rate(path: Path, field: str, value: object) -> None:
    """A DataError naming the file and field when ``value`` is neither a share in [0, 1] nor undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return
    problem = limits.out_of_range(field, value, limits.PROBABILITY)
    if problem:
        raise DataError(f"{path}: {problem}; {_RESULTS_FIX.replace('FILE', str(path))}.")


def check_results(name: str, result: Mapping[str, Any], path: str | Path) -> None:
    """Check one results file of :data:`FILES` before a table is made of it: a seed table has at least one row,
    each with its ``metrics``; every rate (accuracy, precision, recall, specificity, F1, ROC-AUC, PR-AUC) of the
    rows, seeds, intervals and cross-design cells is in [0, 1] (or undefined). A DataError names the file and
    the field."""
    path = Path(path)
    fix = _RESULTS_FIX.replace("FILE", str(path))
    if name in _TABLES:
        rows = result.get("rows")
        if not isinstance(rows, list) or not rows:
            state = "empty" if rows == [] else "missing" if rows is None else f"a {type(rows).__name__}"
            raise DataError(f"{path}: field 'rows' is {state}; a results table needs at least one model row; {fix}.")
        for i, row in enumerate(rows):
            metrics = row.get("metrics") if isinstance(row, dict) else None
            if not isinstance(metrics, dict):
                raise DataError(f"{path}: field 'rows[{i}].metrics' is missing; {fix}.")
            seeds = row.get("per_seed") or []
            ci = row.get("ci") or {}
            for key in _RATES:
                _check_rate(path, f"rows[{i}].metrics.{key}", metrics.get(key))
                for k, seed in enumerate(seeds if isinstance(seeds, list) else []):
                    _check_rate(path, f"rows[{i}].per_seed[{k}].{key}",
                                seed.get(key) if isinstance(seed, dict) else seed)
                bounds = ci.get(key) if isinstance(ci, dict) else None
                for k, bound in enumerate(bounds if isinstance(bounds, list) else []):
                    _check_rate(path, f"rows[{i}].ci.{key}[{k}]", bound)
    if name == "cross":
        matrix = result.get("matrix")
        if not isinstance(matrix, dict) or not matrix:
            raise DataError(f"{path}: field 'matrix' is {'empty' if matrix == {} else 'missing'}; {fix}.")
        for model, by_design in matrix.items():
            for trained, cells in (by_design or {}).items():
                for other, cell in (cells or {}).items():
                    for key in _RATES:
                        _check_rate(path, f"matrix.{model}.{trained}.{other}.{key}",
                                    cell.get(key) if isinstance(cell, dict) else cell)


def results_files(results_dir: str | Path = RESULTS_DIR) -> dict[str, Path]:
    """The path of each results file of :data:`FILES` in ``results_dir``, by table name."""
    return {name: Path(results_dir) / file for name, file in FILES.items()}


def load_results(results_dir: str | Path = RESULTS_DIR) -> dict[str, Any]:
    """Every results file of :data:`FILES` in ``results_dir``, by table name, checked (:func:`check_results`);
    DataError naming a missing, unreadable or malformed file."""
    out: dict[str, Any] = {}
    for name, path in results_files(results_dir).items():
        if not path.is_file():
            raise DataError(f"{path}: not found; run `python -m bench.seeds` (see the README's Results section) to "
                            "write the results files.")
        out[name] = read_results_file(path)
        check_results(name, out[name], path)
    return out


def from_file(path: str | Path, make: Callable[[], str], fix: str = _RESULTS_FIX) -> str:
    """``make()``, the Markdown made from the results file ``path``; a field it lacks (KeyError) or holds in
    another shape becomes a DataError naming the file and the field, not a traceback."""
    try:
        return make()
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        what = (f"field {exc.args[0]!r} is missing" if isinstance(exc, KeyError) and exc.args
                else f"a field is malformed ({type(exc).__name__}: {exc})")
        raise DataError(f"{path}: {what}; {fix.replace('FILE', str(path))}.") from exc


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


def probes_table(probes: Mapping[str, Mapping[str, Any]]) -> str:
    """README table 4: both shortcut probes per design (``probes``: design -> a ``probes.json``)."""
    from covidxray.evaluation.shortcut_probes import probe_cells

    lines = ["| design | probe | what it sees | accuracy [95 % CI] | ROC-AUC [95 % CI] | chance | verdict |",
             "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join([design, *probe_cells(dict(result), key)]) + " |"
              for design, result in probes.items() for key in ("source", "statistics")]
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


def speed_table(bench: Mapping[str, Any]) -> str:
    """The README's side-by-side table from ``bench/results.json``."""
    s, v, t, peaks = bench["scratch"], bench["vgg16"], bench["targets"], bench["peaks"]
    so, su, vo, vu = s["original"], s["ours"], v["original"], v["ours"]

    def target(name: str, value: float) -> str:
        return f"{value:.2f}" if t[name]["met"] else f"{value:.2f} (target missed)"

    rows = [
        ("scratch CNN: epoch time (median of epochs 2..N)", f"{so['epoch_seconds_median']:.1f} s",
         f"{su['epoch_seconds_median']:.1f} s", target("scratch_epoch_time_ratio",
                                                       t["scratch_epoch_time_ratio"]["value"]),
         t["scratch_epoch_time_ratio"]["target"]),
        ("scratch CNN: input pipeline vs the same steps on tensors in memory", "",
         f"{su['epoch_seconds_median']:.2f} s vs {s['input_pipeline']['epoch_seconds_median']:.2f} s",
         target("scratch_input_overhead_ratio", t["scratch_input_overhead_ratio"]["value"]),
         t["scratch_input_overhead_ratio"]["target"]),
        ("VGG16 transfer: total training time", f"{vo['total_train_seconds']:.1f} s",
         f"{vu['total_train_seconds']:.1f} s", target("vgg16_total_time_ratio", t["vgg16_total_time_ratio"]["value"]),
         t["vgg16_total_time_ratio"]["target"]),
        ("VGG16 transfer: test ROC-AUC / F1", f"{vo['test']['roc_auc']:.3f} / {vo['test']['f1']:.3f}",
         f"{vu['test']['roc_auc']:.3f} / {vu['test']['f1']:.3f}", "", "no worse"),
        ("batch-1 latency, scratch (model.predict vs our compiled call)", f"{so['latency_b1_ms']:.1f} ms",
         f"{su['latency_b1_ms']:.1f} ms",
         f"{t['scratch_batch1_latency_vs_compiled']['value']:.2f} x a bare compiled call",
         t["scratch_batch1_latency_vs_compiled"]["target"]),
        ("batch-1 latency, VGG16", f"{vo['latency_b1_ms']:.1f} ms", f"{vu['latency_b1_ms']:.1f} ms",
         f"{t['vgg16_batch1_latency_vs_compiled']['value']:.2f} x a bare compiled call",
         t["vgg16_batch1_latency_vs_compiled"]["target"]),
        ("frozen VGG16 extraction vs measured matmul peak", "",
         f"{peaks['vgg16_extract_gflops']:.0f} vs {peaks['matmul_gflops']:.0f} GFLOP/s",
         target("vgg16_extract_fraction_of_matmul", t["vgg16_extract_fraction_of_matmul"]["value"]),
         t["vgg16_extract_fraction_of_matmul"]["target"]),
    ]
    lines = ["| | original-style | ours | ours / original | target |", "|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    meta = bench.get("meta") or {}
    text = "\n".join(lines) + "\n"
    if meta.get("bench_seconds") is not None:
        load = meta.get("load_average_before"), meta.get("load_average_after")
        text += (f"\n`python -m bench` ({meta.get('mode')} mode, {meta.get('cpu_count')} cores) took "
                 f"{meta['bench_seconds']:.0f} s in all; load average before / after {load[0]} / {load[1]}.\n")
    cache, check = vu.get("cached_features") or {}, v.get("cached_check") or {}
    if cache and check:
        text += ("\nOurs computes the frozen part of VGG16 once per image (a "
                 f"{cache['cache_mb']:.0f} MiB float16 cache) and trains only `block5_conv3` and the head on it; "
                 "the saved model is still a normal `.keras` model that takes images (cached and uncached "
                 f"predictions on {check['n_images']} test images differ by at "
                 f"most {check['max_abs_diff_float16_cache']:.0e}).\n")
    return text


def precision_text(bench: Mapping[str, Any]) -> str:
    """The README's float32-vs-bfloat16 paragraph from ``bench/precision_results.json``."""
    cpu, s, v = bench["cpu"], bench["scratch"], bench["vgg16"]
    if not cpu.get("bf16"):
        return (f"On this {cpu.get('cores')}-core {cpu.get('model')} (no bf16 instructions) only float32 was "
                "measured.\n")
    e, r, ex = s["epoch_seconds_median"], s["ratio_vs_original"], v["extraction"]

    def auc(model: Mapping[str, Any]) -> str:
        a = model["auc"]
        return (f"{format_metric(a['float32']['roc_auc'], a['float32']['roc_auc_ci'], percent=False)} in float32, "
                f"{format_metric(a['bfloat16']['roc_auc'], a['bfloat16']['roc_auc_ci'], percent=False)} in "
                f"bfloat16 (not worse by the rule: {'yes' if a['not_worse'] else 'no'})")

    return (f"On this {cpu['cores']}-core {cpu['model']} with `{', '.join(cpu['bf16_flags'])}`, on the 2020 images at "
            f"224 px, batch 32: the scratch CNN's epoch took {e['bfloat16']:.1f} s in bfloat16 against "
            f"{e['float32']:.1f} s in float32 ({s['bfloat16_vs_float32']:.2f}x) and "
            f"{s['original']['epoch_seconds_median']:.1f} s for the original-style pipeline ({r['bfloat16']:.2f}x, "
            f"target <= 0.4); frozen-VGG16 feature extraction ran {ex['speedup']:.2f}x faster "
            f"({ex['by_precision']['bfloat16']['images_per_s']:.1f} against "
            f"{ex['by_precision']['float32']['images_per_s']:.1f} images/s); test ROC-AUC: scratch {auc(s)}; "
            f"VGG16 {auc(v)}.\n")


def _memory(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def load_scaling(path: str | Path = SCALING_FILE) -> dict[str, Any] | None:
    """``python -m bench --scaling``'s results, or None when the file has not been written yet."""
    path = Path(path)
    return read_results_file(path, _BENCH_FIX) if path.is_file() else None


def scaling_text(scaling: Mapping[str, Any] | None) -> str:
    """The README's scaling section from ``bench/scaling_results.json``: the machine and setup in one sentence,
    time and peak memory per size and stage in each precision with the bfloat16 / float32 time ratio, then the
    growth summaries per precision. ``None`` (no results file yet): one line saying what to run."""
    if scaling is None:
        return (f"*No scaling results yet ({SCALING_FILE} not found): run `make scaling` (`python -m bench "
                "--scaling`, about 45 minutes) alone on the machine, then "
                "`python -m covidxray.studies.readme_tables`.*\n")
    cpu, meta, precisions = scaling["cpu"], scaling["meta"], scaling["precisions"]
    stages = ["build", *scaling["models"]]
    both = "float32" in precisions and "bfloat16" in precisions
    shares = ", ".join(f"{size['fraction']:.0%}" for size in scaling["sizes"])
    text = (f"On a {cpu.get('cores', '?')}-core {cpu.get('model', 'CPU')} (bf16 instructions: "
            f"{', '.join(cpu.get('bf16_flags') or []) or 'none'}), {shares} of a synthetic set of {scaling['n']:,} "
            f"images at {scaling['image_size']} px, {scaling['epochs']} epoch(s), batch {scaling['batch_size']}, "
            "one subprocess per size and precision "
            f"(`{meta['command']}`, {meta['mode']} mode): {meta['bench_seconds'] / 60:.1f} minutes in all.\n")
    text += "".join(f"\n{note[0].upper() + note[1:]}.\n" for note in scaling.get("notes") or [])
    header = ["share", "images", "stage", *[f"{p}: time, peak memory" for p in precisions]]
    header += ["bfloat16 / float32 time"] if both else []
    lines = ["| " + " | ".join(header) + " |", "|---:|---:|---|" + "---:|" * (len(header) - 3)]
    for size in scaling["sizes"]:
        runs, ratios = size["by_precision"], size.get("ratio_bfloat16_float32") or {}
        for stage in stages:
            cells = [f"{size['fraction']:.0%}", str(size["n_images"] or ""), stage]
            for p in precisions:
                r = (runs.get(p) or {}).get(stage)
                cells.append(f"{r['seconds']:.1f} s, {_memory(r['peak_rss_mb'])}" if r else "failed")
            if both:
                cells.append(f"{ratios[stage]:.2f}" if stage in ratios else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
    text += "\n" + "\n".join(lines) + "\n"
    for p in precisions:
        growth = scaling["growth"].get(p) or {}
        summaries = [growth[s]["summary"] for s in stages if "summary" in growth.get(s, {})]
        if summaries:
            text += f"\n{p}: " + "; ".join(summaries) + ".\n"
    return text


def load_heatmap_checks(cam_dir: str | Path = paths.CAM_DIR) -> dict[str, Any]:
    """Every ``<model>__checks.json`` of the heatmap folder, by model name (sorted)."""
    files = sorted(Path(cam_dir).glob("*__checks.json"))
    if not files:
        raise DataError(f"{cam_dir}: no *__checks.json; run Class_Activation_Maps.ipynb (or `covidxray cam`).")
    checks = {path: read_results_file(path, _CHECKS_FIX) for path in files}
    return {from_file(path, lambda c=c: str(c["model"]), _CHECKS_FIX): c for path, c in checks.items()}


def heatmap_table(checks: Mapping[str, Mapping[str, Any]]) -> str:
    """Per model and group (all images, each class, each source): the share of heatmap mass in each off-anatomy
    region against the region's share of the image area, the regions over the warning rule's limits, and whether
    the randomisation check passed and the shortcut warning fired."""
    header = (["model (method)", "group", "images"] + [f"{name}: mass (area)" for name in REGION_NAMES.values()]
              + ["warning fired for"])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    verdicts = []
    for model, check in checks.items():
        off = check["off_anatomy"]
        groups = [("all", off["overall"])]
        groups += [(f"class {k}", v) for k, v in (off.get("per_class") or {}).items()]
        groups += [(f"source {k}", v) for k, v in (off.get("per_source") or {}).items()]
        for group, stats in groups:
            cells = [f"{model} ({check['method']})", group, str(stats["n_images"])]
            for key in REGION_NAMES:
                cells.append(format_mass_area(stats[key]))
            cells.append(", ".join(REGION_NAMES.get(region, region) for region in stats["over"]) or "none")
            lines.append("| " + " | ".join(cells) + " |")
        rand = check["randomization"]
        verdicts.append(f"- **{model}**: randomisation check {'passed' if rand.get('passed') else 'not passed'} "
                        f"({rand.get('interpretation', '')}); shortcut warning "
                        + (f"**fired**: {check['warning']}." if check.get("warning") else "did not fire."))
    rules = sorted({check["off_anatomy"]["rule"] for check in checks.values() if check["off_anatomy"].get("rule")})
    rule = "".join(f"\nThe warning rule: {text}.\n" for text in rules)
    return "\n".join(lines) + "\n" + rule + "\n" + "\n".join(verdicts) + "\n"


def load_bench(files: Mapping[str, Path] = BENCH_FILES) -> dict[str, Any]:
    """The benchmark results files by name (see :data:`BENCH_FILES`)."""
    missing = [str(path) for path in files.values() if not Path(path).is_file()]
    if missing:
        raise DataError(f"{', '.join(missing)}: not found; run `python -m bench` and `python -m bench --precision`.")
    return {name: read_results_file(path, _BENCH_FIX) for name, path in files.items()}


def sections(results: Mapping[str, Any], bench: Mapping[str, Any] | None = None,
             heatmaps: Mapping[str, Any] | None = None, *, files: Mapping[str, Path] | None = None) -> dict[str, str]:
    """Every generated README section, by marker name (the benchmark and heatmap sections when given).

    ``files`` names the file behind each input (table name, ``speed``, ``precision``, ``heatmaps``) for the
    DataError that a missing or malformed field becomes (see :func:`from_file`)."""
    where = {**results_files(), **BENCH_FILES, "heatmaps": paths.CAM_DIR / "*__checks.json", **(files or {})}
    designs = {"original": ("original (pediatric normals)", "pediatric"), "adult-normals": ("adult-normals", "adult")}
    tables = {"table1": results["table1"], "table2": results["table2"], "table3": results["table3"]}

    def made(name: str, make: Callable[[], str], fix: str = _RESULTS_FIX) -> str:
        return from_file(where[name], make, fix)

    out = {}
    for table in _TABLES:
        out[f"{table}-setup"] = made(table, lambda t=table: f"{split_counts(results[t])}; {_setup(results[t])}.\n")
        out[table] = made(table, lambda t=table: seed_table(results[t], reported=REPORTED_2020 if t == "table1"
                                                            else ()))
    out["table3-cross"] = made("cross", lambda: cross_table(results["cross"], designs))
    for table in _TABLES:
        made(table, lambda t=table: per_seed_table({t: tables[t]}))
    out["per-seed"] = per_seed_table(tables)
    out["timing"] = made("timing", lambda: timing_text(results["timing"]))
    for design in ("original", "adult-normals"):
        made(f"probes-{design}", lambda d=design: probes_table({d: results[f"probes-{d}"]}))
    out["table4"] = probes_table({"original": results["probes-original"],
                                  "adult-normals": results["probes-adult-normals"]})
    if bench:
        out["speed"] = made("speed", lambda: speed_table(bench["speed"]), _BENCH_FIX)
        out["precision"] = made("precision", lambda: precision_text(bench["precision"]), _BENCH_FIX)
    if heatmaps:
        out["heatmaps"] = made("heatmaps", lambda: heatmap_table(heatmaps), _CHECKS_FIX)
    return out


def markdown(names: Sequence[str], results_dir: str | Path = RESULTS_DIR, *, missing: str = "say") -> str:
    """The generated sections ``names`` (see :func:`sections`) one after the other, for a notebook to display.

    Without the results files (a notebook run from another folder, or ``results/`` deleted), ``missing="say"``
    returns one Markdown line naming the file and how to make it, so the notebook carries on; ``"raise"`` raises."""
    try:
        generated = sections(load_results(results_dir), files=results_files(results_dir))
    except DataError as exc:
        if missing == "say":
            return f"*The results tables cannot be shown: {exc}*\n"
        raise
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


def readme_sections(root: str | Path = ".", results_dir: str | Path | None = None) -> dict[str, str]:
    """Every generated section from the files of the repository at ``root``: ``results/`` (or ``results_dir``),
    the benchmark results (:data:`BENCH_FILES`, and :data:`SCALING_FILE` when present) and the heatmap checks
    (:data:`covidxray.paths.CAM_DIR`)."""
    root = Path(root)
    results_dir = root / RESULTS_DIR if results_dir is None else Path(results_dir)
    bench_files = {name: root / path for name, path in BENCH_FILES.items()}
    files = {**results_files(results_dir), **bench_files, "heatmaps": root / paths.CAM_DIR / "*__checks.json"}
    generated = sections(load_results(results_dir), load_bench(bench_files), load_heatmap_checks(root / paths.CAM_DIR),
                         files=files)
    scaling = from_file(root / SCALING_FILE, lambda: scaling_text(load_scaling(root / SCALING_FILE)), _BENCH_FIX)
    return {**generated, "scaling": scaling}


def check_readme(readme: str | Path = README, results_dir: str | Path | None = None) -> list[str]:
    """The README sections that differ from what the results files beside it generate (empty: they agree)."""
    readme = Path(readme)
    _, changed = update_text(readme.read_text(encoding="utf-8"), readme_sections(readme.parent, results_dir))
    return changed


def update_readme(readme: str | Path = README, results_dir: str | Path | None = None) -> list[str]:
    """Rewrite the README's generated sections from the results files; returns the names of those that changed."""
    readme = Path(readme)
    text, changed = update_text(readme.read_text(encoding="utf-8"), readme_sections(readme.parent, results_dir))
    if changed:
        write_text(text, readme)
    return changed


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, compare) the README's generated results sections."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=None, help="default: results/ beside the README")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a section disagrees")
    args = parser.parse_args(argv)
    try:
        if args.check:
            changed = check_readme(args.readme, args.results)
            for name in changed:
                print(f"{args.readme}: section {name!r} disagrees with the results files", file=sys.stderr)
            return 1 if changed else 0
        changed = update_readme(args.readme, args.results)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"updated {', '.join(changed)}" if changed else "README already agrees with the results files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
