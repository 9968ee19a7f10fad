"""How many threads the library's CPU work (conversions, merges) uses."""

from __future__ import annotations

import torch

#: Most threads a conversion or a merge uses.
MAX_WORKERS = 4


def default_workers() -> int:
    """``torch.get_num_threads()`` (what ``torch.set_num_threads`` or ``OMP_NUM_THREADS`` set; by default the
    machine's cores), at most :data:`MAX_WORKERS`."""
    return max(1, min(MAX_WORKERS, torch.get_num_threads()))
