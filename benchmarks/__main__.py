"""``python -m benchmarks``: the multi-task benchmark (``python -m benchmarks --help`` for the options)."""

import sys

from .cli import main

sys.exit(main())
