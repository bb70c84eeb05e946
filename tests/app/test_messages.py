"""Messages that name only what the user can do: the flags the verb has, the file and column at fault."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import keras
import pandas as pd
import pytest
from conftest import write_image

from covidxray.app.cli import build_parser, main
from covidxray.data.sources.ieee8023 import read_ieee8023, read_metadata
from covidxray.errors import DataError

SIZE = 32


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` pixels (no pixel data: nothing huge is written)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def _verb_flags(verb: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    return {flag for action in sub.choices[verb]._actions for flag in action.option_strings}


def _save(model: keras.Model, folder: Path) -> Path:
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    return folder


def _error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------- --max-pixels


def test_predict_on_a_60000_px_png_names_no_flag_predict_lacks(tiny_run: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """Before: "... raise --max-pixels", a flag predict did not have (and no --max-pixels opens such a file)."""
    huge = _png_header_only(tmp_path / "huge.png", 60000, 60000)
    assert main(["predict", "--quiet", "--model", str(tiny_run), str(huge), "--out", str(tmp_path / "out")]) == 1
    err = _error_line(capsys)
    assert "huge.png: too large to decode safely" in err and "downscale the file" in err
    assert "--max-pixels" not in err


def test_predict_has_the_max_pixels_flag_its_skip_reason_names(tiny_run: Path, tmp_path: Path) -> None:
    image = write_image(tmp_path / "x.png", size=(64, 64))
    small = write_image(tmp_path / "y.png", size=(40, 40))
    out = tmp_path / "out"
    assert main(["predict", "--quiet", "--model", str(tiny_run), str(image), str(small), "--out", str(out),
                 "--max-pixels", "2000"]) == 0
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False).set_index("path")
    assert table.loc[str(image), "skipped"] == "64x64 pixels is over the limit of 2000; raise --max-pixels"
    assert table.loc[str(small), "skipped"] == ""
    for verb in ("data", "predict", "evaluate", "cam", "reproduce", "demo"):  # every verb that reads source images
        assert "--max-pixels" in _verb_flags(verb), verb
    assert main(["predict", "--quiet", "--model", str(tiny_run), str(image), "--out", str(out),
                 "--max-pixels", "5000000"]) == 0
    assert pd.read_csv(out / "predictions.csv", keep_default_na=False)["skipped"].tolist() == [""]


def test_reproduce_passes_max_pixels_to_its_build(presplit: Path, tmp_path: Path, capsys) -> None:
    """The fixture's images are over 1024 pixels: with that limit the build skips every one (the fixture builds
    with the default limit in other tests)."""
    code = main(["reproduce", "--presplit", str(presplit), "--max-pixels", "1024", "--out", str(tmp_path / "r"),
                 "--epochs", "1", "--image-size", "32", "--weights", "none", "--quiet"])
    assert code == 1 and "all its files were rejected" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- --cam auto


def _flat() -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 3))
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inputs)))


def _nested_conv() -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 3))
    features = keras.Sequential([keras.layers.Conv2D(2, 3), keras.layers.GlobalAveragePooling2D()],
                                name="features")(inputs)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(features))


@pytest.mark.parametrize(("kind", "why"), [
    ("no conv", "it has no conv layer to explain; no top-level layer has a 4-D output"),
    ("nested conv", "inside the nested model(s) ['features'], which are not searched"),
])
def test_predict_cam_auto_without_a_top_level_conv_says_what_predict_can_do(
        tmp_path: Path, capsys: pytest.CaptureFixture, kind: str, why: str) -> None:
    """Before: "... build the model flat or pass the layer name" (predict has no layer flag)."""
    run = _save(_flat() if kind == "no conv" else _nested_conv(), tmp_path / "run")
    image = write_image(tmp_path / "x.png", size=(64, 64))
    assert main(["predict", "--quiet", "--model", str(run), str(image), "--out", str(tmp_path / "out"),
                 "--cam", "auto"]) == 1
    err = _error_line(capsys)
    assert "has no top-level Conv2D layer with a 4-D output" in err and why in err
    assert "leave out --cam auto to get the predictions alone" in err and "covidxray cam --model" in err
    assert "pass the layer name" not in err and "layer=" not in err
    assert {"--cam"} <= _verb_flags("predict") and "--layer" not in _verb_flags("predict")
    assert "--layer" in _verb_flags("cam")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- metadata.csv


def test_a_duplicated_metadata_column_is_named(tmp_path: Path) -> None:
    (tmp_path / "metadata.csv").write_text("patientid,finding,view,filename,finding\n1,COVID-19,PA,a.jpeg,\n",
                                           encoding="utf-8")
    with pytest.raises(DataError, match=r"metadata\.csv: the header names column\(s\) \['finding'\] more than "
                                        r"once; .*'finding\.1'.*Delete or rename the extra column"):
        read_metadata(tmp_path / "metadata.csv")
    with pytest.raises(DataError, match=r"\['finding'\] more than once"):
        read_ieee8023(tmp_path)


def test_data_with_a_duplicated_finding_column_names_it(synthetic_sources, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """Before: "no covid images left (the sources hold none)"."""
    covid = Path(shutil.copytree(synthetic_sources.covid_xray, tmp_path / "covid"))
    meta = covid / "metadata.csv"
    lines = meta.read_text(encoding="utf-8").splitlines()
    meta.write_text("\n".join([lines[0] + ",finding", *(line + "," for line in lines[1:])]) + "\n", encoding="utf-8")
    out = tmp_path / "dataset"
    assert main(["data", "--quiet", "--chest-xray", str(synthetic_sources.chest_xray), "--covid-xray", str(covid),
                 "--out", str(out)]) == 1
    err = _error_line(capsys)
    assert "metadata.csv: the header names column(s) ['finding'] more than once" in err
    assert "no covid images left" not in err and not out.exists()


# ---------------------------------------------------------------------------------------------- empty paths


def _path_flags() -> list[tuple[str, str]]:
    """(verb, flag) of every path option of every verb (``type`` given as a path)."""
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    return [(verb, action.option_strings[0] if action.option_strings else action.metavar or action.dest)
            for verb, parser in sub.choices.items() for action in parser._actions
            if getattr(action.type, "__name__", "") == "_path"]


def test_every_path_flag_is_checked_for_emptiness() -> None:
    flags = _path_flags()
    assert ("data", "--out") in flags and ("predict", "--model") in flags and ("predict", "INPUT") in flags
    assert ("evaluate", "--data") in flags and ("download", "--kermany-zip") in flags


@pytest.mark.parametrize(("argv", "flag"), [
    (["data", "--out", ""], "--out"),
    (["train", "--data", ""], "--data"),
    (["evaluate", "--model", "run", "--out", ""], "--out"),
    (["predict", "--model", "run", "x.png", "--out", ""], "--out"),
    (["predict", "--model", "run", "", "--out", "o"], "INPUT"),
    (["cam", "--model", "", "--out", "o"], "--model"),
])
def test_an_empty_path_is_a_usage_error_naming_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture, argv: list[str],
                                                        flag: str) -> None:
    """Before: ``--out ""`` wrote into the current folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: '' is an empty path" in err
    assert list(tmp_path.iterdir()) == []
