"""The merging methods the benchmark compares against, on task vectors ``{parameter name: finetuned - pretrained}``.

- Static merges (one model for all tasks): task arithmetic; TIES as in its original code (one magnitude threshold
  over each whole task vector); TIES with per-tensor trimming (``peft.utils.merge_utils``, an extra variant); and
  DARE, through ``peft.utils.merge_utils``.
- EMR-merging (Huang et al., NeurIPS 2024; needs the task id): a unified task vector (elected sign, largest
  agreeing magnitude per entry), one binary mask per task (where the task agrees with the unified sign) and one
  rescaler per task, ``tau_t ~= lambda_t * M_t * tau_uni`` with
  ``lambda_t = sum_tensors mean|tau_t| / sum_tensors mean|M_t * tau_uni|`` (per-tensor means, as in the
  official code).

Every function works tensor by tensor, so peak memory stays near one stacked tensor per call.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft.utils import merge_utils
from safetensors.torch import load_file, save_file

from switch_adapter._staging import staging_dir

TaskVector = dict[str, torch.Tensor]


def task_vector(
    pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], exclude: Sequence[str] = ()
) -> TaskVector:
    """``finetuned - pretrained`` (fp32) for every floating tensor of ``pretrained`` not under an ``exclude`` prefix."""
    vector = {}
    for name, base in pretrained.items():
        if not base.is_floating_point() or any(name.startswith(prefix) for prefix in exclude):
            continue
        if name not in finetuned:
            raise KeyError(f"The fine-tuned state has no tensor {name!r}: is it the same architecture?")
        tuned = finetuned[name]
        if tuned.shape != base.shape:
            raise ValueError(f"{name}: fine-tuned shape {tuple(tuned.shape)} != pre-trained {tuple(base.shape)}.")
        vector[name] = tuned.detach().float() - base.detach().float()
    return vector


def _check_same_keys(vectors: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    if not vectors:
        raise ValueError("Need at least one task vector to merge.")
    names = list(vectors[0])
    for index, vector in enumerate(vectors[1:], start=1):
        if set(vector) != set(names):
            missing = sorted(set(names) ^ set(vector))[:5]
            raise ValueError(f"Task vector {index} covers other tensors than task vector 0 (e.g. {missing}).")
    return names


def task_arithmetic(vectors: Sequence[Mapping[str, torch.Tensor]], scaling: float) -> TaskVector:
    """``scaling * sum_t tau_t`` per tensor (Ilharco et al., 2023)."""
    names = _check_same_keys(vectors)
    weights = torch.full((len(vectors),), float(scaling))
    return {name: merge_utils.task_arithmetic([v[name] for v in vectors], weights) for name in names}


def global_threshold(vector: Mapping[str, torch.Tensor], density: float) -> float:
    """The magnitude cut that keeps the top ``density`` of a whole task vector (all tensors together): the
    ``(n - floor(n * density))``-th smallest ``|entry|`` (1-based) over its ``n`` entries; entries ``>=`` it are kept
    (ties at the cut included), as in the original code, so ``floor(n * density) + 1`` entries survive when the
    magnitudes are distinct. 0.0 (keep everything) at density 1."""
    if not 0 < density <= 1:
        raise ValueError(f"TIES density must be in (0, 1], got {density}.")
    magnitudes = np.concatenate([t.detach().float().abs().reshape(-1).numpy() for t in vector.values()])
    rank = magnitudes.size - int(magnitudes.size * density)  # 1-based rank of the cut among ascending magnitudes
    if rank <= 0:
        return 0.0
    magnitudes.partition(rank - 1)
    return float(magnitudes[rank - 1])


def ties(vectors: Sequence[Mapping[str, torch.Tensor]], scaling: float, density: float = 0.2) -> TaskVector:
    """TIES-merging (Yadav et al., 2023) as its original code does it.

    1. Trim: per task, keep the entries whose magnitude reaches the task's :func:`global_threshold` (the top
       ``density`` of the whole task vector, not of each tensor).
    2. Elect: per entry the sign of the sum of the trimmed task vectors; where that sum is 0, the majority sign,
       i.e. the sign of the sum of all elected signs over the whole vector.
    3. Disjoint mean: per entry the mean of the trimmed values whose sign agrees with the elected one (0 if none),
       times ``scaling``.
    """
    names = _check_same_keys(vectors)
    cuts = [global_threshold(vector, density) for vector in vectors]

    def trimmed(name: str) -> torch.Tensor:
        stacked = torch.stack([vector[name].detach().float() for vector in vectors])
        keep = stacked.abs() >= torch.tensor(cuts).reshape((-1,) + (1,) * (stacked.dim() - 1))
        return stacked * keep

    majority = torch.sign(sum(torch.sign(trimmed(name).sum(dim=0)).sum(dtype=torch.float64) for name in names))
    merged: TaskVector = {}
    for name in names:
        values = trimmed(name)
        elected = torch.sign(values.sum(dim=0))
        elected[elected == 0] = majority.to(elected.dtype)
        agree = torch.where(elected > 0, values > 0, values < 0)
        selected = values * agree
        merged[name] = scaling * selected.sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    return merged


def ties_per_tensor(
    vectors: Sequence[Mapping[str, torch.Tensor]],
    scaling: float,
    density: float = 0.2,
    majority_sign_method: str = "total",
) -> TaskVector:
    """TIES with per-tensor trimming (``peft.utils.merge_utils.ties``, the variant ``add_weighted_adapter`` uses):
    keep the top ``density`` magnitudes of each tensor per task, elect the sign by total mass, average the entries
    that agree with it, times ``scaling``. Not the original: the quota is spent per tensor, on exact zeros too."""
    names = _check_same_keys(vectors)
    weights = torch.full((len(vectors),), float(scaling))
    return {
        name: merge_utils.ties([v[name] for v in vectors], weights, density, majority_sign_method) for name in names
    }


def dare(
    vectors: Sequence[Mapping[str, torch.Tensor]], scaling: float, density: float = 0.1, seed: int = 0
) -> TaskVector:
    """DARE (Yu et al., 2024) with task arithmetic: drop each entry with probability ``1 - density``, rescale the
    rest by ``1 / density``, then ``scaling * sum``. Deterministic for a given ``seed`` (the global RNG is restored)."""
    names = _check_same_keys(vectors)
    weights = torch.full((len(vectors),), float(scaling))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {name: merge_utils.dare_linear([v[name] for v in vectors], weights, density) for name in names}


@dataclass
class EMRMerge:
    """EMR-merging's parts: the unified task vector, per task a boolean mask per tensor and a rescaler."""

    unified: TaskVector
    masks: dict[str, dict[str, torch.Tensor]]
    rescalers: dict[str, float]

    def task_vector(self, task: str) -> TaskVector:
        """``lambda_t * M_t * tau_uni`` for ``task``."""
        if task not in self.masks:
            raise KeyError(f"EMR merge has no task {task!r}; it holds {sorted(self.masks)}.")
        scale = self.rescalers[task]
        return {name: value * self.masks[task][name] * scale for name, value in self.unified.items()}

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``unified.safetensors`` (fp32), ``masks.safetensors`` (1 bit per entry, packed) and
        ``rescalers.json`` to ``folder`` (written to a temporary folder first, then renamed)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(staging_dir(folder.parent, f".{folder.name}-"))
        try:
            save_file({name: t.contiguous() for name, t in self.unified.items()}, str(staging / "unified.safetensors"))
            packed = {
                f"{task}::{name}": torch.from_numpy(np.packbits(mask.reshape(-1).numpy().astype(bool)))
                for task, masks in self.masks.items()
                for name, mask in masks.items()
            }
            save_file(packed, str(staging / "masks.safetensors"))
            shapes = {name: list(value.shape) for name, value in self.unified.items()}
            meta = {"rescalers": self.rescalers, "tasks": list(self.masks), "shapes": shapes}
            (staging / "rescalers.json").write_text(json.dumps(meta, indent=2))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    @classmethod
    def load(cls, folder: str | os.PathLike) -> EMRMerge:
        folder = Path(folder)
        meta = json.loads((folder / "rescalers.json").read_text())
        unified = load_file(str(folder / "unified.safetensors"))
        packed = load_file(str(folder / "masks.safetensors"))
        masks: dict[str, dict[str, torch.Tensor]] = {task: {} for task in meta["tasks"]}
        for key, bits in packed.items():
            task, name = key.split("::", 1)
            shape = meta["shapes"][name]
            count = int(np.prod(shape)) if shape else 1
            flat = np.unpackbits(bits.numpy(), count=count).astype(bool)
            masks[task][name] = torch.from_numpy(flat).reshape(shape)
        return cls(unified, masks, {task: float(v) for task, v in meta["rescalers"].items()})


def emr_merge(vectors: Mapping[str, Mapping[str, torch.Tensor]]) -> EMRMerge:
    """EMR-merging of ``{task: task vector}``.

    Per entry: elected sign ``+1`` where ``sum_t tau_t > 0`` else ``-1``; unified magnitude ``max_t (sign * tau_t)``
    (the largest magnitude among the tasks that agree with the sign); mask ``M_t = tau_t * tau_uni > 0``; rescaler
    ``lambda_t = sum_tensors mean|tau_t| / sum_tensors mean|M_t * tau_uni|`` (1 when the masked unified vector is
    zero). The per-tensor means weight every tensor equally, as the official code does, whatever its size.
    """
    tasks = list(vectors)
    names = _check_same_keys([vectors[t] for t in tasks])
    unified: TaskVector = {}
    masks: dict[str, dict[str, torch.Tensor]] = {task: {} for task in tasks}
    numerator = dict.fromkeys(tasks, 0.0)
    denominator = dict.fromkeys(tasks, 0.0)
    for name in names:
        stacked = torch.stack([vectors[t][name].float() for t in tasks])
        sign = torch.where(stacked.sum(dim=0) > 0, 1.0, -1.0)
        magnitude = (stacked * sign).max(dim=0).values
        value = magnitude * sign
        unified[name] = value
        for index, task in enumerate(tasks):
            mask = stacked[index] * value > 0
            masks[task][name] = mask
            numerator[task] += float(stacked[index].abs().mean(dtype=torch.float64))
            denominator[task] += float((value.abs() * mask).mean(dtype=torch.float64))
    rescalers = {task: (numerator[task] / denominator[task] if denominator[task] > 0 else 1.0) for task in tasks}
    return EMRMerge(unified, masks, rescalers)
