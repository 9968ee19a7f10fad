"""Per-layer tables of the kept entries of every routed task's switch, the state streamed execution reads.

A table holds, for one switched weight, the kept entries of all tasks back to back: each entry's column in its stored
row and its multiplier (3 bytes per kept entry; the layer's own decoded copy, 5 bytes per entry, is dropped), the
range of each stored row per task (4 bytes per row and task) and each task's scales. Nothing dense is ever built
from it except one layer at a time, in a scratch buffer, during a call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..format import LOW_RANK_UNITS
from ..tswitch.layer import UNIT_PARAMETERS, SwitchedModule
from .compose import layer_parameters

# Layer kinds whose weight a table describes, and how rows of the stored weight relate to the computation.
LINEAR, TRANSPOSED, EMBEDDING, OTHER = "linear", "transposed", "embedding", "other"


def layer_kind(module: nn.Module) -> str:
    """``linear`` (nn.Linear: stored rows are outputs), ``transposed`` (Conv1D: stored rows are inputs),
    ``embedding`` (stored rows are looked up), ``other`` (convolutions: composed in a scratch buffer only)."""
    if isinstance(module, Conv1D):
        return TRANSPOSED
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Embedding) and module.max_norm is None:
        return EMBEDDING
    return OTHER


@dataclass
class EntryTable:
    """Kept entries of the weight switches of ``tasks`` in one layer, concatenated task after task.

    Entries of task ``t`` in stored row ``o`` (row-major ``[rows, cols]`` view of the weight) are
    ``offsets[t] + row_ptr[t, o] : offsets[t] + row_ptr[t, o + 1]``, in ascending column order; entry ``j`` of row
    ``o`` sits at position ``p = o * cols + columns[j]`` of the weight and its value is
    ``multipliers[j] * scales[t, p // chunks[t]]``.
    """

    tasks: tuple[str, ...]
    keys: tuple
    columns: torch.Tensor  # uint16 (int32 for rows of more than 65,536 columns)
    multipliers: torch.Tensor  # int8 (int16 for 8-bit units)
    offsets: torch.Tensor  # int64 [T + 1]
    row_ptr: torch.Tensor  # int32 [T, rows + 1]
    scales: torch.Tensor  # float32 [T, S]
    chunks: torch.Tensor  # int64 [T]: numel // (scales of the task)
    rows: int
    cols: int
    bias: torch.Tensor | None = None  # [T, out]: each task's dense bias change (None: no task switches the bias)
    # per task: the decoded (left [rows, r], right [r, cols]) of a low-rank pair (no entries then), else None
    low_rank: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None

    def __post_init__(self) -> None:
        self._bias_sums: dict[tuple, torch.Tensor | None] = {}
        self.counts = torch.diff(self.offsets).tolist()  # kept entries per task
        self.bias_changed = self.bias.any(dim=1).tolist() if self.bias is not None else [False] * len(self.counts)
        if self.low_rank is None:
            self.low_rank = [None] * len(self.counts)
        self.has_low_rank = any(pair is not None for pair in self.low_rank)
        self._stack_low_rank()
        self.has_entries = any(self.counts)
        self.changes = [  # the task changes this layer
            bool(c) or b or f is not None for c, b, f in zip(self.counts, self.bias_changed, self.low_rank)
        ]
        # every task has one scale per tensor or per stored row (what the run kernel handles)
        self.aligned_scales = all(int(c) >= self.numel or int(c) % self.cols == 0 for c in self.chunks.tolist())
        self._arrays: dict[torch.dtype, tuple] = {}

    def _stack_low_rank(self) -> None:
        """Keep the pairs side by side: ``stacked_left`` ``[rows, R]`` (the tasks' lefts, column blocks) and
        ``stacked_right`` ``[R, cols]`` (their rights, row blocks); each task's pair becomes views of its block,
        ``rank_blocks[t] = (start, stop)`` (None for a task without a pair), so one matmul serves every task."""
        self.rank_blocks: tuple[tuple[int, int] | None, ...] = (None,) * len(self.low_rank)
        self.stacked_left = self.stacked_right = None
        if not self.has_low_rank:
            return
        pairs = [(task, pair) for task, pair in enumerate(self.low_rank) if pair is not None]
        self.stacked_left = torch.cat([left for _, (left, _) in pairs], dim=1)
        self.stacked_right = torch.cat([right for _, (_, right) in pairs], dim=0)
        blocks, start = list(self.rank_blocks), 0
        for task, (left, _) in pairs:
            stop = start + left.shape[1]
            blocks[task] = (start, stop)
            self.low_rank[task] = (self.stacked_left[:, start:stop], self.stacked_right[start:stop])
            start = stop
        self.rank_blocks = tuple(blocks)

    def arrays(self, dtype: torch.dtype) -> tuple:
        """The table as numpy arrays (CPU only), scales in ``dtype``: what the numba kernels take."""
        found = self._arrays.get(dtype)
        if found is None:
            found = self._arrays[dtype] = (
                self.columns.numpy(),
                self.multipliers.numpy(),
                self.offsets.numpy(),
                self.row_ptr.numpy(),
                self.scales.to(dtype).numpy(),
                self.chunks.numpy(),
            )
        return found

    def bias_delta(self, weights: list[tuple[int, float]]) -> torch.Tensor | None:
        """``sum_(t, w) w * bias change_t`` (None when no task of ``weights`` switches the bias); memoised."""
        if self.bias is None:
            return None
        key = tuple(weights)
        if key not in self._bias_sums:
            if len(self._bias_sums) > 1024:
                self._bias_sums.clear()
            used = [(t, w) for t, w in weights if self.bias_changed[t]]
            self._bias_sums[key] = sum(self.bias[t] * w for t, w in used) if used else None
        return self._bias_sums[key]

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def device(self) -> torch.device:
        return self.columns.device

    def positions(self, task: int) -> torch.Tensor:
        """int64 positions in the flattened weight of one task's kept entries (ascending)."""
        start, stop = int(self.offsets[task]), int(self.offsets[task + 1])
        per_row = torch.diff(self.row_ptr[task].long())
        rows = torch.repeat_interleave(torch.arange(self.rows, device=self.device), per_row)
        return rows * self.cols + self.columns[start:stop].long()

    def count(self, task: int) -> int:
        return self.counts[task]

    def values(self, task: int, dtype: torch.dtype, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The values of one task's kept entries in ``dtype``; ``positions`` (:meth:`positions`, where the caller
        has them) are only needed for scales per chunk and are computed when missing."""
        start, stop = int(self.offsets[task]), int(self.offsets[task + 1])
        scale = self.scales[task]
        if self.chunks[task] < self.numel:
            positions = self.positions(task) if positions is None else positions
            scale = scale[(positions // int(self.chunks[task])).long()]
        else:
            scale = scale[0]
        return self.multipliers[start:stop].to(dtype) * scale.to(dtype)

    def low_rank_tasks(self, tasks) -> list[int]:
        """The tasks of ``tasks`` (indices) whose change of this layer's weight is a low-rank pair."""
        return [t for t in tasks if self.low_rank[t] is not None]

    @property
    def nbytes(self) -> int:
        parts = [self.columns, self.multipliers, self.row_ptr, self.scales, self.bias]
        parts += [self.stacked_left, self.stacked_right]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _stored_shape(module: nn.Module) -> tuple[int, int]:
    weight = module.weight
    return weight.shape[0], weight.numel() // weight.shape[0]


def switch_keys(layer: SwitchedModule, tasks: tuple[str, ...]) -> tuple:
    """Identity of the weight and bias switches of ``tasks`` in ``layer`` (None for an absent or empty switch): a
    table built for other keys is stale (an adapter reloaded or replaced under the same name)."""
    keys = []
    for name in UNIT_PARAMETERS:  # runs for every layer on every call: kept to plain lookups
        units = layer._codes(name)._buffers
        for task in tasks:
            found = units.get(task)
            keys.append(None if found is None or not found.numel() else (found.data_ptr(), found._version))
    return tuple(keys)


@torch.no_grad()
def build_table(layer: SwitchedModule, tasks: tuple[str, ...]) -> EntryTable:
    """Decode the weight switch of every task of ``tasks`` (an empty switch contributes no entry) into one table,
    and release the layer's own decoded copy of them; a low-rank pair is kept as its two decoded factors."""
    module = layer.get_base_layer()
    rows, cols = _stored_shape(module)
    numel = rows * cols
    device = module.weight.device
    keys = switch_keys(layer, tasks)
    positions, multipliers, counts, row_ptrs, scales, chunks = [], [], [0], [], [], []
    low_rank = [layer.low_rank_factors(task, torch.float32, device) if layer.is_low_rank(task) else None
                for task in tasks]  # fmt: skip
    for name in LOW_RANK_UNITS:
        for task in tasks:
            layer._sparse_cache.pop((task, name), None)
    for task, pair in zip(tasks, low_rank):
        if pair is None and layer._has_switch(task, "weight"):
            kept, mult = layer._sparse(task, "weight")
            layer._sparse_cache.pop((task, "weight"), None)
            kept, mult = kept.to(device), mult.to(device)
            if kept.numel() > 1 and bool((kept[1:] < kept[:-1]).any()):
                order = torch.argsort(kept)
                kept, mult = kept[order], mult[order]
            scale = layer._scales("weight")[task].detach().reshape(-1).to(device, torch.float32)
        else:
            kept = torch.zeros(0, dtype=torch.int32, device=device)
            mult = torch.zeros(0, dtype=torch.int8, device=device)
            scale = torch.zeros(1, device=device)
        positions.append(kept)
        multipliers.append(mult)
        counts.append(kept.numel())
        per_row = (
            torch.bincount((kept // cols).long(), minlength=rows)
            if kept.numel()
            else torch.zeros(rows, dtype=torch.long)
        )
        row_ptr = torch.zeros(rows + 1, dtype=torch.int32, device=device)
        row_ptr[1:] = torch.cumsum(per_row.to(device), 0)
        row_ptrs.append(row_ptr)
        scales.append(scale)
        chunks.append(numel // scale.numel())
    width = max(s.numel() for s in scales)
    padded = torch.zeros(len(tasks), width, device=device)
    for index, scale in enumerate(scales):
        padded[index, : scale.numel()] = scale
    bias = getattr(module, "bias", None)
    bias_rows = None
    if isinstance(bias, torch.Tensor) and any(layer._has_switch(task, "bias") for task in tasks):
        bias_rows = torch.zeros(len(tasks), bias.numel(), dtype=bias.dtype, device=device)
        for index, task in enumerate(tasks):
            delta = layer.get_delta(task, "bias")
            layer._sparse_cache.pop((task, "bias"), None)
            if delta is not None:
                bias_rows[index] = delta.reshape(-1)
    column_dtype = torch.uint16 if cols <= 2**16 else torch.int32
    multiplier_dtype = torch.int16 if any(m.dtype == torch.int16 for m in multipliers) else torch.int8
    return EntryTable(
        tasks=tuple(tasks),
        keys=keys,
        columns=torch.cat([(p % cols).to(column_dtype) for p in positions]),
        multipliers=torch.cat([m.to(multiplier_dtype) for m in multipliers]),
        offsets=torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0).to(device),
        row_ptr=torch.stack(row_ptrs),
        scales=padded,
        chunks=torch.tensor(chunks, dtype=torch.int64, device=device),
        rows=rows,
        cols=cols,
        bias=bias_rows,
        low_rank=[None if pair is None else (pair[0].detach(), pair[1].detach()) for pair in low_rank],
    )


class NormGroups:
    """A norm layer's composed parameters per group of a call (``per_group[g]``: only those a task changes), and
    the same stacked ``[groups, channels]`` per parameter (built on first use)."""

    def __init__(self, per_group: list[dict[str, torch.Tensor]]) -> None:
        self.per_group = per_group
        self._stacks: dict[str, torch.Tensor] | None = None

    def stacks(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``{name: [groups, channels]}`` for the module's ``weight`` and ``bias`` (its own value where a group does not
        change it)."""
        if self._stacks is None:
            self._stacks = {
                name: torch.stack([params.get(name, getattr(module, name)) for params in self.per_group]).detach()
                for name in ("weight", "bias")
                if getattr(module, name, None) is not None
            }
        return self._stacks

    @property
    def nbytes(self) -> int:
        tensors = [v for params in self.per_group for v in params.values()] + list((self._stacks or {}).values())
        return sum(v.numel() * v.element_size() for v in tensors)


class TableCache:
    """Entry tables per switched layer for the router's current tasks; rebuilt when the tasks, a switch's code or
    the layer's device change."""

    def __init__(self) -> None:
        self._tables: dict[int, EntryTable] = {}
        self._norms: dict[tuple, tuple[tuple, NormGroups]] = {}
        self._lock = threading.Lock()

    def get(self, layer: SwitchedModule, tasks: tuple[str, ...]) -> EntryTable:
        with self._lock:
            table = self._tables.get(id(layer))
        if table is not None and table.tasks == tasks and self._current(table, layer):
            return table
        with torch.inference_mode(False):
            table = build_table(layer, tasks)
        with self._lock:
            self._tables[id(layer)] = table
        return table

    @staticmethod
    def _current(table: EntryTable, layer: SwitchedModule) -> bool:
        if table.device != layer.get_base_layer().weight.device:
            return False
        return switch_keys(layer, table.tasks) == table.keys

    def norm_groups(self, layer: SwitchedModule, tasks: tuple[str, ...], groups: list[list[tuple[int, float]]]
                    ) -> NormGroups:  # fmt: skip
        """A norm layer's composed parameters for each group of ``groups`` (``[(task index, weight), ...]``),
        memoised while the switches are unchanged: they are a few vectors."""
        keys = switch_keys(layer, tasks)
        cache_key = (id(layer), tasks, tuple(tuple(g) for g in groups))
        with self._lock:
            found = self._norms.get(cache_key)
        if found is not None and found[0] == keys:
            return found[1]
        with torch.inference_mode(False):
            composed = NormGroups([layer_parameters(layer, {tasks[t]: w for t, w in g}) for g in groups])
        with self._lock:
            if len(self._norms) > 1024:
                self._norms.clear()
            self._norms[cache_key] = (keys, composed)
        return composed

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()
            self._norms.clear()

    @property
    def nbytes(self) -> int:
        with self._lock:
            tables = sum(table.nbytes for table in self._tables.values())
            norms = sum(composed.nbytes for _, composed in self._norms.values())
        return tables + norms
