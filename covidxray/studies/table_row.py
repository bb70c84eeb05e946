"""One row of README table 2 from the 2020 folder: ``covidxray reproduce --seed-dataset DIR --metadata CSV``.

Table 2 is the 2020 images laid out again as the two public sources (Kermany normals, ieee8023 COVID images beside
the metadata.csv they were selected from, PA views) and split by patient. :func:`table2_row` does that layout
(:func:`covidxray.data.presplit_layout.presplit_as_sources`), runs :func:`covidxray.studies.reproduce.reproduce`
(the baseline and both CNNs, seed 0 unless more seeds are asked for) and checks the row against the committed
results file table 2 is generated from (``results/table2-patient-split.json``).

The agreement rule (:data:`AGREEMENT_RULE`): a metric of the row agrees when it lies within table 2's spread over
its seeds (mean ± std, or the seeds' range where that is wider), compared at the printed precision; the baseline
has no seed, so it must equal table 2's value at that precision. The row agrees when every metric does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from covidxray.data.presplit_layout import presplit_as_sources
from covidxray.errors import DataError
from covidxray.metrics import format_metric, seed_summary
from covidxray.studies.readme_tables import FILES, RESULTS_DIR, SEED_METRICS, _model_name, _seed_runs, read_results_file
from covidxray.studies.reproduce import ReproduceConfig, reproduce

TOLERANCE = 5e-4
"""Half the last printed digit (0.1 % for rates, 0.001 for AUCs): values equal as printed agree."""
COMPARED_SETTINGS = ("design", "views", "weights", "epochs", "image_size", "precision")
"""Settings of table 2's run that a row must share for the comparison to mean anything."""
AGREEMENT_RULE = ("a metric agrees when it lies within table 2's spread over its seeds (mean ± std, or the seeds' "
                  "range where that is wider), compared at the printed precision (0.1 % for rates, 0.001 for "
                  "ROC-AUC); the baseline has no seed, so it must equal table 2's value as printed. The row "
                  "agrees when every metric of every model does.")


def sources_folder(out: str | Path) -> Path:
    """Where the 2020 folder is laid out as the two sources: beside the reproduction's output, ``<out>-sources``."""
    out = Path(out)
    return out.with_name(f"{out.name}-sources")


def spread(row: Mapping[str, Any], key: str) -> tuple[float, float]:
    """Table 2's interval for one metric of one model row: mean ± std widened to the seeds' range; the value itself
    for a deterministic model (one run)."""
    runs = [r.get(key) for r in _seed_runs(row)]
    values = np.array([np.nan if v is None else float(v) for v in runs], dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    low, high = float(values.min()), float(values.max())
    if values.size > 1:
        mean, std = seed_summary(_seed_runs(row))[key]
        low, high = min(low, mean - std), max(high, mean + std)
    return low, high


def agreement(result: Mapping[str, Any], table2: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One record per model and metric of ``result``'s rows (seed 0: each row's ``metrics``): the value, table 2's
    interval (:func:`spread`) and whether it agrees (see :data:`AGREEMENT_RULE`). A model table 2 lacks fails."""
    reference = {str(row.get("model")): row for row in table2["rows"]}
    records = []
    for row in result["rows"]:
        ref = reference.get(str(row.get("model")))
        for key, name, percent in SEED_METRICS:
            value = row["metrics"].get(key)
            low, high = spread(ref, key) if ref is not None else (float("nan"), float("nan"))
            ok = (value is not None and not np.isnan(low)
                  and low - TOLERANCE <= float(value) <= high + TOLERANCE)
            records.append({"model": _model_name(row), "metric": name, "value": value, "low": low, "high": high,
                            "percent": percent, "agrees": bool(ok)})
    return records


def setting_differences(config: Mapping[str, Any], table2: Mapping[str, Any]) -> list[str]:
    """The settings (:data:`COMPARED_SETTINGS`) in which this run differs from table 2's, one phrase each."""
    theirs = table2.get("config") or {}
    out = []
    for key in COMPARED_SETTINGS:
        a, b = config.get(key), theirs.get(key)
        a, b = (list(a) if isinstance(a, (list, tuple)) else a), (list(b) if isinstance(b, (list, tuple)) else b)
        if a != b:
            out.append(f"{key}: {a} here, {b} in table 2")
    return out


def agreement_text(result: Mapping[str, Any], table2: Mapping[str, Any], source: str) -> tuple[str, bool]:
    """Markdown: the rule, one line per model and metric, and the verdict; and whether the row agrees."""
    records = agreement(result, table2)
    lines = [f"Agreement with README table 2 ({source}): {AGREEMENT_RULE}", "",
             "| model | metric | this run (seed 0) | table 2 spread | agrees |", "|---|---|---|---|---|"]
    for r in records:
        span = (format_metric(r["low"], percent=r["percent"]) if r["low"] == r["high"] else
                f"{format_metric(r['low'], percent=r['percent'])} to {format_metric(r['high'], percent=r['percent'])}")
        lines.append(f"| {r['model']} | {r['metric']} | {format_metric(r['value'], percent=r['percent'])} | {span} | "
                     f"{'yes' if r['agrees'] else 'NO'} |")
    outside = [f"{r['model']} {r['metric']}" for r in records if not r["agrees"]]
    agreed = not outside
    lines.append("")
    lines.append(f"Verdict: the row AGREES with table 2 (all {len(records)} metrics inside its spread)." if agreed
                 else f"Verdict: the row DIFFERS from table 2: {len(outside)} of {len(records)} metrics outside its "
                      f"spread ({', '.join(outside)}).")
    differences = setting_differences(result.get("config") or {}, table2)
    if differences:
        lines.append(f"Settings differ from table 2's run ({'; '.join(differences)}): this checks the wiring, not "
                     "the numbers.")
    return "\n".join(lines) + "\n", agreed


def table2_row(
    config: ReproduceConfig,
    out: str | Path,
    seed_dataset: str | Path,
    metadata: str | Path | None,
    *,
    results_dir: str | Path = RESULTS_DIR,
    progress: bool = True,
) -> tuple[dict[str, Any], str, bool]:
    """Lay ``seed_dataset`` (the 2020 ``Dataset/`` folder) out as the two sources with ``metadata`` (the ieee8023
    metadata.csv its COVID images came from), reproduce (views PA unless ``config.views`` says otherwise) into
    ``out``, and compare the row with ``results_dir``'s table 2 file. Returns the reproduce result, the Markdown
    text (table, rule, agreement lines, verdict) and whether the row agrees."""
    if metadata is None:
        raise DataError("--seed-dataset needs --metadata: the ieee8023 metadata.csv its COVID images were selected "
                        "from (for the 2020 folder: ieee8023-metadata/metadata-early.csv).")
    reference_file = Path(results_dir) / FILES["table2"]
    table2 = read_results_file(reference_file)
    config = dataclasses.replace(config, views=config.views or ("PA",))
    chest, covid = presplit_as_sources(seed_dataset, metadata, sources_folder(out))
    result = reproduce(config, out, chest_xray=chest, covid_xray=covid, progress=progress)
    text, agreed = agreement_text(result, table2, reference_file.as_posix())
    return result, f"{result['table']}\n{text}", agreed
