"""numba kernels of the switch codec (imported only when numba is present; see :mod:`switch_adapter.codec.kernels`).

Every kernel reads or writes the packed LSB-first bit streams of :mod:`switch_adapter.codec.sass` directly, one pass
over the bits, and produces exactly what the numpy/torch reference produces. Decoders validate what they read and
return a non-zero status for a corrupt stream instead of raising; the caller then re-runs the reference decoder,
which raises the documented error. No kernel writes outside its output arrays, whatever the input.
"""

import numpy as np
from numba import njit

from .._simd import above_mask8, high_mask8, store_offsets8, tie_mask8

OK = 0
CORRUPT = 1
#: Index of the lowest set bit of each byte value (8 for 0).
_LOWEST_BIT = np.array([8] + [(value & -value).bit_length() - 1 for value in range(1, 256)], dtype=np.int64)
#: Set bits of each byte value, as a row of 8 offsets: the bits' indices first, then zeros (for store_offsets8).
_SET_BITS = np.array(
    [[bit for bit in range(8) if value >> bit & 1] + [0] * (8 - bin(value).count("1")) for value in range(256)],
    dtype=np.int32,
).reshape(-1)
#: Number of set bits of each byte value.
_BIT_COUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.int64)


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


#: De Bruijn sequence and table for the index of a 64-bit word's lowest set bit.
_DE_BRUIJN = np.uint64(0x03F79D71B4CB0A89)
_DE_BRUIJN_KEYS = [((1 << bit) * 0x03F79D71B4CB0A89 % (1 << 64)) >> 58 for bit in range(64)]  # a permutation of 0-63
_DE_BRUIJN_INDEX = np.argsort(_DE_BRUIJN_KEYS).astype(np.int64)  # key -> bit


@njit(inline="always", nogil=True)
def _lowest_set_bit(word):
    """Index of the lowest set bit of the nonzero int64 ``word`` (bits 0-55 used)."""
    lowest = np.uint64(word & -word)
    return _DE_BRUIJN_INDEX[(lowest * _DE_BRUIJN) >> np.uint64(58)]


@njit(inline="always", nogil=True)
def _window56(payload, bit, stop):
    """The 56 bits of ``payload`` from bit ``bit`` (LSB first) as an int64, those at or past bit ``stop`` cleared."""
    byte = bit >> 3
    shift = bit & 7
    last = min(byte + 8, payload.shape[0])
    value = np.int64(0)
    for index in range(byte, last):
        value |= np.int64(payload[index]) << (8 * (index - byte))
    value = (value >> shift) & ((np.int64(1) << 56) - 1) if shift else value & ((np.int64(1) << 56) - 1)
    if stop - bit < 56:
        value &= (np.int64(1) << (stop - bit)) - 1
    return value


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
        upper_stop = upper_start + (count + ((numel - count) >> low_bits) if count else 0)
        if upper_stop != value_bits_at:
            return CORRUPT
        found = 0  # Elias-Fano entries decoded
        emitted = 0  # kept positions written (complement)
        skipped = np.int64(-1)  # the last position that is not kept (complement)
        previous = np.int64(0)
        low_mask = (np.int64(1) << low_bits) - 1
        low_word = np.int64(0)  # the low-bit fields, read in order into a bit buffer
        low_filled = 0
        low_byte = 0
        for bit in range(upper_start, upper_stop, 56):  # the upper bits, 56 at a time
            word = _window56(payload, bit, upper_stop)
            while word:
                if found >= count:
                    return CORRUPT
                at = bit + _lowest_set_bit(word)
                word &= word - 1
                while low_filled < low_bits:  # low_bits <= 56: the buffer never overflows
                    low_word |= np.int64(payload[low_byte]) << low_filled
                    low_byte += 1
                    low_filled += 8
                value = ((at - upper_start - found) << low_bits) | (low_word & low_mask)
                low_word >>= low_bits
                low_filled -= low_bits
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
def decode_and_add(
    payload, encoding, numel, kept, parameter, payload_bits, value_bits, positions, multipliers, flat, scales, chunk,
    alpha,
):  # fmt: skip
    """:func:`decode_payload` into the scratch ``positions`` and ``multipliers``, then, for a sound payload only,
    :func:`add_kept` into ``flat``. Returns the decoder's status (nothing is added to ``flat`` unless ``OK``)."""
    status = decode_payload(payload, encoding, numel, kept, parameter, payload_bits, value_bits, positions, multipliers)
    if status == OK:
        add_kept(flat, positions, multipliers, scales, chunk, alpha)
    return status


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


# -- binarize + encode (the converter's fused path) ------------------------------------------------------------------

_SIGN = np.uint32(0x80000000)
_MAGNITUDE = np.uint32(0x7FFFFFFF)
_EXPONENT = np.uint32(0x7F800000)


@njit(cache=True, nogil=True)
def sign_histograms(bits, histograms):
    """One pass over the float32 bit patterns ``bits``: ``histograms`` (65536 long, seen as ``[2, 32768]``) counts
    at ``[s, h]`` the nonzero entries of sign ``s`` (0 positive, 1 negative) whose magnitude's high 16 bits are
    ``h`` (magnitudes of IEEE floats order like their bit patterns): one increment at the entry's own high 16 bits,
    zeros taken out at the end. Returns the largest magnitude's bit pattern: ``>= 0x7F800000`` when ``bits`` holds
    a NaN/Inf (the histograms are then meaningless)."""
    largest = np.uint32(0)
    positive_zeros = 0
    negative_zeros = 0
    for index in range(bits.shape[0]):
        value = bits[index]
        largest = max(largest, value & _MAGNITUDE)
        histograms[value >> 16] += 1
        positive_zeros += value == 0
        negative_zeros += value == 0x80000000
    histograms[0] -= positive_zeros
    histograms[0x8000] -= negative_zeros
    return largest


@njit(cache=True, nogil=True)
def low_histograms(bits, bins, histograms):
    """``histograms[s, l]`` counts the nonzero entries of sign ``s`` whose magnitude's high 16 bits are ``bins[s]``
    (-1: none) and low 16 bits are ``l``. Eight entries are compared at once; the few in a bin are counted one by
    one."""
    first = np.int64(bins[0]) if bins[0] >= 0 else np.int64(-1)  # high 16 bits of a positive entry: its bin
    second = (np.int64(bins[1]) | 0x8000) if bins[1] >= 0 else np.int64(-1)  # of a negative one: sign bit too
    numel = bits.shape[0]
    vectored = numel - numel % 8
    for start in range(0, vectored, 8):
        found = high_mask8(bits, start, first, second)
        while found:
            value = bits[start + _LOWEST_BIT[found]]
            found &= found - 1
            magnitude = value & _MAGNITUDE
            if magnitude != 0:
                histograms[value >> 31, magnitude & 0xFFFF] += 1
    for index in range(vectored, numel):
        value = bits[index]
        sign = value >> 31
        magnitude = value & _MAGNITUDE
        if np.int64(magnitude >> 16) == bins[sign] and magnitude != 0:
            histograms[sign, magnitude & 0xFFFF] += 1


@njit(cache=True, nogil=True)
def list_kept(bits, cuts, ties, positions):
    """The positions of the entries :func:`encode_switch` keeps, in order, into the int32 ``positions`` (which
    needs 8 spare slots past the kept ones), eight entries compared at once; ``ties`` is decremented in place as
    there. Returns the number kept, or more than ``len(positions) - 8`` when the cuts keep more (stopping early)."""
    numel = bits.shape[0]
    cut_positive, cut_negative = cuts[0], cuts[1]
    tied_positive, tied_negative = ties[0], ties[1]
    room = positions.shape[0] - 8
    taken = 0
    vectored = numel - numel % 8
    for start in range(0, vectored, 8):
        keep = above_mask8(bits, start, cut_positive, cut_negative)
        if tied_positive > 0 or tied_negative > 0:
            tied = tie_mask8(bits, start, cut_positive, cut_negative)
            while tied:  # rare: entries equal to a cut, kept in position order while their sign allows
                bit = _LOWEST_BIT[tied]
                tied &= tied - 1
                if bits[start + bit] >> 31:
                    if tied_negative > 0:
                        tied_negative -= 1
                        keep |= np.int64(1) << bit
                elif tied_positive > 0:
                    tied_positive -= 1
                    keep |= np.int64(1) << bit
        if taken > room:
            return taken
        store_offsets8(positions, taken, _SET_BITS, keep, start)
        taken += _BIT_COUNT[keep]
    for index in range(vectored, numel):
        value = bits[index]
        magnitude = np.int64(value & _MAGNITUDE)
        negative = value >> 31
        cut = cut_negative if negative else cut_positive
        keep = magnitude > cut
        if magnitude == cut and magnitude != 0:
            if negative and tied_negative > 0:
                tied_negative -= 1
                keep = True
            elif not negative and tied_positive > 0:
                tied_positive -= 1
                keep = True
        if keep:
            if taken >= room:
                return taken + 1
            positions[taken] = index
            taken += 1
    ties[0], ties[1] = tied_positive, tied_negative
    return taken


@njit(cache=True, nogil=True)
def top_rank(histogram, rank, top):
    """``(bin, above)``: the bin holding the ``rank``-th largest entry (1-based) of ``histogram`` and the number of
    entries in higher bins; the bins above ``top`` must be empty."""
    above = 0
    for index in range(min(top, histogram.shape[0] - 1), -1, -1):
        if above + histogram[index] >= rank:
            return index, above
        above += histogram[index]
    return -1, above


@njit(inline="always", nogil=True)
def _set_bit(out, bit):
    out[bit >> 3] |= np.uint8(1 << (bit & 7))


@njit(inline="always", nogil=True)
def _put_field(out, bit, value, width):
    """OR the low ``width`` bits of ``value`` into ``out`` from bit ``bit`` on (LSB first)."""
    value &= (np.int64(1) << width) - 1
    while width > 0:
        shift = bit & 7
        out[bit >> 3] |= np.uint8((value << shift) & 0xFF)
        taken = 8 - shift
        value >>= taken
        bit += taken
        width -= taken


@njit(inline="always", nogil=True)
def _or_bits(out, at, word, width):
    """OR the low ``width`` (<= 64) bits of the int64 ``word`` into ``out`` from bit ``at`` on, LSB first."""
    if width < 64:
        word &= (np.int64(1) << width) - 1
    shift = at & 7
    byte = at >> 3
    out[byte] |= np.uint8((word << shift) & 0xFF)
    done = 8 - shift
    byte += 1
    while done < width:
        # an arithmetic shift copies the sign bit: keep only the bits below ``width``
        out[byte] |= np.uint8((word >> done) & ((np.int64(1) << min(8, width - done)) - 1))
        done += 8
        byte += 1


@njit(inline="always", nogil=True)
def _push(out, at, word, filled, value, width):
    """Append the ``width``-bit ``value`` to the 64-bit buffer ``word`` (``filled`` bits used) that goes to ``out``
    at bit ``at``; a full buffer is written out. Returns the new ``(at, word, filled)``."""
    word |= value << filled
    if filled + width < 64:
        return at, word, filled + width
    _or_bits(out, at, word, 64)
    spill = filled + width - 64
    rest = (value >> (64 - filled)) if filled else np.int64(0)
    return at + 64, rest & ((np.int64(1) << spill) - 1), spill


@njit(cache=True, nogil=True)
def encode_switch(bits, cuts, ties, encoding, kept, low_bits, out, coded, kept_bits, listed_kept=-1):
    """Decide every entry's keep bit and write the blob payload into the zeroed ``out``.

    An entry of sign ``s`` (0 positive, 1 negative) is kept when its magnitude bits exceed ``cuts[s]``, or equal it
    while ``ties[s]`` (decremented in place) still allows, in position order; a cut of 0 keeps the whole sign.
    ``encoding`` is 0 (BITMAP), 1 (POSITIONS) or 2 (COMPLEMENT) with Elias-Fano ``low_bits`` (<= 56); the sign bits
    follow the position stream. One pass over ``bits`` collects the positions Elias-Fano codes into ``coded`` (one
    spare slot) and writes the mask bits of a BITMAP; a second pass over ``coded`` writes the Elias-Fano stream. The
    sign bits are written by the pass that sees the kept entries in order (the second one for POSITIONS). ``out``
    needs 8 spare bytes past the payload, left zero. The kept entries' bit patterns go to ``kept_bits`` when it has
    room for them. Returns the number kept; the caller checks that it equals ``kept`` (the kernel stops early
    rather than write past the payload). ``listed_kept >= 0``: ``coded`` already holds that many kept positions
    (:func:`list_kept`, POSITIONS without ``kept_bits``) and the first pass is skipped."""
    numel = bits.shape[0]
    store_values = kept_bits.shape[0] >= kept
    count = kept if encoding == 1 else numel - kept
    upper_at = count * low_bits
    if encoding == 0:
        values_at = numel
    elif count == 0:  # an empty Elias-Fano stream has no bits at all
        values_at = 0
    else:
        values_at = upper_at + count + ((numel - count) >> low_bits)
    sign_at, sign_word, sign_filled = values_at, np.int64(0), 0
    mask_at, mask_word, mask_filled = 0, np.int64(0), 0
    taken = 0  # kept so far
    listed = 0  # positions collected in ``coded``
    if listed_kept >= 0:
        taken = listed = listed_kept
    elif encoding == 1 and not store_values:  # the common case, as a tight loop of its own
        for index in range(numel):
            value = bits[index]
            sign = np.int64(value >> 31)
            magnitude = np.int64(value & _MAGNITUDE)
            cut = cuts[sign]
            keep = np.int64(magnitude > cut)
            if magnitude == cut and magnitude != 0 and ties[sign] > 0:  # rare: only entries tied at the cut
                ties[sign] -= 1
                keep = np.int64(1)
            coded[taken] = index  # branch-free: always write the slot (one spare), advance only when kept
            taken += keep
            if taken > kept:
                return taken
        listed = taken
    else:
        for index in range(numel):
            value = bits[index]
            sign = np.int64(value >> 31)
            magnitude = np.int64(value & _MAGNITUDE)
            cut = cuts[sign]
            keep = np.int64(magnitude > cut)
            if magnitude == cut and magnitude != 0 and ties[sign] > 0:  # rare: only entries tied at the cut
                ties[sign] -= 1
                keep = np.int64(1)
            if keep and taken >= kept:
                return kept + 1
            if encoding != 1:  # POSITIONS writes the signs in the second pass, from the listed positions
                sign_at, sign_word, sign_filled = _push(out, sign_at, sign_word, sign_filled, keep & (1 - sign), keep)
            if store_values and keep:
                kept_bits[taken] = value
            if encoding == 0:
                mask_at, mask_word, mask_filled = _push(out, mask_at, mask_word, mask_filled, keep, 1)
            else:  # branch-free: always write the slot, advance only for a listed entry
                if listed > count:
                    return kept + 1
                coded[listed] = index
                listed += keep if encoding == 1 else 1 - keep
            taken += keep
    if encoding != 1:
        _or_bits(out, sign_at, sign_word, sign_filled)
    if encoding == 0:
        _or_bits(out, mask_at, mask_word, mask_filled)
    elif listed != count:
        return kept + 1
    elif count:
        low_mask = (np.int64(1) << low_bits) - 1
        low_at, low_word, low_filled = 0, np.int64(0), 0
        upper_window, upper_word = upper_at, np.int64(0)
        for rank in range(count):
            shifted = np.int64(coded[rank]) - rank
            low_at, low_word, low_filled = _push(out, low_at, low_word, low_filled, shifted & low_mask, low_bits)
            upper = upper_at + (shifted >> low_bits) + rank
            while upper >= upper_window + 64:
                _or_bits(out, upper_window, upper_word, 64)
                upper_window += 64
                upper_word = np.int64(0)
            upper_word |= np.int64(1) << (upper - upper_window)
            if encoding == 1:
                sign = np.int64(bits[coded[rank]] >> 31)
                sign_at, sign_word, sign_filled = _push(out, sign_at, sign_word, sign_filled, 1 - sign, 1)
        _or_bits(out, sign_at, sign_word, sign_filled)
        _or_bits(out, low_at, low_word, low_filled)
        _or_bits(out, upper_window, upper_word, 64)
    return taken


@njit(cache=True, nogil=True)
def square_in_place(values):
    """``values[i] = values[i] * values[i]`` (the IEEE product torch's ``square`` computes), on one thread."""
    for index in range(values.shape[0]):
        values[index] = values[index] * values[index]


@njit(cache=True, nogil=True)
def any_nonzero(values):
    """Whether ``values`` holds an entry that is not zero (NaN counts), stopping at the first one."""
    for index in range(values.shape[0]):
        if values[index] != 0:
            return True
    return False
