"""The thumbnail-baseline rows and the statistics probe of README tables 1-4, measured again on ``../shared/data``.

``python -m bench.baselines --shared ../shared/data --out bench/baselines.json`` builds the three datasets the README
tables use (the 2020 split; the 2020 images split by patient, PA views; the adult-normals design with the NIH sample),
fits the baseline and the statistics probe with the package's one threshold rule, and writes every row (metrics,
intervals, threshold, dataset fingerprint) and the baseline's cross-design cells to the JSON file, plus the Markdown
rows on stdout. The CNN rows are not
touched: their threshold rule did not change.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from covidxray.app.notebook_helpers import evaluate_runs, resolve_sources
from covidxray.data.build import BuildConfig, build_dataset
from covidxray.evaluation.figures import results_table
from covidxray.outputs import fingerprint, write_json
from covidxray.studies.reproduce import cross_design_evaluation


def measure(shared: Path, work: Path) -> dict:
    """Build the three datasets under ``work`` and return {table: {"dataset": ..., "baseline": row, "probe": ...}}."""
    from covidxray.evaluation.shortcut_probes import stats_probe

    meta = shared / "ieee8023-metadata" / "metadata-early.csv"
    sources = resolve_sources("seed", seed_dataset=shared / "seed-dataset", seed_metadata=meta, work_dir=work / "src")
    pa = BuildConfig(views=("PA",))
    builds = {
        "1-2020-split": dict(presplit=shared / "seed-dataset", metadata=meta),
        "2-patient-split": dict(chest_xray=sources.chest_xray, covid_xray=sources.covid_xray, config=pa),
        "3-adult-normals": dict(chest_xray=sources.chest_xray, covid_xray=sources.covid_xray,
                                nih=shared / "nih14-sample", design="adult-normals", config=pa),
    }
    out: dict = {}
    for name, kwargs in builds.items():
        dataset = work / name
        summary = build_dataset(dataset, progress=False, **kwargs)
        rows, _, _ = evaluate_runs(dataset, {}, n_boot=2000)
        probe = stats_probe(dataset, seed=0, n_boot=2000)
        out[name] = {"dataset": {"counts": summary["counts"], "fingerprint": fingerprint(dataset / "manifest.csv")},
                     "baseline": rows[0], "statistics_probe": probe}
    designs = {"original": (work / "2-patient-split", {}), "adult-normals": (work / "3-adult-normals", {})}
    cross = cross_design_evaluation(designs, work / "cross", n_boot=2000)
    out["3-cross-design"] = {"matrix": cross["matrix"], "notes": cross["notes"]}
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure and write the rows."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("bench/baselines.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="covidxray-baselines-") as work:
        result = measure(args.shared, Path(work))
    write_json(result, args.out)
    for note in result["3-cross-design"]["notes"]:
        print(f"- {note}")
    for name, res in result.items():
        if "baseline" not in res:
            continue
        probe = res["statistics_probe"]
        print(f"## {name} (manifest {res['dataset']['fingerprint']}, counts {res['dataset']['counts']})")
        print(results_table([res["baseline"]], footnote=False))
        print(f"statistics probe: accuracy {probe['accuracy']:.3f} {probe.get('accuracy_ci')}, "
              f"roc_auc {probe['roc_auc']:.3f}, threshold {probe.get('threshold_info', {}).get('threshold')}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
