"""Heatmaps (CAM, Grad-CAM, Grad-CAM++), overlays and their sanity checks, on tiny hand-built Keras models."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from covidxray.errors import DataError, ModelError
from covidxray.explain.checks import (
    SHORTCUT_WARNING,
    attention_distribution,
    checks_filename,
    randomization_check,
    randomized_copy,
    region_masks,
    write_checks,
)
from covidxray.explain.maps import (
    cam_filename,
    class_activation_maps,
    find_target_layer,
    gap_feature_layer,
    grad_cam,
    heatmaps,
    normalise_maps,
    overlay_figure,
    render_cams,
    resolve_method,
    select_examples,
    summary_grid,
)

SIZE = 16


def _head(features: object, inp: object, *, dropout: bool = True, name: str = "m") -> keras.Model:
    """Flat model ending in GAP -> (Dropout) -> logit -> prob, the project's GAP convention."""
    x = keras.layers.GlobalAveragePooling2D(name="gap")(features)
    if dropout:
        x = keras.layers.Dropout(0.3)(x)
    z = keras.layers.Dense(1, name="logit")(x)
    return keras.Model(inp, keras.layers.Activation("sigmoid", name="prob")(z), name=name)


def gap_model(size: int = SIZE, seed: int = 0) -> keras.Model:
    """Two convs, the second (stride 2) named last_conv, then the GAP head."""
    init = keras.initializers.GlorotUniform(seed=seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", kernel_initializer=init, name="c1")(x)
    x = keras.layers.Conv2D(
        5, 3, strides=2, padding="same", activation="relu", kernel_initializer=init, name="last_conv"
    )(x)
    return _head(x, inp, name="gap_model")


def flatten_model(size: int = SIZE) -> keras.Model:
    """A conv then Flatten -> Dense: no GAP head, so CAM does not apply."""
    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.Flatten()(x)
    z = keras.layers.Dense(1, name="logit")(x)
    return keras.Model(inp, keras.layers.Activation("sigmoid", name="prob")(z), name="flat")


class FixedMask(keras.layers.Layer):
    """Multiplies the input by a constant 0/1 mask: the model sees only the top-left quadrant."""

    def __init__(self, size: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.size = size

    def call(self, x: object) -> object:
        mask = np.zeros((1, self.size, self.size, 1), np.float32)
        mask[:, : self.size // 2, : self.size // 2] = 1.0
        return x * mask


class CallCounter(keras.layers.Layer):
    """Identity that counts forward calls (eager), to check one forward pass per batch."""

    calls = 0

    def call(self, x: object) -> object:
        CallCounter.calls += 1
        return x


def images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, size=(n, size, size, 3)).astype("float32")


# ------------------------------------------------------------ target layers


def test_find_target_layer() -> None:
    model = gap_model()
    assert find_target_layer(model) == "last_conv"
    assert find_target_layer(model, "c1") == "c1"
    with pytest.raises(ModelError, match="no layer 'nope'"):
        find_target_layer(model, "nope")
    with pytest.raises(ModelError, match="4-D"):
        find_target_layer(model, "logit")
    inp = keras.Input((4,))
    dense = keras.Model(inp, keras.layers.Dense(1, name="logit")(inp))
    with pytest.raises(ModelError, match=r"no top-level Conv2D .*it has no conv layer to explain.*name a layer "
                                         r"with a 4-D output as layer=NAME \(`covidxray cam --layer NAME`\)"):
        find_target_layer(dense)


def test_gap_head_detection_and_auto_method() -> None:
    assert gap_feature_layer(gap_model()) == "last_conv"
    assert gap_feature_layer(flatten_model()) is None
    assert resolve_method(gap_model()) == ("cam", "last_conv")
    assert resolve_method(gap_model(), layer="c1") == ("gradcam", "c1")
    assert resolve_method(flatten_model()) == ("gradcam", "last_conv")
    assert resolve_method(gap_model(), "gradcam++") == ("gradcam++", "last_conv")
    with pytest.raises(ModelError, match="CAM needs"):
        class_activation_maps(flatten_model(), images(1))
    with pytest.raises(ModelError, match="exact only"):
        class_activation_maps(gap_model(), images(1), layer="c1")
    with pytest.raises(ValueError, match="unknown heatmap method"):
        heatmaps(gap_model(), images(1), method="lime")


# ------------------------------------------------------------ CAM


def test_cam_equals_closed_form() -> None:
    model = gap_model()
    w = np.array([[1.0], [-2.0], [0.5], [0.0], [3.0]], np.float32)
    b = np.array([0.3], np.float32)
    model.get_layer("logit").set_weights([w, b])
    x = images(3)
    acts = keras.Model(model.inputs[0], model.get_layer("last_conv").output)(x).numpy()
    assert acts.shape == (3, SIZE // 2, SIZE // 2, 5)
    raw = np.einsum("bhwk,k->bhw", acts, w[:, 0]) + b[0]
    logits = keras.Model(model.inputs[0], model.get_layer("logit").output)(x).numpy()[:, 0]
    np.testing.assert_allclose(raw.mean(axis=(1, 2)), logits, rtol=1e-4, atol=1e-5)
    up = tf.image.resize(raw[..., None], (SIZE, SIZE), method="bilinear").numpy()[..., 0]
    pos = np.maximum(up, 0.0)
    peak = pos.max(axis=(1, 2), keepdims=True)
    expected = np.where(peak > 0, pos / np.where(peak > 0, peak, 1.0), 0.0)
    np.testing.assert_allclose(class_activation_maps(model, x), expected, atol=1e-5)
    np.testing.assert_allclose(heatmaps(model, x, "auto"), expected, atol=1e-5)


def test_normalise_maps_keeps_zero_maps_zero() -> None:
    maps = np.stack([np.zeros((4, 4)), -np.ones((4, 4)), np.arange(16.0).reshape(4, 4)])
    out = normalise_maps(maps)
    assert np.all(out[:2] == 0.0) and out[2].max() == 1.0 and np.isfinite(out).all()


# ------------------------------------------------------------ Grad-CAM


def masked_model() -> keras.Model:
    """Depends only on the top-left quadrant of the image: the mask is applied before the convolutions."""
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = FixedMask(SIZE, name="mask")(x)
    ones = keras.initializers.Constant(0.1)
    x = keras.layers.Conv2D(
        4, 3, padding="same", activation="relu", kernel_initializer=ones, name="last_conv"
    )(x)
    x = keras.layers.Flatten()(x)
    z = keras.layers.Dense(1, kernel_initializer="ones", name="logit")(x)
    return keras.Model(inp, keras.layers.Activation("sigmoid", name="prob")(z), name="masked")


@pytest.mark.parametrize("plus", [False, True])
def test_grad_cam_puts_mass_where_the_answer_depends(plus: bool) -> None:
    maps = grad_cam(masked_model(), images(4), plus=plus)
    half = SIZE // 2
    share = maps[:, :half, :half].sum(axis=(1, 2)) / maps.sum(axis=(1, 2))
    assert np.all(share > 0.8), share


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++", "auto"])
def test_heatmaps_shape_range_finite(method: str) -> None:
    x = images(5, size=20)
    maps = heatmaps(gap_model(size=20), x, method)
    assert maps.shape == (5, 20, 20)
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++"])
def test_all_zero_evidence_gives_zero_maps_without_nan(method: str) -> None:
    model = gap_model()
    model.get_layer("logit").set_weights([np.zeros((5, 1), np.float32), np.array([-1.0], np.float32)])
    maps = heatmaps(model, images(2), method)
    assert np.all(maps == 0.0)


def test_grad_cam_plus_agrees_in_shape_and_falls_back_without_logit() -> None:
    model = flatten_model()
    x = images(3)
    assert grad_cam(model, x).shape == grad_cam(model, x, plus=True).shape == (3, SIZE, SIZE)
    inp = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="conv")(inp)
    h = keras.layers.GlobalAveragePooling2D()(h)
    no_logit = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid", name="out")(h))
    assert resolve_method(no_logit) == ("gradcam", "conv")
    maps = heatmaps(no_logit, x)
    assert maps.shape == (3, SIZE, SIZE) and np.isfinite(maps).all()


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++"])
def test_one_forward_pass_per_batch(method: str) -> None:
    inp = keras.Input((SIZE, SIZE, 3))
    x = CallCounter(name="counter")(inp)
    x = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="last_conv")(x)
    model = _head(x, inp, dropout=False)
    CallCounter.calls = 0
    maps = heatmaps(model, images(5), method, batch_size=2)
    assert maps.shape == (5, SIZE, SIZE)
    assert CallCounter.calls == 3


# ------------------------------------------------------------ rendering


def test_cam_filename() -> None:
    name = cam_filename("scratch-gap", "test/normal/IM-0115-0001.jpeg", "normal", "covid", 0.8712)
    assert name == "scratch-gap__IM-0115-0001__true-normal__pred-covid__p0.87.png"
    odd = cam_filename("vgg16 / fine tune", "C:\\data\\a b__c?.PNG", "covid", "covid", 1.0)
    assert odd == "vgg16-fine-tune__a-b_c__true-covid__pred-covid__p1.00.png"
    assert (
        cam_filename("m", "1-s2.0-S09.x", "covid", "normal", 0)
        == "m__1-s2.0-S09.x__true-covid__pred-normal__p0.00.png"
    )
    long = cam_filename("m", "x" * 300 + ".png", "covid", "normal", 0.5)
    assert len(long) < 150 and long == cam_filename("m", "x" * 300 + ".png", "covid", "normal", 0.5)
    assert cam_filename("", "...", "covid", "normal", 0.5).startswith("model__image__")
    with pytest.raises(ValueError):
        cam_filename("m", "a.png", "covid", "normal", float("nan"))


def frame(labels: list[str], names: list[str] | None = None) -> pd.DataFrame:
    names = names or [f"split/{lab}/img{i}.png" for i, lab in enumerate(labels)]
    return pd.DataFrame(
        {
            "path": names,
            "label": labels,
            "source": ["a", "b"] * (len(labels) // 2) + ["a"] * (len(labels) % 2),
        }
    )


def test_select_examples_is_deterministic() -> None:
    df = frame(["covid", "covid", "covid", "normal", "normal", "normal"], ["c", "b", "a", "z", "y", "x"])
    probs = [0.9, 0.95, 0.9, 0.1, 0.1, 0.7]
    chosen = select_examples(df, probs, 0.5, per_cell=2)
    assert chosen == {"TP": [1, 2], "TN": [4, 3], "FP": [5], "FN": []}
    with pytest.raises(DataError, match=r"has 6 rows but there are 5 images"):
        select_examples(df, probs[:5])
    with pytest.raises(DataError, match=r"lacks column\(s\) \['label'\]"):
        select_examples(df.drop(columns="label"), probs)
    with pytest.raises(DataError, match=r"unknown label\(s\) \['pneumonia'\]"):
        select_examples(df.assign(label=["pneumonia"] * 6), probs)


def test_overlay_figure_has_colour_bar() -> None:
    fig = overlay_figure(images(1)[0], np.ones((SIZE, SIZE)) * 0.5, title="t")
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="heatmap shape"):
        overlay_figure(images(1)[0], np.ones((4, 4)), title="t")


def test_render_cams_and_summary_grid(tmp_path: object) -> None:
    model = gap_model()
    x = images(4)
    df = frame(["covid", "normal", "covid", "normal"])
    probs = [0.9, 0.2, 0.3, 0.6]
    out = render_cams(model, x, df, tmp_path / "cams", model_name="scratch-gap", probs=probs)
    assert list(out.columns) == [
        "model",
        "image",
        "file",
        "label",
        "pred",
        "prob",
        "outcome",
        "method",
        "layer",
    ]
    assert list(out["outcome"]) == ["TP", "TN", "FN", "FP"]
    assert set(out["method"]) == {"cam"}
    for f in out["file"]:
        assert f.endswith(".png") and (tmp_path / "cams" / f.rsplit("/", 1)[-1]).stat().st_size > 1000
    assert (tmp_path / "cams" / "scratch-gap__summary.png").stat().st_size > 1000
    assert "scratch-gap__img0__true-covid__pred-covid__p0.90.png" in {
        p.name for p in (tmp_path / "cams").iterdir()
    }
    assert not [p for p in (tmp_path / "cams").iterdir() if p.name.startswith(".")]
    grid = summary_grid(
        x,
        np.zeros((4, SIZE, SIZE)),
        df,
        [0.9, 0.1, 0.8, 0.2],
        0.5,
        tmp_path / "g.png",
        model_name="m",
        per_cell=3,
    )
    assert grid.stat().st_size > 1000
    predicted = render_cams(model, x, df, tmp_path / "p", model_name="m", method="gradcam", grid=False)
    assert len(predicted) == 4 and set(predicted["method"]) == {"gradcam"}
    assert not (tmp_path / "p" / "m__summary.png").exists()
    twice = pd.concat([df, df], ignore_index=True)
    maps = heatmaps(model, np.concatenate([x, x]))
    dup = render_cams(
        model,
        np.concatenate([x, x]),
        twice,
        tmp_path / "d",
        model_name="m",
        probs=probs * 2,
        maps=maps,
        grid=False,
    )
    assert dup["file"].nunique() == 8 and "img0-2__" in dup["file"].iloc[4]


# ------------------------------------------------------------ checks


def region_data(n: int, rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Covid = a striped patch in the top-left quadrant; a bright distractor blob anywhere in every image."""
    x = rng.uniform(60, 120, size=(n, size, size, 1)).astype("float32")
    y = rng.integers(0, 2, n)
    for i in range(n):
        r, c = rng.integers(0, size - 8, 2)
        x[i, r : r + 8, c : c + 8] += 100
        if y[i]:
            r, c = rng.integers(1, size // 2 - 7, 2)
            x[i, r : r + 6 : 2, c : c + 6, 0] += 120
    return np.repeat(np.clip(x, 0, 255), 3, axis=-1), y


@pytest.fixture(scope="module")
def trained() -> tuple[keras.Model, np.ndarray]:
    keras.utils.set_random_seed(0)
    x, y = region_data(256, np.random.default_rng(0))
    inp = keras.Input((32, 32, 3))
    h = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inp)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(h)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="last_conv")(h)
    model = _head(h, inp, dropout=False, name="trained")
    model.compile(keras.optimizers.Adam(0.01), "binary_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, epochs=20, batch_size=32, verbose=0)
    assert history.history["accuracy"][-1] > 0.8
    xt, yt = region_data(24, np.random.default_rng(1))
    return model, xt[yt == 1]


def test_trained_model_looks_at_the_region(trained: tuple[keras.Model, np.ndarray]) -> None:
    model, x = trained
    for method in ("cam", "gradcam", "gradcam++"):
        maps = heatmaps(model, x, method)
        assert maps[:, :16, :16].sum() / maps.sum() > 0.45


def test_randomized_copy_is_seeded_and_different(trained: tuple[keras.Model, np.ndarray]) -> None:
    model, _ = trained
    a, b, c = randomized_copy(model, 1), randomized_copy(model, 1), randomized_copy(model, 2)
    ka, kb, kc = (m.get_layer("last_conv").get_weights()[0] for m in (a, b, c))
    np.testing.assert_array_equal(ka, kb)
    assert not np.allclose(ka, kc)
    assert not np.allclose(ka, model.get_layer("last_conv").get_weights()[0])
    assert [lay.name for lay in a.layers[1:]] == [lay.name for lay in model.layers[1:]]


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++"])
def test_randomization_check_low_correlation(trained: tuple[keras.Model, np.ndarray], method: str) -> None:
    model, x = trained
    result = randomization_check(model, x, method, seed=0)
    assert result["spearman_mean"] < 0.5
    assert result["passed"] is True and result["interpretation"].startswith("passed")
    assert len(result["spearman_per_image"]) == len(x) and result["method"] == method


def test_randomization_check_same_model_fails_when_maps_match() -> None:
    model = gap_model()
    x = images(3)
    result = randomization_check(
        model, x, "gradcam", seed=0, maps=heatmaps(randomized_copy(model, 0), x, "gradcam")
    )
    assert result["spearman_mean"] == pytest.approx(1.0) and result["passed"] is False


def test_attention_distribution_border_vs_center() -> None:
    masks = region_masks(40, 40)
    assert masks["center"].sum() == 24 * 24 and not (masks["center"] & masks["border"]).any()
    assert (masks["corners"] & ~masks["border"]).sum() == 0
    border = np.stack([masks["border"].astype(float)] * 2)
    yy, xx = np.mgrid[:40, :40]
    center = np.exp(-((yy - 19.5) ** 2 + (xx - 19.5) ** 2) / 50.0)[None].repeat(2, axis=0)
    df = pd.DataFrame({"label": ["covid", "normal"], "source": ["ieee8023", "kermany"]})
    bad = attention_distribution(border, df)
    good = attention_distribution(center, df)
    assert bad["warning"].startswith(SHORTCUT_WARNING) and good["warning"] is None
    assert "2x" in bad["rule"]
    for res in (bad, good):
        o = res["overall"]
        assert o["center_share"] + o["middle_share"] + o["border_share"] == pytest.approx(1.0)
        assert 0.0 <= o["corners_share"] <= o["border_share"]
        assert set(res["per_class"]) == {"covid", "normal"} and set(res["per_source"]) == {
            "ieee8023",
            "kermany",
        }
    assert bad["overall"]["border_share"] == pytest.approx(1.0) and good["overall"]["center_share"] > 0.9
    assert sum(res["area_share"][k] for k in ("center", "middle", "border")) == pytest.approx(1.0)
    one_source = attention_distribution(np.concatenate([center[:1], border[:1]]), df)
    assert "source=kermany" in one_source["warning"] and "overall" not in one_source["warning"]
    empty = attention_distribution(np.zeros((2, 10, 10)))
    assert (
        empty["overall"]["n_empty"] == 2
        and empty["overall"]["border_share"] is None
        and empty["warning"] is None
    )


def test_write_checks_json(tmp_path: object) -> None:
    model = gap_model()
    x = images(3)
    df = frame(["covid", "normal", "covid"])
    result = write_checks(model, x, tmp_path, model_name="scratch gap", df=df, max_random_images=2)
    path = tmp_path / checks_filename("scratch gap")
    assert path.name == "scratch-gap__checks.json"
    stored = json.loads(path.read_text())
    assert stored == result
    assert set(stored) == {"model", "method", "layer", "explained", "n_images", "randomization", "attention",
                           "off_anatomy", "warning"}
    assert "rule" in stored["off_anatomy"] and stored["randomization"]["separation"]["n_images"] == 3
    assert stored["method"] == "cam" and "interpretation" in stored["randomization"]
    assert stored["randomization"]["n_images"] == 2 and stored["attention"]["overall"]["n_images"] == 3
    assert "NaN" not in path.read_text()
