"""numba versions of the kernels in :mod:`switch_adapter.autoswitch.kernels` (imported only when numba is present).

Arrays: ``positions`` / ``multipliers`` / ``offsets`` / ``row_ptr`` / ``scales`` / ``chunks`` as in
:class:`~switch_adapter.autoswitch.tables.EntryTable`; ``ptr`` / ``task`` / ``weight`` as in
:class:`~switch_adapter.autoswitch.kernels.RowAssignment`. Rows run in parallel; within a row the entries are read
once, in order.
"""

from numba import njit, prange


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
                    if per_row_scale:
                        xs = xo * scales[t, row_start // chunk]
                        for j in range(start, stop):
                            y[r, positions[j] - row_start] += xs * multipliers[j]
                    else:
                        for j in range(start, stop):
                            p = positions[j]
                            y[r, p - row_start] += xo * scales[t, p // chunk] * multipliers[j]
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
            if chunk % cols == 0:  # one scale per stored row
                ws = w * scales[t, row_start // chunk]
                for j in range(start, stop):
                    y[r, positions[j] - row_start] += ws * multipliers[j]
            else:
                for j in range(start, stop):
                    p = positions[j]
                    y[r, p - row_start] += w * scales[t, p // chunk] * multipliers[j]


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
