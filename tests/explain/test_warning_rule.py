"""The off-anatomy warning rule: a margin over an even spread and a bootstrap interval, so a uniform map never fires
and a map concentrated in a region does; the warning names only the regions that fired and says what each holds;
checks.json keys each image's shares by its file name; every output names the model and the method."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_image_regions import padded_chest

from covidxray.explain.checks import (
    MARGIN,
    N_BOOT,
    OFF_ANATOMY_WARNING,
    excess_interval,
    off_anatomy,
    off_anatomy_warning,
)
from covidxray.explain.maps import method_reason, resolve_method
from covidxray.explain.regions import REGION_EXPLANATIONS, REGION_NAMES, REGIONS
from covidxray.explain.render import (
    checks_markdown,
    checks_table,
    explained_model,
    model_line,
    render_model_cams,
    summary_filename,
)
from covidxray.training.models import build_model


def chests(n: int = 6, **kwargs) -> tuple[np.ndarray, list[dict[str, np.ndarray]], pd.DataFrame]:
    images, truths = zip(*(padded_chest(seed=s, **kwargs) for s in range(n)), strict=True)
    x = np.repeat(np.stack(images)[..., None], 3, axis=-1)
    df = pd.DataFrame({"label": ["covid", "normal"] * (n // 2), "path": [f"set/chest-{i}.png" for i in range(n)]})
    return x, list(truths), df


def test_a_uniform_map_never_fires() -> None:
    x, _, df = chests()
    result = off_anatomy(x, np.ones((len(x), 64, 64)), df)
    assert result["warning"] is None
    for region in REGIONS:
        stats = result["overall"][region]
        assert stats["mass_share"] == pytest.approx(stats["area_share"]) and not stats["fired"]
        assert stats["excess_ci"] == pytest.approx([0.0, 0.0], abs=1e-9)
    # whatever the area, equal shares on every image give no excess to fire on
    area = np.random.default_rng(0).uniform(0.05, 0.95, 50)
    assert not excess_interval(area, area)["fired"]


def test_a_map_concentrated_in_a_region_fires_and_the_warning_names_only_it() -> None:
    x, truths, df = chests()
    below = np.stack([(t["body"] & ~t["lungs"]) * 1.0 for t in truths])
    below[:, :40] = 0.0  # on the body under the lungs: outside the lung fields, inside the body
    result = off_anatomy(x, below, df)
    assert result["overall"]["over"] == ["outside_lungs"] and result["overall"]["outside_lungs"]["fired"]
    warning = result["warning"]
    assert warning.startswith(OFF_ANATOMY_WARNING)
    assert f"{REGION_NAMES['outside_lungs']} ({REGION_EXPLANATIONS['outside_lungs']})" in warning
    for region in ("padding", "markers", "outside_body"):
        assert REGION_NAMES[region] not in warning.replace(REGION_EXPLANATIONS["outside_lungs"], "")
    assert "all images" in warning and "label=covid" in warning and f"{MARGIN:.2f}" in warning


@pytest.mark.parametrize("region", REGIONS)
def test_every_region_that_can_fire_is_explained_in_the_warning(region: str) -> None:
    x, truths, df = chests()
    masks = {"padding": [t["padding"] for t in truths], "markers": [t["markers"] for t in truths],
             "outside_body": [~t["body"] & ~t["padding"] for t in truths],
             "outside_lungs": [t["body"] & ~t["lungs"] for t in truths]}
    result = off_anatomy(x, np.stack(masks[region]).astype(float), df)
    assert result["overall"][region]["fired"]
    assert f"{REGION_NAMES[region]} ({REGION_EXPLANATIONS[region]})" in result["warning"]
    assert result["regions"][region] == {"name": REGION_NAMES[region], "explanation": REGION_EXPLANATIONS[region]}
    assert off_anatomy_warning({region: ["all images"]}).count("(") >= 1


def test_the_bootstrap_interval_is_reported_and_decides() -> None:
    rng = np.random.default_rng(3)
    area = rng.uniform(0.1, 0.3, 40)
    clear = excess_interval(area + 0.3, area)
    lo, hi = clear["excess_ci"]
    assert lo <= clear["excess"] <= hi and clear["fired"] and clear["excess"] == pytest.approx(0.3)
    assert clear["mass_ci"][0] <= clear["mass_share"] <= clear["mass_ci"][1]
    assert excess_interval(area + 0.3, area) == clear  # fixed seed
    # a mean excess above the margin carried by a few images: the interval's lower end stays under it
    spiky = area.copy()
    spiky[:7] += 0.65
    noisy = excess_interval(spiky, area)
    assert noisy["excess"] > MARGIN and noisy["excess_ci"][0] < MARGIN and not noisy["fired"]
    assert excess_interval([0.9], [0.1])["excess_ci"] is None and not excess_interval([0.9], [0.1])["fired"]
    x, _, df = chests(4)
    result = off_anatomy(x, np.ones((4, 64, 64)), df)
    assert result["rule_parameters"]["n_boot"] == N_BOOT == 1000 and result["rule_parameters"]["margin"] == MARGIN
    assert "bootstrap" in result["rule"] and f"{MARGIN:.2f}" in result["rule"]
    assert len(result["overall"]["padding"]["excess_ci"]) == 2


def test_the_method_reason_names_cam_and_grad_cam() -> None:
    gap = build_model("scratch-gap", image_size=32, weights="none")
    table_model = build_model("scratch", image_size=32, weights="none")
    method, layer = resolve_method(table_model, "auto")
    assert method == "gradcam"
    assert "not global average pooling" in method_reason(table_model, method, layer)
    assert method_reason(gap, *resolve_method(gap, "auto")).startswith("CAM is exact")
    assert "Grad-CAM, asked for" in method_reason(gap, *resolve_method(gap, "gradcam"))
    meta = {"run_dir": "somewhere/runs/scratch", "config": {"model": "scratch"},
            "card": {"metrics": {"test": {"metrics": {"accuracy": 0.957, "roc_auc": 0.993},
                                          "ci": {"accuracy": [0.898, 1.0], "roc_auc": [0.976, 1.0]},
                                          "n": 47, "file": "eval-test/metrics.json"}}}}
    explained = explained_model("scratch", meta, table_model, method, layer)
    assert model_line(explained) == "scratch (run scratch) · test acc. 95.7 %, ROC-AUC 0.993 · Grad-CAM"
    unknown = explained_model("scratch", {**meta, "card": None}, table_model, method, layer)
    assert "test metrics not known" in model_line(unknown) and unknown["test"] is None
    nan = {**meta, "card": {"metrics": {"test": {"metrics": {"accuracy": float("nan")}, "ci": {}}}}}
    assert "test acc. n/a, ROC-AUC n/a" in model_line(explained_model("scratch", nan, table_model, method, layer))


def test_the_heatmap_outputs_name_the_model_method_and_images(tiny_run, tiny_dataset, tmp_path) -> None:
    out = tmp_path / "cams"
    result = render_model_cams(tiny_run, tiny_dataset, out_dir=out, limit=6, name="tiny", method="gradcam")
    stored = json.loads((out / "tiny__checks.json").read_text(encoding="utf-8"))
    explained = stored["explained"]
    assert explained["run"] == tiny_run.name and explained["method"] == "gradcam"
    assert explained["method_name"] == "Grad-CAM" and "Grad-CAM" in explained["method_reason"]
    overlays = {p.name for p in out.glob("tiny__*__p*.png")}
    for region in REGIONS:
        entries = stored["off_anatomy"]["per_image"][region]
        assert {e["file"] for e in entries} == overlays
        assert all(e["file"].split("__")[1] == e["image"] and set(e) == {"image", "file", "mass", "area"}
                   for e in entries)
    text = (out / summary_filename("tiny")).read_text(encoding="utf-8")
    assert model_line(explained) in text and explained["method_reason"] in text
    assert stored["off_anatomy"]["rule"] in text and "| group | region | mass | area |" in text
    assert all(f"**{REGION_NAMES[r]}**: {REGION_EXPLANATIONS[r]}" in text for r in REGIONS)
    assert text == checks_markdown(stored)
    table = checks_table({"tiny": result})
    assert table.loc["tiny", "method"] == "Grad-CAM" and table.loc["tiny", "run"] == tiny_run.name
    assert all(len(str(v)) <= 40 for v in table.loc["tiny"]), "table cells stay short"
    assert "nan" not in " ".join(map(str, table.loc["tiny"])).lower().replace("n/a", "")


def test_the_notebook_and_the_heatmap_folder_explain_every_region_and_state_the_rule() -> None:
    """Where the warning is shown to a reader (the notebook's Markdown around the table, the heatmap folder's README),
    every region it can name is explained in the package's own words, and the rule's numbers are the package's."""
    import re

    import nbformat
    from conftest import REPO

    notebook = nbformat.read(REPO / "Class_Activation_Maps.ipynb", as_version=4)
    texts = {"notebook": " ".join(c.source for c in notebook.cells if c.cell_type == "markdown"),
             "README": (REPO / "Class_Activation_Images" / "README.md").read_text(encoding="utf-8")}
    for where, text in texts.items():
        flat = re.sub(r"\s+", " ", text)
        for region in REGIONS:
            assert f"**{REGION_NAMES[region]}**: {REGION_EXPLANATIONS[region]}." in flat, (where, region)
        assert f"at least {MARGIN:.2f}" in flat and f"{N_BOOT} resamples" in flat, where
    parameters = next(c.source for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    assert '"scratch": "runs/scratch"' in parameters and '"vgg16": "runs/vgg16"' in parameters
    assert 'METHOD = "gradcam"' in parameters
