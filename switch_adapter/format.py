"""The on-disk format of a T-Switch adapter, in one place.

A saved adapter is a PEFT adapter folder: ``adapter_config.json`` (a :class:`~switch_adapter.TSwitchConfig` whose
``unit_layout`` lists every switch), ``adapter_model.safetensors`` and a model card ``README.md``. A *unit* is one
switched parameter (``<module>.<param>``, param ``weight`` or ``bias``); in the weights file it is stored under the
keys ``base_model.model.<module>.tswitch_<param>_<part>``:

=========== ======== =================================================================================
part        dtype    content
=========== ======== =================================================================================
``code``    uint8    the switch blob (keep-mask + kept values), see :mod:`switch_adapter.codec.sass`;
                     0 bytes for a targeted tensor the fine-tune left unchanged (no switch)
``scale``   float    1 scale, or one per row (dim 0)
``checksum`` uint8   4 bytes, little-endian CRC32 over the code bytes then the scale bytes as stored
                     (format version 2 and later)
=========== ======== =================================================================================

A weight can instead be switched by a **low-rank pair** (made from a LoRA's factors, see
:func:`switch_adapter.convert_lora` with ``mode="factors"``): the units ``weight_left`` (shape ``[rows, r]``) and
``weight_right`` (``[r, cols]``), each an ordinary unit of its own (code, scale, checksum), whose product is the
change of the weight viewed as ``[rows, cols]`` = ``[shape[0], numel // shape[0]]`` (its stored layout: ``[out, in]``
for ``nn.Linear``, ``[in, out]`` for Conv1D). Their layout entries also record the weight's shape
(``target_shape``). A module has a ``weight`` unit or the pair, never both. A file with a pair is of format
version 5.

A norm layer with running statistics (BatchNorm ...) can carry the fine-tuned statistics, in the precision of the
base model's buffers, under ``base_model.model.<module>.tswitch_stat_running_mean``, ``tswitch_stat_running_var`` and
``tswitch_stat_crc`` (4 bytes, CRC32 over the mean bytes then the variance bytes); the config's ``norm_statistics``
lists those modules. A file with statistics is of format version 4: older readers would drop them silently, so they
refuse it and ask for an upgrade.

Every other key is a full-precision tensor of ``modules_to_save`` (a task head). Format version 1 has no
checksums; it is still read. Format version 3 files hold units with more than one value bit (FlexSwitch) and/or the
grouped-COO encoding; a file with neither (any T-Switch) is written as version 2, which older readers load. This
module owns the names, the key grammar, the layout entries, the checksums, the checks of a file and the size
accounting; ``docs/format.md`` describes the same for readers.
"""

from __future__ import annotations

import functools
import math
import os
import re
import zlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors import safe_open

from .codec import sass
from .errors import CodecError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MODEL_CARD_NAME = "README.md"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, MODEL_CARD_NAME)
KEY_PREFIX = "base_model.model."
ATTR_PREFIX = "tswitch_"
PARTS = ("code", "scale", "checksum")

#: Newest file format version this library reads and writes: 2 adds a checksum per unit, 3 units with value bits
#: above 1 and/or the grouped-COO encoding, 4 running statistics of norm layers, 5 low-rank pairs.
FORMAT_VERSION = 5
#: The first format version whose weights may be switched by a low-rank pair (``weight_left`` @ ``weight_right``).
LOW_RANK_SINCE = 5
#: The units of a low-rank pair, and the parameter whose change their product is.
LOW_RANK_UNITS = ("weight_left", "weight_right")
LOW_RANK_TARGET = "weight"
#: The first format version whose files may carry running statistics of norm layers (BatchNorm).
STATISTICS_SINCE = 4
#: The running statistics a norm layer's switch carries, and the attribute of their checksum.
STATISTICS = ("running_mean", "running_var")
STATISTICS_CHECKSUM = "tswitch_stat_crc"
#: The version of a file whose units all have 1 value bit and no grouped COO (a T-Switch): older readers load it.
PLAIN_FORMAT_VERSION = 2
#: The first format version whose units may carry more than one value bit or use grouped COO.
MULTIBIT_SINCE = 3
#: The first format version whose units carry checksums.
CHECKSUMS_SINCE = 2
CHECKSUM_BYTES = 4

_REPAIR = "Re-save the adapter with save_pretrained or download it again"
_KEY_GRAMMAR = re.compile(r"^(?P<module>.+)\.tswitch_(?P<param>[A-Za-z0-9_]+?)_(?P<part>code|scale|checksum)(\..+)?$")


# -- key grammar ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Unit:
    """One switched parameter: ``module`` (without ``base_model.model.``) and ``param``."""

    module: str
    param: str

    @property
    def name(self) -> str:
        return f"{self.module}.{self.param}"

    def key(self, part: str, prefix: str = KEY_PREFIX) -> str:
        """The key of ``part`` (``code``, ``scale`` or ``checksum``) in an adapter file."""
        return f"{prefix}{self.module}.{attribute(self.param, part)}"


def attribute(param: str, part: str) -> str:
    """The layer attribute holding ``part`` of the switch of ``param``: ``tswitch_<param>_<part>``."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}.")
    return f"{ATTR_PREFIX}{param}_{part}"


def statistics_attribute(name: str) -> str:
    """The layer attribute holding the running statistic ``name`` (``running_mean``/``running_var``) per adapter."""
    if name not in STATISTICS:
        raise ValueError(f"name must be one of {STATISTICS}, got {name!r}.")
    return f"{ATTR_PREFIX}stat_{name}"


_STATISTICS_GRAMMAR = re.compile(r"^(?P<module>.+)\.tswitch_stat_(?P<part>running_mean|running_var|crc)(\..+)?$")


def parse_statistics_key(key: str) -> tuple[str, str] | None:
    """``(module, part)`` for a running-statistics key (part ``running_mean``, ``running_var`` or ``crc``), None for
    any other key."""
    match = _STATISTICS_GRAMMAR.match(key)
    if match is None:
        return None
    return match["module"].removeprefix(KEY_PREFIX), match["part"]


def parse_key(key: str) -> tuple[Unit, str] | None:
    """``(unit, part)`` for a switch key (in a file, or in a model's state dict with an adapter-name suffix);
    None for any other key (a head tensor, a base weight)."""
    match = _KEY_GRAMMAR.match(key)
    if match is None:
        return None
    return Unit(match["module"].removeprefix(KEY_PREFIX), match["param"]), match["part"]


# -- layout entries ------------------------------------------------------------------------------------------------


def layout_entry(shape: Sequence[int], blob: torch.Tensor, scales: int) -> dict[str, Any]:
    """The ``unit_layout`` entry of an encoded switch: shape, code bytes, scale count, kept entries, value bits and
    encoding (lower-case name), the last three read from the blob's header."""
    header = sass.read_header(blob)
    return {
        "shape": [int(size) for size in shape],
        "code_bytes": int(blob.numel()),
        "scales": int(scales),
        "kept": int(header.kept),
        "value_bits": int(header.value_bits),
        "encoding": header.encoding.name.lower(),
    }


def entry_value_bits(entry: Mapping[str, Any]) -> int:
    """The value bits of a layout entry (1 for entries written before value bits were recorded)."""
    return int(entry.get("value_bits", sass.VALUE_BITS))


def required_format_version(
    unit_layout: Mapping[str, Mapping[str, Mapping[str, Any]]], norm_statistics: Mapping[str, Any] | None = None
) -> int:
    """The file format version an adapter with this ``unit_layout`` (and ``norm_statistics``) needs: 5 if a weight is
    switched by a low-rank pair, 4 if it carries running statistics, 3 if a unit has more than one value bit or uses
    grouped COO, else 2 (readable by switch-adapter versions that predate multi-bit units)."""
    if any(LOW_RANK_UNITS[0] in params for params in unit_layout.values()):
        return LOW_RANK_SINCE
    if norm_statistics:
        return STATISTICS_SINCE
    grouped = sass.Encoding.GROUPED_COO.name.lower()
    for params in unit_layout.values():
        for entry in params.values():
            if entry_value_bits(entry) > 1 or entry.get("encoding") == grouped:
                return MULTIBIT_SINCE
    return PLAIN_FORMAT_VERSION


def low_rank_problems(params: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What is wrong with the low-rank pair of one module's layout entries (``{param: entry}``): one unit without the
    other, a ``weight`` unit next to the pair, factor shapes that do not chain, or a product that does not have the
    weight's size. Empty when the module has no pair or a sound one."""
    left, right = (params.get(name) for name in LOW_RANK_UNITS)
    if left is None and right is None:
        return []
    if left is None or right is None:
        return [f"a low-rank pair needs both {LOW_RANK_UNITS[0]} and {LOW_RANK_UNITS[1]}; only one is listed"]
    problems = []
    if LOW_RANK_TARGET in params:
        problems.append(f"has both a {LOW_RANK_TARGET} unit and a low-rank pair")
    left_shape, right_shape = list(left["shape"]), list(right["shape"])
    target = left.get("target_shape")
    if len(left_shape) != 2 or len(right_shape) != 2 or left_shape[1] != right_shape[0]:
        problems.append(f"low-rank factors of shapes {left_shape} and {right_shape} do not chain")
    elif not target or math.prod(target) != left_shape[0] * right_shape[1] or target[0] != left_shape[0]:
        problems.append(f"low-rank factors of shapes {left_shape} and {right_shape} make no weight of shape {target}")
    return problems


def find_layout_entry(layout: Mapping[str, dict], module_name: str, others: Collection[str] = ()) -> dict | None:
    """The layout entry of ``module_name``, also when the adapter was made on a model with another head class:
    ``bert.encoder.layer.0.attention.self.query`` matches ``encoder.layer.0.attention.self.query`` and vice versa.
    A key in ``others`` (names of other modules, e.g. of the model or of the file's units) is never taken by suffix:
    ``norm`` does not get the entry of ``block.norm`` when ``block.norm`` is a module of its own."""
    if module_name in layout:
        return layout[module_name]
    for key, entry in layout.items():
        if key in others:
            continue
        if key.endswith("." + module_name) or module_name.endswith("." + key):
            return entry
    return None


def entry_numel(entry: Mapping[str, Any]) -> int:
    return math.prod(int(size) for size in entry["shape"])


# -- checksums -----------------------------------------------------------------------------------------------------


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return flat.view(torch.uint8).numpy().tobytes()


def unit_checksum(code: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The checksum of a unit: CRC32 over the code bytes then the scale bytes, as 4 little-endian uint8."""
    crc = zlib.crc32(_raw_bytes(scale), zlib.crc32(_raw_bytes(code)))
    return torch.tensor(list(crc.to_bytes(CHECKSUM_BYTES, "little")), dtype=torch.uint8)


def statistics_checksum(running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """The checksum of a layer's running statistics: CRC32 over the mean bytes then the variance bytes."""
    crc = zlib.crc32(_raw_bytes(running_var), zlib.crc32(_raw_bytes(running_mean)))
    return torch.tensor(list(crc.to_bytes(CHECKSUM_BYTES, "little")), dtype=torch.uint8)


def statistics_bytes(norm_statistics: Mapping[str, Mapping[str, Sequence[int]]], element_size: int = 4) -> int:
    """Bytes the running statistics listed in ``norm_statistics`` take in a file (``element_size`` per value)."""
    values = sum(math.prod(shape) for stats in norm_statistics.values() for shape in stats.values())
    return values * element_size + CHECKSUM_BYTES * len(norm_statistics)


def add_checksums(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (the content of an adapter file) with the checksum of every unit that has a code and a scale."""
    result = dict(tensors)
    for key in tensors:
        parsed = parse_key(key)
        if parsed is not None and parsed[1] == "code":
            unit = parsed[0]
            prefix = key[: len(key) - len(f"{unit.module}.{attribute(unit.param, 'code')}")]
            scale_key = unit.key("scale", prefix)
            if scale_key in tensors:
                result[unit.key("checksum", prefix)] = unit_checksum(tensors[key], tensors[scale_key])
    return result


# -- size accounting -----------------------------------------------------------------------------------------------


class SizeFigures:
    """Figures derived from ``parameters``, ``kept``, ``switch_bytes`` and ``bound_bytes`` (for classes that hold
    them). ``switch_bytes`` counts everything a switch stores: code, scales and checksum."""

    parameters: int
    kept: int
    switch_bytes: int
    bound_bytes: float
    #: Value bits summed over the kept entries (``sum k * b``); 0 where not recorded (then every unit has 1 bit).
    value_bits_kept: int

    @property
    def density(self) -> float:
        """Kept entries over switched parameters."""
        return self.kept / self.parameters if self.parameters else 0.0

    @property
    def bits_per_parameter(self) -> float:
        """Bits stored per switched parameter."""
        return 8.0 * self.switch_bytes / self.parameters if self.parameters else 0.0

    @property
    def fraction_of_fp32(self) -> float:
        """Size of the switches over the size of the same task vector in fp32."""
        return self.switch_bytes / (4.0 * self.parameters) if self.parameters else 0.0

    @property
    def fraction_of_fp16(self) -> float:
        return self.switch_bytes / (2.0 * self.parameters) if self.parameters else 0.0

    @property
    def vs_bound(self) -> float:
        """Stored size over the entropy bound ``n H(k/n) + k b`` bits (1.0 = at the bound)."""
        return self.switch_bytes / self.bound_bytes if self.bound_bytes else math.inf

    @property
    def mean_value_bits(self) -> float:
        """Value bits per kept entry, averaged over the kept entries (1.0 for a T-Switch)."""
        return max(1.0, self.value_bits_kept / self.kept) if self.kept else 1.0

    def as_dict(self) -> dict[str, Any]:
        """The fields (of the dataclass using this mixin) and the derived figures."""
        values = asdict(self)
        values.update(
            density=self.density,
            bits_per_parameter=self.bits_per_parameter,
            fraction_of_fp32=self.fraction_of_fp32,
            vs_bound=self.vs_bound if math.isfinite(self.vs_bound) else None,
            mean_value_bits=self.mean_value_bits,
        )
        return values


@dataclass
class StorageSummary(SizeFigures):
    """What the switches of an adapter cost: units, switched parameters, kept entries, bytes, entropy bound; and the
    bytes of the running statistics it carries for norm layers (``statistics_bytes``, fp32, with their checksums;
    not part of ``switch_bytes`` and the figures derived from it)."""

    units: int = 0
    parameters: int = 0
    kept: int = 0
    switch_bytes: int = 0
    bound_bytes: float = 0.0
    value_bits_kept: int = 0
    statistics_bytes: int = 0

    def add(self, numel: int, kept: int, stored_bytes: int, value_bits: int = sass.VALUE_BITS) -> None:
        self.units += 1
        self.parameters += numel
        self.kept += kept
        self.switch_bytes += stored_bytes
        self.value_bits_kept += kept * value_bits
        self.bound_bytes += sass.entropy_bound_bits(numel, kept, value_bits) / 8.0


def stored_unit_bytes(code_bytes: int, scale_bytes: int, format_version: int = FORMAT_VERSION) -> int:
    """Bytes a unit takes in the file: code, scales and (from version 2) the checksum."""
    return code_bytes + scale_bytes + (CHECKSUM_BYTES if format_version >= CHECKSUMS_SINCE else 0)


def storage_summary(config) -> StorageSummary:
    """Sizes of the switches of an adapter, from its config's ``unit_layout`` (fp32 scales)."""
    summary = StorageSummary()
    for params in config.unit_layout.values():
        for entry in params.values():
            stored = stored_unit_bytes(entry["code_bytes"], 4 * entry["scales"], config.format_version)
            summary.add(entry_numel(entry), entry["kept"], stored, entry_value_bits(entry))
    summary.statistics_bytes = statistics_bytes(getattr(config, "norm_statistics", None) or {})
    return summary


# -- reading and checking a file -------------------------------------------------------------------------------------


def kept_values(
    positions: torch.Tensor,
    multipliers: torch.Tensor,
    scale: torch.Tensor,
    numel: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``multiplier * scale`` of every kept entry (``sign * scale`` for 1-bit units); a per-row scale (more than one)
    is indexed by the entry's row. The result has ``dtype``, else the dtype of floating ``multipliers``, else float32
    (integer multipliers: the int16 of :func:`switch_adapter.codec.sass.decode_values` or the int8 a layer keeps).
    ``positions`` may be int32 or int64."""
    if dtype is None:
        dtype = multipliers.dtype if multipliers.is_floating_point() else torch.float32
    scale = scale.to(device=multipliers.device, dtype=dtype).reshape(-1)
    if scale.numel() > 1:
        scale = scale[positions // (numel // scale.numel())]
    return multipliers.to(dtype) * scale


@dataclass
class UnitStatus:
    """What a check of one unit found: ``problems`` is empty for a sound unit; ``checksum`` is ``"ok"``,
    ``"mismatch"`` or ``"absent"`` (format version 1)."""

    unit: Unit
    numel: int | None = None
    kept: int = 0
    value_bits: int = 1
    encoding: str = "none"
    code_bytes: int = 0
    scale_bytes: int = 0
    checksum: str = "absent"
    problems: list[str] = field(default_factory=list)

    @property
    def has_switch(self) -> bool:
        return self.code_bytes > 0


class AdapterFile:
    """An ``adapter_model.safetensors`` of a T-Switch adapter, open for reading (safetensors only, never pickle).

    Use as a context manager. :meth:`check` lists what is wrong with each unit; :meth:`verify` raises
    :class:`~switch_adapter.CodecError` naming every damaged tensor.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        try:
            self._handle = safe_open(self.path, framework="pt")
        except Exception as error:  # safetensors raises its own error type for every header problem
            raise CodecError(
                f"{self.path} is not a readable safetensors file ({error}). It is truncated or corrupt: {_REPAIR}."
            ) from None
        self.keys = set(self._handle.keys())

    def __enter__(self) -> AdapterFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None and hasattr(handle, "__exit__"):
            handle.__exit__(None, None, None)

    def tensor(self, key: str) -> torch.Tensor:
        return self._handle.get_tensor(key)

    def shape_and_dtype(self, key: str) -> tuple[list[int], str]:
        """Shape and safetensors dtype name (``F32``, ``U8``...) of ``key``, without reading its data."""
        view = self._handle.get_slice(key)
        return [int(size) for size in view.get_shape()], view.get_dtype()

    @functools.cached_property
    def unit_modules(self) -> set[str]:
        """The modules with a unit (a code) in the file."""
        return {parsed[0].module for key in self.keys if (parsed := parse_key(key)) and parsed[1] == "code"}

    def units(self, unit_layout: Mapping[str, dict] | None = None) -> list[Unit]:
        """Units with a code in the file: in the order of ``unit_layout`` (model order), then the others sorted."""
        found = {parsed[0] for key in self.keys if (parsed := parse_key(key)) and parsed[1] == "code"}
        ordered = []
        for module, params in (unit_layout or {}).items():
            for param in params:
                unit = Unit(module, param)
                if unit in found:
                    ordered.append(unit)
                    found.discard(unit)
        return ordered + sorted(found)

    def head_keys(self) -> list[str]:
        """Keys of the full-precision tensors (``modules_to_save``), without the ``base_model.model.`` prefix."""
        return sorted(
            key.removeprefix(KEY_PREFIX)
            for key in self.keys
            if parse_key(key) is None and parse_statistics_key(key) is None
        )

    def statistics_modules(self) -> list[str]:
        """Modules (without ``base_model.model.``) whose running statistics the file holds (any part)."""
        return sorted({parsed[0] for key in self.keys if (parsed := parse_statistics_key(key))})

    def check_statistics(self, norm_statistics: Mapping[str, Mapping[str, Sequence[int]]] | None) -> list[str]:
        """Problems of the running statistics in the file (missing parts, shapes other than ``norm_statistics``
        says, a checksum mismatch, NaN/Inf or negative variances), as ``"<module>: <problem>"`` lines."""
        norm_statistics = norm_statistics or {}
        problems = []
        for module in sorted(set(self.statistics_modules()) | set(norm_statistics)):
            keys = {part: f"{KEY_PREFIX}{module}.{ATTR_PREFIX}stat_{part}" for part in (*STATISTICS, "crc")}
            missing = [part for part, key in keys.items() if key not in self.keys]
            if missing:
                problems.append(f"{module}: running statistics incomplete ({', '.join(missing)} missing)")
                continue
            if module not in norm_statistics:
                problems.append(f"{module}: running statistics in the file but not listed in the config")
                continue
            mean, var, crc = (self.tensor(key) for key in keys.values())
            expected = norm_statistics[module]
            for name, value in zip(STATISTICS, (mean, var)):
                if list(value.shape) != list(expected.get(name, [])):
                    problems.append(f"{module}.{name}: shape {list(value.shape)}, the config says {expected.get(name)}")
            if crc.dtype != torch.uint8 or not torch.equal(crc.reshape(-1), statistics_checksum(mean, var)):
                problems.append(f"{module}: running statistics checksum mismatch (changed after they were saved)")
            elif not (torch.isfinite(mean.float()).all() and torch.isfinite(var.float()).all()):
                problems.append(f"{module}: running statistics hold NaN or Inf")
            elif (var < 0).any():
                problems.append(f"{module}: negative running variance")
        return problems

    def check(self, unit_layout: Mapping[str, dict], format_version: int) -> list[UnitStatus]:
        """The status of every unit of the file and of every unit the layout lists but the file lacks."""
        statuses = [self._check_unit(unit, unit_layout, format_version) for unit in self.units(unit_layout)]
        present = {status.unit for status in statuses}
        for module, params in unit_layout.items():
            for param in params:
                unit = Unit(module, param)
                if unit not in present:
                    statuses.append(UnitStatus(unit, problems=["listed in the config but missing from the file"]))
            problems = low_rank_problems(params)
            if problems:
                statuses.append(UnitStatus(Unit(module, LOW_RANK_TARGET), problems=problems))
        return statuses

    def verify(
        self,
        unit_layout: Mapping[str, dict],
        format_version: int,
        norm_statistics: Mapping[str, Mapping[str, Sequence[int]]] | None = None,
    ) -> None:
        """Raise :class:`~switch_adapter.CodecError` naming every damaged unit (and running statistics); return
        quietly otherwise."""
        problems = [f"{s.unit.name}: {p}" for s in self.check(unit_layout, format_version) for p in s.problems]
        problems += self.check_statistics(norm_statistics)
        if problems:
            shown = "\n  ".join(problems[:10]) + (
                f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            )
            raise CodecError(
                f"The T-Switch adapter file {self.path} is damaged:\n  {shown}\n{_REPAIR}; nothing was loaded."
            )

    def _check_unit(self, unit: Unit, unit_layout: Mapping[str, dict], format_version: int) -> UnitStatus:
        scale_key, checksum_key = unit.key("scale"), unit.key("checksum")
        if scale_key not in self.keys:
            return UnitStatus(unit, problems=[f"holds a code but no scale ({scale_key})"])
        params = find_layout_entry(unit_layout, unit.module, self.unit_modules)
        entry = params.get(unit.param) if params else None
        status = check_unit(
            unit,
            self.tensor(unit.key("code")),
            self.tensor(scale_key),
            self.tensor(checksum_key) if checksum_key in self.keys else None,
            format_version=format_version,
            entry=entry,
        )
        if entry is None and status.has_switch:  # the loader sizes a unit's buffers from its entry
            status.problems.append("holds a switch that the config's unit_layout does not list")
        return status


def check_unit(
    unit: Unit,
    code: torch.Tensor,
    scale: torch.Tensor,
    checksum: torch.Tensor | None,
    *,
    format_version: int,
    entry: Mapping[str, Any] | None = None,
    numel: int | None = None,
) -> UnitStatus:
    """Check one stored unit: its checksum, its code (header; for files without checksums, the whole payload), its
    scale, and that it fits its layout ``entry`` and the ``numel`` of the parameter it switches (when given)."""
    status = UnitStatus(unit, code_bytes=int(code.numel()), scale_bytes=int(scale.numel() * scale.element_size()))
    if code.dtype != torch.uint8 or code.dim() != 1:
        status.problems.append(f"the code is a {code.dtype} tensor of shape {list(code.shape)}, not 1-D uint8")
        return status
    if checksum is not None:
        ok = checksum.dtype == torch.uint8 and torch.equal(checksum.reshape(-1).cpu(), unit_checksum(code, scale))
        status.checksum = "ok" if ok else "mismatch"
        if not ok:
            status.problems.append("checksum mismatch: the code or the scale was changed after it was saved")
            return status
    elif format_version >= CHECKSUMS_SINCE:
        status.problems.append(f"no checksum although the adapter is of format version {format_version}")
    if not status.has_switch:
        if entry is not None and int(entry["code_bytes"]):
            status.problems.append(f"empty, but the config lists a switch of {entry['code_bytes']} bytes")
        return status
    if entry is not None and int(entry["code_bytes"]) != status.code_bytes:
        status.problems.append(f"holds a code of {status.code_bytes} bytes, the config says {entry['code_bytes']}")
    try:
        # Without a checksum, decode the payload to find what can be found before the model is touched.
        header = sass.read_header(code) if status.checksum == "ok" else _decoded_header(code)
    except CodecError as error:
        status.problems.append(str(error))
        return status
    status.numel, status.kept, status.encoding = header.numel, header.kept, header.encoding.name.lower()
    status.value_bits = header.value_bits
    if header.value_bits not in sass.VALUE_BITS_CHOICES:  # the codec refuses these already; kept as a contract
        status.problems.append(f"stores {header.value_bits}-bit values; valid value bits are {sass.VALUE_BITS_CHOICES}")
    if entry is not None:
        if entry_value_bits(entry) != header.value_bits:
            status.problems.append(
                f"stores {header.value_bits}-bit values, the config says {entry_value_bits(entry)} value bits"
            )
        if "kept" in entry and int(entry["kept"]) != header.kept:
            status.problems.append(f"keeps {header.kept} entries, the config says {entry['kept']}")
        if header.numel != entry_numel(entry):
            status.problems.append(f"holds {header.numel} entries, the config says shape {entry['shape']}")
        if scale.numel() != int(entry["scales"]):
            status.problems.append(f"holds {scale.numel()} scales, the config says {entry['scales']}")
    if numel is not None and header.numel != numel:
        status.problems.append(f"switch for {header.numel} entries, the layer has {numel}")
    if scale.numel() > 1 and header.numel % scale.numel():
        status.problems.append(f"{scale.numel()} row scales do not divide {header.numel} entries")
    if not torch.isfinite(scale.float()).all():
        status.problems.append("the scale holds NaN or Inf")
    return status


def _decoded_header(code: torch.Tensor) -> sass.Header:
    header = sass.read_header(code)
    sass.decode_positions(code)
    return header


def iter_dense_deltas(
    file: AdapterFile, unit_layout: Mapping[str, dict], device: torch.device | str = "cpu"
) -> Iterator[tuple[Unit, torch.Tensor]]:
    """``(unit, dense fp32 delta of the unit's shape)`` for every unit with a switch, one at a time; a low-rank pair
    comes as its ``weight`` unit with the product of its factors, in the weight's shape."""
    pending: dict[str, tuple[Unit, torch.Tensor]] = {}
    for unit in file.units(unit_layout):
        code = file.tensor(unit.key("code"))
        if code.numel() == 0:
            continue
        try:
            numel, positions, multipliers, _ = sass.decode_values(code, device=device)
        except CodecError as error:
            raise CodecError(f"{unit.name}: {error}") from None
        params = find_layout_entry(unit_layout, unit.module, file.unit_modules)
        entry = params.get(unit.param) if params else None
        shape = [int(size) for size in entry["shape"]] if entry else [numel]
        if math.prod(shape) != numel:
            raise CodecError(f"{unit.name} holds {numel} entries but the config says shape {shape}; {_REPAIR}.")
        values = kept_values(positions, multipliers, file.tensor(unit.key("scale")), numel, torch.float32)
        delta = torch.zeros(numel, dtype=torch.float32, device=device).index_put_((positions,), values).view(shape)
        if unit.param not in LOW_RANK_UNITS:
            yield unit, delta
            continue
        other = pending.pop(unit.module, None)
        if other is None:
            pending[unit.module] = (unit, delta)
            continue
        left, right = (other[1], delta) if unit.param == LOW_RANK_UNITS[1] else (delta, other[1])
        weight_shape = (params or {}).get(LOW_RANK_UNITS[0], {}).get("target_shape")
        product = left @ right
        yield Unit(unit.module, LOW_RANK_TARGET), product.view(weight_shape) if weight_shape else product
    if pending:
        module = next(iter(pending))
        raise CodecError(f"{module}: one unit of its low-rank pair {LOW_RANK_UNITS} is empty or missing; {_REPAIR}.")


def verify_adapter_file(
    path: str | os.PathLike,
    unit_layout: Mapping[str, dict],
    format_version: int,
    norm_statistics: Mapping[str, Mapping[str, Sequence[int]]] | None = None,
) -> None:
    """Raise :class:`~switch_adapter.CodecError` if the weights file at ``path`` is unreadable, damaged, or disagrees
    with the config's ``unit_layout`` and ``norm_statistics``."""
    with AdapterFile(path) as file:
        file.verify(unit_layout, format_version, norm_statistics)


def locate_weights_file(model_id: str, subfolder: str | None, hub_kwargs: Mapping[str, Any]) -> str | None:
    """Local path of an adapter's weights file, from its folder or downloaded from the Hub; None when the adapter
    has no safetensors weights file (peft then reports what it finds)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from ._model_sources import from_hub

    folder = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(folder):
        path = os.path.join(folder, WEIGHTS_NAME)
        return path if os.path.isfile(path) else None
    allowed = {"revision", "token", "cache_dir", "local_files_only", "force_download", "proxies"}
    kwargs = {key: value for key, value in hub_kwargs.items() if key in allowed}
    try:
        return from_hub(
            hf_hub_download, model_id, "T-Switch adapter", filename=WEIGHTS_NAME, subfolder=subfolder, **kwargs
        )
    except Exception as error:
        if isinstance(error.__cause__, EntryNotFoundError):
            return None
        raise
