"""One learnable unit: the task vector of one weight tensor with a learned keep count, bit-width and step.

Parameterisation (see docs/flexswitch.md):

* **Threshold (LGS)**: per sign, the log of the number of kept entries, ``log_kept``. Entries of a sign are ranked by
  magnitude (ties by position, as T-Switch does); the hard mask keeps the first ``round(exp(log_kept))``, a soft gate
  ``sigmoid((log_kept - log(rank + 1)) / T)`` carries the gradient (straight-through). A threshold in rank space is a
  magnitude threshold at the k-th largest entry; it starts exactly at T-Switch's per-sign quota.
* **Bit-width (BAS)**: logits over the candidate widths; the forward pass uses the argmax, the backward pass the
  softmax (straight-through). Values use the zero-free mid-rise quantiser with step ``D = exp(log_step[b])``:
  ``D * (clamp(floor(x / D), -2^(b-1), 2^(b-1) - 1) + 1/2)``, with an LSQ-style gradient for ``D``. For one bit it is
  ``(D / 2) * sign(x)``: T-Switch.
* Only ``candidates`` (the largest entries of each sign, up to ``candidate_fraction`` of it) are held, positive block
  then negative block, each in rank order, so a mask is two prefixes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..codec import sass
from ..codec.binarize import BinarySwitch, levels_of

_STEP_GRID = torch.linspace(0.2, 1.6, 29)
_GRID_SAMPLE = 16384  # kept values used to choose a starting step
_WINDOW = 8.0  # candidates up to exp(8 T) x the kept count get the gate's gradient; beyond it is below 1e-3


def quota(count: int, density: float) -> int:
    """T-Switch's kept count for a sign with ``count`` entries; a quota that rounds to 0 keeps the sign whole."""
    kept = int(math.floor(count * density))
    return count if kept == 0 else kept


def quantize(values: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero-free mid-rise quantiser with an LSQ-style straight-through gradient (to ``values`` and ``step``)."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scaled = values / step
    level = torch.clamp(torch.floor(scaled.detach()), low, high) + 0.5
    clipped = torch.clamp(scaled, low, high + 1)
    return step * (clipped + (level - clipped).detach())


def position_bits(numel: float, kept: torch.Tensor) -> torch.Tensor:
    """Smooth estimate of the bits SASS needs for the positions of ``kept`` of ``numel`` entries (the cheaper of a
    bitmap and Elias-Fano coded positions or non-positions)."""
    kept = torch.clamp(kept, min=1e-3)
    rest = torch.clamp(numel - kept, min=1e-3)
    bitmap = torch.full_like(kept, float(numel))
    positions = kept * (2 + torch.log2(numel / kept))
    complement = rest * (2 + torch.log2(numel / rest))
    return torch.minimum(bitmap, torch.minimum(positions, complement))


class LearnableUnit(nn.Module):
    """The learnable switch of one tensor. ``forward(T)`` returns the values to add at ``self.index`` (flat
    positions of the candidates) and the estimated stored bits of the unit."""

    def __init__(
        self,
        name: str,
        task_vector: torch.Tensor,
        bit_widths: tuple[int, ...],
        init_density: float,
        candidate_fraction: float,
        freeze: tuple[str, ...] = (),
        init_bits: int | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.shape = tuple(task_vector.shape)
        flat = task_vector.detach().reshape(-1).float()
        self.numel = flat.numel()
        self.bit_widths = bit_widths
        blocks, sizes, quotas = [], [], []
        for part in (flat > 0, flat < 0):
            positions = torch.nonzero(part).reshape(-1)
            count = positions.numel()
            kept = quota(count, init_density) if count else 0
            limit = max(kept, min(count, math.ceil(count * candidate_fraction)))
            # magnitude descending, position ascending on ties: a stable sort of the (ascending) positions
            order = torch.sort(flat[positions].abs(), descending=True, stable=True).indices[:limit]
            blocks.append(positions[order])
            sizes.append(limit)
            quotas.append(kept)
        self.sizes = tuple(sizes)
        index = torch.cat(blocks)
        small = self.numel < 2**31  # int32 positions halve the memory of the candidates
        self.register_buffer("index", index.to(torch.int32) if small else index, persistent=False)
        self.register_buffer("values", flat[self.index], persistent=False)
        self.register_buffer("candidates", torch.tensor(sizes, dtype=torch.float32), persistent=False)
        log_kept = torch.log(torch.tensor([max(q, 1) for q in quotas], dtype=torch.float32))
        self.log_kept = nn.Parameter(log_kept, requires_grad="density" not in freeze)
        first = bit_widths[0] if init_bits is None else init_bits
        self.bit_logits = nn.Parameter(
            torch.tensor([1.0 if b == first else 0.0 for b in bit_widths]),
            requires_grad="bits" not in freeze and len(bit_widths) > 1,
        )
        norm = float(flat.norm())
        kept_values = self._kept(self.values, self._counts(0.0))
        initial = [self._initial_step(b, kept_values, norm) for b in bit_widths]
        if bit_widths[0] == 1 and kept_values.numel() and norm:  # T-Switch's "norm" scale, bit-exact as binarize has it
            initial[0] = 2.0 * float(torch.sqrt(flat.square().sum() / kept_values.numel()))
        self.initial_steps = initial  # exported as is when the scale is frozen (exp(log(step)) is not exact)
        self.log_step = nn.Parameter(torch.log(torch.tensor(initial)), requires_grad="scale" not in freeze)

    @staticmethod
    def _initial_step(bits: int, kept: torch.Tensor, norm: float) -> float:
        """A step with the least squared error on the kept values, rescaled so that the quantised kept values have
        the norm of the whole task vector (for one bit: T-Switch's "norm" scale, ``2 ||tau|| / sqrt(k)``)."""
        if kept.numel() == 0 or norm == 0.0:
            return 1e-8
        if bits == 1:
            return 2.0 * norm / math.sqrt(kept.numel())
        sample = kept[:: max(1, kept.numel() // _GRID_SAMPLE)]
        reference = float(sample.abs().max()) / 2 ** (bits - 1)
        errors = [
            float((quantize(sample, torch.tensor(reference * float(f)), bits) - sample).pow(2).sum())
            for f in _STEP_GRID
        ]
        step = reference * float(_STEP_GRID[int(torch.tensor(errors).argmin())])
        quantised_norm = float(quantize(kept, torch.tensor(step), bits).norm())
        return step * norm / max(quantised_norm, 1e-30)

    def _counts(self, shift: float) -> list[int]:
        """Hard kept count per sign, with the learned counts scaled by ``exp(shift)``."""
        counts = torch.round(torch.exp(self.log_kept.detach().cpu() + shift)).clamp(min=0.0)
        return [int(min(count, size)) for count, size in zip(counts.tolist(), self.sizes)]

    def _prefixes(self, tensor: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """The first ``lengths[s]`` entries of each sign's block of a candidate-aligned tensor."""
        return torch.cat([tensor[: lengths[0]], tensor[self.sizes[0] : self.sizes[0] + lengths[1]]])

    def _kept(self, tensor: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The kept entries of a candidate-aligned tensor: the two rank prefixes."""
        return self._prefixes(tensor, counts)

    def chosen_bits(self) -> int:
        return self.bit_widths[int(self.bit_logits.detach().argmax())]

    def forward(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(positions, values, estimated bits)``: the values to add at those flat positions (a window of candidates
        around the thresholds, where the gate's gradient is not negligible) and the unit's estimated size."""
        counts = self._counts(0.0)
        reach = torch.exp(self.log_kept.detach().cpu() + _WINDOW * temperature).tolist()
        windows = [min(size, max(count, math.ceil(r)) + 1) for size, count, r in zip(self.sizes, counts, reach)]
        index = self._prefixes(self.index, windows)
        raw = self._prefixes(self.values, windows)
        hard = torch.cat([(torch.arange(w, device=raw.device) < c) for w, c in zip(windows, counts)]).to(raw.dtype)
        thresholds = torch.cat([self.log_kept[0].expand(windows[0]), self.log_kept[1].expand(windows[1])])
        log_rank = torch.cat([torch.log1p(torch.arange(w, device=raw.device, dtype=raw.dtype)) for w in windows])
        gate = torch.sigmoid((thresholds - log_rank) / temperature)
        mask = hard + gate - gate.detach()
        steps = torch.exp(self.log_step)
        chosen = int(self.bit_logits.detach().argmax())
        values = quantize(raw, steps[chosen], self.bit_widths[chosen])
        soft = torch.softmax(self.bit_logits, dim=0)
        if self.bit_logits.requires_grad:  # straight-through gradient of the choice, from the kept entries
            kept = torch.cat([raw[: counts[0]], raw[windows[0] : windows[0] + counts[1]]])
            choice = sum(
                (soft[i] - soft[i].detach()) * quantize(kept, steps[i].detach(), b)
                for i, b in enumerate(self.bit_widths)
            )
            zeros = choice.new_zeros
            spread = [
                choice[: counts[0]],
                zeros(windows[0] - counts[0]),
                choice[counts[0] :],
                zeros(windows[1] - counts[1]),
            ]
            values = values + torch.cat(spread)
        count = sum(counts) + (torch.exp(self.log_kept) - torch.exp(self.log_kept).detach()).sum()
        widths = torch.tensor(self.bit_widths, dtype=soft.dtype, device=soft.device)
        bits = self.bit_widths[chosen] + ((soft - soft.detach()) * widths).sum()
        return index, mask * values, position_bits(float(self.numel), count) + count * bits

    @torch.no_grad()
    def exact_bytes(self, shift: float = 0.0) -> int:
        """Bytes of the encoded switch (SASS' cheapest encoding) with the kept counts scaled by ``exp(shift)``."""
        kept = sum(self._counts(shift))
        return -(-min(sass.encoded_sizes_for_counts(self.numel, kept, value_bits=self.chosen_bits()).values()) // 8)

    @torch.no_grad()
    def export(self, shift: float = 0.0) -> BinarySwitch:
        """The learned switch, with the kept counts scaled by ``exp(shift)`` (used to meet the budget exactly)."""
        counts = self._counts(shift)
        positions = self._kept(self.index, counts).cpu().long()
        order = torch.argsort(positions)
        positions, kept_values = positions[order], self._kept(self.values, counts).cpu()[order]
        bits = self.chosen_bits()
        index = self.bit_widths.index(bits)
        step = self.initial_steps[index]
        if self.log_step.requires_grad:
            step = float(torch.exp(self.log_step.detach()[index]))
        mask = torch.zeros(self.numel, dtype=torch.bool)
        mask[positions] = True
        levels = levels_of(kept_values, step, bits)
        return BinarySwitch(
            mask=mask,
            positive=levels >= 2 ** (bits - 1),
            scale=torch.tensor([step / 2.0], dtype=torch.float32),
            shape=torch.Size(self.shape),
            **({"value_bits": bits, "levels": levels} if bits > 1 else {}),
        )
