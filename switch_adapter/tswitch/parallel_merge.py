"""Merge a model's switched layers on a few threads.

A switch's merge on the CPU is one numba call per parameter that releases the GIL (decode the switch, add its kept
entries), so layers merged on separate threads overlap. Layers whose parameters share memory with another layer's
(tied weights) are merged one after the other, in model order, on one thread. Offloaded layers (accelerate hooks)
and layers off the CPU are left to peft's sequential loop.
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .._workers import default_workers


def _can_run_in_parallel(layers: list[BaseTunerLayer]) -> bool:
    for layer in layers:
        for module in layer.modules():
            if hasattr(module, "_hf_hook"):
                return False  # offloaded or dispatched by accelerate: peft's onload_layer handles it
        if any(param.device.type != "cpu" for param in layer.get_base_layer().parameters(recurse=False)):
            return False
    return True


def _groups_sharing_memory(layers: list[BaseTunerLayer]) -> list[list[BaseTunerLayer]]:
    """``layers`` in groups, in model order: one group of every layer whose base parameters share storage with
    another layer's (tied weights, rare), and one group per other layer."""

    def addresses(layer: BaseTunerLayer) -> set[int]:
        return {param.untyped_storage().data_ptr() for param in layer.get_base_layer().parameters(recurse=False)}

    uses = collections.Counter(address for layer in layers for address in addresses(layer))
    groups: list[list[BaseTunerLayer]] = []
    shared: list[BaseTunerLayer] = []
    for layer in layers:
        if any(uses[address] > 1 for address in addresses(layer)):
            if not shared:
                groups.append(shared)
            shared.append(layer)
        else:
            groups.append([layer])
    return groups


def _merge_group(group: list[BaseTunerLayer], adapter_names: list[str] | None, safe_merge: bool) -> None:
    for layer in group:
        layer.merge(adapter_names=adapter_names, safe_merge=safe_merge)


def merge_in_parallel(model: nn.Module, adapter_names: list[str] | None, safe_merge: bool) -> bool:
    """Merge every tuner layer of ``model`` as peft's ``merge_adapter`` does, on up to 4 threads; False, having done
    nothing, where that does not apply (one CPU, one layer, an offloaded or non-CPU layer)."""
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    workers = min(default_workers(), len(layers))
    if workers < 2 or not _can_run_in_parallel(layers):
        return False
    groups = _groups_sharing_memory(layers)
    with ThreadPoolExecutor(workers, thread_name_prefix="switch-merge") as pool:
        futures = [pool.submit(_merge_group, group, adapter_names, safe_merge) for group in groups]
        for future in futures:
            future.result()
    return True
