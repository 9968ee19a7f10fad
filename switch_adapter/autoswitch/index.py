"""The routing index: the query bank in the space of the metric in use, its task ids and the OOD radius."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from . import knn
from .config import AutoSwitchConfig
from .features import QueryFeatures
from .metric import MIN_EXAMPLES_PER_TASK, LearnedMetric, MetricFitError, fit_metric
from .selection import DEFAULT_FOLDS, FeatureChoice, choose_features, fold_of

logger = logging.getLogger(__name__)

# With a single task nothing can be learned or compared: the plain metric that routed best in our measurements.
SINGLE_TASK_METRIC = "cosine"


@dataclass
class RoutingIndex:
    """What routing retrieves against.

    Attributes:
        tasks: Task order of ``bank_tasks``.
        metric: The metric in use: ``"learned"``, ``"cosine"`` or ``"euclidean"``.
        learned: The fitted projection when ``metric == "learned"``.
        bank: Query features in the metric's space (projected for ``"learned"``), fp32 ``[examples, dim]``.
        bank_tasks: Task index of each row of ``bank``.
        radius: Out-of-distribution radius, in the same space.
        choice: How layer and metric were chosen (None when both were given).
    """

    tasks: list[str]
    metric: str
    learned: LearnedMetric | None
    bank: torch.Tensor
    bank_tasks: torch.Tensor
    radius: float
    choice: FeatureChoice | None = None

    @property
    def distance(self) -> str:
        """The distance computed on ``bank``: Euclidean in the learned space."""
        return "euclidean" if self.metric == "learned" else self.metric

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.learned.project(features) if self.learned is not None else features

    @property
    def nbytes(self) -> int:
        extra = self.learned.projection.numel() * 4 if self.learned is not None else 0
        return self.bank.numel() * self.bank.element_size() + extra


def check_rank(config: AutoSwitchConfig, feature_size: int) -> None:
    """A learned projection cannot have more dimensions than the features it projects."""
    if config.metric in ("learned", "auto") and config.resolve_metric_rank(feature_size) > feature_size:
        raise MetricFitError(
            f"AutoSwitchConfig(metric_rank={config.metric_rank}) is larger than the routing feature size "
            f"{feature_size}: a projection cannot add dimensions. Use metric_rank <= {feature_size}."
        )


def metric_candidates(config: AutoSwitchConfig, counts: Mapping[str, int]) -> list[str]:
    """The metrics ``metric="auto"`` compares: the learned one only with two tasks and enough examples each."""
    learnable = len(counts) >= 2 and min(counts.values()) >= MIN_EXAMPLES_PER_TASK
    return (["learned"] if learnable else []) + ["cosine", "euclidean"]


def can_choose(counts: Mapping[str, int]) -> bool:
    """Cross-validation needs two tasks and two examples of each."""
    return len(counts) >= 2 and min(counts.values()) >= 2


def choose(
    features: Mapping[int, torch.Tensor], labels: torch.Tensor, tasks: list[str], config: AutoSwitchConfig
) -> FeatureChoice:
    """Cross-validated choice of layer (among ``features``' keys) and metric (``config.metric``, or every
    candidate for ``"auto"``)."""
    size = int(next(iter(features.values())).shape[1])
    check_rank(config, size)
    counts = {task: int((labels == i).sum()) for i, task in enumerate(tasks)}
    metrics = metric_candidates(config, counts) if config.metric == "auto" else [config.metric]
    return choose_features(
        features, labels, tasks, metrics, k=config.k, tolerance=config.layer_tolerance,
        objective=config.metric_objective, rank=config.resolve_metric_rank(size),
        folds=min(DEFAULT_FOLDS, min(counts.values())), seed=config.seed,
    )  # fmt: skip


def build_index(
    query: Mapping[str, QueryFeatures],
    config: AutoSwitchConfig,
    *,
    metric: str | None = None,
    learned: LearnedMetric | None = None,
    choice: FeatureChoice | None = None,
) -> RoutingIndex:
    """The index of ``query``. ``metric`` / ``learned``: already decided (build-time choice, a bundle); a
    ``learned`` projection fitted on other tasks is refitted. Otherwise ``config.metric`` decides (``"auto"``:
    chosen at the query features' layer). Raises ``MetricFitError`` before anything changes."""
    tasks = list(query)
    raw = torch.cat([query[task].features for task in tasks]).float()
    labels = torch.cat([torch.full((len(query[task]),), i, dtype=torch.long) for i, task in enumerate(tasks)])
    counts = {task: len(query[task]) for task in tasks}
    check_rank(config, int(raw.shape[1]))
    if metric is None:
        metric = config.metric
        if metric == "auto":
            if can_choose(counts):
                layer = next(iter(query.values())).spec.layer
                choice = choose({layer: raw}, labels, tasks, config)
                metric = choice.metric
            else:
                metric = SINGLE_TASK_METRIC
    if metric == "learned" and len(tasks) < 2:
        logger.warning(
            "A learned routing metric separates tasks and needs at least two; with the single task %r the router "
            "uses the %s distance until a second task is added (add_task refits the metric).",
            tasks[0],
            SINGLE_TASK_METRIC,
        )
        metric = SINGLE_TASK_METRIC
    if metric != "learned":
        learned = None
    elif learned is None or learned.tasks != tasks or learned.examples != [counts[t] for t in tasks]:
        rank = config.resolve_metric_rank(int(raw.shape[1]))
        learned = fit_metric(raw, labels, tasks, config.metric_objective, rank, config.seed)
    else:
        learned.check_feature_size(int(raw.shape[1]), "the stored routing metric")
    bank = learned.project(raw) if learned is not None else raw
    distance = "euclidean" if metric == "learned" else metric
    if config.ood_radius is not None:
        radius = float(config.ood_radius)
    elif learned is not None:
        radius = cross_fitted_radius(raw, labels, tasks, config, learned.rank)
    else:
        radius = knn.calibrate_radius(bank, distance, config.ood_quantile, config.ood_scale)
    return RoutingIndex(tasks, metric, learned, bank, labels, radius, choice)


def cross_fitted_radius(
    raw: torch.Tensor, labels: torch.Tensor, tasks: list[str], config: AutoSwitchConfig, rank: int
) -> float:
    """OOD radius in the learned space from held-out distances: each fold is projected with ``L`` fitted on the
    other folds and measured against them. A projection fitted on the query examples pulls each task's examples
    together, so their own leave-one-out distances would understate how far new inputs of the same tasks land."""
    folds = min(DEFAULT_FOLDS, min(int((labels == i).sum()) for i in range(len(tasks))))
    if folds < 2:
        return float("inf")
    assigned = fold_of(labels, folds, config.seed)
    nearest = []
    for fold in range(folds):
        train, held = assigned != fold, assigned == fold
        learned = fit_metric(raw[train], labels[train], tasks, config.metric_objective, rank, config.seed, check=False)
        nearest.append(
            knn.distances(learned.project(raw[held]), learned.project(raw[train]), "euclidean").min(1).values
        )
    return float(torch.quantile(torch.cat(nearest), config.ood_quantile)) * config.ood_scale
