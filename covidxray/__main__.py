"""``python -m covidxray`` runs the command line."""

import sys

from covidxray.cli import main

sys.exit(main())
