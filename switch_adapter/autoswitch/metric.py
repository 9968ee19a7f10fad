"""The learned routing metric: a low-rank projection ``z = L f`` fitted on the query sets' task labels.

Distances between routing features are Euclidean distances between their projections. Two objectives, both from
scikit-learn:

- ``"lda"`` (default): Fisher's linear discriminant against the prior-weighted within-task covariance with
  Ledoit-Wolf shrinkage (``sklearn.covariance.ledoit_wolf`` on each task's standardised features, as scikit-learn's
  ``LinearDiscriminantAnalysis(shrinkage="auto")`` computes it); directions of unit within-task variance. Not
  scikit-learn's eigen solver itself: it solves a generalised eigenproblem of size ``features x features`` (about
  2 s at 576 features on 2 busy cores, and the layer choice fits dozens) and takes the between-task scatter from
  the shrunk total covariance. The exact between-task scatter has rank ``tasks - 1`` at most, so here the
  directions come from a Cholesky factor and the SVD of a ``features x tasks`` matrix. On the MiniLM suite both
  route the same test inputs equally well (within 0.2 points). Rank at most ``tasks - 1``.
- ``"nca"``: neighbourhood components analysis (``NeighborhoodComponentsAnalysis``), the objective of the
  Auto-FlexSwitch paper: maximises the leave-one-out probability that a point's soft neighbours share its task.
  Any rank up to the feature size; its cost grows with the square of the number of query examples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SwitchAdapterError

logger = logging.getLogger(__name__)

OBJECTIVES = ("lda", "nca")
# Fewer examples than this per task leave the within-task spread unmeasured: the fit would chase noise.
MIN_EXAMPLES_PER_TASK = 5
NCA_MAX_ITER = 100


class MetricFitError(SwitchAdapterError, ValueError):
    """The learned metric cannot be fitted (too few examples per task, a rank above the feature size) or a stored
    projection does not fit the router's features."""


@dataclass
class LearnedMetric:
    """A fitted projection ``projection`` (fp32 ``[rank, feature size]``); ``z = f @ projection.T``.

    ``objective``: ``"lda"`` or ``"nca"``; ``tasks`` and ``examples``: the task names and query examples per task
    it was fitted on.
    """

    projection: torch.Tensor
    objective: str
    tasks: list[str]
    examples: list[int]

    @property
    def rank(self) -> int:
        return int(self.projection.shape[0])

    @property
    def feature_size(self) -> int:
        return int(self.projection.shape[1])

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, rank]`` fp32 projections of ``features`` ``[B, feature size]``."""
        projection = self.projection.to(features.device)
        return features.float() @ projection.T

    def describe(self) -> dict[str, Any]:
        """JSON-friendly record: objective, rank, feature size, tasks and examples per task."""
        return {
            "objective": self.objective,
            "rank": self.rank,
            "feature_size": self.feature_size,
            "tasks": list(self.tasks),
            "examples_per_task": list(self.examples),
        }

    def check_feature_size(self, size: int, what: str) -> None:
        if self.feature_size != size:
            raise MetricFitError(
                f"The learned projection of {what} has shape {list(self.projection.shape)}, for features of size "
                f"{self.feature_size}, but the router's features have size {size}: it was fitted for another base "
                "model or feature layer. Rebuild the router from the adapters and query sets (the projection is "
                "refitted), or load the bundle onto the base model it was made for."
            )


def _shrinkage_lda(x: Any, y: Any, keep: int) -> torch.Tensor:
    """``[keep, features]`` discriminant directions, fp64: the leading generalised eigenvectors of the between-task
    scatter against the prior-weighted, Ledoit-Wolf-shrunk within-task covariance, normalised to unit
    within-task variance (``v^T S_w v = 1``), as scikit-learn's eigen solver returns them."""
    import numpy as np
    from sklearn.covariance import ledoit_wolf

    classes, counts = np.unique(y, return_counts=True)
    priors = counts / counts.sum()
    size = x.shape[1]
    within = np.zeros((size, size))
    means = []
    for cls, prior in zip(classes, priors):
        members = x[y == cls]
        means.append(members.mean(axis=0))
        scale = members.std(axis=0)
        scale[scale == 0] = 1.0
        shrunk = ledoit_wolf((members - means[-1]) / scale)[0]
        within += prior * (scale[:, None] * shrunk * scale[None, :])
    means = np.stack(means)
    centred = np.sqrt(priors)[:, None] * (means - priors @ means)  # between-task scatter = centred.T @ centred
    within_t = torch.from_numpy(within)
    spread = float(within_t.diagonal().mean())
    factor, info = torch.linalg.cholesky_ex(within_t + 1e-10 * spread * torch.eye(size, dtype=torch.float64))
    if not spread > 0 or int(info) != 0:
        raise MetricFitError(
            "The query features have no within-task spread to fit a learned metric on (constant or duplicated "
            "features). Check the query sets (distinct examples per task), or use metric='cosine'."
        )
    whitened = torch.linalg.solve_triangular(factor, torch.from_numpy(centred.T.copy()), upper=False)
    directions = torch.linalg.svd(whitened, full_matrices=False).U[:, :keep]
    return torch.linalg.solve_triangular(factor.T, directions, upper=True).T.contiguous()


def check_fit_inputs(counts: dict[str, int], feature_size: int, rank: int) -> None:
    """Raise :class:`MetricFitError` for a rank above ``feature_size`` or a task with too few examples."""
    if rank > feature_size:
        raise MetricFitError(
            f"metric_rank={rank} is larger than the routing feature size {feature_size}: a projection cannot add "
            f"dimensions. Use AutoSwitchConfig(metric_rank=<at most {feature_size}>)."
        )
    few = {task: count for task, count in counts.items() if count < MIN_EXAMPLES_PER_TASK}
    if few:
        listing = ", ".join(f"{task}: {count}" for task, count in few.items())
        raise MetricFitError(
            f"The learned metric needs at least {MIN_EXAMPLES_PER_TASK} query examples per task to learn from; "
            f"too few for {listing}. Give more examples for these tasks, or use metric='cosine' (no fitting)."
        )


def fit_metric(
    features: torch.Tensor,
    labels: torch.Tensor,
    tasks: list[str],
    objective: str,
    rank: int,
    seed: int = 0,
    *,
    check: bool = True,
) -> LearnedMetric:
    """Fit ``L`` on ``features`` ``[N, D]`` with task index ``labels`` ``[N]`` (at least two tasks).

    The rank is ``min(rank, D)`` and, for ``"lda"``, at most ``len(tasks) - 1``. ``check=False`` skips the
    examples-per-task minimum (cross-validation folds).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown metric objective {objective!r}: use one of {OBJECTIVES}.")
    if len(tasks) < 2:
        raise MetricFitError("A learned metric separates tasks: it needs at least two.")
    counts = {task: int((labels == i).sum()) for i, task in enumerate(tasks)}
    if check:
        check_fit_inputs(counts, int(features.shape[1]), rank)
    x = features.detach().double().cpu().numpy()
    y = labels.detach().cpu().numpy()
    if objective == "lda":
        keep = min(rank, len(tasks) - 1, x.shape[1])
        matrix = _shrinkage_lda(x, y, keep)
    else:
        from sklearn.neighbors import NeighborhoodComponentsAnalysis

        nca = NeighborhoodComponentsAnalysis(n_components=rank, random_state=seed, max_iter=NCA_MAX_ITER)
        matrix = torch.from_numpy(nca.fit(x, y).components_.copy())
    matrix = matrix.float()
    if not torch.isfinite(matrix).all():
        raise MetricFitError(
            "Fitting the learned metric gave NaN/Inf (constant or duplicate query features?). Check the query sets, "
            "or use metric='cosine'."
        )
    return LearnedMetric(matrix, objective, list(tasks), [counts[task] for task in tasks])
