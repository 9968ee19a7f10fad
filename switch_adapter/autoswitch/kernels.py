"""Kernels that apply kept switch entries without building dense task weights.

- :func:`add_row_deltas`: ``y[r] += sum_(t, w) w * x[r] @ delta_t^T`` for the rows of a call, every row with its own
  tasks and weights, in one pass over the entries (linear layers, Conv1D, tied output layers).
- :func:`add_embedding_deltas`: the same for embedding lookups (the looked-up rows of each task's delta).
- :func:`scatter_deltas`: ``weight + sum_t w_t delta_t`` into a scratch buffer (composing one layer).

Each has a numba path for float32/float64 CPU tensors, used when numba is installed (``pip install
switch-adapter[fast]``), and a pure torch path used everywhere else (other dtypes, GPUs, no numba). Both compute
the same sums; only the order of float additions differs. ``SWITCH_ADAPTER_KERNELS=torch`` forces the torch path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from .._jit import load_kernels
from .tables import TRANSPOSED, EntryTable

logger = logging.getLogger(__name__)

LANE = 8  # rows the lane kernel applies each kept entry to at once
SPAN = 4  # lanes of one composition whose kept entries the lane kernel reads once for all of them
# On CPU, per-task matmuls on consecutive rows beat the stacked low-rank pairs once each used task has at least
# max(SLICE_MIN_ROWS, SLICE_ROWS_BY_TASKS / tasks used) rows on average: the stacked pair computes every task's
# ranks for every row (its cost grows with rows x tasks), the slices only their own (measured on SmolLM2-135M's
# projection shapes, r=8, 2-8 tasks: 0.5-0.97x of the stacked time from there, up to 1.7x slower below).
SLICE_MIN_ROWS = 16
SLICE_ROWS_BY_TASKS = 256


@lru_cache(maxsize=1)
def _numba_kernels():
    """The compiled numba kernels, or None when numba is missing or disabled."""
    return load_kernels(f"{__package__}._numba_kernels")


def fast_kernels_available() -> bool:
    """True when the numba kernels are used for float32/float64 CPU tensors."""
    return _numba_kernels() is not None


@dataclass
class RowAssignment:
    """For each row ``r`` of a call: the tasks (indices into the table's tasks) and weights it runs with,
    ``task[ptr[r]:ptr[r + 1]]`` and ``weight[ptr[r]:ptr[r + 1]]``."""

    ptr: np.ndarray  # int64 [rows + 1]
    task: np.ndarray  # int64 [assignments]
    weight: np.ndarray  # float32 [assignments]
    # The rows grouped by their tasks, in lanes of at most LANE rows: slot k of lane i is row lane_rows[i * LANE + k]
    # (``rows`` for an empty slot); the lane uses task[lane_ptr[i]:lane_ptr[i + 1]] (copies of its rows' entries).
    lane_rows: np.ndarray | None = None
    lane_ptr: np.ndarray | None = None
    lane_task: np.ndarray | None = None
    lane_weight: np.ndarray | None = None
    # Spans of at most SPAN consecutive lanes of one composition: span s is lanes span_ptr[s]:span_ptr[s + 1].
    span_ptr: np.ndarray | None = None
    _per_task: dict = field(default_factory=dict, repr=False)

    @property
    def rows(self) -> int:
        return self.ptr.shape[0] - 1

    def per_task(self, device: torch.device) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """``[(task, rows, weights)]``: the rows that use each task, with their weights (computed once per device)."""
        found = self._per_task.get(("index", device))
        if found is None:
            row = np.repeat(np.arange(self.rows), np.diff(self.ptr))
            found = []
            for task in np.unique(self.task):
                chosen = self.task == task
                rows = torch.from_numpy(row[chosen]).to(device)
                found.append((int(task), rows, torch.from_numpy(self.weight[chosen]).to(device)))
            self._per_task[("index", device)] = found
        return found

    def task_rows(self, device: torch.device) -> list[tuple[int, slice | torch.Tensor, torch.Tensor | None]]:
        """:meth:`per_task` with each task's rows as a slice where they are consecutive (samples of one composition
        sit next to each other in a call), and None for weights that are all 1."""
        found = self._per_task.get(("slices", device))
        if found is None:
            found = []
            for task, rows, weights in self.per_task(device):
                first, count = int(rows[0]), rows.numel()
                if int(rows[-1]) - first + 1 == count:  # ascending and distinct: consecutive
                    rows = slice(first, first + count)
                found.append((task, rows, None if bool((weights == 1).all()) else weights.unsqueeze(1)))
            self._per_task[("slices", device)] = found
        return found

    def rank_weights(self, blocks: tuple[tuple[int, int] | None, ...], device: torch.device) -> torch.Tensor | None:
        """``[rows, R]``: each row's weight for every rank column of a table's stacked low-rank pairs (``blocks``:
        :attr:`EntryTable.rank_blocks`), zero where the row does not use the task; None when the stacked matmuls
        would not pay: fewer than two of the tasks used, more than half of the stacked rank unused, or (on CPU)
        enough consecutive rows per task for per-task matmuls on slices (:meth:`slices_pay`)."""
        key = ("rank", blocks, device)
        if key not in self._per_task:
            used = {int(t) for t in np.unique(self.task) if blocks[t] is not None}
            total = max((b[1] for b in blocks if b is not None), default=0)
            used_rank = sum(blocks[t][1] - blocks[t][0] for t in used)
            found = None
            if len(used) >= 2 and 2 * used_rank >= total and not self.slices_pay(used, device):
                spread = np.zeros((self.rows, total), dtype=np.float32)
                row = np.repeat(np.arange(self.rows), np.diff(self.ptr))
                for task in used:
                    chosen = self.task == task
                    start, stop = blocks[task]
                    spread[row[chosen], start:stop] = self.weight[chosen][:, None]
                found = torch.from_numpy(spread).to(device)
            self._per_task[key] = found
        return self._per_task[key]

    def slices_pay(self, used: set[int], device: torch.device) -> bool:
        """Whether the tasks ``used`` run faster as per-task matmuls on row slices than as the stacked pairs: on CPU,
        when each one's rows are consecutive (a prefill of a batch sorted by composition) and there are enough of
        them (see ``SLICE_ROWS_BY_TASKS``)."""
        if torch.device(device).type != "cpu":
            return False
        spans = [rows for task, rows, _ in self.task_rows(device) if task in used]
        if len(spans) != len(used) or not all(isinstance(rows, slice) for rows in spans):
            return False
        mean_rows = sum(rows.stop - rows.start for rows in spans) / len(used)
        return mean_rows >= max(SLICE_MIN_ROWS, SLICE_ROWS_BY_TASKS / len(used))

    def lane_inputs(self, x: torch.Tensor) -> np.ndarray:
        """``x`` ``[rows, in]`` (float32, CPU) laid out lane after lane for the lane kernel: ``[(lane * in + c) *
        LANE + k] = x[row of slot k, c]``, zero in empty slots."""
        lanes = np.empty(len(self.lane_rows) * x.shape[1], dtype=np.float32)
        _numba_kernels().pack_lanes(lanes, x.numpy(), self.lane_rows)
        return lanes


def _numba_ready(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return (
        first.device.type == "cpu"
        and first.dtype in (torch.float32, torch.float64)
        and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
        and _numba_kernels() is not None
    )


def add_row_deltas(y: torch.Tensor, x: torch.Tensor, table: EntryTable, assignment: RowAssignment, kind: str) -> None:
    """In place, ``y[r] += sum_(t, w) w * x[r] @ delta_t^T`` with ``x`` ``[rows, in]``, ``y`` ``[rows, out]`` and the
    deltas of ``table`` (``kind`` ``linear``: stored ``[out, in]``; ``transposed``: stored ``[in, out]``)."""
    transposed = kind == TRANSPOSED
    if table.has_low_rank:
        _add_low_rank_rows(y, x, table, assignment, transposed)
    if not table.has_entries:
        return
    if y.dtype == x.dtype and _numba_ready(y, x) and table.device.type == "cpu":
        if y.dtype == torch.float32 and table.aligned_scales and assignment.lane_rows is not None:
            lanes = (assignment.lane_inputs(x), assignment.lane_rows, assignment.lane_ptr)
            if transposed:
                _numba_kernels().lane_deltas_transposed(
                    y.numpy(), *lanes, assignment.lane_task, assignment.lane_weight, *table.arrays(y.dtype), table.cols
                )
            else:
                _numba_kernels().lane_deltas(
                    y.numpy(), *lanes, assignment.span_ptr, assignment.lane_task, assignment.lane_weight,
                    *table.arrays(y.dtype), table.cols,
                )  # fmt: skip
            return
        _numba_kernels().row_deltas(
            y.numpy(), x.numpy(), assignment.ptr, assignment.task, assignment.weight,
            *table.arrays(y.dtype), table.cols, transposed,
        )  # fmt: skip
        return
    for task, rows, weights in assignment.per_task(y.device):
        if table.count(task) == 0:
            continue
        positions = table.positions(task)
        values = table.values(task, torch.float32, positions)
        stored_row, stored_col = positions // table.cols, positions % table.cols
        source, target = (stored_row, stored_col) if transposed else (stored_col, stored_row)
        gathered = x.index_select(0, rows).float().index_select(1, source) * values
        change = gathered.new_zeros((rows.numel(), y.shape[1])).index_add_(1, target, gathered)
        y.index_add_(0, rows, (change * weights.unsqueeze(1)).to(y.dtype))


def _add_low_rank_rows(
    y: torch.Tensor, x: torch.Tensor, table: EntryTable, assignment: RowAssignment, transposed: bool
) -> None:
    """The low-rank pairs' part of :func:`add_row_deltas`: ``y[rows of t] += w * x @ (left_t @ right_t)^T``
    (``x @ left @ right`` for a transposed layer). With several tasks in the call, two matmuls on the stacked pairs
    serve them all (the inner product weighted per row and rank column); otherwise two thin matmuls per task, as
    peft runs a LoRA."""
    spread = assignment.rank_weights(table.rank_blocks, y.device)
    if spread is not None:
        left, right = table.stacked_left, table.stacked_right
        inputs = x.to(left.dtype)
        hidden = (inputs @ left if transposed else inputs @ right.T).mul_(spread)
        _add_product(y, hidden, right if transposed else left.T)
        return
    for task, rows, weights in assignment.task_rows(y.device):
        pair = table.low_rank[task]
        if pair is None:
            continue
        left, right = pair
        inputs = (x[rows] if isinstance(rows, slice) else x.index_select(0, rows)).to(left.dtype)
        hidden = inputs @ left if transposed else inputs @ right.T
        if weights is not None:
            hidden = hidden * weights
        out_factor = right if transposed else left.T
        if isinstance(rows, slice):
            _add_product(y[rows], hidden, out_factor)
        else:
            y.index_add_(0, rows, (hidden @ out_factor).to(y.dtype))


def _add_product(y: torch.Tensor, hidden: torch.Tensor, factor: torch.Tensor) -> None:
    """In place, ``y += hidden @ factor`` (computed in the factors' dtype)."""
    if y.dtype == hidden.dtype:
        y.addmm_(hidden, factor)
    else:
        y += (hidden @ factor).to(y.dtype)


def add_embedding_deltas(y: torch.Tensor, ids: torch.Tensor, table: EntryTable, assignment: RowAssignment) -> None:
    """In place, ``y[r] += sum_(t, w) w * delta_t[ids[r]]`` with ``ids`` ``[rows]`` and ``y`` ``[rows, dim]``."""
    if table.has_low_rank:
        for task, rows, weights in assignment.per_task(y.device):
            if table.low_rank[task] is not None:
                left, right = table.low_rank[task]
                change = left.index_select(0, ids.index_select(0, rows).long()) @ right
                y.index_add_(0, rows, (change * weights.unsqueeze(1)).to(y.dtype))
    if not table.has_entries:
        return
    if _numba_ready(y) and ids.device.type == "cpu" and table.device.type == "cpu":
        _numba_kernels().embedding_deltas(
            y.numpy(), ids.long().contiguous().numpy(), assignment.ptr, assignment.task, assignment.weight,
            *table.arrays(y.dtype), table.cols,
        )  # fmt: skip
        return
    for task, rows, weights in assignment.per_task(y.device):
        if table.count(task) == 0:
            continue
        start = int(table.offsets[task])
        row_ptr = table.row_ptr[task].long()
        looked_up = ids.index_select(0, rows).long()
        first, counts = row_ptr[looked_up], row_ptr[looked_up + 1] - row_ptr[looked_up]
        total = int(counts.sum())
        if total == 0:
            continue
        owner = torch.repeat_interleave(torch.arange(rows.numel(), device=y.device), counts)
        within = torch.arange(total, device=y.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        entries = start + torch.repeat_interleave(first, counts) + within
        values = table.values(task, torch.float32)
        local = entries - start
        columns = table.columns[entries].long()
        change = torch.zeros((rows.numel(), y.shape[1]), device=y.device)
        change.index_put_((owner, columns), values[local] * weights[owner], accumulate=True)
        y.index_add_(0, rows, change.to(y.dtype))


def scatter_deltas(flat: torch.Tensor, table: EntryTable, weights: list[tuple[int, float]]) -> None:
    """In place, ``flat += sum_(t, w) w * delta_t`` for a flat view of one layer's weight."""
    for task, weight in weights:
        if table.low_rank[task] is not None:
            left, right = table.low_rank[task]
            flat.view(table.rows, table.cols).addmm_(left.to(flat.dtype), right.to(flat.dtype), alpha=weight)
    if _numba_ready(flat) and table.device.type == "cpu":
        tasks = np.array([t for t, _ in weights], dtype=np.int64)
        scaled = np.array([w for _, w in weights], dtype=np.float64)
        _numba_kernels().scatter(flat.numpy(), tasks, scaled, *table.arrays(flat.dtype))
        return
    for task, weight in weights:
        if table.count(task):
            positions = table.positions(task)
            flat.index_add_(0, positions, table.values(task, flat.dtype, positions), alpha=weight)


def add_in_place(flat: torch.Tensor, table: EntryTable, weights: list[tuple[int, float]]) -> Callable[[], None]:
    """:func:`scatter_deltas` into a live weight, saving the values it changes; returns the function that puts them
    back exactly (call it once, also when the work in between failed). Entry tables only: a low-rank pair changes
    every value, so its layer runs streamed instead."""
    if table.low_rank_tasks(t for t, _ in weights):
        raise ValueError("add_in_place cannot save and restore a low-rank change; run the layer streamed instead.")
    used = [(t, w) for t, w in weights if table.count(t)]
    if not used:
        return lambda: None
    if _numba_ready(flat) and table.device.type == "cpu":
        arrays = table.arrays(flat.dtype)
        tasks = np.array([t for t, _ in used], dtype=np.int64)
        saved = np.empty(sum(table.count(t) for t, _ in used), dtype=flat.numpy().dtype)
        _numba_kernels().scatter_saving(
            flat.numpy(), tasks, np.array([w for _, w in used], dtype=np.float64), saved, *arrays
        )
        return lambda: _numba_kernels().restore(flat.numpy(), tasks, saved, arrays[0], arrays[2], arrays[3])
    saved = []
    for task, weight in used:
        positions = table.positions(task)
        values = table.values(task, flat.dtype, positions)
        saved.append((positions, flat[positions].clone()))
        flat.index_add_(0, positions, values, alpha=weight)

    def put_back() -> None:
        for positions, originals in reversed(saved):
            flat[positions] = originals

    return put_back


def assignment_for_rows(row_sample: np.ndarray, sample_tasks: list[list[tuple[int, float]]]) -> RowAssignment:
    """The :class:`RowAssignment` of rows whose samples are ``row_sample``; sample ``s`` runs ``sample_tasks[s]``."""
    counts = np.array([len(a) for a in sample_tasks], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    flat_task = np.array([t for a in sample_tasks for t, _ in a], dtype=np.int64)
    flat_weight = np.array([w for a in sample_tasks for _, w in a], dtype=np.float32)
    per_row = counts[row_sample]
    ptr = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)
    within = np.arange(ptr[-1]) - np.repeat(ptr[:-1], per_row)
    source = np.repeat(starts[row_sample], per_row) + within
    assignment = RowAssignment(ptr, flat_task[source], flat_weight[source])
    if len(row_sample):  # lanes: rows of one composition (in row order), LANE at a time
        ids: dict[tuple, int] = {}
        composition = np.array([ids.setdefault(tuple(a), len(ids)) for a in sample_tasks], dtype=np.int64)
        order = np.argsort(composition[row_sample], kind="stable")
        sizes = np.bincount(composition[row_sample])
        sizes = sizes[sizes > 0]
        per_group = (sizes + LANE - 1) // LANE
        group_of_lane = np.repeat(np.arange(len(sizes)), per_group)
        lane_in_group = np.arange(len(group_of_lane)) - np.repeat(np.cumsum(per_group) - per_group, per_group)
        first = (np.cumsum(sizes) - sizes)[group_of_lane] + LANE * lane_in_group  # into ``order``
        stop = np.cumsum(sizes)[group_of_lane]
        slots = first[:, None] + np.arange(LANE)
        sorted_rows = np.append(order, len(row_sample))  # the empty slot's marker at the end
        assignment.lane_rows = sorted_rows[np.where(slots < stop[:, None], slots, len(row_sample))].reshape(-1)
        lane_sample = row_sample[order[first]]
        lane_counts = counts[lane_sample]
        assignment.lane_ptr = np.concatenate([[0], np.cumsum(lane_counts)]).astype(np.int64)
        within = np.arange(assignment.lane_ptr[-1]) - np.repeat(assignment.lane_ptr[:-1], lane_counts)
        lane_source = np.repeat(starts[lane_sample], lane_counts) + within
        assignment.lane_task = flat_task[lane_source]
        assignment.lane_weight = flat_weight[lane_source]
        group_first = np.cumsum(per_group) - per_group
        spans = [np.arange(f, f + n, SPAN) for f, n in zip(group_first.tolist(), per_group.tolist())]
        assignment.span_ptr = np.append(np.concatenate(spans), len(group_of_lane)).astype(np.int64)
    return assignment


__all__ = [
    "add_in_place",
    "RowAssignment",
    "add_embedding_deltas",
    "add_row_deltas",
    "assignment_for_rows",
    "fast_kernels_available",
    "scatter_deltas",
]
