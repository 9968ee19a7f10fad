"""Output heads found by structure: the layers a switch keeps in full precision instead of binarizing.

A head is where a fine-tune puts task-specific outputs (a classifier over its own labels). Binarizing one costs most
of a task's accuracy, and adding it to another head of the same shape mixes two label sets, so switches keep heads
in full precision as ``modules_to_save``. Names alone do not find them (``classifier``, ``score``, ``_fc``, ``fc``,
``head`` ...); the structure does:

- transformers' sequence-classification heads (the attributes peft knows: ``classifier``, ``score``);
- the last layer with parameters (in module registration order, which is forward order for the models of
  transformers, torchvision and timm) when it is a ``Linear`` or ``Conv`` that maps to fewer outputs than inputs.
  Language-model heads map a hidden state to a larger vocabulary and are therefore never heads here; they are
  switched like any other layer (or follow a tied input embedding).

Whether a candidate *is* a head for a given fine-tune is decided by :func:`changed_heads`: its values or shapes
changed. An unchanged candidate is left out of the switch and carries nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from peft.utils.constants import SEQ_CLS_HEAD_NAMES
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)

_HEAD_LAYER_TYPES = (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _unwrap(module: nn.Module) -> nn.Module:
    if isinstance(module, ModulesToSaveWrapper):
        return module.original_module
    if isinstance(module, BaseTunerLayer):
        return module.get_base_layer()
    return module


def _sizes(layer: nn.Module) -> tuple[int, int] | None:
    """``(inputs, outputs)`` of a linear or convolutional layer, None for other layers."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return layer.in_channels, layer.out_channels
    return None


def _leaf_modules_with_parameters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the modules that own parameters directly, in registration order; adapter internals and
    the copies inside ``modules_to_save`` wrappers are seen as the module they wrap."""
    found: list[tuple[str, nn.Module]] = []
    skip: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if skip and name.startswith(skip):
            continue
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            skip = tuple(f"{name}.{child}" for child, _ in module.named_children())
            found.append((name, _unwrap(module)))
            continue
        if any(True for _ in module.parameters(recurse=False)):
            found.append((name, module))
    return found


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    if not isinstance(model, PreTrainedModel):
        return None
    try:
        return model.get_output_embeddings()
    except NotImplementedError:  # models without token embeddings (vision) may raise
        return None


def output_head_candidates(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that look like its output head, by structure (see the module docstring).

    Works on models on the meta device (nothing is read). Returns ``[]`` when nothing looks like a head.
    """
    names: list[str] = []
    if isinstance(model, PreTrainedModel):
        for attribute in SEQ_CLS_HEAD_NAMES:
            if isinstance(getattr(model, attribute, None), nn.Module):
                name = next(n for n, m in model.named_modules() if m is getattr(model, attribute))
                names.append(name)
    leaves = _leaf_modules_with_parameters(model)
    if leaves:
        name, layer = leaves[-1]
        sizes = _sizes(layer)
        output_embedding = _output_embeddings(model)
        is_output_embedding = output_embedding is not None and _unwrap(output_embedding) is layer
        if sizes is not None and sizes[1] < sizes[0] and not is_output_embedding:
            if not any(name == n or name.startswith(n + ".") for n in names):
                names.append(name)
    return names


def changed_heads(
    candidates: list[str],
    parameter_names: Callable[[str], list[str]],
    differs: Callable[[str], bool],
) -> list[str]:
    """The candidates a fine-tune changed: ``differs(tensor name)`` is True for any of the parameter names
    ``parameter_names(module name)`` returns (a changed value or shape)."""
    return [name for name in candidates if any(differs(key) for key in parameter_names(name))]


def log_heads(heads: list[str], how: str) -> None:
    """Say which modules are kept in full precision as heads, and why."""
    if heads:
        logger.info(
            "Treating %s as output head%s (%s): kept in full precision in modules_to_save, not binarized. Pass "
            "modules_to_save explicitly to choose otherwise.",
            ", ".join(heads),
            "s" if len(heads) > 1 else "",
            how,
        )


def head_parameter_names(model: nn.Module, name: str) -> list[str]:
    """Full names of the parameters of module ``name`` (and its children) as a state dict lists them."""
    module = _unwrap(model.get_submodule(name))
    return [f"{name}.{param}" for param, _ in module.named_parameters()]


def tensors_differ(base: torch.Tensor | None, tuned: torch.Tensor | None) -> bool:
    """True when a fine-tune changed a tensor: another shape, or other values."""
    if base is None or tuned is None:
        return base is not tuned
    if base.shape != tuned.shape:
        return True
    if base.is_meta or tuned.is_meta:
        return False
    return not torch.equal(base.detach().to(tuned.dtype).cpu(), tuned.detach().cpu())
