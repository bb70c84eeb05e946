"""covidxray: COVID-19 vs normal chest X-ray classification, from public sources to honest metrics.

The stage folders read as the pipeline: ``data`` (sources -> checked images -> patient-grouped split -> a dataset
folder), ``training`` (input pipeline, models, the training loop), ``runs`` (what a trained run is: its card, loading,
predicting), ``evaluation`` (metrics with uncertainty, baseline, shortcut probes, figures), ``explain`` (heatmaps and
their checks), ``studies`` (the results tables), ``app`` (command line, notebooks). Shared by all: ``errors``,
``outputs`` (artifacts: kinds, records, atomic writes), ``paths``, ``limits``, ``progress``, ``tfenv``.

The Python API (:mod:`covidxray.app.api`) is here at the top: ``covidxray.open(path)`` gives a run, a dataset or
another output as an object of its kind; ``covidxray.load_run`` and ``covidxray.load_dataset`` say what they expect.

Importing the package changes nothing in the host process: TensorFlow's log filtering
(:func:`covidxray.tfenv.quiet_tensorflow`) is switched on by the command line, the notebooks and the benchmark.
"""

__version__ = "0.1.0"

LABELS: tuple[str, str] = ("normal", "covid")
"""Class names in index order: 0 = normal, 1 = covid (the positive class)."""

_API = ("open", "load_run", "load_dataset", "Run", "Dataset", "Artifact", "Heatmaps")
"""Names of the Python API, loaded from :mod:`covidxray.app.api` on first use (so ``import covidxray`` stays light)."""


def __getattr__(name: str) -> object:
    if name in _API:
        from covidxray.app import api

        return getattr(api, name)
    raise AttributeError(f"module 'covidxray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
