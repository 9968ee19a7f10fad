"""What a saved T-Switch adapter holds and what it costs, read from the safetensors file itself."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..codec import sass
from ..format import CHECKSUMS_SINCE, CONFIG_NAME, KEY_PREFIX, SizeFigures, find_layout_entry, stored_unit_bytes
from ..tswitch.model_card import plain_base_class
from ._switch_file import open_switch

_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "U8": "uint8", "I64": "int64"}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}


@dataclass
class UnitReport(SizeFigures):
    """One switched parameter (``module.param``). Sizes in bytes; ``bytes`` = code + scales + checksum.
    ``checksum`` is ``"ok"``, ``"mismatch"`` or ``"absent"`` (format version 1); ``value_bits`` is the number of bits
    per kept value (1 for a T-Switch; 2, 4 or 8 in a FlexSwitch)."""

    name: str
    shape: list[int]
    numel: int
    kept: int
    encoding: str
    code_bytes: int
    scale_bytes: int
    checksum_bytes: int
    bound_bytes: float
    checksum: str = "ok"
    value_bits: int = 1

    @property
    def value_bits_kept(self) -> int:
        return self.kept * self.value_bits

    @property
    def bytes(self) -> int:
        return self.code_bytes + self.scale_bytes + self.checksum_bytes

    @property
    def parameters(self) -> int:
        return self.numel

    @property
    def switch_bytes(self) -> int:
        return self.bytes

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.numel

    @property
    def fp16_bytes(self) -> int:
        return 2 * self.numel

    def to_dict(self) -> dict[str, Any]:
        values = self.as_dict()
        values.update(bytes=self.bytes, fp32_bytes=self.fp32_bytes, fp16_bytes=self.fp16_bytes)
        return values


@dataclass
class TensorReport:
    """A full-precision tensor stored with the switch (``modules_to_save``, e.g. a task head)."""

    name: str
    shape: list[int]
    dtype: str
    bytes: int


@dataclass
class InspectionReport(SizeFigures):
    """Per-unit and total storage of a T-Switch adapter, and any damage found in its file. ``to_table()`` for people,
    ``to_dict()`` for JSON. ``unchanged`` names targeted tensors without a switch (the fine-tune left them as they
    were); ``problems`` lists damaged units (checksum mismatch, corrupt code...), empty for a sound file."""

    source: str
    base_model: str | None
    task_type: str | None
    scale_granularity: str
    format_version: int
    file_bytes: int
    units: list[UnitReport] = field(default_factory=list)
    full_precision: list[TensorReport] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    base_class: str | None = None  # "module:Class" of a plain torch.nn.Module base (peft's auto_mapping), else None

    @property
    def damaged(self) -> bool:
        return bool(self.problems)

    # -- totals over the switched units -------------------------------------------------------------
    @property
    def numel(self) -> int:
        return sum(u.numel for u in self.units)

    @property
    def parameters(self) -> int:
        return self.numel

    @property
    def kept(self) -> int:
        return sum(u.kept for u in self.units)

    @property
    def switch_bytes(self) -> int:
        return sum(u.bytes for u in self.units)

    @property
    def bound_bytes(self) -> float:
        return sum(u.bound_bytes for u in self.units)

    @property
    def value_bits_kept(self) -> int:
        return sum(u.value_bits_kept for u in self.units)

    @property
    def full_precision_bytes(self) -> int:
        return sum(t.bytes for t in self.full_precision)

    def totals(self) -> dict[str, Any]:
        return {
            "units": len(self.units),
            "numel": self.numel,
            "kept": self.kept,
            "density": self.density,
            "mean_value_bits": self.mean_value_bits,
            "switch_bytes": self.switch_bytes,
            "bits_per_parameter": self.bits_per_parameter,
            "fp32_bytes": 4 * self.numel,
            "fp16_bytes": 2 * self.numel,
            "fraction_of_fp32": self.fraction_of_fp32,
            "fraction_of_fp16": self.fraction_of_fp16,
            "bound_bytes": self.bound_bytes,
            "vs_bound": self.vs_bound if math.isfinite(self.vs_bound) else None,
            "unchanged_tensors": len(self.unchanged),
            "full_precision_tensors": len(self.full_precision),
            "full_precision_bytes": self.full_precision_bytes,
            "file_bytes": self.file_bytes,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-serialisable values."""
        return {
            "source": self.source,
            "base_model": self.base_model,
            "base_class": self.base_class,
            "task_type": self.task_type,
            "scale_granularity": self.scale_granularity,
            "format_version": self.format_version,
            "totals": self.totals(),
            "units": [u.to_dict() for u in self.units],
            "unchanged": list(self.unchanged),
            "full_precision": [asdict(t) for t in self.full_precision],
            "problems": list(self.problems),
        }

    def to_table(self) -> str:
        """An aligned text table: one row per unit, then the totals and the full-precision tensors."""
        header = ["unit", "shape", "params", "kept", "density", "value bits", "encoding", "bits/param", "bytes"]
        header += ["%fp32", "%fp16", "x bound"]
        rows = [
            [
                u.name,
                "x".join(str(s) for s in u.shape),
                f"{u.numel:,}",
                f"{u.kept:,}",
                f"{u.density:.4f}",
                str(u.value_bits),
                u.encoding,
                f"{u.bits_per_parameter:.3f}",
                f"{u.bytes:,}",
                f"{100 * u.bytes / u.fp32_bytes:.2f}",
                f"{100 * u.bytes / u.fp16_bytes:.2f}",
                f"{u.vs_bound:.3f}",
            ]
            for u in self.units
        ]
        total = [
            f"total ({len(self.units)} units)",
            "",
            f"{self.numel:,}",
            f"{self.kept:,}",
            f"{self.density:.4f}",
            _bits_text(self.mean_value_bits),
            "",
            f"{self.bits_per_parameter:.3f}",
            f"{self.switch_bytes:,}",
            f"{100 * self.fraction_of_fp32:.2f}",
            f"{100 * self.fraction_of_fp16:.2f}",
            f"{self.vs_bound:.3f}",
        ]
        line = _aligned_line([max(len(row[i]) for row in [header, total, *rows]) for i in range(len(header))])
        rule = "-" * len(line(header))
        lines = [
            f"T-Switch adapter: {self.source}",
            f"base model: {self.base_model or '(not recorded)'}"
            + (f" (a torch.nn.Module: {self.base_class})" if self.base_class else "")
            + f" | task type: {self.task_type or '-'} | "
            f"scale granularity: {self.scale_granularity} | format version: {self.format_version}",
            "",
            line(header),
            rule,
            *(line(r) for r in rows),
            rule,
            line(total),
        ]
        if self.full_precision:
            lines += ["", f"full-precision tensors (modules_to_save): {self.full_precision_bytes:,} bytes"]
            width = max(len(t.name) for t in self.full_precision)
            for tensor in self.full_precision:
                shape = "x".join(str(s) for s in tensor.shape)
                lines.append(f"  {tensor.name.ljust(width)}  {shape:>12}  {tensor.dtype:<8} {tensor.bytes:>12,} bytes")
        lines += [
            "",
            f"switches: {self.switch_bytes:,} bytes = {self.bits_per_parameter:.3f} bits/param = "
            f"{100 * self.fraction_of_fp32:.2f}% of fp32, {100 * self.fraction_of_fp16:.2f}% of fp16, "
            f"{self.vs_bound:.3f}x the entropy bound ({self.bound_bytes:,.0f} bytes)",
            f"adapter_model.safetensors: {self.file_bytes:,} bytes",
        ]
        if self.mean_value_bits > 1:
            lines.append(f"value bits: {self.mean_value_bits:.2f} per kept entry on average ({self._bits_census()})")
        if self.unchanged:
            lines.append(f"targeted tensors without a switch (unchanged by the fine-tune): {len(self.unchanged)}")
        checked = "checksums verified" if self.format_version >= CHECKSUMS_SINCE else "format 1: no checksums"
        if self.problems:
            lines += ["", f"DAMAGED: {len(self.problems)} problem(s) ({checked}):"]
            lines += [f"  {problem}" for problem in self.problems]
            lines.append("Re-save the adapter with save_pretrained or download it again.")
        else:
            lines.append(f"file sound ({checked})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()

    def _bits_census(self) -> str:
        """``"12 units of 1 bit, 3 of 4 bits"``: how many units have each bit-width."""
        counts = Counter(u.value_bits for u in self.units)
        parts = [f"{counts[bits]} of {bits} bit{'s' if bits > 1 else ''}" for bits in sorted(counts)]
        return "units: " + ", ".join(parts)


def _bits_text(bits: float) -> str:
    return f"{bits:.0f}" if float(bits).is_integer() else f"{bits:.2f}"


def _aligned_line(widths: list[int]) -> Callable[[list[str]], str]:
    """A formatter of table rows: the unit name and the encoding left-aligned, every other column right-aligned."""
    left = {0, 6}

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(padded).rstrip()

    return line


def _auto_mapping(folder: str) -> dict[str, Any] | None:
    """``auto_mapping`` of the adapter config: peft records the base model class there for models without a task
    type."""
    try:
        with open(os.path.join(folder, CONFIG_NAME), encoding="utf-8") as handle:
            mapping = json.load(handle).get("auto_mapping")
    except (OSError, ValueError, AttributeError):
        return None
    return mapping if isinstance(mapping, dict) else None


def inspect_adapter(
    path_or_repo: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> InspectionReport:
    """Per-unit storage of a T-Switch adapter (a folder or a Hub id): shape, entries, kept entries, density, value
    bits, encoding, bits per parameter, bytes vs fp32 / fp16 and vs the entropy bound, totals, and the damage found.

    Sizes come from the safetensors file (each code's header and length, each scale's dtype), not from the config.
    Damaged units (checksum mismatch, corrupt code, wrong sizes) are listed in ``report.problems`` instead of raising.
    Raises :class:`~switch_adapter.AdapterNotFoundError` for missing files, ``ValueError`` for another adapter type
    and :class:`~switch_adapter.CodecError` for a file that is not readable safetensors.
    """
    switch = open_switch(path_or_repo, revision=revision, token=token, verify=False)
    config = switch.config
    report = InspectionReport(
        source=switch.source,
        base_model=config.base_model_name_or_path,
        task_type=config.task_type.value if hasattr(config.task_type, "value") else config.task_type,
        scale_granularity=config.scale_granularity,
        format_version=config.format_version,
        file_bytes=os.path.getsize(switch.weights_path),
        base_class=plain_base_class(_auto_mapping(switch.folder)),
    )
    checksum_bytes = stored_unit_bytes(0, 0, config.format_version)
    with switch.open() as file:
        for status in file.check(config.unit_layout, config.format_version):
            name = status.unit.name
            report.problems.extend(f"{name}: {problem}" for problem in status.problems)
            if status.problems or status.numel is None:
                if not status.problems and not status.has_switch:
                    report.unchanged.append(name)
                continue
            entry = find_layout_entry(config.unit_layout, status.unit.module) or {}
            shape = entry.get(status.unit.param, {}).get("shape", [status.numel])
            report.units.append(
                UnitReport(
                    name=name,
                    shape=[int(size) for size in shape],
                    numel=status.numel,
                    kept=status.kept,
                    encoding=status.encoding,
                    code_bytes=status.code_bytes,
                    scale_bytes=status.scale_bytes,
                    checksum_bytes=checksum_bytes,
                    bound_bytes=sass.entropy_bound_bits(status.numel, status.kept, status.value_bits) / 8.0,
                    checksum=status.checksum,
                    value_bits=status.value_bits,
                )
            )
        for name in file.head_keys():
            shape, dtype = file.shape_and_dtype(KEY_PREFIX + name)
            size = math.prod(shape) * _DTYPE_BYTES.get(dtype, 4)
            report.full_precision.append(TensorReport(name, shape, _DTYPE_NAMES.get(dtype, dtype.lower()), size))
    return report
