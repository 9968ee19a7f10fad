"""K-nearest-neighbour retrieval over the query features, task weights, and the out-of-distribution radius."""

from __future__ import annotations

import torch

_CHUNK = 4096  # query rows per block when computing pairwise distances


def distances(x: torch.Tensor, bank: torch.Tensor, metric: str) -> torch.Tensor:
    """``[B, N]`` distances between ``x`` ``[B, D]`` and ``bank`` ``[N, D]`` in fp32: Euclidean, or ``1 - cos``."""
    x, bank = x.float(), bank.float()
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=-1)
        bank = torch.nn.functional.normalize(bank, dim=-1)
        return (1.0 - x @ bank.T).clamp(min=0.0)
    return torch.cdist(x, bank)


def nearest(x: torch.Tensor, bank: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distances, indices)`` of the ``k`` nearest rows of ``bank``, nearest first (``k`` capped at N)."""
    k = min(k, bank.shape[0])
    found = distances(x, bank, metric).topk(k, dim=1, largest=False, sorted=True)
    return found.values, found.indices


def task_weights(neighbor_tasks: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """``w[b, t]`` = share of the k neighbours of sample b that belong to task t (rows sum to 1)."""
    counts = torch.zeros(neighbor_tasks.shape[0], num_tasks, device=neighbor_tasks.device)
    counts.scatter_add_(1, neighbor_tasks, torch.ones_like(neighbor_tasks, dtype=counts.dtype))
    return counts / neighbor_tasks.shape[1]


def top_tasks(weights: torch.Tensor, neighbor_tasks: torch.Tensor) -> torch.Tensor:
    """Index of the task with the largest weight per row; ties go to the task whose neighbour is nearest."""
    k = neighbor_tasks.shape[1]
    num_tasks = weights.shape[1]
    position = torch.arange(k, device=neighbor_tasks.device).expand_as(neighbor_tasks)
    first = torch.full((neighbor_tasks.shape[0], num_tasks), k, device=neighbor_tasks.device, dtype=torch.long)
    first.scatter_reduce_(1, neighbor_tasks, position, reduce="amin")
    counts = torch.round(weights * k).long()
    return (counts * (k + 1) + (k - first)).argmax(dim=1)


def round_weights(weights: torch.Tensor, step: float) -> torch.Tensor:
    """Round rows of ``weights`` (summing to 1) to multiples of ``step`` with largest-remainder rounding.

    Rows still sum to 1 when ``1/step`` is an integer; otherwise to the nearest multiple of ``step``.
    """
    units = max(1, round(1.0 / step))
    scaled = weights * units
    floor = scaled.floor()
    missing = (units - floor.sum(dim=1)).round().long().clamp(min=0)
    remainder = scaled - floor
    order = remainder.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    bump = (rank < missing.unsqueeze(1)) & (weights > 0)
    return (floor + bump.float()) / units


def calibrate_radius(bank: torch.Tensor, metric: str, quantile: float, scale: float) -> float:
    """OOD radius: ``scale`` times the ``quantile`` of the leave-one-out nearest-neighbour distances in ``bank``.

    A single example (nothing to leave one out against) gives an infinite radius: nothing is flagged.
    """
    if bank.shape[0] < 2:
        return float("inf")
    nearest_other = []
    for start in range(0, bank.shape[0], _CHUNK):
        block = distances(bank[start : start + _CHUNK], bank, metric)
        rows = torch.arange(block.shape[0], device=block.device)
        block[rows, rows + start] = float("inf")
        nearest_other.append(block.min(dim=1).values)
    values = torch.cat(nearest_other)
    return float(torch.quantile(values, quantile)) * scale
