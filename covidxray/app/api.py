"""The Python API: open what covidxray wrote and use it from your own code, in memory, without writing files.

``covidxray.open(path)`` reads an output folder's record and returns an object of its kind: a :class:`Run` (a
trained model with its threshold, input contract and card, which predicts and draws heatmaps), a :class:`Dataset`
(its manifest, splits, fingerprint and confounder summary), or an :class:`Artifact` for the other kinds
(evaluations, predictions, heatmaps, probes, ...). ``covidxray.load_run`` and ``covidxray.load_dataset`` say what
they expect. Nothing here changes the process: TensorFlow loads when a model is first needed.

>>> import covidxray
>>> run = covidxray.open(run_dir)  # a run folder, e.g. "runs/scratch-gap"
>>> run.kind, 0.0 <= run.threshold <= 1.0, run.image_size
('run', True, 32)
>>> dataset = covidxray.open(dataset_dir)  # a dataset folder, e.g. "dataset"
>>> table = run.predict(dataset.split("test")["filepath"][:4])
>>> list(table.columns[:3]), len(table)
(['path', 'p_covid', 'pred'], 4)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidxray import LABELS
from covidxray.data.images import DEFAULT_MAX_PIXELS
from covidxray.data.manifest import MANIFEST_NAME, dataset_provenance, dataset_summary, read_manifest, split_frame
from covidxray.errors import DataError
from covidxray.outputs import KINDS, RECORD_NAME, artifact, describe

ImageInput = str | Path | Sequence[str | Path] | pd.DataFrame | np.ndarray | Sequence[np.ndarray]
"""What :meth:`Run.predict` and :meth:`Run.heatmaps` take: image files, folders (searched recursively) and CSV lists
(a ``path`` column), a DataFrame with a ``path`` or ``filepath`` column, or pixel arrays (see
:func:`covidxray.training.pipeline.arrays_to_model_input`). Files are checked and decoded as the build does:
DICOM, 16-bit, CMYK and EXIF-rotated files included."""


@dataclass(frozen=True, eq=False)
class Artifact:
    """An output folder covidxray wrote: its kind, who wrote it and from which data (its record)."""

    path: Path
    record: dict[str, Any] = field(repr=False)

    @property
    def kind(self) -> str:
        """``dataset``, ``run``, ``evaluation``, ``predictions``, ``heatmaps``, ``probes``, ... (see outputs.KINDS)."""
        return self.record["kind"]

    @property
    def command(self) -> str:
        """The command line (or call) that wrote it."""
        return " ".join(self.record.get("command") or [])

    @property
    def data(self) -> dict[str, Any] | None:
        """The data it came from: fingerprint, whether it is the embedded synthetic set, where it was."""
        return self.record.get("data")

    @property
    def synthetic(self) -> bool:
        """True when it was made from the embedded synthetic data set (say so wherever you show its numbers)."""
        return bool((self.data or {}).get("synthetic"))

    @property
    def files(self) -> list[str]:
        """The files it holds, relative to its folder."""
        return sorted(self.record.get("files") or {})

    def __str__(self) -> str:
        return f"{self.path}: {describe(self.record)}"


@dataclass(frozen=True, eq=False)
class Dataset(Artifact):
    """A built dataset: the manifest, its splits, its fingerprint and the confounder checks of its build.

    >>> dataset = covidxray.load_dataset(dataset_dir)
    >>> sorted(dataset.manifest["split"].unique())
    ['test', 'train', 'val']
    >>> len(dataset.split("TEST")) == len(dataset.split("test")) > 0
    True
    >>> len(dataset.fingerprint), dataset.synthetic
    (16, True)
    """

    @cached_property
    def manifest(self) -> pd.DataFrame:
        """One row per image (see covidxray.data.manifest), with an absolute ``filepath`` and ``y`` (1 = covid)."""
        return read_manifest(self.path)

    def split(self, name: str) -> pd.DataFrame:
        """The rows of one split (``train``, ``val`` or ``test``, any case)."""
        return split_frame(self.manifest, name)

    @cached_property
    def summary(self) -> dict[str, Any]:
        """The build's ``summary.json``: counts, leakage checks, design, confounders."""
        return dataset_summary(self.path)

    @property
    def fingerprint(self) -> str:
        """The manifest's fingerprint, as runs record it."""
        return str(dataset_provenance(self.path)["fingerprint"])

    @property
    def synthetic(self) -> bool:
        """True when built from the embedded synthetic data set."""
        return bool(dataset_provenance(self.path)["synthetic"])

    @property
    def confounders(self) -> dict[str, Any]:
        """How the classes differ besides the disease (source, age, format, view, ...) and the warnings.

        >>> isinstance(covidxray.load_dataset(dataset_dir).confounders.get("warnings"), list)
        True
        """
        return dict(self.summary.get("confounders") or {})


@dataclass
class Heatmaps:
    """Heatmaps of a run for some images, in memory: the model inputs, the maps in [0, 1], the probabilities."""

    images: np.ndarray
    """(n, s, s, 3) float32: what the model saw."""
    maps: np.ndarray
    """(n, s, s) float32 in [0, 1], each normalised to its own maximum."""
    probabilities: np.ndarray
    """(n,) P(covid)."""
    method: str
    """cam, gradcam or gradcam++."""
    layer: str
    """The convolutional layer explained."""
    names: list[str]
    """One name per image (its path, or ``image N`` for arrays)."""

    def figure(self, index: int) -> Any:
        """Image ``index`` with its heatmap over it, as a matplotlib Figure (show it, or save it yourself)."""
        from covidxray.explain.maps import overlay_figure

        return overlay_figure(self.images[index], self.maps[index],
                              title=f"{self.names[index]} ({self.method}): p(covid) = {self.probabilities[index]:.2f}")


@dataclass(frozen=True, eq=False)
class Run(Artifact):
    """A trained run (or a bare ``.keras`` file): the model, its threshold, its input contract and card.

    >>> run = covidxray.load_run(run_dir)
    >>> run.card["decision"]["threshold"] == run.threshold
    True
    >>> maps = run.heatmaps(covidxray.load_dataset(dataset_dir).split("test")["filepath"][:2])
    >>> maps.maps.shape, maps.method
    ((2, 32, 32), 'cam')
    """

    model_file: Path = field(default=Path(), repr=False)

    @cached_property
    def _loaded(self) -> tuple[Any, dict[str, Any]]:
        from covidxray.runs.load import load_run as load

        return load(self.model_file if self.model_file != Path() else self.path)

    @property
    def model(self) -> Any:
        """The Keras model (loaded in safe mode on first use)."""
        return self._loaded[0]

    @property
    def meta(self) -> dict[str, Any]:
        """What loading found: threshold and where it came from, image size, model id, config, precision."""
        return self._loaded[1]

    @property
    def threshold(self) -> float:
        """The decision threshold chosen on the validation split: covid when p_covid >= threshold."""
        return float(self.meta["threshold"])

    @property
    def image_size(self) -> int:
        """The square input size, in pixels."""
        return int(self.meta["image_size"])

    @property
    def card(self) -> dict[str, Any] | None:
        """The model card (``model.json``): intended use, input contract, decision, training data, evaluations."""
        return self.meta["card"]

    @property
    def model_id(self) -> str:
        """``name@sha256-prefix``: which model file exactly."""
        return str(self.meta["model_id"])

    def predict(self, images: ImageInput, *, batch_size: int = 32,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> pd.DataFrame:
        """P(covid) and the decision for each image, as a DataFrame in memory (nothing is written).

        Columns as ``covidxray predict`` writes them (path, p_covid, pred, threshold, model, model_data, skipped,
        heatmap); a file that cannot be used has an empty p_covid and the reason in ``skipped``. A DataFrame's own
        columns are kept beside them. Arrays: ``path`` is ``image N``.

        >>> pixels = np.full((1, 80, 64), 128, dtype=np.uint8)
        >>> row = covidxray.load_run(run_dir).predict(pixels).iloc[0]
        >>> row["path"], bool(0.0 <= row["p_covid"] <= 1.0), row["pred"] in ("normal", "covid")
        ('image 0', True, True)
        """
        from covidxray.app.predict import COLUMNS, collect_inputs, model_data_word, predict_entries

        if _is_arrays(images):
            from covidxray.runs.load import predict_proba
            from covidxray.training.pipeline import arrays_to_model_input

            probs = predict_proba(self.model, arrays_to_model_input(images, self.image_size), batch_size)
            word = model_data_word(self.meta)
            rows = [{"path": f"image {i}", "p_covid": round(float(p), 6), "pred": LABELS[int(p >= self.threshold)],
                     "threshold": self.threshold, "model": self.model_id, "model_data": word, "skipped": "",
                     "heatmap": ""} for i, p in enumerate(probs)]
            return pd.DataFrame(rows, columns=COLUMNS)
        paths, extra = _paths(images)
        table = predict_entries(self.model, self.meta, collect_inputs(paths), batch_size=batch_size,
                                max_pixels=max_pixels, fix="Give image files, folders, a CSV or arrays.")
        if extra is not None and len(extra) == len(table):
            table = pd.concat([table, extra.drop(columns=[c for c in extra.columns if c in table.columns])
                               .reset_index(drop=True)], axis=1)
        return table

    def heatmaps(self, images: ImageInput, *, method: str = "auto", layer: str | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Heatmaps:
        """Heatmaps for the given images, in memory (``method``: auto, cam, gradcam, gradcam++; auto is CAM
        where the model has a global-average-pooling head). Files that cannot be used are left out."""
        from covidxray.data.labeled_sets import LabeledSet, decodable
        from covidxray.explain.maps import heatmaps, resolve_method
        from covidxray.runs.load import predict_proba
        from covidxray.training.pipeline import arrays_to_model_input, load_images

        method, layer = resolve_method(self.model, method, layer)
        if _is_arrays(images):
            x = arrays_to_model_input(images, self.image_size)
            names = [f"image {i}" for i in range(len(x))]
        else:
            paths, _ = _paths(images)
            labeled = LabeledSet(pd.DataFrame({"filepath": [str(p) for p in paths], "y": 0}), kind="files",
                                 max_pixels=max_pixels)
            with decodable(labeled, check=True, fix="Give image files or arrays.") as usable:
                x = load_images(usable.frame["filepath"].tolist(), self.image_size)
                names = usable.frame["path"].astype(str).tolist()
        maps = heatmaps(self.model, x, method=method, layer=layer)
        return Heatmaps(images=x, maps=np.asarray(maps, np.float32), probabilities=predict_proba(self.model, x),
                        method=method, layer=str(layer), names=names)


def _is_arrays(images: object) -> bool:
    if isinstance(images, np.ndarray):
        return images.dtype != object
    return isinstance(images, (list, tuple)) and bool(images) and all(isinstance(i, np.ndarray) for i in images)


def _paths(images: ImageInput) -> tuple[list[str | Path], pd.DataFrame | None]:
    """The paths to read, and the caller's DataFrame (its columns are kept beside the predictions)."""
    if isinstance(images, pd.DataFrame):
        column = next((c for c in ("path", "filepath") if c in images.columns), None)
        if column is None:
            raise DataError("the DataFrame has no 'path' or 'filepath' column; name the image files there.")
        return images[column].astype(str).tolist(), images
    if isinstance(images, pd.Series):
        return images.astype(str).tolist(), None
    if isinstance(images, (str, Path)):
        return [images], None
    return list(images), None  # type: ignore[arg-type]


def open(path: str | Path) -> Artifact:  # noqa: A001 - covidxray.open reads like the built-in, for folders
    """The output at ``path`` as an object of its kind: :class:`Run`, :class:`Dataset` or :class:`Artifact`.

    A folder is known by its record (``.covidxray.json``); a folder an older version wrote, without one, by its
    files (``model.keras``: a run; ``manifest.csv``: a dataset); a ``.keras`` file is a run.

    >>> covidxray.open(dataset_dir).kind
    'dataset'
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".keras":
        return Run(path=path.parent, record=_guess(path.parent, "run"), model_file=path)
    if not path.is_dir():
        raise DataError(f"{path}: no such folder or .keras file; give an output folder covidxray wrote.")
    record = artifact(path)
    if record is None and (path / "model.keras").is_file():
        record = _guess(path, "run")
    elif record is None and (path / MANIFEST_NAME).is_file():
        record = _guess(path, "dataset")
    if record is None:
        raise DataError(f"{path}: not an output covidxray wrote (no {RECORD_NAME}, no model.keras, no "
                        f"{MANIFEST_NAME}); give a run, a dataset or another output folder.")
    kind = record["kind"]
    if kind == "run":
        return Run(path=path, record=record, model_file=path / "model.keras")
    if kind == "dataset":
        return Dataset(path=path, record=record)
    return Artifact(path=path, record=record)


def load_run(path: str | Path) -> Run:
    """The run (or ``.keras`` file) at ``path``; a DataError naming what it is when it is not a run.

    >>> covidxray.load_run(run_dir).model_id.startswith(Path(run_dir).name + "@")
    True
    """
    found = open(path)
    if not isinstance(found, Run):
        raise DataError(f"{found}; load_run needs a run folder or a .keras file (covidxray.open reads any kind).")
    return found


def load_dataset(path: str | Path) -> Dataset:
    """The built dataset at ``path``; a DataError naming what it is when it is not a dataset.

    >>> covidxray.load_dataset(dataset_dir).manifest.columns[0]
    'path'
    """
    found = open(path)
    if not isinstance(found, Dataset):
        raise DataError(f"{found}; load_dataset needs a dataset folder (covidxray.open reads any kind).")
    return found


def _guess(folder: Path, kind: str) -> dict[str, Any]:
    """A stand-in record for an output written before records named their kind."""
    return {"kind": kind, "verb": KINDS[kind].verbs[0], "command": [], "files": {}, "children": [], "data": None}
