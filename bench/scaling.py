"""How cost grows with the data: build and train on 10 %, 30 %, 100 % of a synthetic set, one subprocess each.

Each size runs in its own process, so its peak resident memory is its own. The synthetic sources are generated
first (not measured); then the dataset build and each model's ``covidxray.train.train`` are measured
separately. The memory caches are reported next to the peaks (decoded images: uint8 grayscale; frozen-backbone
activations: float16), because those grow with the data by design and everything else should not.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

from bench.measure import PeakMemory

IMAGES_PER_NORMAL_PATIENT = 1.21
IMAGES_PER_COVID_PATIENT = 1.57
"""Average films per patient of ``covidxray.synthetic`` (measured), to aim at a number of images."""


def child(spec: dict) -> dict:
    """One size of the curve (runs in a subprocess): generate, build, train; times and peaks."""
    from covidxray.build import build_dataset
    from covidxray.manifest import read_manifest
    from covidxray.synthetic import make_synthetic_sources
    from covidxray.train import TrainConfig, train

    work = Path(spec["workdir"])
    target = spec["n"] * spec["fraction"]
    src = make_synthetic_sources(work / "sources", seed=spec["seed"],
                                 n_normal_patients=max(2, round(0.6 * target / IMAGES_PER_NORMAL_PATIENT)),
                                 n_covid_patients=max(2, round(0.4 * target / IMAGES_PER_COVID_PATIENT)))
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        build_dataset(work / "dataset", chest_xray=src.chest_xray, covid_xray=src.covid_xray, progress=False)
        seconds = time.perf_counter() - t0
    df = read_manifest(work / "dataset")
    counts = {s: int((df["split"] == s).sum()) for s in ("train", "val", "test")}
    size = spec["image_size"]
    out: dict = {"fraction": spec["fraction"], "n_images": len(df), "counts": counts,
                 "build": {"seconds": seconds, "peak_rss_mb": mem.peak_bytes / 2**20}}
    for model in spec["models"]:
        cfg = TrainConfig(model=model, weights=spec["weights"] if model == "vgg16" else "none", image_size=size,
                          batch_size=32, epochs=spec["epochs"], lr=spec["lr"], seed=spec["seed"], patience=0)
        run_dir = work / f"run-{model}"
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            train(cfg, work / "dataset", run_dir, progress=False)
            seconds = time.perf_counter() - t0
        timing = json.loads((run_dir / "timing.json").read_text())
        n_fit = counts["train"] + counts["val"]
        cache_mb = n_fit * size * size / 2**20  # decoded uint8 grayscale images (tf.data memory cache)
        if "features" in timing:
            cache_mb = sum(v["bytes"] for v in timing["features"].values() if not v["on_disk"]) / 2**20
        out[model] = {"seconds": seconds, "epoch_seconds": timing["epoch_seconds"],
                      "peak_rss_mb": mem.peak_bytes / 2**20, "start_rss_mb": mem.start_bytes / 2**20,
                      "memory_cache_mb": cache_mb,
                      "peak_minus_cache_mb": mem.peak_bytes / 2**20 - cache_mb}
    out["process_peak_rss_mb"] = max([out["build"]["peak_rss_mb"], *(out[m]["peak_rss_mb"] for m in spec["models"])])
    return out


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


def scaling_curve(opts: object, work: Path) -> dict:
    """Run every size in a subprocess of ``python -m bench --scale-child``; rows plus the growth summary."""
    from bench.run import REPO

    rows, failures = [], []
    for fraction in opts.scale_fractions:
        spec = {"fraction": fraction, "n": opts.scale_n, "image_size": opts.image_size, "epochs": opts.scale_epochs,
                "models": list(opts.scale_models), "weights": opts.weights, "seed": opts.seed, "lr": opts.lr,
                "workdir": str(work / f"scale-{fraction:g}")}
        result = Path(spec["workdir"]) / "result.json"
        Path(spec["workdir"]).mkdir(parents=True, exist_ok=True)
        print(f"[bench] scaling: {fraction:.0%} of {opts.scale_n} images", flush=True)
        proc = subprocess.run([sys.executable, "-m", "bench", "--scale-child", json.dumps(spec), "--out",
                               str(result)], cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0 or not result.is_file():
            failures.append({"fraction": fraction, "returncode": proc.returncode, "stderr": proc.stderr[-2000:]})
            continue
        rows.append(json.loads(result.read_text()))
    return {"image_size": opts.image_size, "epochs": opts.scale_epochs, "models": list(opts.scale_models),
            "rows": rows, "growth": growth(rows, list(opts.scale_models)), "failures": failures}
