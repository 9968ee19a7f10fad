"""Evaluation on mixed-task batches: the test examples of all tasks shuffled together, as a deployment sees them.

A method is a *predictor*: a callable taking a :class:`Batch` and returning a :class:`Prediction` — per sample the
predicted label and the task whose head produced it. A sample counts as correct only when that task is its own
task and the label is right, so a router that sends a sample to another task's head gets it wrong.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .model import MeanPoolingClassifier


@dataclass
class Batch:
    """Model inputs of one mixed batch, with each sample's true label and task index."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    tasks: torch.Tensor

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model inputs of the samples ``index`` (padding trimmed to their longest sample)."""
        inputs = {key: value[index] for key, value in self.inputs.items()}
        length = int(inputs["attention_mask"].sum(dim=1).max()) if index.numel() else 0
        return {key: value[:, :length] for key, value in inputs.items()}


@dataclass
class Prediction:
    """Per sample: predicted label and the index of the task whose head produced it (-1: none)."""

    labels: torch.Tensor
    tasks: torch.Tensor
    routed: bool = False


Predictor = Callable[[Batch], Prediction]


@dataclass
class MixedStream:
    """The shuffled, batched examples of several tasks."""

    task_names: list[str]
    batches: list[Batch]
    counts: dict[str, int]

    def __len__(self) -> int:
        return sum(self.counts.values())


def _collect(splits: Mapping[str, Any], text_column: str, label_column: str):
    texts: list[str] = []
    labels: list[int] = []
    tasks: list[int] = []
    for index, name in enumerate(splits):
        data = splits[name]
        texts += list(data[text_column])
        labels += [int(label) for label in data[label_column]]
        tasks += [index] * len(data)
    return texts, labels, tasks


def _tokenized(
    chunks: Sequence[Sequence[int]], texts: list[str], labels: list[int], tasks: list[int], tokenizer, max_length: int
) -> list[Batch]:
    batches = []
    for chosen in chunks:
        encoded = tokenizer(
            [texts[i] for i in chosen], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        inputs = {key: encoded[key] for key in ("input_ids", "attention_mask") if key in encoded}
        batches.append(
            Batch(inputs, torch.tensor([labels[i] for i in chosen]), torch.tensor([tasks[i] for i in chosen]))
        )
    return batches


def mixed_stream(
    splits: Mapping[str, Any],
    tokenizer: Any,
    batch_size: int = 32,
    max_length: int = 64,
    seed: int = 0,
    text_column: str = "text",
    label_column: str = "label",
) -> MixedStream:
    """Shuffle the examples of ``{task: datasets.Dataset}`` together (fixed by ``seed``) and tokenize them in
    batches of ``batch_size`` (padded to the longest sample of each batch, truncated to ``max_length``)."""
    texts, labels, tasks = _collect(splits, text_column, label_column)
    order = np.random.default_rng(seed).permutation(len(texts)).tolist()
    chunks = [order[first : first + batch_size] for first in range(0, len(order), batch_size)]
    batches = _tokenized(chunks, texts, labels, tasks, tokenizer, max_length)
    return MixedStream(list(splits), batches, {name: len(splits[name]) for name in splits})


def single_task_stream(
    splits: Mapping[str, Any],
    tokenizer: Any,
    batch_size: int = 32,
    max_length: int = 64,
    seed: int = 0,
    text_column: str = "text",
    label_column: str = "label",
) -> MixedStream:
    """The same examples in batches that each hold one task only (the reference's evaluation protocol); the
    batches of all tasks are shuffled together."""
    texts, labels, tasks = _collect(splits, text_column, label_column)
    rng = np.random.default_rng(seed)
    chunks = []
    for task in range(len(splits)):
        members = [i for i in rng.permutation(len(texts)).tolist() if tasks[i] == task]
        chunks += [members[first : first + batch_size] for first in range(0, len(members), batch_size)]
    chunks = [chunks[i] for i in rng.permutation(len(chunks))]
    batches = _tokenized(chunks, texts, labels, tasks, tokenizer, max_length)
    return MixedStream(list(splits), batches, {name: len(splits[name]) for name in splits})


OOD_COLUMN = "OOD/base"


@dataclass
class EvalResult:
    """Accuracy per task and their mean, routing accuracy and confusion (routed methods), and the wall time of the
    pass.

    ``confusion`` (routed methods): ``{"tasks": true tasks (rows), "columns": routed-to tasks, plus ``OOD/base``
    when some sample went to no task, "matrix": counts [rows][columns]}``; each row sums to that task's samples.
    """

    accuracy: dict[str, float]
    mean: float
    seconds: float
    routing_accuracy: float | None = None
    routing_per_task: dict[str, float] | None = None
    confusion: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def confusion_record(names: Sequence[str], counts: torch.Tensor) -> dict[str, Any]:
    """The JSON-friendly confusion of ``counts`` ``[tasks, tasks + 1]`` (last column: routed to no task, kept
    only when used)."""
    columns = list(names)
    if counts[:, -1].any():
        columns.append(OOD_COLUMN)
    else:
        counts = counts[:, :-1]
    return {"tasks": list(names), "columns": columns, "matrix": [[int(v) for v in row] for row in counts.tolist()]}


@torch.no_grad()
def evaluate(predictor: Predictor, stream: MixedStream, desc: str = "evaluate", progress: bool = True) -> EvalResult:
    """Run ``predictor`` over every batch of ``stream`` and score it (see the module docstring)."""
    names = stream.task_names
    correct = torch.zeros(len(names))
    routed_right = torch.zeros(len(names))
    total = torch.zeros(len(names))
    confusion = torch.zeros(len(names), len(names) + 1, dtype=torch.long)  # last column: routed to no task
    routed = False
    start = time.perf_counter()
    for batch in tqdm(stream.batches, desc=desc, disable=not progress, leave=False):
        prediction = predictor(batch)
        routed = routed or prediction.routed
        right_task = prediction.tasks == batch.tasks
        hit = right_task & (prediction.labels == batch.labels)
        total += torch.bincount(batch.tasks, minlength=len(names)).float()
        correct += torch.bincount(batch.tasks, weights=hit.float(), minlength=len(names))
        routed_right += torch.bincount(batch.tasks, weights=right_task.float(), minlength=len(names))
        routed_to = torch.where(prediction.tasks < 0, len(names), prediction.tasks)
        confusion.index_put_((batch.tasks, routed_to), torch.ones_like(routed_to), accumulate=True)
    seconds = time.perf_counter() - start
    accuracy = {name: float(correct[i] / total[i]) if total[i] else float("nan") for i, name in enumerate(names)}
    result = EvalResult(accuracy, float(np.mean(list(accuracy.values()))), seconds)
    if routed:
        result.routing_per_task = {name: float(routed_right[i] / total[i]) for i, name in enumerate(names)}
        result.routing_accuracy = float(routed_right.sum() / total.sum())
        result.confusion = confusion_record(names, confusion)
    return result


# ----------------------------------------------------------------------------------------------------
# Predictors
# ----------------------------------------------------------------------------------------------------


def per_task_groups(batch: Batch) -> list[tuple[int, torch.Tensor]]:
    """``[(task index, sample indices)]`` of the tasks present in ``batch``."""
    return [(int(task), torch.nonzero(batch.tasks == task).flatten()) for task in torch.unique(batch.tasks)]


def grouped_predictor(run: Callable[[int, dict[str, torch.Tensor]], torch.Tensor]) -> Predictor:
    """A task-id-given predictor: splits each batch by task and calls ``run(task index, inputs) -> logits``."""

    def predict(batch: Batch) -> Prediction:
        labels = torch.empty_like(batch.labels)
        for task, index in per_task_groups(batch):
            labels[index] = run(task, batch.select(index)).argmax(dim=-1)
        return Prediction(labels, batch.tasks.clone())

    return predict


def shared_encoder_predictor(model: MeanPoolingClassifier, heads: Sequence[nn.Module]) -> Predictor:
    """One encoder for every task (pre-trained or statically merged); each sample gets its own task's head."""

    def predict(batch: Batch) -> Prediction:
        pooled = model.pooled(**batch.inputs)
        labels = torch.empty_like(batch.labels)
        for task, index in per_task_groups(batch):
            labels[index] = heads[task](pooled[index]).argmax(dim=-1)
        return Prediction(labels, batch.tasks.clone())

    return predict


def models_predictor(models: Sequence[nn.Module]) -> Predictor:
    """One full model per task (individual fine-tunes, EMR's per-task models); the task id picks the model."""
    return grouped_predictor(lambda task, inputs: models[task](**inputs).logits)


def peft_oracle_predictor(peft_model: nn.Module, adapter_names: Sequence[str]) -> Predictor:
    """A ``PeftModel`` with one adapter per task: each task's samples run with ``set_adapter(that task)``."""

    def run(task: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        peft_model.set_adapter(adapter_names[task])
        return peft_model(**inputs).logits

    return grouped_predictor(run)


def router_predictor(router: nn.Module, task_names: Sequence[str]) -> Predictor:
    """An ``AutoSwitchModel``: no task id; the routed top task's head gives the label."""
    index = {name: i for i, name in enumerate(task_names)}

    def predict(batch: Batch) -> Prediction:
        outputs, routing = router(**batch.inputs, return_routing=True)
        labels = outputs.logits.argmax(dim=-1)
        tasks = torch.tensor([index.get(task, -1) if task is not None else -1 for task in routing.top_task])
        return Prediction(labels, tasks, routed=True)

    return predict


# ----------------------------------------------------------------------------------------------------
# Routing cost
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def routing_cost(
    route: Callable[[dict[str, torch.Tensor]], Any], forward: Callable[[dict[str, torch.Tensor]], Any], stream
) -> dict[str, float]:
    """Seconds of ``route(inputs)`` (routing only) and of ``forward(inputs)`` (a plain forward) over every batch of
    ``stream``, alternating per batch so that machine load affects both alike (after one untimed call of each);
    ``ratio`` = routing seconds / forward seconds."""
    seconds = {"route": 0.0, "forward": 0.0}
    route(stream.batches[0].inputs)
    forward(stream.batches[0].inputs)
    for batch in stream.batches:
        for name, call in (("route", route), ("forward", forward)):
            start = time.perf_counter()
            call(batch.inputs)
            seconds[name] += time.perf_counter() - start
    ratio = seconds["route"] / seconds["forward"] if seconds["forward"] else float("nan")
    return {"route_seconds": round(seconds["route"], 4), "forward_seconds": round(seconds["forward"], 4),
            "ratio": round(ratio, 4)}  # fmt: skip
