"""In-memory ternary form of a switch: 2 bits per position (0: dropped, 1: +1, 2: -1), 4 positions per byte.

This is the working form a layer keeps after decoding a switch from its on-disk encoding: a fixed 2 bits per
parameter (1/16 of fp32), turned into a dense {-1, 0, +1} tensor with a single table lookup.
"""

from __future__ import annotations

import torch

_LUT_CACHE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def pack_ternary(mask: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Pack a flat keep-mask (n,) and the signs of the kept entries (k,) into ``ceil(n / 4)`` bytes."""
    mask = mask.reshape(-1)
    codes = torch.zeros(mask.numel(), dtype=torch.uint8, device=mask.device)
    codes[mask] = torch.where(positive.reshape(-1).to(mask.device), 1, 2).to(torch.uint8)
    pad = (-codes.numel()) % 4
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    codes = codes.view(-1, 4)
    return codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)


def _lookup_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (device, dtype)
    table = _LUT_CACHE.get(key)
    if table is None:
        byte = torch.arange(256, dtype=torch.int64)
        codes = torch.stack([(byte >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1)
        values = torch.zeros(256, 4, dtype=torch.float32)
        values[codes == 1] = 1.0
        values[codes == 2] = -1.0
        table = values.to(device=device, dtype=dtype)
        _LUT_CACHE[key] = table
    return table


def unpack_ternary(packed: torch.Tensor, count: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense flat tensor of ``count`` values in {-1, 0, +1} and ``dtype``, on the device of ``packed``."""
    table = _lookup_table(packed.device, dtype)
    return torch.nn.functional.embedding(packed.long(), table).reshape(-1)[:count]
