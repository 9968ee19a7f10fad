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
