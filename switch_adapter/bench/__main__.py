"""``python -m switch_adapter.bench``: the benchmark (same options as ``switch-adapter bench``)."""

import sys

from .cli import main

sys.exit(main())
