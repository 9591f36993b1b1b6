"""``python -m benchmarks``: run a benchmark suite (see benchmarks/README.md)."""

import sys

from . import main

sys.exit(main())
