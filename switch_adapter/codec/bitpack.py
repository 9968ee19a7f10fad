"""Vectorised bit packing of bool tensors (LSB first within each byte): numpy on the CPU, torch elsewhere."""

from __future__ import annotations

import numpy as np
import torch

_SHIFTS_CACHE: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    shifts = _SHIFTS_CACHE.get(device)
    if shifts is None:
        shifts = torch.arange(8, dtype=torch.uint8, device=device)
        _SHIFTS_CACHE[device] = shifts
    return shifts


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a flat bool tensor into ``ceil(n / 8)`` uint8 bytes; bit ``i`` lands in byte ``i // 8``, bit ``i % 8``."""
    if bits.device.type == "cpu":
        flat = bits.reshape(-1).to(torch.bool).numpy()
        return torch.from_numpy(np.packbits(flat, bitorder="little"))
    bits = bits.reshape(-1).to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = torch.bitwise_left_shift(torch.ones((), dtype=torch.uint8, device=bits.device), _shifts(bits.device))
    return (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8) if bits.numel() else bits.new_zeros(0)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits of ``packed`` as a flat bool tensor."""
    if count == 0:
        return torch.zeros(0, dtype=torch.bool, device=packed.device)
    if packed.device.type == "cpu":
        bits = np.unpackbits(packed.reshape(-1).numpy(), count=count, bitorder="little")
        return torch.from_numpy(bits.view(np.bool_))
    bits = torch.bitwise_right_shift(packed.reshape(-1, 1), _shifts(packed.device)) & 1
    return bits.reshape(-1)[:count].bool()


def pack_fields(values: torch.Tensor, width: int) -> torch.Tensor:
    """Flat bool stream of ``width``-bit fields, LSB first, one per entry of the non-negative integer ``values``.

    Shifts run in the dtype of ``values`` (uint8 levels stay one byte per bit), so ``width`` must not exceed its
    bit size. Entries wider than ``width`` bits lose their high bits; callers check ranges first.
    """
    values = values.reshape(-1)
    if width == 0 or values.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=values.device)
    shifts = torch.arange(width, dtype=values.dtype, device=values.device)
    return ((values.unsqueeze(1) >> shifts) & 1).to(torch.bool).reshape(-1)


def unpack_fields(bits: torch.Tensor, count: int, width: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_fields`: ``count`` fields of ``width`` bits from the bool stream ``bits`` (exactly
    ``count * width`` long), as ``dtype`` integers."""
    if count == 0 or width == 0:
        return torch.zeros(count, dtype=dtype, device=bits.device)
    shifts = torch.arange(width, dtype=dtype, device=bits.device)
    return (bits.reshape(count, width).to(dtype) << shifts).sum(dim=1, dtype=dtype)
