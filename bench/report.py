"""``results.md``: the bench results as Markdown tables (the README quotes the full mode's)."""

from __future__ import annotations

from pathlib import Path

FIGURES = (
    ("epoch_seconds_median", "train epoch, s (median of epochs 2..N, incl. validation)", ".2f"),
    ("total_train_seconds", "total training, s", ".1f"),
    ("train_images_per_s", "training images/s (epochs x train images / total)", ".1f"),
    ("infer_images_per_s_b32", "inference images/s, batch 32", ".1f"),
    ("latency_b1_ms", "batch-1 latency, ms (original: model.predict; ours: predict_proba)", ".1f"),
    ("latency_b1_compiled_ms", "batch-1 latency of a bare compiled call, ms", ".1f"),
    ("peak_rss_mb", "peak resident memory during training, MiB", ".0f"),
)
METRICS = (("accuracy", "test accuracy"), ("f1", "test F1"), ("roc_auc", "test ROC-AUC"))


def _fmt(value: object, spec: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    return format(float(value), spec) if isinstance(value, int | float) else str(value)


def _model_table(name: str, entry: dict) -> list[str]:
    lines = [f"### {name}", "", "| | original-style | ours | ours / original |", "|---|---:|---:|---:|"]
    orig, ours, ratio = entry["original"], entry["ours"], entry["ratios"]
    for key, label, spec in FIGURES:
        lines.append(f"| {label} | {_fmt(orig.get(key), spec)} | {_fmt(ours.get(key), spec)} | "
                     f"{_fmt(ratio.get(key), '.2f')} |")
    for key, label in METRICS:
        lines.append(f"| {label} | {_fmt(orig['test'][key], '.3f')} | {_fmt(ours['test'][key], '.3f')} | "
                     f"{_fmt(ratio[f'test_{key}_diff'], '+.3f')} (difference) |")
    lines.append(f"| decision threshold | {orig['test']['threshold']:.3f} (fixed) | "
                 f"{ours['test']['threshold']:.3f} (Youden on val) | |")
    lines.append("")
    return lines


def markdown(results: dict) -> str:
    """The whole report."""
    meta, peaks, targets = results["meta"], results["peaks"], results["targets"]
    opts = meta["options"]
    lines = [
        f"# Benchmark ({meta['mode']} mode)",
        "",
        f"`{meta['command']}` on {meta['date']}: {meta['cpu_count']} CPU cores ({meta['machine']}), "
        f"TensorFlow {meta['versions']['tensorflow']}, Keras {meta['versions']['keras']}; load average before / "
        f"after {meta['load_average_before']} / {meta['load_average_after']}; {meta['bench_seconds']:.0f} s in all.",
        f"Data: {meta['data']}, {meta['counts']} images; {opts['image_size']} px, batch {opts['batch_size']}, "
        f"{opts['epochs']} epochs for every model (no early stopping), backbone weights `{opts['weights']}`, "
        f"ours caching {opts['feature_views']} view(s) per training image.",
        "Both pipelines ran in this one process, interleaved (scratch: original then ours; VGG16: ours then "
        "original); compare ratios, not absolute numbers across machines.",
        "",
    ]
    if not meta["representative"]:
        lines += ["**Quick mode**: small images and two epochs, to check that the bench runs; its numbers are not "
                  "the figures the targets are about.", ""]
    lines += ["## Targets", "", "| target | value | bound | met |", "|---|---:|---:|---|"]
    for name, t in targets.items():
        lines.append(f"| {name} | {_fmt(t['value'], '.3f')} | {t['target']} | {_fmt(t['met'], '')} |")
    lines += ["", "## Side by side", ""]
    lines += _model_table("Scratch CNN", results["scratch"])
    ip = results["scratch"]["input_pipeline"]
    lines += [f"Input pipeline: ours {results['scratch']['ours']['epoch_seconds_median']:.2f} s per epoch vs "
              f"{ip['epoch_seconds_median']:.2f} s for the same steps on decoded, augmented tensors held in memory "
              f"(ratio {_fmt(ip['ratio'], '.3f')}).", ""]
    vgg = results["vgg16"]
    lines += _model_table("VGG16 transfer (frozen up to block5_conv2)", vgg)
    cached = vgg["ours"].get("cached_features")
    if cached:
        lines += [f"Ours computed the frozen part once ({cached['views']} view(s) per training image): "
                  f"{cached['seconds']:.1f} s at {cached['gflops']:.0f} GFLOP/s in the pipeline, a "
                  f"{cached['cache_mb']:.0f} MiB float16 cache.", ""]
    check = vgg["cached_check"]
    lines += [f"Cached vs uncached predictions on {check['n_images']} test images: max |difference| "
              f"{check['max_abs_diff_float16_cache']:.2e} with the float16 cache, "
              f"{check['max_abs_diff_float32']:.2e} in float32 (tolerance {check['tolerance']:g}).", ""]
    for key, extra in vgg.items():
        if key.startswith("ours_views"):
            lines += [f"Ours with {key.removeprefix('ours_views')} cached views: {extra['total_train_seconds']:.1f} s "
                      f"in all, test ROC-AUC {_fmt(extra['test']['roc_auc'], '.3f')}, F1 "
                      f"{_fmt(extra['test']['f1'], '.3f')}.", ""]
    lines += ["## Machine", "",
              f"float32 matmul peak {peaks['matmul_gflops']:.0f} GFLOP/s ({peaks['matmul_n']}^2); frozen VGG16 part "
              f"at 224 px, batch {peaks['extract_batch']}: {peaks['vgg16_extract_images_per_s']:.1f} images/s = "
              f"{peaks['vgg16_extract_gflops']:.0f} GFLOP/s "
              f"({peaks['vgg16_extract_gflops'] / peaks['matmul_gflops']:.0%} of the matmul peak).", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(results: dict, path: Path) -> None:
    """Write ``markdown(results)`` to ``path``."""
    Path(path).write_text(markdown(results), encoding="utf8")
