"""Merge a model's switched layers on a few threads.

A switch's merge on the CPU is one numba call per parameter that releases the GIL (decode the switch, add its kept
entries), so layers merged on separate threads overlap. Layers whose parameters share memory (tied weights) are
merged one after the other, in model order, on one thread. Offloaded layers (accelerate hooks) and layers off the
CPU are left to peft's sequential loop.
"""

from __future__ import annotations

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
    """``layers`` split into groups, in model order, so that layers whose base parameters share storage are in one."""
    owner: dict[int, int] = {}  # storage address -> group index
    groups: list[list[BaseTunerLayer]] = []
    for layer in layers:
        addresses = {param.untyped_storage().data_ptr() for param in layer.get_base_layer().parameters(recurse=False)}
        found = sorted({owner[address] for address in addresses if address in owner})
        if not found:
            index = len(groups)
            groups.append([])
        else:  # join every group this layer shares memory with into the first
            index = found[0]
            for other in found[1:]:
                groups[index].extend(groups[other])
                for address, group in owner.items():
                    if group == other:
                        owner[address] = index
                groups[other] = []
        groups[index].append(layer)
        for address in addresses:
            owner[address] = index
    return [group for group in groups if group]


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
