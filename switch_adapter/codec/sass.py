"""SASS, the sparsity-aware storage strategy: the on-disk codec of one switch (mask + signs of kept entries).

A switch for a tensor with ``n`` entries is a flat keep-mask over the ``n`` positions (row-major) and the
signs of the ``k`` kept entries in position order. :func:`encode` turns it into a self-describing uint8
"blob"; :func:`decode` turns the blob back into ``(mask, positive)`` bit-exactly. The scale is not part of
the blob (it is one float or one float per row and is stored next to it).

Blob layout, format version 2 (all integers little-endian)::

    offset  size  field
    0       4     magic b"TSWB"
    4       1     format version (FORMAT_VERSION)
    5       1     encoding id (Encoding)
    6       1     value bits b: bits per kept value (1: the sign, T-Switch)
    7       8     numel n (uint64)
    15      8     kept k (uint64)
    23      ...   payload

Version 1 blobs have no value-bits byte (22-byte header, b = 1); they are still read.

Payloads, each a single LSB-first bit stream (see :mod:`switch_adapter.codec.bitpack`) padded with zero bits
to a whole byte; ``s`` is ``k * b`` bits of kept values in position order. With ``b = 1`` they are the signs of
the kept entries (1 = positive); wider values are reserved for units whose kept magnitudes carry more than one bit,
and this version of the library refuses them with a clear message:

* ``BITMAP``: ``n`` mask bits then ``s``. Size ``n + k b`` bits.
* ``POSITIONS``: one byte ``L`` then the Elias-Fano stream of the kept positions
  (:mod:`switch_adapter.codec.elias_fano`) then ``s``. Size ``8 + k (L + 1) + ((n - k) >> L) + k b`` bits.
* ``COMPLEMENT``: like ``POSITIONS`` but Elias-Fano codes the ``n - k`` positions that are *not* kept
  (cheaper when the density is above about one half).

With ``encoding=None`` :func:`encode` picks the candidate with the smallest exact size, computed in closed
form by :func:`encoded_sizes_bits`. For random masks of density 0.01 to 0.5 the chosen encoding stays within
about 1.09x of the entropy bound ``n H(k/n) + k`` (:func:`entropy_bound_bits`); ``benchmarks/storage.py``
measures it.

Everything runs with torch ops on the device of the inputs; only the header is parsed on the CPU.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass

import torch

from switch_adapter.codec import elias_fano
from switch_adapter.codec.bitpack import pack_bits, unpack_bits
from switch_adapter.errors import CodecError

FORMAT_VERSION: int = 2
MAGIC: bytes = b"TSWB"
_HEADER_STRUCTS = {1: struct.Struct("<4sBBQQ"), 2: struct.Struct("<4sBBBQQ")}
_HEADER_STRUCT = _HEADER_STRUCTS[FORMAT_VERSION]
#: Size of the fixed header (of the current version) in bytes.
HEADER_BYTES: int = _HEADER_STRUCT.size
#: Bits per kept value this version reads and writes (the sign).
VALUE_BITS: int = 1
_LOW_BITS_BYTES = 1  # the Elias-Fano encodings store L in one byte right after the header
_REPAIR_HINT = "re-save or re-download the adapter file"


class Encoding(enum.IntEnum):
    """Payload encodings. The ids are stored in files: never renumber, only append."""

    BITMAP = 0
    """Mask bitmap over all n positions + packed signs of kept entries (n + k bits + header)."""
    POSITIONS = 1
    """Sorted kept positions, Elias-Fano coded, + packed signs of kept entries."""
    COMPLEMENT = 2
    """Sorted positions of the NOT-kept entries, Elias-Fano coded, + packed signs of kept entries."""


@dataclass(frozen=True)
class Header:
    """The fixed header of a switch blob."""

    version: int
    encoding: Encoding
    numel: int
    kept: int
    value_bits: int = VALUE_BITS


def entropy_bound_bits(numel: int, kept: int) -> float:
    """Information-theoretic size of a random switch: ``n H(k/n) + k`` bits (mask entropy + sign bits)."""
    if numel < 0 or not 0 <= kept <= numel:
        raise ValueError(f"need 0 <= kept <= numel, got numel={numel}, kept={kept}.")
    if kept in (0, numel):
        return float(kept)
    density = kept / numel
    entropy = -density * math.log2(density) - (1.0 - density) * math.log2(1.0 - density)
    return numel * entropy + kept


def encoded_sizes_for_counts(numel: int, kept: int) -> dict[Encoding, int]:
    """Exact blob size in bits (header + payload, before byte padding) of each encoding, given n and k."""
    if numel < 0 or not 0 <= kept <= numel:
        raise ValueError(f"need 0 <= kept <= numel, got numel={numel}, kept={kept}.")
    header = HEADER_BYTES * 8
    sizes = {Encoding.BITMAP: header + numel + kept}
    for encoding, count in ((Encoding.POSITIONS, kept), (Encoding.COMPLEMENT, numel - kept)):
        low_bits = elias_fano.best_low_bits(numel, count)
        stream = elias_fano.stream_bits(numel, count, low_bits)
        sizes[encoding] = header + _LOW_BITS_BYTES * 8 + stream + kept
    return sizes


def encoded_sizes_bits(mask: torch.Tensor) -> dict[Encoding, int]:
    """Exact blob size in bits (header + payload, before byte padding) of every encoding for ``mask``.

    Closed-form from ``n = mask.numel()`` and ``k = count_nonzero(mask)``; nothing is encoded. The blob
    written by :func:`encode` is ``ceil(size / 8)`` bytes long.
    """
    return encoded_sizes_for_counts(mask.numel(), int(torch.count_nonzero(mask)))


def _choose(sizes: dict[Encoding, int]) -> Encoding:
    return min(sizes, key=lambda encoding: (sizes[encoding], int(encoding)))


def encode(mask: torch.Tensor, positive: torch.Tensor, encoding: Encoding | None = None) -> torch.Tensor:
    """Encode a switch into a blob: a 1-D uint8 CPU tensor (header, then payload; see the module docstring).

    ``mask`` is a bool tensor over all ``n`` positions (flattened row-major if it is not 1-D); ``positive`` is
    a bool tensor with one entry per kept position (``k == mask.sum()``), in position order. ``encoding=None``
    picks the smallest candidate of :func:`encoded_sizes_bits` (ties go to the lowest id). The output is
    deterministic: the same input gives the same bytes. Raises ``ValueError`` on malformed inputs.
    """
    if mask.dtype != torch.bool or positive.dtype != torch.bool:
        raise ValueError(f"mask and positive must be bool tensors, got {mask.dtype} and {positive.dtype}.")
    mask = mask.reshape(-1)
    positive = positive.reshape(-1).to(mask.device)
    numel = mask.numel()
    kept = int(torch.count_nonzero(mask))
    if positive.numel() != kept:
        raise ValueError(
            f"positive must hold one sign per kept entry: the mask keeps {kept} entries but positive has "
            f"{positive.numel()}."
        )
    sizes = encoded_sizes_for_counts(numel, kept)
    encoding = _choose(sizes) if encoding is None else Encoding(encoding)
    header = _HEADER_STRUCT.pack(MAGIC, FORMAT_VERSION, int(encoding), VALUE_BITS, numel, kept)
    if encoding == Encoding.BITMAP:
        prefix = header
        stream = torch.cat([mask, positive])
    else:
        coded = mask if encoding == Encoding.POSITIONS else ~mask
        count = kept if encoding == Encoding.POSITIONS else numel - kept
        low_bits = elias_fano.best_low_bits(numel, count)
        positions = torch.nonzero(coded).reshape(-1)
        prefix = header + bytes([low_bits])
        stream = torch.cat([elias_fano.encode(positions, numel, low_bits), positive])
    blob = torch.cat([torch.tensor(list(prefix), dtype=torch.uint8), pack_bits(stream).cpu()])
    assert blob.numel() == -(-sizes[encoding] // 8), "internal error: blob size differs from the prediction"
    return blob


def _corrupt(message: str) -> CodecError:
    return CodecError(f"switch blob {message}; {_REPAIR_HINT}.")


def _parse(blob: torch.Tensor) -> tuple[Header, int, int, int]:
    """Validate ``blob``; return (header, L or 0, payload start offset, payload bit count without padding)."""
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        described = (
            f"{blob.dtype} tensor of shape {tuple(blob.shape)}" if isinstance(blob, torch.Tensor) else type(blob)
        )
        raise CodecError(
            f"a switch blob must be a 1-D uint8 tensor, got a {described}; pass the tensor exactly as it was "
            "stored in the adapter file."
        )
    length = blob.numel()
    if length < 5:
        raise _corrupt(f"is truncated or corrupt (only {length} bytes, the header needs {HEADER_BYTES})")
    start_bytes = bytes(blob[:5].cpu().tolist())
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
    layout = _HEADER_STRUCTS[version]
    header_bytes = layout.size
    if length < header_bytes:
        raise _corrupt(f"is truncated or corrupt (only {length} bytes, the header needs {header_bytes})")
    head = bytes(blob[: header_bytes + _LOW_BITS_BYTES].cpu().tolist())
    if version == 1:
        _, _, encoding_id, numel, kept = layout.unpack(head[:header_bytes])
        value_bits = VALUE_BITS
    else:
        _, _, encoding_id, value_bits, numel, kept = layout.unpack(head[:header_bytes])
        if value_bits != VALUE_BITS:
            raise CodecError(
                f"switch blob stores kept values of {value_bits} bits; this switch_adapter reads {VALUE_BITS}-bit "
                "(sign) switches only. Upgrade switch-adapter to load this adapter."
            )
    try:
        encoding = Encoding(encoding_id)
    except ValueError:
        known = ", ".join(f"{e.value}={e.name}" for e in Encoding)
        raise CodecError(
            f"switch blob uses unknown encoding id {encoding_id} (known: {known}); it was written by a newer "
            f"switch-adapter (upgrade it) or it is corrupt ({_REPAIR_HINT})."
        ) from None
    if kept > numel:
        raise _corrupt(f"is corrupt (header says {kept} kept entries out of {numel})")
    header = Header(version=version, encoding=encoding, numel=numel, kept=kept, value_bits=value_bits)
    if encoding == Encoding.BITMAP:
        low_bits, start = 0, header_bytes
        payload_bits = numel + kept
    else:
        minimum = header_bytes + _LOW_BITS_BYTES
        if length < minimum:
            raise _corrupt(f"is truncated or corrupt (expected {minimum} bytes or more, got {length})")
        low_bits, start = head[header_bytes], header_bytes + _LOW_BITS_BYTES
        if low_bits > elias_fano.MAX_LOW_BITS:
            raise _corrupt(f"is corrupt (Elias-Fano low-bit width {low_bits} > {elias_fano.MAX_LOW_BITS})")
        count = kept if encoding == Encoding.POSITIONS else numel - kept
        payload_bits = elias_fano.stream_bits(numel, count, low_bits) + kept
    expected = start + -(-payload_bits // 8)
    if length != expected:
        raise _corrupt(f"for this unit is truncated or corrupt (expected {expected} bytes, got {length})")
    return header, low_bits, start, payload_bits


def read_header(blob: torch.Tensor) -> Header:
    """Parse and validate the header of ``blob``: magic, version, encoding id, ``kept <= numel`` and that the
    blob length is exactly what the header implies. Raises :class:`CodecError` with the reason otherwise."""
    return _parse(blob)[0]


def decode_positions(
    blob: torch.Tensor, device: torch.device | str | None = None
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(numel, positions, positive)``: the sorted int64 positions of the kept entries and their signs.

    For the Elias-Fano encodings the work is proportional to the kept entries, not to ``numel``. Raises
    :class:`CodecError` like :func:`decode`.
    """
    header, low_bits, start, payload_bits = _parse(blob)
    target = blob.device if device is None else torch.device(device)
    payload = blob[start:].to(target)
    bits = unpack_bits(payload, payload.numel() * 8)
    if payload_bits < bits.numel() and bool(bits[payload_bits:].any()):
        raise _corrupt("is corrupt (nonzero padding bits after the payload)")
    numel, kept = header.numel, header.kept
    signs_at = payload_bits - kept
    positive = bits[signs_at:payload_bits].clone()
    if header.encoding == Encoding.BITMAP:
        positions = torch.nonzero(bits[:numel]).reshape(-1)
        if positions.numel() != kept:
            raise _corrupt(f"is corrupt (the bitmap keeps {positions.numel()} entries, the header says {kept})")
        return numel, positions, positive
    complement = header.encoding == Encoding.COMPLEMENT
    count = numel - kept if complement else kept
    try:
        positions = elias_fano.decode(bits[:signs_at], numel, count, low_bits)
    except ValueError as error:
        raise _corrupt(f"is corrupt ({error})") from None
    if complement:
        mask = torch.ones(numel, dtype=torch.bool, device=target)
        mask[positions] = False
        positions = torch.nonzero(mask).reshape(-1)
    return numel, positions, positive


def decode(blob: torch.Tensor, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode`: ``(mask, positive)``, flat bool tensors of ``numel`` and ``kept`` entries.

    The payload is decoded on ``device`` (default: the blob's device). Raises :class:`CodecError` if the blob
    is truncated, too long, corrupt (inconsistent payload, nonzero padding bits), of an unknown format version
    or of an unknown encoding.
    """
    numel, positions, positive = decode_positions(blob, device)
    mask = torch.zeros(numel, dtype=torch.bool, device=positive.device)
    mask[positions] = True
    return mask, positive
