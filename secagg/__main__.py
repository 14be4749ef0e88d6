"""``python -m secagg``: the same command line as ``secagg``."""

import sys

from secagg.cli import main

sys.exit(main())
