"""``python -m cvsparse`` runs the command line."""

import sys

from cvsparse.cli import main

sys.exit(main())
