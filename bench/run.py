"""The benchmark: the original-style pipeline and ours, side by side in one process, on the same data."""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from bench import original
from bench.destination import changed_settings, results_folder
from bench.measure import (
    EpochTimer,
    PeakMemory,
    best_seconds,
    load_average,
    matmul_gflops,
    steady_epoch,
)
from covidxray.data.build import build_dataset
from covidxray.data.manifest import read_manifest, split_frame
from covidxray.metrics import binary_metrics
from covidxray.outputs import write_json
from covidxray.runs.load import load_run, predict_dataframe, predict_proba, versions
from covidxray.runs.train import TrainConfig, train
from covidxray.training.feature_cache import conv_flops, extract_features, extractor, frozen_part, tail_part
from covidxray.training.loop import CustomLoop
from covidxray.training.models import build_model, compile_model
from covidxray.training.pipeline import load_images, make_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CACHED_TOLERANCE = 2e-3
"""Largest |P(covid) difference| allowed between the cached (float16 activations) and the uncached model."""

TARGETS = {
    "vgg16_total_time_ratio": ("<=", 0.2),
    "vgg16_test_roc_auc_diff": (">=", 0.0),
    "vgg16_test_f1_diff": (">=", 0.0),
    "scratch_epoch_time_ratio": ("<=", 0.8),
    "scratch_input_overhead_ratio": ("<=", 1.1),
    "scratch_batch1_latency_vs_compiled": ("<=", 1.2),
    "vgg16_batch1_latency_vs_compiled": ("<=", 1.2),
    "vgg16_extract_fraction_of_matmul": (">=", 0.5),
}
"""The issue's targets as (comparison, bound) on fields of ``results["targets"]``."""


@dataclass
class Options:
    """What to run; ``quick()`` gives the CI variant."""

    out: Path | None = None
    """Folder for results.json and .md; None: bench/ for the full run, runs/bench-quick/ for any other (see
    :func:`partial_run`)."""
    data: Path = SHARED_DATA
    quick: bool = False
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 32
    weights: str = "hed"
    feature_views: int = TrainConfig.feature_views
    lr: float = 1e-3
    extra_views: int | None = 4
    seed: int = 0
    infer_images: int = 64
    latency_calls: int = 40
    max_images: dict[str, int] | None = None
    matmul_n: int = 4096
    micro_repeats: int = 3
    extract_batch: int = 32
    precision: str = "float32"
    jit_compile: bool | None = None
    workdir: Path | None = None
    keep: bool = False
    notes: list[str] = field(default_factory=list)

    @classmethod
    def quick_mode(cls, **overrides: object) -> Options:
        """Small images, two epochs, no extra runs: the CI smoke run (< 3 minutes)."""
        base = {"quick": True, "image_size": 64, "epochs": 2, "extra_views": None, "infer_images": 32,
                "latency_calls": 10, "matmul_n": 2048, "micro_repeats": 2, "extract_batch": 8,
                "max_images": {"train": 48, "val": 24, "test": 24}}
        base.update(overrides)
        return cls(**base)


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


MEASURED = ("image_size", "epochs", "batch_size", "weights", "feature_views", "lr", "extra_views", "seed",
            "max_images", "precision", "infer_images", "latency_calls", "matmul_n", "micro_repeats", "extract_batch")
"""Settings of :class:`Options` the committed bench/results.json was measured with."""


def partial_run(opts: Any, measured: Sequence[str] = MEASURED) -> list[str]:
    """Why a run of ``opts`` (:class:`Options`, or the precision bench's, with ``data``) may not replace the
    committed results (empty for the full run): ``--quick``, a changed setting of ``measured``, or the synthetic
    data where the committed figures are the 2020 images'."""
    reasons = changed_settings(opts, measured)
    if not (opts.data / "seed-dataset" / "MANIFEST.csv").is_file():
        reasons.append("synthetic data: no seed-dataset/ in --data")
    return reasons


def _fresh() -> None:
    keras.backend.clear_session()
    gc.collect()


# ---------------------------------------------------------------------------------------------- data


def prepare_data(opts: Options, work: Path) -> dict:
    """Build the bench dataset in ``work`` from the seed dataset in ``opts.data`` (or synthetic sources)."""
    seed_dir = opts.data / "seed-dataset"
    out = work / "dataset"
    if (seed_dir / "MANIFEST.csv").is_file():
        metadata = opts.data / "ieee8023-metadata" / "metadata-early.csv"
        build_dataset(out, presplit=seed_dir, metadata=metadata if metadata.is_file() else None, progress=False)
        source = "seed-dataset (the 2020 project's images)"
    else:
        from covidxray.data.synthetic import make_synthetic_sources

        src = make_synthetic_sources(work / "sources", seed=opts.seed)
        build_dataset(out, chest_xray=src.chest_xray, covid_xray=src.covid_xray, progress=False)
        source = "synthetic (../shared/data absent)"
    if opts.max_images:
        _subset(out, opts.max_images, opts.seed)
        source += f", subset of at most {opts.max_images} images per split"
    df = read_manifest(out)
    counts = {s: int((df["split"] == s).sum()) for s in ("train", "val", "test")}
    return {"dir": out, "source": source, "counts": counts}


def _subset(dataset_dir: Path, caps: dict[str, int], seed: int) -> None:
    """Keep a seeded, label-stratified sample of at most ``caps[split]`` images per split of a built dataset.

    Only for the bench's temporary copy: the other files are deleted and ``manifest.csv`` rewritten.
    """
    manifest = dataset_dir / "manifest.csv"
    df = pd.read_csv(manifest)
    parts = []
    for split, group in df.groupby("split", sort=False):
        cap = caps.get(str(split))
        if cap is None or len(group) <= cap:
            parts.append(group)
            continue
        for _, by_label in group.groupby("label", sort=True):
            k = max(1, round(cap * len(by_label) / len(group)))
            parts.append(by_label.sample(n=min(k, len(by_label)), random_state=seed))
    kept = pd.concat(parts).sort_index()
    for rel in sorted(set(df["path"]) - set(kept["path"])):
        (dataset_dir / rel).unlink()
    kept.to_csv(manifest, index=False)


# ---------------------------------------------------------------------------------------------- runs


def _test_metrics(y: np.ndarray, prob: np.ndarray, threshold: float) -> dict:
    """Accuracy and F1 at the pipeline's own threshold, ROC-AUC, and F1 at 0.5 for reference."""
    m = binary_metrics(y, prob, threshold)
    return {"accuracy": m["accuracy"], "f1": m["f1"], "roc_auc": m["roc_auc"], "threshold": float(threshold),
            "f1_at_0.5": binary_metrics(y, prob, 0.5)["f1"]}


def run_original(kind: str, opts: Options, data: dict, work: Path) -> dict:
    """Train the 2020-style pipeline; returns timings, peak memory, test metrics and the saved model path."""
    _fresh()
    keras.utils.set_random_seed(opts.seed)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        model = original.build(kind, opts.image_size, opts.weights)
        fit = original.train(model, data["dir"], opts.image_size, opts.epochs, work / f"orig-{kind}-ckpt", opts.seed)
        total = time.perf_counter() - t0
    path = work / f"orig-{kind}.keras"
    model.save(path)
    y, prob = original.predict_folder(model, data["dir"] / "test", opts.image_size)
    n_train = fit["n_train"]
    return {
        "epoch_seconds": fit["epoch_seconds"],
        "epoch_seconds_median": steady_epoch(fit["epoch_seconds"]),
        "total_train_seconds": total,
        "train_images_per_s": n_train * opts.epochs / total,
        **{k: v for k, v in mem.to_dict().items() if k != "method"},
        "test": _test_metrics(y, prob, 0.5),
        "model_path": str(path),
    }


def _ours_config(kind: str, opts: Options, views: int | None = None) -> TrainConfig:
    return TrainConfig(model=kind, weights=opts.weights if kind == "vgg16" else "none", image_size=opts.image_size,
                       batch_size=opts.batch_size, epochs=opts.epochs, lr=opts.lr, seed=opts.seed,
                       patience=0, feature_views=views or opts.feature_views, precision=opts.precision,
                       jit_compile=opts.jit_compile)


def run_ours(kind: str, opts: Options, data: dict, work: Path, views: int | None = None) -> dict:
    """Train with covidxray.runs.train.train (everything it writes included in the time)."""
    _fresh()
    cfg = _ours_config(kind, opts, views)
    out = work / f"ours-{kind}-v{cfg.feature_views}"
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        train(cfg, data["dir"], out, progress=False)
        total = time.perf_counter() - t0
    timing = json.loads((out / "timing.json").read_text())
    model, meta = load_run(out)
    test_df = split_frame(read_manifest(data["dir"]), "test")
    prob = predict_dataframe(model, test_df, opts.image_size, opts.batch_size)
    n_train = data["counts"]["train"]
    result = {
        "epoch_seconds": timing["epoch_seconds"],
        "epoch_seconds_median": steady_epoch(timing["epoch_seconds"]),
        "total_train_seconds": total,
        "train_images_per_s": n_train * opts.epochs / total,
        **{k: v for k, v in mem.to_dict().items() if k != "method"},
        "test": _test_metrics(test_df["y"].to_numpy(), prob, meta["threshold"]),
        "model_path": str(out / "model.keras"),
        "run_dir": str(out),
    }
    if "features" in timing:
        result["cached_features"] = {"views": timing["features"]["train"]["views"],
                                     "seconds": timing["feature_seconds"],
                                     "gflops": timing["features"]["train"]["gflops"],
                                     "cache_mb": sum(v["bytes"] for v in timing["features"].values()) / 2**20}
    return result


def input_pipeline_reference(opts: Options, data: dict) -> dict:
    """The scratch CNN's epoch time on the same batches already decoded and augmented, held in memory, trained by
    the same loop as ours (covidxray.training.loop), so the difference is the input pipeline's cost alone."""
    _fresh()
    cfg = _ours_config("scratch", opts).resolved()
    df = read_manifest(data["dir"])
    train_df, val_df = split_frame(df, "train"), split_frame(df, "val")
    ds = make_dataset(train_df, image_size=cfg.image_size, batch_size=cfg.batch_size, training=True,
                      augment=cfg.augment_config(), seed=cfg.seed)
    x, y = (np.concatenate(a) for a in zip(*[(b[0].numpy(), b[1].numpy()) for b in ds], strict=True))
    val = make_dataset(val_df, image_size=cfg.image_size, batch_size=cfg.batch_size, training=False)
    xv, yv = (np.concatenate(a) for a in zip(*[(b[0].numpy(), b[1].numpy()) for b in val], strict=True))
    train_mem = tf.data.Dataset.from_tensor_slices((x, y)).batch(cfg.batch_size)
    val_mem = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(cfg.batch_size)
    keras.utils.set_random_seed(cfg.seed)
    model = build_model("scratch", image_size=cfg.image_size, dropout=cfg.dropout, seed=cfg.seed)
    compile_model(model, cfg.lr, jit_compile=False)
    timer = EpochTimer()
    CustomLoop(tf.distribute.get_strategy(), model).fit(train_mem, val_mem, initial_epoch=0, epochs=opts.epochs,
                                                        callbacks=[timer])
    return {"epoch_seconds": timer.seconds, "epoch_seconds_median": steady_epoch(timer.seconds)}


# ---------------------------------------------------------------------------------------------- micro


def machine_peaks(opts: Options) -> dict:
    """Float32 matmul peak and the frozen VGG16 part's throughput at 224 px, measured interleaved."""
    _fresh()
    model = build_model("vgg16", image_size=224, weights=opts.weights)
    frozen = frozen_part(model, "block5_conv3")
    run = extractor(frozen)
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (opts.extract_batch, 224, 224, 3)).astype(np.float32))
    run(x).numpy()
    matmul, extract = 0.0, float("inf")
    for _ in range(opts.micro_repeats):
        matmul = max(matmul, matmul_gflops(opts.matmul_n, repeats=2))
        extract = min(extract, best_seconds(lambda: run(x).numpy(), repeats=1, warmup=0))
    gflop = conv_flops(frozen) / 1e9
    images_per_s = opts.extract_batch / extract
    return {"matmul_gflops": matmul, "matmul_n": opts.matmul_n, "vgg16_extract_images_per_s": images_per_s,
            "vgg16_extract_gflops": images_per_s * gflop, "vgg16_frozen_gflop_per_image": gflop,
            "extract_batch": opts.extract_batch}


def inference(kind: str, orig_path: str, ours_path: str, opts: Options, data: dict) -> dict:
    """Batch-32 throughput and batch-1 latency, original-style (``model.predict``) vs ours, interleaved.

    Also the latency of a bare compiled call (``tf.function`` around the model) for each model, the floor
    that a per-image path should come close to.
    """
    _fresh()
    orig = keras.models.load_model(orig_path)
    ours, _ = load_run(Path(ours_path).parent)
    test_df = split_frame(read_manifest(data["dir"]), "test").iloc[:opts.infer_images]
    x_ours = load_images(test_df["filepath"], opts.image_size)
    x_orig = x_ours / 255.0
    one_ours, one_orig = x_ours[:1], x_orig[:1]
    compiled = {}
    for name, model, one in (("original", orig, one_orig), ("ours", ours, one_ours)):
        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        fn = tf.function(lambda t, m=model: m(t, training=False), input_signature=[spec])
        compiled[name] = (fn, tf.constant(one))
    calls = {
        "original_b1": lambda: orig.predict(one_orig, verbose=0),
        "ours_b1": lambda: predict_proba(ours, one_ours),
        "original_compiled_b1": lambda: compiled["original"][0](compiled["original"][1]).numpy(),
        "ours_compiled_b1": lambda: compiled["ours"][0](compiled["ours"][1]).numpy(),
    }
    bulk = {
        "original_b32": lambda: orig.predict(x_orig, batch_size=32, verbose=0),
        "ours_b32": lambda: predict_proba(ours, x_ours, batch_size=32),
    }
    for fn in [*calls.values(), *bulk.values()]:
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in [*calls, *bulk]}
    names = list(calls)
    block = 5  # consecutive calls, as a per-image service makes them; blocks rotate so none always follows another
    for r in range(max(1, opts.latency_calls // block)):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(block):
                t0 = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - t0)
    for r in range(opts.micro_repeats):
        for name in (list(bulk) if r % 2 == 0 else list(bulk)[::-1]):
            t0 = time.perf_counter()
            bulk[name]()
            times[name].append(time.perf_counter() - t0)
    n = len(x_ours)
    out = {}
    for side in ("original", "ours"):
        out[side] = {
            "latency_b1_ms": float(np.median(times[f"{side}_b1"])) * 1e3,
            "latency_b1_compiled_ms": float(np.median(times[f"{side}_compiled_b1"])) * 1e3,
            "infer_images_per_s_b32": n / min(times[f"{side}_b32"]),
        }
    out["n_images"] = n
    return out


def cached_check(ours_path: str, opts: Options, data: dict) -> dict:
    """Cached path (frozen part -> float16 store -> tail) vs the uncached full model on the same test images."""
    _fresh()
    model, _ = load_run(Path(ours_path).parent)
    test_df = split_frame(read_manifest(data["dir"]), "test").iloc[:opts.infer_images]
    images = load_images(test_df["filepath"], opts.image_size)
    uncached = predict_proba(model, images)
    frozen, tail = frozen_part(model, "block5_conv3"), tail_part(model, "block5_conv3")
    store, _ = extract_features(frozen, test_df, image_size=opts.image_size, batch_size=opts.batch_size)
    try:
        feats = store.read(np.zeros(store.n, np.int64), np.arange(store.n))
    finally:
        store.close()
    cached16 = tail(feats, training=False).numpy()[:, 0].astype(np.float64)
    cached32 = tail(frozen(images, training=False), training=False).numpy()[:, 0].astype(np.float64)
    diff16 = float(np.abs(cached16 - uncached).max())
    diff32 = float(np.abs(cached32 - uncached).max())
    return {"n_images": len(images), "max_abs_diff_float16_cache": diff16, "max_abs_diff_float32": diff32,
            "tolerance": CACHED_TOLERANCE, "same_predictions": bool(diff16 <= CACHED_TOLERANCE)}


# ---------------------------------------------------------------------------------------------- results


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def ratios(orig: dict, ours: dict) -> dict:
    """ours / original for every timing, throughput and memory figure; ours - original for test metrics."""
    keys = ("epoch_seconds_median", "total_train_seconds", "train_images_per_s", "peak_rss_mb", "latency_b1_ms",
            "infer_images_per_s_b32")
    out = {k: _ratio(ours[k], orig[k]) for k in keys if k in ours and k in orig}
    out.update({f"test_{k}_diff": ours["test"][k] - orig["test"][k] for k in ("accuracy", "f1", "roc_auc")})
    return out


def targets(results: dict) -> dict:
    """The issue's targets: value, bound and whether it was met in this run."""
    s, v, p = results["scratch"], results["vgg16"], results["peaks"]
    values = {
        "vgg16_total_time_ratio": v["ratios"]["total_train_seconds"],
        "vgg16_test_roc_auc_diff": v["ratios"]["test_roc_auc_diff"],
        "vgg16_test_f1_diff": v["ratios"]["test_f1_diff"],
        "scratch_epoch_time_ratio": s["ratios"]["epoch_seconds_median"],
        "scratch_input_overhead_ratio": s["input_pipeline"]["ratio"],
        "scratch_batch1_latency_vs_compiled": _ratio(s["ours"]["latency_b1_ms"], s["ours"]["latency_b1_compiled_ms"]),
        "vgg16_batch1_latency_vs_compiled": _ratio(v["ours"]["latency_b1_ms"], v["ours"]["latency_b1_compiled_ms"]),
        "vgg16_extract_fraction_of_matmul": _ratio(p["vgg16_extract_gflops"], p["matmul_gflops"]),
    }
    out = {}
    for name, value in values.items():
        op, bound = TARGETS[name]
        met = bool(value <= bound) if op == "<=" else bool(value >= bound)
        out[name] = {"value": float(value), "target": f"{op} {bound}", "met": met if np.isfinite(value) else False}
    return out


def _clean(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def run_all(opts: Options) -> dict:
    """Run everything, interleaving the two pipelines, and write ``results.json`` and ``results.md``."""
    from bench.report import write_markdown

    out = results_folder(opts.out, partial_run(opts))
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="covidxray-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load_before = load_average()
    tf.config.experimental.enable_op_determinism()  # ours runs with it (train's default): the same for both
    try:
        _log(f"data -> {work}")
        data = prepare_data(opts, work)
        _log(f"{data['source']}: {data['counts']}")
        _log("machine peaks (matmul, frozen VGG16 forward)")
        peaks = machine_peaks(opts)
        results: dict = {}
        order = {"scratch": ("original", "ours"), "vgg16": ("ours", "original")}  # ABBA
        for kind, sides in order.items():
            entry: dict = {}
            for side in sides:
                _log(f"{kind}: {side}")
                entry[side] = run_original(kind, opts, data, work) if side == "original" \
                    else run_ours(kind, opts, data, work)
            if kind == "scratch":
                _log("scratch: same steps on decoded tensors in memory")
                ref = input_pipeline_reference(opts, data)
                ref["ratio"] = _ratio(entry["ours"]["epoch_seconds_median"], ref["epoch_seconds_median"])
                entry["input_pipeline"] = ref
            _log(f"{kind}: inference")
            infer = inference(kind, entry["original"]["model_path"], entry["ours"]["model_path"], opts, data)
            for side in ("original", "ours"):
                entry[side].update(infer[side])
            entry["inference_images"] = infer["n_images"]
            if kind == "vgg16":
                _log("vgg16: cached vs uncached predictions")
                entry["cached_check"] = cached_check(entry["ours"]["model_path"], opts, data)
                if opts.extra_views and opts.extra_views != opts.feature_views:
                    _log(f"vgg16: ours with {opts.extra_views} cached views")
                    entry[f"ours_views{opts.extra_views}"] = run_ours(kind, opts, data, work, views=opts.extra_views)
            entry["ratios"] = ratios(entry["original"], entry["ours"])
            results[kind] = entry
        results["peaks"] = peaks
        results["targets"] = targets(results)
        results["meta"] = {
            "mode": "quick" if opts.quick else "full",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m bench" + (" --quick" if opts.quick else ""),
            "data": data["source"],
            "counts": data["counts"],
            "options": {k: v for k, v in asdict(opts).items() if k not in ("out", "data", "workdir", "notes")},
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "bench_seconds": time.perf_counter() - t_start,
            "representative": not opts.quick,
            "versions": versions(),
        }
    finally:
        if opts.workdir is None and not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    for kind in ("scratch", "vgg16"):
        for entry in results[kind].values():
            if isinstance(entry, dict):
                entry.pop("model_path", None)
                entry.pop("run_dir", None)
    results = _clean(results)
    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / "results.json")
    write_markdown(results, out / "results.md")
    _log(f"wrote {out / 'results.json'} and results.md in {time.perf_counter() - t_start:.0f} s")
    return results

