"""What a conversion produced: the figures a user checks before sharing a switch."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..format import SizeFigures


@dataclass
class SkippedTensor:
    """A checkpoint tensor that is not in the switch, and why."""

    name: str
    reason: str


@dataclass
class ConversionSummary(SizeFigures):
    """Result of :func:`~switch_adapter.convert_finetuned` / :func:`~switch_adapter.convert_lora`.

    ``units`` / ``parameters`` / ``kept`` / ``switch_bytes`` describe the switches (codes plus fp32 scales), as
    :func:`~switch_adapter.storage_summary` computes them from the written ``adapter_config.json``. ``heads`` lists
    the modules stored in full precision (``modules_to_save``) and ``head_bytes`` their size; ``statistics`` the norm
    layers (BatchNorm) whose fine-tuned running statistics the adapter carries, ``statistics_bytes`` their size.
    ``skipped`` names every checkpoint tensor that is not in the adapter with the reason; ``unchanged`` counts targeted
    tensors equal in both models (they get no switch). ``mode`` is ``"finetuned"``, ``"lora-delta"`` or
    ``"lora-factors"``.
    """

    output_dir: str
    mode: str
    units: int
    parameters: int
    kept: int
    switch_bytes: int
    bound_bytes: float
    value_bits_kept: int = 0
    tensors_read: int = 0
    unchanged: int = 0
    heads: list[str] = field(default_factory=list)
    head_bytes: int = 0
    skipped: list[SkippedTensor] = field(default_factory=list)
    statistics: list[str] = field(default_factory=list)  # norm layers whose running statistics are carried
    statistics_bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"T-Switch written to {self.output_dir} ({self.mode}, {self.seconds:.1f} s)",
            f"  switched tensors   {self.units:,} ({self.parameters:,} parameters; {self.unchanged} targeted tensors "
            "unchanged, no switch)",
            f"  kept entries       {self.kept:,} (density {self.density:.4f})",
            f"  switch size        {self.switch_bytes:,} bytes = {self.bits_per_parameter:.3f} bits/parameter = "
            f"{100 * self.fraction_of_fp32:.2f}% of fp32 (entropy bound {self.bound_bytes:,.0f} bytes)",
        ]
        if self.mean_value_bits > 1:
            lines.append(f"  value bits         {self.mean_value_bits:.2f} per kept entry (mean)")
        if self.heads:
            lines.append(f"  full precision     {', '.join(self.heads)} ({self.head_bytes:,} bytes)")
        if self.statistics:
            lines.append(
                f"  norm statistics    {len(self.statistics)} layer{'s' if len(self.statistics) != 1 else ''}, "
                "running mean and variance carried exactly "
                f"({self.statistics_bytes:,} bytes)"
            )
        if self.skipped:
            lines.append(f"  skipped tensors    {len(self.skipped)}:")
            for item in self.skipped[:12]:
                lines.append(f"    {item.name}: {item.reason}")
            if len(self.skipped) > 12:
                lines.append(f"    ... and {len(self.skipped) - 12} more (see summary.skipped)")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)
