"""Bad input, nothing lost: one case per row of docs/robustness.md, through the data build, the training input
pipeline, evaluation and heatmaps.

Each row ends in a recorded skip (the file and the reason in rejected.csv / skipped.csv) or a clear
CovidXrayError naming the file and the fix, never a TensorFlow traceback; every test also checks that the
sources are byte-identical afterwards and that no half-written output (staging folders, temporary files,
partial models) is left behind.
"""

from __future__ import annotations

import csv
import io
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tree_digest, write_image
from PIL import Image

from covidxray.data.build import BuildConfig, build_dataset
from covidxray.data.manifest import read_manifest
from covidxray.errors import CovidXrayError, DataError, ImageError, ModelError
from covidxray.evaluation.evaluate import SKIPPED_FILE, evaluate_model
from covidxray.explain.maps import safe_name
from covidxray.explain.render import render_model_cams, skipped_filename

IMAGE_SIZE = 32

# ------------------------------------------------------------------------------------------------- helpers

_LEFTOVER = re.compile(r"(^\..*\.(tmp|old)-|\.tmp$|\.partial\.keras$|^covidxray-images-)")


def leftovers(root: Path) -> list[str]:
    """Staging folders, temporary files and partial models anywhere below ``root`` (should be none)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if _LEFTOVER.search(p.name))


@pytest.fixture()
def private_tmp(tmp_path, monkeypatch) -> Path:
    """A temporary folder of the test's own, in place of the machine's (``tempfile.tempdir``): what the code
    leaves there is this test's alone, whatever other covidxray processes run on the machine."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def temp_dirs(folder: Path) -> set[str]:
    """The covidxray temporary folders (decoded copies of external images) in ``folder``."""
    return {p.name for p in folder.glob("covidxray-images-*")}


def good_images(folder: Path, n: int, seed: int, ext: str = ".png") -> list[Path]:
    """``n`` distinct, valid noise images in ``folder``."""
    return [write_image(folder / f"img{seed + i:04d}{ext}", seed=seed + i, size=(72, 64)) for i in range(n)]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def big_png() -> bytes:
    """A PNG of 7100 x 7100 pixels (50.4 MP, over the 50 MP default limit) that compresses to a few KB."""
    img = Image.new("L", (7100, 7100), 0)
    img.paste(255, (0, 0, 7100, 10))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def model_run(tmp_path_factory) -> Path:
    """A run folder holding an untrained scratch-gap model at 32 px: loading and predicting is all these need."""
    from covidxray.training.models import build_model

    run = tmp_path_factory.mktemp("model") / "run"
    run.mkdir()
    build_model("scratch-gap", image_size=IMAGE_SIZE, seed=0).save(run / "model.keras")
    return run


@pytest.fixture
def read_only_dir(tmp_path) -> Path:
    """A folder this process cannot create files in; as root (permissions do not bind) a path under sysfs."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("")
    except OSError:
        yield folder
    else:
        (folder / "probe").unlink()
        sysfs = Path("/sys")
        if not sysfs.is_dir():
            pytest.skip("running as root without a read-only file system to write to")
        yield sysfs / "covidxray-read-only"
    finally:
        folder.chmod(0o755)


# ------------------------------------------------------------------------------------------------- image rows


@dataclass(frozen=True)
class Row:
    """One bad or odd file: how to make it in a class folder, and what each stage does with it."""

    make: Callable[[Path, bytes], Path]
    build: str
    """"skip" (rejected.csv line), "keep" (copied as is), "normalise" (8-bit PNG copy), "ignore" (litter)."""
    reason: str
    """Substring of the recorded reason (skips), or "FORMAT/MODE" of the manifest (kept files)."""
    external: str
    """evaluate/cam on external class folders: "skip" (skipped.csv line) or "use"."""


def _bytes(name: str, data: bytes) -> Callable[[Path, bytes], Path]:
    def make(folder: Path, _: bytes) -> Path:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path
    return make


def _truncated(name: str, size: tuple[int, int], keep: float) -> Callable[[Path, bytes], Path]:
    def make(folder: Path, _: bytes) -> Path:
        gray = (np.random.default_rng(7).random(size[::-1]) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(gray).save(buf, format="JPEG" if name.endswith(".jpeg") else "PNG")
        data = buf.getvalue()
        return _bytes(name, data[: int(len(data) * keep)])(folder, b"")
    return make


def _image(name: str, **kwargs) -> Callable[[Path, bytes], Path]:
    return lambda folder, _: write_image(folder / name, seed=99, **kwargs)


def _exif_rotated(folder: Path, _: bytes) -> Path:
    img = Image.fromarray((np.random.default_rng(5).random((40, 100)) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # display turned 90 degrees: the upright image is 40 wide and 100 high
    img.save(folder / "rotated.jpeg", exif=exif)
    return folder / "rotated.jpeg"


def _big(folder: Path, data: bytes) -> Path:
    return _bytes("huge.png", data)(folder, b"")


def _symlink_loop(folder: Path, _: bytes) -> Path:
    path = folder / "loop.jpeg"
    os.symlink("loop.jpeg", path)
    return path


IMAGE_ROWS: dict[str, Row] = {
    "zero-byte file": Row(_bytes("empty.jpeg", b""), "skip", "empty file", "skip"),
    "truncated JPEG": Row(_truncated("cut.jpeg", (200, 200), 0.05), "skip", "truncated or corrupt", "skip"),
    "truncated PNG": Row(_truncated("cut.png", (300, 300), 0.5), "skip", "truncated or corrupt", "skip"),
    "text file named .jpeg": Row(_bytes("notes.jpeg", b"patient list, not an image\n"), "skip", "not an image",
                                 "skip"),
    ".DS_Store": Row(_bytes(".DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(64)), "ignore", "litter", "skip"),
    "Thumbs.db": Row(_bytes("Thumbs.db", b"\xd0\xcf\x11\xe0" + bytes(64)), "ignore", "litter", "skip"),
    "__MACOSX/._x.jpeg": Row(_bytes("__MACOSX/._x.jpeg", b"\x00\x05\x16\x07" + bytes(80)), "ignore", "litter",
                             "skip"),
    "16-bit grayscale PNG": Row(_image("gray16.png", mode="I;16"), "normalise", "PNG/I;16", "use"),
    "CMYK JPEG": Row(_image("cmyk.jpeg", mode="CMYK", fmt="JPEG"), "normalise", "JPEG/CMYK", "use"),
    "palette PNG": Row(_image("palette.png", mode="P"), "keep", "PNG/P", "use"),
    "RGBA PNG": Row(_image("rgba.png", mode="RGBA"), "keep", "PNG/RGBA", "use"),
    "EXIF-rotated JPEG": Row(_exif_rotated, "normalise", "JPEG/L", "use"),
    "1x1 image": Row(_image("dot.png", size=(1, 1)), "skip", "smaller than 32 px", "skip"),
    "image over the size limit": Row(_big, "skip", "over the limit", "skip"),
    "path with spaces and non-ASCII": Row(_image("dir with spaces/tëst ñ 图 x.png"), "keep", "PNG/L", "use"),
    "symlink loop": Row(_symlink_loop, "ignore", "symbolic link", "skip"),
}
RECORDED_LATER = {".DS_Store", "Thumbs.db", "__MACOSX/._x.jpeg", "symlink loop"}
"""Rows the source readers ignore without a line in rejected.csv (covidxray/sources: see docs/robustness.md)."""


def presplit_source(root: Path, seed: int = 0) -> Path:
    """A pre-split folder {train,test}/{Covid,Normal} of valid images."""
    for i, (split, cls, n) in enumerate([("train", "Covid", 6), ("train", "Normal", 6), ("test", "Covid", 3),
                                         ("test", "Normal", 3)]):
        good_images(root / split / cls, n, seed=seed + 100 * i)
    return root


@pytest.fixture
def row_source(request, tmp_path, big_png):
    """A pre-split source with the row's file in train/Covid; returns (source, the file, the row)."""
    name = request.param
    row = IMAGE_ROWS[name]
    source = presplit_source(tmp_path / "src")
    return source, row.make(source / "train" / "Covid", big_png), row


def _build(source: Path, out: Path) -> dict:
    return build_dataset(out, presplit=source, config=BuildConfig(seed=0), progress=False)


def _pipeline_reads_everything(dataset: Path) -> None:
    """The training input pipeline decodes every file the build wrote (no TensorFlow decode error)."""
    from covidxray.training.pipeline import make_dataset

    df = read_manifest(dataset)
    ds = make_dataset(df, image_size=IMAGE_SIZE, batch_size=16, training=False, cache=None)
    assert sum(int(x.shape[0]) for x, _ in ds) == len(df)


@pytest.mark.parametrize("row_source", list(IMAGE_ROWS), indirect=True)
def test_build_and_pipeline(row_source, tmp_path):
    source, file, row = row_source
    before = tree_digest(source)
    out = tmp_path / "dataset"
    summary = _build(source, out)
    assert tree_digest(source) == before, "the source is only read"
    assert leftovers(tmp_path) == []
    manifest = read_manifest(out)
    rejected = read_csv(out / "rejected.csv")
    rel = file.relative_to(source).as_posix()
    mine = manifest[manifest["orig_path"] == rel]
    lines = [r for r in rejected if r["item"] == rel]
    assert summary["images"] == len(manifest) == 18 + (row.build in ("keep", "normalise"))
    if row.build == "skip":
        assert mine.empty and len(lines) == 1 and row.reason in lines[0]["reason"], lines
    elif row.build == "ignore":
        assert mine.empty
    else:
        assert len(mine) == 1 and not lines
        kept = mine.iloc[0]
        assert f"{kept['format']}/{kept['mode']}" == row.reason
        with Image.open(kept["filepath"]) as img:
            if row.build == "normalise":
                assert (img.format, img.mode) == ("PNG", "L")
                assert img.size == (int(kept["width"]), int(kept["height"]))
            else:
                assert Path(kept["filepath"]).read_bytes() == file.read_bytes(), "kept byte for byte"
        assert kept["path"].isascii() and " " not in kept["path"]
    if file.name == "rotated.jpeg":
        assert (int(mine.iloc[0]["width"]), int(mine.iloc[0]["height"])) == (40, 100), "stored upright"
    _pipeline_reads_everything(out)


@pytest.mark.parametrize("row_source", sorted(RECORDED_LATER), indirect=True)
def test_build_records_ignored_entries(row_source, tmp_path):
    source, file, row = row_source
    _build(source, tmp_path / "dataset")
    rel = file.relative_to(source).as_posix()
    lines = [r for r in read_csv(tmp_path / "dataset" / "rejected.csv") if r["item"] == rel]
    assert len(lines) == 1 and row.reason in lines[0]["reason"]


def external_folder(root: Path, seed: int = 500) -> Path:
    """An external set: covid/ and normal/ class folders of valid images."""
    good_images(root / "covid", 3, seed=seed)
    good_images(root / "normal", 3, seed=seed + 50, ext=".jpeg")
    return root


@pytest.mark.parametrize("stage", ["evaluate", "cam"])
@pytest.mark.parametrize("name", list(IMAGE_ROWS))
def test_external_data(name, stage, tmp_path, model_run, big_png, private_tmp):
    row = IMAGE_ROWS[name]
    data = external_folder(tmp_path / "external")
    file = row.make(data / "covid", big_png)
    before = tree_digest(data)
    out = tmp_path / "out"
    if stage == "evaluate":
        result = evaluate_model(model_run, data, out_dir=out, n_boot=20)
        skipped = read_csv(out / SKIPPED_FILE)
        preds = pd.read_csv(out / "predictions.csv")
        assert len(preds) == result["metrics"]["n"]
        used = file.name in set(preds["filepath"])
    else:
        result = render_model_cams(model_run, data, out_dir=out, name="m")
        skipped = read_csv(out / skipped_filename("m"))
        overlays = list(out.glob("m__*__true-*.png"))
        assert len(overlays) == result["images"]
        used = any(p.name.startswith(f"m__{safe_name(file.stem, 'image')}__") for p in overlays)
    assert tree_digest(data) == before and leftovers(tmp_path) == [] and temp_dirs(private_tmp) == set()
    mine = [s for s in skipped if Path(s["file"]).name == file.name]
    if row.external == "skip":
        assert len(mine) == 1 and row.reason in mine[0]["reason"], skipped
        assert not used
        if stage == "evaluate":
            assert result["metrics"]["n"] == 6 and "Skipped 1 file(s)" in result["markdown"]
        else:
            assert result["images"] == 6 and len(result["skipped"]) == 1
    else:
        assert not mine and used
        assert (result["metrics"]["n"] if stage == "evaluate" else result["images"]) == 7


def test_external_csv_with_odd_paths(tmp_path, model_run):
    """A CSV naming the odd-but-valid files by relative path with spaces and non-ASCII characters."""
    data = tmp_path / "ext set"
    files = [IMAGE_ROWS[n].make(data / "img ü", b"") for n in ("16-bit grayscale PNG", "CMYK JPEG",
                                                              "EXIF-rotated JPEG", "path with spaces and non-ASCII")]
    good = good_images(data / "img ü", 2, seed=900)
    table = data / "list.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "source"])
        for i, p in enumerate(files + good):
            w.writerow([p.relative_to(data).as_posix(), "covid" if i % 2 else "normal", f"p{i}", "site"])
    before = tree_digest(data)
    result = evaluate_model(model_run, table, out_dir=tmp_path / "out", n_boot=20)
    assert result["metrics"]["n"] == 6 and result["skipped"]["count"] == 0
    assert tree_digest(data) == before and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------- folder rows


def test_empty_class_folder_build(tmp_path):
    source = presplit_source(tmp_path / "src")
    for f in (source / "train" / "Covid").iterdir():
        f.unlink()
    before = tree_digest(source)
    with pytest.raises(DataError, match=r"train/Covid"):
        _build(source, tmp_path / "dataset")
    assert tree_digest(source) == before and not (tmp_path / "dataset").exists() and leftovers(tmp_path) == []


def test_one_class_train_split_is_refused_by_training(tmp_path):
    """A manifest edited (or built elsewhere) so that train holds one class: training refuses it by name."""
    import pandas as pd

    from covidxray.runs.train import TrainConfig, train

    source = presplit_source(tmp_path / "src")
    _build(source, tmp_path / "dataset")
    manifest = tmp_path / "dataset" / "manifest.csv"
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    df[~((df["split"] == "train") & (df["label"] == "covid"))].to_csv(manifest, index=False)
    with pytest.raises(DataError, match="one class|only normal"):
        train(TrainConfig(model="scratch", weights="none", epochs=1, image_size=IMAGE_SIZE, batch_size=8),
              tmp_path / "dataset", tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "model.keras").exists()


@pytest.mark.parametrize("stage", ["evaluate", "cam"])
def test_empty_class_folder_external(tmp_path, model_run, stage):
    data = tmp_path / "external"
    good_images(data / "covid", 3, seed=10)
    (data / "normal").mkdir()
    before = tree_digest(data)
    if stage == "evaluate":
        result = evaluate_model(model_run, data, out_dir=tmp_path / "out", n_boot=20)
        assert result["metrics"]["n"] == 3 and np.isnan(result["metrics"]["roc_auc"])
        assert "only covid images" in result["markdown"]
    else:
        assert render_model_cams(model_run, data, out_dir=tmp_path / "out", name="m")["images"] == 3
    assert tree_digest(data) == before and leftovers(tmp_path) == []


def test_class_folder_with_one_image(tmp_path, model_run):
    source = presplit_source(tmp_path / "src")
    for f in sorted((source / "train" / "Covid").iterdir())[1:]:
        f.unlink()
    before = tree_digest(source)
    summary = _build(source, tmp_path / "dataset")
    counts = summary["counts"]
    assert sum(counts[s]["covid"] for s in counts) == 4
    assert tree_digest(source) == before and leftovers(tmp_path) == []
    data = tmp_path / "external"
    good_images(data / "covid", 1, seed=20)
    good_images(data / "normal", 3, seed=30)
    result = evaluate_model(model_run, data, out_dir=tmp_path / "out", n_boot=20)
    assert result["metrics"]["n"] == 4 and result["metrics"]["n_pos"] == 1


# ------------------------------------------------------------------------------------------------- metadata rows

_META_COLUMNS = ["patientid", "offset", "sex", "age", "finding", "RT_PCR_positive", "view", "modality", "date",
                 "location", "folder", "filename", "doi", "url", "license", "clinical_notes", "other_notes"]


def ieee_sources(root: Path, change: str) -> tuple[Path, Path, list[str]]:
    """Kermany-like normals and an ieee8023-like COVID folder whose metadata.csv has the row's problem.

    Returns (chest_xray, covid_xray, the file names of the rows the problem touches)."""
    chest = root / "Chest_XRAY"
    for split, n in (("train", 8), ("test", 3)):
        for i in range(n):
            write_image(chest / "chest_xray" / split / "NORMAL" / f"IM-{split[:2]}{i:02d}-0001.jpeg",
                        seed=1000 + 17 * i + len(split), fmt="JPEG")
    covid = root / "Covid_XRAY"
    rows = []
    for i in range(8):
        name = f"covid-{i:02d}.jpeg"
        write_image(covid / "images" / name, seed=2000 + i, fmt="JPEG")
        rows.append({"patientid": str(i), "finding": "Pneumonia/Viral/COVID-19", "view": "PA", "modality": "X-ray",
                     "folder": "images", "filename": name, "location": "Madrid, Spain"})
    touched: list[str] = []
    columns = list(_META_COLUMNS)
    encoding = "utf-8"
    if change == "missing required column":
        columns.remove("view")
    elif change == "extra unknown columns":
        columns += ["scanner_vendor", "Unnamed: 99", "notes 2"]
        for r in rows:
            r["scanner_vendor"] = "acme"
    elif change == "latin-1":
        encoding = "latin-1"
        rows[0]["location"] = "Málaga, España"
        rows[1]["clinical_notes"] = "opacités bilatérales, « verre dépoli »"
        touched = [rows[0]["filename"], rows[1]["filename"]]
    elif change == "blank view or finding":
        rows[0]["view"] = ""
        rows[1]["finding"] = ""
        touched = [rows[0]["filename"], rows[1]["filename"]]
    elif change == "filename not on disk":
        rows.append({**rows[0], "patientid": "99", "filename": "not-here.jpeg"})
        touched = ["not-here.jpeg"]
    with (covid / "metadata.csv").open("w", newline="", encoding=encoding) as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return chest, covid, touched


def _build_sources(chest: Path, covid: Path, out: Path) -> dict:
    return build_dataset(out, chest_xray=chest, covid_xray=covid, config=BuildConfig(seed=0), progress=False)


def test_metadata_missing_required_column(tmp_path):
    chest, covid, _ = ieee_sources(tmp_path / "src", "missing required column")
    before = tree_digest(tmp_path / "src")
    with pytest.raises(DataError, match=r"metadata\.csv: missing required column\(s\) \['view'\].*Use the metadata"):
        _build_sources(chest, covid, tmp_path / "dataset")
    assert tree_digest(tmp_path / "src") == before
    assert not (tmp_path / "dataset").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("change", ["extra unknown columns", "latin-1", "blank view or finding",
                                    "filename not on disk"])
def test_metadata_rows(tmp_path, change):
    chest, covid, touched = ieee_sources(tmp_path / "src", change)
    before = tree_digest(tmp_path / "src")
    summary = _build_sources(chest, covid, tmp_path / "dataset")
    assert tree_digest(tmp_path / "src") == before and leftovers(tmp_path) == []
    manifest = read_manifest(tmp_path / "dataset")
    names = {Path(p).name for p in manifest.query("source == 'ieee8023'")["orig_path"]}
    rejected = read_csv(tmp_path / "dataset" / "rejected.csv")
    if change in ("extra unknown columns", "latin-1"):
        assert len(names) == 8 and set(touched) <= names
        assert "scanner_vendor" not in manifest.columns
    elif change == "blank view or finding":
        assert len(names) == 6 and not set(touched) & names
    else:
        assert len(names) == 8
        assert [r["reason"] for r in rejected if "not-here.jpeg" in r["item"]] == [
            "listed in metadata.csv but not on disk"]
    assert summary["counts"]["train"]["normal"] > 0


def test_metadata_blank_view_or_finding_is_recorded(tmp_path):
    chest, covid, touched = ieee_sources(tmp_path / "src", "blank view or finding")
    _build_sources(chest, covid, tmp_path / "dataset")
    rejected = read_csv(tmp_path / "dataset" / "rejected.csv")
    reasons = {name: [r["reason"] for r in rejected if name in r["item"]] for name in touched}
    assert any("blank view" in r for r in reasons[touched[0]]), reasons
    assert any("blank finding" in r for r in reasons[touched[1]]), reasons


# ------------------------------------------------------------------------------------------------- evaluate rows


def test_unknown_label_and_missing_file_in_an_evaluation_csv(tmp_path, model_run):
    """Skipped and listed, as the build skips them in rejected.csv (one reader for both)."""
    data = external_folder(tmp_path / "external")
    table = data / "list.csv"
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.*") if p.suffix != ".csv")
    table.write_text("path,label\n" + "".join(f"{f},{f.split('/')[0].upper()}\n" for f in files)
                     + "normal/img0550.jpeg,pneumonia\nnormal/gone.png,normal\n", encoding="utf-8")
    before = tree_digest(data)
    result = evaluate_model(model_run, table, split=None, out_dir=tmp_path / "out", n_boot=20)
    assert result["metrics"]["n"] == 6 and "Skipped 2 file(s)" in result["markdown"]
    skipped = {s["file"]: s["reason"] for s in read_csv(tmp_path / "out" / SKIPPED_FILE)}
    assert skipped["list.csv, line 8"].startswith("unknown label 'pneumonia' (use normal or covid")
    assert skipped["list.csv, line 9"].startswith("image file not found (normal/gone.png")
    assert tree_digest(data) == before and leftovers(tmp_path) == []


def test_one_file_under_two_labels_in_an_evaluation_csv(tmp_path, model_run):
    data = external_folder(tmp_path / "external")
    table = data / "list.csv"
    table.write_text("path,label\ncovid/img0500.png,covid\nnormal/img0550.jpeg,normal\n./covid/img0500.png,normal\n",
                     encoding="utf-8")
    before = tree_digest(data)
    with pytest.raises(DataError, match=r"list\.csv: the file .*img0500\.png is listed with both labels \(line 2: "
                                        r"covid; line 4: normal\)\. A file has one label: fix the wrong line"):
        evaluate_model(model_run, table, out_dir=tmp_path / "out", n_boot=20)
    assert tree_digest(data) == before and not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def _wrong_shape_model(run: Path, kind: str) -> Path:
    import keras

    run.mkdir(parents=True)
    if kind == "grayscale input":
        inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1))
        x = keras.layers.Conv2D(2, 3)(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
    else:
        inputs = keras.Input((10,))
        x = inputs
    keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x)).save(run / "model.keras")
    return run


def _truncated_model(run: Path, model_run: Path) -> Path:
    run.mkdir(parents=True)
    data = (model_run / "model.keras").read_bytes()
    (run / "model.keras").write_bytes(data[: len(data) // 2])
    return run


@pytest.mark.parametrize("stage", ["evaluate", "cam"])
@pytest.mark.parametrize("kind", ["grayscale input", "vector input", "truncated .keras"])
def test_bad_model_files(tmp_path, model_run, kind, stage):
    run = tmp_path / "bad run"
    if kind == "truncated .keras":
        run = _truncated_model(run, model_run)
        match = r"model\.keras: cannot load the model .*truncated or corrupt: retrain or re-download"
    else:
        run = _wrong_shape_model(run, kind)
        match = r"model\.keras: the model takes inputs of shape .* not square RGB images .*covidxray train"
    data = external_folder(tmp_path / "external")
    before, model_before = tree_digest(data), tree_digest(run)
    with pytest.raises(ModelError, match=match):
        if stage == "evaluate":
            evaluate_model(run, data, out_dir=tmp_path / "out", n_boot=20)
        else:
            render_model_cams(run, data, out_dir=tmp_path / "out")
    assert tree_digest(data) == before and tree_digest(run) == model_before
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("stage", ["build", "evaluate", "cam", "probe"])
def test_output_folder_on_a_read_only_path(tmp_path, model_run, read_only_dir, stage):
    out = read_only_dir / "out"
    source = presplit_source(tmp_path / "src")
    data = external_folder(tmp_path / "external")
    before = tree_digest(tmp_path)
    fix = r"\((EPERM|EACCES|EROFS|ENOENT)\); .*(choose a writable --out|check it)"
    with pytest.raises(DataError, match=rf"{re.escape(str(read_only_dir))}(/out)?: .*{fix}"):
        if stage == "build":
            _build(source, out)
        elif stage == "evaluate":
            evaluate_model(model_run, data, out_dir=out, n_boot=20)
        elif stage == "cam":
            render_model_cams(model_run, data, out_dir=out)
        else:
            from covidxray.evaluation.shortcut_probes import run_probes

            _build(source, tmp_path / "dataset")
            before = tree_digest(tmp_path)
            run_probes(tmp_path / "dataset", out, epochs=1, image_size=IMAGE_SIZE, progress=False)
    assert tree_digest(tmp_path) == before and not out.exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------- pipeline


def test_file_damaged_after_the_build_is_named_by_training_and_evaluation(tmp_path, model_run):
    from covidxray.runs.train import TrainConfig, train

    source = presplit_source(tmp_path / "src")
    _build(source, tmp_path / "dataset")
    df = read_manifest(tmp_path / "dataset")
    bad = {split: df.query("split == @split")["filepath"].iloc[0] for split in ("train", "test")}
    for path in bad.values():
        Path(path).write_bytes(b"damaged")
    with pytest.raises(ImageError, match=rf"{re.escape(bad['train'])}: cannot be read as an image.*rebuild"):
        train(TrainConfig(model="scratch", weights="none", epochs=1, image_size=IMAGE_SIZE, batch_size=8),
              tmp_path / "dataset", tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "model.keras").exists()
    with pytest.raises(CovidXrayError, match=re.escape(bad["test"])):
        evaluate_model(model_run, tmp_path / "dataset", out_dir=tmp_path / "out", n_boot=20)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------- external validation


def test_external_csv_reports_sources_and_the_change_against_the_internal_test(tmp_path, model_run):
    from covidxray.metrics import METRIC_NAMES

    dataset = tmp_path / "dataset"
    _build(presplit_source(tmp_path / "src"), dataset)
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes((model_run / "model.keras").read_bytes())
    internal = evaluate_model(run, dataset, n_boot=20)
    assert (run / "eval-test" / "metrics.json").is_file() and "change_vs_internal" not in internal

    data = external_folder(tmp_path / "external")
    files = sorted(p for p in data.rglob("*") if p.is_file())
    table = data / "external.csv"
    table.write_text("path,label,patient_id,source\n" + "".join(
        f"{p.relative_to(data).as_posix()},{p.parent.name.upper()},pt{i // 2},{'site-a' if i // 2 % 2 else 'site-b'}\n"
        for i, p in enumerate(files)), encoding="utf-8")
    before = tree_digest(data)
    result = evaluate_model(run, table, split=None, out_dir=tmp_path / "ext", n_boot=20)
    assert tree_digest(data) == before and leftovers(tmp_path) == []
    assert set(result["per_source"]) == {"site-a", "site-b"}
    assert sum(r["metrics"]["n"] for r in result["per_source"].values()) == result["metrics"]["n"] == 6
    assert result["bootstrap"]["unit"] == "patient" and result["bootstrap"]["n_units"] == 3
    assert result["reference"]["path"] == str(run / "eval-test" / "metrics.json")
    assert set(result["change_vs_internal"]) == set(METRIC_NAMES)
    for name, change in result["change_vs_internal"].items():
        new, old = result["metrics"][name], internal["metrics"][name]
        assert (change is None) == (np.isnan(new) or np.isnan(old))
        assert change is None or change == pytest.approx(new - old)
    text = (tmp_path / "ext" / "results.md").read_text(encoding="utf-8")
    assert "Per source" in text and "site-a" in text and "Change against the internal test evaluation" in text
    saved = pd.read_json(tmp_path / "ext" / "metrics.json", typ="series")
    assert set(saved["change_vs_internal"]) == set(METRIC_NAMES)

    with pytest.raises(DataError, match=r"nowhere\.json: no reference evaluation there"):
        evaluate_model(run, table, split=None, out_dir=tmp_path / "ext2", reference=tmp_path / "nowhere.json")
    assert not (tmp_path / "ext2").exists()
