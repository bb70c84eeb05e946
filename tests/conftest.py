"""Shared fixtures: small real image files, the synthetic sources, and ../shared/data when it is present."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("MPLBACKEND", "Agg")

from covidxray.tfenv import quiet_tensorflow  # noqa: E402

quiet_tensorflow()  # the test session is a program, like the command line: TensorFlow's start-up noise filtered

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


FULL_SUITE_ONLY: dict[str, str] = {
    "test_notebooks.py": "executes the four notebooks",
    "test_committed_outputs.py": "renders and benchmarks in copies of the repository",
    "test_bench.py": "runs the quick benchmarks",
    "test_scaling.py": "runs the scaling benchmark",
    "test_distribute.py": "starts real multi-worker clusters",
    "test_robustness.py": "the bad-input matrix, every row through every stage",
    "test_careless_user.py": "the careless-user matrix",
    "test_cli_conventions.py": "every verb's output conventions through real runs",
    "test_features.py": "the frozen-backbone cache against full VGG16 passes",
    "test_designs.py": "builds every design",
}
"""Test modules only the full suite runs (``make test``); ``make test-fast`` (``pytest -m "not slow"``) leaves them
out and still builds a dataset and trains a tiny model end to end (the ``tiny_run`` fixture)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of a :data:`FULL_SUITE_ONLY` module ``slow``."""
    for item in items:
        if item.path.name in FULL_SUITE_ONLY:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def _private_temp_folder(tmp_path_factory) -> Iterator[Path]:
    """The whole session's temporary files (``tempfile``, and ``TMPDIR`` for subprocesses) go to a folder of this
    session's own: no test reads or depends on the machine's shared temporary folder, which other processes use."""
    folder = tmp_path_factory.mktemp("tempdir")
    saved, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(folder), str(folder)
    yield folder
    tempfile.tempdir = saved
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env


def verb_parsers() -> dict:
    """The command line's verbs and their parsers, as the parser itself lists them (never a hard-coded list)."""
    import argparse

    from covidxray.app.cli import build_parser

    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


VERBS: list[str] = sorted(verb_parsers())
"""Every verb of the command line."""


def run_main(argv: list[str]) -> int:
    """``covidxray ARGV`` in-process: the exit status, whether ``main`` returns it or argparse exits."""
    from covidxray.app.cli import main

    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def run_quick_bench(mode: str | None, out: Path) -> None:
    """``python -m bench [--MODE] --quick --out OUT`` in a subprocess from the repository root; fails the test,
    showing the end of its stderr, when it exits non-zero."""
    args = [sys.executable, "-m", "bench", *([f"--{mode}"] if mode else []), "--quick", "--out", str(out)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def write_image(path: Path, *, mode: str = "L", size: tuple[int, int] = (96, 80), seed: int = 0,
                fmt: str | None = None, **save_kwargs) -> Path:
    """Write a small random-texture image in a given Pillow mode (not blank, so the build accepts it)."""
    rng = np.random.default_rng(seed)
    w, h = size
    gray = (rng.random((h, w)) * 200 + 20).astype(np.uint8)
    img = Image.fromarray(gray, mode="L")
    if mode == "I;16":
        img = Image.fromarray(gray.astype(np.uint16) * 16)
    elif mode != "L":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **save_kwargs)
    return path


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A real small file system (tmpfs of ``size``) mounted on ``folder`` for the block; the test is skipped
    where mounting is not allowed (not root)."""
    folder.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (to show a source is byte-identical after a run)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def fresh_clone(dst: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked, plus new files git does not ignore), with no
    ../shared beside them; a copy without .venv, runs and dataset contents where git is not available."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                 capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        listing = ""
    if not listing:
        ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.keras", "dataset-*",
                                        ".pytest_cache", ".ruff_cache")
        shutil.copytree(REPO, dst, ignore=ignore)
        for folder in ("dataset", "Chest_XRAY", "Covid_XRAY"):
            for entry in (dst / folder).iterdir():
                if entry.name != "README.md":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return dst
    for rel in filter(None, listing.split("\0")):
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    return dst


@pytest.fixture(scope="session")
def presplit(tmp_path_factory) -> Path:
    """A small pre-split source, train|test/Covid|Normal (generated once)."""
    root = tmp_path_factory.mktemp("presplit")
    for i, (split, cls, n) in enumerate([("train", "Covid", 8), ("train", "Normal", 8), ("test", "Covid", 3),
                                         ("test", "Normal", 3)]):
        for k in range(n):
            write_image(root / split / cls / f"{cls}{split}{k}.png", seed=1000 * i + k, size=(72, 64))
    return root


@pytest.fixture(scope="session")
def synthetic_sources(tmp_path_factory):
    """The package's embedded synthetic data set in the two real source layouts (generated once)."""
    from covidxray.data.synthetic import make_synthetic_sources

    return make_synthetic_sources(tmp_path_factory.mktemp("synthetic"), seed=0)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it are skipped elsewhere."""
    if not (SHARED_DATA / "seed-dataset" / "MANIFEST.csv").is_file():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, synthetic_sources) -> Path:
    """A dataset built from the synthetic sources (once per session)."""
    from covidxray.data.build import build_dataset

    out = tmp_path_factory.mktemp("tiny") / "dataset"
    build_dataset(out, chest_xray=synthetic_sources.chest_xray, covid_xray=synthetic_sources.covid_xray,
                  progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_dataset) -> Path:
    """A scratch-gap model trained for two epochs on 32 px images: fast, real, and enough for the plumbing."""
    from covidxray.runs.train import TrainConfig, train

    run = tmp_path_factory.mktemp("runs") / "scratch-gap"
    train(TrainConfig(model="scratch-gap", weights="none", epochs=2, image_size=32, batch_size=16, lr=1e-3),
          tiny_dataset, run, progress=False)
    return run
