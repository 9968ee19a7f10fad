"""Optional compiled kernels: one place that decides whether numba kernels are used.

The numba kernels (``pip install switch-adapter[fast]``) are an optional speed-up; every caller keeps a pure
numpy/torch path that computes the same result. ``SWITCH_ADAPTER_KERNELS=torch`` forces those paths everywhere.
Callers cache :func:`load_kernels` (e.g. with ``functools.lru_cache``) and clear that cache to re-read the setting.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

logger = logging.getLogger(__name__)

#: Environment variable that selects the kernels; ``torch`` disables every numba kernel.
KERNELS_ENV = "SWITCH_ADAPTER_KERNELS"


def load_kernels(module: str) -> ModuleType | None:
    """The numba kernel module ``module`` (a dotted name), or None when numba is missing or disabled by
    ``SWITCH_ADAPTER_KERNELS=torch``."""
    if os.environ.get(KERNELS_ENV, "").lower() == "torch":
        return None
    try:
        kernels = importlib.import_module(module)
    except ImportError:
        logger.debug("numba is not installed: %s falls back to numpy/torch ops.", module)
        return None
    _start_numba_threads()
    return kernels


def _start_numba_threads() -> None:
    """Start numba's thread pool now, keeping torch's thread count: starting its OpenMP layer (on the first parallel
    kernel otherwise) resets ``torch.get_num_threads()`` to the default, undoing a ``torch.set_num_threads`` the
    user made."""
    import numba
    import torch

    threads = torch.get_num_threads()
    numba.get_num_threads()  # starts the pool once per process
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
