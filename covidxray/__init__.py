"""covidxray: COVID-19 vs normal chest X-ray classification, from public sources to honest metrics.

The pipeline reads top to bottom, one module per stage:
sources -> dataset build -> input pipeline -> models -> training -> evaluation -> explanation.
"""

__version__ = "0.1.0"

LABELS: tuple[str, str] = ("normal", "covid")
"""Class names in index order: 0 = normal, 1 = covid (the positive class)."""

from covidxray.tfenv import quiet_tensorflow  # noqa: E402

quiet_tensorflow()
