"""numba versions of the kernels in :mod:`switch_adapter.autoswitch.kernels` (imported only when numba is present).

Arrays: ``positions`` / ``multipliers`` / ``offsets`` / ``row_ptr`` / ``scales`` / ``chunks`` as in
:class:`~switch_adapter.autoswitch.tables.EntryTable`; ``ptr`` / ``task`` / ``weight`` as in
:class:`~switch_adapter.autoswitch.kernels.RowAssignment`. Rows run in parallel; within a row the entries are read
once, in order.
"""

import numpy as np
from numba import njit, prange


@njit(inline="always", nogil=True)
def _add_row_entries(out, r, factor, t, start, stop, row_start, positions, multipliers, scales, chunk, cols):
    """``out[r, col] += factor * scale * multiplier`` for the entries ``start:stop`` of stored row ``row_start //
    cols`` of task ``t`` (one scale per row when the task's scale chunks are whole rows)."""
    if chunk % cols == 0:
        fs = factor * scales[t, row_start // chunk]
        for j in range(start, stop):
            out[r, positions[j] - row_start] += fs * multipliers[j]
    else:
        for j in range(start, stop):
            p = positions[j]
            out[r, p - row_start] += factor * scales[t, p // chunk] * multipliers[j]


@njit(parallel=True, cache=True, nogil=True)
def row_deltas(y, x, ptr, task, weight, positions, multipliers, offsets, row_ptr, scales, chunks, cols, transposed):
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
                    _add_row_entries(y, r, xo, t, start, stop, row_start, positions, multipliers, scales, chunk, cols)
                elif per_row_scale:
                    acc = 0.0
                    for j in range(start, stop):
                        acc += multipliers[j] * x[r, positions[j] - row_start]
                    y[r, o] += w * scales[t, row_start // chunk] * acc
                else:
                    acc = 0.0
                    for j in range(start, stop):
                        p = positions[j]
                        acc += scales[t, p // chunk] * multipliers[j] * x[r, p - row_start]
                    y[r, o] += w * acc


@njit(parallel=True, cache=True, nogil=True)
def embedding_deltas(y, ids, ptr, task, weight, positions, multipliers, offsets, row_ptr, scales, chunks, cols):
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
            _add_row_entries(y, r, w, t, start, stop, row_start, positions, multipliers, scales, chunk, cols)


@njit(cache=True, nogil=True)
def scatter(flat, tasks, weights, positions, multipliers, offsets, row_ptr, scales, chunks):
    numel = flat.shape[0]
    for index in range(tasks.shape[0]):
        t = tasks[index]
        w = weights[index]
        chunk = chunks[t]
        if chunk >= numel:  # one scale for the whole tensor
            ws = w * scales[t, 0]
            for j in range(offsets[t], offsets[t + 1]):
                flat[positions[j]] += ws * multipliers[j]
        else:
            for j in range(offsets[t], offsets[t + 1]):
                p = positions[j]
                flat[p] += w * scales[t, p // chunk] * multipliers[j]


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


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def lane_deltas(y, lanes, lane_rows, lane_ptr, task, weight, positions, multipliers, offsets, row_ptr, scales, chunks,
                cols):  # fmt: skip
    """``row_deltas`` for a linear layer whose rows are grouped in lanes of up to 8 rows sharing their tasks: slot
    ``k`` of lane ``l`` is row ``lane_rows[l * 8 + k]`` (empty when past ``y``'s rows), its inputs are
    ``lanes[(l * cols + c) * 8 + k]`` (:func:`pack_lanes`) and the lane uses ``task[lane_ptr[l]:lane_ptr[l + 1]]``.
    Each kept entry is read once per lane and applied to its 8 slots. Every task's scale must be one per tensor or
    one per stored row. Work is split over (lane, block of output rows), so no two threads write one value; indices
    are unsigned, so the inner loop has no wraparound checks."""
    rows = y.shape[0]
    outputs = row_ptr.shape[1] - 1
    block = 64
    blocks = (outputs + block - 1) // block
    eight = np.uint64(8)
    for job in prange((lane_rows.shape[0] // 8) * blocks):
        lane = job // blocks
        o_first = (job % blocks) * block
        o_last = min(outputs, o_first + block)
        slots = lane_rows[lane * 8 : lane * 8 + 8]
        x = lanes[lane * cols * 8 : (lane + 1) * cols * 8]
        for a in range(lane_ptr[lane], lane_ptr[lane + 1]):
            t = task[a]
            first = offsets[t]
            for o in range(o_first, o_last):
                start = first + row_ptr[t, o]
                stop = first + row_ptr[t, o + 1]
                if start == stop:
                    continue
                row_start = o * cols
                ws = weight[a] * scales[t, row_start // chunks[t]]
                a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
                for j in range(np.uint64(start), np.uint64(stop)):
                    m = np.float32(multipliers[j])
                    b = np.uint64(positions[j] - row_start) * eight
                    a0 += m * x[b]
                    a1 += m * x[b + np.uint64(1)]
                    a2 += m * x[b + np.uint64(2)]
                    a3 += m * x[b + np.uint64(3)]
                    a4 += m * x[b + np.uint64(4)]
                    a5 += m * x[b + np.uint64(5)]
                    a6 += m * x[b + np.uint64(6)]
                    a7 += m * x[b + np.uint64(7)]
                sums = (a0, a1, a2, a3, a4, a5, a6, a7)
                for k in range(8):
                    if slots[k] < rows:
                        y[slots[k], o] += ws * sums[k]


@njit(cache=True, nogil=True)
def scatter_saving(flat, tasks, weights, saved, positions, multipliers, offsets, row_ptr, scales, chunks):
    """``scatter``, first saving each touched value in ``saved`` (task after task, entry after entry)."""
    numel = flat.shape[0]
    q = 0
    for index in range(tasks.shape[0]):
        t = tasks[index]
        w = weights[index]
        chunk = chunks[t]
        for j in range(offsets[t], offsets[t + 1]):
            p = positions[j]
            saved[q] = flat[p]
            q += 1
            if chunk >= numel:
                flat[p] += w * scales[t, 0] * multipliers[j]
            else:
                flat[p] += w * scales[t, p // chunk] * multipliers[j]


@njit(cache=True, nogil=True)
def restore(flat, tasks, saved, positions, offsets):
    """Undo ``scatter_saving``: put the saved values back, last saved first."""
    q = saved.shape[0]
    for index in range(tasks.shape[0] - 1, -1, -1):
        t = tasks[index]
        for j in range(offsets[t + 1] - 1, offsets[t] - 1, -1):
            q -= 1
            flat[positions[j]] = saved[q]
