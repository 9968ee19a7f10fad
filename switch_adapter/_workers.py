"""How many threads the library's CPU work (conversions, merges) uses."""

from __future__ import annotations

import os

#: Most threads a conversion or a merge uses.
MAX_WORKERS = 4


def default_workers() -> int:
    """The CPUs this process may use, at most :data:`MAX_WORKERS`."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, available))
