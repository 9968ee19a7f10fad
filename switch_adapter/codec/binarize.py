"""T-Switch binarization: one task-vector tensor -> activation mask, polarity and scale.

The rules follow the reference implementation of "Less is More: Efficient Model Merging with Binary Task
Switch" (CVPR 2025):

* positive and negative entries are ranked separately; with keep ratio ``density`` the top
  ``floor(n_pos * density)`` positive entries by value and the top ``floor(n_neg * density)`` negative entries
  by magnitude are kept;
* exactly the quota is kept: entries tied at the cut are taken in position order (lowest flat index first), so
  the size of a switch follows from its density; ``keep_ties=True`` keeps every tie instead, as the reference does
  (``>= threshold``; more than the quota survives when many entries share the cut value);
* a sign partition whose quota rounds to zero is kept whole;
* zeros are never kept;
* one scale per tensor, or one per output row (dim 0) with ``scale_granularity="row"``.

Two scale rules: ``scale_rule="norm"`` (the default) is ``||tau|| / ||S_A * S_P||``, so the reconstruction keeps the
norm of the whole task vector (dropped entries included); ``scale_rule="rms"`` is the reference's scale, the RMS of
the kept entries, ``||S_A * tau|| / ||S_A * S_P||``. On MiniLM fine-tunes "norm" kept more of the individual accuracy
at low densities and as much at high ones (``python -m benchmarks.density_sweep``; figures at ``DEFAULT_DENSITY`` in
``switch_adapter/tswitch/config.py``).

Reconstruction is ``tau_hat = scale * mask * sign``. A :class:`BinarySwitch` can also hold multi-bit units (FlexSwitch):
``value_bits`` in 1, 2, 4, 8 and one level ``u`` per kept entry, whose value is ``scale * (2u - (2**b - 1))``; a
T-Switch is the case ``value_bits=1``, where the level is the sign bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from . import sass
from .kernels import numba_codec
from .sass import check_value_bits, level_multipliers

SCALE_GRANULARITIES = ("tensor", "row")
SCALE_RULES = ("rms", "norm")


@dataclass
class BinarySwitch:
    """A switch of one task-vector tensor: keep-mask, values of the kept entries and scale.

    ``mask`` is a flat bool tensor over all ``numel`` positions (row-major), ``positive`` is a flat bool tensor
    holding the sign of each kept entry in position order (``True`` for a positive value), and ``scale`` is a float32
    tensor of shape ``(1,)`` (tensor granularity) or ``(shape[0],)`` (row granularity).

    ``value_bits`` (1, 2, 4 or 8) is the number of bits per kept value. ``levels`` is None for 1 bit (``positive``
    then holds the levels: the sign bit) or a uint8 tensor with one level ``u`` in ``[0, 2**b - 1]`` per kept entry,
    in position order; then ``positive`` must equal ``levels >= 2**(b - 1)`` (:meth:`from_levels` derives it). A
    kept entry's value is ``scale * (2u - (2**b - 1))`` (see :attr:`multipliers`).
    """

    mask: torch.Tensor
    positive: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size
    value_bits: int = 1
    levels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_value_bits(self.value_bits)
        if self.levels is None and self.value_bits != 1:
            raise ValueError(f"a switch with value_bits={self.value_bits} needs levels (uint8, one per kept entry).")
        if self.levels is not None and (self.levels.dtype != torch.uint8 or self.levels.numel() != self.kept):
            raise ValueError(
                f"levels must be a uint8 tensor with one level per kept entry ({self.kept}), got a "
                f"{self.levels.dtype} tensor of {self.levels.numel()} entries."
            )

    @classmethod
    def from_levels(
        cls, mask: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor, shape: torch.Size, value_bits: int
    ) -> BinarySwitch:
        """A switch from its mask, uint8 ``levels`` (one per kept entry) and scale; ``positive`` is derived. With
        ``value_bits=1`` the levels become ``positive`` and ``levels`` stays None (a plain T-Switch)."""
        check_value_bits(value_bits)
        levels = levels.reshape(-1).to(torch.uint8)
        positive = levels >= 1 << (value_bits - 1)
        kept_levels = None if value_bits == 1 else levels
        return cls(mask=mask, positive=positive, scale=scale, shape=shape, value_bits=value_bits, levels=kept_levels)

    @property
    def numel(self) -> int:
        return self.mask.numel()

    @property
    def kept(self) -> int:
        return self.positive.numel()

    @property
    def multipliers(self) -> torch.Tensor:
        """The odd integer ``2u - (2**b - 1)`` of every kept entry (int16; ``+-1`` for 1 bit): value = scale * it."""
        levels = self.positive if self.levels is None else self.levels
        return level_multipliers(levels, self.value_bits)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return ``scale * multipliers`` at the kept positions (``scale * mask * sign`` for 1 bit) as a dense tensor
        of ``shape``."""
        values = torch.zeros(self.numel, dtype=dtype, device=self.mask.device)
        values[self.mask] = self.multipliers.to(device=values.device, dtype=dtype)
        values = values.view(self.shape)
        return values * broadcast_scale(self.scale.to(device=values.device, dtype=dtype), self.shape)


def broadcast_scale(scale: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """View a ``(1,)`` or ``(rows,)`` scale so that it broadcasts against a tensor of ``shape``."""
    if scale.numel() == 1 or len(shape) == 0:
        return scale.reshape(())
    return scale.reshape((-1,) + (1,) * (len(shape) - 1))


def _select(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``flat[mask]`` (a copy, in position order). On the CPU through numpy, which copies the selected values
    directly; torch's boolean indexing first builds int64 indices of all of them (8 bytes per selected entry)."""
    if flat.device.type == "cpu" and flat.dtype == torch.float32 and flat.is_contiguous():
        return torch.from_numpy(flat.numpy()[mask.numpy()])
    return flat[mask]


def _quota(count: int, density: float) -> int:
    """``floor(count * density)``: the number of entries of one sign that a switch keeps."""
    return int(count * density)  # floor for non-negative numbers


def _threshold(magnitudes: torch.Tensor, density: float) -> torch.Tensor | None:
    """Cut for the top ``floor(len * density)`` of 1-D ``magnitudes``; None keeps them all."""
    count = magnitudes.numel()
    quota = _quota(count, density)
    if count == 0 or quota == 0 or quota >= count:
        return None
    if magnitudes.device.type == "cpu" and magnitudes.dtype == torch.float32:
        # The same order statistic with numpy's introselect, in place on the caller's scratch copy: torch.kthvalue
        # would allocate a copy and int64 indices for every entry (12 bytes per entry at the peak).
        index = count - quota
        array = magnitudes.numpy()
        array.partition(index)
        return torch.tensor(array[index])
    # kthvalue works on float32/float64 on every device and avoids a full sort.
    return torch.kthvalue(magnitudes, count - quota + 1).values


def binarize(
    task_vector: torch.Tensor,
    density: float,
    scale_granularity: str = "tensor",
    name: str = "tensor",
    scale_rule: str = "norm",
    keep_ties: bool = False,
) -> BinarySwitch:
    """Binarize one task-vector tensor with the T-Switch rules (see the module docstring); ``scale_rule`` is
    ``"norm"`` (default) or ``"rms"`` (the reference).

    Computes in float32 whatever the input dtype. Raises ``ValueError`` for a density outside (0, 1], an
    unknown granularity, or a tensor holding NaN/Inf (``name`` goes into the message).
    """
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density} for {name}.")
    if scale_granularity not in SCALE_GRANULARITIES:
        raise ValueError(f"scale_granularity must be one of {SCALE_GRANULARITIES}, got {scale_granularity!r}.")
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {scale_rule!r}.")
    tau = task_vector.detach().to(torch.float32)
    shape = tau.shape
    flat = tau.reshape(-1)
    if not _all_finite(flat):
        bad = int((~torch.isfinite(flat)).sum())
        raise ValueError(
            f"The task vector of {name} holds {bad} NaN/Inf value(s); check the fine-tuned checkpoint "
            "(a diverged run or a broken file) before converting it."
        )
    if flat.device.type == "cpu" and flat.is_contiguous():
        mask, kept_values = _keep_numpy(flat, density, keep_ties)
    else:
        mask, kept_values = _keep_torch(flat, density, keep_ties)
    positive = torch.from_numpy(kept_values.numpy() > 0) if kept_values.device.type == "cpu" else kept_values > 0
    scale = _scale(flat, mask, kept_values, shape, scale_granularity, scale_rule)
    return BinarySwitch(mask=mask, positive=positive, scale=scale, shape=shape)


def _all_finite(flat: torch.Tensor) -> bool:
    """Whether the flat float32 ``flat`` holds no NaN/Inf (numpy on the CPU, where it is much faster)."""
    if flat.device.type == "cpu" and flat.is_contiguous():
        return bool(np.isfinite(flat.numpy()).all())
    # One reduction instead of a full isfinite pass: NaN and Inf propagate into the sum.
    return bool(torch.isfinite(flat.abs().sum())) or bool(torch.isfinite(flat).all())


def _keep_torch(flat: torch.Tensor, density: float, keep_ties: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, kept values)`` of the flat float32 ``flat`` with torch ops (any device)."""
    positive_side = flat > 0
    negative_side = flat < 0
    quotas = (_quota(int(positive_side.sum()), density), _quota(int(negative_side.sum()), density))
    # _threshold may reorder its argument: both are scratch copies.
    cut_positive = _threshold(_select(flat, positive_side), density)
    cut_negative = _threshold(_select(flat, negative_side).neg_(), density)
    # In place, so that only two full-size bool tensors live at a time.
    if cut_positive is not None:
        positive_side &= flat >= cut_positive
        if not keep_ties:
            _drop_excess_ties(positive_side, flat == cut_positive, quotas[0])
    if cut_negative is not None:
        negative_side &= flat <= -cut_negative
        if not keep_ties:
            _drop_excess_ties(negative_side, flat == -cut_negative, quotas[1])
    mask = positive_side.logical_or_(negative_side)
    del negative_side
    kept_values = _select(flat, mask)
    return mask, kept_values


def _cuts_numpy(
    array: np.ndarray, quotas: tuple[int, int], counts: tuple[int, int]
) -> tuple[float | None, float | None]:
    """The positive cut (the ``quotas[0]``-th largest positive value) and the negative cut (the ``quotas[1]``-th
    smallest negative value) of ``array``, None where a sign is kept whole. Each partitions a copy of one sign only,
    as the torch route does, so that the peak memory stays that of half the tensor."""
    cut_positive = cut_negative = None
    if 0 < quotas[0] < counts[0]:
        positives = array[array > 0]
        positives.partition(counts[0] - quotas[0])
        cut_positive = positives[counts[0] - quotas[0]]
        del positives
    if 0 < quotas[1] < counts[1]:
        negatives = array[array < 0]
        negatives.partition(quotas[1] - 1)
        cut_negative = negatives[quotas[1] - 1]
    return cut_positive, cut_negative


def _keep_numpy(flat: torch.Tensor, density: float, keep_ties: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_keep_torch` on the CPU with numpy in fewer passes: one partition for both cuts, the mask built once.

    Bit-identical to the torch route: the same cuts (order statistics do not depend on the algorithm), the same
    tie-break by position and the same kept values."""
    array = flat.numpy()
    counts = (int(np.count_nonzero(array > 0)), int(np.count_nonzero(array < 0)))
    quotas = (_quota(counts[0], density), _quota(counts[1], density))
    cut_positive, cut_negative = _cuts_numpy(array, quotas, counts)
    mask = array > 0 if cut_positive is None else array >= cut_positive
    mask |= array < 0 if cut_negative is None else array <= cut_negative
    kept_values = array[mask]
    if not keep_ties:
        kept_positive = int(np.count_nonzero(kept_values > 0))
        dropped = _drop_ties_numpy(array, mask, cut_positive, kept_positive - quotas[0])
        dropped |= _drop_ties_numpy(array, mask, cut_negative, kept_values.size - kept_positive - quotas[1])
        if dropped:
            kept_values = array[mask]
    return torch.from_numpy(mask), torch.from_numpy(kept_values)


def _drop_ties_numpy(array: np.ndarray, mask: np.ndarray, cut: float | None, excess: int) -> bool:
    """Unkeep (in place) the last ``excess`` entries of ``mask`` equal to ``cut``; whether any were dropped."""
    if cut is None or excess <= 0:
        return False
    tied = np.flatnonzero(array == cut)
    mask[tied[tied.size - excess :]] = False
    return True


def _drop_excess_ties(side: torch.Tensor, at_cut: torch.Tensor, quota: int) -> None:
    """Unkeep (in place) the entries of ``side`` that tie at the cut beyond ``quota``, highest positions first."""
    excess = int(side.sum()) - quota
    if excess <= 0:
        return
    tied = torch.nonzero(side & at_cut).reshape(-1)
    side[tied[tied.numel() - excess :]] = False


def _scale(
    flat: torch.Tensor,
    mask: torch.Tensor,
    kept_values: torch.Tensor,
    shape: torch.Size,
    granularity: str,
    rule: str,
) -> torch.Tensor:
    """``sqrt(sum of squares / kept)`` per tensor or row; the squares of the kept entries ("rms") or of all ("norm")."""
    if granularity == "row" and len(shape) >= 1 and shape[0] > 0:
        rows = shape[0]
        squares = flat * flat if rule == "norm" else torch.where(mask, flat * flat, torch.zeros((), dtype=flat.dtype))
        sums = squares.view(rows, -1).sum(dim=1)
        counts = mask.view(rows, -1).sum(dim=1)
        return torch.where(counts > 0, torch.sqrt(sums / counts.clamp(min=1)), torch.zeros_like(sums))
    if kept_values.numel() == 0:
        return torch.zeros(1, dtype=torch.float32, device=flat.device)
    squares = flat.square().sum() if rule == "norm" else kept_values.square().sum()
    return torch.sqrt(squares / kept_values.numel()).reshape(1)


def binarize_encoded(
    task_vector: torch.Tensor,
    density: float,
    scale_granularity: str = "tensor",
    name: str = "tensor",
    scale_rule: str = "norm",
    keep_ties: bool = False,
    *,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blob, scale)``: the SASS blob (:func:`switch_adapter.codec.sass.encode`) and the scale of
    :func:`binarize` of ``task_vector``, byte for byte and bit for bit, without building the mask.

    With the numba kernels, for a CPU tensor (as float32) and one scale per tensor, the cuts come from two histogram
    passes over the float32 bit patterns (no sort, no copy) and one more pass writes the blob; everything else (and
    every error: density, NaN/Inf, ...) goes through :func:`binarize` + ``encode``. ``overwrite=True`` lets the
    fast path square a float32 ``task_vector`` in place for the scale (the caller's scratch buffer: no copy)."""
    fast = _binarize_encoded_fast(task_vector, density, scale_granularity, scale_rule, keep_ties, overwrite)
    if fast is not None:
        return fast
    switch = binarize(task_vector, density, scale_granularity, name, scale_rule, keep_ties)
    blob = sass.encode(switch.mask, switch.positive, value_bits=switch.value_bits, levels=switch.levels)
    return blob, switch.scale


_HIGH_BINS = 1 << 16


def _cut(
    kernels: ModuleType, high: np.ndarray, count: int, quota: int, low: np.ndarray | None, top: int
) -> tuple[int, int, int]:
    """``(cut, above, ties)`` of one sign from its magnitude-bit histograms: the bit pattern of the ``quota``-th
    largest magnitude, the entries strictly above it and those equal to it; ``(0, count, 0)`` keeps the sign whole.
    Without ``low`` (the low-bit histogram of the cut's bin) the cut is only the bin. ``top``: no entries above."""
    if quota == 0 or quota >= count:
        return 0, count, 0
    bin_index, above = kernels.top_rank(high, quota, top >> 16)
    if low is None:
        return int(bin_index), int(above), 0
    low_index, low_above = kernels.top_rank(low, quota - above, _HIGH_BINS - 1)
    return (int(bin_index) << 16) | int(low_index), int(above + low_above), int(low[low_index])


def _binarize_encoded_fast(
    task_vector: torch.Tensor,
    density: float,
    scale_granularity: str,
    scale_rule: str,
    keep_ties: bool,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`binarize_encoded` through the numba kernels; None where they do not apply or something needs the
    reference path (its checks and error messages)."""
    kernels = numba_codec()
    if (
        kernels is None
        or task_vector.device.type != "cpu"
        or scale_granularity != "tensor"
        or scale_rule not in SCALE_RULES
        or not 0.0 < float(density) <= 1.0
    ):
        return None
    flat = task_vector.detach().to(torch.float32).reshape(-1)
    if not flat.is_contiguous() or flat.numel() == 0:
        return None
    bits = flat.numpy().view(np.uint32)
    highs = np.zeros(_HIGH_BINS, dtype=np.int64)  # indexed by an entry's high 16 bits: sign, then magnitude
    largest = int(kernels.sign_histograms(bits, highs))
    highs = highs.reshape(2, _HIGH_BINS // 2)  # [sign, high 16 bits of the magnitude] (magnitudes are below 2**31)
    if largest >= 0x7F800000:  # NaN/Inf: the reference path raises the error
        return None
    counts = (int(highs[0].sum()), int(highs[1].sum()))  # nonzero positive and negative entries
    quotas = (_quota(counts[0], density), _quota(counts[1], density))
    partial = [0 < quotas[side] < counts[side] for side in (0, 1)]
    lows = np.zeros((2, _HIGH_BINS), dtype=np.int64)
    if any(partial):
        coarse = [_cut(kernels, highs[side], counts[side], quotas[side], None, largest)[0] for side in (0, 1)]
        bins = np.array([coarse[side] if partial[side] else -1 for side in (0, 1)], dtype=np.int64)
        kernels.low_histograms(bits, bins, lows)
    cuts, ties, kept = [], [], 0
    for side in (0, 1):
        low = lows[side] if partial[side] else None
        cut, above, tied = _cut(kernels, highs[side], counts[side], quotas[side], low, largest)
        keep_tied = tied if keep_ties or not partial[side] else quotas[side] - above
        cuts.append(cut)
        ties.append(keep_tied)
        kept += above + keep_tied
    kept_bits = np.empty(kept, dtype=np.uint32) if scale_rule == "rms" else None
    blob = sass.encode_signs_fast(bits, (cuts[0], cuts[1]), (ties[0], ties[1]), kept, kept_bits)
    if blob is None:
        return None
    if kept == 0:
        return blob, torch.zeros(1, dtype=torch.float32)
    if kept_bits is not None:
        squares = torch.from_numpy(kept_bits.view(np.float32)).square().sum()
    elif overwrite and task_vector.dtype == torch.float32:
        kernels.square_in_place(flat.numpy())  # flat.square()'s values without a copy or torch's thread pool
        squares = flat.sum()
    else:
        squares = flat.square().sum()
    return blob, torch.sqrt(squares / kept).reshape(1)


def levels_of(values: torch.Tensor, step: float | torch.Tensor, bits: int) -> torch.Tensor:
    """Stored level ``u`` in ``[0, 2^b - 1]`` of every value under the zero-free mid-rise quantiser of step ``step``
    (a number, or a tensor that broadcasts against ``values``): its value is ``(step / 2) * (2u - 2^b + 1)``."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return (torch.clamp(torch.floor(values / step), low, high) - low).to(torch.uint8)


# Steps tried by :func:`quantize`, as fractions of ``max |kept value| / 2**(b - 1)`` (the step whose top level reaches
# the largest value); the one with the least squared error is taken per row (or tensor).
_STEP_FRACTIONS = torch.linspace(0.25, 1.0, 16)


def quantize(
    task_vector: torch.Tensor,
    density: float,
    value_bits: int,
    scale_granularity: str = "tensor",
    name: str = "tensor",
    scale_rule: str = "norm",
    keep_ties: bool = False,
) -> BinarySwitch:
    """A switch of ``task_vector`` with ``value_bits`` bits per kept value: T-Switch's mask (the same entries
    :func:`binarize` keeps at ``density``) and the levels of a zero-free mid-rise quantiser whose step is chosen per
    tensor or per row (``scale_granularity``) for the least squared error on the kept entries. ``value_bits=1`` is
    :func:`binarize` itself (``scale_rule`` then applies)."""
    switch = binarize(task_vector, density, scale_granularity, name, scale_rule, keep_ties)
    if check_value_bits(value_bits) == 1:
        return switch
    shape = switch.shape
    rows = shape[0] if scale_granularity == "row" and len(shape) >= 1 and shape[0] > 0 else 1
    kept = task_vector.detach().to(torch.float32).reshape(rows, -1)
    mask = switch.mask.view(rows, -1).to(kept.device)
    kept = torch.where(mask, kept, torch.zeros((), dtype=kept.dtype, device=kept.device))
    peak = kept.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    steps = peak * _STEP_FRACTIONS.to(kept.device) / (1 << (value_bits - 1))  # [rows, candidates]
    best_error, best_step = None, None
    for column in range(steps.shape[1]):
        step = steps[:, column : column + 1]
        values = step / 2 * level_multipliers(levels_of(kept, step, value_bits), value_bits)
        error = torch.where(mask, (values - kept).square(), torch.zeros((), device=kept.device)).sum(1)
        if best_error is None:
            best_error, best_step = error, step.clone()
        else:
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_step = torch.where(better.unsqueeze(1), step, best_step)
    levels = levels_of(kept, best_step, value_bits)
    scale = (best_step / 2).reshape(-1).cpu()
    return BinarySwitch.from_levels(switch.mask, levels[mask].cpu(), scale, shape, value_bits)
