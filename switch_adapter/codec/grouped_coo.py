"""Vectorised grouped-COO coding of strictly increasing position lists (the FlexSwitch paper's sparse format).

The universe ``[0, n)`` is cut into ``G = ceil(n / g)`` groups of ``g = 2**j`` consecutive positions (the last one
may be shorter). The stream holds

* per group, the number of its kept positions, a ``j + 1``-bit field (``ceil(log2(g + 1))`` bits: 0 to ``g``),
* then per kept position, in order, its offset inside its group, a ``j``-bit field,

all fields LSB first. It costs exactly ``G (j + 1) + m j`` bits for ``m`` positions. Small groups suit dense lists
and large groups sparse ones; :func:`best_group_bits` picks the ``j`` in ``[1, MAX_GROUP_BITS]`` that minimises the
exact size. Elias-Fano (:mod:`switch_adapter.codec.elias_fano`) is usually smaller; SASS compares both.

Encoding and decoding are ``bincount`` / ``repeat_interleave`` over whole tensors: no Python loop over positions or
groups. Everything here works on bool bit streams (one bool per bit); packing them into bytes is the caller's job.
"""

from __future__ import annotations

import torch

from .bitpack import pack_fields, unpack_fields

#: Group sizes run from 2**MIN_GROUP_BITS to 2**MAX_GROUP_BITS positions.
MIN_GROUP_BITS = 1
MAX_GROUP_BITS = 16


def group_count(universe: int, group_bits: int) -> int:
    """``ceil(universe / 2**group_bits)``: the number of groups, the last one possibly partial."""
    return -(-universe >> group_bits)


def stream_bits(universe: int, count: int, group_bits: int) -> int:
    """Exact length in bits of the stream for ``count`` positions in ``[0, universe)`` with groups of
    ``2**group_bits``: ``G (j + 1)`` count bits plus ``count * j`` offset bits."""
    return group_count(universe, group_bits) * (group_bits + 1) + count * group_bits


def best_group_bits(universe: int, count: int) -> int:
    """The ``j`` in ``[MIN_GROUP_BITS, MAX_GROUP_BITS]`` giving the smallest :func:`stream_bits` (smallest on ties)."""
    candidates = range(MIN_GROUP_BITS, MAX_GROUP_BITS + 1)
    return min(candidates, key=lambda bits: (stream_bits(universe, count, bits), bits))


def _check_args(universe: int, count: int, group_bits: int) -> None:
    if not 0 <= count <= universe:
        raise ValueError(f"grouped COO needs 0 <= count <= universe, got count={count}, universe={universe}.")
    if not MIN_GROUP_BITS <= group_bits <= MAX_GROUP_BITS:
        raise ValueError(f"grouped COO group bits must be in [{MIN_GROUP_BITS}, {MAX_GROUP_BITS}], got {group_bits}.")


def encode(positions: torch.Tensor, universe: int, group_bits: int) -> torch.Tensor:
    """Encode strictly increasing int64 ``positions`` in ``[0, universe)`` into a flat bool bit stream of exactly
    ``stream_bits(universe, positions.numel(), group_bits)`` entries, on the device of ``positions``.

    The caller guarantees order and range (true for the output of ``nonzero``); they are not re-checked here.
    """
    positions = positions.reshape(-1).to(torch.int64)
    _check_args(universe, positions.numel(), group_bits)
    groups = group_count(universe, group_bits)
    counts = torch.bincount(positions >> group_bits, minlength=groups).to(torch.int32)
    offsets = (positions & ((1 << group_bits) - 1)).to(torch.int32)
    return torch.cat([pack_fields(counts, group_bits + 1), pack_fields(offsets, group_bits)])


def decode(stream: torch.Tensor, universe: int, count: int, group_bits: int) -> torch.Tensor:
    """Inverse of :func:`encode`: the ``count`` positions (int64, on ``stream``'s device).

    Raises ``ValueError`` when the stream is inconsistent: wrong length, a group count above the group size, counts
    that do not sum to ``count``, or positions out of range or not strictly increasing (offsets within a group
    must increase). For a stored blob that means it is corrupt.
    """
    _check_args(universe, count, group_bits)
    expected = stream_bits(universe, count, group_bits)
    if stream.numel() != expected:
        raise ValueError(f"grouped COO stream has {stream.numel()} bits, expected {expected}.")
    groups = group_count(universe, group_bits)
    split = groups * (group_bits + 1)
    counts = unpack_fields(stream[:split], groups, group_bits + 1, torch.int64)
    if groups and int(counts.max()) > 1 << group_bits:
        raise ValueError(f"a grouped COO count exceeds the group size {1 << group_bits}.")
    total = int(counts.sum())
    if total != count:
        raise ValueError(f"grouped COO counts sum to {total}, expected {count}.")
    offsets = unpack_fields(stream[split:], count, group_bits, torch.int64)
    group_ids = torch.repeat_interleave(torch.arange(groups, dtype=torch.int64, device=stream.device), counts)
    positions = (group_ids << group_bits) | offsets
    bad_order = count > 1 and bool((positions[1:] <= positions[:-1]).any())
    if bad_order or (count and int(positions[-1]) >= universe):
        raise ValueError("grouped COO stream decodes to positions that are out of range or not increasing.")
    return positions
