"""Composed parameters ``base + sum_t w_t * delta_t`` for a composition, with an LRU cache under a memory budget."""

from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..tswitch.layer import SwitchedModule, TiedSwitchedModule

logger = logging.getLogger(__name__)

WeightsKey = tuple[tuple[str, float], ...]


def weights_key(weights: dict[str, float]) -> WeightsKey:
    return tuple(sorted((name, round(float(w), 6)) for name, w in weights.items() if w != 0))


class ModelSlots:
    """The places of a PEFT model that Auto-Switch substitutes: switched layers, tied outputs, task heads."""

    def __init__(self, model: nn.Module) -> None:
        self.layers: list[SwitchedModule] = [m for m in model.modules() if isinstance(m, SwitchedModule)]
        self.tied: list[TiedSwitchedModule] = [m for m in model.modules() if isinstance(m, TiedSwitchedModule)]
        self.heads: list[ModulesToSaveWrapper] = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
        self.layer_index = {id(layer): i for i, layer in enumerate(self.layers)}
        # Layers whose output is not affine in their parameters cannot mix per-task outputs (see execute.py).
        self.non_affine = [
            layer
            for layer in self.layers
            if isinstance(layer.get_base_layer(), nn.Embedding) and layer.get_base_layer().max_norm is not None
        ]


@dataclass
class Composition:
    """Composed parameters, per switched layer (aligned with :attr:`ModelSlots.layers`): ``{param: tensor}``; for
    norm layers with running statistics also ``running_mean`` / ``running_var`` (buffers).

    Layers that no weighted adapter switches have an empty dict and keep the base parameters.
    """

    key: WeightsKey
    per_layer: list[dict[str, torch.Tensor]]
    nbytes: int = 0


@torch.no_grad()
def compose(slots: ModelSlots, weights: dict[str, float], skip_delta_layers: bool = False) -> Composition:
    """Build ``base + sum_t weights[t] * delta_t`` for every switched parameter, from the switches' kept entries, and
    ``base + sum_t weights[t] * (stat_t - base)`` for the running statistics of norm layers that carry them.

    ``skip_delta_layers``: leave linear layers out (they run with sparse deltas, see execute.py).
    """
    key = weights_key(weights)
    per_layer: list[dict[str, torch.Tensor]] = []
    active = dict(key)
    for layer in slots.layers:
        skip = not active or (skip_delta_layers and is_delta_layer(layer))
        per_layer.append({} if skip else layer_parameters(layer, active))
    nbytes = sum(value.numel() * value.element_size() for params in per_layer for value in params.values())
    return Composition(key, per_layer, nbytes)


@torch.no_grad()
def layer_parameters(layer: SwitchedModule, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """One layer's composed parameters (and running statistics) for ``weights``; only those a task switches."""
    params: dict[str, torch.Tensor] = {}
    base = layer.get_base_layer()
    for param_name in ("weight", "bias"):
        param = getattr(base, param_name, None)
        if isinstance(param, torch.Tensor):
            value = layer.add_weighted_deltas(param_name, param, weights)
            if value is not None:
                params[param_name] = value
    statistics = layer.composed_statistics(weights)  # BatchNorm & co.: running statistics are buffers
    for name, value in (statistics or {}).items():
        params[name] = value.clone()  # a train-mode call must not update the adapter's statistics
    return params


@dataclass
class CacheInfo:
    """Composition cache statistics: entries kept, their bytes, the budget, hits, misses and builds."""

    entries: int
    nbytes: int
    budget_bytes: int
    hits: int
    misses: int


@dataclass
class CompositionCache:
    """Least-recently-used compositions whose total size stays within ``budget_bytes``.

    A composition larger than the budget is built for the call that needs it and not retained.
    """

    budget_bytes: int
    _entries: OrderedDict = field(default_factory=OrderedDict)
    _nbytes: int = 0
    hits: int = 0
    misses: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, key: tuple[WeightsKey, str], build: Callable[[], Composition]) -> Composition:
        """The composition cached under ``key`` (``(weights key, kind)``), else ``build()`` (kept if it fits)."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        composition = build()
        with self._lock:
            if composition.nbytes <= self.budget_bytes and key not in self._entries:
                self._entries[key] = composition
                self._nbytes += composition.nbytes
                while self._nbytes > self.budget_bytes:
                    _, evicted = self._entries.popitem(last=False)
                    self._nbytes -= evicted.nbytes
            elif composition.nbytes > self.budget_bytes:
                logger.debug("Composition %s (%d bytes) exceeds the cache budget; not kept.", key, composition.nbytes)
        return composition

    def contains(self, key: tuple[WeightsKey, str]) -> bool:
        with self._lock:
            return key in self._entries

    def discard_task(self, task: str) -> None:
        """Drop every composition that uses ``task``."""
        with self._lock:
            for key in [key for key in self._entries if any(name == task for name, _ in key[0])]:
                self._nbytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(len(self._entries), self._nbytes, self.budget_bytes, self.hits, self.misses)


# -- sparse deltas (for linear layers in multi-composition batches) ---------------------------------------------


def is_delta_layer(layer: SwitchedModule) -> bool:
    """Layers run as ``base(x) + delta(x)`` with a sparse delta: linear layers (nn.Linear, Conv1D) and embeddings
    (without ``max_norm``)."""
    base = layer.get_base_layer()
    if isinstance(base, nn.Embedding):
        return base.max_norm is None
    return isinstance(base, (nn.Linear, Conv1D)) and base.weight.dim() == 2


@dataclass
class SparseDelta:
    """One task's change of a linear layer: ``weight`` as a CSR matrix ``[out, in]`` (``[tokens, dim]`` for an
    embedding; int32 indices), or for a low-rank pair ``low_rank = (left, right)`` whose product is that matrix
    (``weight`` None then); and the bias change as a dense vector (None when not switched)."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def changes_weight(self) -> bool:
        return self.weight is not None or self.low_rank is not None

    @property
    def nbytes(self) -> int:
        total = sum(f.numel() * f.element_size() for f in self.low_rank) if self.low_rank is not None else 0
        if self.weight is not None:
            for part in (self.weight.crow_indices(), self.weight.col_indices(), self.weight.values()):
                total += part.numel() * part.element_size()
        if self.bias is not None:
            total += self.bias.numel() * self.bias.element_size()
        return total


@torch.no_grad()
def sparse_delta(layer: SwitchedModule, task: str) -> SparseDelta:
    """The task's delta of a linear layer from the switch's kept positions and signs (no dense matrix built)."""
    base = layer.get_base_layer()
    weight = None
    bias = layer.get_delta(task, "bias") if getattr(base, "bias", None) is not None else None
    if layer.is_low_rank(task):
        left, right = layer.low_rank_factors(task)
        if isinstance(base, Conv1D):  # stored [in, out] = left @ right: as [out, in], right^T @ left^T
            left, right = right.T, left.T
        return SparseDelta(None, bias, (left.contiguous(), right.contiguous()))
    if layer._has_switch(task, "weight"):
        positions, values = layer._kept_values(task, "weight", base.weight)
        if isinstance(base, Conv1D):  # weight [in, out], y = x @ W: store the transpose [out, in]
            in_features, out_features = base.weight.shape
            rows, cols = positions % out_features, positions // out_features
            order = torch.argsort(rows * in_features + cols)
            rows, cols, values = rows[order], cols[order], values[order]
        else:
            out_features, in_features = base.weight.shape
            rows, cols = positions // in_features, positions % in_features
        crow = torch.zeros(out_features + 1, dtype=torch.int64, device=positions.device)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=out_features), 0)
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            weight = torch.sparse_csr_tensor(
                crow.to(torch.int32), cols.to(torch.int32), values.contiguous(), (out_features, in_features)
            )
    return SparseDelta(weight, bias)


class DeltaCache:
    """Sparse deltas per (task, layer), built on first use and kept until the task is removed or the model moves."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, int], SparseDelta] = {}
        self._lock = threading.Lock()

    def get(self, task: str, layer: SwitchedModule) -> SparseDelta:
        key = (task, id(layer))
        with self._lock:
            found = self._entries.get(key)
        if found is None:
            with torch.inference_mode(False):
                found = sparse_delta(layer, task)
            with self._lock:
                self._entries[key] = found
        return found

    def discard_task(self, task: str) -> None:
        with self._lock:
            for key in [key for key in self._entries if key[0] == task]:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes for entry in self._entries.values())
