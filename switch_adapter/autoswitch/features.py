"""Routing features from the base model (no switch active), computed by a forward pass that stops early.

A feature is entry ``layer`` of the base model's ``output_hidden_states`` (0 = embedding output), pooled over the
sequence. For ``layer`` below the number of layers, a forward pre-hook on block ``layer`` captures its input and
stops the pass (:class:`_StopForward`), so routing costs about ``layer / num_layers`` of one forward; the last
entry needs the full pass. Query features are stored at fp16.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..errors import SwitchAdapterError

logger = logging.getLogger(__name__)

# Keys of a model-input dict that feature extraction passes on to the base model.
FEATURE_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class FeatureMismatchError(SwitchAdapterError, ValueError):
    """Query features were computed with another layer, pooling or base model than the router uses."""


class EmptyQuerySetError(SwitchAdapterError, ValueError):
    """A task's query set holds no example."""


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass once the feature layer is reached."""


@dataclass(frozen=True)
class FeatureSpec:
    """What a feature vector is: ``output_hidden_states[layer]`` of a base model, pooled with ``pooling``."""

    layer: int
    pooling: str
    num_layers: int
    hidden_size: int
    base_fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FeatureSpec:
        return cls(
            **{key: values[key] for key in ("layer", "pooling", "num_layers", "hidden_size", "base_fingerprint")}
        )

    def check_matches(self, other: FeatureSpec, what: str) -> None:
        """Raise :class:`FeatureMismatchError` naming every difference between ``other`` (from ``what``) and self."""
        problems = [
            f"{name}: {what} has {getattr(other, name)!r}, the router uses {getattr(self, name)!r}"
            for name in ("layer", "pooling", "num_layers", "hidden_size", "base_fingerprint")
            if getattr(other, name) != getattr(self, name)
        ]
        if problems:
            raise FeatureMismatchError(
                f"The query features of {what} were computed differently from this router's features:\n  "
                + "\n  ".join(problems)
                + "\nRecompute them with this router (pass the examples as text or token ids, or use "
                "router.compute_query_features), or configure the router with the same feature_layer and pooling."
            )


@dataclass
class QueryFeatures:
    """Features of one task's query examples: ``features`` (fp16, ``[examples, hidden]``) and how they were made."""

    features: torch.Tensor
    spec: FeatureSpec

    def __len__(self) -> int:
        return int(self.features.shape[0])


def num_hidden_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    value = getattr(config, "num_hidden_layers", None)
    if not isinstance(value, int):
        text_config = getattr(config, "text_config", None) if config is not None else None
        value = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(value, int):
        raise TypeError(
            f"{type(model).__name__} has no config.num_hidden_layers: Auto-Switch needs a transformers model with "
            "a stack of layers to take routing features from."
        )
    return value


def find_layer_stack(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of the model's transformer blocks (the first one with ``num_hidden_layers`` entries)."""
    count = num_hidden_layers(model)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise TypeError(
        f"Could not find the {count} transformer blocks of {type(model).__name__} (an nn.ModuleList of that length)."
    )


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of the base model's parameter names and shapes (PEFT wrappers and adapter copies ignored)."""
    items = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if ".modules_to_save." in name or "tswitch_" in name:
            continue
        plain = name.replace(".base_layer", "").replace(".original_module", "")
        plain = plain.removeprefix("base_model.model.")
        items.append(f"{plain}:{list(param.shape)}")
    return hashlib.sha256(json.dumps(sorted(set(items))).encode()).hexdigest()[:16]


def _mask_of(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones_like(batch["input_ids"])
    return mask


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool ``hidden`` ``[B, L, D]`` over non-padding positions to fp32 ``[B, D]``; left or right padding."""
    hidden = hidden.float()
    mask = attention_mask.to(hidden.device)
    if pooling == "mean":
        weights = mask.unsqueeze(-1).float()
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling == "first":
        index = mask.int().argmax(dim=1)  # first non-padding position
    else:
        index = mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)  # last non-padding position
    return hidden[rows, index]


class FeatureExtractor:
    """Computes pooled features of the base model at ``spec.layer``, stopping the forward pass there.

    ``model`` must compute the base model (T-Switch adapters disabled). Not thread-safe by itself: it registers a
    hook for the duration of a call; :class:`~switch_adapter.AutoSwitchModel` serialises calls with its lock.
    """

    def __init__(self, model: nn.Module, spec: FeatureSpec) -> None:
        self.model = model
        self.spec = spec
        self.layers = find_layer_stack(model)
        # Decoder LMs get padding-aware position ids, as in generate (left padding gives the same features).
        self.padding_aware_positions = isinstance(model, PreTrainedModel) and model.can_generate()

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Pooled fp32 features ``[B, hidden]`` at ``spec.layer``."""
        return self.extract(batch, [self.spec.layer])[self.spec.layer]

    @torch.no_grad()
    def extract(self, batch: Mapping[str, torch.Tensor], layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Pooled fp32 features at each of ``layers`` from one forward pass, stopped at the deepest one."""
        inputs = {key: batch[key] for key in FEATURE_INPUT_KEYS if batch.get(key) is not None}
        if "input_ids" not in inputs:
            raise ValueError("Routing needs input_ids (and attention_mask for padded batches).")
        device = _device_of(self.model)
        inputs = {key: value.to(device) for key, value in inputs.items()}
        mask = _mask_of(inputs)
        extra: dict[str, Any] = {}
        if self.padding_aware_positions:
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
            extra["use_cache"] = False
        wanted = sorted(set(layers))
        if wanted[-1] >= len(self.layers):
            hidden = self.model(**inputs, **extra, output_hidden_states=True).hidden_states
            return {layer: pool(hidden[layer], mask, self.spec.pooling) for layer in wanted}
        captured: dict[int, torch.Tensor] = {}
        deepest = wanted[-1]

        def capture_at(layer: int):
            def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
                captured[layer] = args[0] if args else kwargs["hidden_states"]
                if layer == deepest:
                    raise _StopForward

            return capture

        handles = [
            self.layers[layer].register_forward_pre_hook(capture_at(layer), with_kwargs=True) for layer in wanted
        ]
        try:
            self.model(**inputs, **extra)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if deepest not in captured:
            raise RuntimeError(f"The forward pass of {type(self.model).__name__} never reached layer {deepest}.")
        return {layer: pool(captured[layer], mask, self.spec.pooling) for layer in wanted}


def _device_of(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


# -- inputs ----------------------------------------------------------------------------------------------


def is_chat(item: Any) -> bool:
    """A chat: a non-empty list of ``{"role": ..., "content": ...}`` messages."""
    return (
        isinstance(item, (list, tuple))
        and bool(item)
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in item)
    )


def is_text_batch(items: Any) -> bool:
    """A string, a chat, or a non-empty list of strings and chats."""
    if isinstance(items, str) or is_chat(items):
        return True
    return (
        isinstance(items, (list, tuple))
        and bool(items)
        and all(isinstance(item, str) or is_chat(item) for item in items)
    )


def text_format(items: Any, chat_template: bool, text_column: str = "text") -> str | None:
    """``"templated"`` or ``"plain"`` for text the router tokenizes (strings, chats, a ``datasets.Dataset``'s text
    column), None for anything else (token ids, features: the router cannot tell)."""
    if hasattr(items, "column_names") and text_column in getattr(items, "column_names", ()) and len(items):
        items = [items[0][text_column]]
    if not is_text_batch(items):
        return None
    items = [items] if isinstance(items, str) or is_chat(items) else items
    return "templated" if chat_template or any(is_chat(item) for item in items) else "plain"


def format_texts(items: Any, tokenizer: Any, chat_template: bool) -> tuple[list[str], bool]:
    """``(texts, templated)``: strings and chats as the router tokenizes them. Chats always, and strings when
    ``chat_template`` is set (as one user turn), go through the tokenizer's chat template with the generation
    prompt; ``templated`` says whether any did (their special tokens are then part of the text)."""
    if isinstance(items, str) or is_chat(items):
        items = [items]
    if not any(is_chat(item) for item in items) and not chat_template:
        return list(items), False
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "Chat inputs (or AutoSwitchConfig(chat_template=True)) need a tokenizer with a chat template; this "
            "tokenizer has none. Pass plain strings, or set tokenizer.chat_template."
        )
    texts = []
    for item in items:
        chat = item if is_chat(item) else [{"role": "user", "content": item}]
        texts.append(tokenizer.apply_chat_template(list(chat), tokenize=False, add_generation_prompt=True))
    return texts, True


def tokenize(
    texts: Sequence[Any],
    tokenizer: Any,
    max_length: int | None,
    padding_side: str | None = None,
    chat_template: bool = False,
) -> dict:
    if tokenizer is None:
        raise ValueError("Text inputs need a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...).")
    if tokenizer.pad_token is None:
        raise ValueError(
            "The tokenizer has no pad token, so a batch of texts cannot be padded. Set one, e.g. "
            "tokenizer.pad_token = tokenizer.eos_token."
        )
    texts, templated = format_texts(texts, tokenizer, chat_template)
    kwargs: dict[str, Any] = {"padding": True, "truncation": True, "return_tensors": "pt"}
    if templated:
        kwargs["add_special_tokens"] = False  # the template holds them
    if max_length is not None:
        kwargs["max_length"] = max_length
    if padding_side is not None:
        kwargs["padding_side"] = padding_side
    encoded = tokenizer(list(texts), **kwargs)
    return {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}


def to_model_inputs(
    inputs: Any,
    tokenizer: Any = None,
    max_length: int | None = None,
    padding_side: str | None = None,
    chat_template: bool = False,
) -> dict[str, torch.Tensor]:
    """A dict of batch tensors from strings or chats (one or a list), a tensor of token ids or a dict /
    BatchEncoding."""
    if is_text_batch(inputs):
        return tokenize(inputs if isinstance(inputs, (list, tuple)) and not is_chat(inputs) else [inputs],
                        tokenizer, max_length, padding_side, chat_template)  # fmt: skip
    if isinstance(inputs, torch.Tensor):
        ids = inputs if inputs.dim() == 2 else inputs.unsqueeze(0)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if isinstance(inputs, Mapping) and "input_ids" in inputs:
        out = {key: value for key, value in inputs.items() if isinstance(value, torch.Tensor)}
        if out["input_ids"].dim() == 1:
            out = {key: value.unsqueeze(0) for key, value in out.items()}
        return out
    raise TypeError(
        f"Unsupported inputs of type {type(inputs).__name__}: pass a list of strings or chats (with a tokenizer), a "
        "tensor of token ids, or a dict / BatchEncoding with input_ids and attention_mask."
    )


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _select(count: int, limit: int, seed: int) -> list[int]:
    if count <= limit:
        return list(range(count))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(count, generator=generator)[:limit].tolist())


def example_batches(
    examples: Any, tokenizer: Any, config: Any, task: str
) -> tuple[int, Iterator[dict[str, torch.Tensor]]]:
    """``(count, batches)`` of model inputs for a query set: a ``datasets.Dataset`` (``config.text_column``, or an
    ``input_ids`` column), a list of strings, a ``[N, L]`` tensor of token ids, or a dict of such tensors. At most
    ``config.examples_per_task`` examples are used (a subset drawn with ``config.seed``)."""
    limit, size = config.examples_per_task, config.feature_batch_size

    def empty() -> EmptyQuerySetError:
        return EmptyQuerySetError(
            f"The query set of task {task!r} is empty: give at least one example (default use: "
            f"{config.examples_per_task} per task)."
        )

    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        Dataset = ()  # noqa: N806
    if isinstance(examples, Dataset):
        if len(examples) == 0:
            raise empty()
        chosen = examples.select(_select(len(examples), limit, config.seed))
        if config.text_column in chosen.column_names:
            examples = list(chosen[config.text_column])
        elif "input_ids" in chosen.column_names:
            rows = list(chosen["input_ids"])
            pad_id = getattr(tokenizer, "pad_token_id", None) or 0
            return len(rows), (_pad(rows[i : i + size], pad_id) for i in range(0, len(rows), size))
        else:
            raise ValueError(
                f"The query set of task {task!r} (a Dataset with columns {chosen.column_names}) has no "
                f"{config.text_column!r} column: set AutoSwitchConfig.text_column, or give an input_ids column."
            )
    if isinstance(examples, str) or is_chat(examples):
        examples = [examples]
    if isinstance(examples, (list, tuple)):
        if not examples:
            raise empty()
        if not is_text_batch(examples):
            raise TypeError(f"The query set of task {task!r} is a list, but not of strings or chats.")
        texts = [examples[i] for i in _select(len(examples), limit, config.seed)]
        format_texts(texts[:1], tokenizer, config.chat_template)  # fail now, not in the generator
        return len(texts), (
            tokenize(texts[i : i + size], tokenizer, config.max_length, chat_template=config.chat_template)
            for i in range(0, len(texts), size)
        )
    if isinstance(examples, torch.Tensor):
        examples = {"input_ids": examples}
    if isinstance(examples, Mapping) and "input_ids" in examples:
        ids = examples["input_ids"]
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.shape[0] == 0 or ids.numel() == 0:
            raise empty()
        index = torch.as_tensor(_select(ids.shape[0], limit, config.seed))
        tensors = {key: value[index] for key, value in examples.items() if isinstance(value, torch.Tensor)}
        tensors.setdefault("attention_mask", torch.ones_like(tensors["input_ids"]))
        count = int(index.numel())
        return count, ({key: value[i : i + size] for key, value in tensors.items()} for i in range(0, count, size))
    raise TypeError(
        f"Unsupported query set for task {task!r} ({type(examples).__name__}): pass a datasets.Dataset, a list of "
        "strings, a tensor of token ids, a dict with input_ids (and attention_mask), or QueryFeatures."
    )


def compute_query_features(
    extractor: FeatureExtractor, examples: Any, tokenizer: Any, config: Any, task: str, progress: bool = True
) -> QueryFeatures:
    """Features (fp16, on CPU) of a task's query examples."""
    layer = extractor.spec.layer
    return QueryFeatures(layer_features(extractor, examples, tokenizer, config, task, [layer], progress)[layer],
                         extractor.spec)  # fmt: skip


def layer_features(
    extractor: FeatureExtractor,
    examples: Any,
    tokenizer: Any,
    config: Any,
    task: str,
    layers: Sequence[int],
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """``{layer: fp16 CPU features [examples, hidden]}`` of a task's query examples, one forward pass per batch."""
    count, batches = example_batches(examples, tokenizer, config, task)
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    total = (count + config.feature_batch_size - 1) // config.feature_batch_size
    for batch in tqdm(batches, total=total, desc=f"Query features ({task})", disable=not progress or total < 4):
        for layer, values in extractor.extract(batch, layers).items():
            parts[layer].append(values.to(device="cpu", dtype=torch.float16))
    features = {layer: torch.cat(values) for layer, values in parts.items()}
    if not all(torch.isfinite(values).all() for values in features.values()):
        raise ValueError(f"The query features of task {task!r} hold NaN/Inf (overflow at fp16?).")
    return features
