"""Decoded switch state (switch_adapter.tswitch.layer.compact_decoded): at most 5 bytes per kept entry (int32
positions, int8 multipliers), 6 for 8-bit units, with exactly the values the codec decodes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from switch_adapter.codec import sass
from switch_adapter.codec.binarize import BinarySwitch
from switch_adapter.tswitch.layer import SwitchedModule, compact_decoded


def _switch(shape: tuple[int, ...], value_bits: int, seed: int = 0) -> BinarySwitch:
    """A random switch keeping about a third of the entries, with random levels and a per-row scale."""
    generator = torch.Generator().manual_seed(seed)
    numel = shape[0] * shape[1]
    mask = torch.rand(numel, generator=generator) < 0.3
    levels = torch.randint(0, 2**value_bits, (int(mask.sum()),), generator=generator, dtype=torch.uint8)
    scale = torch.rand(shape[0], generator=generator) + 0.1
    return BinarySwitch.from_levels(mask, levels, scale, torch.Size(shape), value_bits)


def _layer(switch: BinarySwitch) -> SwitchedModule:
    base = nn.Linear(switch.shape[1], switch.shape[0])
    layer = SwitchedModule(base, "task", {}, ("weight",))
    layer.set_switch("task", "weight", switch)
    return layer


def _dense(switch: BinarySwitch) -> torch.Tensor:
    """The switch's delta built from the codec's own dtypes (int64 positions, int16 multipliers)."""
    _, positions, multipliers, _ = sass.decode_values(
        sass.encode(switch.mask, switch.positive, value_bits=switch.value_bits, levels=switch.levels)
    )
    rows = positions // switch.shape[1]
    delta = torch.zeros(switch.mask.numel())
    delta[positions] = multipliers.to(torch.float32) * switch.scale[rows]
    return delta.view(switch.shape)


@pytest.mark.parametrize("value_bits, bytes_per_entry", [(1, 5), (2, 5), (4, 5), (8, 6)])
def test_decoded_state_is_compact_and_exact(value_bits, bytes_per_entry):
    switch = _switch((24, 40), value_bits, seed=value_bits)
    layer = _layer(switch)
    delta = layer.get_delta("task", "weight")
    kept = int(switch.mask.sum())
    positions, multipliers = layer._sparse("task", "weight")
    assert positions.dtype == torch.int32 and positions.numel() == kept
    assert multipliers.dtype == (torch.int16 if value_bits == 8 else torch.int8)
    assert layer.decoded_nbytes() == kept * bytes_per_entry
    assert torch.equal(delta, _dense(switch))  # bit-identical to the codec's int64/int16 decoding
    value = torch.randn(switch.shape)
    expected = value.clone().view(-1).index_add_(0, torch.nonzero(switch.mask).flatten(), delta.view(-1)[switch.mask])
    assert torch.equal(layer.add_weighted_deltas("weight", value, {"task": 1.0}), expected.view(switch.shape))


def test_compact_decoded_keeps_int64_positions_for_huge_tensors():
    positions, multipliers = torch.tensor([0, 2**31 + 5]), torch.tensor([1, -1], dtype=torch.int16)
    wide, small = compact_decoded(2**31 + 6, positions, multipliers, 1)
    assert wide.dtype == torch.int64 and torch.equal(wide, positions)
    assert small.dtype == torch.int8 and torch.equal(small, multipliers.to(torch.int8))
    narrow, kept = compact_decoded(2**31 - 1, positions[:1], multipliers, 8)
    assert narrow.dtype == torch.int32 and kept.dtype == torch.int16
