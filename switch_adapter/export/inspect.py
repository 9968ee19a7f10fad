"""What a saved T-Switch adapter holds and what it costs, read from the safetensors file itself."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from safetensors import safe_open

from ..codec import sass
from ._switch_file import open_switch

_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "U8": "uint8", "I64": "int64"}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}


@dataclass
class UnitReport:
    """One switched parameter (``module.param``). Sizes in bytes; ``bytes`` = code + scales."""

    name: str
    shape: list[int]
    numel: int
    kept: int
    encoding: str
    code_bytes: int
    scale_bytes: int
    bound_bytes: float

    @property
    def bytes(self) -> int:
        return self.code_bytes + self.scale_bytes

    @property
    def density(self) -> float:
        return self.kept / self.numel if self.numel else 0.0

    @property
    def bits_per_parameter(self) -> float:
        return 8.0 * self.bytes / self.numel if self.numel else 0.0

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.numel

    @property
    def fp16_bytes(self) -> int:
        return 2 * self.numel

    @property
    def vs_bound(self) -> float:
        """Stored size over the entropy bound ``n H(k/n) + k`` bits (1.0 = at the bound)."""
        return self.bytes / self.bound_bytes if self.bound_bytes else math.inf

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values.update(
            bytes=self.bytes,
            density=self.density,
            bits_per_parameter=self.bits_per_parameter,
            fp32_bytes=self.fp32_bytes,
            fp16_bytes=self.fp16_bytes,
            vs_bound=self.vs_bound if math.isfinite(self.vs_bound) else None,
        )
        return values


@dataclass
class TensorReport:
    """A full-precision tensor stored with the switch (``modules_to_save``, e.g. a task head)."""

    name: str
    shape: list[int]
    dtype: str
    bytes: int


@dataclass
class InspectionReport:
    """Per-unit and total storage of a T-Switch adapter. ``to_table()`` for people, ``to_dict()`` for JSON."""

    source: str
    base_model: str | None
    task_type: str | None
    scale_granularity: str
    format_version: int
    file_bytes: int
    units: list[UnitReport] = field(default_factory=list)
    full_precision: list[TensorReport] = field(default_factory=list)

    # -- totals over the switched units -------------------------------------------------------------
    @property
    def numel(self) -> int:
        return sum(u.numel for u in self.units)

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
    def full_precision_bytes(self) -> int:
        return sum(t.bytes for t in self.full_precision)

    @property
    def density(self) -> float:
        return self.kept / self.numel if self.numel else 0.0

    @property
    def bits_per_parameter(self) -> float:
        return 8.0 * self.switch_bytes / self.numel if self.numel else 0.0

    @property
    def fraction_of_fp32(self) -> float:
        return self.switch_bytes / (4.0 * self.numel) if self.numel else 0.0

    @property
    def fraction_of_fp16(self) -> float:
        return self.switch_bytes / (2.0 * self.numel) if self.numel else 0.0

    @property
    def vs_bound(self) -> float:
        return self.switch_bytes / self.bound_bytes if self.bound_bytes else math.inf

    def totals(self) -> dict[str, Any]:
        return {
            "units": len(self.units),
            "numel": self.numel,
            "kept": self.kept,
            "density": self.density,
            "switch_bytes": self.switch_bytes,
            "bits_per_parameter": self.bits_per_parameter,
            "fp32_bytes": 4 * self.numel,
            "fp16_bytes": 2 * self.numel,
            "fraction_of_fp32": self.fraction_of_fp32,
            "fraction_of_fp16": self.fraction_of_fp16,
            "bound_bytes": self.bound_bytes,
            "vs_bound": self.vs_bound if math.isfinite(self.vs_bound) else None,
            "full_precision_tensors": len(self.full_precision),
            "full_precision_bytes": self.full_precision_bytes,
            "file_bytes": self.file_bytes,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-serialisable values."""
        return {
            "source": self.source,
            "base_model": self.base_model,
            "task_type": self.task_type,
            "scale_granularity": self.scale_granularity,
            "format_version": self.format_version,
            "totals": self.totals(),
            "units": [u.to_dict() for u in self.units],
            "full_precision": [asdict(t) for t in self.full_precision],
        }

    def to_table(self) -> str:
        """An aligned text table: one row per unit, then the totals and the full-precision tensors."""
        header = ["unit", "shape", "params", "kept", "density", "encoding", "bits/param", "bytes", "%fp32", "%fp16"]
        header.append("x bound")
        rows = [
            [
                u.name,
                "x".join(str(s) for s in u.shape),
                f"{u.numel:,}",
                f"{u.kept:,}",
                f"{u.density:.4f}",
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
            "",
            f"{self.bits_per_parameter:.3f}",
            f"{self.switch_bytes:,}",
            f"{100 * self.fraction_of_fp32:.2f}",
            f"{100 * self.fraction_of_fp16:.2f}",
            f"{self.vs_bound:.3f}",
        ]
        widths = [max(len(row[i]) for row in [header, total, *rows]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            first = cells[0].ljust(widths[0])
            middle = [cells[1].rjust(widths[1])] + [c.rjust(w) for c, w in zip(cells[2:5], widths[2:5])]
            rest = [cells[5].ljust(widths[5])] + [c.rjust(w) for c, w in zip(cells[6:], widths[6:])]
            return "  ".join([first, *middle, *rest]).rstrip()

        rule = "-" * len(line(header))
        lines = [
            f"T-Switch adapter: {self.source}",
            f"base model: {self.base_model or '(not recorded)'} | task type: {self.task_type or '-'} | "
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
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()


def inspect_adapter(
    path_or_repo: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> InspectionReport:
    """Per-unit storage of a T-Switch adapter (a folder or a Hub id): shape, entries, kept entries, density,
    encoding, bits per parameter, bytes vs fp32 / fp16 and vs the entropy bound, plus totals.

    Sizes come from the safetensors file (each code's header and length, each scale's dtype), not from the config.
    Raises ``FileNotFoundError`` for missing files, ``ValueError`` for another adapter type and
    :class:`~switch_adapter.CodecError` for a corrupt file.
    """
    switch = open_switch(path_or_repo, revision=revision, token=token)
    config = switch.config
    units, full_precision = [], []
    with safe_open(switch.weights_path, framework="pt") as handle:
        for unit in switch.units():
            code = handle.get_tensor(unit.code_key)
            try:
                header = sass.read_header(code)
            except sass.CodecError as error:
                raise sass.CodecError(f"{unit.code_key}: {error}") from None
            scale = handle.get_slice(unit.scale_key)
            scale_bytes = math.prod(scale.get_shape()) * _DTYPE_BYTES.get(scale.get_dtype(), 4)
            units.append(
                UnitReport(
                    name=unit.name,
                    shape=switch.shape_of(unit, header.numel),
                    numel=header.numel,
                    kept=header.kept,
                    encoding=header.encoding.name.lower(),
                    code_bytes=int(code.numel()),
                    scale_bytes=int(scale_bytes),
                    bound_bytes=sass.entropy_bound_bits(header.numel, header.kept) / 8.0,
                )
            )
        for name in switch.head_keys():
            tensor = handle.get_slice("base_model.model." + name)
            shape = [int(s) for s in tensor.get_shape()]
            dtype = tensor.get_dtype()
            size = math.prod(shape) * _DTYPE_BYTES.get(dtype, 4)
            full_precision.append(TensorReport(name, shape, _DTYPE_NAMES.get(dtype, dtype.lower()), size))
    task_type = config.task_type.value if hasattr(config.task_type, "value") else config.task_type
    return InspectionReport(
        source=switch.source,
        base_model=config.base_model_name_or_path,
        task_type=task_type,
        scale_granularity=config.scale_granularity,
        format_version=config.format_version,
        file_bytes=os.path.getsize(switch.weights_path),
        units=units,
        full_precision=full_precision,
    )
