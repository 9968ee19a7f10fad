"""Optional numba kernels of the codec: decoding a blob into compact arrays and adding kept entries into a weight.

The kernels live in :mod:`switch_adapter.codec._numba_codec` and are used when numba is installed (``pip install
switch-adapter[fast]``) for CPU tensors; everything else (other devices, dtypes, no numba, or
``SWITCH_ADAPTER_KERNELS=torch``) runs the numpy/torch reference, which gives bit-identical results.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType

import torch

from .._jit import load_kernels


@lru_cache(maxsize=1)
def numba_codec() -> ModuleType | None:
    """The compiled codec kernels, or None when numba is missing or disabled (clear the cache to re-read)."""
    return load_kernels(f"{__package__}._numba_codec")


def fast_codec_available() -> bool:
    """True when the numba codec kernels are used for CPU tensors."""
    return numba_codec() is not None


def add_kept_values(
    flat: torch.Tensor, positions: torch.Tensor, multipliers: torch.Tensor, scale: torch.Tensor, alpha: float
) -> None:
    """In place, ``flat[p] += alpha * multiplier * scale`` at the kept ``positions`` of a flat weight (a per-row
    ``scale`` indexed by the entry's row): :func:`~switch_adapter.format.kept_values` + ``index_add_``, bit for bit,
    with one fused pass when the numba kernels apply (float32/float64 contiguous CPU tensors)."""
    kernels = numba_codec()
    if (
        kernels is not None
        and flat.device.type == "cpu"
        and flat.dtype in (torch.float32, torch.float64)
        and flat.is_contiguous()
        and positions.device.type == "cpu"
        and multipliers.device.type == "cpu"
        and not multipliers.is_floating_point()
    ):
        scales = scale.detach().to(device="cpu", dtype=flat.dtype).reshape(-1).contiguous().numpy()
        chunk = max(flat.numel() // scales.shape[0], 1)
        array = flat.numpy()
        kernels.add_kept(array, positions.contiguous().numpy(), multipliers.contiguous().numpy(), scales, chunk,
                         array.dtype.type(alpha))  # fmt: skip
        return
    from ..format import kept_values

    values = kept_values(positions, multipliers, scale, flat.numel(), flat.dtype)
    flat.index_add_(0, positions.to(flat.device), values.to(flat.device), alpha=float(alpha))


__all__ = ["add_kept_values", "fast_codec_available", "numba_codec"]
