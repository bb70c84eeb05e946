"""``covidxray cam``: heatmaps of one trained model over a labeled image set, with the two sanity checks.

Loads the run, picks the images (default: the test split; with a limit, a sample stratified by outcome TP/TN/FP/FN
and source, so the summary grid's cells fill), predicts, computes the maps once, and writes the overlays, the
summary grid, ``<model>__checks.json`` and ``<model>__checks.md`` (the checks in words: which model and method,
the warning rule, a short table, the warning and what each region holds) into ``Class_Activation_Images/``. Every
figure title, checks.json and the summary name the model explained: its name, run folder, test accuracy and ROC-AUC
(from the run's model card, when it has been evaluated), and the method (CAM or Grad-CAM) with the reason.
Overlays and grid share one colour scale per model (raw maps / the 99th percentile of the set's map values,
clipped at 1; see :func:`covidxray.explain.maps.model_scale`); the checks use the maps normalised per image. A rerun
replaces all of that model's files (and only those). External images that cannot be used are skipped and listed in
``<model>__skipped.csv``; the files are written to a temporary folder and moved into place only when all of
them are done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidxray import paths
from covidxray.data.images import DEFAULT_MAX_PIXELS
from covidxray.data.labeled_sets import decodable, read_labeled
from covidxray.data.licences import attribution_filename, attribution_markdown, showable, showable_mask
from covidxray.data.manifest import input_provenance
from covidxray.evaluation.evaluate import write_skipped
from covidxray.explain.checks import write_checks
from covidxray.explain.maps import (
    METHOD_NAMES,
    OUTCOMES,
    heatmaps,
    method_reason,
    model_scale,
    normalise_maps,
    render_cams,
    resolve_method,
    safe_name,
    scale_label,
    scale_maps,
    select_examples,
)
from covidxray.explain.regions import REGION_EXPLANATIONS, REGION_NAMES, REGIONS
from covidxray.metrics import format_metric, format_share
from covidxray.outputs import data_provenance, provenance, staged_output, write_text


def pick_images(
    df: pd.DataFrame, limit: int | None, seed: int = 0, *, probs: object | None = None, threshold: float = 0.5
) -> pd.DataFrame:
    """At most ``limit`` rows chosen with a fixed seed (all rows when None), stratified so every kind shows.

    With ``probs`` (p(covid) per row) the strata are the outcomes TP, TN, FP, FN, taken in turn, and within an
    outcome the sources (column "source" when present), taken in turn; without, the classes (column "y").
    Rows are drawn at random (``seed``) within a stratum; a stratum that runs out leaves its turn to the others.
    """
    if limit is None or len(df) <= limit:
        return df.reset_index(drop=True)
    df = df.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    if probs is not None:
        groups = select_examples(df, probs, threshold, per_cell=len(df))
        outer = [groups[o] for o in OUTCOMES if groups[o]]
    else:
        outer = [list(g.index) for _, g in df.groupby("y", sort=True)]
    sources = df["source"].astype(str) if "source" in df.columns else pd.Series([""] * len(df))
    queues = []
    for rows in outer:
        by_source = [[i for i in rows if sources[i] == s] for s in sorted(set(sources[rows]))]
        queues.append(_interleave([list(rng.permutation(r)) for r in by_source]))
    chosen = _interleave(queues)[:limit]
    return df.loc[sorted(chosen)].reset_index(drop=True)


def _interleave(queues: list[list[int]]) -> list[int]:
    """One from each queue in turn until all are empty."""
    out, depth = [], max((len(q) for q in queues), default=0)
    for k in range(depth):
        out.extend(int(q[k]) for q in queues if k < len(q))
    return out


def render_model_cams(
    model_path: str | Path,
    data: str | Path = paths.DATASET_DIR,
    *,
    split: str | None = "test",
    out_dir: str | Path | None = None,
    method: str = "auto",
    layer: str | None = None,
    limit: int | None = None,
    name: str | None = None,
    seed: int = 0,
    precision: str = "float32",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Write overlays, grid and checks for one model; return the checks, the files and the files skipped.
    External images over ``max_pixels`` pixels are skipped.

    ``precision`` is the compute precision of the model (see covidxray.training.compute_dtype; default float32).
    ``out_dir``
    defaults to :func:`heatmap_out` (``Class_Activation_Images/``, or a folder under ``runs/`` for synthetic data).
    """
    from covidxray.runs.load import load_run, predict_dataframe, predict_proba
    from covidxray.training.pipeline import load_images

    model, meta = load_run(model_path, precision=precision)
    image_size = meta["image_size"]
    config = meta.get("config", {})
    name = name or config.get("model") or Path(model_path).stem
    method, layer = resolve_method(model, method, layer)
    explained = explained_model(name, meta, model, method, layer)
    labeled = read_labeled(data, split=split, max_pixels=max_pixels)
    threshold = float(meta.get("threshold", 0.5))
    prefix = f"{safe_name(name, 'model', 60)}__"
    out_dir = heatmap_out(data, out_dir)
    used = input_provenance(data)
    prov = provenance(fingerprint=used["fingerprint"], synthetic=used["synthetic"], source=used["source"],
                      model=data_provenance(meta["run_dir"], "run"))
    with staged_output(out_dir, "cam", sources=[data], prefix=prefix, data=prov) as tmp, \
            decodable(labeled) as usable:
        frame = usable.frame
        all_probs = predict_dataframe(model, frame, image_size)
        df = pick_images(frame, limit, seed, probs=all_probs, threshold=threshold)
        images = load_images(df["filepath"].tolist(), image_size)
        probs = predict_proba(model, images)
        raw = heatmaps(model, images, method=method, layer=layer, normalise=False)
        scale = model_scale(raw)
        shown = showable_mask(df)  # overlays only of images whose licence lets us show them; checks use all
        attribution = attribution_filename(safe_name(name, "model", 60))
        files = render_cams(model, images[shown], df[shown].reset_index(drop=True), tmp, model_name=name,
                            threshold=threshold, method=method, probs=probs[shown], layer=layer,
                            maps=scale_maps(raw, scale)[shown], label=scale_label(scale), synthetic=prov["synthetic"],
                            model_label=model_line(explained), grid_note=withheld_note(shown, attribution))
        write_text(attribution_markdown(df[shown], f"Images shown in the {name} heatmaps"), tmp / attribution)
        drawn = iter(Path(f).name for f in files["file"])
        overlay_names = [next(drawn) if keep else "" for keep in shown]  # "" = not drawn (licence)
        checks = write_checks(model, images, tmp, model_name=name, df=df, maps=normalise_maps(raw), method=method,
                              layer=layer, seed=seed, probs=probs, split_labels=frame["label"].tolist(),
                              split_probs=all_probs, explained=explained,
                              files=overlay_names)
        write_text(checks_markdown(checks), tmp / summary_filename(name))
        write_skipped(usable.skipped, tmp / skipped_filename(name))
    return {"model": name, "method": method, "layer": layer, "images": len(df), "threshold": threshold,
            "explained": explained,
            "mean_probability": float(np.mean(probs)) if len(probs) else float("nan"), "map_scale": scale,
            "files": len(files), "checks": checks, "skipped": [list(s) for s in usable.skipped],
            "precision": meta["precision"], "synthetic": prov["synthetic"]}


def explained_model(name: str, meta: dict[str, Any], model: Any, method: str, layer: str) -> dict[str, Any]:
    """Which model the heatmaps explain: ``name``, its run folder's name, architecture, its test accuracy and ROC-AUC
    with their intervals (from the run's model card, None when the run was never evaluated), and the concrete
    ``method`` and ``layer`` with the reason for the method (:func:`covidxray.explain.maps.method_reason`)."""
    test = ((meta.get("card") or {}).get("metrics") or {}).get("test") or None
    metrics = {}
    if test:
        metrics = {k: {"value": (test.get("metrics") or {}).get(k), "ci": (test.get("ci") or {}).get(k)}
                   for k in ("accuracy", "roc_auc")}
    return {"name": name, "run": Path(meta["run_dir"]).name, "architecture": (meta.get("config") or {}).get("model"),
            "test": {**metrics, "n": test.get("n"), "file": test.get("file")} if test else None,
            "method": method, "method_name": METHOD_NAMES.get(method, method), "layer": layer,
            "method_reason": method_reason(model, method, layer)}


def model_line(explained: dict[str, Any] | None) -> str:
    """One line naming the model a heatmap explains (figure titles, summaries): name, run folder, test accuracy and
    ROC-AUC ("not evaluated" without them), method: "scratch (run scratch) · test acc. 95.7 %, ROC-AUC 0.993 ·
    Grad-CAM"."""
    if not explained:
        return "model: not known"
    test = explained.get("test")
    if test:
        acc, auc = test.get("accuracy") or {}, test.get("roc_auc") or {}
        metrics = (f"test acc. {format_metric(acc.get('value'))}, "
                   f"ROC-AUC {format_metric(auc.get('value'), percent=False)}")
    else:
        metrics = "test metrics not known (run not evaluated)"
    return f"{explained['name']} (run {explained['run']}) · {metrics} · {explained['method_name']}"


def heatmap_out(data: str | Path, out: str | Path | None = None) -> Path:
    """Where heatmaps of ``data`` go when no folder is named: ``Class_Activation_Images/`` for real data, and
    :data:`covidxray.paths.SYNTHETIC_CAM_DIR` for the embedded synthetic set, so that synthetic heatmaps never land
    over the committed real-data ones; ``out`` when given."""
    if out is not None:
        return Path(out)
    return paths.SYNTHETIC_CAM_DIR if input_provenance(data)["synthetic"] else paths.CAM_DIR


def summary_filename(model_name: str) -> str:
    """File with a model's checks in words, e.g. ``scratch__checks.md``."""
    return f"{safe_name(model_name, 'model', 60)}__checks.md"


def skipped_filename(model_name: str) -> str:
    """File listing the images a model's heatmaps left out, e.g. ``scratch-gap__skipped.csv``."""
    return f"{safe_name(model_name, 'model', 60)}__skipped.csv"


def restore_aspect(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A square model-input heatmap resized (bilinear) back to the original image's (height, width)."""
    from PIL import Image

    h, w = size
    img = Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F")
    return np.asarray(img.resize((int(w), int(h)), Image.Resampling.BILINEAR), dtype=np.float32)


SIDE_BY_SIDE_LABEL = ("evidence for covid / the model's scale (99th pct. of its maps on these images, "
                      "in each title), clipped at 1")


def side_by_side(
    runs: dict[str, str | Path],
    data: str | Path = paths.DATASET_DIR,
    *,
    split: str | None = "test",
    n: int = 4,
    seed: int = 0,
    path: str | Path | None = None,
    max_side: int = 320,
):
    """One row per image (classes and sources in turn, seeded), one column per model: the same X-ray explained
    by each model, with its probability. Images are shown in their original aspect (at most ``max_side`` px),
    each model's square heatmap resized back to it; each model's maps share one scale (:func:`model_scale` over
    these images, named in the column titles) and one colour bar says so. Returns the matplotlib Figure (saved
    atomically when ``path`` is given)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from covidxray.data.images import open_grayscale
    from covidxray.evaluation.figures import save_figure
    from covidxray.outputs import claim_output
    from covidxray.runs.load import load_run, predict_proba
    from covidxray.training.pipeline import load_images

    with decodable(read_labeled(data, split=split)) as usable:
        df = pick_images(showable(usable.frame), n, seed)
        originals = [np.asarray(open_grayscale(p, max_side=max_side), dtype=np.float32) for p in df["filepath"]]
        fig = Figure(figsize=(3.2 * (len(runs) + 1) + 0.8, 3.4 * len(df)), dpi=90)
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(df), len(runs) + 1, squeeze=False)
        for row, gray in enumerate(originals):
            axes[row, 0].imshow(gray, cmap="gray")
            axes[row, 0].set_title(f"truth: {df['label'][row]}\n{gray.shape[1]}x{gray.shape[0]} (shown)", fontsize=9)
            axes[row, 0].set_axis_off()
        for col, (name, run) in enumerate(runs.items(), start=1):
            model, meta = load_run(run)
            images = load_images(df["filepath"].tolist(), meta["image_size"])
            probs = predict_proba(model, images)
            method, layer = resolve_method(model, "auto", None)
            raw = heatmaps(model, images, method=method, layer=layer, normalise=False)
            scale = model_scale(raw)
            maps = scale_maps(raw, scale)
            for row, gray in enumerate(originals):
                ax = axes[row, col]
                ax.imshow(gray, cmap="gray")
                ax.imshow(restore_aspect(maps[row], gray.shape), cmap="jet", alpha=0.45, vmin=0, vmax=1)
                ax.set_title(f"{name} ({method}, scale {scale:.3g})\np(covid) = {probs[row]:.2f}", fontsize=9)
                ax.set_axis_off()
    fig.tight_layout(rect=(0.0, 0.0, 0.93, 1.0))
    cax = fig.add_axes((0.945, 0.25, 0.015, 0.5))
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap="jet"), cax=cax)
    bar.set_label(SIDE_BY_SIDE_LABEL, fontsize=8)
    if path is not None:
        path = Path(path)
        with claim_output(path.parent, "cam", sources=[data]) as out:
            out.put(path.name, lambda tmp: save_figure(fig, tmp))
            out.write_text(attribution_filename(path.stem), attribution_markdown(df, f"Images shown in {path.name}"))
    return fig


def _interval(ci: Any) -> str:
    """A share interval "[0.01, 0.07]"; "n/a" without one."""
    return f"[{format_share(ci[0])}, {format_share(ci[1])}]" if ci else "n/a"


def _fired(stats: dict[str, Any]) -> str:
    if stats.get("excess_ci") is None:
        return "n/a"
    return "yes" if stats.get("fired") else "no"


def checks_table(results: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per model (the notebook shows it transposed), short text cells ("n/a" when missing): the model's
    run and test metrics, the method, the randomisation check, the border band, and for each off-anatomy region over
    all images its mean mass and area shares, the mean excess (mass minus area) with its 95 % bootstrap interval and
    whether the warning rule fired; the regions that fired in any group. The rule and what each region holds are in
    :func:`checks_markdown`."""
    rows = []
    for name, result in results.items():
        checks = result["checks"]
        rnd, att = checks["randomization"], checks["attention"]
        explained = checks.get("explained") or result.get("explained") or {}
        test = explained.get("test") or {}
        passed = rnd.get("passed")
        row: dict[str, Any] = {
            "model": name,
            "run": explained.get("run", "n/a"),
            "test accuracy": format_metric((test.get("accuracy") or {}).get("value")),
            "test ROC-AUC": format_metric((test.get("roc_auc") or {}).get("value"), percent=False),
            "method": METHOD_NAMES.get(checks["method"], checks["method"]),
            "randomisation spearman (mean)": format_share(rnd.get("spearman_mean")),
            "randomisation check": "n/a" if passed is None else ("passed" if passed else "not passed"),
            "border mass": format_share(att["overall"]["border_share"]),
            "border area": format_share(att["area_share"]["border"]),
        }
        off = checks.get("off_anatomy") or {}
        overall = off.get("overall") or {}
        for region in REGIONS:
            stats = overall.get(region) or {}
            label = REGION_NAMES[region]
            row[f"{label}: mass"] = format_share(stats.get("mass_share"))
            row[f"{label}: area"] = format_share(stats.get("area_share"))
            row[f"{label}: mass - area [95 %]"] = (f"{format_share(stats.get('excess'))} "
                                                   f"{_interval(stats.get('excess_ci'))}")
            row[f"{label}: fired"] = _fired(stats)
        row["warning for"] = ", ".join(REGION_NAMES[r] for r in _fired_regions(off)) or "none"
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def _fired_regions(off: dict[str, Any]) -> list[str]:
    """The regions that fired in any group, in report order."""
    groups = [off.get("overall") or {}]
    for key in ("per_class", "per_source"):
        groups += list((off.get(key) or {}).values())
    return [r for r in REGIONS if any(r in g.get("over", []) for g in groups)]


def region_lines() -> list[str]:
    """A Markdown list saying what each region a warning can name holds."""
    return [f"- **{REGION_NAMES[r]}**: {REGION_EXPLANATIONS[r]}." for r in REGIONS]


def withheld_note(shown: np.ndarray, attribution: str) -> str | None:
    """The summary grid's line for sampled images left out for their licence (None when every one is drawn)."""
    hidden = int(np.size(shown) - np.count_nonzero(shown))
    if not hidden:
        return None
    return (f"{hidden} of {np.size(shown)} sampled images not drawn: their licences do not allow it "
            f"(the checks use them; drawn images: {attribution})")


def checks_markdown(checks: dict[str, Any]) -> str:
    """One model's checks (a ``<model>__checks.json``) in words: the model and method with the reason, the
    randomisation verdict, the warning rule, a table per group and region (mass, area, mass minus area with its
    95 % bootstrap interval, fired), the warning naming only the regions that fired, and below it what every region
    holds."""
    explained = checks.get("explained")
    off = checks.get("off_anatomy") or {}
    lines = [f"## {checks['model']}", "", f"- Model: {model_line(explained)}."]
    if explained:
        lines.append(f"- Method: {explained['method_reason']}.")
    lines.append(f"- Randomisation check: {(checks.get('randomization') or {}).get('interpretation', 'n/a')}")
    lines += [f"- Warning rule: {off.get('rule', 'n/a')}.", "",
              "| group | region | mass | area | mass - area [95 % interval] | fired |", "|---|---|---|---|---|---|"]
    groups = [("all images", off.get("overall"))]
    for key, column in (("per_class", "class"), ("per_source", "source")):
        groups += [(f"{column} {value}", stats) for value, stats in (off.get(key) or {}).items()]
    for group, stats in groups:
        for region in REGIONS if stats else ():
            s = stats.get(region) or {}
            lines.append(f"| {group} | {REGION_NAMES[region]} | {format_share(s.get('mass_share'))} | "
                         f"{format_share(s.get('area_share'))} | {format_share(s.get('excess'))} "
                         f"{_interval(s.get('excess_ci'))} | {_fired(s)} |")
    warning = checks.get("warning")
    lines += ["", f"**Warning**: {warning}." if warning else "**Warning**: none fired.", "",
              "The regions a warning can name (mass: the mean share of the heatmap's mass in the region; area: the "
              "region's mean share of the image; per image under its file name in checks.json):", "",
              *region_lines(), ""]
    return "\n".join(lines)


def checks_summary(results: dict[str, dict[str, Any]]) -> str:
    """:func:`checks_markdown` of every model in ``results`` (as :func:`render_model_cams` returns them)."""
    return "\n".join(checks_markdown(result["checks"]) for result in results.values())
