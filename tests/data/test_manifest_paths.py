"""A dataset's manifest.csv names only files inside the dataset folder: a dataset cannot make the tool read any
image on disk. A user's own CSV list given to evaluate or predict may still name any file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_image

from covidxray.app.cli import main
from covidxray.data.labeled_sets import read_labeled
from covidxray.data.manifest import read_manifest
from covidxray.errors import DataError


@pytest.fixture
def dataset(tiny_dataset: Path, tmp_path: Path) -> Path:
    """A copy of the tiny dataset that a test may change."""
    return Path(shutil.copytree(tiny_dataset, tmp_path / "dataset"))


def _set_path(dataset: Path, row: int, value: str) -> None:
    manifest = pd.read_csv(dataset / "manifest.csv", dtype=str, keep_default_na=False)
    manifest.loc[row, "path"] = value
    manifest.to_csv(dataset / "manifest.csv", index=False)


@pytest.mark.parametrize("kind", ["absolute", "dot-dot", "symlinked file", "symlinked folder"])
def test_a_manifest_path_leaving_the_dataset_is_refused(dataset: Path, tiny_run: Path, tmp_path: Path, kind: str,
                                                        capsys: pytest.CaptureFixture) -> None:
    outside = write_image(tmp_path / "elsewhere" / "secret.png", size=(64, 64))
    manifest = pd.read_csv(dataset / "manifest.csv", dtype=str, keep_default_na=False)
    row = int(manifest.index[manifest["split"] == "test"][0])
    rel = manifest.loc[row, "path"]
    if kind == "absolute":
        _set_path(dataset, row, str(outside))
        why = "an absolute path"
    elif kind == "dot-dot":
        _set_path(dataset, row, "../elsewhere/secret.png")
        why = "a path with '..'"
    elif kind == "symlinked file":
        (dataset / rel).unlink()
        os.symlink(outside, dataset / rel)
        why = "a symbolic link that resolves outside the dataset folder"
    else:
        folder = (dataset / rel).parent
        shutil.rmtree(folder)
        shutil.copytree(outside.parent, tmp_path / "other-folder")
        os.symlink(tmp_path / "other-folder", folder)
        why = "a symbolic link that resolves outside the dataset folder"
    with pytest.raises(DataError, match=rf"manifest\.csv, line {row + 2}: path .* is {why}; a dataset's images lie "
                                        r"inside its folder"):
        read_manifest(dataset)
    out = tmp_path / "eval"
    assert main(["evaluate", "--quiet", "--model", str(tiny_run), "--data", str(dataset), "--out", str(out)]) == 1
    assert f"manifest.csv, line {row + 2}: path" in capsys.readouterr().err
    assert not out.exists()


def test_a_manifest_inside_its_folder_is_read(dataset: Path) -> None:
    frame = read_manifest(dataset)
    assert all(Path(f).is_file() and Path(f).resolve().is_relative_to(dataset.resolve()) for f in frame["filepath"])


def test_a_users_csv_may_still_name_any_file(tmp_path: Path) -> None:
    image = write_image(tmp_path / "elsewhere" / "x.png", size=(64, 64))
    other = write_image(tmp_path / "elsewhere" / "y.png", size=(64, 64), seed=1)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "mine.csv").write_text(f"path,label\n{image},covid\n../elsewhere/y.png,normal\n",
                                                 encoding="utf-8")
    labeled = read_labeled(tmp_path / "lists" / "mine.csv", split=None)
    assert labeled.kind == "csv" and labeled.skipped == []
    assert sorted(Path(f).resolve() for f in labeled.frame["filepath"]) == [image.resolve(), other.resolve()]
