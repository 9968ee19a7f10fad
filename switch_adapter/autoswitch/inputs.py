"""What a base model is called with, and how inputs and query sets of tensors (images) become model batches.

Three input kinds:

- ``"text"``: a transformers model whose main input is ``input_ids`` (strings, chats or token ids; see
  :mod:`.features`).
- ``"pixel_values"``: a transformers model whose main input is ``pixel_values`` (ViT, ConvNeXt, ResNet, ...),
  called as ``model(pixel_values=x)``.
- ``"tensor"``: any other ``nn.Module``, called with one positional tensor, ``model(x)``.

A batch is a dict of batch-major tensors: ``{"input_ids", "attention_mask", ...}``, ``{"pixel_values"}`` or
``{TENSOR_KEY: x}``; :func:`call_model` runs the model on it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import SwitchAdapterError

INPUT_KINDS = ("text", "pixel_values", "tensor")
TENSOR_KEY = "inputs"  # the batch key of a plain module's positional input
MAIN_KEY = {"text": "input_ids", "pixel_values": "pixel_values", "tensor": TENSOR_KEY}


class InputMismatchError(SwitchAdapterError, ValueError):
    """Inputs or a query set do not fit the model: another modality, shape or channel count."""


def input_kind_of(model: nn.Module) -> str:
    """The input kind of a base model (see the module docstring)."""
    if isinstance(model, PreTrainedModel):
        main = getattr(model, "main_input_name", "input_ids")
        if main == "input_ids":
            return "text"
        if main == "pixel_values":
            return "pixel_values"
        raise TypeError(
            f"{type(model).__name__} takes {main!r} as its main input; Auto-Switch routes transformers models "
            "taking input_ids (text) or pixel_values (images), and plain nn.Modules called with a tensor."
        )
    return "tensor"


def expected_channels(model: nn.Module) -> int | None:
    """Input channels the model expects: ``config.num_channels``, else the first convolution's ``in_channels``."""
    channels = getattr(getattr(model, "config", None), "num_channels", None)
    if isinstance(channels, int):
        return channels
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return int(module.in_channels)
    return None


def call_model(model: nn.Module, batch: Mapping[str, Any], kind: str, **extra: Any) -> Any:
    """Run ``model`` on ``batch`` as its input kind is called."""
    if kind == "tensor":
        rest = {key: value for key, value in batch.items() if key != TENSOR_KEY}
        return model(batch[TENSOR_KEY], **rest, **extra)
    return model(**batch, **extra)


def check_token_ids(model: nn.Module, ids: Any, what: str = "The input_ids") -> None:
    """Raise :class:`InputMismatchError` for token ids that are not integers or fall outside the model's vocabulary
    (text tokenized for another model), instead of an embedding's ``index out of range``."""
    if not isinstance(ids, torch.Tensor) or ids.numel() == 0:
        return
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InputMismatchError(
            f"{what} are {ids.dtype}: token ids must be an integer tensor (tokenize with return_tensors='pt')."
        )
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if hasattr(embeddings, "get_base_layer"):  # switched or LoRA-wrapped
        embeddings = embeddings.get_base_layer()
    vocabulary = getattr(embeddings, "num_embeddings", None)
    low, high = (int(value) for value in torch.aminmax(ids))
    if low < 0 or (isinstance(vocabulary, int) and high >= vocabulary):
        raise InputMismatchError(
            f"{what} hold token ids from {low} to {high}, but the model's vocabulary has {vocabulary} entries "
            "(ids 0 to vocabulary - 1): the text was tokenized for another model. Use this model's tokenizer."
        )


def batch_size(batch: Mapping[str, Any], kind: str) -> int:
    return int(batch[MAIN_KEY[kind]].shape[0])


def _is_image(item: Any) -> bool:
    return type(item).__module__.startswith("PIL.")


def _stack(items: Sequence[Any], what: str) -> torch.Tensor:
    if not all(isinstance(item, torch.Tensor) for item in items):
        kinds = sorted({type(item).__name__ for item in items})
        raise InputMismatchError(f"{what} mixes tensors with {kinds}: give tensors of one shape.")
    shapes = {tuple(item.shape) for item in items}
    if len(shapes) > 1:
        raise InputMismatchError(
            f"{what} holds tensors of different shapes {sorted(shapes)}: resize them to one shape (e.g. with the "
            "image processor) before routing."
        )
    return torch.stack(list(items))


def tensor_batch(
    inputs: Any, kwargs: dict[str, Any], kind: str, image_processor: Any = None, sample_dims: int | None = None
) -> dict[str, Any]:
    """The batch dict for a ``"pixel_values"`` or ``"tensor"`` model from what a user passes: a tensor (batched or
    one sample), a list of tensors, PIL images (with ``image_processor``), or a dict / ``BatchFeature`` with the
    main key; ``kwargs`` with ``pixel_values=`` (or other model keywords, passed on). ``sample_dims``: dimensions
    of one sample (3 for images), to tell one sample from a batch."""
    key = MAIN_KEY[kind]
    kwargs = dict(kwargs)
    for text_key in ("input_ids", "attention_mask", "token_type_ids"):
        if kwargs.pop(text_key, None) is not None:
            raise InputMismatchError(
                f"This router's model takes {'images (pixel_values)' if kind == 'pixel_values' else 'tensors'}, "
                f"not {text_key}."
            )
    if inputs is None:
        inputs = kwargs.pop(key, None)
        if inputs is None:
            raise ValueError(f"No inputs: pass a tensor positionally or as {key}=.")
    elif key in kwargs:
        raise ValueError(f"Pass the inputs once: positionally or as {key}=, not both.")
    if isinstance(inputs, Mapping):
        if key not in inputs:
            raise InputMismatchError(f"The input dict has keys {sorted(inputs)} but no {key!r}.")
        kwargs = {**{k: v for k, v in inputs.items() if k != key}, **kwargs}
        inputs = inputs[key]
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
        raise InputMismatchError(
            "Text was given, but this router's model takes images/tensors: pass a tensor "
            f"{'[batch, channels, height, width]' if kind == 'pixel_values' else '[batch, ...]'}."
        )
    if _is_image(inputs) or (isinstance(inputs, (list, tuple)) and inputs and _is_image(inputs[0])):
        inputs = _process_images(inputs if isinstance(inputs, (list, tuple)) else [inputs], image_processor)
    elif isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError("No inputs: the list is empty.")
        inputs = _stack(inputs, "The input list")
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(
            f"Unsupported inputs of type {type(inputs).__name__}: pass a tensor, a list of tensors, PIL images (with "
            f"an image_processor), or a dict with {key!r}."
        )
    if sample_dims is not None and inputs.dim() == sample_dims:
        inputs = inputs.unsqueeze(0)
    if kind == "pixel_values" and not inputs.is_floating_point():
        raise InputMismatchError(
            f"This router's model takes images: pixel_values must be floating point, got {inputs.dtype} (token "
            "ids or raw pixels?). Normalise images as the query images were, e.g. with the image processor."
        )
    return {key: inputs, **{k: v for k, v in kwargs.items() if v is not None}}


def check_tensor_batch(
    batch: Mapping[str, Any],
    kind: str,
    sample_shape: Sequence[int] | None,
    channels: int | None,
    what: str = "The inputs",
) -> None:
    """Raise :class:`InputMismatchError` when the batch's samples do not have ``sample_shape`` (the query
    examples' shape) or, for image-like tensors, ``channels`` channels."""
    x = batch[MAIN_KEY[kind]]
    if kind == "pixel_values" and x.dim() != 4:
        raise InputMismatchError(
            f"{what} have shape {list(x.shape)}; images must be [batch, channels, height, width] (or one image "
            "[channels, height, width])."
        )
    if channels is not None and x.dim() >= 3 and x.shape[1] != channels and (x.is_floating_point()):
        raise InputMismatchError(
            f"{what} have {x.shape[1]} channels (shape {list(x.shape)}), the model expects {channels}. Convert them "
            f"(e.g. grey to RGB: x.repeat(1, 3, 1, 1)) as the query images were."
        )
    if sample_shape is not None and tuple(x.shape[1:]) != tuple(sample_shape):
        raise InputMismatchError(
            f"{what} have samples of shape {list(x.shape[1:])}, but the query examples had {list(sample_shape)}: "
            "resize them as the query examples were (e.g. with the same image processor), or routing compares "
            "features of different resolutions."
        )


def _process_images(images: Sequence[Any], image_processor: Any) -> torch.Tensor:
    if image_processor is None:
        raise ValueError(
            "PIL images need an image processor: pass image_processor=AutoImageProcessor.from_pretrained(...) (or "
            "any callable returning pixel_values) to the router, or give tensors."
        )
    processed = image_processor(list(images), return_tensors="pt")
    return processed["pixel_values"] if isinstance(processed, Mapping) else processed


# -- query sets ------------------------------------------------------------------------------------------------


def _select(count: int, limit: int, seed: int) -> list[int]:
    if count <= limit:
        return list(range(count))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(count, generator=generator)[:limit].tolist())


def _from_loader_item(item: Any, key: str, image_column: str) -> torch.Tensor:
    """The input tensor of one DataLoader batch: a tensor, ``(tensor, label, ...)`` or a dict."""
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (list, tuple)) and item and isinstance(item[0], torch.Tensor):
        return item[0]
    if isinstance(item, Mapping):
        for name in (key, image_column, "pixel_values", TENSOR_KEY):
            if isinstance(item.get(name), torch.Tensor):
                return item[name]
        raise InputMismatchError(
            f"A DataLoader batch is a dict with keys {sorted(item)} but no tensor under {key!r} or "
            f"{image_column!r} (AutoSwitchConfig.image_column)."
        )
    raise InputMismatchError(
        f"A DataLoader batch is a {type(item).__name__}; yield tensors, (tensor, label) pairs or dicts of tensors."
    )


def is_text_query(examples: Any, text_column: str) -> bool:
    """A query set of texts or token ids (strings, chats, an input_ids tensor/dict, a Dataset with text)."""
    from .features import is_text_batch

    if is_text_batch(examples):
        return True
    if isinstance(examples, Mapping) and "input_ids" in examples:
        return True
    if isinstance(examples, torch.Tensor) and not examples.is_floating_point() and examples.dim() == 2:
        return True
    columns = getattr(examples, "column_names", None)
    return columns is not None and (text_column in columns or "input_ids" in columns)


def tensor_query_batches(
    examples: Any, kind: str, config: Any, task: str, image_processor: Any = None
) -> tuple[int, Iterator[dict[str, torch.Tensor]]]:
    """``(count, batches)`` of a query set for a ``"pixel_values"`` / ``"tensor"`` model: a tensor ``[N, ...]``, a
    list of tensors, a dict with the main key, a ``datasets.Dataset`` (``pixel_values`` column, or
    ``config.image_column`` of images with ``image_processor``), or a ``torch.utils.data.DataLoader`` yielding
    tensors, ``(tensor, label)`` pairs or dicts. At most ``config.examples_per_task`` examples: a seeded subset
    of a tensor, list or Dataset; the first ones of a DataLoader."""
    from .features import EmptyQuerySetError

    key = MAIN_KEY[kind]
    limit, size = config.examples_per_task, config.feature_batch_size

    def empty() -> EmptyQuerySetError:
        return EmptyQuerySetError(f"The query set of task {task!r} is empty: give at least one example.")

    if isinstance(examples, torch.utils.data.DataLoader):
        return _loader_batches(examples, key, config, task)
    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        Dataset = ()  # noqa: N806
    if isinstance(examples, Dataset):
        if len(examples) == 0:
            raise empty()
        chosen = examples.select(_select(len(examples), limit, config.seed))
        columns = chosen.column_names
        if "pixel_values" in columns or (kind == "tensor" and TENSOR_KEY in columns):
            column = "pixel_values" if "pixel_values" in columns else TENSOR_KEY
            values = chosen.with_format("torch")[column]
            examples = values if isinstance(values, torch.Tensor) else _stack(list(values), f"Task {task!r}")
        elif config.image_column in columns:
            images = chosen[config.image_column]
            if image_processor is None:
                raise ValueError(
                    f"The query set of task {task!r} is a Dataset of images ({config.image_column!r}): pass "
                    "image_processor=... to the router so they become pixel_values, or give a pixel_values column."
                )
            batches = (
                {key: _process_images(images[i : i + size], image_processor)} for i in range(0, len(images), size)
            )
            return len(images), batches
        else:
            raise InputMismatchError(
                f"The query set of task {task!r} (a Dataset with columns {columns}) has no {config.image_column!r} "
                "or pixel_values column: set AutoSwitchConfig.image_column."
            )
    if isinstance(examples, Mapping):
        if key not in examples:
            raise InputMismatchError(f"The query set of task {task!r} is a dict without {key!r}.")
        examples = examples[key]
    if isinstance(examples, (list, tuple)):
        if not examples:
            raise empty()
        if _is_image(examples[0]):
            images = [examples[i] for i in _select(len(examples), limit, config.seed)]
            return len(images), (
                {key: _process_images(images[i : i + size], image_processor)} for i in range(0, len(images), size)
            )
        examples = _stack([examples[i] for i in _select(len(examples), limit, config.seed)], f"Task {task!r}")
    if not isinstance(examples, torch.Tensor):
        raise TypeError(
            f"Unsupported query set for task {task!r} ({type(examples).__name__}): pass a tensor [N, ...], a list of "
            "tensors, a datasets.Dataset (with an image column and image_processor=), or a DataLoader."
        )
    if examples.shape[0] == 0:
        raise empty()
    index = torch.as_tensor(_select(examples.shape[0], limit, config.seed))
    chosen_tensor = examples[index]
    count = int(index.numel())
    return count, ({key: chosen_tensor[i : i + size]} for i in range(0, count, size))


def _loader_batches(
    loader: torch.utils.data.DataLoader, key: str, config: Any, task: str
) -> tuple[int, Iterator[dict[str, torch.Tensor]]]:
    from .features import EmptyQuerySetError

    limit = config.examples_per_task
    try:
        count = min(limit, len(loader.dataset))  # type: ignore[arg-type]
    except TypeError:
        count = limit

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        taken = 0
        for item in loader:
            x = _from_loader_item(item, key, config.image_column)
            x = x[: limit - taken]
            taken += int(x.shape[0])
            yield {key: x}
            if taken >= limit:
                return
        if taken == 0:
            raise EmptyQuerySetError(f"The query set of task {task!r} (a DataLoader) yielded no example.")

    return count, batches()
