"""Choosing the routing feature layer and metric from the query sets alone (no labels beyond the task names).

Every candidate (layer, metric) is scored by stratified k-fold cross-validated k-NN routing accuracy on the query
examples: each fold is routed against the other folds exactly as the router routes (same k, tie rule, and for the
learned metric a projection fitted on the other folds only). The cheapest layer whose best score is within
``tolerance`` of the overall best wins (routing stops the forward pass there); at that layer, the best metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import knn
from .metric import MetricFitError, fit_metric

PLAIN_METRICS = ("euclidean", "cosine")
# Order of preference when candidates score the same.
METRIC_ORDER = ("learned", "cosine", "euclidean")
MAX_CANDIDATE_LAYERS = 8
DEFAULT_FOLDS = 5


@dataclass
class FeatureChoice:
    """The chosen ``layer`` and ``metric`` and every candidate's cross-validated routing accuracy
    (``scores[metric][layer]``)."""

    layer: int
    metric: str
    scores: dict[str, dict[int, float]] = field(default_factory=dict)
    tolerance: float = 0.0
    folds: int = DEFAULT_FOLDS
    examples: int = 0

    @property
    def accuracy(self) -> float:
        return self.scores[self.metric][self.layer]

    def describe(self) -> dict[str, Any]:
        """JSON-friendly record of the choice (layer keys as strings)."""
        return {
            "layer": self.layer,
            "metric": self.metric,
            "cross_validated_accuracy": round(self.accuracy, 4),
            "scores": {m: {str(layer): round(v, 4) for layer, v in s.items()} for m, s in self.scores.items()},
            "tolerance": self.tolerance,
            "folds": self.folds,
            "examples": self.examples,
        }


def choice_from_dict(values: Mapping[str, Any]) -> FeatureChoice:
    """Inverse of :meth:`FeatureChoice.describe`."""
    scores = {m: {int(layer): float(v) for layer, v in s.items()} for m, s in values["scores"].items()}
    return FeatureChoice(
        int(values["layer"]), values["metric"], scores, float(values["tolerance"]), int(values["folds"]),
        int(values["examples"]),
    )  # fmt: skip


def candidate_layers(num_layers: int, limit: int = MAX_CANDIDATE_LAYERS) -> list[int]:
    """Layers 1..num_layers when there are at most ``limit``; else layer 1 and ``limit`` evenly spaced depths."""
    if num_layers <= limit:
        return list(range(1, num_layers + 1))
    return sorted({1} | {round(num_layers * i / limit) for i in range(1, limit + 1)})


def fold_of(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Stratified fold index per example: each task's examples dealt round-robin in a seeded random order."""
    generator = torch.Generator().manual_seed(seed)
    assigned = torch.empty_like(labels)
    for task in labels.unique():
        members = (labels == task).nonzero().squeeze(1)
        order = members[torch.randperm(members.numel(), generator=generator)]
        assigned[order] = torch.arange(order.numel()) % folds
    return assigned


def cross_validated_accuracy(
    features: torch.Tensor,
    labels: torch.Tensor,
    tasks: Sequence[str],
    metric: str,
    *,
    k: int,
    objective: str = "lda",
    rank: int = 32,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
) -> float:
    """Share of examples whose k-NN top task, among the other folds' examples, is their own task."""
    assigned = fold_of(labels, folds, seed)
    correct = 0
    for fold in range(folds):
        train, test = assigned != fold, assigned == fold
        if not bool(test.any()):
            continue
        bank, probe = features[train].float(), features[test].float()
        distance = metric
        if metric == "learned":
            try:
                learned = fit_metric(
                    bank, labels[train], list(tasks), objective, min(rank, bank.shape[1]), seed, check=False
                )
            except MetricFitError:  # nothing to learn from at this layer: the candidate routes nothing right
                return 0.0
            bank, probe, distance = learned.project(bank), learned.project(probe), "euclidean"
        _, index = knn.nearest(probe, bank, k, distance)
        neighbours = labels[train][index]
        top = knn.top_tasks(knn.task_weights(neighbours, len(tasks)), neighbours)
        correct += int((top == labels[test]).sum())
    return correct / int(labels.numel())


def choose_features(
    features: Mapping[int, torch.Tensor],
    labels: torch.Tensor,
    tasks: Sequence[str],
    metrics: Sequence[str],
    *,
    k: int,
    tolerance: float,
    objective: str = "lda",
    rank: int = 32,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
) -> FeatureChoice:
    """Score every (layer in ``features``, metric in ``metrics``) and pick the cheapest layer within
    ``tolerance`` of the best score, then the best metric at that layer (ties: ``METRIC_ORDER``)."""
    scores = {
        metric: {
            layer: cross_validated_accuracy(
                values, labels, tasks, metric, k=k, objective=objective, rank=rank, folds=folds, seed=seed
            )
            for layer, values in sorted(features.items())
        }
        for metric in sorted(metrics, key=METRIC_ORDER.index)
    }
    best = max(value for per_layer in scores.values() for value in per_layer.values())
    layer = min(
        layer for per_layer in scores.values() for layer, value in per_layer.items() if value >= best - tolerance
    )
    metric = max(scores, key=lambda m: (scores[m][layer], -METRIC_ORDER.index(m)))
    return FeatureChoice(layer, metric, scores, tolerance, folds, int(labels.numel()))
