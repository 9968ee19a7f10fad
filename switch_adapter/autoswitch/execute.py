"""Run a model with composed parameters substituted: one composition for the whole batch, or several per batch.

The PEFT model's T-Switch layers are kept disabled (they compute the base model); these contexts substitute
parameters for the duration of a call and restore them afterwards, so they are not thread-safe by themselves:
:class:`~switch_adapter.AutoSwitchModel` holds its lock around them.

- One composition: the switched base layers' parameters are replaced by the composed tensors (a tied output
  embedding gets the composed input embedding), and each ``modules_to_save`` wrapper runs the head task's copy.
- Several: every switched base layer (and head) is replaced by a :class:`_GroupedCall`. Each sample is assigned
  one or more *targets* (a composition) with weights summing to 1; the layer runs each target on the rows of
  its samples and returns ``sum_target weight * output``. With one target per sample (weight 1) this is plain
  grouping. Several targets per sample compute a soft composition exactly because every switchable layer
  (linear, embedding, conv, norm) is affine in its parameters: ``f(x; base + sum_t w_t d_t) =
  sum_t w_t f(x; base + d_t)`` when ``sum_t w_t = 1`` (equal up to float rounding). A norm layer that normalises
  with running statistics (BatchNorm in eval mode) is not affine in them: it normalises each row with the mix of
  the targets' statistics and affine parameters instead (its sample's own composition).
- Row ``r`` of a call with ``n`` rows belongs to sample ``r // (n / batch)``, which also covers beams and
  sequences expanded by ``generate`` (``repeat_interleave``) and flattened ``[batch * length, ...]`` inputs. A call
  with one row in a batch of several samples is a broadcast input (e.g. BERT's position ids): its output is
  expanded per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..tswitch.layer import has_running_statistics
from .compose import Composition, ModelSlots

Assignment = list[tuple[int, float]]  # per sample: [(target index, weight)]


def _swap(module: nn.Module, params: dict[str, torch.Tensor]) -> list[tuple[dict, str, torch.Tensor]]:
    """Substitute ``params`` (parameters, or buffers such as BatchNorm's running statistics) in ``module``."""
    saved = []
    for name, value in params.items():
        store = module._parameters if name in module._parameters else module._buffers
        saved.append((store, name, store[name]))
        store[name] = value
    return saved


def _restore(module: nn.Module, saved: list[tuple[dict, str, torch.Tensor]]) -> None:
    for store, name, value in reversed(saved):
        store[name] = value


def _tied_params(slots: ModelSlots, composition: Composition) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
    out = []
    for tied in slots.tied:
        source = composition.per_layer[slots.layer_index[id(tied.source)]]
        if "weight" in source:
            out.append((tied.get_base_layer(), {"weight": source["weight"]}))
    return out


@contextmanager
def single_composition(slots: ModelSlots, composition: Composition, head: str | None) -> Iterator[None]:
    """Substitute one composition (and the head of task ``head``) for the whole model."""
    swapped: list[tuple[nn.Module, list]] = []
    heads: list[tuple[nn.Module, nn.Module]] = []
    try:
        targets = [(layer.get_base_layer(), params) for layer, params in zip(slots.layers, composition.per_layer)]
        for module, params in targets + _tied_params(slots, composition):
            if params:
                swapped.append((module, _swap(module, params)))
        for wrapper in slots.heads:
            if head is not None and head in wrapper.modules_to_save:
                heads.append((wrapper, wrapper._modules["original_module"]))
                wrapper._modules["original_module"] = wrapper.modules_to_save[head]
        yield
    finally:
        for wrapper, original in reversed(heads):
            wrapper._modules["original_module"] = original
        for module, saved in reversed(swapped):
            _restore(module, saved)


Part = tuple[int, "slice | torch.Tensor", "torch.Tensor | None"]  # (target, rows, per-row weights or None)


class _RowPlan:
    """Which rows of a call go to which target, with which weight, for a batch of assigned samples."""

    def __init__(self, assignments: list[Assignment], num_targets: int) -> None:
        self.batch = len(assignments)
        self.num_targets = num_targets
        self.partition = all(len(a) == 1 and a[0][1] == 1.0 for a in assignments)
        self.last_rows = self.batch
        self._samples: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for target in range(num_targets):
            pairs = [(i, w) for i, assigned in enumerate(assignments) for t, w in assigned if t == target]
            if pairs:
                samples = torch.tensor([i for i, _ in pairs], dtype=torch.long)
                self._samples.append((target, samples, torch.tensor([w for _, w in pairs])))
        self._parts: dict[tuple[int, torch.device, torch.dtype], list[Part]] = {}

    def parts(self, rows: int, device: torch.device, dtype: torch.dtype) -> list[Part]:
        """``[(target, rows, weights)]`` for a call with ``rows`` rows; rows are slices where contiguous and
        weights are None for a partition (every sample has one target)."""
        if rows % self.batch:
            raise RuntimeError(
                f"A switched layer was called with {rows} rows for a batch of {self.batch} samples; Auto-Switch "
                "can only map rows to samples when the row count is a multiple of the batch size."
            )
        cached = self._parts.get((rows, device, dtype))
        if cached is not None:
            return cached
        factor = rows // self.batch
        parts: list[Part] = []
        for target, samples, weights in self._samples:
            index = (samples.unsqueeze(1) * factor + torch.arange(factor)).flatten()
            start, stop = int(index[0]), int(index[-1]) + 1
            rows_of = slice(start, stop) if stop - start == index.numel() else index.to(device)
            row_weights = None if self.partition else weights.repeat_interleave(factor).to(device, dtype)
            parts.append((target, rows_of, row_weights))
        self._parts[(rows, device, dtype)] = parts
        return parts


class _StandIn(nn.Module):
    """Takes the place of ``original`` during a call; other attribute lookups fall through to it, and its rows map
    to samples through ``plan``."""

    def __init__(self, original: nn.Module, plan: _RowPlan) -> None:
        super().__init__()
        self._keep(_original=(original,), _plan=plan)  # a tuple: not registered as a submodule

    def _keep(self, **values) -> None:
        """Plain attributes (no parameter, buffer or submodule among them), set without ``nn.Module.__setattr__``'s
        checks: stand-ins are made for every call."""
        self.__dict__.update(values)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"][0], name)

    def _rows(self, x: torch.Tensor) -> tuple[int, bool]:
        """``(rows, broadcast)``: a single shared input row (``broadcast``) stands for the rows of the last call."""
        plan = self._plan
        if x.shape[0] == 1 and plan.batch > 1:
            return plan.last_rows, True
        plan.last_rows = x.shape[0]
        return x.shape[0], False


class _GroupedCall(_StandIn):
    """Stands in for a base layer (or head) during a call with several targets: target ``t`` runs
    ``targets[t]``, i.e. a module and the parameters to substitute in it."""

    def __init__(
        self, original: nn.Module, targets: list[tuple[nn.Module, dict[str, torch.Tensor]]], plan: _RowPlan
    ) -> None:
        super().__init__(original, plan)
        self._keep(_targets=targets)

    def _run(self, target: int, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        module, params = self._targets[target]
        saved = _swap(module, params)
        try:
            y = module(x, *args, **kwargs)
        finally:
            _restore(module, saved)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"Auto-Switch can only group layers that return a tensor, got {type(y).__name__}.")
        return y

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plan = self._plan
        rows, broadcast = self._rows(x)
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        parts = plan.parts(rows, x.device, dtype)
        if not plan.partition and not broadcast and _normalises_with_running_statistics(self._original[0]):
            return self._per_row_norm(x, parts)
        outputs = [self._run(target, x if broadcast else x[index], args, kwargs) for target, index, _ in parts]
        if plan.partition:
            return _assemble_partition(parts, outputs, rows, broadcast)
        result = None
        for (_, index, weights), y in zip(parts, outputs):
            count = _count(index)
            y = y.expand(count, *y.shape[1:]) if broadcast else y
            weighted = y * weights.to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
            if result is None:
                result = y.new_zeros((rows,) + tuple(y.shape[1:]))
            if isinstance(index, slice):
                result[index] += weighted
            else:
                result.index_add_(0, index, weighted)
        return result

    def _per_row_norm(self, x: torch.Tensor, parts: list[Part]) -> torch.Tensor:
        """A norm layer in eval mode with several targets per sample: it is not affine in its running statistics, so
        instead of mixing outputs each row gets the mix of the targets' ``running_mean``, ``running_var``, ``weight``
        and ``bias`` (the sample's own composition) and is normalised with them:
        ``y_r = (x_r - mean_r) / sqrt(var_r + eps) * weight_r + bias_r``."""
        norm = self._original[0]
        rows, channels = x.shape[0], x.shape[1]
        values = {}
        for name in ("running_mean", "running_var", "weight", "bias"):
            if getattr(norm, name, None) is None:
                continue
            mixed = x.new_zeros((rows, channels), dtype=torch.float32)
            for target, index, weights in parts:
                module, params = self._targets[target]
                value = params.get(name, getattr(module, name)).detach().float()
                change = weights.float().unsqueeze(1) * value.unsqueeze(0)
                if isinstance(index, slice):
                    mixed[index] += change
                else:
                    mixed.index_add_(0, index, change)
            values[name] = mixed.view(rows, channels, *([1] * (x.dim() - 2)))
        y = (x.float() - values["running_mean"]) * torch.rsqrt(values["running_var"] + norm.eps)
        if "weight" in values:
            y = y * values["weight"]
        if "bias" in values:
            y = y + values["bias"]
        return y.to(x.dtype)


def _normalises_with_running_statistics(module: nn.Module) -> bool:
    """True for a norm layer that normalises with its running statistics now (BatchNorm in eval mode, ...)."""
    if not has_running_statistics(module):
        return False
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return not module.training and module.track_running_stats
    return not module.training


def _assemble_partition(parts: list[Part], outputs: list[torch.Tensor], rows: int, broadcast: bool) -> torch.Tensor:
    width = outputs[0].shape[-1] if outputs[0].dim() else None
    if width is not None and any(y.shape[-1] != outputs[0].shape[-1] for y in outputs):
        width = max(y.shape[-1] for y in outputs)  # heads with other label counts: pad with -inf
        outputs = [torch.nn.functional.pad(y, (0, width - y.shape[-1]), value=float("-inf")) for y in outputs]
    if broadcast:
        outputs = [y.expand(_count(index), *y.shape[1:]) for (_, index, _), y in zip(parts, outputs)]
    if _in_order(parts, rows):
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    result = outputs[0].new_empty((rows,) + tuple(outputs[0].shape[1:]))
    for (_, index, _), y in zip(parts, outputs):
        result[index] = y
    return result


def _count(index: slice | torch.Tensor) -> int:
    return index.stop - index.start if isinstance(index, slice) else int(index.numel())


def _in_order(parts: list[Part], rows: int) -> bool:
    position = 0
    for _, index, _ in parts:
        if not isinstance(index, slice) or index.start != position:
            return False
        position = index.stop
    return position == rows


@contextmanager
def grouped_compositions(
    slots: ModelSlots,
    compositions: list[Composition],
    assignments: list[Assignment],
    heads: list[str | None],
    head_of_sample: list[int],
) -> Iterator[None]:
    """Substitute several compositions: sample ``i`` runs ``sum_(t, w) in assignments[i] w * f(x; compositions[t])``
    in every switched layer, and the head of task ``heads[head_of_sample[i]]``."""
    plan = _RowPlan(assignments, len(compositions))
    with _stand_ins() as replace:
        for index, layer in enumerate(slots.layers):
            if any(c.per_layer[index] for c in compositions):
                base = layer.get_base_layer()
                targets = [(base, c.per_layer[index]) for c in compositions]
                replace(layer, "base_layer", _GroupedCall(base, targets, plan))
        for tied in slots.tied:
            source = slots.layer_index[id(tied.source)]
            if any("weight" in c.per_layer[source] for c in compositions):
                base = tied.get_base_layer()
                targets = [
                    (base, {k: v for k, v in c.per_layer[source].items() if k == "weight"}) for c in compositions
                ]
                replace(tied, "base_layer", _GroupedCall(base, targets, plan))
        _replace_heads(replace, slots, heads, head_of_sample)
        yield


@contextmanager
def _stand_ins() -> Iterator[Callable[[nn.Module, str, nn.Module], None]]:
    """``replace(owner, attribute, stand_in)`` puts ``stand_in`` in place of a child module until the block ends."""
    replaced: list[tuple[nn.Module, str, nn.Module]] = []

    def replace(owner: nn.Module, attribute: str, stand_in: nn.Module) -> None:
        replaced.append((owner, attribute, owner._modules[attribute]))
        owner._modules[attribute] = stand_in

    try:
        yield replace
    finally:
        for owner, attribute, original in reversed(replaced):
            owner._modules[attribute] = original


def _replace_heads(replace: Callable, slots: ModelSlots, heads: list[str | None], head_of_sample: list[int]) -> None:
    """Sample ``i`` gets the task head ``heads[head_of_sample[i]]`` (the original module where a task has none)."""
    head_plan = _RowPlan([[(h, 1.0)] for h in head_of_sample], len(heads))
    for wrapper in slots.heads:
        original = wrapper._modules["original_module"]
        modules = [wrapper.modules_to_save[h] if h in wrapper.modules_to_save else original for h in heads]
        if any(module is not original for module in modules):
            replace(wrapper, "original_module", _GroupedCall(original, [(m, {}) for m in modules], head_plan))


def select_rows(batch: dict, indices: torch.Tensor, batch_size: int) -> dict:
    """The samples ``indices`` of every batch-major tensor of a model-input dict (other values pass through)."""
    return {
        key: value.index_select(0, indices.to(value.device))
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size
        else value
        for key, value in batch.items()
    }


def merge_group_outputs(parts: list[tuple[torch.Tensor, object]], batch_size: int) -> object:
    """Reassemble the outputs of sub-batches (``[(sample indices, output)]``) in input order.

    Batch-major tensors (and tuples of them, e.g. ``hidden_states``) are scattered into ``[batch, ...]``; logits of
    heads with different label counts are padded with ``-inf``. Values that cannot be split per sample (a scalar
    ``loss``, a KV cache) become None.
    """
    first = parts[0][1]
    if isinstance(first, torch.Tensor) or first is None:
        return _merge_tensors([(index, out) for index, out in parts], batch_size)
    if isinstance(first, (tuple, list)):
        merged = [merge_group_outputs([(index, out[i]) for index, out in parts], batch_size) for i in range(len(first))]
        return type(first)(merged)
    if isinstance(first, dict):  # ModelOutput and plain dicts
        keys = list(dict.fromkeys(key for _, out in parts for key in out.keys()))
        values = {key: merge_group_outputs([(index, out.get(key)) for index, out in parts], batch_size) for key in keys}
        return type(first)(**{key: value for key, value in values.items() if value is not None})
    return None


def _merge_tensors(parts: list[tuple[torch.Tensor, torch.Tensor | None]], batch_size: int) -> torch.Tensor | None:
    values = [out for _, out in parts]
    if any(not isinstance(v, torch.Tensor) for v in values):
        return None
    if any(v.dim() == 0 or v.shape[0] != index.numel() for index, v in parts):
        return None  # not batch-major (e.g. a loss)
    trailing = [tuple(v.shape[1:]) for v in values]
    if len(set(t[:-1] for t in trailing)) > 1:
        return None
    width = max(t[-1] for t in trailing) if trailing[0] else None
    result = values[0].new_full((batch_size,) + trailing[0][:-1] + ((width,) if width is not None else ()), 0)
    if width is not None and len(set(trailing)) > 1 and result.is_floating_point():
        result.fill_(float("-inf"))  # heads with other label counts
    for index, value in parts:
        index = index.to(value.device)
        if width is not None and value.shape[-1] != width:
            result[index, ..., : value.shape[-1]] = value
        else:
            result[index] = value
    return result


class _DeltaCall(_StandIn):
    """Stands in for a linear base layer: ``base(x)`` for all rows, plus for every target (task) its sparse delta
    applied to that target's rows, scaled by the rows' weights: ``y[r] += w_r * (x[r] @ delta^T + delta_bias)``.

    The base weight is read once for the whole batch and each task adds work proportional to its kept entries,
    which keeps decoding steps with many tasks in one batch close to the base model's cost.
    """

    def __init__(self, original: nn.Module, deltas: list, plan: _RowPlan) -> None:
        super().__init__(original, plan)
        self._deltas = deltas  # per target: SparseDelta or None (the base model)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self._original[0](x, *args, **kwargs)
        plan = self._plan
        rows, broadcast = self._rows(x)
        if broadcast:  # a shared input: the per-sample outputs differ, so expand first
            y = y.expand(rows, *y.shape[1:]).clone()
            x = x.expand(rows, *x.shape[1:])
        dtype = y.dtype
        if isinstance(self._original[0], nn.Embedding):
            return self._embedding_deltas(x, y, rows, dtype)
        per_row = x[0].numel() // x.shape[-1]  # tokens per row
        columns = None  # x as [features, rows * tokens], contiguous: the sparse matmul's fast layout
        for target, index, weights in plan.parts(rows, x.device, dtype):
            delta = self._deltas[target]
            if delta is None or not (delta.changes_weight or delta.bias is not None):  # base model, or nothing switched
                continue
            if columns is None:
                columns = _as_columns(x, delta)
            if isinstance(index, slice):
                selected = columns[:, index.start * per_row : index.stop * per_row]
            else:
                tokens = (index.unsqueeze(1) * per_row + torch.arange(per_row, device=index.device)).flatten()
                selected = columns.index_select(1, tokens)
            change = _apply_delta(delta, selected, dtype).view(-1, *y.shape[1:])
            if weights is not None:
                change = change * weights.view(-1, *([1] * (change.dim() - 1)))
            if isinstance(index, slice):
                y[index] += change
            else:
                y.index_add_(0, index, change)
        return y

    def _embedding_deltas(self, ids: torch.Tensor, y: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """Embedding lookups: add the kept entries of each task's delta rows for the looked-up ids."""
        for target, index, weights in self._plan.parts(rows, ids.device, dtype):
            delta = self._deltas[target]
            if delta is None or not delta.changes_weight:
                continue
            looked_up = ids[index].reshape(-1)
            if delta.low_rank is not None:
                left, right = delta.low_rank
                change = (left.index_select(0, looked_up) @ right).to(dtype).view(-1, *y.shape[1:])
            else:
                change = _gather_rows(delta.weight, looked_up).to(dtype).view(-1, *y.shape[1:])
            if weights is not None:
                change = change * weights.view(-1, *([1] * (change.dim() - 1)))
            if isinstance(index, slice):
                y[index] += change
            else:
                y.index_add_(0, index, change)
        return y


def _gather_rows(matrix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Dense ``matrix[rows]`` ``[len(rows), columns]`` of a CSR matrix; work proportional to the kept entries."""
    crow, col, values = matrix.crow_indices().long(), matrix.col_indices().long(), matrix.values()
    starts = crow[rows]
    counts = crow[rows + 1] - starts
    out = values.new_zeros((rows.numel(), matrix.shape[1]))
    total = int(counts.sum())
    if total == 0:
        return out
    owner = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), counts)
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    entries = torch.repeat_interleave(starts, counts) + torch.arange(total, device=rows.device) - first
    out[owner, col[entries]] = values[entries]
    return out


def _as_columns(x: torch.Tensor, delta) -> torch.Tensor:
    """``x`` as a contiguous ``[features, rows]`` matrix, in fp32 on CPU for half types (no CPU sparse kernels)."""
    columns = x.reshape(-1, x.shape[-1]).T
    weight = delta.weight
    if weight is not None and x.device.type == "cpu" and weight.dtype not in (torch.float32, torch.float64):
        columns = columns.float()
    return columns.contiguous()


def _apply_delta(delta, columns: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(delta.weight @ columns + delta.bias)^T``: ``[rows, out]`` from ``columns`` ``[in, rows]``."""
    weight = delta.weight
    if delta.low_rank is not None:
        left, right = (factor.to(columns.dtype) for factor in delta.low_rank)
        out = (right @ columns).T @ left.T
    elif weight is not None:
        if weight.dtype != columns.dtype:
            weight = weight.to(columns.dtype)
        out = torch.sparse.mm(weight, columns).T
    else:
        out = columns.new_zeros((columns.shape[1], delta.bias.shape[0]))
    if delta.bias is not None:
        out = out + delta.bias.to(out.dtype)
    return out.to(dtype)


@contextmanager
def delta_execution(
    slots: ModelSlots,
    deltas: list[list],
    compositions: list[Composition],
    assignments: list[Assignment],
    heads: list[str | None],
    head_of_sample: list[int],
) -> Iterator[None]:
    """Several compositions in one call: linear layers add per-target sparse deltas (``deltas[t][layer]``, None for
    non-linear layers or the base) to one base matmul; the other switched layers run per-target compositions
    (``compositions[t]``, linear layers left out) and mix their outputs; heads follow ``heads[head_of_sample[i]]``.
    """
    plan = _RowPlan(assignments, len(compositions))
    with _stand_ins() as replace:
        for index, layer in enumerate(slots.layers):
            base = layer.get_base_layer()
            layer_deltas = [per_target[index] for per_target in deltas]
            if any(delta is not None for delta in layer_deltas):
                replace(layer, "base_layer", _DeltaCall(base, layer_deltas, plan))
            elif any(c.per_layer[index] for c in compositions):
                replace(
                    layer, "base_layer", _GroupedCall(base, [(base, c.per_layer[index]) for c in compositions], plan)
                )
        for position, tied in enumerate(slots.tied):
            tied_deltas = [per_target[len(slots.layers) + position] for per_target in deltas]
            if any(delta is not None for delta in tied_deltas):
                replace(tied, "base_layer", _DeltaCall(tied.get_base_layer(), tied_deltas, plan))
        _replace_heads(replace, slots, heads, head_of_sample)
        yield


def reorder_rows(obj: object, order: torch.Tensor, batch_size: int, num_beams: int = 1) -> object:
    """Undo a permutation of the samples of a batch in ``generate`` outputs: row block ``p`` of every batch-major
    tensor moves to sample ``order[p]``. ``beam_indices`` values (rows of the permuted batch) are remapped too, and a
    KV cache is reordered in place."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())

    def rows(count: int, device: torch.device) -> torch.Tensor:
        factor = count // batch_size
        return (inverse.unsqueeze(1) * factor + torch.arange(factor)).flatten().to(device)

    def walk(value: object, key: str | None = None) -> object:
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 or value.shape[0] % batch_size:
                return value
            moved = value.index_select(0, rows(value.shape[0], value.device))
            if key == "beam_indices":  # values are rows of the permuted batch (sample * num_beams + beam)
                valid = moved >= 0
                original = order.to(moved.device)[(moved.clamp(min=0) // num_beams)] * num_beams + moved % num_beams
                moved = torch.where(valid, original, moved)
            return moved
        if isinstance(value, (tuple, list)):
            return type(value)(walk(item, key) for item in value)
        if isinstance(value, dict):
            return type(value)(**{k: walk(v, k) for k, v in value.items()})
        reorder = getattr(value, "reorder_cache", None)
        if callable(reorder) and getattr(value, "layers", None):
            size = value.layers[0].keys.shape[0] if getattr(value.layers[0], "keys", None) is not None else None
            if size:
                reorder(rows(size, value.layers[0].keys.device))
        return value

    return walk(obj)
