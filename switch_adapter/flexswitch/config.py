"""Settings of a FlexSwitch run: the storage budget, what is learned, and how."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError
from ..tswitch.config_checks import flag_problems, is_number, is_whole, selection_problems

BIT_WIDTHS = (1, 2, 4, 8)
LOSSES = ("auto", "kl", "mse")
FREEZABLE = ("density", "bits", "scale")
_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%|mb|mib|kb|kib|bits?|bpp|b)?\s*$", re.IGNORECASE)
_BYTES_PER_UNIT = {"mb": 1e6, "mib": 2**20, "kb": 1e3, "kib": 2**10, "b": 1}


@dataclass(frozen=True)
class Budget:
    """A parsed storage budget: ``kind`` is ``"bits"`` (bits per switched parameter), ``"percent"`` (of the fp32 task
    vector) or ``"bytes"`` (the whole adapter file)."""

    kind: Literal["bits", "percent", "bytes"]
    value: float
    text: str

    def target_bytes(self, parameters: int) -> int:
        """The size of ``adapter_model.safetensors`` this budget allows for a switch of ``parameters`` parameters."""
        if self.kind == "bytes":
            return int(self.value)
        if self.kind == "percent":
            return int(self.value / 100.0 * 4 * parameters)
        return int(self.value * parameters / 8)


def parse_budget(budget: float | str) -> Budget:
    """``0.16`` or ``"0.16 bits"`` (bits per parameter), ``"0.5%"`` (of fp32), ``"2MB"``/``"1.5 MiB"``/``"300kB"``
    (the file). Raises ``ValueError`` naming the accepted forms."""
    if isinstance(budget, bool):
        raise ValueError(f"budget must be a number or a string such as '0.5%', got {budget!r}.")
    if isinstance(budget, (int, float)):
        value, unit = float(budget), "bits"
    else:
        match = _BUDGET.match(str(budget))
        if not match:
            raise ValueError(
                f"Cannot read the budget {budget!r}. Use bits per parameter ('0.16' or '0.16bits'), a percentage of "
                "the fp32 task vector ('0.5%'), or a file size ('2MB', '1.5MiB', '300kB')."
            )
        value, unit = float(match.group(1)), (match.group(2) or "bits").lower()
    if not value > 0:
        raise ValueError(f"The budget must be positive, got {budget!r}.")
    if unit == "%":
        return Budget("percent", value, str(budget))
    if unit in ("bit", "bits", "bpp"):
        return Budget("bits", value, str(budget))
    return Budget("bytes", value * _BYTES_PER_UNIT[unit], str(budget))


@dataclass
class FlexSwitchConfig:
    """How :func:`~switch_adapter.flexswitch` learns a switch.

    Args:
        budget: Size of the saved ``adapter_model.safetensors`` (headers and ``modules_to_save`` heads included), as
            bits per switched parameter (a number or ``"0.16bits"``), a percentage of the fp32 task vector of the
            switched tensors (``"0.5%"``, the default) or a file size (``"2MB"``, ``"1.5MiB"``). The saved file is
            within 5% of it, or the call fails saying what the smallest reachable size is.
        bit_widths: Candidate bit-widths for the kept values of a unit; ``(1,)`` learns densities and scales only.
        steps: Optimisation steps (the run stops earlier once the size sits at the budget and the loss stopped
            improving).
        batch_size: Examples per step. max_length: Tokens per text example (longer ones are truncated).
        loss: ``"kl"`` (temperature-softened logits of the fine-tuned model), ``"mse"`` (its outputs, e.g. hidden
            states), or ``"auto"``: ``"kl"`` when the model returns ``logits`` (or a 2-D tensor), else ``"mse"``.
        distill_temperature: Temperature of the KL loss.
        lr: Adam learning rate of the per-unit thresholds (log kept counts) and bit-width logits.
        scale_lr: Adam learning rate of the per-unit quantiser steps (log scale).
        gate_temperature: Start and end width of the soft gate around each threshold (in log-rank units), annealed
            geometrically; the forward pass always uses the hard mask.
        init_density: Density every unit starts from (default: the uniform one-bit density that meets the budget,
            i.e. training starts from the T-Switch of that size).
        candidate_fraction: Largest density a unit can reach, per sign (default: four times the starting density,
            at least 0.2): only these entries are held during training.
        freeze: What not to learn, any of ``"density"``, ``"bits"``, ``"scale"``. With ``bit_widths=(1,)`` and
            ``freeze=("density", "scale")`` the result is the T-Switch of ``init_density``.
        lora_factors: For a LoRA fine-tune: learn each adapted weight as a low-rank pair, the LoRA's two factors (in
            balanced SVD form, every entry a candidate), as ``convert_lora(mode="factors")`` stores it (True, the
            default); False learns a sparse switch of each dense update ``scaling * B @ A``. The pairs start at
            density 1 with the most bits in ``bit_widths`` that fit the budget.
        target_modules, exclude_modules, modules_to_save, switch_bias, switch_norms, task_type: As in
            :class:`~switch_adapter.TSwitchConfig`. For a LoRA fine-tune, ``"all"`` (the default) means the LoRA's
            modules, and ``modules_to_save`` defaults to the LoRA's.
        text_column: Column of a ``datasets.Dataset`` that holds the text (default: ``"text"`` or its only string
            column).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"``, passed to ``accelerate``.
        gradient_accumulation_steps: Batches per optimisation step, passed to ``accelerate``.
        seed: Seeds the example order and torch; the same inputs and seed give the same switch.
    """

    budget: float | str = "0.5%"
    bit_widths: tuple[int, ...] = BIT_WIDTHS
    steps: int = 150
    batch_size: int = 16
    max_length: int = 128
    loss: Literal["auto", "kl", "mse"] = "auto"
    distill_temperature: float = 2.0
    lr: float = 0.05
    scale_lr: float = 0.01
    gate_temperature: tuple[float, float] = (0.5, 0.02)
    init_density: float | None = None
    candidate_fraction: float | None = None
    freeze: tuple[str, ...] = ()
    lora_factors: bool = True
    target_modules: list[str] | str | None = "all"
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    switch_bias: bool = True
    switch_norms: bool = False
    task_type: str | None = None
    text_column: str | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_accumulation_steps: int = 1
    seed: int = 0
    _budget: Budget = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._budget = parse_budget(self.budget)
        problems = self._problems()
        if problems:
            raise ConfigError("FlexSwitchConfig has settings of the wrong type or value:\n  " + "\n  ".join(problems))
        self.bit_widths = tuple(sorted(set(self.bit_widths)))
        self.freeze = tuple(self.freeze)

    def _problems(self) -> list[str]:
        """Every setting of the wrong type or value, one line each."""
        problems = selection_problems(self) + flag_problems(self, ("lora_factors",))
        widths = self.bit_widths
        if not isinstance(widths, (list, tuple, set)) or not widths or any(b not in BIT_WIDTHS for b in widths):
            problems.append(f"bit_widths must be a non-empty subset of {BIT_WIDTHS}, got {widths!r}")
        if not isinstance(self.freeze, (list, tuple, set)) or any(n not in FREEZABLE for n in self.freeze):
            problems.append(f"freeze accepts a list of {FREEZABLE}, got {self.freeze!r}")
        if self.loss not in LOSSES:
            problems.append(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name, least in (("steps", 0), ("batch_size", 1), ("max_length", 1), ("gradient_accumulation_steps", 1)):
            value = getattr(self, name)
            if not is_whole(value) or value < least:
                problems.append(f"{name} must be a whole number of at least {least}, got {value!r}")
        for name in ("distill_temperature", "lr", "scale_lr"):
            value = getattr(self, name)
            if not is_number(value) or not value > 0:
                problems.append(f"{name} must be a positive number, got {value!r}")
        for name in ("init_density", "candidate_fraction"):
            value = getattr(self, name)
            if value is not None and (not is_number(value) or not 0.0 < value <= 1.0):
                problems.append(f"{name} must be in (0, 1] or None, got {value!r}")
        gate = self.gate_temperature
        if not (isinstance(gate, (list, tuple)) and len(gate) == 2 and all(is_number(t) and t > 0 for t in gate)):
            problems.append(f"gate_temperature must be two positive numbers (start, end), got {gate!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            problems.append(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        for name in ("task_type", "text_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                problems.append(f"{name} must be a name or None, got {value!r}")
        if not is_whole(self.seed):
            problems.append(f"seed must be an integer, got {self.seed!r}")
        return problems

    @property
    def parsed_budget(self) -> Budget:
        return self._budget
