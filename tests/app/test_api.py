"""The Python API (covidxray.open, load_run, load_dataset): its docstring examples run, and what it returns agrees
with an independent reading of the same pixels and with the command line."""

from __future__ import annotations

import doctest
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import covidxray
from covidxray.app import api
from covidxray.errors import DataError


def test_every_public_function_has_an_example_and_the_examples_run(tiny_run, tiny_dataset):
    public = [obj for name, obj in vars(api).items() if not name.startswith("_") and callable(obj)
              and getattr(obj, "__module__", "") == api.__name__ and name not in ("Heatmaps", "Artifact")]
    without = [obj.__name__ for obj in public if ">>>" not in (obj.__doc__ or "")]
    assert without == [], f"public API without an example: {without}"
    result = doctest.testmod(api, extraglobs={"covidxray": covidxray, "run_dir": str(tiny_run),
                                              "dataset_dir": str(tiny_dataset), "np": np, "Path": Path},
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True)
    assert result.attempted >= 15 and result.failed == 0, result


def test_open_knows_each_kind_and_refuses_what_is_not_an_output(tiny_run, tiny_dataset, tmp_path):
    assert isinstance(covidxray.open(tiny_run), covidxray.Run)
    assert isinstance(covidxray.open(tiny_run / "model.keras"), covidxray.Run)
    assert isinstance(covidxray.open(tiny_dataset), covidxray.Dataset)
    with pytest.raises(DataError, match="not an output covidxray wrote"):
        covidxray.open(tmp_path)
    with pytest.raises(DataError, match="a dataset .*load_run needs a run folder"):
        covidxray.load_run(tiny_dataset)


def test_pixels_read_by_pillow_predict_as_the_file_does(tiny_run, tiny_dataset, tmp_path):
    """Arrays decoded by Pillow (an independent reader) give the probabilities of the files themselves."""
    run = covidxray.load_run(tiny_run)
    gray = []
    for i, file in enumerate(covidxray.load_dataset(tiny_dataset).split("test")["filepath"][:5]):
        gray.append(tmp_path / f"{i}.png")
        Image.open(file).convert("L").save(gray[-1])
    by_file = run.predict(gray)
    by_pixels = run.predict([np.asarray(Image.open(f)) for f in gray])
    np.testing.assert_allclose(by_pixels["p_covid"], by_file["p_covid"], atol=1e-5)
    assert list(by_pixels["pred"]) == list(by_file["pred"])


def test_predict_in_memory_matches_the_command_line_and_keeps_the_callers_columns(tiny_run, tiny_dataset, tmp_path):
    from covidxray.app.cli import main

    test = covidxray.load_dataset(tiny_dataset).split("test").head(6)
    frame = pd.DataFrame({"path": test["filepath"], "patient": test["patient_id"], "label": test["label"]})
    frame.to_csv(tmp_path / "list.csv", index=False)
    table = covidxray.load_run(tiny_run).predict(frame)
    assert list(table["patient"]) == list(frame["patient"]) and list(table["label"]) == list(frame["label"])
    assert main(["predict", "--model", str(tiny_run), str(tmp_path / "list.csv"), "--out", str(tmp_path / "out"),
                 "--quiet"]) == 0
    written = pd.read_csv(tmp_path / "out" / "predictions.csv")
    np.testing.assert_allclose(table["p_covid"], written["p_covid"], atol=1e-6)
    assert not (tmp_path / "in-memory").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["list.csv", "out"]


def test_a_dicom_file_is_predicted_and_an_unusable_file_is_skipped_with_its_reason(tiny_run, tiny_dataset,
                                                                                   tmp_path):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    png = covidxray.load_dataset(tiny_dataset).split("test")["filepath"].iloc[0]
    pixels = np.asarray(Image.open(png).convert("L"))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "DX", "MONOCHROME2", 1
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    (tmp_path / "empty.png").write_bytes(b"")
    shutil.copy(png, tmp_path / "x.png")
    table = covidxray.load_run(tiny_run).predict([tmp_path / "x.dcm", tmp_path / "x.png", tmp_path / "empty.png"])
    assert table["p_covid"].notna().tolist() == [True, True, False]
    assert "empty" in table["skipped"].iloc[2]
