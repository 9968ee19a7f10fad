"""Choosing Auto-Switch's routing features on the validation split, as the merges choose their scaling there.

For every hidden-state layer of the base encoder and both metrics, the k-NN top task of each validation example
is computed exactly as :class:`~switch_adapter.AutoSwitchModel` computes it (mean pooling over non-padding tokens,
the library's k-NN and tie rule) against the same query examples; the most accurate (layer, metric) wins, the
shallower (cheaper) layer on ties. Training-free: nothing is fitted, two passes of the base model are run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from switch_adapter.autoswitch import knn
from switch_adapter.autoswitch.features import pool

METRICS = ("euclidean", "cosine")


@dataclass
class RoutingChoice:
    """The chosen ``layer`` (index into ``output_hidden_states``) and ``metric``, with the validation routing
    accuracy of every candidate (``scores[metric][layer]``)."""

    layer: int
    metric: str
    accuracy: float
    scores: dict[str, list[float]] = field(default_factory=dict)


@torch.no_grad()
def hidden_state_features(
    model: nn.Module, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 64
) -> torch.Tensor:
    """Mean-pooled ``output_hidden_states`` of ``model`` for ``texts``: ``[layers + 1, len(texts), hidden]``."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        hidden = model(**batch, output_hidden_states=True).hidden_states
        mask = batch["attention_mask"]
        chunks.append(torch.stack([pool(h, mask, "mean").half() for h in hidden]))  # fp16, as the router stores
    return torch.cat(chunks, dim=1)


def choose_routing_features(
    model: nn.Module,
    tokenizer,
    queries: Mapping[str, Sequence[str]],
    validation: Mapping[str, Sequence[str]],
    k: int,
    max_length: int,
) -> RoutingChoice:
    """The (layer, metric) whose k-NN top task is right most often on ``validation`` (task -> texts), retrieving
    among ``queries`` (task -> texts; the router's query sets). Layer 0 (the embedding output) is not a candidate,
    as in the router."""
    tasks = list(queries)
    if set(validation) != set(tasks):
        raise ValueError(f"Validation texts name tasks {sorted(validation)}, the query sets {sorted(tasks)}.")
    bank = hidden_state_features(model, tokenizer, [t for task in tasks for t in queries[task]], max_length)
    bank_tasks = torch.tensor([i for i, task in enumerate(tasks) for _ in queries[task]])
    probe = hidden_state_features(model, tokenizer, [t for task in tasks for t in validation[task]], max_length)
    truth = torch.tensor([i for i, task in enumerate(tasks) for _ in validation[task]])
    scores: dict[str, list[float]] = {}
    best: tuple[float, int, str] | None = None
    for metric in METRICS:
        scores[metric] = [float("nan")]
        for layer in range(1, bank.shape[0]):
            _, index = knn.nearest(probe[layer], bank[layer], k, metric)
            neighbours = bank_tasks[index]
            top = knn.top_tasks(knn.task_weights(neighbours, len(tasks)), neighbours)
            accuracy = float((top == truth).float().mean())
            scores[metric].append(accuracy)
            if best is None or accuracy > best[0] or (accuracy == best[0] and layer < best[1]):
                best = (accuracy, layer, metric)
    assert best is not None
    return RoutingChoice(layer=best[1], metric=best[2], accuracy=best[0], scores=scores)
