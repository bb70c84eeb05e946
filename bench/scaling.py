"""How cost grows with the data: build and train on 10 %, 30 %, 100 % of a synthetic set, one subprocess each.

Each size runs in its own process, so its peak resident memory is its own. The synthetic sources are generated
first, in the parent (not measured); then the dataset build and each model's ``covidxray.runs.train.train`` are
measured separately in the child. The memory caches are reported next to the peaks (decoded images: uint8
grayscale; frozen-backbone activations: float16), because those grow with the data by design and everything else
should not.

``python -m bench --scaling [--quick] [--out DIR] [--precisions float32,bfloat16] [--scale-n N] [--fractions ...]``
runs the curve on its own, in float32 and bfloat16 (see :func:`run_scaling`), and writes ``scaling_results.json``
and ``scaling_results.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.destination import changed_settings, results_folder
from bench.measure import PeakMemory, load_average

IMAGES_PER_NORMAL_PATIENT = 1.21
IMAGES_PER_COVID_PATIENT = 1.57
"""Average films per patient of ``covidxray.data.synthetic`` (measured), to aim at a number of images."""
SCALING_PRECISIONS: tuple[str, ...] = ("float32", "bfloat16")
"""The precisions the scaling bench can compare (float16 needs a GPU)."""


def synthetic_sources(root: Path, n: int, fraction: float, seed: int) -> dict[str, str]:
    """Write synthetic sources of about ``n * fraction`` images (60 % normal) under ``root``; their two folders."""
    from covidxray.data.synthetic import make_synthetic_sources

    target = n * fraction
    src = make_synthetic_sources(root, seed=seed,
                                 n_normal_patients=max(2, round(0.6 * target / IMAGES_PER_NORMAL_PATIENT)),
                                 n_covid_patients=max(2, round(0.4 * target / IMAGES_PER_COVID_PATIENT)))
    return {"chest_xray": str(src.chest_xray), "covid_xray": str(src.covid_xray)}


def child(spec: dict) -> dict:
    """One size of the curve in one precision (runs in a subprocess): build, train each model; times and peaks.

    ``spec["sources"]`` are the synthetic source folders (written by the parent, not measured); ``precision``
    (default float32) goes to ``TrainConfig.precision``."""
    from covidxray.data.build import build_dataset
    from covidxray.data.manifest import read_manifest
    from covidxray.runs.train import TrainConfig, train

    work = Path(spec["workdir"])
    precision = spec.get("precision", "float32")
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        build_dataset(work / "dataset", chest_xray=spec["sources"]["chest_xray"],
                      covid_xray=spec["sources"]["covid_xray"], progress=False)
        seconds = time.perf_counter() - t0
    df = read_manifest(work / "dataset")
    counts = {s: int((df["split"] == s).sum()) for s in ("train", "val", "test")}
    size = spec["image_size"]
    out: dict = {"fraction": spec["fraction"], "precision": precision, "n_images": len(df), "counts": counts,
                 "build": {"seconds": seconds, "peak_rss_mb": mem.peak_bytes / 2**20,
                           "start_rss_mb": mem.start_bytes / 2**20}}
    for model in spec["models"]:
        cfg = TrainConfig(model=model, weights=spec["weights"] if model == "vgg16" else "none", image_size=size,
                          batch_size=spec.get("batch_size", 32), epochs=spec["epochs"], lr=spec["lr"],
                          seed=spec["seed"], patience=0, precision=precision)
        run_dir = work / f"run-{model}"
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            summary = train(cfg, work / "dataset", run_dir, progress=False)
            seconds = time.perf_counter() - t0
        timing = json.loads((run_dir / "timing.json").read_text())
        n_fit = counts["train"] + counts["val"]
        cache_mb = n_fit * size * size / 2**20  # decoded uint8 grayscale images (tf.data memory cache)
        if "features" in timing:
            cache_mb = sum(v["bytes"] for v in timing["features"].values() if not v["on_disk"]) / 2**20
        out[model] = {"seconds": seconds, "epoch_seconds": timing["epoch_seconds"],
                      "peak_rss_mb": mem.peak_bytes / 2**20, "start_rss_mb": mem.start_bytes / 2**20,
                      "memory_cache_mb": cache_mb,
                      "peak_minus_cache_mb": mem.peak_bytes / 2**20 - cache_mb,
                      "precision_used": summary["precision"]["used"]}
    out["process_peak_rss_mb"] = max([out["build"]["peak_rss_mb"], *(out[m]["peak_rss_mb"] for m in spec["models"])])
    return out


def run_child(spec: dict) -> tuple[dict | None, dict | None]:
    """Run :func:`child` in a fresh ``python -m bench --scale-child`` process: (its result, None) or (None, failure)."""
    from bench.run import REPO

    workdir = Path(spec["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    result = workdir / "result.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--scale-child", json.dumps(spec), "--out", str(result)],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0 or not result.is_file():
        return None, {"fraction": spec["fraction"], "precision": spec.get("precision", "float32"),
                      "returncode": proc.returncode, "stderr": proc.stderr[-2000:]}
    return json.loads(result.read_text()), None


def _slope(xs: list[float], ys: list[float]) -> float | None:
    """Exponent k of y ~ x^k between the smallest and the largest size (1: linear, 0: flat)."""
    if len(xs) < 2 or min(ys) <= 0 or xs[0] == xs[-1]:
        return None
    return math.log(ys[-1] / ys[0]) / math.log(xs[-1] / xs[0])


def growth(rows: list[dict], models: list[str]) -> dict:
    """Per stage: time exponent, memory added per 1000 images beyond the caches, and a sentence."""
    rows = sorted(rows, key=lambda r: r["n_images"])
    n = [r["n_images"] for r in rows]
    out: dict = {}
    stages = [("build", "peak_rss_mb"), *[(m, "peak_minus_cache_mb") for m in models]]
    for stage, mem_key in stages:
        if not all(stage in r for r in rows):
            continue
        secs = [r[stage]["seconds"] for r in rows]
        mem = [r[stage][mem_key] for r in rows]
        k = _slope(n, secs)
        per_k = (mem[-1] - mem[0]) / ((n[-1] - n[0]) / 1000) if n[-1] > n[0] else None
        out[stage] = {"time_exponent": k, "memory_mb_per_1000_images": per_k, "memory_measure": mem_key}
        if k is not None and per_k is not None:
            shape = "about linear" if 0.8 <= k <= 1.2 else f"~n^{k:.2f}"
            out[stage]["summary"] = (f"{stage}: time grows {shape} in the number of images; memory beyond the "
                                     f"chosen caches grows {per_k:+.0f} MiB per 1000 images")
    return out


MEASURED = ("n", "fractions", "image_size", "epochs", "batch_size", "models", "weights", "lr", "seed", "precisions")
"""Settings of :class:`ScalingOptions` the committed bench/scaling_results.json was measured with."""


@dataclass
class ScalingOptions:
    """What ``python -m bench --scaling`` runs; ``quick_mode`` gives the test's variant."""

    out: Path | None = None
    """Folder for scaling_results.json and .md; None: bench/ for the full run, runs/bench-quick/ for any other."""
    quick: bool = False
    n: int = 6000
    """Images of the full synthetic set (about: the synthetic patients have 1-3 films)."""
    fractions: tuple[float, ...] = (0.1, 0.3, 1.0)
    image_size: int = 224
    epochs: int = 1
    batch_size: int = 32
    models: tuple[str, ...] = ("vgg16", "scratch")
    weights: str = "hed"
    lr: float = 1e-3
    seed: int = 0
    precisions: tuple[str, ...] = SCALING_PRECISIONS
    """Asked for; bfloat16 is dropped (and the notes say so) on a CPU without bf16 instructions."""
    workdir: Path | None = None

    @classmethod
    def quick_mode(cls, **overrides: object) -> ScalingOptions:
        """About 60 images, 32 px, half and all of them: proves the bench runs (numbers mean nothing)."""
        base: dict = {"quick": True, "n": 60, "fractions": (0.5, 1.0), "image_size": 32}
        base.update(overrides)
        return cls(**base)


def time_ratios(by_precision: dict[str, dict], stages: list[str]) -> dict[str, float]:
    """bfloat16 seconds / float32 seconds per stage of one size (stages missing in either run are left out)."""
    a, b = by_precision.get("float32"), by_precision.get("bfloat16")
    if not a or not b:
        return {}
    return {s: b[s]["seconds"] / a[s]["seconds"] for s in stages if s in a and s in b and a[s]["seconds"] > 0}


def _portable_command(argv: list[str]) -> str:
    """``python -m bench --scaling ARGS`` with each ``--out`` / ``--workdir`` folder outside the repository shown
    as ``DIR`` (inside it: relative), so no machine path goes into the results."""
    from bench.run import REPO

    def shown(value: str) -> str:
        path = Path(value).resolve()
        return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else "DIR"

    folders = ("--out", "--workdir")
    words = list(argv)
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in folders and eq:
            words[i] = f"{flag}={shown(value)}"
        elif i and argv[i - 1] in folders:
            words[i] = shown(arg)
    return shlex.join(["python", "-m", "bench", "--scaling", *words])


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_scaling(opts: ScalingOptions, command: str = "python -m bench --scaling") -> dict:
    """Every size, float32 then bfloat16 back to back, each in its own subprocess; writes the results files.

    The synthetic sources of a size are written once (not measured) and read by both precisions' children; each
    child builds its own dataset from them (measured: the build does not depend on the precision, so its
    bfloat16/float32 ratio shows how much the machine drifted between the two) and trains every model."""
    from bench.precision import cpu_record
    from bench.run import REPO, _clean
    from bench.seeds import portable
    from covidxray.runs.load import versions
    from covidxray.training.compute_dtype import BF16_FLAGS

    out = results_folder(opts.out, changed_settings(opts, MEASURED))
    t_start, load_before = time.perf_counter(), load_average()
    cpu = cpu_record()
    precisions = [p for p in SCALING_PRECISIONS if p in opts.precisions]
    notes: list[str] = []
    if "bfloat16" in precisions and not cpu["bf16"]:
        precisions.remove("bfloat16")
        notes.append(f"this CPU ({cpu['model']}) reports none of {'/'.join(BF16_FLAGS)}: bfloat16 would be "
                     "emulated, so only float32 is measured")
    _log(f"CPU {cpu['model']}; bf16 flags: {cpu['bf16_flags'] or 'none'}; measuring {precisions}")
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="covidxray-bench-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    models, stages = list(opts.models), ["build", *opts.models]
    sizes: list[dict] = []
    failures: list[dict] = []
    try:
        for fraction in opts.fractions:
            size_dir = work / f"scale-{fraction:g}"
            _log(f"{fraction:.0%} of {opts.n} images: synthetic sources (not measured)")
            sources = synthetic_sources(size_dir / "sources", opts.n, fraction, opts.seed)
            by_precision: dict[str, dict] = {}
            for precision in precisions:
                _log(f"{fraction:.0%} of {opts.n} images: build and train, {precision}")
                spec = {"fraction": fraction, "image_size": opts.image_size, "epochs": opts.epochs,
                        "batch_size": opts.batch_size, "models": models, "weights": opts.weights, "seed": opts.seed,
                        "lr": opts.lr, "precision": precision, "sources": sources,
                        "workdir": str(size_dir / precision)}
                row, failure = run_child(spec)
                if row is not None:
                    by_precision[precision] = row
                if failure is not None:
                    failures.append(failure)
                if opts.workdir is None:
                    shutil.rmtree(size_dir / precision, ignore_errors=True)
            if opts.workdir is None:
                shutil.rmtree(size_dir, ignore_errors=True)
            first = next(iter(by_precision.values()), {})
            sizes.append({"fraction": fraction, "n_images": first.get("n_images"), "counts": first.get("counts"),
                          "by_precision": by_precision,
                          "ratio_bfloat16_float32": time_ratios(by_precision, stages)})
    finally:
        if opts.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    done = [s for s in sizes if s["by_precision"]]
    results = {
        "cpu": cpu, "precisions": precisions, "notes": notes,
        "n": opts.n, "image_size": opts.image_size, "epochs": opts.epochs, "batch_size": opts.batch_size,
        "models": models, "weights": opts.weights, "sizes": sizes,
        "growth": {p: growth([s["by_precision"][p] for s in done if p in s["by_precision"]], models)
                   for p in precisions},
        "failures": failures,
        "meta": {
            "mode": "quick" if opts.quick else "full", "representative": not opts.quick,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": command,
            "options": {k: v for k, v in asdict(opts).items() if k not in ("out", "workdir")},
            "load_average_before": load_before, "load_average_after": load_average(),
            "bench_seconds": time.perf_counter() - t_start, "versions": versions(),
        },
    }
    results = portable(_clean(results), {str(work.resolve()): "WORKDIR", str(work): "WORKDIR", str(REPO): "."})
    out.mkdir(parents=True, exist_ok=True)
    write_results(results, out)
    _log(f"wrote {out / 'scaling_results.json'} and .md in {time.perf_counter() - t_start:.0f} s")
    return results


def markdown(results: dict) -> str:
    """``scaling_results.md``: the README's section (see ``covidxray.studies.readme_tables.scaling_text``), then every
    figure of every run and the failures."""
    from covidxray.studies.readme_tables import scaling_text

    models = results["models"]
    lines = ["# Scaling, float32 and bfloat16 (`python -m bench --scaling`)", "", scaling_text(results).rstrip(), "",
             "## Every figure", "",
             "| share | images | precision | stage | seconds | peak MiB | start MiB | memory cache MiB | "
             "peak - cache MiB |", "|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for size in results["sizes"]:
        for precision, row in size["by_precision"].items():
            for stage in ["build", *models]:
                r = row.get(stage)
                if r is None:
                    continue
                cells = [f"{size['fraction']:.0%}", str(size["n_images"]), precision, stage, f"{r['seconds']:.1f}",
                         f"{r['peak_rss_mb']:.0f}", f"{r['start_rss_mb']:.0f}"]
                cells += [f"{r[k]:.0f}" if k in r else "" for k in ("memory_cache_mb", "peak_minus_cache_mb")]
                lines.append("| " + " | ".join(cells) + " |")
    meta = results["meta"]
    lines += ["", f"Command: `{meta['command']}`; {meta['mode']} mode, {meta['date']}; load average before / after "
              f"{meta['load_average_before']} / {meta['load_average_after']}; TensorFlow "
              f"{meta['versions'].get('tensorflow')}."]
    for failure in results["failures"]:
        lines.append(f"- {failure['fraction']:.0%}, {failure['precision']}: failed (exit {failure['returncode']}).")
    if meta["mode"] == "quick":
        lines += ["", "Quick mode: proves the bench runs; its numbers mean nothing."]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out: Path) -> None:
    """``scaling_results.json`` and ``scaling_results.md`` in ``out``."""
    from covidxray.outputs import write_json, write_text

    write_json(results, out / "scaling_results.json")
    write_text(markdown(results), out / "scaling_results.md")


def _fractions(text: str) -> tuple[float, ...]:
    """``0.1,0.3,1`` -> (0.1, 0.3, 1.0); each in (0, 1], increasing."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers, e.g. 0.1,0.3,1") from None
    if not values or any(not 0 < v <= 1 for v in values) or list(values) != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"{text!r}: give increasing shares in (0, 1], e.g. 0.1,0.3,1")
    return values


def _precisions(text: str) -> tuple[str, ...]:
    """``float32,bfloat16`` -> ("float32", "bfloat16"); each one of SCALING_PRECISIONS."""
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in values if v not in SCALING_PRECISIONS]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: use one or both of {','.join(SCALING_PRECISIONS)}")
    return values


def main(argv: list[str] | None = None) -> int:
    """Parse the options of ``python -m bench --scaling`` and run."""
    argv = sys.argv[1:] if argv is None else list(argv)
    d = ScalingOptions()
    p = argparse.ArgumentParser(prog="python -m bench --scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="test run: about 60 images, 32 px, shares 0.5 and 1")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for scaling_results.json/.md (default: bench/ for the full run, "
                   "runs/bench-quick/ for --quick or changed settings)")
    p.add_argument("--precisions", type=_precisions, default=None,
                   help="float32, bfloat16 or both (default both; bfloat16 only where the CPU has bf16)")
    p.add_argument("--scale-n", type=int, default=None, help=f"images of the full synthetic set (default {d.n})")
    p.add_argument("--fractions", type=_fractions, default=None, help="shares of it to run (default 0.1,0.3,1)")
    p.add_argument("--image-size", type=int, default=None, help=f"default {d.image_size} (32 with --quick)")
    p.add_argument("--epochs", type=int, default=None, help=f"default {d.epochs}")
    p.add_argument("--weights", default=d.weights, help="VGG16 backbone weights spec")
    p.add_argument("--workdir", type=Path, default=None, help="keep the work files here (default: a temp folder)")
    args = p.parse_args(argv)
    if args.scale_n is not None and args.scale_n < 10:
        p.error(f"--scale-n {args.scale_n}: give at least 10 images")
    if args.image_size is not None and args.image_size < 32:
        p.error(f"--image-size {args.image_size}: VGG16 needs at least 32 px")
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs {args.epochs}: give at least 1")
    overrides: dict = {"out": args.out, "weights": args.weights, "workdir": args.workdir}
    for key, field in (("precisions", "precisions"), ("scale_n", "n"), ("fractions", "fractions"),
                       ("image_size", "image_size"), ("epochs", "epochs")):
        if getattr(args, key) is not None:
            overrides[field] = getattr(args, key)
    opts = ScalingOptions.quick_mode(**overrides) if args.quick else replace(d, **overrides)
    results = run_scaling(opts, _portable_command(argv))
    if results["failures"]:
        print(f"{len(results['failures'])} run(s) failed; see scaling_results.json's failures", file=sys.stderr)
        return 1
    return 0
