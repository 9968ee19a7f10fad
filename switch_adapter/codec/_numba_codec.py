"""numba kernels of the switch codec (imported only when numba is present; see :mod:`switch_adapter.codec.kernels`).

Every kernel reads or writes the packed LSB-first bit streams of :mod:`switch_adapter.codec.sass` directly, one pass
over the bits, and produces exactly what the numpy/torch reference produces. Decoders validate what they read and
return a non-zero status for a corrupt stream instead of raising; the caller then re-runs the reference decoder,
which raises the documented error. No kernel writes outside its output arrays, whatever the input.
"""

import numpy as np
from numba import njit

OK = 0
CORRUPT = 1
#: Index of the lowest set bit of each byte value (8 for 0).
_LOWEST_BIT = np.array([8] + [(value & -value).bit_length() - 1 for value in range(1, 256)], dtype=np.int64)


@njit(inline="always", nogil=True)
def _field(payload, bit, width):
    """The ``width``-bit field (``width <= 62``) that starts at bit ``bit`` of ``payload``, LSB first, as int64."""
    byte = bit >> 3
    shift = bit & 7
    if width <= 25 and byte + 4 <= payload.shape[0]:  # the common case: one 32-bit window, no loop
        window = (
            np.int64(payload[byte])
            | (np.int64(payload[byte + 1]) << 8)
            | (np.int64(payload[byte + 2]) << 16)
            | (np.int64(payload[byte + 3]) << 24)
        )
        return (window >> shift) & ((np.int64(1) << width) - 1)
    value = np.int64(0)
    got = 0
    while got < width:
        value |= (np.int64(payload[byte]) >> shift) << got
        got += 8 - shift
        byte += 1
        shift = 0
    return value & ((np.int64(1) << width) - 1)


@njit(inline="always", nogil=True)
def _byte(payload, bit, stop):
    """The 8 bits of ``payload`` from bit ``bit`` (LSB first), those at or past bit ``stop`` cleared."""
    byte = bit >> 3
    shift = bit & 7
    value = np.int64(payload[byte]) >> shift
    if shift and byte + 1 < payload.shape[0]:
        value |= np.int64(payload[byte + 1]) << (8 - shift)
    if stop - bit < 8:
        value &= (np.int64(1) << (stop - bit)) - 1
    return value & 0xFF


@njit(inline="always", nogil=True)
def _bit(payload, bit):
    return (payload[bit >> 3] >> (bit & 7)) & 1


@njit(cache=True, nogil=True)
def decode_payload(payload, encoding, numel, kept, parameter, payload_bits, value_bits, positions, multipliers):
    """Decode a blob's payload (the bytes after the header and parameter byte) into ``positions`` (``kept`` sorted
    flat positions) and ``multipliers`` (``2u - (2**b - 1)`` of each kept entry). ``encoding`` is 0 (BITMAP), 1
    (POSITIONS) or 2 (COMPLEMENT); ``parameter`` the Elias-Fano low-bit width. Returns ``OK`` or ``CORRUPT``."""
    total = payload.shape[0] * 8
    if payload_bits > total or positions.shape[0] != kept or multipliers.shape[0] != kept:
        return CORRUPT
    for bit in range(payload_bits, total):  # padding bits must be zero
        if _bit(payload, bit):
            return CORRUPT
    value_bits_at = payload_bits - kept * value_bits
    if encoding == 0:
        if value_bits_at != numel:
            return CORRUPT
        found = 0
        for bit in range(0, numel, 8):
            chunk = _byte(payload, bit, numel)
            while chunk:
                if found >= kept:
                    return CORRUPT
                positions[found] = bit + _LOWEST_BIT[chunk]
                chunk &= chunk - 1
                found += 1
        if found != kept:
            return CORRUPT
    else:
        complement = encoding == 2
        count = numel - kept if complement else kept
        low_bits = parameter
        upper_start = count * low_bits
        upper_stop = upper_start + count + ((numel - count) >> low_bits)
        if upper_stop != value_bits_at:
            return CORRUPT
        found = 0  # Elias-Fano entries decoded
        emitted = 0  # kept positions written (complement)
        skipped = np.int64(-1)  # the last position that is not kept (complement)
        previous = np.int64(0)
        for bit in range(upper_start, upper_stop, 8):
            chunk = _byte(payload, bit, upper_stop)
            while chunk:
                if found >= count:
                    return CORRUPT
                at = bit + _LOWEST_BIT[chunk]
                chunk &= chunk - 1
                value = ((at - upper_start - found) << low_bits) | _field(payload, found * low_bits, low_bits)
                if value < previous or value > numel - count:
                    return CORRUPT
                previous = value
                position = value + found
                if complement:
                    if emitted + position - skipped - 1 > kept:
                        return CORRUPT
                    for between in range(skipped + 1, position):
                        positions[emitted] = between
                        emitted += 1
                    skipped = position
                else:
                    positions[found] = position
                found += 1
        if found != count:
            return CORRUPT
        if complement:
            if emitted + numel - skipped - 1 != kept:
                return CORRUPT
            for between in range(skipped + 1, numel):
                positions[emitted] = between
                emitted += 1
    if value_bits == 1:
        for index in range(kept):
            multipliers[index] = 2 * _bit(payload, value_bits_at + index) - 1
    else:
        for index in range(kept):
            level = _field(payload, value_bits_at + index * value_bits, value_bits)
            multipliers[index] = 2 * level - ((1 << value_bits) - 1)
    return OK


@njit(cache=True, nogil=True)
def add_kept(flat, positions, multipliers, scales, chunk, alpha):
    """``flat[p] += alpha * (multiplier * scale)`` at every kept position ``p``, rounded as torch's ``index_add_``
    of :func:`switch_adapter.format.kept_values` (``scales`` and ``alpha`` in ``flat``'s dtype; one scale, or one per
    ``chunk`` positions)."""
    if scales.shape[0] == 1:
        scale = scales[0]
        for j in range(positions.shape[0]):
            flat[positions[j]] += alpha * (multipliers[j] * scale)
    else:
        for j in range(positions.shape[0]):
            p = positions[j]
            flat[p] += alpha * (multipliers[j] * scales[p // chunk])
