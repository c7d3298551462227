"""`python -m crossmodalseg ...`: the command line, as the `crossmodalseg` script."""

import sys

from .cli import main

sys.exit(main())
