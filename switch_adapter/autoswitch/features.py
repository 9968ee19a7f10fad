"""Routing features from the base model (no switch active), computed by a forward pass that stops early.

A feature is entry ``layer`` of the base model's ``output_hidden_states`` (0 = embedding output), pooled over the
sequence. For ``layer`` below the number of layers, a forward pre-hook on block ``layer`` captures its input and
stops the pass (:class:`_StopForward`), so routing costs about ``layer / num_layers`` of one forward; the last
entry needs the full pass. Models without a transformers layer stack (ConvNeXt, ResNet, plain modules) take
features from their main block list (:func:`find_block_stack`), a named module (a forward hook) or a user
callable; see :class:`FeatureSpec`. Query features are stored at fp16.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..errors import SwitchAdapterError
from .inputs import (
    MAIN_KEY,
    TENSOR_KEY,
    InputMismatchError,
    call_model,
    check_tensor_batch,
    check_token_ids,
    expected_channels,
    is_text_query,
    tensor_query_batches,
)

logger = logging.getLogger(__name__)

# Keys of a model-input dict that feature extraction passes on to the base model.
FEATURE_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class FeatureMismatchError(SwitchAdapterError, ValueError):
    """Query features were computed with another layer, pooling or base model than the router uses."""


class EmptyQuerySetError(SwitchAdapterError, ValueError):
    """A task's query set holds no example."""


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass once the feature layer is reached."""


SOURCES = ("hidden_states", "blocks", "module", "callable")
_COMPARED = (
    "layer", "pooling", "num_layers", "hidden_size", "base_fingerprint", "source", "module", "input_kind",
    "shared_prefix",
)  # fmt: skip


@dataclass(frozen=True)
class FeatureSpec:
    """What a feature vector is, and from which input kind.

    ``source``: ``"hidden_states"``: entry ``layer`` of a transformers model's ``output_hidden_states``;
    ``"blocks"``: ``layer`` 0 is the input of the first child of the block list ``module`` (e.g. ``"_blocks"``),
    ``layer`` i >= 1 the output of its child i - 1; ``"module"``: the output of the named ``module`` (a forward
    hook); ``"callable"``: what a user's ``feature_fn(model, batch)`` returns (``module`` holds its name, for
    information). Outputs are pooled to ``[B, hidden_size]``: token sequences ``[B, L, D]`` with ``pooling``,
    feature maps ``[B, C, H, W]`` (any tensor of 4 or more dims) by the mean over the dims after the channels.
    ``input_kind``: ``"text"``, ``"pixel_values"`` or ``"tensor"`` (see :mod:`.inputs`); ``input_shape``: the
    shape of one query example when all had one shape (inputs must have it), else None. ``shared_prefix``: token
    ids that every query prompt of a decoder LM starts with (a system prompt, the chat template's opening, BOS);
    mean pooling leaves them out of every prompt that starts with them (see :func:`shared_prefix_of`).
    """

    layer: int
    pooling: str
    num_layers: int
    hidden_size: int
    base_fingerprint: str
    source: str = "hidden_states"
    module: str | None = None
    input_kind: str = "text"
    input_shape: tuple[int, ...] | None = None
    shared_prefix: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["input_shape"] = list(self.input_shape) if self.input_shape is not None else None
        values["shared_prefix"] = list(self.shared_prefix)
        if not self.shared_prefix:  # what older readers wrote: they read it too
            del values["shared_prefix"]
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FeatureSpec:
        """From :meth:`to_dict`; specs written before images were routed lack the last four keys (text)."""
        extra = {key: values[key] for key in ("source", "module", "input_kind") if key in values}
        shape = values.get("input_shape")
        return cls(
            **{key: values[key] for key in ("layer", "pooling", "num_layers", "hidden_size", "base_fingerprint")},
            **extra,
            input_shape=tuple(int(v) for v in shape) if shape is not None else None,
            shared_prefix=tuple(int(v) for v in values.get("shared_prefix", ())),
        )

    @property
    def is_text_default(self) -> bool:
        """A spec an older switch-adapter can read: text hidden states."""
        return self.source == "hidden_states" and self.input_kind == "text"

    def check_matches(self, other: FeatureSpec, what: str) -> None:
        """Raise :class:`FeatureMismatchError` naming every difference between ``other`` (from ``what``) and self
        (a hidden size of -1 is not known yet and matches any; a callable's name is not compared)."""
        problems = [
            f"{name}: {what} has {getattr(other, name)!r}, the router uses {getattr(self, name)!r}"
            for name in _COMPARED
            if getattr(other, name) != getattr(self, name)
            and not (name == "hidden_size" and -1 in (self.hidden_size, other.hidden_size))
            and not (name == "module" and self.source == "callable" == other.source)
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


def shared_prefix_of(batches: Iterable[Mapping[str, torch.Tensor]]) -> tuple[int, ...]:
    """The longest run of token ids that every non-padding sequence of ``batches`` starts with, shortened so that
    every sequence keeps at least one token after it.

    In a decoder LM (causal attention, positions counted from the first non-padding token) these tokens have the
    same hidden states in every prompt: they say nothing about the input, and in a mean they only pull every
    feature towards one point, more so for short prompts and at deeper layers (where a first token's activations
    are large)."""
    prefix: list[int] | None = None
    shortest = None
    for batch in batches:
        mask = _mask_of(batch).bool()
        for ids, keep in zip(batch["input_ids"], mask):
            tokens = ids[keep].tolist()
            shortest = len(tokens) if shortest is None else min(shortest, len(tokens))
            if prefix is None:
                prefix = tokens
                continue
            same = 0
            for a, b in zip(prefix, tokens):
                if a != b:
                    break
                same += 1
            prefix = prefix[:same]
    if not prefix or not shortest:
        return ()
    return tuple(prefix[: shortest - 1])


def without_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: Sequence[int]) -> torch.Tensor:
    """``attention_mask`` with the positions of ``prefix`` zeroed in each row whose first non-padding tokens are
    ``prefix`` (other rows unchanged); left or right padding."""
    count = len(prefix)
    mask = attention_mask.to(input_ids.device)
    lengths = mask.long().sum(1)
    start = mask.long().argmax(1)  # first non-padding position
    offsets = start.unsqueeze(1) + torch.arange(count, device=input_ids.device)
    fits = lengths > count
    gathered = input_ids.gather(1, offsets.clamp(max=input_ids.shape[1] - 1))
    starts_with = fits & (gathered == torch.as_tensor(prefix, device=input_ids.device)).all(1)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    inside = (positions >= start.unsqueeze(1)) & (positions < (start + count).unsqueeze(1))
    return mask.masked_fill(inside & starts_with.unsqueeze(1), 0)


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


def pool_output(value: Any, pooling: str, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pool a captured output to fp32 ``[B, D]``: ``[B, D]`` as is, token sequences ``[B, L, D]`` with ``pooling``
    over non-padding positions, feature maps ``[B, C, *spatial]`` by the mean over the spatial dims. A tuple or a
    ModelOutput contributes its first tensor."""
    if not isinstance(value, torch.Tensor):
        value = _first_tensor(value)
    if value.dim() == 2:
        return value.float()
    if value.dim() == 3:
        mask = attention_mask
        if mask is None or mask.shape[:2] != value.shape[:2]:
            mask = torch.ones(value.shape[:2], dtype=torch.long, device=value.device)
        return pool(value, mask, pooling)
    if value.dim() >= 4:
        return value.float().flatten(2).mean(2)
    raise ValueError(f"Routing features must be [batch, ...] with at least 2 dims; got shape {list(value.shape)}.")


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"Expected the feature source to return a tensor, got {type(value).__name__}.")


def find_block_stack(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name, module)`` of the model's main block list, or None: the shallowest ``nn.ModuleList`` /
    ``nn.Sequential`` (the model itself included) with at least two children holding parameters; at equal depth
    the one with the most such children. E.g. EfficientNet's ``_blocks``, ConvNeXt's ``convnext.encoder.stages``."""
    best: tuple[int, int, str, nn.Module] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or ".modules_to_save" in f".{name}":
            continue
        children = [child for child in module.children() if any(True for _ in child.parameters())]
        if len(children) < 2:
            continue
        depth = name.count(".") + 1 if name else 0
        key = (depth, -len(children))
        if best is None or key < best[:2]:
            best = (*key, name, module)
    return (best[2], best[3]) if best is not None else None


def _call_kwargs(kind: str) -> tuple[str, ...]:
    return FEATURE_INPUT_KEYS if kind == "text" else (MAIN_KEY[kind],)


class FeatureExtractor:
    """Computes pooled features of the base model as ``spec`` says, stopping the forward pass at the feature
    layer or module where it can (a hook raises :class:`_StopForward`).

    ``model`` must compute the base model (T-Switch adapters disabled). ``feature_fn(model, batch)`` is needed
    for ``spec.source == "callable"``; ``batch`` is what the model is called with (a dict of tensors for
    transformers models, the input tensor for plain modules). Not thread-safe by itself: it registers hooks for
    the duration of a call; :class:`~switch_adapter.AutoSwitchModel` serialises calls with its lock.
    """

    def __init__(self, model: nn.Module, spec: FeatureSpec, feature_fn: Callable | None = None) -> None:
        self.model = model
        self.spec = spec
        self.feature_fn = feature_fn
        self.target: nn.Module | None = None
        self.channels = expected_channels(model) if spec.input_kind != "text" else None
        if spec.source == "hidden_states":
            self.layers: Sequence[nn.Module] = find_layer_stack(model)
        elif spec.source == "blocks":
            self.layers = list(model.get_submodule(spec.module or "").children())
        elif spec.source == "module":
            self.layers = []
            self.target = model.get_submodule(spec.module or "")
        else:
            self.layers = []
            if feature_fn is None:
                raise ValueError(
                    "This router's features come from a callable (feature_fn), which is not saved: pass "
                    "feature_fn=<the same function> again."
                )
        # Decoder LMs get padding-aware position ids, as in generate (left padding gives the same features).
        self.padding_aware_positions = (
            spec.input_kind == "text" and isinstance(model, PreTrainedModel) and model.can_generate()
        )

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Pooled fp32 features ``[B, hidden]`` at ``spec.layer``."""
        return self.extract(batch, [self.spec.layer])[self.spec.layer]

    @torch.no_grad()
    def extract(self, batch: Mapping[str, torch.Tensor], layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Pooled fp32 features at each of ``layers`` from one forward pass, stopped at the deepest one (for a
        feature module or callable, ``layers`` is ``[spec.layer]``)."""
        kind = self.spec.input_kind
        inputs = {key: batch[key] for key in _call_kwargs(kind) if batch.get(key) is not None}
        if MAIN_KEY[kind] not in inputs:
            need = "input_ids (and attention_mask for padded batches)" if kind == "text" else MAIN_KEY[kind]
            raise ValueError(f"Routing needs {need}.")
        device = _device_of(self.model)
        inputs = {key: value.to(device) for key, value in inputs.items()}
        mask = _mask_of(inputs) if kind == "text" else None
        extra: dict[str, Any] = {}
        if self.padding_aware_positions:
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
            extra["use_cache"] = False
        wanted = sorted(set(layers))
        pooling = self.spec.pooling
        if kind == "text" and pooling == "mean" and self.spec.shared_prefix:
            mask = without_prefix(inputs["input_ids"], mask, self.spec.shared_prefix)
        if self.spec.source == "callable":
            argument = inputs[TENSOR_KEY] if kind == "tensor" else dict(inputs)
            return {layer: pool_output(self.feature_fn(self.model, argument), pooling, mask) for layer in wanted}
        if self.spec.source == "module":
            value = self._run_until([(self.target, False, 0)], inputs, extra)[0]
            return {layer: pool_output(value, pooling, mask) for layer in wanted}
        if self.spec.source == "hidden_states" and wanted[-1] >= len(self.layers):
            hidden = call_model(self.model, inputs, kind, **extra, output_hidden_states=True).hidden_states
            return {layer: pool_output(hidden[layer], pooling, mask) for layer in wanted}
        if self.spec.source == "hidden_states":  # the input of block `layer` is hidden_states[layer]
            points = [(self.layers[layer], True, layer) for layer in wanted]
        else:  # blocks: layer 0 is the first block's input, layer i its block i - 1's output
            points = [(self.layers[0], True, 0) if layer == 0 else (self.layers[layer - 1], False, layer)
                      for layer in wanted]  # fmt: skip
        captured = self._run_until(points, inputs, extra)
        return {layer: pool_output(captured[layer], pooling, mask) for layer in wanted}

    def _run_until(
        self, points: list[tuple[nn.Module, bool, int]], inputs: dict[str, Any], extra: dict[str, Any]
    ) -> dict[int, Any]:
        """Capture at each ``(module, its input rather than output, key)``; the pass stops after the last point."""
        captured: dict[int, Any] = {}
        remaining = {key for _, _, key in points}

        def hook_for(key: int, before: bool):
            def capture(module: nn.Module, args: tuple, kwargs: dict, *output: Any) -> None:
                if key in captured:
                    return  # a module run twice: the first call counts
                if before:
                    captured[key] = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
                else:
                    captured[key] = output[0]
                remaining.discard(key)
                if not remaining:
                    raise _StopForward

            return capture

        handles = []
        try:
            for module, before, key in points:
                hook = hook_for(key, before)
                if before:
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(hook, with_kwargs=True))
            call_model(self.model, inputs, self.spec.input_kind, **extra)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if remaining:
            raise RuntimeError(
                f"The forward pass of {type(self.model).__name__} never reached the feature point(s) "
                f"{sorted(remaining)} ({self.spec.source} {self.spec.module or ''})."
            )
        return captured


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
    extractor: FeatureExtractor,
    examples: Any,
    tokenizer: Any,
    config: Any,
    task: str,
    progress: bool = True,
    image_processor: Any = None,
) -> QueryFeatures:
    """Features (fp16, on CPU) of a task's query examples."""
    layer = extractor.spec.layer
    features = layer_features(extractor, examples, tokenizer, config, task, [layer], progress, image_processor)
    return QueryFeatures(features[layer], extractor.spec)


def query_batches(
    extractor: FeatureExtractor, examples: Any, tokenizer: Any, config: Any, task: str, image_processor: Any = None
) -> tuple[int, Iterator[dict[str, torch.Tensor]]]:
    """``(count, batches)`` of a query set for the extractor's input kind; a set of the other modality (texts for
    an image model, image tensors for a text model) raises :class:`~.inputs.InputMismatchError`."""
    kind = extractor.spec.input_kind
    text = is_text_query(examples, config.text_column)
    if kind == "text":
        if not text and _looks_like_images(examples):
            raise InputMismatchError(
                f"The query set of task {task!r} holds images/float tensors, but the model takes text (input_ids): "
                "give texts or token ids, or use an image model."
            )
        return example_batches(examples, tokenizer, config, task)
    if text and not (isinstance(examples, torch.Tensor) and kind == "tensor"):
        raise InputMismatchError(
            f"The query set of task {task!r} holds text or token ids, but the model takes "
            f"{'images (pixel_values)' if kind == 'pixel_values' else 'tensors'}: give a tensor [N, ...], a list "
            "of tensors, a datasets.Dataset of images with image_processor=, or a DataLoader."
        )
    return tensor_query_batches(examples, kind, config, task, image_processor)


def _looks_like_images(examples: Any) -> bool:
    if isinstance(examples, torch.Tensor):
        return examples.is_floating_point() or examples.dim() >= 3
    if isinstance(examples, (list, tuple)) and examples:
        return isinstance(examples[0], torch.Tensor) or type(examples[0]).__module__.startswith("PIL.")
    return isinstance(examples, torch.utils.data.DataLoader)


def layer_features(
    extractor: FeatureExtractor,
    examples: Any,
    tokenizer: Any,
    config: Any,
    task: str,
    layers: Sequence[int],
    progress: bool = True,
    image_processor: Any = None,
    shapes: set | None = None,
) -> dict[int, torch.Tensor]:
    """``{layer: fp16 CPU features [examples, hidden]}`` of a task's query examples, one forward pass per batch.
    ``shapes`` (if given) collects the per-sample input shapes of tensor inputs."""
    count, batches = query_batches(extractor, examples, tokenizer, config, task, image_processor)
    kind = extractor.spec.input_kind
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    total = (count + config.feature_batch_size - 1) // config.feature_batch_size
    for batch in tqdm(batches, total=total, desc=f"Query features ({task})", disable=not progress or total < 4):
        what = f"The query examples of task {task!r}"
        if kind == "text":
            check_token_ids(extractor.model, batch.get("input_ids"), what)
        else:
            check_tensor_batch(batch, kind, extractor.spec.input_shape, extractor.channels, what)
            if shapes is not None:
                shapes.add(tuple(batch[MAIN_KEY[kind]].shape[1:]))
        for layer, values in extractor.extract(batch, layers).items():
            parts[layer].append(values.to(device="cpu", dtype=torch.float16))
    if not parts[layers[0]]:
        raise EmptyQuerySetError(f"The query set of task {task!r} is empty: give at least one example.")
    features = {layer: torch.cat(values) for layer, values in parts.items()}
    if not all(torch.isfinite(values).all() for values in features.values()):
        raise ValueError(f"The query features of task {task!r} hold NaN/Inf (overflow at fp16?).")
    return features
