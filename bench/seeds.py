"""README tables 1-3 over several seeds: the two reproductions behind them, timed as one job.

``python -m bench.seeds --shared ../shared/data --seeds 5 --precision bfloat16`` runs, back to back in one process,
``covidxray reproduce`` on the 2020 split (table 1) and on the 2020 images split by patient under the original and the
adult-normals designs with the cross-design evaluation (tables 2 and 3), each model with seeds 0..N-1 (the seed moves
the initialisation, augmentation and shuffling; the datasets and their splits are built once and never move). The run
folders go to ``--work`` (git-ignored); the results files the README tables are generated from go to ``--out``
(``results/``, committed): each reproduction's ``results.json`` (every row with its per-seed metrics, seed 0's
patient-bootstrap intervals), the cross-design matrix, and ``timing.json`` (wall time per reproduction and in all,
the CPU model and flags, the versions), and the shortcut probes on the datasets of tables 2 and 3 (README table 4;
run after the timed job). ``python -m covidxray.studies.readme_tables`` then writes the README tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.destination import REPO, changed_settings, results_folder
from bench.precision import cpu_record
from covidxray.app.notebook_helpers import resolve_sources
from covidxray.outputs import write_json
from covidxray.studies.reproduce import ReproduceConfig, reproduce, reproduce_designs


def run(shared: Path, work: Path, out: Path, *, seeds: int, precision: str, weights: str, epochs: int = 20,
        image_size: int = 224) -> dict:
    """Run both reproductions under ``work``, copy their results files into ``out`` and return the timing record."""
    from covidxray.runs.load import versions

    meta = shared / "ieee8023-metadata" / "metadata-early.csv"
    config = ReproduceConfig(weights=weights, seeds=seeds, precision=precision, epochs=epochs, image_size=image_size)
    timing: dict = {"seeds": seeds, "precision": precision, "weights": weights, "cpu": cpu_record(),
                    "versions": versions(), "wall_s": {}}
    t0 = time.perf_counter()
    t = time.perf_counter()
    reproduce(config, work / "table1-2020-split", presplit=shared / "seed-dataset", metadata=meta)
    timing["wall_s"]["table1"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    sources = resolve_sources("seed", seed_dataset=shared / "seed-dataset", seed_metadata=meta,
                              work_dir=work / "sources")
    reproduce_designs(
        dataclasses.replace(config, views=("PA",)),
        work / "tables2-3-designs", chest_xray=sources.chest_xray, covid_xray=sources.covid_xray,
        nih=shared / "nih14-sample")
    timing["wall_s"]["tables2-3"] = round(time.perf_counter() - t, 1)
    timing["wall_s"]["all"] = round(time.perf_counter() - t0, 1)
    write_json(timing, work / "timing.json")
    probes(work)
    collect(work, out, shared)
    return timing


RESULTS = {
    "table1-2020-split.json": "table1-2020-split/results.json",
    "table2-patient-split.json": "tables2-3-designs/original/results.json",
    "table3-adult-normals.json": "tables2-3-designs/adult-normals/results.json",
    "table3-cross-design.json": "tables2-3-designs/cross/results.json",
    "timing.json": "timing.json",
    "probes-original.json": "probes/original/probes.json",
    "probes-adult-normals.json": "probes/adult-normals/probes.json",
}
"""Committed results file -> the file of the run it is copied from (relative to ``--work``)."""


TRIAL_SETTINGS = ("seeds", "precision", "weights", "epochs", "image_size")
"""Flags whose other values make a trial run, whose results files must not replace the committed ones."""


def portable(obj: Any, roots: dict[str, str]) -> Any:
    """``obj`` with every string's machine-specific prefix (a key of ``roots``) replaced by its portable name."""
    if isinstance(obj, dict):
        return {k: portable(v, roots) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v, roots) for v in obj]
    if isinstance(obj, str):
        for root, name in roots.items():
            obj = obj.replace(root, name)
    return obj


def probes(work: Path) -> None:
    """Both shortcut probes (README table 4) on the datasets of tables 2 and 3, with the defaults that
    ``Create_Data.ipynb`` uses, into ``work/probes/<design>/`` (not part of the timed job)."""
    from covidxray.evaluation.shortcut_probes import run_probes

    for design in ("original", "adult-normals"):
        run_probes(work / "tables2-3-designs" / design / "dataset", work / "probes" / design, seed=0)


def collect(work: Path, out: Path, shared: Path) -> None:
    """Copy the results files of the runs under ``work`` into ``out``, with the work and shared folders named
    portably (``runs/seeds``, ``../shared/data``) so no path of the machine that ran them is committed."""
    roots = {str(work.resolve()): "runs/seeds", str(work): "runs/seeds", str(shared.resolve()): "../shared/data"}
    for name, source in RESULTS.items():
        write_json(portable(json.loads((work / source).read_text(encoding="utf-8")), roots), out / name)


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, run, print the wall times."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--work", type=Path, default=Path("runs/seeds"))
    parser.add_argument("--out", type=Path, default=None,
                        help="default: results/ (committed) for the full run; runs/bench-quick/results/ with other "
                             "--seeds, --precision, --weights, --epochs or --image-size")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--precision", default="bfloat16")
    parser.add_argument("--weights", default="hed")
    parser.add_argument("--epochs", type=int, default=20, help="a smaller number only to try the script out")
    parser.add_argument("--image-size", type=int, default=224, help="likewise")
    parser.add_argument("--collect-only", action="store_true",
                        help="only copy the results files of finished runs in --work into --out")
    parser.add_argument("--probes-only", action="store_true",
                        help="only run the shortcut probes on the datasets of finished runs in --work, then collect")
    args = parser.parse_args(argv)
    args.out = results_folder(args.out, changed_settings(args, TRIAL_SETTINGS, parser.parse_args([])),
                              committed=REPO / "results")
    if args.collect_only or args.probes_only:
        if args.probes_only:
            probes(args.work)
        collect(args.work, args.out, args.shared)
        return 0
    timing = run(args.shared, args.work, args.out, seeds=args.seeds, precision=args.precision, weights=args.weights,
                 epochs=args.epochs, image_size=args.image_size)
    print(timing["wall_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
