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


@njit(parallel=True, cache=True, nogil=True, fastmath=True)
def run_deltas(y, xt, run_start, run_stop, run_ptr, task, weight, positions, multipliers, offsets, row_ptr, scales,
               chunks, cols):  # fmt: skip
    """``row_deltas`` for a linear layer whose rows come in runs sharing their tasks, with ``xt = x.T`` contiguous:
    each kept entry is read once per run and applied to 8 rows at a time. Every task's scale must be one per tensor
    or one per stored row. Work is split over (run, block of output rows), so no two threads write one value."""
    outputs = row_ptr.shape[1] - 1
    block = 32
    blocks = (outputs + block - 1) // block
    for job in prange(run_start.shape[0] * blocks):
        run = job // blocks
        o_first = (job % blocks) * block
        o_last = min(outputs, o_first + block)
        r_first = run_start[run]
        r_last = run_stop[run]
        for a in range(run_ptr[run], run_ptr[run + 1]):
            t = task[a]
            first = offsets[t]
            chunk = chunks[t]
            for o in range(o_first, o_last):
                start = first + row_ptr[t, o]
                stop = first + row_ptr[t, o + 1]
                if start == stop:
                    continue
                row_start = o * cols
                ws = weight[a] * scales[t, row_start // chunk]
                r = r_first
                while r + 8 <= r_last:
                    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
                    for j in range(start, stop):
                        m = np.float32(multipliers[j])
                        c = positions[j] - row_start
                        a0 += m * xt[c, r]
                        a1 += m * xt[c, r + 1]
                        a2 += m * xt[c, r + 2]
                        a3 += m * xt[c, r + 3]
                        a4 += m * xt[c, r + 4]
                        a5 += m * xt[c, r + 5]
                        a6 += m * xt[c, r + 6]
                        a7 += m * xt[c, r + 7]
                    y[r, o] += ws * a0
                    y[r + 1, o] += ws * a1
                    y[r + 2, o] += ws * a2
                    y[r + 3, o] += ws * a3
                    y[r + 4, o] += ws * a4
                    y[r + 5, o] += ws * a5
                    y[r + 6, o] += ws * a6
                    y[r + 7, o] += ws * a7
                    r += 8
                while r < r_last:
                    acc = np.float32(0.0)
                    for j in range(start, stop):
                        acc += np.float32(multipliers[j]) * xt[positions[j] - row_start, r]
                    y[r, o] += ws * acc
                    r += 1


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
