"""Training runs end to end on a tiny separable data set: files, selection on val only, determinism, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import covidxray.runs.load as model_io_module
import covidxray.runs.train as train_module
from covidxray import metrics
from covidxray.data.manifest import read_manifest, split_frame
from covidxray.errors import DataError, ImageError, ModelError
from covidxray.metrics import METRIC_NAMES
from covidxray.outputs import RECORD_NAME
from covidxray.runs.load import load_run, predict_dataframe, predict_proba
from covidxray.runs.train import (
    VAL_SUMMARY,
    TrainConfig,
    train,
)
from covidxray.training.pipeline import load_images

SIZE = 32
RUN_FILES = ("model.keras", "config.json", "versions.json", "history.csv", "history.json", "threshold.json",
             "timing.json", "val_predictions.csv", "summary.json", "checkpoint/state.json")


def make_dataset_dir(root: Path, counts: dict[str, int], *, corrupt: str | None = None, seed: int = 0) -> Path:
    """A built-dataset folder: covid = a bright disc on noise, normal = noise only; ``corrupt`` adds a bad file."""
    rng = np.random.default_rng(seed)
    rows = []
    yy, xx = np.mgrid[:48, :48]
    for split, n in counts.items():
        for i in range(n):
            y = i % 2
            img = rng.normal(90, 20, (48, 48))
            if y:
                cy, cx = rng.integers(16, 32, 2)
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = 230
            label = "covid" if y else "normal"
            rel = f"{split}/{label}/img_{i}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / rel)
            rows.append({"path": rel, "label": label, "split": split, "patient_id": f"syn:{split}{i}"})
    if corrupt:
        rel = f"{corrupt}/covid/corrupt.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        rows.append({"path": rel, "label": "covid", "split": corrupt, "patient_id": "syn:bad"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


CONFIG = TrainConfig(model="scratch", image_size=SIZE, batch_size=8, epochs=3, lr=1e-3, patience=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 train, 16 val, 8 test images, plus a corrupt file in the test split only."""
    return make_dataset_dir(tmp_path_factory.mktemp("data"), {"train": 32, "val": 16, "test": 8}, corrupt="test")


@pytest.fixture(scope="module")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, set[str]]:
    """One finished 3-epoch scratch run; also records which splits reached the input pipeline."""
    seen: set[str] = set()
    original = train_module.make_dataset

    def spy(df: pd.DataFrame, **kwargs: object) -> object:
        seen.update(df["split"])
        return original(df, **kwargs)

    out = tmp_path_factory.mktemp("runs") / "scratch"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "make_dataset", spy)
        mp.setattr(model_io_module, "make_dataset", spy)
        summary = train(CONFIG, data, out, progress=False)
    return out, summary, seen


def test_run_folder_holds_every_file(run: tuple[Path, dict, set[str]]) -> None:
    out, summary, _ = run
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text()) == CONFIG.resolved().to_dict()
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert {"loss", "val_loss", "val_auc", "val_accuracy", "seconds"} <= set(history.columns)
    assert json.loads((out / "history.json").read_text())[0]["epoch"] == 1
    versions = json.loads((out / "versions.json").read_text())
    assert {"python", "tensorflow", "keras", "numpy", "covidxray", "platform", "devices"} <= set(versions)
    timing = json.loads((out / "timing.json").read_text())
    assert len(timing["epoch_seconds"]) == 3 and timing["train_seconds"] > 0
    threshold = json.loads((out / "threshold.json").read_text())
    assert threshold["method"] == "youden" and threshold["split"] == "val" and 0 < threshold["threshold"] < 1
    preds = pd.read_csv(out / "val_predictions.csv")
    assert len(preds) == 16 and set(preds.columns) >= {"path", "y", "prob", "pred"}
    assert summary["epochs_run"] == 3 and summary["weights"]["spec"] == "none"
    assert not list(out.glob(".*tmp*")) and not list(out.glob(".*partial*"))


def test_training_beats_chance_on_val(run: tuple[Path, dict, set[str]]) -> None:
    _, summary, _ = run
    assert summary["val"]["roc_auc"] > 0.8
    assert summary["val"]["accuracy"] > 0.6


def test_training_never_touches_the_test_split(run: tuple[Path, dict, set[str]], data: Path) -> None:
    out, _, seen = run
    assert seen == {"train", "val"}
    assert not pd.read_csv(out / "val_predictions.csv")["path"].str.startswith("test/").any()
    model, _ = load_run(out)
    test_df = split_frame(read_manifest(data), "test")
    with pytest.raises(ImageError, match="corrupt.png"):  # the test split really holds an unreadable file
        predict_dataframe(model, test_df)


def test_same_seed_gives_identical_metrics(run: tuple[Path, dict, set[str]], data: Path, tmp_path: Path) -> None:
    out, summary, _ = run
    again = train(CONFIG, data, tmp_path / "again", progress=False)
    cols = ["loss", "val_loss", "val_auc", "val_accuracy"]
    a, b = pd.read_csv(out / "history.csv")[cols], pd.read_csv(tmp_path / "again" / "history.csv")[cols]
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert again["val"] == summary["val"] and again["threshold"] == summary["threshold"]


def test_resume_continues_from_the_checkpoint(run: tuple[Path, dict, set[str]], data: Path, tmp_path: Path) -> None:
    out, _, _ = run
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    before = pd.read_csv(copy / "history.csv")
    summary = train(TrainConfig(**{**CONFIG.to_dict(), "epochs": 4}), data, copy, progress=False, resume=True)
    after = pd.read_csv(copy / "history.csv")
    assert summary["resumed_from_epoch"] == 3 and summary["epochs_run"] == 4
    assert after["epoch"].tolist() == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(after.iloc[:3], before)
    state = json.loads((copy / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 4 and state["checkpoint"] == "epoch_0004.keras" and state["sessions"] == 2
    last = keras.models.load_model(copy / "checkpoint" / "epoch_0004.keras")
    assert int(last.optimizer.iterations.numpy()) == 4 * 4  # 32 images / batch 8, optimizer state kept
    assert json.loads((copy / "config.json").read_text())["epochs"] == 4


def test_finished_run_is_a_no_op_and_folders_are_protected(run: tuple[Path, dict, set[str]], data: Path) -> None:
    out, summary, _ = run
    stamp = (out / "model.keras").stat().st_mtime_ns
    assert train(CONFIG, data, out, progress=False, resume=True) == json.loads((out / "summary.json").read_text())
    assert (out / "model.keras").stat().st_mtime_ns == stamp
    with pytest.raises(ModelError, match="resume"):
        train(CONFIG, data, out, progress=False)
    with pytest.raises(ModelError, match=r"changed: \['lr'\]"):
        train(TrainConfig(**{**CONFIG.to_dict(), "lr": 0.1}), data, out, progress=False, resume=True)


def test_load_run_and_predict_proba_agree(run: tuple[Path, dict, set[str]], data: Path) -> None:
    out, summary, _ = run
    model, meta = load_run(out)
    same, meta2 = load_run(out / "model.keras")
    assert meta["threshold"] == summary["threshold"] == meta2["threshold"]
    assert meta["config"]["model"] == "scratch" and meta["image_size"] == SIZE and meta["labels"] == ["normal", "covid"]
    preds = pd.read_csv(out / "val_predictions.csv")
    images = load_images([data / p for p in preds["path"]], SIZE)
    assert np.allclose(predict_proba(model, images), preds["prob"], atol=1e-6)
    assert np.allclose(predict_proba(same, images, batch_size=3), preds["prob"], atol=1e-6)
    with pytest.raises(ModelError, match="image_size=32"):
        predict_proba(model, np.zeros((2, 48, 48, 3), np.float32))


def test_load_run_errors_name_the_file(run: tuple[Path, dict, set[str]], tmp_path: Path) -> None:
    out, _, _ = run
    with pytest.raises(ModelError, match="nothing-here"):
        load_run(tmp_path / "nothing-here")
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (out / "model.keras").read_bytes()
    (broken / "model.keras").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"broken.*model.keras.*(retrain|re-download)"):
        load_run(broken)


def test_unreadable_training_image_is_named(tmp_path: Path) -> None:
    data = make_dataset_dir(tmp_path / "data", {"train": 8, "val": 4}, corrupt="train")
    with pytest.raises(ImageError, match="corrupt.png"):
        train(TrainConfig(**{**CONFIG.to_dict(), "epochs": 1}), data, tmp_path / "run", progress=False)


def test_train_chooses_the_threshold_by_the_one_rule(run: tuple[Path, dict, set[str]]) -> None:
    """Training calls metrics.choose_threshold itself: the same value as every other caller, and the run's files
    use the metric names of covidxray.metrics (recall, roc_auc, n_pos), never sensitivity/auc/n_covid."""
    assert train_module.choose_threshold is metrics.choose_threshold
    assert train_module.choose_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])["threshold"] == pytest.approx(0.6)
    out, summary, _ = run
    preds = pd.read_csv(out / "val_predictions.csv")
    saved = json.loads((out / "threshold.json").read_text())
    assert saved == pytest.approx(metrics.choose_threshold(preds["y"], preds["prob"]))
    assert (preds["pred"] == (preds["prob"] >= saved["threshold"])).all()
    assert set(METRIC_NAMES) <= set(saved) and "youden_j" in saved
    assert list(summary["val"]) == list(VAL_SUMMARY) and summary["val"]["recall"] == saved["recall"]
    assert not {"sensitivity", "auc", "n_covid"} & (set(saved) | set(summary["val"]))


def test_a_run_folder_of_an_older_version_is_read_but_not_resumed(run: tuple[Path, dict, set[str]], data: Path,
                                                                  tmp_path: Path) -> None:
    """Older versions wrote no ownership record and no dataset fingerprint: such a run still loads and predicts,
    but training into it (resume or reuse) is refused, since nothing proves which dataset it was trained on."""
    out, _, _ = run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / RECORD_NAME).unlink()
    (old / "provenance.json").unlink()
    model, meta = load_run(old)
    assert meta["threshold"] == json.loads((old / "threshold.json").read_text())["threshold"]
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match="covidxray did not write"):
        train(CONFIG, data, old, progress=False, resume=True)
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
