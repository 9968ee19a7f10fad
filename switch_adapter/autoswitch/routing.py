"""Per-sample routing decisions (:class:`RoutingResult`) from features, and the compositions they group into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import knn
from .config import AutoSwitchConfig

CompositionKey = tuple[tuple[tuple[str, float], ...], "str | None"]


@dataclass(frozen=True)
class Group:
    """Samples that run with the same composition: ``base + sum_t weights[t] * switch_t`` and ``head``'s head."""

    key: CompositionKey
    weights: dict[str, float]
    head: str | None
    indices: list[int]


@dataclass
class RoutingResult:
    """How every sample of a batch is routed.

    Attributes:
        task_names: Task order of the columns of ``weights``.
        weights: ``[batch, tasks]`` float32: the composition applied to each sample, ``base + sum_t w_t switch_t``
            (rows sum to 1; all zeros for a sample that falls back to the base model).
        top_task: Per sample, the task with the largest weight (its head is used for sequence classification), or
            None when the sample runs on the base model.
        ood: ``[batch]`` bool: the nearest query example is farther than ``radius``.
        distances: ``[batch, k]`` float32: distances to the k nearest query examples, nearest first.
        neighbors: ``[batch, k]`` int64: the task index (into ``task_names``) of each of those neighbours.
        mode: The router's mode (``soft``, ``top1`` or ``batch``).
        metric: The metric the neighbours were retrieved with: ``learned`` (Euclidean after the learned
            projection), ``cosine`` or ``euclidean``.
        radius: The out-of-distribution radius in use (``inf``: never flagged), in the metric's space.
        num_labels: For sequence classification, the number of labels of the head each sample uses (logits are
            padded with ``-inf`` to the largest); None otherwise.
    """

    task_names: list[str]
    weights: torch.Tensor
    top_task: list[str | None]
    ood: torch.Tensor
    distances: torch.Tensor
    neighbors: torch.Tensor
    mode: str
    radius: float
    metric: str = "euclidean"
    num_labels: list[int | None] | None = None
    _groups: list[Group] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.weights.shape[0])

    def composition(self, index: int) -> dict[str, float]:
        """``{task: weight}`` of sample ``index`` (non-zero weights only; empty = base model)."""
        row = self.weights[index].tolist()
        return {name: round(value, 6) for name, value in zip(self.task_names, row) if value > 0}

    def groups(self) -> list[Group]:
        """Samples sharing a composition (same weights and head), in order of first appearance."""
        if self._groups is None:
            found: dict[CompositionKey, list[int]] = {}
            for index in range(len(self)):
                weights = self.composition(index)
                key: CompositionKey = (tuple(sorted(weights.items())), self.top_task[index])
                found.setdefault(key, []).append(index)
            self._groups = [Group(key, dict(key[0]), key[1], indices) for key, indices in found.items()]
        return self._groups

    def select(self, indices: list[int]) -> RoutingResult:
        """The routing of a subset of the samples, in the given order."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return RoutingResult(
            list(self.task_names),
            self.weights[index],
            [self.top_task[i] for i in indices],
            self.ood[index],
            self.distances[index],
            self.neighbors[index],
            self.mode,
            self.radius,
            self.metric,
            None if self.num_labels is None else [self.num_labels[i] for i in indices],
        )

    def to_list(self) -> list[dict[str, Any]]:
        """One plain dict per sample: ``weights``, ``top_task``, ``ood``, ``nearest_distance`` and ``metric``
        (JSON-friendly)."""
        return [
            {
                "weights": self.composition(i),
                "top_task": self.top_task[i],
                "ood": bool(self.ood[i]),
                "nearest_distance": float(self.distances[i, 0]) if self.distances.shape[1] else float("nan"),
                "metric": self.metric,
            }
            for i in range(len(self))
        ]


def route_features(
    features: torch.Tensor,
    bank: torch.Tensor,
    bank_tasks: torch.Tensor,
    task_names: list[str],
    config: AutoSwitchConfig,
    radius: float,
    distance: str,
    metric: str | None = None,
) -> RoutingResult:
    """Route a batch from its features ``[B, D]`` against the query ``bank`` ``[N, D]`` (task index per row), both
    in the space ``distance`` (``"euclidean"``/``"cosine"``) is measured in; ``metric`` names it in the result."""
    dist, index = knn.nearest(features, bank.to(features.device), config.k, distance)
    neighbor_tasks = bank_tasks.to(features.device)[index]
    weights = knn.task_weights(neighbor_tasks, len(task_names))
    top = knn.top_tasks(weights, neighbor_tasks)
    ood = dist[:, 0] > radius
    routed = ~ood if config.ood_fallback else torch.ones_like(ood)
    if config.mode == "top1":
        weights = torch.nn.functional.one_hot(top, len(task_names)).float()
    elif config.mode == "soft" and config.weight_step is not None:
        weights = knn.round_weights(weights, config.weight_step)
    elif config.mode == "batch" and bool(routed.any()):
        mean = weights[routed].mean(dim=0, keepdim=True)
        weights = mean.expand_as(weights).clone()
        top = mean.argmax(dim=1).expand_as(top)
    weights = torch.where(routed.unsqueeze(1), weights, torch.zeros_like(weights))
    top_names = [task_names[t] if keep else None for t, keep in zip(top.tolist(), routed.tolist())]
    return RoutingResult(
        task_names=list(task_names),
        weights=weights.float().cpu(),
        top_task=top_names,
        ood=ood.cpu(),
        distances=dist.float().cpu(),
        neighbors=neighbor_tasks.cpu(),
        mode=config.mode,
        radius=float(radius),
        metric=metric or distance,
    )
