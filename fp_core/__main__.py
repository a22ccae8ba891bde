"""``python -m fp_core``: see :mod:`fp_core.cli`."""

import sys

from fp_core.cli import main

sys.exit(main())
