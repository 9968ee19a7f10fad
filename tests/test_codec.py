"""Tests of the on-disk switch codec: Elias-Fano and SASS (switch_adapter.codec.elias_fano / .sass)."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from switch_adapter.codec import elias_fano, grouped_coo
from switch_adapter.codec.binarize import BinarySwitch, binarize
from switch_adapter.codec.bitpack import pack_bits, pack_fields
from switch_adapter.codec.sass import (
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
    PLAIN_VERSION,
    VALUE_BITS_CHOICES,
    CodecError,
    Encoding,
    Header,
    blob_version,
    decode,
    decode_positions,
    decode_values,
    encode,
    encoded_sizes_bits,
    encoded_sizes_for_counts,
    entropy_bound_bits,
    read_header,
)

ALL_ENCODINGS = [None, *Encoding]


def random_switch(numel: int, density: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(numel, generator=generator) < density
    positive = torch.rand(int(mask.sum()), generator=generator) < 0.5
    return mask, positive


def switch_with_kept(numel: int, kept: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A switch with exactly ``kept`` kept entries at random positions."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[:kept]] = True
    positive = torch.rand(kept, generator=generator) < 0.5
    return mask, positive


def assert_round_trip(mask: torch.Tensor, positive: torch.Tensor, encoding: Encoding | None) -> torch.Tensor:
    blob = encode(mask, positive, encoding)
    assert blob.dtype == torch.uint8 and blob.dim() == 1 and blob.device.type == "cpu"
    sizes = encoded_sizes_bits(mask)
    chosen = min(sizes, key=lambda e: (sizes[e], int(e))) if encoding is None else encoding
    assert blob.numel() == -(-sizes[chosen] // 8)
    header = read_header(blob)
    version = FORMAT_VERSION if chosen == Encoding.GROUPED_COO else PLAIN_VERSION
    assert header == Header(version, chosen, mask.numel(), int(mask.sum()))
    decoded_mask, decoded_positive = decode(blob)
    assert decoded_mask.dtype == torch.bool and decoded_positive.dtype == torch.bool
    assert torch.equal(decoded_mask, mask)
    assert torch.equal(decoded_positive, positive)
    return blob


# --------------------------------------------------------------------------------------------- round trips


EDGE_CASES = [
    (0, 0),
    (1, 0),
    (1, 1),
    (7, 0),
    (7, 3),
    (7, 7),
    (8, 1),
    (9, 0),
    (9, 4),
    (9, 9),
    (13, 12),
    (64, 1),
    (1000, 999),
    (1001, 500),
    (4097, 1),
]


@pytest.mark.parametrize("encoding", ALL_ENCODINGS, ids=lambda e: "SASS" if e is None else e.name)
@pytest.mark.parametrize(("numel", "kept"), EDGE_CASES)
def test_round_trip_edge_cases(numel: int, kept: int, encoding: Encoding | None) -> None:
    mask, positive = switch_with_kept(numel, kept, seed=numel * 31 + kept)
    assert_round_trip(mask, positive, encoding)


@pytest.mark.parametrize("encoding", ALL_ENCODINGS, ids=lambda e: "SASS" if e is None else e.name)
@pytest.mark.parametrize("density", [0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_round_trip_densities(density: float, encoding: Encoding | None) -> None:
    mask, positive = random_switch(20_011, density, seed=int(density * 1000))
    assert_round_trip(mask, positive, encoding)


@pytest.mark.parametrize("positive_value", [True, False])
def test_round_trip_constant_signs(positive_value: bool) -> None:
    mask, _ = random_switch(999, 0.3)
    positive = torch.full((int(mask.sum()),), positive_value)
    for encoding in ALL_ENCODINGS:
        assert_round_trip(mask, positive, encoding)


def test_round_trip_huge_sparse() -> None:
    numel = 20_000_000 + 3
    positions = torch.tensor([0, 1, 12_345, 9_999_999, numel - 2, numel - 1])
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[positions] = True
    positive = torch.tensor([True, False, False, True, True, False])
    blob = assert_round_trip(mask, positive, None)
    assert read_header(blob).encoding == Encoding.POSITIONS
    assert blob.numel() < 64  # a few dozen bytes for a 20M-entry tensor
    # The mirror case: almost everything kept goes to COMPLEMENT.
    blob = assert_round_trip(~mask, torch.ones(numel - 6, dtype=torch.bool), None)
    assert read_header(blob).encoding == Encoding.COMPLEMENT


def test_round_trip_low_bits_zero_and_wide() -> None:
    # Density above one half forces L = 0 for POSITIONS; very sparse lists use a wide L.
    assert elias_fano.best_low_bits(1000, 700) == 0
    mask, positive = switch_with_kept(1000, 700)
    assert_round_trip(mask, positive, Encoding.POSITIONS)
    assert elias_fano.best_low_bits(1 << 20, 3) >= 15
    mask, positive = switch_with_kept(1 << 20, 3)
    assert_round_trip(mask, positive, Encoding.POSITIONS)


def test_accepts_non_flat_mask_and_decodes_on_requested_device() -> None:
    mask, positive = random_switch(60, 0.4)
    blob = encode(mask.view(6, 10), positive)
    decoded_mask, decoded_positive = decode(blob, device="cpu")
    assert torch.equal(decoded_mask, mask) and torch.equal(decoded_positive, positive)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("encoding", ALL_ENCODINGS, ids=lambda e: "SASS" if e is None else e.name)
def test_cuda_round_trip(encoding: Encoding | None) -> None:
    mask, positive = random_switch(100_003, 0.07)
    blob = encode(mask.cuda(), positive.cuda(), encoding)
    assert blob.device.type == "cpu"
    assert torch.equal(blob, encode(mask, positive, encoding))
    decoded_mask, decoded_positive = decode(blob, device="cuda")
    assert decoded_mask.is_cuda and decoded_positive.is_cuda
    assert torch.equal(decoded_mask.cpu(), mask) and torch.equal(decoded_positive.cpu(), positive)
    decoded_mask, _ = decode(blob.cuda())
    assert decoded_mask.is_cuda and torch.equal(decoded_mask.cpu(), mask)


# ------------------------------------------------------------------------------------- SASS and sizes


@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.3, 0.45, 0.5, 0.55, 0.8, 1.0])
def test_sass_picks_smallest_candidate(density: float) -> None:
    mask, positive = random_switch(10_007, density, seed=7)
    sizes = encoded_sizes_bits(mask)
    assert set(sizes) == set(Encoding)
    blob = encode(mask, positive)
    assert blob.numel() == -(-min(sizes.values()) // 8)
    assert sizes[read_header(blob).encoding] == min(sizes.values())
    for encoding in Encoding:
        assert encode(mask, positive, encoding).numel() == -(-sizes[encoding] // 8)


def test_sass_choice_by_density() -> None:
    numel = 100_000
    assert min(encoded_sizes_for_counts(numel, 1_000).items(), key=lambda i: i[1])[0] == Encoding.POSITIONS
    assert min(encoded_sizes_for_counts(numel, 50_000).items(), key=lambda i: i[1])[0] == Encoding.BITMAP
    assert min(encoded_sizes_for_counts(numel, 99_000).items(), key=lambda i: i[1])[0] == Encoding.COMPLEMENT


def test_bitmap_size_formula() -> None:
    for numel, kept in [(0, 0), (9, 4), (1000, 10)]:
        assert encoded_sizes_for_counts(numel, kept)[Encoding.BITMAP] == HEADER_BYTES * 8 + numel + kept


def test_elias_fano_size_formula_and_best_low_bits() -> None:
    for universe, count in [(1, 1), (10, 3), (1000, 10), (1000, 999), (1 << 30, 12345), (100, 0)]:
        best = elias_fano.best_low_bits(universe, count)
        best_size = elias_fano.stream_bits(universe, count, best)
        for low in range(elias_fano.MAX_LOW_BITS + 1):
            assert elias_fano.stream_bits(universe, count, low) >= best_size
        if count:
            assert best_size == count * (best + 1) + ((universe - count) >> best)


def test_sizes_close_to_entropy_bound() -> None:
    # The benchmark target, checked here on the closed-form sizes (cheap): <= 1.10x bound + 64 bytes.
    numel = 1 << 16
    for density in [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5]:
        kept = round(numel * density)
        best = min(encoded_sizes_for_counts(numel, kept).values())
        assert best <= 1.10 * entropy_bound_bits(numel, kept) + 64 * 8, density


def test_entropy_bound() -> None:
    assert entropy_bound_bits(0, 0) == 0.0
    assert entropy_bound_bits(100, 0) == 0.0
    assert entropy_bound_bits(100, 100) == 100.0
    assert entropy_bound_bits(1000, 500) == pytest.approx(1500.0)
    with pytest.raises(ValueError):
        entropy_bound_bits(10, 11)


def test_deterministic() -> None:
    mask, positive = random_switch(5_003, 0.2, seed=3)
    for encoding in ALL_ENCODINGS:
        first = encode(mask, positive, encoding)
        second = encode(mask.clone(), positive.clone(), encoding)
        assert torch.equal(first, second)


def test_header_layout_is_little_endian_and_small() -> None:
    assert HEADER_BYTES <= 24
    mask, positive = switch_with_kept(300, 5)
    blob = encode(mask, positive, Encoding.BITMAP)
    raw = bytes(blob[:HEADER_BYTES].tolist())
    assert raw[:4] == MAGIC
    assert raw[4] == PLAIN_VERSION == 2 and raw[5] == Encoding.BITMAP and FORMAT_VERSION == 3
    assert raw[6] == 1  # bits per kept value: the sign
    assert int.from_bytes(raw[7:15], "little") == 300
    assert int.from_bytes(raw[15:23], "little") == 5


def test_version_1_blobs_are_still_read() -> None:
    mask, positive = random_switch(500, 0.1)
    blob = encode(mask, positive, Encoding.POSITIONS)
    raw = bytes(blob.tolist())
    v1 = raw[:4] + bytes([1]) + raw[5:6] + raw[7:]  # the version 1 header has no value-bits byte
    decoded_mask, decoded_positive = decode(torch.tensor(list(v1), dtype=torch.uint8))
    assert torch.equal(decoded_mask, mask) and torch.equal(decoded_positive, positive)


def test_value_bits_outside_the_choices_are_refused_naming_the_valid_ones() -> None:
    mask, positive = random_switch(100, 0.2)
    blob = encode(mask, None, Encoding.BITMAP, value_bits=4, levels=torch.zeros(int(mask.sum()), dtype=torch.uint8))
    with pytest.raises(CodecError, match="3 bits; valid value bits are 1, 2, 4, 8.*upgrade"):
        decode(_with_byte(blob, 6, 3))
    with pytest.raises(CodecError, match="value bits must be one of 1, 2, 4, 8, got 3"):
        encode(mask, positive, value_bits=3, levels=torch.zeros(int(mask.sum()), dtype=torch.uint8))


def test_version_2_blobs_with_version_3_content_are_corrupt() -> None:
    mask, positive = random_switch(100, 0.2)
    plain = encode(mask, positive, Encoding.BITMAP)
    with pytest.raises(CodecError, match="4-bit values, which need version 3"):
        decode(_with_byte(plain, 6, 4))
    grouped = encode(mask, positive, Encoding.GROUPED_COO)
    assert read_header(grouped).version == 3
    with pytest.raises(CodecError, match="GROUPED_COO, which needs version 3"):
        decode(_with_byte(grouped, 4, 2))


def test_encode_rejects_bad_inputs() -> None:
    mask, positive = random_switch(100, 0.5)
    with pytest.raises(ValueError, match="one sign per kept entry"):
        encode(mask, positive[:-1])
    with pytest.raises(ValueError, match="bool"):
        encode(mask.float(), positive)
    with pytest.raises(ValueError):
        encode(mask, positive, 7)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- corrupt blobs


def _blob(encoding: Encoding, numel: int = 1000, kept: int = 100) -> torch.Tensor:
    mask, positive = switch_with_kept(numel, kept, seed=11)
    return encode(mask, positive, encoding)


def _with_byte(blob: torch.Tensor, index: int, value: int) -> torch.Tensor:
    blob = blob.clone()
    blob[index] = value
    return blob


@pytest.mark.parametrize("encoding", list(Encoding), ids=lambda e: e.name)
def test_truncated_or_extended_blob_raises(encoding: Encoding) -> None:
    blob = _blob(encoding)
    for bad in (blob[:-1], torch.cat([blob, torch.zeros(1, dtype=torch.uint8)]), blob[: HEADER_BYTES + 1]):
        with pytest.raises(CodecError, match=r"truncated or corrupt \(expected \d+ bytes, got \d+\)"):
            decode(bad)
        with pytest.raises(CodecError, match="re-download"):
            read_header(bad)
    for short in (blob[:0], blob[:5], blob[: HEADER_BYTES - 1]):
        with pytest.raises(CodecError, match="truncated"):
            decode(short)


def test_bad_magic_raises() -> None:
    with pytest.raises(CodecError, match="magic"):
        decode(_with_byte(_blob(Encoding.BITMAP), 0, ord("X")))


def test_unknown_version_raises() -> None:
    blob = _blob(Encoding.POSITIONS)
    with pytest.raises(CodecError, match="upgrade switch-adapter"):
        decode(_with_byte(blob, 4, FORMAT_VERSION + 1))
    with pytest.raises(CodecError, match="invalid format version 0"):
        read_header(_with_byte(blob, 4, 0))


def test_unknown_encoding_raises() -> None:
    with pytest.raises(CodecError, match="unknown encoding id 4.*upgrade"):
        decode(_with_byte(_with_byte(_blob(Encoding.BITMAP), 4, 3), 5, 4))


def test_kept_larger_than_numel_raises() -> None:
    blob = _blob(Encoding.BITMAP, numel=16, kept=4).clone()
    blob[15:23] = torch.tensor(list(struct.pack("<Q", 17)), dtype=torch.uint8)
    with pytest.raises(CodecError, match="17 kept entries out of 16"):
        read_header(blob)


def test_wrong_blob_type_raises() -> None:
    blob = _blob(Encoding.BITMAP)
    with pytest.raises(CodecError, match="1-D uint8"):
        decode(blob.to(torch.int32))
    with pytest.raises(CodecError, match="1-D uint8"):
        decode(blob.view(1, -1))


def test_corrupt_payload_raises() -> None:
    # Flip one mask bit of a bitmap: the kept count no longer matches the header.
    blob = _blob(Encoding.BITMAP)
    flipped = _with_byte(blob, HEADER_BYTES, int(blob[HEADER_BYTES]) ^ 1)
    with pytest.raises(CodecError, match="corrupt"):
        decode(flipped)
    # An Elias-Fano low-bit width that does not match the payload length.
    blob = _blob(Encoding.POSITIONS)
    with pytest.raises(CodecError, match="truncated or corrupt"):
        decode(_with_byte(blob, HEADER_BYTES, int(blob[HEADER_BYTES]) + 1))
    with pytest.raises(CodecError, match="low-bit width"):
        decode(_with_byte(blob, HEADER_BYTES, 200))
    # Nonzero padding bits (1000 + 100 bits = 137.5 bytes, so the last byte has 4 padding bits).
    blob = _blob(Encoding.BITMAP)
    with pytest.raises(CodecError, match="padding"):
        decode(_with_byte(blob, -1, int(blob[-1]) | 0x80))


@pytest.mark.parametrize("encoding", [Encoding.POSITIONS, Encoding.COMPLEMENT], ids=lambda e: e.name)
def test_corrupt_elias_fano_payload_never_decodes_silently_wrong_shape(encoding: Encoding) -> None:
    # Every single-bit flip of the Elias-Fano stream either raises CodecError or decodes to tensors of the
    # header's shapes (a flipped sign or low bit can be a valid other switch: there is no checksum).
    mask, positive = switch_with_kept(200, 30 if encoding == Encoding.POSITIONS else 170, seed=5)
    blob = encode(mask, positive, encoding)
    header = read_header(blob)
    raised = 0
    for byte in range(HEADER_BYTES + 1, blob.numel()):
        for bit in range(8):
            try:
                decoded_mask, decoded_positive = decode(_with_byte(blob, byte, int(blob[byte]) ^ (1 << bit)))
            except CodecError:
                raised += 1
                continue
            assert decoded_mask.numel() == header.numel and decoded_positive.numel() == header.kept
            assert int(decoded_mask.sum()) == header.kept
    assert raised > 0


# ------------------------------------------------------------------------------------- property tests


@settings(max_examples=150, deadline=None)
@given(
    numel=st.integers(min_value=0, max_value=3000),
    density=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    encoding=st.sampled_from(ALL_ENCODINGS),
)
def test_property_round_trip(numel: int, density: float, seed: int, encoding: Encoding | None) -> None:
    mask, positive = random_switch(numel, density, seed)
    assert_round_trip(mask, positive, encoding)


@settings(max_examples=100, deadline=None)
@given(bits=st.lists(st.booleans(), max_size=300), signs_seed=st.integers(min_value=0, max_value=1000))
def test_property_round_trip_arbitrary_masks(bits: list[bool], signs_seed: int) -> None:
    mask = torch.tensor(bits, dtype=torch.bool)
    generator = torch.Generator().manual_seed(signs_seed)
    positive = torch.rand(int(mask.sum()), generator=generator) < 0.5
    for encoding in ALL_ENCODINGS:
        assert_round_trip(mask, positive, encoding)


@settings(max_examples=100, deadline=None)
@given(
    universe=st.integers(min_value=0, max_value=5000),
    density=st.floats(min_value=0.0, max_value=1.0),
    low_delta=st.integers(min_value=-2, max_value=2),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_property_elias_fano_any_low_bits(universe: int, density: float, low_delta: int, seed: int) -> None:
    count = round(universe * density)
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randperm(universe, generator=generator)[:count].sort().values
    low_bits = max(0, elias_fano.best_low_bits(universe, count) + low_delta)
    stream = elias_fano.encode(positions, universe, low_bits)
    assert stream.numel() == elias_fano.stream_bits(universe, count, low_bits)
    assert torch.equal(elias_fano.decode(stream, universe, count, low_bits), positions)


@settings(max_examples=50, deadline=None)
@given(
    numel=st.integers(min_value=0, max_value=2000),
    density=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_property_sizes_match_blob(numel: int, density: float, seed: int) -> None:
    mask, positive = random_switch(numel, density, seed)
    sizes = encoded_sizes_bits(mask)
    for encoding in Encoding:
        assert encode(mask, positive, encoding).numel() * 8 - sizes[encoding] in range(8)
    assert encode(mask, positive).numel() == -(-min(sizes.values()) // 8)


# ------------------------------------------------------------------------------------- spec: binarize


@pytest.mark.parametrize("density", [0.01, 0.1, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(64, 48), (7, 9), (1,), (3, 5, 11)])
def test_decode_encode_binarize_reconstructs_exactly(shape: tuple[int, ...], density: float) -> None:
    generator = torch.Generator().manual_seed(sum(shape))
    task_vector = torch.randn(shape, generator=generator)
    task_vector[task_vector.abs() < 0.05] = 0.0  # zeros are never kept
    switch = binarize(task_vector, density)
    blob = encode(switch.mask, switch.positive)
    mask, positive = decode(blob)
    assert torch.equal(mask, switch.mask)
    assert torch.equal(positive, switch.positive)
    restored = type(switch)(mask=mask, positive=positive, scale=switch.scale, shape=switch.shape)
    assert torch.equal(restored.to_dense(), switch.to_dense())


# ------------------------------------------------------------------------------------- multi-bit units


def random_levels(kept: int, value_bits: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << value_bits, (kept,), generator=generator, dtype=torch.uint8)


def assert_multibit_round_trip(mask: torch.Tensor, levels: torch.Tensor, value_bits: int, encoding) -> torch.Tensor:
    blob = encode(mask, None, encoding, value_bits=value_bits, levels=levels)
    sizes = encoded_sizes_bits(mask, value_bits)
    chosen = min(sizes, key=lambda e: (sizes[e], int(e))) if encoding is None else encoding
    assert blob.numel() == -(-sizes[chosen] // 8)
    header = read_header(blob)
    assert header == Header(blob_version(chosen, value_bits), chosen, mask.numel(), int(mask.sum()), value_bits)
    decoded_mask, decoded_levels = decode(blob)
    assert torch.equal(decoded_mask, mask)
    expected = levels.bool() if value_bits == 1 else levels
    assert decoded_levels.dtype == expected.dtype and torch.equal(decoded_levels, expected)
    numel, positions, multipliers, bits = decode_values(blob)
    assert (numel, bits) == (mask.numel(), value_bits)
    assert torch.equal(positions, torch.nonzero(mask).reshape(-1))
    assert multipliers.dtype == torch.int16
    assert torch.equal(multipliers, levels.to(torch.int16) * 2 - ((1 << value_bits) - 1))
    return blob


@pytest.mark.parametrize("encoding", ALL_ENCODINGS, ids=lambda e: "SASS" if e is None else e.name)
@pytest.mark.parametrize("value_bits", VALUE_BITS_CHOICES)
@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("numel", [1, 7, 65, 1000, 20_011])
def test_multibit_round_trip(numel: int, density: float, value_bits: int, encoding: Encoding | None) -> None:
    mask, _ = random_switch(numel, density, seed=numel + int(density * 1000))
    levels = random_levels(int(mask.sum()), value_bits, seed=value_bits)
    assert_multibit_round_trip(mask, levels, value_bits, encoding)


@pytest.mark.parametrize("value_bits", VALUE_BITS_CHOICES)
def test_level_semantics_are_odd_multiples_of_the_scale(value_bits: int) -> None:
    top = (1 << value_bits) - 1
    levels = torch.arange(top + 1, dtype=torch.uint8)
    mask = torch.ones(levels.numel(), dtype=torch.bool)
    _, _, multipliers, _ = decode_values(encode(mask, None, value_bits=value_bits, levels=levels))
    assert multipliers.tolist() == list(range(-top, top + 1, 2))
    if value_bits == 2:
        assert multipliers.tolist() == [-3, -1, 1, 3]


def test_one_bit_levels_are_the_sign_bits() -> None:
    mask, positive = random_switch(500, 0.3)
    from_signs = encode(mask, positive)
    from_levels = encode(mask, None, levels=positive.to(torch.uint8))
    assert torch.equal(from_signs, from_levels)
    assert torch.equal(encode(mask, positive, levels=positive.to(torch.uint8)), from_signs)
    _, _, multipliers, bits = decode_values(from_signs)
    assert bits == 1 and torch.equal(multipliers, torch.where(positive, 1, -1).to(torch.int16))
    _, _, signs = decode_positions(from_signs)
    assert signs.dtype == torch.bool and torch.equal(signs, positive)


@pytest.mark.parametrize("value_bits", VALUE_BITS_CHOICES)
@pytest.mark.parametrize("density", [0.0, 0.002, 0.03, 0.2, 0.6, 1.0])
def test_sass_picks_the_minimum_with_value_bits(density: float, value_bits: int) -> None:
    mask, _ = random_switch(9_001, density, seed=3)
    levels = random_levels(int(mask.sum()), value_bits)
    sizes = encoded_sizes_bits(mask, value_bits)
    assert set(sizes) == set(Encoding)
    blob = encode(mask, None, value_bits=value_bits, levels=levels)
    assert sizes[read_header(blob).encoding] == min(sizes.values())
    assert blob.numel() == -(-min(sizes.values()) // 8)
    for encoding in Encoding:
        size = encode(mask, None, encoding, value_bits=value_bits, levels=levels).numel()
        assert size == -(-sizes[encoding] // 8)
    ones = encoded_sizes_bits(mask)
    assert all(sizes[e] - ones[e] == int(mask.sum()) * (value_bits - 1) for e in Encoding)


def test_grouped_coo_size_formula() -> None:
    for numel, kept in [(0, 0), (1, 1), (7, 3), (65, 2), (1000, 10), (1 << 20, 5000), (100_003, 99_000)]:
        j = grouped_coo.best_group_bits(numel, kept)
        group = 1 << j
        expected = (-(-numel // group)) * math.ceil(math.log2(group + 1)) + kept * j
        assert grouped_coo.stream_bits(numel, kept, j) == expected
        for other in range(grouped_coo.MIN_GROUP_BITS, grouped_coo.MAX_GROUP_BITS + 1):
            assert grouped_coo.stream_bits(numel, kept, other) >= expected
        for bits in VALUE_BITS_CHOICES:
            size = encoded_sizes_for_counts(numel, kept, bits)[Encoding.GROUPED_COO]
            assert size == HEADER_BYTES * 8 + 8 + expected + kept * bits


def test_grouped_coo_group_size_follows_the_density() -> None:
    assert grouped_coo.best_group_bits(1 << 20, 1 << 10) > grouped_coo.best_group_bits(1 << 20, 1 << 16)


def test_entropy_bound_counts_value_bits() -> None:
    assert entropy_bound_bits(1000, 500, 4) == pytest.approx(1000 + 500 * 4)
    assert entropy_bound_bits(100, 100, 8) == 800.0


def test_encode_rejects_bad_levels() -> None:
    mask, positive = random_switch(200, 0.3)
    kept = int(mask.sum())
    with pytest.raises(ValueError, match="needs levels"):
        encode(mask, positive, value_bits=4)
    with pytest.raises(ValueError, match="uint8"):
        encode(mask, None, value_bits=4, levels=torch.zeros(kept, dtype=torch.int32))
    with pytest.raises(ValueError, match="one level per kept entry"):
        encode(mask, None, value_bits=4, levels=torch.zeros(kept + 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"below 2\*\*2"):
        encode(mask, None, value_bits=2, levels=torch.full((kept,), 4, dtype=torch.uint8))
    levels = random_levels(kept, 4)
    with pytest.raises(ValueError, match="positive disagrees with levels"):
        encode(mask, ~(levels >= 8), value_bits=4, levels=levels)
    assert torch.equal(
        encode(mask, levels >= 8, value_bits=4, levels=levels), encode(mask, None, value_bits=4, levels=levels)
    )


# Blobs written by switch-adapter before multi-bit units existed (format version 2): T-Switch files are unchanged.
GOLDEN_V2_BLOBS = [
    (61, 5, None, "545357420201013d00000000000000030000000000000004a03715"),
    (61, 5, Encoding.BITMAP, "545357420200013d00000000000000030000000000000001080000000200a0"),
    (
        200,
        60,
        None,
        "54535742020001c8000000000000007700000000000000dbdad296b6b6b5a5ad6d6d696b5b5bdad2d6b6b6b4b5ad2d6d954aa552a9542a954"
        "aa552a9542a15",
    ),
    (
        200,
        95,
        Encoding.COMPLEMENT,
        "54535742020201c800000000000000bc0000000000000003ebb38a8648490a25a94aa552a9542a954aa552a9542a954aa552a9542a954"
        "aa502",
    ),
    (300, 3, Encoding.POSITIONS, "545357420201012c0100000000000009000000000000000480257ac4992449924a"),
]


@pytest.mark.parametrize(("numel", "cut", "encoding", "expected"), GOLDEN_V2_BLOBS)
def test_one_bit_blobs_are_byte_identical_to_format_version_2(numel: int, cut: int, encoding, expected: str) -> None:
    index = torch.arange(numel)
    mask = (index * 37 % 101) < cut
    positive = (torch.arange(int(mask.sum())) * 11 % 7) < 3
    blob = encode(mask, positive, encoding)
    assert bytes(blob.tolist()).hex() == expected
    decoded_mask, decoded_positive = decode(blob)
    assert torch.equal(decoded_mask, mask) and torch.equal(decoded_positive, positive)


def test_sass_never_picks_grouped_coo_for_plain_switches_in_practice() -> None:
    # Elias-Fano is at least as small for every n, k tried, so T-Switch files stay at version 2.
    for numel in [*range(1, 130), 1000, 4096, 65_536, 1 << 20]:
        kepts = range(numel + 1) if numel < 130 else [int(numel * d) for d in (0.0005, 0.01, 0.05, 0.3, 0.7, 0.99)]
        for kept in kepts:
            sizes = encoded_sizes_for_counts(numel, kept)
            assert min(sizes, key=lambda e: (sizes[e], int(e))) != Encoding.GROUPED_COO, (numel, kept)


# ------------------------------------------------------------------------------------- corrupt grouped COO


def grouped_blob(numel: int, counts: list[int], offsets: list[int], group_bits: int, value_bits: int = 1):
    """A hand-made GROUPED_COO blob (levels all zero), valid or not."""
    kept = len(offsets)
    header = struct.pack("<4sBBBQQ", MAGIC, 3, int(Encoding.GROUPED_COO), value_bits, numel, kept)
    stream = torch.cat(
        [
            pack_fields(torch.tensor(counts, dtype=torch.int32), group_bits + 1),
            pack_fields(torch.tensor(offsets, dtype=torch.int32), group_bits),
            torch.zeros(kept * value_bits, dtype=torch.bool),
        ]
    )
    return torch.cat([torch.tensor(list(header + bytes([group_bits])), dtype=torch.uint8), pack_bits(stream)])


def test_hand_made_grouped_blob_decodes() -> None:
    # n = 10, g = 4: groups [0-3] [4-7] [8-9]; positions 1, 3, 4, 9.
    blob = grouped_blob(10, [2, 1, 1], [1, 3, 0, 1], group_bits=2)
    mask, _ = decode(blob)
    assert torch.nonzero(mask).reshape(-1).tolist() == [1, 3, 4, 9]
    # 3 counts of 3 bits + 4 offsets of 2 bits + 4 sign bits = 21 bits: the last byte has 3 padding bits.
    with pytest.raises(CodecError, match="padding"):
        decode(_with_byte(blob, -1, int(blob[-1]) | 0x80))


@pytest.mark.parametrize(
    ("counts", "offsets", "reason"),
    [
        ([2, 1, 0], [1, 3, 0, 1], "counts sum to 3, expected 4"),
        ([5, 0, 0], [0, 1, 2, 3], "exceeds the group size 4"),
        ([2, 1, 1], [3, 1, 0, 1], "not increasing"),
        ([2, 1, 1], [1, 1, 0, 1], "not increasing"),
        ([2, 1, 1], [1, 3, 0, 2], "out of range"),  # position 10 in the partial last group of n = 10
    ],
)
def test_corrupt_grouped_coo_raises(counts: list[int], offsets: list[int], reason: str) -> None:
    with pytest.raises(CodecError, match=f"corrupt.*{reason}"):
        decode(grouped_blob(10, counts, offsets, group_bits=2))


@pytest.mark.parametrize("value_bits", [1, 4])
def test_truncated_or_bad_grouped_coo_raises(value_bits: int) -> None:
    mask, _ = random_switch(3_001, 0.05, seed=2)
    levels = random_levels(int(mask.sum()), value_bits)
    blob = encode(mask, None, Encoding.GROUPED_COO, value_bits=value_bits, levels=levels)
    for bad in (blob[:-1], blob[: HEADER_BYTES + 1], torch.cat([blob, torch.zeros(1, dtype=torch.uint8)])):
        with pytest.raises(CodecError, match="truncated or corrupt"):
            decode(bad)
    with pytest.raises(CodecError, match="truncated or corrupt"):
        decode(blob[:HEADER_BYTES])
    for group_bits in (0, 17, 255):
        with pytest.raises(CodecError, match="group bits"):
            decode(_with_byte(blob, HEADER_BYTES, group_bits))


def test_every_bit_flip_of_a_grouped_blob_raises_or_keeps_the_header_shapes() -> None:
    mask, _ = random_switch(300, 0.05, seed=9)
    levels = random_levels(int(mask.sum()), 2)
    blob = encode(mask, None, Encoding.GROUPED_COO, value_bits=2, levels=levels)
    header = read_header(blob)
    raised = 0
    for byte in range(HEADER_BYTES + 1, blob.numel()):
        for bit in range(8):
            try:
                decoded_mask, decoded_levels = decode(_with_byte(blob, byte, int(blob[byte]) ^ (1 << bit)))
            except CodecError:
                raised += 1
                continue
            assert int(decoded_mask.sum()) == header.kept == decoded_levels.numel()
    assert raised > 0


# ------------------------------------------------------------------------------------- BinarySwitch with value bits


def test_binary_switch_multipliers_and_dense() -> None:
    mask = torch.tensor([True, False, True, True, False, True])
    levels = torch.tensor([0, 3, 1, 2], dtype=torch.uint8)
    switch = BinarySwitch.from_levels(mask, levels, torch.tensor([0.5]), torch.Size([2, 3]), value_bits=2)
    assert switch.value_bits == 2 and torch.equal(switch.positive, torch.tensor([False, True, False, True]))
    assert switch.multipliers.tolist() == [-3, 3, -1, 1]
    assert switch.to_dense().tolist() == [[-1.5, 0.0, 1.5], [-0.5, 0.0, 0.5]]
    plain = BinarySwitch.from_levels(mask, torch.tensor([1, 0, 0, 1], dtype=torch.uint8), torch.tensor([2.0]),
                                     torch.Size([6]), value_bits=1)  # fmt: skip
    assert plain.levels is None and plain.multipliers.tolist() == [1, -1, -1, 1]
    with pytest.raises(ValueError, match="needs levels"):
        BinarySwitch(mask, switch.positive, switch.scale, switch.shape, value_bits=4)
    with pytest.raises(CodecError, match="1, 2, 4, 8"):
        BinarySwitch(mask, switch.positive, switch.scale, switch.shape, value_bits=3, levels=levels)


def test_binarize_is_unchanged_one_bit() -> None:
    task_vector = torch.randn(40, 30, generator=torch.Generator().manual_seed(4))
    switch = binarize(task_vector, 0.2)
    assert switch.value_bits == 1 and switch.levels is None
    signs = torch.zeros(switch.numel)
    signs[switch.mask] = torch.where(switch.positive, 1.0, -1.0)
    assert torch.equal(switch.to_dense(), (signs * switch.scale).view(40, 30))


@settings(max_examples=80, deadline=None)
@given(
    numel=st.integers(min_value=0, max_value=3000),
    density=st.floats(min_value=0.0, max_value=1.0),
    value_bits=st.sampled_from(VALUE_BITS_CHOICES),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    encoding=st.sampled_from(ALL_ENCODINGS),
)
def test_property_multibit_round_trip(numel: int, density: float, value_bits: int, seed: int, encoding) -> None:
    mask, _ = random_switch(numel, density, seed)
    assert_multibit_round_trip(mask, random_levels(int(mask.sum()), value_bits, seed), value_bits, encoding)
