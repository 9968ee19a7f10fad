"""Calibration examples -> a fixed list of model inputs (batches), for text and non-text models alike."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

Batch = tuple[tuple[Any, ...], dict[str, Any]]  # positional and keyword inputs of one forward call
_LABEL_KEYS = ("labels", "label", "label_ids")
_TOKENIZED_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_KIND_HINT = (
    "Pass a list of strings (with tokenizer=...), a datasets.Dataset (a text column or tokenized columns), a dict of "
    "tokenized tensors, a tensor of inputs, or a torch DataLoader."
)


def _is_chat(example: Any) -> bool:
    return isinstance(example, list) and bool(example) and isinstance(example[0], Mapping) and "role" in example[0]


def _texts(examples: Sequence[Any], tokenizer: Any) -> list[str]:
    texts = []
    for example in examples:
        if _is_chat(example):
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ValueError("The examples are chat conversations, but the tokenizer has no chat template.")
            texts.append(tokenizer.apply_chat_template(example, tokenize=False))
        elif isinstance(example, str):
            texts.append(example)
        else:
            raise TypeError(f"A text example must be a string or a chat (a list of messages), got {type(example)}.")
    return texts


def _tokenize(texts: list[str], tokenizer: Any, batch_size: int, max_length: int) -> list[Batch]:
    if tokenizer is None:
        raise ValueError(
            "The examples are text, so they need the base model's tokenizer: pass tokenizer=AutoTokenizer."
            "from_pretrained(base) (the command line loads it from the base model's folder)."
        )
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        batches.append(((), dict(encoded)))
    return batches


def _split_tensors(inputs: Mapping[str, torch.Tensor], batch_size: int) -> list[Batch]:
    tensors = {k: v for k, v in inputs.items() if k not in _LABEL_KEYS and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"The dict of examples holds no tensors. {_KIND_HINT}")
    sizes = {v.shape[0] for v in tensors.values()}
    if len(sizes) != 1:
        raise ValueError(f"The tensors of the examples have different first dimensions: {sorted(sizes)}.")
    (count,) = sizes
    return [((), {k: v[s : s + batch_size] for k, v in tensors.items()}) for s in range(0, count, batch_size)]


def _from_loader_batch(batch: Any) -> Batch:
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (torch.Tensor, Mapping)):
        return _from_loader_batch(batch[0])  # (inputs, labels): the labels are not needed
    raise TypeError(f"A DataLoader batch must be a dict, a tensor or an (inputs, labels) tuple, got {type(batch)}.")


def _dataset_batches(dataset: Any, tokenizer: Any, batch_size: int, max_length: int, text_column: str | None):
    columns = list(dataset.column_names)
    if text_column is None and "input_ids" in columns:
        kept = [c for c in columns if c in _TOKENIZED_KEYS]
        rows = [{c: row[c] for c in kept} for row in dataset]
        batches = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            if tokenizer is not None:
                encoded = tokenizer.pad(chunk, return_tensors="pt")
            else:
                encoded = {c: torch.tensor([r[c] for r in chunk]) for c in kept}  # equal lengths needed without one
            batches.append(((), dict(encoded)))
        return batches
    if text_column is None:
        strings = [c for c, f in dataset.features.items() if getattr(f, "dtype", None) == "string"]
        text_column = "text" if "text" in columns else (strings[0] if len(strings) == 1 else None)
        if text_column is None:
            raise ValueError(
                f"Cannot tell which column of the dataset holds the text (columns: {columns}); set text_column."
            )
    if text_column not in columns:
        raise ValueError(f"The dataset has no column {text_column!r} (columns: {columns}).")
    return _tokenize(_texts(dataset[text_column], tokenizer), tokenizer, batch_size, max_length)


def prepare_batches(
    examples: Any, tokenizer: Any = None, *, batch_size: int, max_length: int, text_column: str | None = None
) -> list[Batch]:
    """The examples as a list of ``(args, kwargs)`` forward inputs. Raises ``ValueError``/``TypeError`` naming what is
    wrong (empty, unknown kind, text without a tokenizer)."""
    if isinstance(examples, DataLoader):
        batches = [_from_loader_batch(batch) for batch in examples]
    elif hasattr(examples, "column_names") and hasattr(examples, "features"):  # a datasets.Dataset
        if len(examples) == 0:
            raise ValueError("The examples are empty: FlexSwitch needs about 100 examples of the task.")
        batches = _dataset_batches(examples, tokenizer, batch_size, max_length, text_column)
    elif isinstance(examples, Mapping):
        batches = _split_tensors(examples, batch_size)
    elif isinstance(examples, torch.Tensor):
        batches = [((examples[s : s + batch_size],), {}) for s in range(0, examples.shape[0], batch_size)]
    elif isinstance(examples, (list, tuple)):
        if not examples:
            raise ValueError("The examples are empty: FlexSwitch needs about 100 examples of the task.")
        batches = _tokenize(_texts(examples, tokenizer), tokenizer, batch_size, max_length)
    else:
        raise TypeError(f"Cannot use examples of type {type(examples).__name__}. {_KIND_HINT}")
    if not batches:
        raise ValueError("The examples are empty: FlexSwitch needs about 100 examples of the task.")
    return batches


def batch_size_of(batch: Batch) -> int:
    args, kwargs = batch
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def move_batch(batch: Batch, device: torch.device) -> Batch:
    args, kwargs = batch

    def move(value: Any) -> Any:
        return value.to(device) if isinstance(value, torch.Tensor) else value

    return tuple(move(v) for v in args), {k: move(v) for k, v in kwargs.items()}


def load_examples(source: str, *, column: str | None = None, split: str = "train", limit: int | None = None):
    """Examples for the command line: a text file (one example per line), a JSONL file (``column``, default ``text``),
    a CSV file (``column``, default ``text``), a folder saved with ``datasets``' ``save_to_disk``, or a Hub dataset id
    (``split``). Returns a list of strings or a ``datasets.Dataset``; at most ``limit`` examples."""
    if os.path.isfile(source):
        lower = source.lower()
        with open(source, encoding="utf-8", errors="replace", newline="") as handle:
            if lower.endswith((".jsonl", ".json")):
                rows = [json.loads(line) for line in handle if line.strip()]
                texts = [_column(row, column or "text", source) for row in rows]
            elif lower.endswith((".csv", ".tsv")):
                reader = csv.DictReader(handle, delimiter="\t" if lower.endswith(".tsv") else ",")
                texts = [_column(row, column or "text", source) for row in reader]
            else:
                texts = [line.rstrip("\n") for line in handle if line.strip()]
        texts = texts[:limit] if limit else texts
        if not texts:
            raise ValueError(f"{source} holds no examples.")
        return texts
    import datasets

    if os.path.isdir(source):
        dataset = datasets.load_from_disk(source)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{source} has no split {split!r} (splits: {list(dataset)}).")
            dataset = dataset[split]
    else:
        try:
            dataset = datasets.load_dataset(source, split=split)
        except Exception as error:
            raise FileNotFoundError(
                f"The examples {source!r} are not a file, not a folder saved with datasets, and could not be loaded "
                f"as a Hub dataset ({type(error).__name__}: {error})."
            ) from error
    if limit:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def _column(row: Mapping[str, Any], column: str, source: str) -> str:
    if column not in row:
        raise ValueError(f"{source}: a row has no column {column!r} (columns: {list(row)}); pass --text-column.")
    return str(row[column])
