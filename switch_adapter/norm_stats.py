"""Re-estimate the running statistics of norm layers (BatchNorm ...) with a switch active.

A switch changes the weights that feed each BatchNorm layer, so the statistics the fine-tune collected on its own
weights no longer describe the activations of the switched model (binarized convolutions at a low density shift
means and variances); conv nets can then score near chance although the switch itself is fine. Running unlabeled
task inputs through the switched model and averaging each norm layer's batch statistics fixes that: the same
update as torch's ``momentum=None`` cumulative average (``torch.optim.swa_utils.update_bn``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn
from tqdm.auto import tqdm

from .format import STATISTICS, required_format_version
from .tswitch.config import TSwitchConfig
from .tswitch.layer import SwitchedModule, has_running_statistics

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32


def recalibrate_norm_statistics(
    model: nn.Module,
    examples: Any,
    *,
    adapter_name: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> nn.Module:
    """Re-estimate the running statistics of the norm layers that ``adapter_name`` switches, with that adapter
    active, and store them as the adapter's statistics (so ``save_pretrained`` saves them).

    Every switched norm layer with running statistics normalises with batch statistics (train mode) and accumulates
    the cumulative average of the batch means and variances over all batches (torch's ``momentum=None``); all other
    modules run in eval mode, without gradients. The base model's own buffers, the modules' train/eval modes, the
    active adapters and ``requires_grad`` are left as they were.

    Args:
        model: A ``PeftModel`` (or a transformers model with adapters loaded) holding the T-Switch adapter.
        examples: Unlabeled task inputs: a tensor batch (split into batches of ``batch_size``), a dict of tensors
            (split likewise), or an iterable of batches / a ``DataLoader`` (each batch a tensor, a dict of tensors,
            or a tuple/list whose first element is the input, e.g. ``(images, labels)``). A few hundred examples
            are enough.
        adapter_name: The adapter to recalibrate; default the active adapter.
        batch_size: Batch size used to split a tensor or dict; batches of an iterable are used as they are. Use
            batches of at least ~16 examples: each batch's variance is averaged.
        progress: Show a progress bar over the batches.

    Returns:
        ``model``.

    Raises ``ValueError`` for no examples, an adapter that is not a T-Switch adapter (or does not exist), a merged
    or disabled adapter, or a model without switched norm layers with running statistics; nothing is changed then.
    """
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    configs = getattr(model, "peft_config", None) or {}
    adapter_name = _adapter_to_recalibrate(inner, configs, adapter_name)
    config = configs[adapter_name]
    layers = _norm_layers(inner, adapter_name)
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    batches = _batches(examples, batch_size)
    first = next(batches, None)
    if first is None:
        raise ValueError("recalibrate_norm_statistics got no examples: pass a batch, a dict or a non-empty iterable.")
    device = _device_of(inner)

    state = _ModelState(inner, adapter_name)
    accumulators = {}
    try:
        inner.eval()
        for _, layer in layers:
            base = layer.get_base_layer()
            accumulators[id(layer)] = {
                "running_mean": torch.zeros_like(base.running_mean),
                "running_var": torch.ones_like(base.running_var),
                "num_batches_tracked": torch.zeros((), dtype=torch.long, device=base.running_mean.device),
            }
            state.save_momentum(base)
            base.momentum = None  # cumulative average over batches
            layer._recalibration = accumulators[id(layer)]
            layer.train()
        count = 0
        with torch.no_grad():
            for batch in tqdm(
                itertools.chain([first], batches), desc="Recalibrating norm statistics", disable=not progress
            ):
                _run(model, _to_device(batch, device))
                count += 1
    finally:
        for _, layer in layers:
            layer._recalibration = None
        state.restore()
    for name, layer in layers:
        values = accumulators[id(layer)]
        config.norm_statistics[name] = layer.set_statistics(adapter_name, {key: values[key] for key in STATISTICS})
    if isinstance(config, TSwitchConfig) and config.format_version >= 2:
        config.format_version = max(
            config.format_version, required_format_version(config.unit_layout, config.norm_statistics)
        )
    logger.info(
        "Recalibrated the running statistics of %d norm layer(s) of adapter %r on %d batch(es).",
        len(layers),
        adapter_name,
        count,
    )
    return model


def _adapter_to_recalibrate(inner: nn.Module, configs: Mapping[str, Any], adapter_name: str | None) -> str:
    if adapter_name is None:
        active = next((m.active_adapters for m in inner.modules() if isinstance(m, SwitchedModule)), None)
        if not active:
            raise ValueError(
                "recalibrate_norm_statistics found no T-Switch adapter in the model: build one with "
                "switch_adapter.from_finetuned or load one with PeftModel.from_pretrained first."
            )
        if len(active) > 1:
            raise ValueError(f"Several adapters are active ({active}); pass adapter_name=... to choose one.")
        adapter_name = active[0]
    if adapter_name not in configs:
        raise ValueError(f"Adapter {adapter_name!r} does not exist. Available adapters: {sorted(configs)}.")
    if not isinstance(configs[adapter_name], TSwitchConfig):
        raise ValueError(
            f"Adapter {adapter_name!r} is a {configs[adapter_name].peft_type} adapter; recalibrate_norm_statistics "
            "works on T-Switch (and FlexSwitch) adapters only."
        )
    return adapter_name


def _norm_layers(inner: nn.Module, adapter_name: str) -> list[tuple[str, SwitchedModule]]:
    """The switched norm layers with running statistics that ``adapter_name`` targets; raises ``ValueError`` when
    there are none, or when the adapter is merged or disabled."""
    layers = [
        (name, module)
        for name, module in inner.named_modules()
        if isinstance(module, SwitchedModule)
        and module.is_targeted_by(adapter_name)
        and has_running_statistics(module.get_base_layer())
    ]
    if not layers:
        others = [
            name
            for name, module in inner.named_modules()
            if has_running_statistics(module) and not isinstance(module, BaseTunerLayer)
        ]
        if others:
            raise ValueError(
                f"Adapter {adapter_name!r} does not switch the model's norm layers with running statistics "
                f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}), so it cannot carry their statistics. "
                "Build it with target_modules='all' (the default) or switch_norms=True."
            )
        raise ValueError(
            f"{type(inner).__name__} has no norm layers with running statistics (BatchNorm, InstanceNorm with "
            "track_running_stats=True): there is nothing to recalibrate."
        )
    for name, layer in layers:
        if layer.merged:
            raise ValueError(f"{name} is merged; unmerge the adapters (unmerge_adapter()) before recalibrating.")
        if layer.disable_adapters:
            raise ValueError(
                f"{name}: adapters are disabled (inside disable_adapter()?); recalibrate with adapters enabled."
            )
    return layers


class _ModelState:
    """Train/eval modes, active adapters, ``requires_grad`` and BatchNorm momenta, to restore after a pass."""

    def __init__(self, inner: nn.Module, adapter_name: str) -> None:
        self.modes = [(module, module.training) for module in inner.modules()]
        self.grads = [(param, param.requires_grad) for param in inner.parameters()]
        self.active: list[tuple[nn.Module, Any]] = []
        self.momenta: list[tuple[nn.Module, Any]] = []
        for module in inner.modules():
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                self.active.append((module, module._active_adapter))
                module._active_adapter = [adapter_name]

    def save_momentum(self, layer: nn.Module) -> None:
        self.momenta.append((layer, layer.momentum))

    def restore(self) -> None:
        for layer, momentum in self.momenta:
            layer.momentum = momentum
        for module, active in self.active:
            module._active_adapter = active
        for module, training in self.modes:
            module.training = training
        for param, requires_grad in self.grads:
            param.requires_grad_(requires_grad)


def _batches(examples: Any, batch_size: int) -> Iterator[Any]:
    """Batches of ``examples``: a tensor or a dict of tensors is split along dim 0, an iterable is used as is."""
    if isinstance(examples, torch.Tensor):
        if examples.dim() == 0 or examples.shape[0] == 0:
            return iter(())
        return iter(examples.split(batch_size))
    if isinstance(examples, Mapping):
        tensors = {key: value for key, value in examples.items() if isinstance(value, torch.Tensor) and value.dim()}
        if not tensors:
            raise ValueError("examples is a dict without tensors; pass model inputs such as {'pixel_values': ...}.")
        size = next(iter(tensors.values())).shape[0]
        return (
            {key: value[start : start + batch_size] if key in tensors else value for key, value in examples.items()}
            for start in range(0, size, batch_size)
        )
    if isinstance(examples, Iterable) and not isinstance(examples, (str, bytes)):
        return iter(examples)
    raise TypeError(
        f"examples must be a tensor, a dict of tensors, or an iterable of batches (e.g. a DataLoader); got "
        f"{type(examples).__name__}."
    )


def _device_of(inner: nn.Module) -> torch.device:
    param = next(inner.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return _to_device(batch[0], device) if batch else batch
    return batch


def _run(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    else:
        model(batch)
