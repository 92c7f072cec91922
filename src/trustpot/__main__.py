"""``python -m trustpot`` runs the command line."""

import sys

from trustpot.cli.main import main

sys.exit(main())
