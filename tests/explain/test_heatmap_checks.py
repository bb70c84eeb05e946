"""Heatmap checks with real trained models: a planted padding shortcut fires the off-anatomy warning, an
untrained model cannot pass the randomisation check, overlays share one scale per model, the sample fills the
summary grid, and a rerun replaces one model's files."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from covidxray.data.synthetic import chest_image
from covidxray.explain.checks import OFF_ANATOMY_WARNING, off_anatomy, randomization_check, separation
from covidxray.explain.maps import heatmaps, model_scale, normalise_maps, scale_label, scale_maps
from covidxray.explain.render import pick_images, render_model_cams, restore_aspect, side_by_side
from covidxray.training.models import build_model, compile_model

SIZE = 48


def planted_padding(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Chest-like images without disease; every covid one (odd index) is letterboxed into black padding."""
    xs, ys = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        covid = i % 2
        if covid:
            img = np.zeros((SIZE, SIZE), np.uint8)
            img[10:38] = chest_image(rng, covid=False, size=(28, SIZE))
        else:
            img = chest_image(rng, covid=False, size=(SIZE, SIZE))
        xs.append(img)
        ys.append(covid)
    return np.repeat(np.stack(xs)[..., None].astype("float32"), 3, axis=-1), np.array(ys)


@pytest.fixture(scope="module")
def shortcut_model() -> tuple[keras.Model, np.ndarray, pd.DataFrame]:
    """A scratch-gap CNN that can only tell the classes apart by the padding."""
    keras.utils.set_random_seed(0)
    x, y = planted_padding(96, 0)
    model = compile_model(build_model("scratch-gap", image_size=SIZE, weights="none", dropout=0.0), 1e-3)
    history = model.fit(x, y, epochs=6, batch_size=16, verbose=0)
    assert history.history["accuracy"][-1] > 0.9
    xt, yt = planted_padding(24, 1)
    return model, xt, pd.DataFrame({"label": np.where(yt == 1, "covid", "normal"), "source": "synthetic"})


def test_a_model_reading_the_padding_fires_the_warning(shortcut_model) -> None:
    model, x, df = shortcut_model
    result = off_anatomy(x, heatmaps(model, x), df)
    assert result["warning"].startswith(OFF_ANATOMY_WARNING) and "padding and flat regions (" in result["warning"]
    covid = result["per_class"]["covid"]["padding"]
    assert covid["fired"] and covid["excess_ci"][0] >= 0.10 and covid["mass_share"] > 1.5 * covid["area_share"]
    assert len(result["per_image"]["padding"]) == len(x)


def test_an_untrained_model_cannot_pass_the_randomisation_check(shortcut_model) -> None:
    model, x, df = shortcut_model
    untrained = build_model("scratch-gap", image_size=SIZE, weights="none", seed=3)
    result = randomization_check(untrained, x, labels=df["label"])
    assert result["passed"] is False
    assert result["interpretation"].startswith("not applicable / failed: the model's predictions do not separate")
    assert not result["separation"]["separates"]
    trained = randomization_check(model, x, labels=df["label"])
    assert trained["separation"]["separates"] and trained["separation"]["roc_auc"] > 0.9
    flat = separation(["covid", "normal"] * 5, [0.56] * 10)
    assert not flat["separates"] and "spans only 0.000" in flat["reason"] and flat["roc_auc"] == 0.5
    one_class = separation(["covid"] * 4, [0.1, 0.9, 0.2, 0.8])
    assert one_class["roc_auc"] is None and one_class["separates"]
    with pytest.raises(ValueError, match="neither"):
        separation(["pneumonia"], [0.5])


def test_overlays_share_one_scale_per_model(shortcut_model) -> None:
    model, x, _ = shortcut_model
    raw = heatmaps(model, x, normalise=False)
    scale = model_scale(raw)
    shown = scale_maps(raw, scale)
    assert shown.min() >= 0.0 and shown.max() <= 1.0 and scale == pytest.approx(np.percentile(raw, 99))
    np.testing.assert_allclose(normalise_maps(raw), heatmaps(model, x), atol=1e-5)
    weak = int(np.argmin(raw.max(axis=(1, 2))))
    assert shown[weak].max() < normalise_maps(raw)[weak].max() or raw[weak].max() == 0.0
    assert model_scale(np.zeros((2, 4, 4))) == 1.0 and "99th pct." in scale_label(scale)
    with pytest.raises(ValueError, match="positive"):
        scale_maps(raw, 0.0)
    assert restore_aspect(np.ones((SIZE, SIZE)), (30, 70)).shape == (30, 70)


def test_pick_images_fills_every_outcome_and_source() -> None:
    n = 40
    df = pd.DataFrame({"y": [i % 2 for i in range(n)], "label": ["covid" if i % 2 else "normal" for i in range(n)],
                       "source": ["a" if i % 4 < 2 else "b" for i in range(n)], "path": [f"i{i}" for i in range(n)]})
    probs = np.where(df["y"] == 1, 0.9, 0.1)
    probs[[1, 3]] = 0.2  # two false negatives
    probs[[0, 2, 4]] = 0.8  # three false positives
    picked = pick_images(df, 8, probs=probs, threshold=0.5)
    outcome = [("T" if (p >= 0.5) == bool(y) else "F") + ("P" if p >= 0.5 else "N")
               for p, y in zip(probs[[int(s[1:]) for s in picked["path"]]], picked["y"], strict=True)]
    assert len(picked) == 8 and {o: outcome.count(o) for o in set(outcome)} == {"TP": 2, "TN": 2, "FP": 2, "FN": 2}
    assert set(picked["source"]) == {"a", "b"}
    assert pick_images(df, 8, probs=probs, threshold=0.5).equals(picked)
    balanced = pick_images(df, 6)
    assert sorted(balanced["y"]) == [0, 0, 0, 1, 1, 1]
    assert len(pick_images(df, None)) == n


@pytest.mark.slow  # full suite only: keeps the quick gate under 3 minutes
def test_a_rerun_leaves_no_old_file_of_that_model(tiny_run, tiny_dataset, tmp_path) -> None:
    out = tmp_path / "cams"
    render_model_cams(tiny_run, tiny_dataset, out_dir=out, limit=6, name="other")
    first = render_model_cams(tiny_run, tiny_dataset, out_dir=out, limit=6, name="m")
    model = keras.models.load_model(Path(tiny_run) / "model.keras")
    kernel, bias = model.get_layer("logit").get_weights()
    model.get_layer("logit").set_weights([kernel, bias + 4.0])
    shifted = tmp_path / "shifted.keras"
    model.save(shifted)
    second = render_model_cams(shifted, tiny_dataset, out_dir=out, limit=6, name="m")
    assert first["mean_probability"] != pytest.approx(second["mean_probability"])
    overlays = {p.name for p in out.glob("m__*__p*.png")}
    assert len(overlays) == second["files"] == 6, "the first run's overlays are gone"
    assert {p.name for p in out.glob("m__*")} == overlays | {"m__summary.png", "m__checks.json", "m__checks.md",
                                                             "m__skipped.csv", "m__ATTRIBUTION.md"}
    assert len(list(out.glob("other__*__p*.png"))) == 6 and (out / "other__checks.json").is_file()
    side_by_side({"m": tiny_run}, tiny_dataset, n=2, path=out / "side_by_side.png")
    side_by_side({"m": shifted}, tiny_dataset, n=2, path=out / "side_by_side.png")
    assert {p.name for p in out.glob("side_by_side*")} == {"side_by_side.png", "side_by_side__ATTRIBUTION.md"}
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.is_dir()]
    assert "off_anatomy" in second["checks"] and second["map_scale"] > 0



def test_the_summary_grid_says_how_many_sampled_images_its_licences_kept_out() -> None:
    import numpy as np

    from covidxray.explain.render import withheld_note

    assert withheld_note(np.array([True, True]), "m__ATTRIBUTION.md") is None
    note = withheld_note(np.array([True, False, False]), "m__ATTRIBUTION.md")
    assert note is not None and note.startswith("2 of 3 sampled images not drawn") and "m__ATTRIBUTION.md" in note
