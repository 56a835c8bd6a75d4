"""``python -m benchmarks``: run the optimizer comparison (see :mod:`benchmarks.cli`)."""

import sys

from .cli import main

sys.exit(main())
