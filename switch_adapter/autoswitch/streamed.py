"""Streamed execution: every sample runs with its own composition, in one call, without dense task weights.

Each switched layer is replaced for the call by a stand-in that reads the tasks' kept entries from the layer's
:class:`~switch_adapter.autoswitch.tables.EntryTable`:

- **light** groups of rows (few rows for their tasks' entries, e.g. decoding steps): one base call for their rows,
  then :func:`~switch_adapter.autoswitch.kernels.add_row_deltas` adds every row's own tasks' entries in one pass
  (embeddings always run this way);
- **heavy** groups (many rows, e.g. a prefill or a forward pass): the group's composed weight is written into a
  scratch buffer (base weight + scattered entries) and the base layer runs the group's rows with it. The buffer is
  reused by every layer of the same shape and dropped when the call ends;
- a call whose samples all share one composition (``in_place``): linear and convolution weights get its entries
  added in place for the call and their saved values back afterwards.

A group is light when ``rows * kept entries of its tasks <= LIGHT_ENTRIES_PER_WEIGHT * weight size``: the
entry-wise work is then cheaper than composing the layer. Norm layers (tiny) get their composed parameters
directly: one that scales and shifts the channels of the last dimension (LayerNorm, RMSNorm, model-specific
``*LayerNorm`` / ``*RMSNorm`` classes) runs once for all rows whatever the number of groups, twice when it has an
offset such as Gemma's ``1 + w`` (:class:`_ChannelNormCall`), other norms once per group. Nothing dense outlives
the call; the extra resident memory is the tables (3 bytes per kept entry plus 4 bytes per stored row and task).

A switch converted from a LoRA in factors mode changes a weight by a low-rank pair: its table keeps the two decoded
factors (4 bytes per factor entry), its rows always take the entry-wise path as two thin matmuls (as peft runs a
LoRA), a composed group adds ``left @ right`` to its scratch buffer, and a call of one composition runs such a
layer that way too instead of changing the live weight (an exact restore would need a copy of it).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..tswitch.layer import has_running_statistics
from .compose import ModelSlots
from .execute import _GroupedCall, _replace_heads, _restore, _RowPlan, _stand_ins, _StandIn, _swap
from .kernels import (
    RowAssignment,
    add_embedding_deltas,
    add_in_place,
    add_row_deltas,
    assignment_for_rows,
    fast_kernels_available,
    scatter_deltas,
)
from .tables import EMBEDDING, LINEAR, OTHER, TRANSPOSED, EntryTable, TableCache, layer_kind

# Entry-wise work per weight entry below which a group of rows skips composing the layer (see the module docstring):
# chosen on 2 CPU cores (benchmarks/execution.py models): the numba lane kernel costs ~0.1 ns per entry and row on one
# core (rows of one composition in lanes of 8, one vector multiply-add per entry), composing ~0.3 ns per weight plus
# the less efficient small matmuls. 6.0 sends decoding steps of up to ~120 rows per task at density 0.05, the 64-row
# groups of an 8-token forward and SmolLM2's 96-row prefill groups entry-wise, and the 30M Llama's 192-row prefill
# groups to composition. Measured by interleaving limits in one process: on the 8-token MiniLM forward 4.0 beat 2.0
# in each of five runs and 8.0 was within noise of it; SmolLM2-135M's prefill of 16 prompts over 8 tasks ran at 0.64x
# the plain model with 4.0, 0.76x with 6.0 and 0.79x with 12.0; the Llama's 192-row groups were 1.26x the plain
# prefill composed and 1.60x entry-wise (one thread).
LIGHT_ENTRIES_PER_WEIGHT = 6.0
LIGHT_ENTRIES_PER_WEIGHT_TORCH = 0.1


class StreamPlan:
    """The samples of a call grouped by composition: sample ``i`` runs group ``sample_group[i]``, whose tasks and
    weights are ``groups[g]`` (task indices into ``tasks``)."""

    def __init__(self, tasks: tuple[str, ...], groups: list[dict[str, float]], sample_group: list[int]) -> None:
        self.tasks = tasks
        self.batch = len(sample_group)
        self.groups = [[(tasks.index(t), float(w)) for t, w in g.items() if w != 0] for g in groups]
        self.sample_group = np.asarray(sample_group, dtype=np.int64)
        self.rows = _RowPlan([[(g, 1.0)] for g in sample_group], len(groups))
        self._sizes = np.bincount(self.sample_group, minlength=len(groups))
        self._assignments: dict[tuple, RowAssignment] = {}
        self._group_rows: dict[tuple, torch.Tensor] = {}
        self._bias_stacks: dict[int, torch.Tensor | None] = {}
        self._row_groups: dict[tuple, torch.Tensor] = {}
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._light: dict[tuple, list[bool]] = {}
        self.light_limit = LIGHT_ENTRIES_PER_WEIGHT if fast_kernels_available() else LIGHT_ENTRIES_PER_WEIGHT_TORCH

    def uses(self, table: EntryTable) -> bool:
        """Whether a task of this call changes the layer of ``table`` (its weight or bias)."""
        return any(table.changes[t] for g in self.groups for t, _ in g)

    def light_groups(self, table: EntryTable, rows: int, tokens: int) -> list[bool]:
        """Per group: whether its rows take the entry-wise path in a call of ``rows`` rows of ``tokens`` tokens."""
        key = (id(table), rows, tokens)
        found = self._light.get(key)
        if found is None:
            factor = rows // self.batch * tokens
            limit = self.light_limit * table.numel
            found = self._light[key] = [
                int(self._sizes[g]) * factor * sum(table.count(t) for t, _ in tasks) <= limit
                for g, tasks in enumerate(self.groups)
            ]
        return found

    def assignment(self, rows: int, tokens: int, groups: tuple[int, ...] | None = None) -> RowAssignment:
        """Tasks and weights per flattened row (``rows * tokens``), for the samples of ``groups`` only (in row
        order) when given."""
        key = (rows, tokens, groups)
        found = self._assignments.get(key)
        if found is None:
            per_sample_rows = rows // self.batch * tokens
            samples = np.arange(self.batch)
            if groups is not None:
                samples = self._samples_of(groups)
            row_sample = np.repeat(samples, per_sample_rows)
            found = assignment_for_rows(row_sample, [self.groups[g] for g in self.sample_group])
            self._assignments[key] = found
        return found

    def row_biases(self, table: EntryTable, rows: int, groups: tuple[int, ...] | None) -> torch.Tensor | None:
        """``[leading rows, out]``: the bias change of each leading row's group, for a call of ``rows`` rows (all of
        them, or those of the samples of ``groups`` group after group); None when no group changes the bias."""
        if id(table) not in self._bias_stacks:  # [groups, out], once per call and layer
            changes = [table.bias_delta(tasks) for tasks in self.groups]
            present = next((c for c in changes if c is not None), None)
            self._bias_stacks[id(table)] = (
                None
                if present is None
                else torch.stack([present.new_zeros(present.shape) if c is None else c for c in changes])
            )
        stacked = self._bias_stacks[id(table)]
        if stacked is None:
            return None
        return stacked.index_select(0, self.row_groups(rows, groups, stacked.device))

    def row_groups(self, rows: int, groups: tuple[int, ...] | None, device: torch.device) -> torch.Tensor:
        """The group of each leading row of a call of ``rows`` rows: all of them, or those of the samples of
        ``groups`` group after group."""
        key = (rows, groups, device)
        found = self._row_groups.get(key)
        if found is None:
            samples = np.arange(self.batch) if groups is None else self._samples_of(groups)
            found = torch.from_numpy(np.repeat(self.sample_group[samples], rows // self.batch)).to(device)
            self._row_groups[key] = found
        return found

    def _samples_of(self, groups: tuple[int, ...]) -> np.ndarray:
        """The samples of ``groups``, group after group (the order of the row plan)."""
        return np.concatenate([np.flatnonzero(self.sample_group == g) for g in groups])

    def rows_of_groups(self, groups: tuple[int, ...], rows: int, device: torch.device) -> torch.Tensor:
        """The rows of a call of ``rows`` rows that belong to the samples of ``groups``, group after group."""
        key = (groups, rows, device)
        found = self._group_rows.get(key)
        if found is None:
            part = {g: index for g, index, _ in self.rows.parts(rows, device, torch.float32)}
            found = self._group_rows[key] = torch.cat([_as_index(part[g]).to(device) for g in groups])
        return found

    def scratch(self, like: torch.Tensor) -> torch.Tensor:
        """A buffer shaped like ``like``, shared by the layers of that shape during the call (a fresh one when
        autograd may keep the weight)."""
        if _needs_graph(like):
            return torch.empty_like(like)
        key = (tuple(like.shape), like.dtype, like.device)
        found = self._scratch.get(key)
        if found is None:
            found = self._scratch[key] = torch.empty_like(like)
        return found


class _StreamedCall(_StandIn):
    """Stands in for a switched layer with a weight table (linear, Conv1D, embedding, convolution)."""

    def __init__(self, original: nn.Module, table: EntryTable, kind: str, plan: StreamPlan):
        super().__init__(original, plan.rows)
        weight = original.weight
        self._keep(_outputs=weight.shape[0] if kind != TRANSPOSED else weight.shape[1], _table=table, _kind=kind,
                   _stream=plan)  # fmt: skip

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows, broadcast = self._rows(x)
        if broadcast:
            x = x.expand(rows, *x.shape[1:])
        plan, table = self._stream, self._table
        module = self._original[0]
        if self._kind == EMBEDDING:
            y = module(x, *args, **kwargs).contiguous()
            tokens = x[0].numel()
            add_embedding_deltas(y.view(rows * tokens, -1), x.reshape(-1), table, plan.assignment(rows, tokens))
            return y
        if self._kind == OTHER:
            return self._composed_groups(x, rows, range(len(plan.groups)), args, kwargs)
        tokens = x[0].numel() // x.shape[-1]
        light = plan.light_groups(table, rows, tokens)
        if all(light):
            return self._entry_wise(x, rows, tokens, None, args, kwargs)
        heavy = [g for g, is_light in enumerate(light) if not is_light]
        y = self._composed_groups(x, rows, heavy, args, kwargs)
        light_groups = tuple(g for g, is_light in enumerate(light) if is_light)
        if light_groups:
            index = plan.rows_of_groups(light_groups, rows, x.device)
            y[index] = self._entry_wise(x[index], rows, tokens, light_groups, args, kwargs)
        return y

    def _entry_wise(self, x: torch.Tensor, rows: int, tokens: int, groups, args, kwargs) -> torch.Tensor:
        """Base layer on ``x``, then every row's own tasks' kept entries. ``x`` holds all ``rows`` rows (``groups``
        None) or the rows of the samples of ``groups``, group after group."""
        plan = self._stream
        y = self._original[0](x, *args, **kwargs).contiguous()
        assignment = plan.assignment(rows, tokens, groups)
        add_row_deltas(
            y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]).contiguous(), self._table, assignment, self._kind
        )
        if getattr(self._original[0], "bias", None) is not None:
            bias = plan.row_biases(self._table, rows, groups)
            if bias is not None:  # [leading rows, out]: each row's own group's bias change
                y += bias.to(y.dtype).view(bias.shape[0], *([1] * (y.dim() - 2)), bias.shape[1])
        return y

    def _composed_groups(self, x: torch.Tensor, rows: int, groups, args, kwargs) -> torch.Tensor:
        """Run each group of ``groups`` on its rows with its composed parameters (scratch buffers)."""
        plan, table = self._stream, self._table
        module = self._original[0]
        result = None
        wanted = set(groups)
        parts = plan.rows.parts(rows, x.device, x.dtype)
        # plain nn.Linear / Conv1D (no subclass, no hooks, no extra arguments): computed into the output directly
        direct = (
            type(module) in (nn.Linear, Conv1D)
            and not (args or kwargs or module._forward_hooks or module._forward_pre_hooks)
            and not _needs_graph(x, module.weight)
        )
        for g, index, _ in parts:
            if g not in wanted:
                continue
            params = {}
            if plan.groups[g]:
                weight = plan.scratch(module.weight)
                weight.copy_(module.weight)
                scatter_deltas(weight.view(-1), table, plan.groups[g])
                params["weight"] = weight
                bias = table.bias_delta(plan.groups[g])
                if bias is not None:
                    params["bias"] = module.bias + bias.to(module.bias.dtype)
            if direct and isinstance(index, slice) and len(parts) > 1:  # matmul straight into the output rows
                if result is None:
                    result = x.new_empty((rows,) + tuple(x.shape[1:-1]) + (self._outputs,))
                _linear_into(module, x[index], params, result[index])
                continue
            saved = _swap(module, params)
            try:
                y = module(x[index], *args, **kwargs)
            finally:
                _restore(module, saved)
            if len(parts) == 1:
                return y
            if result is None:
                result = y.new_empty((rows,) + tuple(y.shape[1:]))
            result[index] = y
        return result


class _ChannelNormCall(_StandIn):
    """Stands in for a norm layer that scales and shifts each channel of the last dimension (``scales_channels``)
    when its samples run several compositions.

    Such a layer computes ``f(x; w, b) = a(x) + m(x) * w + b`` per channel (``a`` is zero for LayerNorm, ``x``
    normalised for Gemma's ``1 + w`` RMSNorm), so two calls with ``w`` 0 and 1 (exact in every dtype) and ``b`` 0
    give ``a`` and ``m`` for all rows, and every row then takes its own group's composed ``w`` and ``b``. A layer
    found offset-free (``a = 0``, see :func:`_probe_parameters`) skips the first call. Inputs whose last dimension
    is not the channels go to ``fallback`` (one call per group).
    """

    def __init__(self, original: nn.Module, stacks: dict[str, torch.Tensor], plan: StreamPlan, fallback: nn.Module
                 ) -> None:  # fmt: skip
        super().__init__(original, plan.rows)
        zeros, ones, offset_free = _probe_parameters(original, tuple(stacks))
        # stacks: [groups, channels] per parameter, each group's composed weight (and bias)
        self._keep(_stream=plan, _fallback=(fallback,), _stacks=stacks, _zeros=zeros, _ones=ones,
                   _offset_free=offset_free)  # fmt: skip

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        module = self._original[0]
        weight = self._stacks["weight"]
        if x.shape[-1] != weight.shape[1] or _needs_graph(x, module.weight):
            return self._fallback[0](x, *args, **kwargs)
        rows, broadcast = self._rows(x)
        if broadcast:
            x = x.expand(rows, *x.shape[1:])
        saved = _swap(module, self._zeros)
        try:
            offset = None if self._offset_free else module(x, *args, **kwargs)
            _swap(module, self._ones)
            slope = module(x, *args, **kwargs)
        finally:
            _restore(module, saved)
        order = self._stream.row_groups(rows, None, x.device)
        shape = (rows,) + (1,) * (x.dim() - 2) + (weight.shape[1],)
        scale = weight.index_select(0, order).to(slope.dtype).view(shape)
        y = slope * scale if offset is None else torch.addcmul(offset, slope - offset, scale)
        if "bias" in self._stacks:
            y += self._stacks["bias"].index_select(0, order).to(y.dtype).view(shape)
        return y


# per norm module: (zeros, ones, offset-free) for _ChannelNormCall, made once (remade when the module's dtype or
# device changes)
_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _probe_parameters(module: nn.Module, names: tuple[str, ...]) -> tuple[dict, dict, bool]:
    """For a channel norm layer: its parameters ``names`` as zeros, its weight as ones, and whether it is offset-free
    (returns exactly zero with zero parameters, ``a = 0``: LayerNorm, RMSNorm; not Gemma's ``1 + w``), found once
    on a random input."""
    weight = module.weight
    found = _PROBED.get(module)
    if found is not None and found[0] == (names, weight.dtype, weight.device):
        return found[1]
    zeros = {name: torch.zeros_like(getattr(module, name).detach()) for name in names}
    ones = {"weight": torch.ones_like(zeros["weight"])}
    probe = torch.randn(2, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    saved = _swap(module, zeros)
    try:
        with torch.no_grad():  # forward, not __call__: the user's hooks never see the probe
            offset_free = not bool(module.forward(probe).any())
    except Exception:  # a layer that needs other inputs: keep computing its offset
        offset_free = False
    finally:
        _restore(module, saved)
    _PROBED[module] = ((names, weight.dtype, weight.device), (zeros, ones, offset_free))
    return zeros, ones, offset_free


def scales_channels(module: nn.Module) -> bool:
    """Whether ``module`` is a norm layer known to scale (and shift) each channel of its input's last dimension by
    its ``weight`` (and ``bias``): torch's LayerNorm and RMSNorm over one dimension, and model-specific classes named
    ``*LayerNorm`` / ``*RMSNorm`` with a 1-D weight (transformers' LlamaRMSNorm, T5LayerNorm, ...)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or has_running_statistics(module):
        return False
    bias = getattr(module, "bias", None)
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape):
        return False
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return len(module.normalized_shape) == 1
    return type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _needs_graph(*tensors: torch.Tensor) -> bool:
    """Whether autograd records a call on these tensors (then buffers must not be reused or written into)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _linear_into(module: nn.Module, x: torch.Tensor, params: dict, out: torch.Tensor) -> None:
    """``out = module(x)`` for an nn.Linear or Conv1D with ``params`` substituted, written into ``out``."""
    weight = params.get("weight", module.weight)
    bias = params.get("bias", module.bias)
    flat_in, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
    matrix = weight.t() if isinstance(module, nn.Linear) else weight  # Conv1D stores [in, out]
    if bias is None:
        torch.mm(flat_in, matrix, out=flat_out)
    else:
        torch.addmm(bias, flat_in, matrix, out=flat_out)


def _as_index(part) -> torch.Tensor:
    return torch.arange(part.start, part.stop) if isinstance(part, slice) else part


@contextmanager
def streamed_execution(
    slots: ModelSlots,
    tables: TableCache,
    tasks: tuple[str, ...],
    groups: list[dict[str, float]],
    sample_group: list[int],
    heads: list[str | None],
    head_of_sample: list[int],
    in_place: bool = False,
) -> Iterator[None]:
    """Run sample ``i`` with ``base + sum_t groups[sample_group[i]][t] * switch_t`` in every switched layer, and
    the head of task ``heads[head_of_sample[i]]``.

    ``in_place`` (one group only, and a call that autograd does not record): linear and convolution weights get the
    composition's kept entries added in place, and the saved original values put back when the block ends (also
    if it raises); three passes over those entries per call, whatever the number of decoding steps. Embeddings
    (and output layers tied to them) still add the entries of the looked-up rows only.
    """
    plan = StreamPlan(tasks, groups, sample_group)
    if in_place and len(plan.groups) != 1:
        raise ValueError("in_place needs a call whose samples share one composition.")
    restores: list = []
    try:
        with _stand_ins() as replace:
            for layer in slots.layers:
                base = layer.get_base_layer()
                if getattr(base, "weight", None) is not None and base.weight.dim() >= 2:
                    table = tables.get(layer, tasks)
                    if not plan.uses(table):
                        continue
                    kind = layer_kind(base)
                    low_rank = table.low_rank_tasks(t for t, _ in plan.groups[0]) if in_place else []
                    if in_place and kind != EMBEDDING and not low_rank and not _shared_with_tied(slots, base.weight):
                        with torch.no_grad():
                            restores.append(add_in_place(base.weight.data.view(-1), table, plan.groups[0]))
                            bias = table.bias_delta(plan.groups[0])
                            if bias is not None:
                                original = base.bias.data.clone()
                                base.bias.data.add_(bias.to(base.bias.dtype))
                                restores.append(lambda b=base.bias, o=original: b.data.copy_(o))
                    else:
                        replace(layer, "base_layer", _StreamedCall(base, table, kind, plan))
                else:  # norm layers: small composed parameters per group
                    composed = tables.norm_groups(layer, tasks, plan.groups)
                    if any(composed.per_group):
                        grouped = _GroupedCall(base, [(base, params) for params in composed.per_group], plan.rows)
                        if len(plan.groups) > 1 and scales_channels(base):
                            grouped = _ChannelNormCall(base, composed.stacks(base), plan, grouped)
                        replace(layer, "base_layer", grouped)
            for tied in slots.tied:
                table = tables.get(tied.source, tasks)
                if plan.uses(table):
                    replace(tied, "base_layer", _StreamedCall(tied.get_base_layer(), table, LINEAR, plan))
            _replace_heads(replace, slots, heads, head_of_sample)
            yield
    finally:
        with torch.no_grad():
            for put_back in reversed(restores):
                put_back()


def _shared_with_tied(slots: ModelSlots, weight: torch.Tensor) -> bool:
    """Whether a tied output layer reads this weight (it must then stay the base weight)."""
    return any(tied.get_base_layer().weight.data_ptr() == weight.data_ptr() for tied in slots.tied)
