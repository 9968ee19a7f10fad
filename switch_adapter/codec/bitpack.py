"""Vectorised bit packing of bool tensors (LSB first within each byte), on any device."""

from __future__ import annotations

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
    bits = torch.bitwise_right_shift(packed.reshape(-1, 1), _shifts(packed.device)) & 1
    return bits.reshape(-1)[:count].bool()
