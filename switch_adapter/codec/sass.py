"""SASS, the sparsity-aware storage strategy: the on-disk codec of one switch (keep-mask + values of kept entries).

A switch for a tensor with ``n`` entries is a flat keep-mask over the ``n`` positions (row-major) and one value per
kept entry (``k`` of them), in position order. A unit with ``b`` value bits (``b`` in 1, 2, 4, 8) stores per kept
entry an unsigned level ``u`` in ``[0, 2**b - 1]`` whose value is ``scale * (2u - (2**b - 1))``: the odd multiples
of the scale of the zero-free mid-rise quantiser with step ``2 * scale``. With ``b = 1`` the level is the sign bit
(1: ``+scale``, 0: ``-scale``), which is what T-Switch stores. :func:`encode` turns a switch into a self-describing
uint8 "blob"; :func:`decode` turns it back bit-exactly. The scale is not part of the blob (it is one float or one
float per row and is stored next to it).

Blob layout (all integers little-endian), the same 23-byte header for versions 2 and 3::

    offset  size  field
    0       4     magic b"TSWB"
    4       1     blob format version: 2, or 3 when b > 1 or the encoding is GROUPED_COO
    5       1     encoding id (Encoding)
    6       1     value bits b: bits per kept value, 1, 2, 4 or 8 (1: the sign, T-Switch)
    7       8     numel n (uint64)
    15      8     kept k (uint64)
    23      ...   payload

Version 1 blobs have no value-bits byte (22-byte header, b = 1); they are still read. A plain T-Switch blob (b = 1,
encoding 0-2) carries version 2, so readers that know only versions 1 and 2 keep reading it; a blob with wider
values or grouped COO carries version 3, and those readers answer "upgrade switch-adapter".

Payloads, each a single LSB-first bit stream (see :mod:`switch_adapter.codec.bitpack`) padded with zero bits to a
whole byte; ``s`` is the ``k * b`` value bits: each kept entry's level as a ``b``-bit field, LSB first, in position
order (for ``b = 1`` the signs, 1 = positive):

* ``BITMAP`` (0): ``n`` mask bits then ``s``. Size ``n + k b`` bits.
* ``POSITIONS`` (1): one byte ``L`` then the Elias-Fano stream of the kept positions
  (:mod:`switch_adapter.codec.elias_fano`) then ``s``. Size ``8 + k (L + 1) + ((n - k) >> L) + k b`` bits.
* ``COMPLEMENT`` (2): like ``POSITIONS`` but Elias-Fano codes the ``n - k`` positions that are *not* kept
  (cheaper when the density is above about one half).
* ``GROUPED_COO`` (3, version 3): one byte ``j`` in 1..16, then per group of ``g = 2**j`` positions a ``j + 1``-bit
  count, then per kept entry its ``j``-bit offset in its group (:mod:`switch_adapter.codec.grouped_coo`), then
  ``s``. Size ``8 + ceil(n / g) (j + 1) + k j + k b`` bits.

With ``encoding=None`` :func:`encode` picks the candidate with the smallest exact size (ties to the lowest id),
computed in closed form by :func:`encoded_sizes_bits`. The value bits cost the same in every encoding, so the choice
depends on ``n`` and ``k`` only. For random masks of density 0.01 to 0.5 the chosen encoding stays within about
1.09x of the entropy bound ``n H(k/n) + k b`` (:func:`entropy_bound_bits`); ``benchmarks/storage.py`` measures it.

Everything runs with torch ops on the device of the inputs; only the header is parsed on the CPU.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from switch_adapter.codec import elias_fano, grouped_coo
from switch_adapter.codec.bitpack import pack_bits, pack_fields, unpack_bits, unpack_fields
from switch_adapter.codec.kernels import add_arguments, adds_in_kernel, numba_codec
from switch_adapter.errors import CodecError

#: Newest blob format version this module reads and writes.
FORMAT_VERSION: int = 3
#: The version of a plain blob (1-bit values, encodings 0-2): what older readers understand.
PLAIN_VERSION: int = 2
MAGIC: bytes = b"TSWB"
_V2_STRUCT = struct.Struct("<4sBBBQQ")
_HEADER_STRUCTS = {1: struct.Struct("<4sBBQQ"), 2: _V2_STRUCT, 3: _V2_STRUCT}
_HEADER_STRUCT = _V2_STRUCT
#: Size of the fixed header (versions 2 and 3) in bytes.
HEADER_BYTES: int = _HEADER_STRUCT.size
#: Bits per kept value of a T-Switch (the sign); the default of every function here.
VALUE_BITS: int = 1
#: Bits per kept value a blob may carry.
VALUE_BITS_CHOICES: tuple[int, ...] = (1, 2, 4, 8)
_PARAM_BYTES = 1  # POSITIONS / COMPLEMENT store L, GROUPED_COO stores j, in one byte right after the header
_REPAIR_HINT = "re-save or re-download the adapter file"


class Encoding(enum.IntEnum):
    """Payload encodings. The ids are stored in files: never renumber, only append."""

    BITMAP = 0
    """Mask bitmap over all n positions + packed values of kept entries (n + k b bits + header)."""
    POSITIONS = 1
    """Sorted kept positions, Elias-Fano coded, + packed values of kept entries."""
    COMPLEMENT = 2
    """Sorted positions of the NOT-kept entries, Elias-Fano coded, + packed values of kept entries."""
    GROUPED_COO = 3
    """Per group of 2**j positions a count, per kept entry its offset in the group, + packed values (version 3)."""


@dataclass(frozen=True)
class Header:
    """The fixed header of a switch blob."""

    version: int
    encoding: Encoding
    numel: int
    kept: int
    value_bits: int = VALUE_BITS


def blob_version(encoding: Encoding, value_bits: int) -> int:
    """The version a blob carries: 3 when it needs it (``value_bits > 1`` or GROUPED_COO), else 2."""
    return FORMAT_VERSION if value_bits > 1 or encoding == Encoding.GROUPED_COO else PLAIN_VERSION


def check_value_bits(value_bits: int) -> int:
    """``value_bits`` if it is one of :data:`VALUE_BITS_CHOICES`; :class:`CodecError` naming the valid ones."""
    if isinstance(value_bits, bool) or value_bits not in VALUE_BITS_CHOICES:
        valid = ", ".join(str(bits) for bits in VALUE_BITS_CHOICES)
        raise CodecError(f"value bits must be one of {valid}, got {value_bits!r}.")
    return int(value_bits)


def level_multipliers(levels: torch.Tensor, value_bits: int) -> torch.Tensor:
    """The odd integer ``2u - (2**b - 1)`` of every level ``u`` (int16): the value of a kept entry in scales."""
    return levels.to(torch.int16) * 2 - ((1 << value_bits) - 1)


def entropy_bound_bits(numel: int, kept: int, value_bits: int = VALUE_BITS) -> float:
    """Information-theoretic size of a random switch: ``n H(k/n) + k b`` bits (mask entropy + value bits)."""
    if numel < 0 or not 0 <= kept <= numel:
        raise ValueError(f"need 0 <= kept <= numel, got numel={numel}, kept={kept}.")
    values = float(kept * value_bits)
    if kept in (0, numel):
        return values
    density = kept / numel
    entropy = -density * math.log2(density) - (1.0 - density) * math.log2(1.0 - density)
    return numel * entropy + values


def _position_bits(encoding: Encoding, numel: int, kept: int) -> int:
    """Exact bits of the position part of a payload (parameter byte included), with the writer's best parameter."""
    if encoding == Encoding.BITMAP:
        return numel
    if encoding == Encoding.GROUPED_COO:
        group_bits = grouped_coo.best_group_bits(numel, kept)
        return _PARAM_BYTES * 8 + grouped_coo.stream_bits(numel, kept, group_bits)
    count = kept if encoding == Encoding.POSITIONS else numel - kept
    return _PARAM_BYTES * 8 + elias_fano.stream_bits(numel, count, elias_fano.best_low_bits(numel, count))


def encoded_sizes_for_counts(numel: int, kept: int, value_bits: int = VALUE_BITS) -> dict[Encoding, int]:
    """Exact blob size in bits (header + payload, before byte padding) of each encoding, given n, k and b."""
    if numel < 0 or not 0 <= kept <= numel:
        raise ValueError(f"need 0 <= kept <= numel, got numel={numel}, kept={kept}.")
    check_value_bits(value_bits)
    fixed = HEADER_BYTES * 8 + kept * value_bits
    return {encoding: fixed + _position_bits(encoding, numel, kept) for encoding in Encoding}


def encoded_sizes_bits(mask: torch.Tensor, value_bits: int = VALUE_BITS) -> dict[Encoding, int]:
    """Exact blob size in bits (header + payload, before byte padding) of every encoding for ``mask``.

    Closed-form from ``n = mask.numel()``, ``k = count_nonzero(mask)`` and ``b = value_bits``; nothing is encoded.
    The blob written by :func:`encode` is ``ceil(size / 8)`` bytes long.
    """
    return encoded_sizes_for_counts(mask.numel(), int(torch.count_nonzero(mask)), value_bits)


def _choose(sizes: dict[Encoding, int]) -> Encoding:
    return min(sizes, key=lambda encoding: (sizes[encoding], int(encoding)))


def _value_stream(
    kept: int, positive: torch.Tensor | None, levels: torch.Tensor | None, value_bits: int, device: torch.device
) -> torch.Tensor:
    """The ``k * b`` value bits of a switch, after checking ``positive`` / ``levels`` (``ValueError`` if malformed)."""
    if positive is not None:
        if positive.dtype != torch.bool:
            raise ValueError(f"positive must be a bool tensor, got {positive.dtype}.")
        positive = positive.reshape(-1).to(device)
        if positive.numel() != kept:
            raise ValueError(
                f"positive must hold one sign per kept entry: the mask keeps {kept} entries but positive has "
                f"{positive.numel()}."
            )
    if levels is None:
        if value_bits != 1:
            raise ValueError(f"value_bits={value_bits} needs levels: one uint8 level per kept entry.")
        if positive is None:
            raise ValueError("encode needs positive (the signs) or levels.")
        return positive
    if levels.dtype != torch.uint8:
        raise ValueError(f"levels must be a uint8 tensor, got {levels.dtype}.")
    levels = levels.reshape(-1).to(device)
    if levels.numel() != kept:
        raise ValueError(
            f"levels must hold one level per kept entry: the mask keeps {kept}, levels has {levels.numel()}."
        )
    if kept and int(levels.max()) >= 1 << value_bits:
        raise ValueError(f"levels must be below 2**{value_bits} = {1 << value_bits}, got {int(levels.max())}.")
    if positive is not None and not torch.equal(positive, levels >= 1 << (value_bits - 1)):
        raise ValueError(f"positive disagrees with levels: it must equal levels >= {1 << (value_bits - 1)}.")
    return pack_fields(levels, value_bits)


def _nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Sorted int64 positions of the set entries of the flat bool ``mask`` (numpy on the CPU, several times faster)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return torch.nonzero(mask).reshape(-1)


def _payload(positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The packed payload bytes (CPU) of the position stream followed by the value stream."""
    if positions.device.type == "cpu" and values.device.type == "cpu":
        return pack_bits(torch.from_numpy(np.concatenate([positions.numpy(), values.numpy()])))
    return pack_bits(torch.cat([positions, values])).cpu()


def _position_stream(mask: torch.Tensor, encoding: Encoding, kept: int) -> tuple[bytes, torch.Tensor]:
    """The parameter byte (empty for BITMAP) and the position bit stream of ``mask`` in ``encoding``."""
    numel = mask.numel()
    if encoding == Encoding.BITMAP:
        return b"", mask
    if encoding == Encoding.GROUPED_COO:
        group_bits = grouped_coo.best_group_bits(numel, kept)
        positions = _nonzero(mask)
        return bytes([group_bits]), grouped_coo.encode(positions, numel, group_bits)
    coded = mask if encoding == Encoding.POSITIONS else ~mask
    count = kept if encoding == Encoding.POSITIONS else numel - kept
    low_bits = elias_fano.best_low_bits(numel, count)
    positions = _nonzero(coded)
    return bytes([low_bits]), elias_fano.encode(positions, numel, low_bits)


def encode(
    mask: torch.Tensor,
    positive: torch.Tensor | None,
    encoding: Encoding | None = None,
    *,
    value_bits: int = VALUE_BITS,
    levels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Encode a switch into a blob: a 1-D uint8 CPU tensor (header, then payload; see the module docstring).

    ``mask`` is a bool tensor over all ``n`` positions (flattened row-major if it is not 1-D). The values of the
    ``k == mask.sum()`` kept entries, in position order, are ``positive`` (bool signs) for ``value_bits=1``, or
    ``levels`` (uint8, each below ``2**value_bits``) for any ``value_bits`` in 1, 2, 4, 8; when both are given,
    ``positive`` must equal ``levels >= 2**(value_bits - 1)``. ``encoding=None`` picks the smallest candidate of
    :func:`encoded_sizes_bits` (ties go to the lowest id). The output is deterministic. Raises ``ValueError`` on
    malformed inputs and :class:`CodecError` (a ``ValueError``) for value bits outside 1, 2, 4, 8.
    """
    check_value_bits(value_bits)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}.")
    mask = mask.reshape(-1)
    kept = int(np.count_nonzero(mask.numpy())) if mask.device.type == "cpu" else int(torch.count_nonzero(mask))
    values = _value_stream(kept, positive, levels, value_bits, mask.device)
    sizes = encoded_sizes_for_counts(mask.numel(), kept, value_bits)
    encoding = _choose(sizes) if encoding is None else Encoding(encoding)
    version = blob_version(encoding, value_bits)
    header = _HEADER_STRUCT.pack(MAGIC, version, int(encoding), value_bits, mask.numel(), kept)
    parameter, positions = _position_stream(mask, encoding, kept)
    prefix = torch.tensor(list(header + parameter), dtype=torch.uint8)
    blob = torch.from_numpy(np.concatenate([prefix.numpy(), _payload(positions, values).numpy()]))
    assert blob.numel() == -(-sizes[encoding] // 8), "internal error: blob size differs from the prediction"
    return blob


#: Widest Elias-Fano low field the fused encoder writes.
_KERNEL_LOW_BITS = 56


def _coded_scratch(encoding: Encoding, numel: int, kept: int) -> np.ndarray:
    """Room for the positions an Elias-Fano encoding codes (plus one spare slot), int32 when they fit."""
    if encoding == Encoding.BITMAP:
        return np.zeros(0, dtype=np.int32)
    count = kept if encoding == Encoding.POSITIONS else numel - kept
    return np.empty(count + 1, dtype=np.int32 if numel <= INT32_LIMIT else np.int64)


def encode_signs_fast(
    bits: np.ndarray, cuts: tuple[int, int], ties: tuple[int, int], kept: int, kept_bits: np.ndarray | None = None
) -> torch.Tensor | None:
    """The blob :func:`encode` writes for a 1-bit switch whose mask and signs are given by thresholds on the float32
    bit patterns ``bits`` (see :func:`switch_adapter.codec._numba_codec.encode_switch`: ``cuts`` and ``ties`` per
    sign, positive first), built by the numba kernel; None when the kernels are unavailable, SASS picks GROUPED_COO
    or the Elias-Fano fields are wider than 56 bits (the caller then encodes the mask). ``kept`` must be the number
    of entries the cuts keep; the bit patterns of the kept entries go to ``kept_bits`` (uint32, ``kept`` long) when
    given."""
    kernels = numba_codec()
    numel = bits.shape[0]
    sizes = encoded_sizes_for_counts(numel, kept, VALUE_BITS)
    encoding = _choose(sizes)
    if kernels is None or encoding == Encoding.GROUPED_COO:
        return None
    low_bits = 0
    if encoding != Encoding.BITMAP:
        low_bits = elias_fano.best_low_bits(numel, kept if encoding == Encoding.POSITIONS else numel - kept)
        if low_bits > _KERNEL_LOW_BITS:  # wider fields than the kernel's 64-bit writer takes (huge sparse tensors)
            return None
    header = _HEADER_STRUCT.pack(MAGIC, blob_version(encoding, VALUE_BITS), int(encoding), VALUE_BITS, numel, kept)
    prefix = header + (b"" if encoding == Encoding.BITMAP else bytes([low_bits]))
    size = -(-sizes[encoding] // 8)
    blob = np.zeros(size + 9, dtype=np.uint8)  # spare bytes for the kernel's 64-bit writes, dropped below
    blob[: len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    cut_array, tie_array = np.array(cuts, dtype=np.int64), np.array(ties, dtype=np.int64)
    listed = -1
    if encoding == Encoding.POSITIONS and kept_bits is None and numel <= INT32_LIMIT:
        coded = np.empty(kept + 9, dtype=np.int32)  # 8 spare slots for the kernel's 8-wide stores
        listed = kernels.list_kept(bits, cut_array, tie_array, coded)
    else:
        coded = _coded_scratch(encoding, numel, kept)
    taken = kernels.encode_switch(
        bits, cut_array, tie_array, int(encoding), kept, low_bits, blob[len(prefix) :], coded,
        np.zeros(0, dtype=np.uint32) if kept_bits is None else kept_bits, listed,
    )  # fmt: skip
    if taken != kept or blob[size:].any():
        raise RuntimeError(f"internal error: the switch keeps {taken} entries, expected {kept}")
    return torch.from_numpy(blob[:size])


# -- decoding --------------------------------------------------------------------------------------------------------


def _corrupt(message: str) -> CodecError:
    return CodecError(f"switch blob {message}; {_REPAIR_HINT}.")


def _check_blob_type(blob: object) -> None:
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        described = (
            f"{blob.dtype} tensor of shape {tuple(blob.shape)}" if isinstance(blob, torch.Tensor) else type(blob)
        )
        raise CodecError(
            f"a switch blob must be a 1-D uint8 tensor, got a {described}; pass the tensor exactly as it was "
            "stored in the adapter file."
        )


def _head(blob: torch.Tensor, count: int) -> bytes:
    """The first ``count`` bytes of ``blob`` (through numpy on the CPU: no torch indexing per header field)."""
    if blob.device.type == "cpu":
        return blob.numpy()[:count].tobytes()
    return bytes(blob[:count].cpu().tolist())


def _read_version(blob: torch.Tensor) -> int:
    """The version byte, after checking the length and the magic."""
    length = blob.numel()
    if length < 5:
        raise _corrupt(f"is truncated or corrupt (only {length} bytes, the header needs {HEADER_BYTES})")
    start_bytes = _head(blob, 5)
    if start_bytes[:4] != MAGIC:
        raise _corrupt(f"is corrupt or not a switch blob (magic {start_bytes[:4]!r}, expected {MAGIC!r})")
    version = start_bytes[4]
    if version not in _HEADER_STRUCTS:
        if version > FORMAT_VERSION:
            raise CodecError(
                f"switch blob has format version {version}, but this switch_adapter reads versions up to "
                f"{FORMAT_VERSION}; upgrade switch-adapter to load this adapter."
            )
        raise _corrupt(f"has invalid format version {version}; it is corrupt")
    return version


def _read_encoding(encoding_id: int, version: int) -> Encoding:
    try:
        encoding = Encoding(encoding_id)
    except ValueError:
        known = ", ".join(f"{e.value}={e.name}" for e in Encoding)
        raise CodecError(
            f"switch blob uses unknown encoding id {encoding_id} (known: {known}); it was written by a newer "
            f"switch-adapter (upgrade it) or it is corrupt ({_REPAIR_HINT})."
        ) from None
    if encoding == Encoding.GROUPED_COO and version < FORMAT_VERSION:
        raise _corrupt(f"is corrupt (version {version} with encoding {encoding.name}, which needs version 3)")
    return encoding


def _read_value_bits(value_bits: int, version: int) -> int:
    if value_bits not in VALUE_BITS_CHOICES:
        valid = ", ".join(str(bits) for bits in VALUE_BITS_CHOICES)
        raise CodecError(
            f"switch blob stores kept values of {value_bits} bits; valid value bits are {valid}. It is corrupt "
            f"({_REPAIR_HINT}) or was written by a newer switch-adapter (upgrade it)."
        )
    if value_bits > 1 and version < FORMAT_VERSION:
        raise _corrupt(f"is corrupt (version {version} with {value_bits}-bit values, which need version 3)")
    return value_bits


def _read_header(blob: torch.Tensor) -> tuple[Header, int]:
    """The validated header of ``blob`` and its size in bytes."""
    version = _read_version(blob)
    layout = _HEADER_STRUCTS[version]
    if blob.numel() < layout.size:
        raise _corrupt(f"is truncated or corrupt (only {blob.numel()} bytes, the header needs {layout.size})")
    fields = layout.unpack(_head(blob, layout.size))
    if version == 1:
        _, _, encoding_id, numel, kept = fields
        value_bits = VALUE_BITS
    else:
        _, _, encoding_id, value_bits, numel, kept = fields
    encoding = _read_encoding(encoding_id, version)
    value_bits = _read_value_bits(value_bits, version)
    if kept > numel:
        raise _corrupt(f"is corrupt (header says {kept} kept entries out of {numel})")
    return Header(version=version, encoding=encoding, numel=numel, kept=kept, value_bits=value_bits), layout.size


def _read_parameter(blob: torch.Tensor, header: Header, header_bytes: int) -> int:
    """The parameter byte after the header (L or j; 0 for BITMAP), checked against its range."""
    if header.encoding == Encoding.BITMAP:
        return 0
    minimum = header_bytes + _PARAM_BYTES
    if blob.numel() < minimum:
        raise _corrupt(f"is truncated or corrupt (expected {minimum} bytes or more, got {blob.numel()})")
    parameter = _head(blob, header_bytes + 1)[header_bytes]
    if header.encoding == Encoding.GROUPED_COO:
        if not grouped_coo.MIN_GROUP_BITS <= parameter <= grouped_coo.MAX_GROUP_BITS:
            raise _corrupt(
                f"is corrupt (grouped COO group bits {parameter} outside "
                f"[{grouped_coo.MIN_GROUP_BITS}, {grouped_coo.MAX_GROUP_BITS}])"
            )
    elif parameter > elias_fano.MAX_LOW_BITS:
        raise _corrupt(f"is corrupt (Elias-Fano low-bit width {parameter} > {elias_fano.MAX_LOW_BITS})")
    return parameter


def _position_stream_bits(header: Header, parameter: int) -> int:
    """Bits of the position part of the payload (after the parameter byte) for the blob's own parameter."""
    numel, kept = header.numel, header.kept
    if header.encoding == Encoding.BITMAP:
        return numel
    if header.encoding == Encoding.GROUPED_COO:
        return grouped_coo.stream_bits(numel, kept, parameter)
    count = kept if header.encoding == Encoding.POSITIONS else numel - kept
    return elias_fano.stream_bits(numel, count, parameter)


def _parse(blob: torch.Tensor) -> tuple[Header, int, int, int]:
    """Validate ``blob``; return (header, parameter byte or 0, payload start offset, payload bits without padding)."""
    _check_blob_type(blob)
    header, header_bytes = _read_header(blob)
    parameter = _read_parameter(blob, header, header_bytes)
    start = header_bytes + (0 if header.encoding == Encoding.BITMAP else _PARAM_BYTES)
    payload_bits = _position_stream_bits(header, parameter) + header.kept * header.value_bits
    expected = start + -(-payload_bits // 8)
    if blob.numel() != expected:
        raise _corrupt(f"for this unit is truncated or corrupt (expected {expected} bytes, got {blob.numel()})")
    return header, parameter, start, payload_bits


def read_header(blob: torch.Tensor) -> Header:
    """Parse and validate the header of ``blob``: magic, version, encoding id, value bits, ``kept <= numel`` and
    that the blob length is exactly what the header implies. Raises :class:`CodecError` with the reason otherwise."""
    return _parse(blob)[0]


def _decode_positions(header: Header, parameter: int, bits: torch.Tensor) -> torch.Tensor:
    """Sorted int64 kept positions from the position part ``bits`` of a payload (``CodecError`` if inconsistent)."""
    numel, kept = header.numel, header.kept
    if header.encoding == Encoding.BITMAP:
        positions = torch.nonzero(bits).reshape(-1)
        if positions.numel() != kept:
            raise _corrupt(f"is corrupt (the bitmap keeps {positions.numel()} entries, the header says {kept})")
        return positions
    complement = header.encoding == Encoding.COMPLEMENT
    try:
        if header.encoding == Encoding.GROUPED_COO:
            return grouped_coo.decode(bits, numel, kept, parameter)
        positions = elias_fano.decode(bits, numel, numel - kept if complement else kept, parameter)
    except ValueError as error:
        raise _corrupt(f"is corrupt ({error})") from None
    if complement:
        mask = torch.ones(numel, dtype=torch.bool, device=bits.device)
        mask[positions] = False
        positions = torch.nonzero(mask).reshape(-1)
    return positions


def _decode(blob: torch.Tensor, device: torch.device | str | None) -> tuple[Header, torch.Tensor, torch.Tensor]:
    """``(header, positions, value bits)``: the decoded positions and the raw ``k * b`` value bit stream."""
    header, parameter, start, payload_bits = _parse(blob)
    target = blob.device if device is None else torch.device(device)
    payload = blob[start:].to(target)
    bits = unpack_bits(payload, payload.numel() * 8)
    if payload_bits < bits.numel() and bool(bits[payload_bits:].any()):
        raise _corrupt("is corrupt (nonzero padding bits after the payload)")
    values_at = payload_bits - header.kept * header.value_bits
    positions = _decode_positions(header, parameter, bits[:values_at])
    return header, positions, bits[values_at:payload_bits].clone()


def decode_positions(
    blob: torch.Tensor, device: torch.device | str | None = None
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(numel, positions, levels)``: the sorted int64 positions of the kept entries and their levels.

    For a 1-bit blob ``levels`` is the bool ``positive`` (the signs, ``True`` for +1), exactly as before multi-bit
    units existed; for ``b > 1`` it is a uint8 tensor of levels in ``[0, 2**b - 1]``. For the sparse encodings the
    work is proportional to the kept entries, not to ``numel``. Raises :class:`CodecError` like :func:`decode`.
    """
    header, positions, value_bits = _decode(blob, device)
    if header.value_bits == 1:
        return header.numel, positions, value_bits
    return header.numel, positions, unpack_fields(value_bits, header.kept, header.value_bits, torch.uint8)


def decode_values(
    blob: torch.Tensor, device: torch.device | str | None = None
) -> tuple[int, torch.Tensor, torch.Tensor, int]:
    """``(numel, positions, multipliers, value_bits)``: the kept positions (int64) and the odd integer of each kept
    entry (int16, ``2u - (2**b - 1)``; ``+-1`` for a 1-bit blob), so that a kept entry's value is
    ``scale * multiplier``. Raises :class:`CodecError` like :func:`decode`."""
    header, positions, value_bits = _decode(blob, device)
    levels = unpack_fields(value_bits, header.kept, header.value_bits, torch.uint8)
    return header.numel, positions, level_multipliers(levels, header.value_bits), header.value_bits


#: Positions of a tensor with at most this many entries fit in int32.
INT32_LIMIT: int = 2**31 - 1


def compact_dtypes(numel: int, value_bits: int) -> tuple[torch.dtype, torch.dtype]:
    """The narrowest exact dtypes of decoded ``(positions, multipliers)``: int32 positions (int64 for a tensor of
    ``2**31`` entries or more), int8 multipliers for up to 7 value bits (``|2u - (2**b - 1)| <= 127``), else int16."""
    return (
        torch.int32 if numel <= INT32_LIMIT else torch.int64,
        torch.int8 if value_bits <= 7 else torch.int16,
    )


def decode_compact(
    blob: torch.Tensor, device: torch.device | str | None = None
) -> tuple[int, torch.Tensor, torch.Tensor, int]:
    """:func:`decode_values` with the positions and multipliers in :func:`compact_dtypes` (the same values).

    On the CPU with the numba kernels (encodings BITMAP, POSITIONS, COMPLEMENT) the packed payload is decoded in one
    pass straight into those arrays; otherwise, and to report a corrupt blob, through :func:`decode_values`. Raises
    :class:`CodecError` like :func:`decode`."""
    header, parameter, start, payload_bits = _parse(blob)
    position_dtype, multiplier_dtype = compact_dtypes(header.numel, header.value_bits)
    target = blob.device if device is None else torch.device(device)
    kernels = numba_codec()
    if (
        kernels is not None
        and blob.device.type == "cpu"
        and target.type == "cpu"
        and header.encoding != Encoding.GROUPED_COO
    ):
        positions = torch.empty(header.kept, dtype=position_dtype)
        multipliers = torch.empty(header.kept, dtype=multiplier_dtype)
        status = kernels.decode_payload(
            blob.contiguous().numpy()[start:], int(header.encoding), header.numel, header.kept, parameter,
            payload_bits, header.value_bits, positions.numpy(), multipliers.numpy(),
        )  # fmt: skip
        if status == 0:
            return header.numel, positions, multipliers, header.value_bits
    numel, positions, multipliers, value_bits = decode_values(blob, device)
    return numel, positions.to(position_dtype), multipliers.to(multiplier_dtype), value_bits


def add_decoded(blob: torch.Tensor, flat: torch.Tensor, scale: torch.Tensor, alpha: float) -> bool:
    """In place, ``flat += alpha * delta`` of ``blob``'s kept entries (scaled by ``scale``: one, or one per row), as
    :func:`decode_compact` + :func:`~switch_adapter.codec.kernels.add_kept_values` compute it, bit for bit, in one
    numba call with no tensors built. Returns False, having changed nothing, where that does not apply (no numba, not
    a contiguous float32/float64 CPU ``flat``, GROUPED_COO) or the blob is damaged: the caller then decodes it, which
    reports the damage."""
    kernels = numba_codec()
    if kernels is None or blob.device.type != "cpu" or not adds_in_kernel(flat):
        return False
    try:
        header, parameter, start, payload_bits = _parse(blob)
    except CodecError:
        return False
    if header.encoding == Encoding.GROUPED_COO or header.numel != flat.numel():
        return False
    position_dtype, multiplier_dtype = compact_dtypes(header.numel, header.value_bits)
    status = kernels.decode_and_add(
        blob.contiguous().numpy()[start:], int(header.encoding), header.numel, header.kept, parameter, payload_bits,
        header.value_bits, np.empty(header.kept, dtype=_NUMPY_DTYPES[position_dtype]),
        np.empty(header.kept, dtype=_NUMPY_DTYPES[multiplier_dtype]), *add_arguments(flat, scale, alpha),
    )  # fmt: skip
    return status == 0


_NUMPY_DTYPES = {torch.int32: np.int32, torch.int64: np.int64, torch.int8: np.int8, torch.int16: np.int16}


def decode(blob: torch.Tensor, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode`: ``(mask, levels)``, a flat bool mask of ``numel`` entries and the ``kept`` levels as
    :func:`decode_positions` returns them (bool signs for a 1-bit blob, uint8 levels otherwise).

    The payload is decoded on ``device`` (default: the blob's device). Raises :class:`CodecError` if the blob
    is truncated, too long, corrupt (inconsistent payload, nonzero padding bits), of an unknown format version,
    of an unknown encoding or of value bits outside 1, 2, 4, 8.
    """
    numel, positions, levels = decode_positions(blob, device)
    mask = torch.zeros(numel, dtype=torch.bool, device=levels.device)
    mask[positions] = True
    return mask, levels
