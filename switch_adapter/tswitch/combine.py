"""Weighted combination of T-Switch adapters: the work behind ``TSwitchModel.add_weighted_adapter``, with peft's
argument conventions (checks, head averaging, and peft's merge functions on the switches' dense deltas)."""

from __future__ import annotations

from dataclasses import replace

import torch
from peft.utils import ModulesToSaveWrapper, merge_utils
from torch import nn

from .config import TSwitchConfig
from .layer import TSwitchLayer

COMBINATION_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# Config fields that decide which tensors an adapter switches: combined adapters must agree on them.
STRUCTURE_FIELDS = (
    "target_modules",
    "exclude_modules",
    "switch_bias",
    "switch_norms",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "task_type",
)


def _comparable(value):
    return sorted(value) if isinstance(value, (set, list, tuple)) else value


def check_arguments(
    peft_config: dict, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str, density
) -> TSwitchConfig:
    """Validate ``add_weighted_adapter``'s arguments; returns the new adapter's config (not yet registered)."""
    if isinstance(adapters, str) or not adapters:
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}.")
    for adapter in adapters:
        if adapter not in peft_config:
            raise ValueError(f"Adapter {adapter} does not exist. Available adapters: {sorted(peft_config)}.")
        if not isinstance(peft_config[adapter], TSwitchConfig):
            raise ValueError(
                f"Adapter {adapter} is a {peft_config[adapter].peft_type} adapter; add_weighted_adapter of "
                "T-Switch combines T-Switch adapters only."
            )
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters lists an adapter twice: {adapters}.")
    if isinstance(weights, (str, bytes)) or len(weights) != len(adapters):
        raise ValueError(
            f"Got {len(adapters)} adapters but {len(weights) if not isinstance(weights, str) else 'no'} weights: "
            "pass one weight per adapter."
        )
    if adapter_name in peft_config:
        raise ValueError(
            f"Adapter {adapter_name} already exists; choose another adapter_name or delete_adapter it first."
        )
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"Invalid combination_type {combination_type!r} for T-Switch adapters; choose one of "
            f"{list(COMBINATION_TYPES)} (LoRA's SVD and 'cat' types do not apply to switches)."
        )
    configs = [peft_config[adapter] for adapter in adapters]
    for field_name in STRUCTURE_FIELDS:
        values = [_comparable(getattr(c, field_name)) for c in configs]
        if any(value != values[0] for value in values[1:]):
            listing = ", ".join(f"{a}: {getattr(c, field_name)!r}" for a, c in zip(adapters, configs))
            raise ValueError(
                f"The adapters differ in {field_name} ({listing}); add_weighted_adapter combines adapters with the "
                "same targets. Rebuild them with the same settings."
            )
    if density is None:
        densities = {(c.density, tuple(sorted(c.density_pattern.items()))) for c in configs}
        if len(densities) > 1:
            listing = ", ".join(f"{a}: {c.density}" for a, c in zip(adapters, configs))
            raise ValueError(f"The adapters have different densities ({listing}); pass density=... explicitly.")
        return replace(
            configs[0], unit_layout={}, modules_to_save_shapes={}, norm_statistics={}, flexswitch=None,
            inference_mode=True,
        )  # fmt: skip
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}.")
    return replace(
        configs[0], density=float(density), density_pattern={}, unit_layout={}, modules_to_save_shapes={},
        norm_statistics={}, flexswitch=None, inference_mode=True,
    )  # fmt: skip


def weighted_heads(
    model: nn.Module, adapters: list[str], weights: list[float]
) -> list[tuple[str, ModulesToSaveWrapper, dict[str, torch.Tensor]]]:
    """``(module name, wrapper, averaged state)`` for every ``modules_to_save`` module that one of ``adapters``
    has its own copy of; raises ``ValueError`` if the heads cannot be averaged (see ``add_weighted_adapter``)."""
    out = []
    for module_name, wrapper in model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper) or not any(a in wrapper.modules_to_save for a in adapters):
            continue
        states = [
            (wrapper.modules_to_save[a] if a in wrapper.modules_to_save else wrapper.original_module).state_dict()
            for a in adapters
        ]
        shapes = [{name: list(value.shape) for name, value in state.items()} for state in states]
        if any(s != shapes[0] for s in shapes[1:]):
            listing = "; ".join(
                f"{a}: {', '.join(f'{n} {s}' for n, s in shape.items())}" for a, shape in zip(adapters, shapes)
            )
            raise ValueError(
                f"The adapters' heads {module_name!r} (modules_to_save) have different shapes ({listing}), so "
                "they cannot be averaged. Combine adapters whose heads have the same shapes (the same number of "
                "labels)."
            )
        total = sum(weights)
        if abs(total) < 1e-12:
            raise ValueError(
                f"The weights sum to 0, so the weighted average of the heads {module_name!r} (modules_to_save) "
                "is undefined. Use weights with a non-zero sum for adapters with their own heads."
            )
        averaged = {
            name: sum(w * state[name].detach().float() for w, state in zip(weights, states))
            .div(total)
            .to(states[0][name].dtype)
            for name in states[0]
        }
        out.append((module_name, wrapper, averaged))
    return out


def combined_delta(
    layer: TSwitchLayer,
    param_name: str,
    adapters: list[str],
    weights: list[float],
    combination_type: str,
    density: float,
    majority_sign_method: str,
) -> torch.Tensor | None:
    """The combined dense delta of ``param_name`` (float32), or None if no adapter switches it."""
    deltas = [layer.get_delta(adapter, param_name) for adapter in adapters]
    if all(delta is None for delta in deltas):
        return None
    like = next(delta for delta in deltas if delta is not None)
    tensors = [(delta if delta is not None else torch.zeros_like(like)).float() for delta in deltas]
    weight = torch.tensor(weights, dtype=torch.float32, device=like.device)
    with torch.no_grad():
        if combination_type == "linear":
            return merge_utils.task_arithmetic(tensors, weight)
        if combination_type == "magnitude_prune":
            return merge_utils.magnitude_prune(tensors, weight, density)
        if combination_type == "dare_linear":
            return merge_utils.dare_linear(tensors, weight, density)
        if combination_type == "ties":
            return merge_utils.ties(tensors, weight, density, majority_sign_method)
        return merge_utils.dare_ties(tensors, weight, density, majority_sign_method)


def combined_statistics(layer: TSwitchLayer, adapters: list[str], weights: list[float]) -> dict | None:
    """Running statistics of the combination: ``base + sum_i weights[i] * (stat_i - base)`` over the adapters that
    carry statistics for ``layer`` (whatever the combination type: statistics are not pruned), None if none does."""
    if not any(layer.has_statistics(adapter) for adapter in adapters):
        return None
    return layer.composed_statistics(dict(zip(adapters, weights)))
