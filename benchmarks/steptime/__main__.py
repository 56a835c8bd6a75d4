"""``python -m benchmarks.steptime``: run the step-time benchmark (see :mod:`benchmarks.steptime.cli`)."""

import sys

from .cli import main

sys.exit(main())
