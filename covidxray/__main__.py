"""``python -m covidxray`` runs the command line."""

import sys

from covidxray.app.cli import main

sys.exit(main())
