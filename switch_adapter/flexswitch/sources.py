"""What to learn from: the fine-tuned model (a model, a folder or Hub id of a full fine-tune, or a LoRA adapter)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from peft import PeftConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from .._model_sources import resolve_folder
from ..convert.lora import stored_lora_factors
from ..convert.skeleton import class_for_task, class_from_architectures, task_type_of

logger = logging.getLogger(__name__)
_ALLOW = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


@dataclass
class FineTune:
    """The teacher and where the task vectors come from: ``state`` (a full fine-tune's tensors, compared with the base)
    or ``deltas`` (a LoRA's ``scaling * B @ A`` per weight) and ``factors`` (the same as ``(left, right)`` in the
    weight's stored layout, where the update is one matrix product), plus the fine-tuned heads
    (``modules_to_save``)."""

    teacher: nn.Module
    state: Mapping[str, torch.Tensor] | None = None
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    task_type: str | None = None
    modules_to_save: list[str] | None = None
    is_lora: bool = False


def _folder(name: str | os.PathLike, what: str, revision: str | None, token) -> str:
    return resolve_folder(name, what=what, allow_patterns=_ALLOW, revision=revision, token=token)


def is_adapter_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "adapter_config.json"))


def load_base(
    base: nn.Module | str | os.PathLike, finetuned_folder: str | None, *, revision=None, token=None
) -> nn.Module:
    """The base model: as given, or loaded from a folder / Hub id with the fine-tune's class (and its label count)."""
    if isinstance(base, nn.Module):
        return base
    folder = _folder(base, "base model", revision, token)
    kwargs, cls = {}, None
    if finetuned_folder is not None and is_adapter_folder(finetuned_folder):
        task_type = PeftConfig.from_pretrained(finetuned_folder).task_type
        cls = class_for_task(AutoConfig.from_pretrained(folder), getattr(task_type, "value", task_type))
    elif finetuned_folder is not None:
        tuned_config = AutoConfig.from_pretrained(finetuned_folder)
        cls = class_from_architectures(tuned_config)
        if cls is not None and task_type_of(cls) in ("SEQ_CLS", "TOKEN_CLS"):
            kwargs["num_labels"] = tuned_config.num_labels
    cls = cls or class_from_architectures(AutoConfig.from_pretrained(folder)) or AutoModel
    return cls.from_pretrained(folder, dtype=torch.float32, **kwargs)


@contextlib.contextmanager
def open_finetune(
    base: nn.Module, finetuned: nn.Module | Mapping | str | os.PathLike, *, revision=None, token=None
) -> Iterator[FineTune]:
    """The fine-tune as a :class:`FineTune`. A LoRA adapter is put on ``base`` for the block and taken off again after
    it (also on errors), so ``base`` ends as it was."""
    if isinstance(finetuned, PeftModel):
        raise TypeError(
            "Pass the fine-tuned model itself or the LoRA adapter's folder / Hub id, not a PeftModel "
            "(or merge_and_unload() it first)."
        )
    if isinstance(base, PeftModel):
        raise TypeError("Pass the base model itself, not a PeftModel: FlexSwitch adds its adapter to a plain model.")
    if isinstance(finetuned, nn.Module):
        cls = type(finetuned)
        yield FineTune(finetuned, state=finetuned.state_dict(), task_type=task_type_of(cls) if _is_hf(cls) else None)
        return
    folder = _folder(finetuned, "fine-tuned model or LoRA adapter", revision, token)
    if not is_adapter_folder(folder):
        config = AutoConfig.from_pretrained(folder)
        cls = class_from_architectures(config) or type(base)
        model = cls.from_pretrained(folder, dtype=torch.float32)
        yield FineTune(model, state=model.state_dict(), task_type=task_type_of(cls))
        return
    lora_config = PeftConfig.from_pretrained(folder)
    if getattr(lora_config.peft_type, "value", lora_config.peft_type) != "LORA":
        raise ValueError(
            f"{finetuned!r} is a {lora_config.peft_type} adapter; FlexSwitch learns from a full fine-tune or a LoRA."
        )
    teacher = PeftModel.from_pretrained(base, folder)
    try:
        adapter = teacher.active_adapter
        deltas, factors, heads = {}, {}, {}
        for name, module in teacher.get_base_model().named_modules():
            embedding = adapter in getattr(module, "lora_embedding_A", {})
            if isinstance(module, LoraLayer) and (adapter in getattr(module, "lora_A", {}) or embedding):
                deltas[f"{name}.weight"] = module.get_delta_weight(adapter).detach().float()
                if embedding:
                    a, b = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
                else:
                    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                pair = stored_lora_factors(module.get_base_layer(), a.detach().float(), b.detach().float(),
                                           float(module.scaling[adapter]))  # fmt: skip
                if pair is not None:
                    factors[f"{name}.weight"] = pair
            elif isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
                for key, value in module.modules_to_save[adapter].state_dict().items():
                    heads[f"{name}.{key}"] = value.detach().clone()
        task_type = getattr(lora_config.task_type, "value", lora_config.task_type)
        modules = lora_config.modules_to_save
        yield FineTune(teacher, deltas=deltas, factors=factors, heads=heads, task_type=task_type,
                       modules_to_save=modules, is_lora=True)  # fmt: skip
    finally:
        teacher.unload()
        for attribute in ("peft_config", "_hf_peft_config_loaded"):
            if attribute in base.__dict__:
                delattr(base, attribute)


def _is_hf(cls: type) -> bool:
    return issubclass(cls, PreTrainedModel)
