"""Distillation targets: the fine-tuned model's outputs on the examples, computed once, and the losses against them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .examples import Batch

#: Above this many classes (a language model's vocabulary) the teacher keeps only its top-k tokens per position.
FULL_LOGITS_LIMIT = 1024
TOP_K = 64


def primary_output(output: Any) -> tuple[torch.Tensor, bool]:
    """The tensor to distill and whether it holds logits: ``output.logits`` if there is one, else the output tensor,
    else the first tensor of a model output / tuple (e.g. ``last_hidden_state``)."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits, True
    if isinstance(output, torch.Tensor):
        return output, output.dim() == 2
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value, False
    raise TypeError(f"The model returned {type(output).__name__}, which holds no tensor to distill.")


def _positions(batch: Batch, output: torch.Tensor) -> torch.Tensor | None:
    """Bool mask of the real (not padding) positions when the output has a sequence dimension."""
    mask = batch[1].get("attention_mask")
    if isinstance(mask, torch.Tensor) and output.dim() == 3 and tuple(mask.shape) == tuple(output.shape[:2]):
        return mask.to(device=output.device).bool()
    return None


@dataclass
class Target:
    """What the student must match on one batch."""

    kind: str  # "kl" or "mse"
    positions: torch.Tensor | None
    probs: torch.Tensor | None = None  # kl: teacher probabilities (full, or of the top-k tokens)
    top: torch.Tensor | None = None  # kl with a large vocabulary: the top-k token ids
    outputs: torch.Tensor | None = None  # mse
    scale: float = 1.0


def make_target(batch: Batch, output: Any, loss: str, temperature: float) -> Target:
    """The cached target of one batch from the teacher's output."""
    tensor, is_logits = primary_output(output)
    tensor = tensor.detach().float()
    if not torch.isfinite(tensor).all():
        raise ValueError("The fine-tuned model produced NaN or Inf outputs on the examples; check the checkpoint.")
    positions = _positions(batch, tensor)
    if positions is not None:
        tensor = tensor[positions]
    if loss == "kl":
        probs = torch.softmax(tensor / temperature, dim=-1)
        if tensor.shape[-1] > FULL_LOGITS_LIMIT:
            probs, top = probs.topk(TOP_K, dim=-1)
            return Target("kl", positions, probs=probs, top=top)
        return Target("kl", positions, probs=probs)
    scale = float(tensor.pow(2).mean().clamp_min(1e-12))
    return Target("mse", positions, outputs=tensor, scale=scale)


def resolve_loss(loss: str, output: Any) -> str:
    """``"auto"`` -> ``"kl"`` for logits, ``"mse"`` otherwise."""
    if loss != "auto":
        return loss
    return "kl" if primary_output(output)[1] else "mse"


def distillation_loss(output: Any, target: Target, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits (times T^2), or the MSE relative to the mean square of
    the teacher's outputs. With a large vocabulary the KL is taken over the teacher's top-k tokens plus one bucket for
    the rest (the exact KL of the coarsened distributions)."""
    tensor, _ = primary_output(output)
    tensor = tensor.float()
    if target.positions is not None:
        tensor = tensor[target.positions.to(tensor.device)]
    if target.kind == "mse":
        return F.mse_loss(tensor, target.outputs.to(tensor.device)) / target.scale
    log_q = torch.log_softmax(tensor / temperature, dim=-1)
    p = target.probs.to(tensor.device)
    if target.top is not None:
        log_q_top = log_q.gather(-1, target.top.to(tensor.device))
        p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
        q_rest = (1 - log_q_top.exp().sum(-1)).clamp_min(1e-12)
        kl = (p * (p.clamp_min(1e-12).log() - log_q_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    else:
        kl = (p * (p.clamp_min(1e-12).log() - log_q)).sum(-1)
    return kl.mean() * temperature**2
