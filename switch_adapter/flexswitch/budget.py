"""Exact sizes of the adapter file FlexSwitch writes, known before it is written, and meeting the budget."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from safetensors.torch import save as safetensors_bytes

from ..codec import sass
from ..errors import BudgetError
from ..format import Unit
from .config import Budget
from .unit import quota

#: The saved file lies in ``[1 - SIZE_TOLERANCE, 1]`` times the budget.
SIZE_TOLERANCE = 0.05
UnitKey = tuple[str, str]  # (module name, parameter name)
Counts = Mapping[UnitKey, tuple[int, int, int]]  # (positive, negative, numel) of each task vector


def code_bytes(numel: int, kept: int, value_bits: int = 1) -> int:
    """Bytes of a unit's code in SASS' cheapest encoding."""
    return -(-min(sass.encoded_sizes_for_counts(numel, kept, value_bits=value_bits).values()) // 8)


class FileSize:
    """``FileSize(template)(codes)``: the exact size of ``adapter_model.safetensors`` whose code tensors have the given
    byte counts and whose other tensors (scales, checksums, heads) are those of ``template`` (the adapter's state dict):
    the safetensors serialisation of placeholders of the same names, dtypes and shapes."""

    def __init__(self, template: Mapping[str, torch.Tensor]) -> None:
        self.template = {key: torch.zeros_like(value, device="cpu") for key, value in template.items()}

    def __call__(self, codes: Mapping[UnitKey, int]) -> int:
        sizes = {Unit(module, param).key("code"): count for (module, param), count in codes.items()}
        placeholders = {
            key: torch.zeros(sizes[key], dtype=torch.uint8) if key in sizes else value
            for key, value in self.template.items()
        }
        return len(safetensors_bytes(placeholders, metadata={"format": "pt"}))


def check_budget(budget: Budget, budget_bytes: int, file_size: FileSize, counts: Counts) -> None:
    """Raise :class:`~switch_adapter.BudgetError` for a budget below the smallest file (empty codes) or not below the
    fp32 task vector, with the reachable sizes."""
    parameters = sum(numel for _, _, numel in counts.values())
    smallest = file_size({key: code_bytes(numel, 0) for key, (_, _, numel) in counts.items()})
    fp32 = 4 * parameters
    if budget_bytes < smallest:
        raise BudgetError(
            f"The budget {budget.text!r} ({budget_bytes:,} bytes) is smaller than the smallest switch of this model: "
            f"{smallest:,} bytes ({100 * smallest / fp32:.3f}% of fp32, {8 * smallest / parameters:.4f} bits per "
            f"parameter) for the file's headers, {len(counts)} switched tensors and the full-precision heads. Ask for "
            "more, or switch fewer tensors (target_modules / exclude_modules)."
        )
    if budget_bytes >= fp32:
        raise BudgetError(
            f"The budget {budget.text!r} ({budget_bytes:,} bytes) is not smaller than the fp32 task vector of the "
            f"{parameters:,} switched parameters ({fp32:,} bytes): there is nothing to compress. Ask for less than "
            "100% of fp32 (FlexSwitch is meant for about 0.2-3%)."
        )


def kept_count(positive: int, negative: int, density: float) -> int:
    """Entries a unit with ``positive`` / ``negative`` non-zero entries keeps at ``density`` (T-Switch's quota per
    sign)."""
    return (quota(positive, density) if positive else 0) + (quota(negative, density) if negative else 0)


def uniform_density(file_size: FileSize, counts: Counts, budget_bytes: int) -> float:
    """The largest density whose one-bit T-Switch fits the budget (bisection on exact sizes, log scale)."""

    def size(density: float) -> int:
        codes = {}
        for key, (positive, negative, numel) in counts.items():
            codes[key] = code_bytes(numel, kept_count(positive, negative, density))
        return file_size(codes)

    low, high = 1e-6, 1.0
    if size(high) <= budget_bytes:
        return high
    for _ in range(30):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if size(middle) <= budget_bytes else (low, middle)
    return low


def fit_shift(size_at: Callable[[float], int], budget_bytes: int) -> float:
    """The log scaling of every unit's kept counts that puts the file closest below the budget: 0 if the learned
    counts already give a file within the tolerance, else found by bisection (``size_at`` is monotonic)."""
    current = size_at(0.0)
    if (1 - SIZE_TOLERANCE) * budget_bytes <= current <= budget_bytes:
        return 0.0
    low, high = -30.0, 10.0
    if size_at(high) <= budget_bytes:
        return high
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if size_at(middle) <= budget_bytes else (low, middle)
    return low
