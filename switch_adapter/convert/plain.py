"""Plain ``torch.nn.Module`` models (not transformers models): their architecture from a factory or from a loaded
instance, and their weights from a safetensors state dict (one file, or shards with an index).

A plain model has no ``config.json`` that could rebuild it, so its architecture comes from the caller:

- ``model_factory``: a zero-argument callable that returns the model (a function, or a class whose constructor
  needs no arguments), or its import path ``"package.module:name"``. It is called under ``torch.device("meta")``, so
  no weights are allocated; or
- a loaded instance (the base or the fine-tune in memory), copied onto the meta device without copying its weights.

Checkpoint keys must be the model's ``state_dict()`` keys exactly (as ``safetensors.torch.save_model`` or
``save_file(model.state_dict())`` write them); anything else is an error naming the keys.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Union

import torch
from torch import nn

from ..errors import AdapterNotFoundError

logger = logging.getLogger(__name__)

ModelFactory = Union[Callable[[], nn.Module], str]  # noqa: UP007 (a runtime alias, Python 3.10)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MODEL_CLASS_NAME = "model_class.json"  # the class note materialize writes next to a plain model's weights


def is_plain_module(model: object) -> bool:
    """True for an ``nn.Module`` that transformers cannot rebuild from a config (no ``config.model_type``)."""
    if not isinstance(model, nn.Module):
        return False
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) is None


def import_path(obj: object) -> str | None:
    """``"module:qualname"`` of a class or function that can be imported again, else None (defined in ``__main__``,
    inside a function, or a lambda)."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    return f"{module}:{qualname}"


def class_path(model_class: type) -> str:
    """``"module:qualname"`` of a model class, also for classes that cannot be imported again (for messages)."""
    return f"{model_class.__module__}:{model_class.__qualname__}"


def resolve_factory(factory: ModelFactory | type) -> Callable[[], nn.Module]:
    """The callable behind ``factory``: itself, or the object its import path ``"package.module:name"`` names.

    Raises ``ValueError`` for a malformed path, ``ImportError`` naming the module or attribute that is missing, and
    ``TypeError`` for something that is not callable.
    """
    if isinstance(factory, str):
        module_name, sep, attribute = factory.partition(":")
        if not sep or not module_name or not attribute:
            raise ValueError(
                f"The model factory {factory!r} is not an import path; write it as 'package.module:name' (a class "
                "or a function that returns the model without arguments)."
            )
        try:
            target: object = importlib.import_module(module_name)
        except ImportError as error:
            raise ImportError(f"Cannot import {module_name!r} for the model factory {factory!r}: {error}") from error
        for part in attribute.split("."):
            if not hasattr(target, part):
                raise ImportError(f"{module_name!r} has no attribute {attribute!r} (model factory {factory!r}).")
            target = getattr(target, part)
        factory = target  # type: ignore[assignment]
    if not callable(factory):
        raise TypeError(
            f"model_factory must be a class or a zero-argument function that returns the model (or its import path "
            f"'package.module:name'), got {type(factory).__name__}."
        )
    return factory  # type: ignore[return-value]


def factory_name(factory: ModelFactory | type) -> str:
    """How messages and model cards name a factory: its import path when it has one."""
    if isinstance(factory, str):
        return factory
    return import_path(factory) or getattr(factory, "__qualname__", None) or repr(factory)


def build_model(factory: ModelFactory | type, *, meta: bool) -> nn.Module:
    """Call ``factory()`` (on the meta device when ``meta``: no weights allocated) and check it returns a module.

    A factory that cannot run on the meta device (it loads weights itself, say) is called again normally and the
    result moved to the meta device.
    """
    function = resolve_factory(factory)
    name = factory_name(factory)
    if meta:
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = function()
        except Exception as error:  # retried below without the meta device
            logger.info("The model factory %s failed on the meta device (%s); building it on the CPU.", name, error)
            model = _call(function, name)
            _check_module(model, name)
            return meta_copy(model)
    else:
        model = _call(function, name)
    _check_module(model, name)
    return model


def _call(function: Callable[[], nn.Module], name: str) -> nn.Module:
    try:
        return function()
    except TypeError as error:
        raise TypeError(
            f"The model factory {name} could not be called without arguments ({error}); pass a function that "
            "builds the model, e.g. model_factory=lambda: MyNet(num_classes=10)."
        ) from error


def _check_module(model: object, name: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"The model factory {name} returned a {type(model).__name__}, not a torch.nn.Module; it must build and "
            "return the model."
        )


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device; its weights are never copied."""
    memo: dict[int, object] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in memo:
            continue
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = (
            nn.Parameter(empty, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
        )
    clone = copy.deepcopy(model, memo)
    clone.eval()
    return clone


# -- safetensors state dicts ---------------------------------------------------------------------------------------


def plain_checkpoint_files(source: str | os.PathLike) -> tuple[list[str], str] | None:
    """``(safetensors files, description)`` when ``source`` is a plain-model checkpoint: a ``.safetensors`` file, a
    ``*.safetensors.index.json`` file, or a folder with ``model.safetensors`` / ``model.safetensors.index.json`` and
    no ``config.json``. None when it is something else (a transformers folder, a Hub id)."""
    name = os.fspath(source)
    if os.path.isfile(name):
        if name.endswith(".safetensors"):
            return [name], f"safetensors file {name}"
        if name.endswith(".safetensors.index.json"):
            return index_files(name), f"safetensors index {name}"
        return None
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, CONFIG_NAME)):
        index = os.path.join(name, WEIGHTS_INDEX_NAME)
        if os.path.isfile(index):
            return index_files(index), f"checkpoint folder {name}"
        if os.path.isfile(os.path.join(name, WEIGHTS_NAME)):
            return [os.path.join(name, WEIGHTS_NAME)], f"checkpoint folder {name}"
    return None


def weights_files(source: str | os.PathLike) -> tuple[list[str], str]:
    """The safetensors files of a plain-model checkpoint given as a file, an index or a folder (with or without a
    ``config.json``); ``FileNotFoundError`` when there are none."""
    found = plain_checkpoint_files(source)
    if found is not None:
        return found
    name = os.fspath(source)
    if os.path.isdir(name):
        index, single = os.path.join(name, WEIGHTS_INDEX_NAME), os.path.join(name, WEIGHTS_NAME)
        if os.path.isfile(index):
            return index_files(index), f"checkpoint folder {name}"
        if os.path.isfile(single):
            return [single], f"checkpoint folder {name}"
        raise AdapterNotFoundError(f"The folder {name} holds no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}.")
    if os.path.exists(name):
        raise ValueError(
            f"{name} is not a safetensors file; plain models are read from safetensors state dicts only (never "
            "pickles): save one with safetensors.torch.save_model(model, 'model.safetensors')."
        )
    raise AdapterNotFoundError(f"The checkpoint {name!r} does not exist.")


def index_files(index_path: str) -> list[str]:
    """The shard files an index names, as paths next to the index."""
    folder = os.path.dirname(index_path)
    return [os.path.join(folder, name) for name in shard_names(index_path)]


def shard_names(index_path: str) -> list[str]:
    """The shard file names a safetensors index lists (the values of its ``weight_map``), sorted; a ``ValueError``
    names what is wrong with an index that is not JSON, has no ``weight_map`` mapping tensor names to file names, or
    names a file outside its folder."""
    try:
        with open(index_path, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{index_path} is not a valid safetensors index ({error}).") from None
    names = list(weight_map.values()) if isinstance(weight_map, dict) else []
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(
            f"{index_path} is not a valid safetensors index: its weight_map must map tensor names to shard file "
            f"names, got {str(weight_map)[:80]}. Re-save or re-download the checkpoint."
        )
    outside = [n for n in names if os.path.isabs(n) or ".." in n.replace("\\", "/").split("/")]
    if outside:
        raise ValueError(f"{index_path} names shard files outside its folder ({outside[0]!r}); an index lists files "
                         "next to it.")  # fmt: skip
    return sorted(set(names))


def tied_groups(model: nn.Module) -> list[set[str]]:
    """Names that share one tensor (tied weights), as groups of two or more."""
    groups: dict[int, set[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(tensor), set()).add(name)
    return [names for names in groups.values() if len(names) > 1]


def check_state_keys(
    model: nn.Module, keys: Iterable[str], description: str, *, model_name: str, allow_missing: bool = False
) -> None:
    """Raise ``ValueError`` naming the keys when a checkpoint's keys are not ``model``'s state dict keys (a missing
    tied alias is fine when another name of the same tensor is there; ``safetensors.torch.save_model`` keeps one)."""
    keys = set(keys)
    expected = set(model.state_dict().keys())
    unexpected = sorted(keys - expected)
    missing = set() if allow_missing else expected - keys
    for group in tied_groups(model):
        if group & keys:
            missing -= group
    if not unexpected and not missing:
        return
    lines = []
    if unexpected:
        lines.append(f"not in the model ({len(unexpected)}): {_some(unexpected)}")
    if missing:
        lines.append(f"missing from the checkpoint ({len(missing)}): {_some(sorted(missing))}")
    raise ValueError(
        f"The {description.removeprefix('the ')} does not fit {model_name}:\n  "
        + "\n  ".join(lines)
        + "\nIts keys must be the model's state_dict() keys: both models need the same architecture (with "
        "model_factory, the one the checkpoint was saved from). Nothing was written."
    )


def _some(names: list[str], count: int = 8) -> str:
    return ", ".join(names[:count]) + (f", ... and {len(names) - count} more" if len(names) > count else "")


def load_plain_model(source: str | os.PathLike, factory: ModelFactory | type | None, *, role: str) -> nn.Module:
    """A plain model with weights: ``factory()`` on the CPU with the checkpoint's tensors loaded (keys checked)."""
    if factory is None:
        raise ValueError(
            f"The {role} {os.fspath(source)!r} is a plain safetensors checkpoint, which does not say what model it "
            "holds; pass model_factory=... (the model class, a function that builds it, or 'package.module:name'; "
            "--model-factory on the command line)."
        )
    from safetensors import safe_open

    files, description = weights_files(source)
    model = build_model(factory, meta=False)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if not os.path.isfile(path):
            raise AdapterNotFoundError(f"The {role} {description}: the weights file {path} is missing.")
        with safe_open(path, framework="pt") as handle:
            state.update({key: handle.get_tensor(key) for key in handle.keys()})
    check_state_keys(model, state, f"{role} {description}", model_name=type(model).__name__)
    try:
        model.load_state_dict(state, strict=False)  # keys checked above; tied aliases may be absent
    except RuntimeError as error:  # shapes
        raise ValueError(
            f"The {role} {description} does not fit {type(model).__name__} ({error}); check that model_factory builds "
            "the architecture the checkpoint was saved from."
        ) from None
    model.eval()
    return model
