"""The codec's optional numba kernels (switch_adapter.codec.kernels) against the numpy/torch reference: the same
decoded arrays, the same errors for corrupt blobs, bit-identical weights after adding kept entries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from switch_adapter.codec import elias_fano, kernels, sass
from switch_adapter.codec.binarize import BinarySwitch, binarize, binarize_encoded
from switch_adapter.codec.bitpack import pack_bits
from switch_adapter.codec.kernels import add_kept_values, fast_codec_available
from switch_adapter.codec.sass import Encoding
from switch_adapter.errors import CodecError
from switch_adapter.tswitch.layer import SwitchedModule

pytest.importorskip("numba", reason="pip install numba (the codec's fast path); the reference path is tested too")


@pytest.fixture
def reference(monkeypatch):
    """Run the body with the numba kernels disabled (``SWITCH_ADAPTER_KERNELS=torch``), then restore them."""

    class Switch:
        def __enter__(self):
            monkeypatch.setenv("SWITCH_ADAPTER_KERNELS", "torch")
            kernels.numba_codec.cache_clear()
            assert not fast_codec_available()

        def __exit__(self, *exc_info):
            monkeypatch.delenv("SWITCH_ADAPTER_KERNELS")
            kernels.numba_codec.cache_clear()
            assert fast_codec_available()

    kernels.numba_codec.cache_clear()
    yield Switch()
    kernels.numba_codec.cache_clear()


def _blob(numel: int, kept: int, value_bits: int, encoding: Encoding | None, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[:kept]] = True
    levels = torch.randint(0, 2**value_bits, (kept,), generator=generator, dtype=torch.uint8)
    return sass.encode(mask, None, encoding, value_bits=value_bits, levels=levels)


CASES = [(1, 0), (1, 1), (9, 4), (64, 0), (64, 64), (1000, 3), (1000, 997), (20_011, 200), (20_011, 6000), (4099, 2049)]


@pytest.mark.parametrize("encoding", [None, *Encoding], ids=lambda e: "SASS" if e is None else e.name)
@pytest.mark.parametrize("value_bits", sass.VALUE_BITS_CHOICES)
@pytest.mark.parametrize(("numel", "kept"), CASES)
def test_decode_compact_matches_reference(numel, kept, value_bits, encoding, reference):
    blob = _blob(numel, kept, value_bits, encoding, seed=numel + kept + value_bits)
    fast = sass.decode_compact(blob)
    with reference:
        slow = sass.decode_compact(blob)
    _, positions, multipliers, _ = sass.decode_values(blob)
    assert fast[0] == slow[0] == numel and fast[3] == slow[3] == value_bits
    for got, want in ((fast[1], slow[1]), (fast[2], slow[2])):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert fast[1].dtype == torch.int32 and torch.equal(fast[1].long(), positions)
    assert torch.equal(fast[2].to(torch.int16), multipliers)


def test_decode_compact_wide_low_bits(reference):
    """Elias-Fano streams with many low bits (sparse huge tensors) read fields across several bytes."""
    positions = torch.tensor([3, 2**40 + 17, 2**45 + 1, 2**46 - 2])
    universe = 2**46
    low_bits = elias_fano.best_low_bits(universe, positions.numel())
    stream = elias_fano.encode(positions, universe, low_bits)
    signs = torch.tensor([True, False, False, True])
    header = sass._HEADER_STRUCT.pack(sass.MAGIC, 2, int(Encoding.POSITIONS), 1, universe, positions.numel())
    payload = pack_bits(torch.cat([stream, signs]))
    blob = torch.cat([torch.tensor(list(header + bytes([low_bits])), dtype=torch.uint8), payload])
    fast = sass.decode_compact(blob)
    with reference:
        slow = sass.decode_compact(blob)
    assert low_bits > 25
    assert torch.equal(fast[1], slow[1]) and torch.equal(fast[1], positions)
    assert torch.equal(fast[2], slow[2]) and fast[2].tolist() == [1, -1, -1, 1]


@pytest.mark.parametrize("encoding", [Encoding.BITMAP, Encoding.POSITIONS, Encoding.COMPLEMENT], ids=lambda e: e.name)
def test_corrupt_payloads_fail_or_decode_like_the_reference(encoding, reference):
    """Flipped payload bits: the fast path raises the reference's error, or decodes what the reference decodes."""
    blob = _blob(3001, 700 if encoding != Encoding.COMPLEMENT else 2500, 1, encoding, seed=1)
    header_bytes = sass.HEADER_BYTES + (0 if encoding == Encoding.BITMAP else 1)
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(150):
        damaged = blob.clone()
        for _ in range(int(rng.integers(1, 4))):
            byte = int(rng.integers(header_bytes, blob.numel()))
            damaged[byte] ^= 1 << int(rng.integers(0, 8))
        results = []
        for use_reference in (False, True):
            try:
                if use_reference:
                    with reference:
                        results.append(sass.decode_compact(damaged))
                else:
                    results.append(sass.decode_compact(damaged))
            except CodecError as error:
                results.append(str(error))
        fast, slow = results
        if isinstance(slow, str):
            assert fast == slow
            outcomes.add("error")
        else:
            assert torch.equal(fast[1], slow[1]) and torch.equal(fast[2], slow[2])
            outcomes.add("decoded")
    assert "error" in outcomes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rows_scaled", [False, True])
@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.37])
def test_add_kept_values_bit_identical(dtype, rows_scaled, alpha, reference):
    generator = torch.Generator().manual_seed(3)
    shape = (37, 53)
    numel = shape[0] * shape[1]
    positions = torch.sort(torch.randperm(numel, generator=generator)[:700]).values.to(torch.int32)
    multipliers = (torch.randint(0, 8, (700,), generator=generator) * 2 - 7).to(torch.int8)
    scale = torch.rand(shape[0] if rows_scaled else 1, generator=generator) + 0.01
    weight = torch.randn(numel, generator=generator).to(dtype)
    fast, slow = weight.clone(), weight.clone()
    add_kept_values(fast, positions, multipliers, scale, alpha)
    with reference:
        add_kept_values(slow, positions, multipliers, scale, alpha)
    assert torch.equal(fast, slow)
    assert not torch.equal(fast, weight)


@pytest.mark.parametrize("encoding", [Encoding.BITMAP, Encoding.POSITIONS, Encoding.COMPLEMENT], ids=lambda e: e.name)
@pytest.mark.parametrize("value_bits", [1, 4])
@pytest.mark.parametrize(("numel", "kept"), [(1, 1), (64, 0), (1000, 3), (20_011, 6000), (4099, 2049)])
@pytest.mark.parametrize("rows", [1, 0])
def test_decoding_straight_into_weights_adds_what_decoding_first_adds(encoding, value_bits, numel, kept, rows):
    """sass.add_decoded (a merge: one numba call, nothing kept decoded) adds exactly what decode_compact +
    add_kept_values add; a damaged blob is declined with the weights untouched."""
    blob = _blob(numel, kept, value_bits, encoding, seed=numel + kept)
    generator = torch.Generator().manual_seed(kept)
    scale = torch.rand(rows or next(r for r in (7, 3, 1) if numel % r == 0), generator=generator) + 0.1
    weight = torch.randn(numel, generator=generator)
    fused, reference_weight = weight.clone(), weight.clone()
    assert sass.add_decoded(blob, fused, scale, -0.5)
    _, positions, multipliers, _ = sass.decode_compact(blob)
    add_kept_values(reference_weight, positions, multipliers, scale, -0.5)
    assert torch.equal(fused, reference_weight)
    if kept:
        damaged = blob.clone()
        damaged[-1] = 0xFF  # padding bits or a corrupt stream
        untouched = weight.clone()
        if not sass.add_decoded(damaged, untouched, scale, 1.0):
            assert torch.equal(untouched, weight)
    assert not sass.add_decoded(blob, weight.to(torch.bfloat16), scale, 1.0)  # the caller decodes bfloat16


@pytest.mark.parametrize("value_bits", [1, 4, 8])
def test_merge_is_bit_identical_on_both_paths(value_bits, reference):
    generator = torch.Generator().manual_seed(value_bits)
    shape = (48, 40)
    mask = torch.rand(shape[0] * shape[1], generator=generator) < 0.05
    levels = torch.randint(0, 2**value_bits, (int(mask.sum()),), generator=generator, dtype=torch.uint8)
    switch = BinarySwitch.from_levels(mask, levels, torch.rand(shape[0], generator=generator) + 0.1, shape, value_bits)
    torch.manual_seed(0)
    base = nn.Linear(shape[1], shape[0])
    merged = []
    for use_reference in (False, True):
        layer = SwitchedModule(nn.Linear(shape[1], shape[0]), "task", {}, ("weight",))
        layer.base_layer.load_state_dict(base.state_dict())
        layer.set_switch("task", "weight", switch)
        if use_reference:
            with reference:
                layer.merge()
        else:
            layer.merge()
        merged.append(layer.base_layer.weight.detach().clone())
        assert layer.decoded_nbytes() == 0  # a merge decodes into the weights and keeps nothing decoded
        layer.unmerge()
    assert torch.equal(merged[0], merged[1])
    assert torch.equal(merged[0], base.weight.detach() + switch.to_dense())


def _task_vectors() -> list[torch.Tensor]:
    """Task vectors with ties at every cut, zeros (both signs), subnormals, one sign only, and plain noise."""
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(20_011, generator=generator) * 1e-3
    ties = torch.round(torch.randn(5000, generator=generator) * 3) / 4
    ties[::7] = -0.0
    tiny = torch.randn(3000, generator=generator) * 1e-40  # subnormal floats
    one_sign = torch.rand(64, 33, generator=generator)
    return [noise, ties, tiny, one_sign, -one_sign, torch.tensor([0.5]), torch.tensor([0.0, -0.25, 0.0])]


@pytest.mark.parametrize("keep_ties", [False, True])
@pytest.mark.parametrize("scale_rule", ["norm", "rms"])
@pytest.mark.parametrize("density", [0.001, 0.05, 0.3, 0.5, 0.7, 1.0])
def test_binarize_encoded_matches_binarize_then_encode(density, scale_rule, keep_ties, reference):
    """The fused path writes the blob and scale that binarize + encode produce, byte for byte, bit for bit."""
    for task_vector in _task_vectors():
        blob, scale = binarize_encoded(task_vector, density, scale_rule=scale_rule, keep_ties=keep_ties)
        switch = binarize(task_vector, density, scale_rule=scale_rule, keep_ties=keep_ties)
        assert torch.equal(blob, sass.encode(switch.mask, switch.positive))
        assert torch.equal(scale, switch.scale)
        with reference:
            slow_blob, slow_scale = binarize_encoded(task_vector, density, scale_rule=scale_rule, keep_ties=keep_ties)
        assert torch.equal(blob, slow_blob) and torch.equal(scale, slow_scale)


def test_binarize_encoded_falls_back_for_what_it_does_not_fuse():
    """Row scales take the reference path, transposed and bfloat16 inputs the fused one after their float32 copy:
    the same blob and scale either way; NaN/Inf raise the reference's error."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 30, generator=generator)
    for task_vector, granularity in ((weight, "row"), (weight.T, "tensor"), (weight.to(torch.bfloat16), "tensor")):
        blob, scale = binarize_encoded(task_vector, 0.2, granularity)
        switch = binarize(task_vector, 0.2, granularity)
        assert torch.equal(blob, sass.encode(switch.mask, switch.positive)) and torch.equal(scale, switch.scale)
    broken = weight.clone()
    broken[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        binarize_encoded(broken, 0.2, name="layer.weight")
