"""covidxray: COVID-19 vs normal chest X-ray classification, from public sources to honest metrics.

The stage folders read as the pipeline: ``data`` (sources -> checked images -> patient-grouped split -> a dataset
folder), ``training`` (input pipeline, models, the training loop), ``runs`` (what a trained run is: its card, loading,
predicting), ``evaluation`` (metrics with uncertainty, baseline, shortcut probes, figures), ``explain`` (heatmaps and
their checks), ``studies`` (the results tables), ``app`` (command line, notebooks). Shared by all: ``errors``,
``outputs`` (artifacts: kinds, records, atomic writes), ``paths``, ``limits``, ``progress``, ``tfenv``.

Importing the package changes nothing in the host process: TensorFlow's log filtering
(:func:`covidxray.tfenv.quiet_tensorflow`) is switched on by the command line, the notebooks and the benchmark.
"""

__version__ = "0.1.0"

LABELS: tuple[str, str] = ("normal", "covid")
"""Class names in index order: 0 = normal, 1 = covid (the positive class)."""
