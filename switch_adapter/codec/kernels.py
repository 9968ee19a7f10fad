"""Optional numba kernels of the codec: decoding a blob into compact arrays and adding kept entries into a weight.

The kernels live in :mod:`switch_adapter.codec._numba_codec` and are used when numba is installed (``pip install
switch-adapter[fast]``) for CPU tensors; everything else (other devices, dtypes, no numba, or
``SWITCH_ADAPTER_KERNELS=torch``) runs the numpy/torch reference, which gives bit-identical results.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .._jit import load_kernels


@lru_cache(maxsize=1)
def numba_codec() -> ModuleType | None:
    """The compiled codec kernels, or None when numba is missing or disabled (clear the cache to re-read)."""
    return load_kernels(f"{__package__}._numba_codec")


def fast_codec_available() -> bool:
    """True when the numba codec kernels are used for CPU tensors."""
    return numba_codec() is not None


def adds_in_kernel(flat: torch.Tensor) -> bool:
    """Whether the numba kernels can add kept entries into ``flat``: a contiguous float32/float64 CPU tensor."""
    return flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64) and flat.is_contiguous()


def add_arguments(flat: torch.Tensor, scale: torch.Tensor, alpha: float) -> tuple[np.ndarray, np.ndarray, int, Any]:
    """``(flat, scales, chunk, alpha)`` as the numba add kernels take them: numpy views, the scales in ``flat``'s
    dtype, the positions per scale (one scale, or one per row) and ``alpha`` in ``flat``'s dtype."""
    scales = scale.detach().to(device="cpu", dtype=flat.dtype).reshape(-1).contiguous().numpy()
    array = flat.numpy()
    return array, scales, max(flat.numel() // scales.shape[0], 1), array.dtype.type(alpha)


def add_kept_values(
    flat: torch.Tensor, positions: torch.Tensor, multipliers: torch.Tensor, scale: torch.Tensor, alpha: float
) -> None:
    """In place, ``flat[p] += alpha * multiplier * scale`` at the kept ``positions`` of a flat weight (a per-row
    ``scale`` indexed by the entry's row): :func:`~switch_adapter.format.kept_values` + ``index_add_``, bit for bit,
    with one fused pass when the numba kernels apply (float32/float64 contiguous CPU tensors)."""
    kernels = numba_codec()
    if (
        kernels is not None
        and adds_in_kernel(flat)
        and positions.device.type == "cpu"
        and multipliers.device.type == "cpu"
        and not multipliers.is_floating_point()
    ):
        array, scales, chunk, factor = add_arguments(flat, scale, alpha)
        kernels.add_kept(array, positions.contiguous().numpy(), multipliers.contiguous().numpy(), scales, chunk, factor)
        return
    from ..format import kept_values

    values = kept_values(positions, multipliers, scale, flat.numel(), flat.dtype)
    flat.index_add_(0, positions.to(flat.device), values.to(flat.device), alpha=float(alpha))


__all__ = ["add_kept_values", "fast_codec_available", "numba_codec"]
