"""numba versions of the kernels in :mod:`switch_adapter.autoswitch.kernels` (imported only when numba is present).

Arrays: ``columns`` / ``multipliers`` / ``offsets`` / ``row_ptr`` / ``scales`` / ``chunks`` as in
:class:`~switch_adapter.autoswitch.tables.EntryTable`; ``ptr`` / ``task`` / ``weight`` as in
:class:`~switch_adapter.autoswitch.kernels.RowAssignment`. Rows run in parallel; within a row the entries are read
once, in order.
"""

import numpy as np
from numba import njit, prange

from .._simd import add8, fma8, fma8_into, lane8, load8, zeros8


@njit(inline="always", nogil=True)
def _add_row_entries(out, r, factor, t, start, stop, row_start, columns, multipliers, scales, chunk, cols):
    """``out[r, col] += factor * scale * multiplier`` for the entries ``start:stop`` of stored row ``row_start //
    cols`` of task ``t`` (one scale per row when the task's scale chunks are whole rows)."""
    if chunk % cols == 0:
        fs = factor * scales[t, row_start // chunk]
        for j in range(start, stop):
            out[r, columns[j]] += fs * multipliers[j]
    else:
        for j in range(start, stop):
            c = columns[j]
            out[r, c] += factor * scales[t, (row_start + c) // chunk] * multipliers[j]


@njit(parallel=True, cache=True, nogil=True)
def row_deltas(y, x, ptr, task, weight, columns, multipliers, offsets, row_ptr, scales, chunks, cols, transposed):
    stored_rows = row_ptr.shape[1] - 1
    for r in prange(x.shape[0]):
        for a in range(ptr[r], ptr[r + 1]):
            t = task[a]
            w = weight[a]
            first = offsets[t]
            chunk = chunks[t]
            per_row_scale = chunk % cols == 0
            for o in range(stored_rows):
                start = first + row_ptr[t, o]
                stop = first + row_ptr[t, o + 1]
                if start == stop:
                    continue
                row_start = o * cols
                if transposed:  # stored [in, out]: row o is input feature o
                    xo = x[r, o] * w
                    if xo == 0:
                        continue
                    _add_row_entries(y, r, xo, t, start, stop, row_start, columns, multipliers, scales, chunk, cols)
                elif per_row_scale:
                    acc = 0.0
                    for j in range(start, stop):
                        acc += multipliers[j] * x[r, columns[j]]
                    y[r, o] += w * scales[t, row_start // chunk] * acc
                else:
                    acc = 0.0
                    for j in range(start, stop):
                        c = columns[j]
                        acc += scales[t, (row_start + c) // chunk] * multipliers[j] * x[r, c]
                    y[r, o] += w * acc


@njit(parallel=True, cache=True, nogil=True)
def embedding_deltas(y, ids, ptr, task, weight, columns, multipliers, offsets, row_ptr, scales, chunks, cols):
    for r in prange(ids.shape[0]):
        i = ids[r]
        row_start = i * cols
        for a in range(ptr[r], ptr[r + 1]):
            t = task[a]
            w = weight[a]
            first = offsets[t]
            chunk = chunks[t]
            start = first + row_ptr[t, i]
            stop = first + row_ptr[t, i + 1]
            if start == stop:
                continue
            _add_row_entries(y, r, w, t, start, stop, row_start, columns, multipliers, scales, chunk, cols)


@njit(inline="always", nogil=True)
def _scatter_row(flat, saved, q, first, start, stop, row_start, t, w, columns, multipliers, scales, chunk, whole):
    """``flat[p] += w * value`` for the entries ``start:stop`` of one stored row (``p = row_start + column``); with a
    non-empty ``saved``, each touched value is saved first at ``saved[q + j - first]``."""
    ws = w * scales[t, 0]
    for j in range(start, stop):
        p = row_start + columns[j]
        if saved.shape[0]:
            saved[q + j - first] = flat[p]
        if whole:
            flat[p] += ws * multipliers[j]
        else:
            flat[p] += w * scales[t, p // chunk] * multipliers[j]


@njit(cache=True, nogil=True)
def scatter(flat, tasks, weights, columns, multipliers, offsets, row_ptr, scales, chunks):
    numel = flat.shape[0]
    rows = row_ptr.shape[1] - 1
    cols = numel // rows
    none = np.empty(0, dtype=flat.dtype)
    for index in range(tasks.shape[0]):
        t = tasks[index]
        first = offsets[t]
        whole = chunks[t] >= numel  # one scale for the whole tensor
        for o in range(rows):
            start, stop = first + row_ptr[t, o], first + row_ptr[t, o + 1]
            _scatter_row(flat, none, 0, first, start, stop, o * cols, t, weights[index], columns, multipliers, scales,
                         chunks[t], whole)  # fmt: skip


@njit(parallel=True, cache=True, nogil=True)
def pack_lanes(lanes, x, lane_rows):
    """``lanes[(l * cols + c) * 8 + k] = x[lane_rows[l * 8 + k], c]``, zero where ``lane_rows`` is past ``x``."""
    rows, cols = x.shape
    for lane in prange(lane_rows.shape[0] // 8):
        base = lane * cols * 8
        for k in range(8):
            r = lane_rows[lane * 8 + k]
            if r < rows:
                for c in range(cols):
                    lanes[base + c * 8 + k] = x[r, c]
            else:
                for c in range(cols):
                    lanes[base + c * 8 + k] = 0.0


@njit(inline="always", nogil=True)
def _lane_sum(x, columns, multipliers, start, stop):
    """``sum_j multipliers[j] * x[8 * columns[j] : +8]`` over the entries ``start:stop`` (unsigned),
    in four independent vector accumulators."""
    one, two, three, four, eight = np.uint64(1), np.uint64(2), np.uint64(3), np.uint64(4), np.uint64(8)
    a0, a1, a2, a3 = zeros8(), zeros8(), zeros8(), zeros8()
    j = start
    while j + three < stop:
        a0 = fma8(a0, multipliers[j], load8(x, np.uint64(columns[j]) * eight))
        a1 = fma8(a1, multipliers[j + one], load8(x, np.uint64(columns[j + one]) * eight))
        a2 = fma8(a2, multipliers[j + two], load8(x, np.uint64(columns[j + two]) * eight))
        a3 = fma8(a3, multipliers[j + three], load8(x, np.uint64(columns[j + three]) * eight))
        j += four
    while j < stop:
        a0 = fma8(a0, multipliers[j], load8(x, np.uint64(columns[j]) * eight))
        j += one
    return add8(add8(a0, a1), add8(a2, a3))


@njit(inline="always", nogil=True)
def _span_step(lanes, at, stride, m, s0, s1, s2, s3):
    """``s_i + m * lanes[at + i * stride : +8]`` for the four lanes of a span."""
    two, three = np.uint64(2), np.uint64(3)
    s0 = fma8(s0, m, load8(lanes, at))
    s1 = fma8(s1, m, load8(lanes, at + stride))
    s2 = fma8(s2, m, load8(lanes, at + two * stride))
    s3 = fma8(s3, m, load8(lanes, at + three * stride))
    return s0, s1, s2, s3


@njit(inline="always", nogil=True)
def _span_sums(lanes, base, stride, columns, multipliers, start, stop):
    """:func:`_lane_sum` of four lanes at once, the lanes at ``lanes[base:]``, ``lanes[base + stride:]``, ...: each
    entry's position and multiplier are read once for the four; two entries per step, in eight accumulators."""
    one, two, eight = np.uint64(1), np.uint64(2), np.uint64(8)
    s0, s1, s2, s3 = zeros8(), zeros8(), zeros8(), zeros8()
    t0, t1, t2, t3 = zeros8(), zeros8(), zeros8(), zeros8()
    j = start
    while j + one < stop:
        at = base + np.uint64(columns[j]) * eight
        s0, s1, s2, s3 = _span_step(lanes, at, stride, multipliers[j], s0, s1, s2, s3)
        at = base + np.uint64(columns[j + one]) * eight
        t0, t1, t2, t3 = _span_step(lanes, at, stride, multipliers[j + one], t0, t1, t2, t3)
        j += two
    if j < stop:
        at = base + np.uint64(columns[j]) * eight
        s0, s1, s2, s3 = _span_step(lanes, at, stride, multipliers[j], s0, s1, s2, s3)
    return add8(s0, t0), add8(s1, t1), add8(s2, t2), add8(s3, t3)


@njit(inline="always", nogil=True)
def _row_scale(scales, t, rows_per_scale, row, rows):
    """Task ``t``'s scale for stored row ``row`` of ``rows``: one per tensor (``rows_per_scale >= rows``) or one per
    ``rows_per_scale`` rows."""
    return scales[t, 0] if rows_per_scale >= rows else scales[t, row // rows_per_scale]


@njit(inline="always", nogil=True)
def _add_lane(y, lane_rows, lane, o, factor, sums):
    """``y[row of slot k, o] += factor * sums[k]`` for the non-empty slots of ``lane``."""
    for k in range(8):
        r = lane_rows[lane * 8 + k]
        if r < y.shape[0]:
            y[r, o] += factor * lane8(sums, k)


@njit(inline="always", nogil=True)
def _add_block(y, lane_rows, lane, sums, at, o_first, o_last):
    """``y[row of slot k, o] += sums[at + (o - o_first) * 8 + k]`` for the non-empty slots of ``lane`` and the outputs
    ``o_first:o_last``."""
    for k in range(8):
        r = lane_rows[lane * 8 + k]
        if r < y.shape[0]:
            for o in range(o_first, o_last):
                y[r, o] += sums[at + (o - o_first) * 8 + k]


@njit(parallel=True, cache=True, nogil=True)
def lane_deltas(y, lanes, lane_rows, lane_ptr, span_ptr, task, weight, columns, multipliers, offsets, row_ptr,
                scales, chunks, cols):  # fmt: skip
    """``row_deltas`` for a linear layer whose rows are grouped in lanes of up to 8 rows sharing their tasks: slot
    ``k`` of lane ``l`` is row ``lane_rows[l * 8 + k]`` (empty when past ``y``'s rows), its inputs are
    ``lanes[(l * cols + c) * 8 + k]`` (:func:`pack_lanes`) and the lane uses ``task[lane_ptr[l]:lane_ptr[l + 1]]``.
    Lanes ``span_ptr[s]:span_ptr[s + 1]`` (at most 4) share their tasks: a span of 4 reads each kept entry once for
    its 32 rows, other spans once per lane, and every entry is one vector multiply-add per lane. Every task's scale
    must be one per tensor or one per stored row. Work is split over (span, block of output rows), so no two threads
    write one value; a job sums its outputs' 8-row vectors in its own buffer and adds them to ``y`` at its end."""
    outputs = row_ptr.shape[1] - 1
    block = 64
    blocks = (outputs + block - 1) // block
    stride = np.uint64(cols * 8)
    eight = np.uint64(8)
    lane_sums = np.uint64(block * 8)  # one lane's part of a job's buffer
    for job in prange((span_ptr.shape[0] - 1) * blocks):
        span = job // blocks
        lane0 = span_ptr[span]
        width = span_ptr[span + 1] - lane0
        o_first = (job % blocks) * block
        o_last = min(outputs, o_first + block)
        sums = np.zeros(width * block * 8 if width > 1 else 0, dtype=np.float32)
        for a in range(lane_ptr[lane0], lane_ptr[lane0 + 1]):
            t = task[a]
            first = offsets[t]
            rows_per_scale = chunks[t] // cols  # at least ``outputs``: one scale for the tensor
            for o in range(o_first, o_last):
                start = np.uint64(first + row_ptr[t, o])
                stop = np.uint64(first + row_ptr[t, o + 1])
                if start == stop:
                    continue
                ws = np.float32(weight[a] * _row_scale(scales, t, rows_per_scale, o, outputs))
                at = np.uint64(o - o_first) * eight
                if width == 4:
                    s0, s1, s2, s3 = _span_sums(
                        lanes, np.uint64(lane0) * stride, stride, columns, multipliers, start, stop
                    )
                    fma8_into(sums, at, ws, s0)
                    fma8_into(sums, at + lane_sums, ws, s1)
                    fma8_into(sums, at + np.uint64(2) * lane_sums, ws, s2)
                    fma8_into(sums, at + np.uint64(3) * lane_sums, ws, s3)
                    continue
                for i in range(width):
                    lane = lane0 + i
                    x = lanes[lane * cols * 8 : (lane + 1) * cols * 8]
                    lane_sum = _lane_sum(x, columns, multipliers, start, stop)
                    if width == 1:  # one lane: straight into its rows
                        _add_lane(y, lane_rows, lane, o, ws, lane_sum)
                    else:
                        fma8_into(sums, at + np.uint64(i) * lane_sums, ws, lane_sum)
        if width > 1:
            for i in range(width):
                _add_block(y, lane_rows, lane0 + i, sums, i * block * 8, o_first, o_last)


@njit(parallel=True, cache=True, nogil=True)
def lane_deltas_transposed(y, lanes, lane_rows, lane_ptr, task, weight, columns, multipliers, offsets, row_ptr,
                           scales, chunks, cols):  # fmt: skip
    """:func:`lane_deltas` for a Conv1D layer (stored ``[in, out]``: stored row ``i`` is input ``i``, ``cols`` the
    outputs). Each lane sums its rows' changes in its own ``[out, 8]`` buffer, each kept entry one 8-wide
    multiply-add of its input's 8 values into its output's 8 sums; lanes run in parallel."""
    rows = y.shape[0]
    inputs = row_ptr.shape[1] - 1
    eight = np.uint64(8)
    for lane in prange(lane_rows.shape[0] // 8):
        slots = lane_rows[lane * 8 : lane * 8 + 8]
        x = lanes[lane * inputs * 8 : (lane + 1) * inputs * 8]
        sums = np.zeros(cols * 8, dtype=np.float32)
        for a in range(lane_ptr[lane], lane_ptr[lane + 1]):
            t = task[a]
            first = offsets[t]
            rows_per_scale = chunks[t] // cols  # at least ``inputs``: one scale for the tensor
            for i in range(inputs):
                start = np.uint64(first + row_ptr[t, i])
                stop = np.uint64(first + row_ptr[t, i + 1])
                if start == stop:
                    continue
                ws = np.float32(weight[a] * _row_scale(scales, t, rows_per_scale, i, inputs))
                inputs_i = load8(x, np.uint64(i) * eight)
                for j in range(start, stop):
                    fma8_into(sums, np.uint64(columns[j]) * eight, ws * multipliers[j], inputs_i)
        for k in range(8):
            r = slots[k]
            if r < rows:
                for c in range(cols):
                    y[r, c] += sums[c * 8 + k]


@njit(parallel=True, cache=True, nogil=True)
def scatter_saving(flat, tasks, weights, saved, columns, multipliers, offsets, row_ptr, scales, chunks):
    """``scatter``, first saving each touched value in ``saved`` (task after task, entry after entry). Tasks run
    one after another (two may touch one value); the rows of a task, whose entries are all distinct, in parallel."""
    numel = flat.shape[0]
    rows = row_ptr.shape[1] - 1
    cols = numel // rows
    q = 0
    for index in range(tasks.shape[0]):
        t = tasks[index]
        first = offsets[t]
        whole = chunks[t] >= numel
        for o in prange(rows):
            start, stop = first + row_ptr[t, o], first + row_ptr[t, o + 1]
            _scatter_row(flat, saved, q, first, start, stop, o * cols, t, weights[index], columns, multipliers,
                         scales, chunks[t], whole)  # fmt: skip
        q += offsets[t + 1] - first


@njit(parallel=True, cache=True, nogil=True)
def restore(flat, tasks, saved, columns, offsets, row_ptr):
    """Undo ``scatter_saving``: put the saved values back, the last task's first."""
    rows = row_ptr.shape[1] - 1
    cols = flat.shape[0] // rows
    q = saved.shape[0]
    for index in range(tasks.shape[0] - 1, -1, -1):
        t = tasks[index]
        first = offsets[t]
        q -= offsets[t + 1] - first
        for o in prange(rows):
            for j in range(first + row_ptr[t, o], first + row_ptr[t, o + 1]):
                flat[o * cols + columns[j]] = saved[q + j - first]
