"""Load (or build without weights) the base model a switch belongs to, with the class its task type implies."""

from __future__ import annotations

import copy
import logging
import os

import torch
from torch import nn

from .._model_sources import TASK_AUTO_CLASSES, looks_like_local_path
from ..convert.plain import ModelFactory, build_model, is_plain_module, load_plain_model, plain_checkpoint_files

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


def task_type_name(task_type) -> str | None:
    if task_type is None:
        return None
    return str(task_type.value if hasattr(task_type, "value") else task_type)


def _model_class(config, task_type: str | None):
    import transformers

    auto_name = TASK_AUTO_CLASSES.get(task_type or "")
    if auto_name is not None:
        return getattr(transformers, auto_name)
    for architecture in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, architecture, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _check_exists(base: str) -> None:
    if not os.path.exists(base) and looks_like_local_path(base):
        raise FileNotFoundError(f"The base model folder {base!r} does not exist (and it is not a Hub repository id).")


def is_plain_base(base: str | os.PathLike | nn.Module, model_factory: ModelFactory | type | None) -> bool:
    """True when ``base`` is (or is read as) a plain ``torch.nn.Module``: a loaded one, a plain safetensors
    checkpoint, or anything given with a ``model_factory``."""
    if isinstance(base, nn.Module):
        return is_plain_module(base)
    return model_factory is not None or plain_checkpoint_files(base) is not None


def load_base_model(
    base: str | os.PathLike | nn.Module,
    task_type,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    model_factory: ModelFactory | type | None = None,
) -> nn.Module:
    """The base model with weights: a copy of ``base`` if it is a loaded model (the caller's model is never
    modified); ``model_factory()`` with the weights of a plain safetensors checkpoint (a file, an index or a folder);
    else ``from_pretrained`` of the class that the task type names (or the checkpoint's architecture)."""
    if isinstance(base, nn.Module):
        return copy.deepcopy(base)
    if is_plain_base(base, model_factory):
        return load_plain_model(base, model_factory, role="base model")
    from transformers import AutoConfig

    name = os.fspath(base)
    _check_exists(name)
    config = AutoConfig.from_pretrained(name, revision=revision, token=token)
    cls = _model_class(config, task_type_name(task_type))
    logger.info("Loading the base model %s as %s", name, cls.__name__)
    return cls.from_pretrained(name, revision=revision, token=token)


def build_base_skeleton(
    base: str | os.PathLike | nn.Module,
    task_type,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    model_factory: ModelFactory | type | None = None,
) -> nn.Module:
    """The base model's modules without weights (on the meta device), for their types and names; a loaded model
    is returned as is (it is only read). A plain model is built by ``model_factory`` (needed for a plain safetensors
    checkpoint)."""
    if isinstance(base, nn.Module):
        return base
    if is_plain_base(base, model_factory):
        if model_factory is None:
            load_plain_model(base, None, role="base model")  # raises: says to pass model_factory
        return build_model(model_factory, meta=True)
    from transformers import AutoConfig

    name = os.fspath(base)
    _check_exists(name)
    config = AutoConfig.from_pretrained(name, revision=revision, token=token)
    cls = _model_class(config, task_type_name(task_type))
    with torch.device("meta"):
        if hasattr(cls, "from_config"):
            return cls.from_config(config)
        return cls(config)


def copy_tokenizer_files(base: str | os.PathLike | nn.Module, target: str, *, revision=None, token=None) -> list[str]:
    """Copy the base's tokenizer / preprocessor files (if any) into ``target``; returns the names copied."""
    if isinstance(base, nn.Module) or plain_checkpoint_files(base) is not None:
        return []
    import shutil

    name = os.fspath(base)
    if os.path.isdir(name):
        folder = name
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(name, revision=revision, token=token, allow_patterns=list(TOKENIZER_FILES))
        except Exception as error:  # the tokenizer is optional: the model folder is complete without it
            logger.warning("Could not fetch tokenizer files of %s (%s); the output has none.", name, error)
            return []
    copied = []
    for file_name in TOKENIZER_FILES:
        source = os.path.join(folder, file_name)
        if os.path.isfile(source) and not os.path.exists(os.path.join(target, file_name)):
            shutil.copyfile(source, os.path.join(target, file_name))
            copied.append(file_name)
    return copied
