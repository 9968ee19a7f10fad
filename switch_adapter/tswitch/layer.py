"""T-Switch tuner layer: wraps one base layer and adds ``scale * mask * multiplier`` to its weight (and bias).

The multiplier of a kept entry is its sign for a 1-bit unit (T-Switch) and the odd integer ``2u - (2**b - 1)`` of its
level ``u`` for a ``b``-bit unit (FlexSwitch); see :mod:`switch_adapter.codec.sass`. A weight switched by a low-rank
pair (:data:`~switch_adapter.format.LOW_RANK_UNITS`) changes by the product of its two decoded factors.
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
from ..codec.kernels import add_kept_values
from ..errors import CodecError
from ..format import (
    LOW_RANK_TARGET,
    LOW_RANK_UNITS,
    STATISTICS,
    attribute,
    kept_values,
    layout_entry,
    low_rank_problems,
    statistics_attribute,
    statistics_checksum,
    unit_checksum,
)

logger = logging.getLogger(__name__)

SWITCHABLE_PARAMETERS = ("weight", "bias")
#: Every unit a layer may store: a switch per switchable parameter, and the two factors of a low-rank pair.
UNIT_PARAMETERS = SWITCHABLE_PARAMETERS + LOW_RANK_UNITS
_NORM_CLASS_SUFFIXES = ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm", "InstanceNorm")


def has_running_statistics(module: nn.Module) -> bool:
    """True for a norm layer that tracks running statistics (``running_mean`` and ``running_var`` buffers): torch's
    BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm with ``track_running_stats=True``, and model-specific classes."""
    return isinstance(getattr(module, "running_mean", None), torch.Tensor) and isinstance(
        getattr(module, "running_var", None), torch.Tensor
    )


def is_norm_layer(module: nn.Module) -> bool:
    """True for norm layers: LayerNorm / RMSNorm / GroupNorm, torch's BatchNorm / InstanceNorm family (``_NormBase``,
    also SyncBatchNorm) and model-specific classes such as LlamaRMSNorm, when they have an affine weight or running
    statistics to switch."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return isinstance(module.weight, nn.Parameter) or has_running_statistics(module)
    name = type(module).__name__.removesuffix("1d").removesuffix("2d").removesuffix("3d")
    if not name.endswith(_NORM_CLASS_SUFFIXES):
        return False
    return isinstance(getattr(module, "weight", None), nn.Parameter) or has_running_statistics(module)


def is_supported_layer(module: nn.Module) -> bool:
    """Layers a switch can wrap: Linear, Embedding, transformers' Conv1D, Conv2d and norm layers (including those
    with running statistics, e.g. BatchNorm)."""
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


def compact_decoded(
    numel: int, positions: torch.Tensor, multipliers: torch.Tensor, value_bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoded ``(positions, multipliers)`` in the narrowest exact dtypes: int32 positions (int64 for a tensor of
    ``2**31`` entries or more) and int8 multipliers for units of up to 7 value bits (``|2u - (2**b - 1)| <= 127``;
    8-bit units keep int16). At most 5 bytes per kept entry for units of up to 7 bits, 6 for 8-bit units."""
    position_dtype, multiplier_dtype = sass.compact_dtypes(numel, value_bits)
    return positions.to(position_dtype), multipliers.to(multiplier_dtype)


class TSwitchLayer(BaseTunerLayer):
    """State of the switches of one base layer, per adapter and per switched parameter.

    Persistent (saved) per adapter: ``tswitch_<param>_code`` (the encoded switch, uint8), ``tswitch_<param>_scale``
    (float, trainable) and, from format version 2, ``tswitch_<param>_checksum`` (refreshed whenever a state dict is
    taken, so a saved file always carries the checksum of what it holds; see :mod:`switch_adapter.format`). The
    decoded kept positions and multipliers are cached in memory, keyed by the code buffer's identity, so the cache
    follows loads and device moves.
    """

    adapter_layer_names = tuple(attribute(name, "scale") for name in UNIT_PARAMETERS)
    other_param_names = (
        *(attribute(name, part) for name in UNIT_PARAMETERS for part in ("code", "checksum")),
        "tswitch_stat_running_mean",
        "tswitch_stat_running_var",
        "tswitch_stat_crc",
    )
    tswitch_module_name: str = ""  # set by the tuner, for error messages

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        for name in UNIT_PARAMETERS:  # tswitch_<param>_scale / _code / _checksum, per adapter
            setattr(self, attribute(name, "scale"), nn.ParameterDict({}))
            setattr(self, attribute(name, "code"), BufferDict({}, persistent=True))
            setattr(self, attribute(name, "checksum"), BufferDict({}, persistent=True))
        # Running statistics of a norm layer (BatchNorm...), per adapter: the fine-tuned values themselves.
        self.tswitch_stat_running_mean = BufferDict({}, persistent=True)
        self.tswitch_stat_running_var = BufferDict({}, persistent=True)
        self.tswitch_stat_crc = BufferDict({}, persistent=True)
        self._targeted_by: set[str] = set()  # adapters whose config targets this layer (switched or not)
        self._premerge_statistics: dict[str, torch.Tensor] | None = None
        self._recalibration: dict[str, torch.Tensor] | None = None  # accumulators, see norm_stats.py
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
        for param_name in UNIT_PARAMETERS:
            checksums = self._checksums(param_name)
            for adapter_name in list(checksums.keys()):
                code, scale = self._codes(param_name)[adapter_name], self._scales(param_name)[adapter_name]
                if not (code.is_meta or scale.is_meta):  # a skeleton on the meta device holds no data yet
                    checksums[adapter_name].copy_(unit_checksum(code, scale))
        for adapter_name in list(self.tswitch_stat_crc.keys()):
            mean, var = self.tswitch_stat_running_mean[adapter_name], self.tswitch_stat_running_var[adapter_name]
            if not (mean.is_meta or var.is_meta):
                self.tswitch_stat_crc[adapter_name].copy_(statistics_checksum(mean, var))

    # -- running statistics (BatchNorm and other norm layers that track them) -------------------------------------

    def _statistics(self, stat_name: str) -> BufferDict:
        return getattr(self, statistics_attribute(stat_name))

    def is_targeted_by(self, adapter_name: str) -> bool:
        """True when ``adapter_name``'s config targets this layer (it may still switch nothing here)."""
        return adapter_name in self._targeted_by

    def has_statistics(self, adapter_name: str) -> bool:
        """True when ``adapter_name`` carries running statistics for this layer."""
        return adapter_name in self.tswitch_stat_running_mean

    def statistics(self, adapter_name: str) -> dict[str, torch.Tensor] | None:
        """``{"running_mean": ..., "running_var": ...}`` of ``adapter_name`` (the tensors held), or None."""
        if not self.has_statistics(adapter_name):
            return None
        return {name: self._statistics(name)[adapter_name] for name in STATISTICS}

    def set_statistics(self, adapter_name: str, values: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
        """Store ``values`` (``running_mean`` and ``running_var``, the shapes of the base layer's buffers) as the
        running statistics of ``adapter_name``; returns the record for ``config.norm_statistics``."""
        base = self.get_base_layer()
        if not has_running_statistics(base):
            raise ValueError(f"{self.tswitch_module_name or type(base).__name__} has no running statistics.")
        record = {}
        for name in STATISTICS:
            own = getattr(base, name)
            value = values[name]
            if value.shape != own.shape:
                raise ValueError(
                    f"{self.tswitch_module_name}.{name}: statistics of shape {list(value.shape)}, the base layer's "
                    f"buffer has shape {list(own.shape)}."
                )
            self._statistics(name)[adapter_name] = value.detach().to(device=own.device, dtype=own.dtype).clone()
            record[name] = [int(size) for size in own.shape]
        mean, var = (self._statistics(name)[adapter_name] for name in STATISTICS)
        self.tswitch_stat_crc[adapter_name] = statistics_checksum(mean, var).to(mean.device)
        return record

    def composed_statistics(self, weights: Mapping[str, float]) -> dict[str, torch.Tensor] | None:
        """Running statistics of the composition ``weights``: ``base + sum_a weights[a] * (stat_a - base)`` over the
        adapters that carry statistics (the adapter's own tensors when one adapter has weight 1); variances are
        clamped at 0. None when no adapter with a non-zero weight carries statistics."""
        carried = [(name, float(w)) for name, w in weights.items() if w != 0 and self.has_statistics(name)]
        if not carried:
            return None
        if len(carried) == 1 and carried[0][1] == 1.0:
            return dict(self.statistics(carried[0][0]))
        base = self.get_base_layer()
        result = {}
        with torch.no_grad():
            for name in STATISTICS:
                own = getattr(base, name)
                value = own.detach().float().clone()
                for adapter_name, weight in carried:
                    value += weight * (self._statistics(name)[adapter_name].float() - own.float())
                if name == "running_var":
                    value.clamp_(min=0.0)
                result[name] = value.to(own.dtype)
        return result

    def update_layer(
        self,
        adapter_name: str,
        param_layout: dict[str, dict],
        param_names: tuple[str, ...],
        inference_mode: bool,
        with_checksums: bool = True,
        with_statistics: bool = False,
    ) -> None:
        """Allocate the adapter's buffers: sized from ``param_layout`` (a loaded switch) or empty (a no-op switch).
        ``with_checksums`` is False for adapters of format version 1, whose files have none; ``with_statistics``
        allocates running statistics (to be loaded) for a norm layer that tracks them."""
        base = self.get_base_layer()
        self._targeted_by.add(adapter_name)
        if with_statistics and has_running_statistics(base):
            for name in STATISTICS:
                self._statistics(name)[adapter_name] = torch.zeros_like(getattr(base, name))
            self.tswitch_stat_crc[adapter_name] = torch.zeros(4, dtype=torch.uint8)
        low_rank = LOW_RANK_UNITS[0] in param_layout or LOW_RANK_UNITS[1] in param_layout
        for param_name in param_names:
            if low_rank and param_name == LOW_RANK_TARGET:
                continue  # the pair stands for the weight's switch
            entry = param_layout.get(param_name)
            code_bytes = int(entry["code_bytes"]) if entry else 0
            scales = int(entry["scales"]) if entry else 1
            if entry and list(entry["shape"]) != list(getattr(base, param_name).shape):
                raise ValueError(
                    f"The switch for {param_name} has shape {list(entry['shape'])} but the base layer's "
                    f"{param_name} has shape {list(getattr(base, param_name).shape)}."
                )
            self._allocate(adapter_name, param_name, code_bytes, scales, with_checksums)
        if low_rank:
            problems = low_rank_problems(param_layout)
            weight = getattr(base, LOW_RANK_TARGET, None)
            target = param_layout.get(LOW_RANK_UNITS[0], {}).get("target_shape")
            if not problems and (weight is None or list(target) != list(weight.shape)):
                problems = [f"the low-rank pair makes a weight of shape {target}, the base layer's weight has shape "
                            f"{None if weight is None else list(weight.shape)}"]  # fmt: skip
            if problems:
                raise ValueError(f"{self.tswitch_module_name or type(base).__name__}: {'; '.join(problems)}.")
            for name in LOW_RANK_UNITS:
                entry = param_layout[name]
                self._allocate(adapter_name, name, int(entry["code_bytes"]), int(entry["scales"]), with_checksums)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _allocate(self, adapter_name: str, param_name: str, code_bytes: int, scales: int, with_checksums: bool) -> None:
        self._codes(param_name)[adapter_name] = torch.zeros(code_bytes, dtype=torch.uint8)
        self._scales(param_name)[adapter_name] = nn.Parameter(torch.zeros(scales))
        if with_checksums:
            self._checksums(param_name)[adapter_name] = torch.zeros(4, dtype=torch.uint8)

    def prepare_low_rank(self, adapter_name: str) -> None:
        """Give ``adapter_name`` empty low-rank units in place of its weight's unit (what a pair will be stored in),
        so that the adapter's state dict has the pair's keys before :meth:`set_low_rank` fills them."""
        with_checksums = adapter_name in self._checksums(LOW_RANK_TARGET)
        for name in LOW_RANK_UNITS:
            self._allocate(adapter_name, name, 0, 1, with_checksums)
        self._drop_unit(adapter_name, LOW_RANK_TARGET)
        self._move_adapter_to_device_of_base_layer(adapter_name)

    def _drop_unit(self, adapter_name: str, param_name: str) -> None:
        """Remove ``adapter_name``'s unit of ``param_name`` (code, scale, checksum and decoded copy), if it has one."""
        for part in ("code", "scale", "checksum"):
            holder = getattr(self, attribute(param_name, part))
            if adapter_name in holder:
                holder.pop(adapter_name)
        self._sparse_cache.pop((adapter_name, param_name), None)

    def set_low_rank(self, adapter_name: str, left: BinarySwitch, right: BinarySwitch) -> dict[str, dict[str, Any]]:
        """Switch the weight of ``adapter_name`` by the low-rank pair ``left @ right`` (``[rows, r]`` and ``[r,
        cols]`` of the weight viewed as ``[shape[0], numel // shape[0]]``), replacing a ``weight`` switch; returns
        the layout entries of the two units (see :meth:`set_switch`)."""
        weight = self.get_base_layer().weight
        rows = weight.shape[0]
        if len(left.shape) != 2 or len(right.shape) != 2 or left.shape[1] != right.shape[0]:
            raise ValueError(f"Low-rank factors of shapes {list(left.shape)} and {list(right.shape)} do not chain.")
        if left.shape[0] != rows or right.shape[1] * rows != weight.numel():
            raise ValueError(
                f"Low-rank factors of shapes {list(left.shape)} and {list(right.shape)} do not make the weight of "
                f"{self.tswitch_module_name or 'this layer'} (shape {list(weight.shape)})."
            )
        if adapter_name not in self._codes(LOW_RANK_UNITS[0]):
            self.prepare_low_rank(adapter_name)
        entries = {}
        for name, switch in zip(LOW_RANK_UNITS, (left, right)):
            entries[name] = self.set_switch(adapter_name, name, switch)
            entries[name]["target_shape"] = [int(size) for size in weight.shape]
        return entries

    def set_switch(self, adapter_name: str, param_name: str, switch: BinarySwitch) -> dict[str, Any]:
        """Store ``switch`` (any value bits) for ``param_name`` of this layer; returns its layout entry for the adapter
        config. Whoever collects the entries into ``config.unit_layout`` sets ``config.format_version`` to
        :func:`switch_adapter.format.required_format_version` of the layout."""
        codes, scales = self._codes(param_name), self._scales(param_name)
        owner = LOW_RANK_TARGET if param_name in LOW_RANK_UNITS else param_name
        device = getattr(self.get_base_layer(), owner).device
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
        """Parameters of this layer that ``adapter_name`` may switch (its switch can still be empty; the weight of a
        low-rank pair included)."""
        return [name for name in SWITCHABLE_PARAMETERS if adapter_name in self._codes(name)
                or (name == LOW_RANK_TARGET and adapter_name in self._codes(LOW_RANK_UNITS[0]))]  # fmt: skip

    def _sparse(self, adapter_name: str, param_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions, multipliers)`` of the kept entries as :func:`compact_decoded` stores them (int32 flat
        positions, int8 odd integers: +-1 for a 1-bit unit), decoded once per code buffer.

        Work and memory are proportional to the kept entries, not to the size of the weight.
        """
        code = self._codes(param_name)[adapter_name]
        key = (code.data_ptr(), code._version, code.device, code.numel())
        cached = self._sparse_cache.get((adapter_name, param_name))
        if cached is not None and cached[0] == key:
            return cached[1]
        positions, multipliers = self._decode(adapter_name, param_name)
        self._sparse_cache[(adapter_name, param_name)] = (key, (positions, multipliers))
        return positions, multipliers

    def _decode(self, adapter_name: str, param_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_sparse`'s arrays, decoded now and not kept."""
        code = self._codes(param_name)[adapter_name]
        try:
            _, positions, multipliers, _ = sass.decode_compact(code, device=code.device)
        except CodecError as error:
            where = f"{self.tswitch_module_name}.{param_name}" if self.tswitch_module_name else param_name
            raise CodecError(f"T-Switch adapter {adapter_name!r}, {where}: {error}") from None
        return positions, multipliers

    def decoded_nbytes(self) -> int:
        """Bytes held by the decoded kept positions and multipliers of every switch decoded so far."""
        return sum(
            positions.numel() * positions.element_size() + multipliers.numel() * multipliers.element_size()
            for _, (positions, multipliers) in self._sparse_cache.values()
        )

    def _kept_values(self, adapter_name: str, param_name: str, like: torch.Tensor):
        """Positions of the kept entries and their values ``multiplier * scale`` in the dtype/device of ``like``."""
        positions, multipliers = self._sparse(adapter_name, param_name)
        positions, multipliers = positions.to(like.device), multipliers.to(like.device)
        scale = self._scales(param_name)[adapter_name]
        return positions, kept_values(positions, multipliers, scale, like.numel(), like.dtype)

    def _has_unit(self, adapter_name: str, param_name: str) -> bool:
        codes = self._codes(param_name)
        return adapter_name in codes and codes[adapter_name].numel() > 0

    def _has_switch(self, adapter_name: str, param_name: str) -> bool:
        """Whether ``adapter_name`` changes ``param_name`` (a switch of its own, or a low-rank pair for the weight)."""
        return self._has_unit(adapter_name, param_name) or (
            param_name == LOW_RANK_TARGET and self.is_low_rank(adapter_name)
        )

    def is_low_rank(self, adapter_name: str) -> bool:
        """Whether ``adapter_name`` switches the weight by a low-rank pair."""
        return all(self._has_unit(adapter_name, name) for name in LOW_RANK_UNITS)

    def low_rank_factors(
        self, adapter_name: str, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded ``(left, right)`` factors of ``adapter_name``'s low-rank pair (``[rows, r]``, ``[r, cols]``),
        in ``dtype`` on ``device`` (the weight's by default); differentiable in the scales."""
        weight = self.get_base_layer().weight
        dtype, device = dtype or weight.dtype, device or weight.device
        factors = []
        for name in LOW_RANK_UNITS:
            positions, multipliers = self._sparse(adapter_name, name)
            positions, multipliers = positions.to(device), multipliers.to(device)
            scale = self._scales(name)[adapter_name]
            shape = self._factor_shape(adapter_name, name)
            values = kept_values(positions, multipliers, scale, shape[0] * shape[1], dtype)
            dense = torch.zeros(shape[0] * shape[1], dtype=dtype, device=device)
            factors.append(dense.index_put((positions,), values).view(shape))
        return factors[0], factors[1]

    def _factor_shape(self, adapter_name: str, name: str) -> tuple[int, int]:
        """The shape of one factor of ``adapter_name``'s pair, from the weight and the left factor's entry count."""
        weight = self.get_base_layer().weight
        rows, cols = weight.shape[0], weight.numel() // weight.shape[0]
        header = sass.read_header(self._codes(LOW_RANK_UNITS[0])[adapter_name])
        rank = header.numel // rows
        return (rows, rank) if name == LOW_RANK_UNITS[0] else (rank, cols)

    def get_delta(self, adapter_name: str, param_name: str) -> torch.Tensor | None:
        """The dense ``scale * mask * multiplier`` for one parameter (the product of the factors for a low-rank
        pair), in its dtype and on its device; None if empty."""
        if not self._has_switch(adapter_name, param_name):
            return None
        param = getattr(self.get_base_layer(), param_name)
        if param_name == LOW_RANK_TARGET and self.is_low_rank(adapter_name):
            left, right = self.low_rank_factors(adapter_name, param.dtype, param.device)
            return (left @ right).view(param.shape)
        positions, values = self._kept_values(adapter_name, param_name, param)
        delta = torch.zeros(param.numel(), dtype=param.dtype, device=param.device)
        return delta.index_put_((positions,), values).view(param.shape)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor | None:
        """PEFT's name for the weight's delta."""
        return self.get_delta(adapter_name, "weight")

    def _add_deltas(
        self,
        param_name: str,
        value: torch.Tensor,
        weights: Mapping[str, float],
        inplace: bool = False,
        keep_decoded: bool = True,
    ) -> torch.Tensor | None:
        """``value + sum_a weights[a] * delta_a`` (a new tensor unless ``inplace``); None if no adapter with a
        non-zero weight switches ``param_name``.

        Only the kept entries are touched: the cost is a copy of ``value`` plus work proportional to them. Decoded
        switches are kept for the next call; a one-off (a merge: ``keep_decoded=False``) decodes straight into the
        weights where it can, keeping nothing.
        """
        result = value if inplace else None
        for adapter_name, weight in weights.items():
            if weight == 0 or not self._has_switch(adapter_name, param_name):
                continue
            if result is None:
                result = value.clone()
            if param_name == LOW_RANK_TARGET and self.is_low_rank(adapter_name):
                left, right = self.low_rank_factors(adapter_name, result.dtype, result.device)
                result.view(result.shape[0], -1).addmm_(left, right, alpha=float(weight))
                continue
            scale = self._scales(param_name)[adapter_name]
            if keep_decoded or (adapter_name, param_name) in self._sparse_cache:
                positions, multipliers = self._sparse(adapter_name, param_name)
            elif sass.add_decoded(self._codes(param_name)[adapter_name], result.view(-1), scale, float(weight)):
                continue  # a one-off (a merge) decoded straight into the weights
            else:
                positions, multipliers = self._decode(adapter_name, param_name)  # a one-off: not kept
            add_kept_values(result.view(-1), positions, multipliers, scale, float(weight))
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
    an unmerged forward computes exactly what the merged weights compute. A norm layer with running statistics
    (BatchNorm) in eval mode normalises with the active adapter's statistics (see :meth:`composed_statistics`); in
    train mode it normalises with batch statistics and updates no running statistics.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        param_layout: dict[str, dict],
        param_names: tuple[str, ...],
        inference_mode: bool = False,
        with_checksums: bool = True,
        with_statistics: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        TSwitchLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, param_layout, param_names, inference_mode, with_checksums, with_statistics)
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
                self._add_deltas(param_name, param.data, {adapter_name: 1.0}, inplace=True, keep_decoded=False)
            self._merge_statistics(adapter_name)
            self.merged_adapters.append(adapter_name)

    def _merge_statistics(self, adapter_name: str) -> None:
        """Write the adapter's running statistics into the base layer's buffers: the adapter's own values for the
        first merged adapter with statistics, ``+ (stat - base)`` for further ones; the base values are kept to
        unmerge."""
        stats = self.statistics(adapter_name)
        if stats is None:
            return
        base = self.get_base_layer()
        with torch.no_grad():
            if self._premerge_statistics is None:
                self._premerge_statistics = {name: getattr(base, name).detach().clone() for name in STATISTICS}
                for name in STATISTICS:
                    getattr(base, name).copy_(stats[name])
                return
            for name in STATISTICS:
                buffer = getattr(base, name)
                buffer.add_(stats[name].to(buffer.dtype) - self._premerge_statistics[name])
                if name == "running_var":
                    buffer.clamp_(min=0.0)

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
                    self._add_deltas(param_name, param.data, {adapter_name: -1.0}, inplace=True, keep_decoded=False)
        if self._premerge_statistics is not None:
            with torch.no_grad():
                for name, value in self._premerge_statistics.items():
                    getattr(base, name).copy_(value)
            self._premerge_statistics = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        if self.merged:
            return self.base_layer(*args, **kwargs)
        params = self.switched_parameters(self.active_adapters)
        params.update(self._statistics_for_forward())
        if not params:
            return self.base_layer(*args, **kwargs)
        return torch.func.functional_call(self.get_base_layer(), params, args, kwargs, strict=False)

    def _statistics_for_forward(self) -> dict[str, torch.Tensor]:
        """Buffers to substitute in the base layer. Eval mode: the active adapters' running statistics. Train mode
        (the layer normalises with batch statistics): copies, so that neither the base model's nor the adapter's
        statistics are updated, or the recalibration accumulators while :func:`recalibrate_norm_statistics` runs."""
        base = self.get_base_layer()
        if not has_running_statistics(base):
            return {}
        if not (base.training and getattr(base, "track_running_stats", True)):
            return self.composed_statistics(dict.fromkeys(self.active_adapters, 1.0)) or {}
        if self._recalibration is not None:
            return self._recalibration
        names = STATISTICS
        if isinstance(getattr(base, "num_batches_tracked", None), torch.Tensor):
            names += ("num_batches_tracked",)
        return {name: getattr(base, name).detach().clone() for name in names}

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
