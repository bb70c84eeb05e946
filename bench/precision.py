"""``python -m bench --precision [--quick] [--out DIR]``: float32 against bfloat16 on this CPU, in one process.

Measured, interleaved (float32 and bfloat16 runs alternate, ABBA, so neither always meets a cooler or busier
machine), on the bench's dataset (see bench/run.py's ``prepare_data``):

- the scratch CNN's epoch time through ``covidxray.runs.train.train`` in each precision, against the original-style
  pipeline (bench/original.py, run before and after, or the committed bench/results.json value with
  ``--original-epochs 0``);
- the frozen VGG16 part's feature-extraction throughput (224 px by default, batch 32) in each precision, and the
  cached-features VGG16 run;
- the test ROC-AUC of both models in each precision (trained and predicted in it), with 95 % patient-level
  bootstrap intervals and the paired interval of the difference.

The CPU model and flags are stored with the results. On a CPU without bf16 instructions (no ``avx512_bf16`` or
``amx_bf16`` flag) the bench says so and measures float32 only. Writes ``precision_results.json`` and
``precision_results.md`` into ``--out`` (default: this folder).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import tensorflow as tf

from bench.destination import results_folder
from bench.measure import load_average, steady_epoch
from bench.run import REPO, SHARED_DATA, Options, _clean, _fresh, _log, partial_run, prepare_data, run_original
from covidxray.data.manifest import read_manifest, split_frame
from covidxray.metrics import bootstrap_distribution, summarize
from covidxray.outputs import write_json
from covidxray.runs.load import load_run, predict_dataframe, versions
from covidxray.runs.train import TrainConfig, train
from covidxray.training.compute_dtype import (
    BF16_FLAGS,
    choose_precision,
    cpu_flags,
    cpu_has_bf16,
    cpu_model,
    read_cpuinfo,
)
from covidxray.training.feature_cache import conv_flops, extractor, frozen_part
from covidxray.training.models import build_model

TARGETS = {
    "scratch_epoch_vs_original": ("<=", 0.4),
    "vgg16_extract_speedup": (">=", 1.5),
    "scratch_roc_auc_not_worse": ("==", True),
    "vgg16_roc_auc_not_worse": ("==", True),
}
"""The issue's targets (bfloat16 against float32 and the original-style pipeline)."""


MEASURED = ("image_size", "batch_size", "epochs", "original_epochs", "repeats", "weights", "lr", "seed",
            "extract_batch", "extract_repeats", "n_boot", "max_images")
"""Settings of :class:`PrecisionOptions` the committed bench/precision_results.json was measured with."""


@dataclass
class PrecisionOptions:
    """What the precision bench runs; ``quick_mode`` gives the CI variant."""

    out: Path | None = None
    """Folder for precision_results.json and .md; None: bench/ for the full run, runs/bench-quick/ for any other."""
    data: Path = SHARED_DATA
    quick: bool = False
    image_size: int = 224
    batch_size: int = 32
    epochs: int = 10
    """Epochs of each scratch and VGG16 run of ours (no early stopping)."""
    original_epochs: int = 4
    """Epochs of each original-style scratch run (timing only); 0: the committed bench/results.json value."""
    repeats: int = 2
    """Scratch runs per precision, in ABBA order."""
    weights: str = "hed"
    lr: float = 1e-3
    seed: int = 0
    extract_batch: int = 32
    extract_repeats: int = 5
    n_boot: int = 2000
    max_images: dict[str, int] | None = None
    workdir: Path | None = None

    @classmethod
    def quick_mode(cls, **overrides: object) -> PrecisionOptions:
        """64 px, a subset of the images, 2 epochs, one run each: proves the bench runs (< 3 minutes)."""
        base = {"quick": True, "image_size": 64, "epochs": 2, "original_epochs": 1, "repeats": 1,
                "extract_batch": 8, "extract_repeats": 2, "n_boot": 200,
                "max_images": {"train": 48, "val": 24, "test": 24}}
        base.update(overrides)
        return cls(**base)


def cpu_record() -> dict:
    """The CPU's model string, its flags, whether it has bf16 instructions, and the precision ``auto`` picks."""
    info = read_cpuinfo()
    auto = choose_precision("auto")
    return {"model": cpu_model(info), "flags": sorted(cpu_flags(info or "")),
            "bf16_flags": sorted(cpu_flags(info or "") & set(BF16_FLAGS)),
            "bf16": info is not None and cpu_has_bf16(info), "cores": os.cpu_count(),
            "auto": auto.to_dict()}


def _abba(precisions: list[str], repeats: int) -> list[str]:
    """float32, bfloat16, bfloat16, float32, ...: each precision ``repeats`` times, alternating first."""
    order: list[str] = []
    for r in range(repeats):
        order += precisions if r % 2 == 0 else precisions[::-1]
    return order


def _test_auc(run_dir: Path, precision: str, data: dict, opts: PrecisionOptions) -> dict:
    """Test probabilities of a run computed in ``precision``; ROC-AUC with its bootstrap interval."""
    model, meta = load_run(run_dir, precision=precision)
    test = split_frame(read_manifest(data["dir"]), "test")
    prob = predict_dataframe(model, test, opts.image_size, opts.batch_size)
    y, groups = test["y"].to_numpy(), test["patient_id"].to_numpy()
    result = summarize(y, prob, meta["threshold"], groups=groups, n_boot=opts.n_boot, seed=opts.seed)
    return {"roc_auc": result["metrics"]["roc_auc"], "roc_auc_ci": result["ci"].get("roc_auc"),
            "accuracy": result["metrics"]["accuracy"], "threshold": meta["threshold"],
            "precision": meta["precision"], "prob": prob.tolist()}


def train_ours(kind: str, precision: str, opts: PrecisionOptions, data: dict, work: Path, tag: str) -> dict:
    """One ``covidxray.runs.train.train`` run of ``kind`` in ``precision``: epoch times, feature extraction, test
    AUC."""
    _fresh()
    cfg = TrainConfig(model=kind, weights=opts.weights if kind == "vgg16" else "none", image_size=opts.image_size,
                      batch_size=opts.batch_size, epochs=opts.epochs, lr=opts.lr, seed=opts.seed, patience=0,
                      precision=precision)
    out = work / f"{kind}-{precision}-{tag}"
    t0 = time.perf_counter()
    summary = train(cfg, data["dir"], out, progress=False)
    total = time.perf_counter() - t0
    timing = json.loads((out / "timing.json").read_text())
    result = {"precision": summary["precision"], "epoch_seconds": timing["epoch_seconds"],
              "epoch_seconds_median": steady_epoch(timing["epoch_seconds"]), "total_train_seconds": total,
              "test": _test_auc(out, precision, data, opts)}
    if "features" in timing:
        result["feature_images_per_s"] = timing["features"]["train"]["images_per_second"]
        result["feature_seconds"] = timing["feature_seconds"]
    shutil.rmtree(out, ignore_errors=True)
    return result


def extraction_throughput(precisions: list[str], opts: PrecisionOptions) -> dict:
    """Images/s of the frozen VGG16 part (everything before block5_conv3) per precision, calls interleaved."""
    _fresh()
    size = opts.image_size
    frozen = frozen_part(build_model("vgg16", image_size=size, weights=opts.weights), "block5_conv3")
    calls = {p: extractor(frozen, precision=p) for p in precisions}
    x = tf.constant(np.random.default_rng(opts.seed).uniform(0, 255, (opts.extract_batch, size, size, 3))
                    .astype(np.float32))
    for fn in calls.values():
        fn(x).numpy()
    seconds: dict[str, list[float]] = {p: [] for p in precisions}
    for p in _abba(precisions, opts.extract_repeats):
        t0 = time.perf_counter()
        calls[p](x).numpy()
        seconds[p].append(time.perf_counter() - t0)
    gflop = conv_flops(frozen) / 1e9
    out = {p: {"images_per_s": opts.extract_batch / statistics.median(s), "seconds": s,
               "gflops": opts.extract_batch / statistics.median(s) * gflop} for p, s in seconds.items()}
    return {"image_size": size, "batch": opts.extract_batch, "gflop_per_image": gflop, "by_precision": out}


def _committed_original() -> dict:
    """The original-style scratch epoch of the committed full bench (bench/results.json)."""
    committed = json.loads((REPO / "bench" / "results.json").read_text())
    return {"epoch_seconds_median": committed["scratch"]["original"]["epoch_seconds_median"],
            "source": f"bench/results.json ({committed['meta']['mode']} mode, {committed['meta']['date']})"}


def _paired_auc_difference(y: np.ndarray, groups: np.ndarray, p32: list[float], p16: list[float],
                           opts: PrecisionOptions) -> list[float] | None:
    """95 % interval of ROC-AUC(bfloat16) - ROC-AUC(float32) over the same patient resamples."""
    if opts.n_boot < 1:
        return None
    a = bootstrap_distribution(y, p32, groups=groups, n_boot=opts.n_boot, seed=opts.seed)["roc_auc"]
    b = bootstrap_distribution(y, p16, groups=groups, n_boot=opts.n_boot, seed=opts.seed)["roc_auc"]
    diff = (b - a)[~np.isnan(b - a)]
    return [float(v) for v in np.quantile(diff, [0.025, 0.975])] if diff.size else None


def compare_auc(runs: dict[str, list[dict]], data: dict, opts: PrecisionOptions) -> dict:
    """Per precision: test ROC-AUC and interval (first run); bfloat16 against float32's interval and paired."""
    test = split_frame(read_manifest(data["dir"]), "test")
    first = {p: rs[0]["test"] for p, rs in runs.items()}
    out: dict = {p: {"roc_auc": t["roc_auc"], "roc_auc_ci": t["roc_auc_ci"], "accuracy": t["accuracy"]}
                 for p, t in first.items()}
    if "bfloat16" in first:
        auc32, auc16 = first["float32"]["roc_auc"], first["bfloat16"]["roc_auc"]
        ci32 = first["float32"]["roc_auc_ci"] or [auc32, auc32]
        paired = _paired_auc_difference(test["y"].to_numpy(), test["patient_id"].to_numpy(),
                                        first["float32"]["prob"], first["bfloat16"]["prob"], opts)
        out["difference"] = auc16 - auc32
        out["difference_ci"] = paired
        out["not_worse"] = bool(auc16 >= ci32[0] and (paired is None or paired[1] >= 0))
        out["rule"] = ("bfloat16's AUC is at least the lower end of float32's 95 % interval, and the paired "
                       "interval of the difference reaches 0")
    return out


def _targets(results: dict) -> dict:
    """The issue's targets: value, bound and whether this run met them (None where they do not apply)."""
    s, v = results["scratch"], results["vgg16"]
    if "bfloat16" not in s["epoch_seconds_median"]:
        return {name: {"value": None, "target": f"{op} {bound}", "met": None,
                       "note": "not measured: this CPU has no bf16 instructions"}
                for name, (op, bound) in TARGETS.items()}
    values = {
        "scratch_epoch_vs_original": s["ratio_vs_original"]["bfloat16"],
        "vgg16_extract_speedup": v["extraction"]["speedup"],
        "scratch_roc_auc_not_worse": s["auc"]["not_worse"],
        "vgg16_roc_auc_not_worse": v["auc"]["not_worse"],
    }
    out = {}
    for name, value in values.items():
        op, bound = TARGETS[name]
        met = value <= bound if op == "<=" else value >= bound if op == ">=" else value == bound
        out[name] = {"value": value, "target": f"{op} {bound}", "met": bool(met)}
    return out


def run_precision(opts: PrecisionOptions) -> dict:
    """Everything above, interleaved; writes ``precision_results.json`` and ``.md`` into ``opts.out`` (None:
    bench/ for the full run, runs/bench-quick/ for any other)."""
    out = results_folder(opts.out, partial_run(opts, MEASURED))
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="covidxray-bench-precision-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start, load_before = time.perf_counter(), load_average()
    tf.config.experimental.enable_op_determinism()
    cpu = cpu_record()
    precisions = ["float32", "bfloat16"] if cpu["bf16"] else ["float32"]
    notes = [] if cpu["bf16"] else [f"this CPU ({cpu['model']}) reports none of {'/'.join(BF16_FLAGS)}: bfloat16 "
                                    "would be emulated, so only float32 is measured"]
    _log(f"CPU {cpu['model']}; bf16 flags: {cpu['bf16_flags'] or 'none'}; measuring {precisions}")
    base = Options(out=out, data=opts.data, quick=opts.quick, image_size=opts.image_size,
                   batch_size=opts.batch_size, epochs=opts.original_epochs or 1, weights=opts.weights,
                   seed=opts.seed, max_images=opts.max_images)
    try:
        data = prepare_data(base, work)
        _log(f"{data['source']}: {data['counts']}")
        originals: list[dict] = []
        scratch_runs: dict[str, list[dict]] = {p: [] for p in precisions}

        def original_run() -> None:
            _log("scratch: original-style pipeline")
            run = run_original("scratch", base, data, work)
            originals.append({k: run[k] for k in ("epoch_seconds", "epoch_seconds_median")})

        if opts.original_epochs:
            original_run()
        for i, p in enumerate(_abba(precisions, opts.repeats)):
            _log(f"scratch: ours, {p}")
            scratch_runs[p].append(train_ours("scratch", p, opts, data, work, f"r{i}"))
        if opts.original_epochs and opts.repeats > 1:
            original_run()
        if originals:
            original = {"epoch_seconds_median": statistics.median(o["epoch_seconds_median"] for o in originals),
                        "runs": originals, "source": "measured in this run, before and after ours"}
        else:
            original = _committed_original()
            notes.append(f"original-style scratch epoch not rerun: taken from {original['source']}")
        medians = {p: statistics.median(t for r in rs for t in (r["epoch_seconds"][1:] or r["epoch_seconds"]))
                   for p, rs in scratch_runs.items()}
        scratch = {"original": original, "runs": scratch_runs, "epoch_seconds_median": medians,
                   "ratio_vs_original": {p: m / original["epoch_seconds_median"] for p, m in medians.items()},
                   "auc": compare_auc(scratch_runs, data, opts)}
        if "bfloat16" in medians:
            scratch["bfloat16_vs_float32"] = medians["bfloat16"] / medians["float32"]

        _log("vgg16: frozen-part feature extraction throughput")
        extraction = extraction_throughput(precisions, opts)
        if "bfloat16" in precisions:
            by = extraction["by_precision"]
            extraction["speedup"] = by["bfloat16"]["images_per_s"] / by["float32"]["images_per_s"]
        vgg_runs: dict[str, list[dict]] = {p: [] for p in precisions}
        for p in precisions[::-1]:
            _log(f"vgg16: ours (cached features), {p}")
            vgg_runs[p].append(train_ours("vgg16", p, opts, data, work, "r0"))
        vgg16 = {"extraction": extraction, "runs": vgg_runs, "auc": compare_auc(vgg_runs, data, opts)}
        if "bfloat16" in precisions:
            rates = {p: vgg_runs[p][0]["feature_images_per_s"] for p in precisions}
            vgg16["in_pipeline_extract_speedup"] = rates["bfloat16"] / rates["float32"]
        for runs in (scratch_runs, vgg_runs):
            for rs in runs.values():
                for r in rs:
                    r["test"].pop("prob", None)
        results = {"cpu": cpu, "precisions": precisions, "scratch": scratch, "vgg16": vgg16, "notes": notes}
        results["targets"] = _targets(results)
        results["meta"] = {
            "mode": "quick" if opts.quick else "full",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m bench --precision" + (" --quick" if opts.quick else ""),
            "data": data["source"], "counts": data["counts"],
            "options": {k: v for k, v in asdict(opts).items() if k not in ("out", "data", "workdir")},
            "load_average_before": load_before, "load_average_after": load_average(),
            "bench_seconds": time.perf_counter() - t_start, "representative": not opts.quick,
            "versions": versions(),
        }
    finally:
        if opts.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    results = _clean(results)
    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / "precision_results.json")
    (out / "precision_results.md").write_text(markdown(results), encoding="utf-8")
    _log(f"wrote {out / 'precision_results.json'} and .md in {time.perf_counter() - t_start:.0f} s")
    return results


def _f(value: object, spec: str = ".2f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    return format(float(value), spec)


def _auc_cell(auc: dict, p: str) -> str:
    entry = auc.get(p)
    if not entry:
        return "n/a"
    ci = entry.get("roc_auc_ci")
    return f"{_f(entry['roc_auc'], '.3f')}" + (f" [{_f(ci[0], '.3f')}, {_f(ci[1], '.3f')}]" if ci else "")


def markdown(results: dict) -> str:
    """``precision_results.md``: the CPU, the tables and the targets."""
    cpu, meta, s, v = results["cpu"], results["meta"], results["scratch"], results["vgg16"]
    precisions = results["precisions"]
    lines = ["# float32 against bfloat16 (`python -m bench --precision`)", "",
             f"{meta['mode']} mode, {meta['date']}; data: {meta['data']} {meta['counts']}; "
             f"{meta['options']['image_size']} px, batch {meta['options']['batch_size']}, "
             f"{meta['options']['epochs']} epochs per run of ours; load average before/after "
             f"{meta['load_average_before']} / {meta['load_average_after']}.", "",
             f"CPU: {cpu['model']} ({cpu['cores']} cores); bf16 flags: {', '.join(cpu['bf16_flags']) or 'none'}; "
             f"`auto` picks {cpu['auto']['used']} ({cpu['auto']['reason']}).", ""]
    lines += [f"- {n}" for n in results["notes"]] + ([""] if results["notes"] else [])
    head = "| | " + " | ".join(precisions) + " |"
    rule = "|---|" + "---:|" * len(precisions)
    lines += ["## Scratch CNN", "", head, rule,
              "| epoch, s (median of epochs 2..N over all runs) | "
              + " | ".join(_f(s["epoch_seconds_median"][p]) for p in precisions) + " |",
              "| / original-style epoch | " + " | ".join(_f(s["ratio_vs_original"][p]) for p in precisions) + " |",
              "| test ROC-AUC [95 % interval] | " + " | ".join(_auc_cell(s["auc"], p) for p in precisions) + " |",
              "", f"Original-style epoch: {_f(s['original']['epoch_seconds_median'])} s "
              f"({s['original']['source']})."]
    if "bfloat16_vs_float32" in s:
        lines.append(f"bfloat16 / float32 epoch: {_f(s['bfloat16_vs_float32'])}.")
    by = v["extraction"]["by_precision"]
    lines += ["", "## VGG16", "", head, rule,
              f"| frozen-part extraction, images/s ({v['extraction']['image_size']} px, batch "
              f"{v['extraction']['batch']}, median) | " + " | ".join(_f(by[p]['images_per_s'], '.1f')
                                                                   for p in precisions) + " |",
              "| extraction inside `train`, images/s | "
              + " | ".join(_f(v["runs"][p][0].get("feature_images_per_s"), ".1f") for p in precisions) + " |",
              "| test ROC-AUC [95 % interval] | " + " | ".join(_auc_cell(v["auc"], p) for p in precisions) + " |", ""]
    if "speedup" in v["extraction"]:
        lines.append(f"Extraction speed-up bfloat16 / float32: {_f(v['extraction']['speedup'])} (micro), "
                     f"{_f(v.get('in_pipeline_extract_speedup'))} (inside train).")
    for name, auc in (("scratch", s["auc"]), ("VGG16", v["auc"])):
        if "difference" in auc:
            ci = auc["difference_ci"]
            lines.append(f"{name}: ROC-AUC bfloat16 - float32 = {_f(auc['difference'], '+.3f')}"
                         + (f" (paired 95 % interval [{_f(ci[0], '+.3f')}, {_f(ci[1], '+.3f')}])" if ci else "")
                         + f"; not worse: {_f(auc['not_worse'])}.")
    lines += ["", "## Targets", "", "| target | value | bound | met |", "|---|---:|---|---|"]
    for name, t in results["targets"].items():
        value = t["value"]
        shown = _f(value) if isinstance(value, bool) or value is None else _f(value)
        lines.append(f"| `{name}` | {shown} | {t['target']} | {_f(t['met']) if t['met'] is not None else 'n/a'} |")
    if meta["mode"] == "quick":
        lines += ["", "Quick mode: proves the bench runs; its numbers mean nothing."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run."""
    d = PrecisionOptions()
    p = argparse.ArgumentParser(prog="python -m bench --precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke run: 64 px, a subset, 2 epochs (< 3 minutes)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for precision_results.json/.md (default: bench/ for the full run, "
                   "runs/bench-quick/ for --quick, changed settings or synthetic data)")
    p.add_argument("--data", type=Path, default=SHARED_DATA,
                   help="folder holding seed-dataset/ and ieee8023-metadata/ (synthetic data when absent)")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs per run of ours (default {d.epochs})")
    p.add_argument("--original-epochs", type=int, default=None,
                   help=f"epochs per original-style run (default {d.original_epochs}; 0: committed results.json)")
    p.add_argument("--repeats", type=int, default=None, help=f"scratch runs per precision (default {d.repeats})")
    p.add_argument("--weights", default=d.weights, help="VGG16 backbone weights spec")
    p.add_argument("--workdir", type=Path, default=None, help="keep the work files here (default: a temp folder)")
    args = p.parse_args(argv)
    overrides: dict = {"data": args.data, "weights": args.weights, "workdir": args.workdir}
    for key in ("out", "epochs", "original_epochs", "repeats"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    opts = PrecisionOptions.quick_mode(**overrides) if args.quick else replace(PrecisionOptions(), **overrides)
    results = run_precision(opts)
    met = [t["met"] for t in results["targets"].values() if t["met"] is not None]
    print(f"targets met: {sum(met)}/{len(met)}" if met else "targets: not applicable (no bf16 on this CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
