"""T-Switch tuner layer: wraps one base layer and adds ``scale * mask * multiplier`` to its weight (and bias).

The multiplier of a kept entry is its sign for a 1-bit unit (T-Switch) and the odd integer ``2u - (2**b - 1)`` of its
level ``u`` for a ``b``-bit unit (FlexSwitch); see :mod:`switch_adapter.codec.sass`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..codec import sass
from ..codec.binarize import BinarySwitch
from ..errors import CodecError
from ..format import attribute, kept_values, layout_entry, unit_checksum

logger = logging.getLogger(__name__)

SWITCHABLE_PARAMETERS = ("weight", "bias")
_NORM_CLASS_SUFFIXES = ("LayerNorm", "RMSNorm", "GroupNorm")


def is_norm_layer(module: nn.Module) -> bool:
    """True for LayerNorm / RMSNorm / GroupNorm modules, including model-specific classes such as LlamaRMSNorm."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    name = type(module).__name__
    return name.endswith(_NORM_CLASS_SUFFIXES) and isinstance(getattr(module, "weight", None), nn.Parameter)


def is_supported_layer(module: nn.Module) -> bool:
    """Layers a switch can wrap: Linear, Embedding, transformers' Conv1D, Conv2d and norm layers."""
    return isinstance(module, (nn.Linear, nn.Embedding, Conv1D, nn.Conv2d)) or is_norm_layer(module)


def switched_parameter_names(module: nn.Module, switch_bias: bool) -> tuple[str, ...]:
    """Names of the parameters of ``module`` that a switch modifies."""
    names = []
    for name in SWITCHABLE_PARAMETERS:
        if name == "bias" and not switch_bias:
            continue
        if isinstance(getattr(module, name, None), nn.Parameter):
            names.append(name)
    return tuple(names)


class TSwitchLayer(BaseTunerLayer):
    """State of the switches of one base layer, per adapter and per switched parameter.

    Persistent (saved) per adapter: ``tswitch_<param>_code`` (the encoded switch, uint8), ``tswitch_<param>_scale``
    (float, trainable) and, from format version 2, ``tswitch_<param>_checksum`` (refreshed whenever a state dict is
    taken, so a saved file always carries the checksum of what it holds; see :mod:`switch_adapter.format`). The
    decoded kept positions and multipliers are cached in memory, keyed by the code buffer's identity, so the cache
    follows loads and device moves.
    """

    adapter_layer_names = ("tswitch_weight_scale", "tswitch_bias_scale")
    other_param_names = (
        "tswitch_weight_code",
        "tswitch_bias_code",
        "tswitch_weight_checksum",
        "tswitch_bias_checksum",
    )
    tswitch_module_name: str = ""  # set by the tuner, for error messages

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.tswitch_weight_scale = nn.ParameterDict({})
        self.tswitch_bias_scale = nn.ParameterDict({})
        self.tswitch_weight_code = BufferDict({}, persistent=True)
        self.tswitch_bias_code = BufferDict({}, persistent=True)
        self.tswitch_weight_checksum = BufferDict({}, persistent=True)
        self.tswitch_bias_checksum = BufferDict({}, persistent=True)
        self._sparse_cache: dict[tuple[str, str], tuple[tuple, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

    def _codes(self, param_name: str) -> BufferDict:
        return getattr(self, attribute(param_name, "code"))

    def _scales(self, param_name: str) -> nn.ParameterDict:
        return getattr(self, attribute(param_name, "scale"))

    def _checksums(self, param_name: str) -> BufferDict:
        return getattr(self, attribute(param_name, "checksum"))

    def refresh_checksums(self) -> None:
        """Recompute the checksum of every switch of this layer from its code and scale."""
        for param_name in SWITCHABLE_PARAMETERS:
            checksums = self._checksums(param_name)
            for adapter_name in list(checksums.keys()):
                code, scale = self._codes(param_name)[adapter_name], self._scales(param_name)[adapter_name]
                if not (code.is_meta or scale.is_meta):  # a skeleton on the meta device holds no data yet
                    checksums[adapter_name].copy_(unit_checksum(code, scale))

    def update_layer(
        self,
        adapter_name: str,
        param_layout: dict[str, dict],
        param_names: tuple[str, ...],
        inference_mode: bool,
        with_checksums: bool = True,
    ) -> None:
        """Allocate the adapter's buffers: sized from ``param_layout`` (a loaded switch) or empty (a no-op switch).
        ``with_checksums`` is False for adapters of format version 1, whose files have none."""
        base = self.get_base_layer()
        for param_name in param_names:
            entry = param_layout.get(param_name)
            code_bytes = int(entry["code_bytes"]) if entry else 0
            scales = int(entry["scales"]) if entry else 1
            if entry and list(entry["shape"]) != list(getattr(base, param_name).shape):
                raise ValueError(
                    f"The switch for {param_name} has shape {list(entry['shape'])} but the base layer's "
                    f"{param_name} has shape {list(getattr(base, param_name).shape)}."
                )
            self._codes(param_name)[adapter_name] = torch.zeros(code_bytes, dtype=torch.uint8)
            self._scales(param_name)[adapter_name] = nn.Parameter(torch.zeros(scales))
            if with_checksums:
                self._checksums(param_name)[adapter_name] = torch.zeros(4, dtype=torch.uint8)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_switch(self, adapter_name: str, param_name: str, switch: BinarySwitch) -> dict[str, Any]:
        """Store ``switch`` (any value bits) for ``param_name`` of this layer; returns its layout entry for the adapter
        config. Whoever collects the entries into ``config.unit_layout`` sets ``config.format_version`` to
        :func:`switch_adapter.format.required_format_version` of the layout."""
        codes, scales = self._codes(param_name), self._scales(param_name)
        device = getattr(self.get_base_layer(), param_name).device
        levels = None if switch.levels is None else switch.levels.cpu()
        blob = sass.encode(switch.mask.cpu(), switch.positive.cpu(), value_bits=switch.value_bits, levels=levels)
        codes[adapter_name] = blob.to(device)
        old_scale = scales[adapter_name]
        scales[adapter_name] = nn.Parameter(
            switch.scale.to(device=device, dtype=old_scale.dtype), requires_grad=old_scale.requires_grad
        )
        self._sparse_cache.pop((adapter_name, param_name), None)
        return layout_entry(switch.shape, blob, int(switch.scale.numel()))

    def switch_slots(self, adapter_name: str) -> list[str]:
        """Parameters of this layer that ``adapter_name`` may switch (its switch can still be empty)."""
        return [name for name in SWITCHABLE_PARAMETERS if adapter_name in self._codes(name)]

    def _sparse(self, adapter_name: str, param_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions, multipliers)`` of the kept entries (int64 flat positions, int16 odd integers: +-1 for a 1-bit
        unit), decoded once per code buffer.

        Work and memory are proportional to the kept entries, not to the size of the weight.
        """
        code = self._codes(param_name)[adapter_name]
        key = (code.data_ptr(), code._version, code.device, code.numel())
        cached = self._sparse_cache.get((adapter_name, param_name))
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            _, positions, multipliers, _ = sass.decode_values(code, device=code.device)
        except CodecError as error:
            where = f"{self.tswitch_module_name}.{param_name}" if self.tswitch_module_name else param_name
            raise CodecError(f"T-Switch adapter {adapter_name!r}, {where}: {error}") from None
        self._sparse_cache[(adapter_name, param_name)] = (key, (positions, multipliers))
        return positions, multipliers

    def _kept_values(self, adapter_name: str, param_name: str, like: torch.Tensor):
        """Positions of the kept entries and their values ``multiplier * scale`` in the dtype/device of ``like``."""
        positions, multipliers = self._sparse(adapter_name, param_name)
        positions, multipliers = positions.to(like.device), multipliers.to(like.device)
        scale = self._scales(param_name)[adapter_name]
        return positions, kept_values(positions, multipliers, scale, like.numel(), like.dtype)

    def _has_switch(self, adapter_name: str, param_name: str) -> bool:
        codes = self._codes(param_name)
        return adapter_name in codes and codes[adapter_name].numel() > 0

    def get_delta(self, adapter_name: str, param_name: str) -> torch.Tensor | None:
        """The dense ``scale * mask * multiplier`` for one parameter, in its dtype and on its device; None if empty."""
        if not self._has_switch(adapter_name, param_name):
            return None
        param = getattr(self.get_base_layer(), param_name)
        positions, values = self._kept_values(adapter_name, param_name, param)
        delta = torch.zeros(param.numel(), dtype=param.dtype, device=param.device)
        return delta.index_put_((positions,), values).view(param.shape)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor | None:
        """PEFT's name for the weight's delta."""
        return self.get_delta(adapter_name, "weight")

    def _add_deltas(
        self, param_name: str, value: torch.Tensor, weights: Mapping[str, float], inplace: bool = False
    ) -> torch.Tensor | None:
        """``value + sum_a weights[a] * delta_a`` (a new tensor unless ``inplace``); None if no adapter with a
        non-zero weight switches ``param_name``.

        Only the kept entries are touched: the cost is a copy of ``value`` plus work proportional to them.
        """
        result = value if inplace else None
        for adapter_name, weight in weights.items():
            if weight == 0 or not self._has_switch(adapter_name, param_name):
                continue
            if result is None:
                result = value.clone()
            positions, values = self._kept_values(adapter_name, param_name, value)
            result.view(-1).index_add_(0, positions, values, alpha=float(weight))
        return result

    def add_weighted_deltas(
        self, param_name: str, value: torch.Tensor, weights: Mapping[str, float]
    ) -> torch.Tensor | None:
        """``value + sum_a weights[a] * delta_a`` as a new tensor without autograd history; None if no adapter with
        a non-zero weight switches ``param_name``. Work beyond the copy of ``value`` is proportional to the kept
        entries."""
        with torch.no_grad():
            return self._add_deltas(param_name, value.detach(), weights)


def _refresh_checksums_hook(module: TSwitchLayer, prefix: str, keep_vars: bool) -> None:
    module.refresh_checksums()


class SwitchedModule(nn.Module, TSwitchLayer):
    """A base layer (Linear, Embedding, Conv1D, Conv2d or a norm layer) with T-Switch adapters.

    The forward pass runs the base layer with ``weight + sum of active deltas`` (and the same for the bias), so
    an unmerged forward computes exactly what the merged weights compute.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        param_layout: dict[str, dict],
        param_names: tuple[str, ...],
        inference_mode: bool = False,
        with_checksums: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        TSwitchLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, param_layout, param_names, inference_mode, with_checksums)
        self.register_state_dict_pre_hook(_refresh_checksums_hook)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas of ``adapter_names`` (default: the active adapters) to the base layer's parameters."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for adapter_name in adapter_names:
            merged = {}
            for param_name in SWITCHABLE_PARAMETERS:
                param = getattr(base, param_name, None)
                if param is None:
                    continue
                if not self._has_switch(adapter_name, param_name):
                    continue
                if safe_merge:
                    value = self._add_deltas(param_name, param.data, {adapter_name: 1.0})
                    if not torch.isfinite(value).all():
                        raise ValueError(
                            f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken"
                        )
                merged[param_name] = param
            for param_name, param in merged.items():
                self._add_deltas(param_name, param.data, {adapter_name: 1.0}, inplace=True)
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        """Subtract the merged deltas again, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            for param_name in SWITCHABLE_PARAMETERS:
                param = getattr(base, param_name, None)
                if param is not None:
                    self._add_deltas(param_name, param.data, {adapter_name: -1.0}, inplace=True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        if self.merged:
            return self.base_layer(*args, **kwargs)
        params = self.switched_parameters(self.active_adapters)
        if not params:
            return self.base_layer(*args, **kwargs)
        return torch.func.functional_call(self.get_base_layer(), params, args, kwargs, strict=False)

    def switched_parameters(self, adapter_names: list[str]) -> dict[str, torch.Tensor]:
        """``{name: base parameter + deltas of adapter_names}`` for the parameters those adapters switch."""
        base = self.get_base_layer()
        params = {}
        for param_name in SWITCHABLE_PARAMETERS:
            param = getattr(base, param_name, None)
            if param is not None:
                value = self._add_deltas(param_name, param, dict.fromkeys(adapter_names, 1.0))
                if value is not None:
                    params[param_name] = value
        return params

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def __repr__(self) -> str:
        return "tswitch." + super().__repr__()


class TiedSwitchedModule(nn.Module, BaseTunerLayer):
    """An output layer whose weight is tied to a switched input embedding.

    It owns no switch: in an unmerged forward it adds the embedding's active deltas to the shared weight, and it
    never merges by itself, because merging the embedding already changes the shared weight.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, source: SwitchedModule) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._source = (source,)  # a tuple keeps the embedding from being registered (and saved) twice
        self._active_adapter = source.active_adapters
        self._disable_adapters = False
        self.merged_adapters = []

    @property
    def source(self) -> SwitchedModule:
        return self._source[0]

    @property
    def merged(self) -> bool:
        return self.source.merged

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Nothing to do: the tied weight is merged through the input embedding."""

    def unmerge(self) -> None:
        """Nothing to do: the tied weight is unmerged through the input embedding."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        source = self.source
        if self.disable_adapters or source.disable_adapters or source.merged:
            return self.base_layer(*args, **kwargs)
        base = self.get_base_layer()
        weight = source._add_deltas("weight", base.weight, dict.fromkeys(self.active_adapters, 1.0))
        if weight is None:
            return self.base_layer(*args, **kwargs)
        return torch.func.functional_call(base, {"weight": weight}, args, kwargs, strict=False)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def __repr__(self) -> str:
        return "tswitch.tied." + super().__repr__()
