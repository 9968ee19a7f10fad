"""T-Switch adapter -> PEFT LoRA adapter of a chosen rank, by truncated SVD of each switched weight's delta."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .._staging import atomic_output_dir, check_output_dir
from ..convert.plain import ModelFactory, build_model
from ..format import KEY_PREFIX, LOW_RANK_TARGET, LOW_RANK_UNITS, STATISTICS, statistics_attribute
from ..tswitch.layer import is_norm_layer
from ._base_model import build_base_skeleton, load_base_model, task_type_name
from ._switch_file import SwitchFolder, open_switch

logger = logging.getLogger(__name__)

EXACT_SVD_MAX_DIM = 2048  # "auto": exact SVD up to this smaller dimension, randomized SVD above


@dataclass
class LoraModuleReport:
    """One LoRA module: ``relative_error`` = ||delta - B A||_F / ||delta||_F."""

    name: str
    kind: str
    shape: list[int]
    rank: int
    delta_norm: float
    error_norm: float
    svd: str

    @property
    def relative_error(self) -> float:
        return self.error_norm / self.delta_norm if self.delta_norm else 0.0


@dataclass
class DroppedUnit:
    """A switched parameter the LoRA does not carry, with the norm of its delta."""

    name: str
    reason: str
    delta_norm: float


@dataclass
class LoraExportReport:
    """What :func:`to_lora` wrote and how far the LoRA is from the switch."""

    output_dir: str
    rank: int
    modules: list[LoraModuleReport] = field(default_factory=list)
    dropped: list[DroppedUnit] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    exact_units: list[str] = field(default_factory=list)  # carried exactly (lora_bias, norms in modules_to_save)
    exact_norm_sq: float = 0.0
    lora_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def lora_relative_error(self) -> float:
        """||delta - B A||_F / ||delta||_F over all LoRA modules together."""
        total = sum(m.delta_norm**2 for m in self.modules)
        return math.sqrt(sum(m.error_norm**2 for m in self.modules) / total) if total else 0.0

    @property
    def dropped_share(self) -> float:
        """Share of the switch's squared Frobenius norm in units the LoRA drops."""
        total = self._total_norm_sq()
        return sum(d.delta_norm**2 for d in self.dropped) / total if total else 0.0

    @property
    def relative_error(self) -> float:
        """Relative Frobenius error of the whole switch: LoRA truncation plus dropped units."""
        total = self._total_norm_sq()
        lost = sum(m.error_norm**2 for m in self.modules) + sum(d.delta_norm**2 for d in self.dropped)
        return math.sqrt(lost / total) if total else 0.0

    def _total_norm_sq(self) -> float:
        modules = sum(m.delta_norm**2 for m in self.modules)
        return modules + sum(d.delta_norm**2 for d in self.dropped) + self.exact_norm_sq

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": self.output_dir,
            "rank": self.rank,
            "relative_error": self.relative_error,
            "lora_relative_error": self.lora_relative_error,
            "dropped_share": self.dropped_share,
            "lora_bytes": self.lora_bytes,
            "modules": [dict(asdict(m), relative_error=m.relative_error) for m in self.modules],
            "dropped": [asdict(d) for d in self.dropped],
            "modules_to_save": list(self.modules_to_save),
            "exact_units": list(self.exact_units),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        lines = [
            f"LoRA adapter written to {self.output_dir}: rank {self.rank}, {len(self.modules)} modules, "
            f"{self.lora_bytes:,} bytes of LoRA weights",
            f"relative error ||delta - BA||_F / ||delta||_F over the LoRA modules: {self.lora_relative_error:.4f}",
        ]
        if self.modules:
            worst = max(self.modules, key=lambda m: m.relative_error)
            lines.append(f"worst module: {worst.name} ({worst.relative_error:.4f} at rank {worst.rank})")
        if self.exact_units:
            lines.append(f"carried exactly: {len(self.exact_units)} units (lora_bias / norm layers in modules_to_save)")
        if self.dropped:
            reasons = sorted({d.reason for d in self.dropped})
            lines.append(
                f"dropped: {len(self.dropped)} units holding {100 * self.dropped_share:.2f}% of the switch's squared "
                f"norm ({'; '.join(reasons)})"
            )
        if self.modules_to_save:
            lines.append(f"modules_to_save (full precision): {', '.join(self.modules_to_save)}")
        lines.append(f"relative error of the whole switch: {self.relative_error:.4f}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def to_lora(
    adapter: str | os.PathLike,
    base: str | os.PathLike | nn.Module | None,
    output_dir: str | os.PathLike,
    *,
    rank: int = 16,
    overwrite: bool = False,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
    lora_bias: bool = False,
    include_norms: bool = False,
    exclude_modules: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
    svd_method: Literal["auto", "exact", "randomized"] = "auto",
    device: str | torch.device | None = None,
    progress: bool = True,
    model_factory: ModelFactory | type | None = None,
) -> LoraExportReport:
    """Write a PEFT LoRA adapter approximating a T-Switch adapter: per switched weight, the truncated SVD of its
    delta (``lora_alpha = r``, so the scaling is 1). Plain ``PeftModel.from_pretrained`` loads it.

    Args:
        adapter: The T-Switch adapter (a folder or a Hub id).
        base: The base model (folder, Hub id or loaded model); only its architecture is read (its weights too with
            ``include_norms``). ``None``: the adapter's ``base_model_name_or_path``.
        output_dir: The LoRA folder to write (``adapter_config.json``, ``adapter_model.safetensors``, a card).
        rank: LoRA rank (per module at most ``min(rows, columns)``; smaller ranks go into ``rank_pattern``).
        lora_bias: Carry bias deltas exactly as peft's ``lora_bias`` (peft refuses it when embeddings are
            targeted, and some servers do not support it). Otherwise they are dropped and reported.
        include_norms: Carry norm layers whose weights the switch changes exactly, as full-precision
            ``modules_to_save`` (base weight + delta). Otherwise they are dropped and reported.
        exclude_modules: Module names (or name suffixes) to leave out, e.g. ``["embed_tokens", "lm_head"]`` for
            servers without embedding LoRA. Reported as dropped.
        dtype: Dtype of the saved LoRA weights.
        svd_method: ``"exact"`` (``torch.linalg.svd``), ``"randomized"`` (``torch.svd_lowrank``) or ``"auto"``
            (exact when the smaller dimension is at most 2048).
        device: Where to decode and factorize (default: CUDA if available, else CPU).
        model_factory: The architecture of a plain ``torch.nn.Module`` base given as a safetensors state dict: its
            class, a zero-argument function returning it, or ``"package.module:name"``. Without ``include_norms``
            only the architecture is needed: ``base`` may then be None (the factory alone builds it).

    Returns a :class:`LoraExportReport` with ||delta - B A||_F / ||delta||_F per module and overall, and the
    units that a LoRA cannot carry with their share of the switch's norm. Nothing is written on error.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}.")
    if svd_method not in ("auto", "exact", "randomized"):
        raise ValueError(f"svd_method must be 'auto', 'exact' or 'randomized', got {svd_method!r}.")
    switch = open_switch(adapter, revision=revision, token=token)
    base_ref = base if base is not None else switch.config.base_model_name_or_path
    if base_ref is None and (model_factory is None or include_norms):
        raise ValueError(f"{switch.source} does not record its base model; pass the base model explicitly.")
    final = check_output_dir(output_dir, overwrite, [adapter, base_ref])
    task_type = switch.config.task_type
    if include_norms:
        model = load_base_model(base_ref, task_type, revision=base_revision, token=token, model_factory=model_factory)
    elif base_ref is None or (model_factory is not None and not isinstance(base_ref, nn.Module)):
        model = build_model(model_factory, meta=True)
    else:
        model = build_base_skeleton(
            base_ref, task_type, revision=base_revision, token=token, model_factory=model_factory
        )
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))

    builder = _LoraBuilder(switch, model, rank, dtype, svd_method, lora_bias, include_norms, exclude_modules)
    changed = {(u.module, LOW_RANK_TARGET if u.param in LOW_RANK_UNITS else u.param) for u in switch.units()}
    deltas = switch.iter_deltas(device)  # a low-rank pair comes as its weight's change
    for unit, delta in tqdm(deltas, total=len(changed), desc="SVD of deltas", disable=not progress):
        builder.add(unit.module, unit.param, delta)
    tensors, lora_config = builder.finish(base_ref, task_type)

    report = builder.report
    report.output_dir = final
    report.lora_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if ".lora_" in k)
    with atomic_output_dir(final, overwrite, [adapter, base_ref]) as work:
        save_file(tensors, os.path.join(work, "adapter_model.safetensors"), metadata={"format": "pt"})
        lora_config.save_pretrained(work)
        _write_card(work, lora_config, switch, report)
        with open(os.path.join(work, "lora_export_report.json"), "w", encoding="utf-8") as handle:
            json.dump(report.to_dict(), handle, indent=2)
    logger.info("%s", report)
    return report


class _LoraBuilder:
    """Collects the LoRA tensors and config entries unit by unit."""

    def __init__(
        self, switch: SwitchFolder, model: nn.Module, rank, dtype, svd_method, lora_bias, include_norms, exclude
    ):
        self.switch, self.model, self.rank, self.dtype = switch, model, rank, dtype
        self.svd_method, self.lora_bias, self.include_norms = svd_method, lora_bias, include_norms
        self.exclude = list(exclude or [])
        self.modules = dict(model.named_modules())
        self.tensors: dict[str, torch.Tensor] = {}
        self.targets: dict[str, int] = {}  # module -> rank
        self.kinds: dict[str, str] = {}
        self.bias_deltas: dict[str, torch.Tensor] = {}
        self.norm_modules: list[str] = []
        self.report = LoraExportReport(output_dir="", rank=rank)
        self.tied_output = _tied_output_name(model)
        self.statistics = _switch_statistics(switch)  # module -> {running_mean, running_var}

    def _module(self, name: str) -> nn.Module | None:
        if name in self.modules:
            return self.modules[name]
        matches = [m for key, m in self.modules.items() if key.endswith("." + name) or name.endswith("." + key)]
        matches = [m for m in matches if m is not None]
        return matches[0] if len(matches) == 1 else None

    def _excluded(self, name: str) -> bool:
        return any(name == e or name.endswith("." + e) for e in self.exclude)

    def _drop(self, name: str, reason: str, delta: torch.Tensor) -> None:
        self.report.dropped.append(DroppedUnit(name, reason, float(torch.linalg.vector_norm(delta))))

    def add(self, module_name: str, param: str, delta: torch.Tensor) -> None:
        unit = f"{module_name}.{param}"
        module = self._module(module_name)
        if self._excluded(module_name):
            return self._drop(unit, "excluded", delta)
        if module is None:
            return self._drop(unit, "module not found in the base model", delta)
        if is_norm_layer(module):
            if self.include_norms:
                self._add_norm(module_name, module, param, delta)
                return None
            return self._drop(unit, "norm layer (include_norms=True keeps it)", delta)
        if param == "bias":
            if self.lora_bias and isinstance(module, (nn.Linear, Conv1D, nn.Conv2d)):
                self.bias_deltas[module_name] = delta
                self.report.exact_units.append(unit)
                self.report.exact_norm_sq += float(torch.linalg.vector_norm(delta)) ** 2
                return None
            return self._drop(unit, "bias (lora_bias=True keeps it)", delta)
        if param != "weight":
            return self._drop(unit, f"parameter {param!r} has no LoRA form", delta)
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            return self._drop(unit, "grouped convolution", delta)
        if not isinstance(module, (nn.Linear, nn.Embedding, Conv1D, nn.Conv2d)):
            return self._drop(unit, f"{type(module).__name__} has no LoRA form", delta)
        self._add_factorized(module_name, module, delta)
        return None

    def _add_factorized(self, name: str, module: nn.Module, delta: torch.Tensor) -> None:
        if isinstance(module, Conv1D):
            kind, matrix = "conv1d", delta.T  # Conv1D stores (in, out); LoRA factorizes (out, in)
        elif isinstance(module, nn.Conv2d):
            kind, matrix = "conv2d", delta.reshape(delta.shape[0], -1)
        else:
            kind, matrix = ("embedding" if isinstance(module, nn.Embedding) else "linear"), delta
        up, down, error, method = _factorize(matrix, self.rank, self.dtype, self.svd_method)
        rank = up.shape[1]
        prefix = KEY_PREFIX + name
        if kind == "embedding":  # peft: delta = (lora_embedding_B @ lora_embedding_A).T
            self.tensors[f"{prefix}.lora_embedding_A"] = up.T.contiguous()
            self.tensors[f"{prefix}.lora_embedding_B"] = down.T.contiguous()
        elif kind == "conv2d":
            self.tensors[f"{prefix}.lora_A.weight"] = down.reshape(rank, *delta.shape[1:]).contiguous()
            self.tensors[f"{prefix}.lora_B.weight"] = up.reshape(delta.shape[0], rank, 1, 1).contiguous()
        else:
            self.tensors[f"{prefix}.lora_A.weight"] = down.contiguous()
            self.tensors[f"{prefix}.lora_B.weight"] = up.contiguous()
        self.targets[name], self.kinds[name] = rank, kind
        norm = float(torch.linalg.vector_norm(delta))
        self.report.modules.append(LoraModuleReport(name, kind, list(delta.shape), rank, norm, error, method))
        if kind == "embedding" and self.tied_output and not self._excluded(self.tied_output):
            # the output layer shares this weight, so the switch changes it too: same factors, as a Linear LoRA
            out = KEY_PREFIX + self.tied_output
            self.tensors[f"{out}.lora_A.weight"] = down.contiguous()
            self.tensors[f"{out}.lora_B.weight"] = up.contiguous()
            self.targets[self.tied_output], self.kinds[self.tied_output] = rank, "linear"
            report = LoraModuleReport(self.tied_output, "linear (tied)", list(delta.shape), rank, 0.0, 0.0, method)
            self.report.modules.append(report)  # counted once: its delta is the embedding's
            self.report.notes.append(
                f"{self.tied_output} shares its weight with {name}: both carry the same factors, which is exact when "
                "the LoRA runs unmerged. Do not merge_and_unload it (peft would add the delta to the shared weight "
                "twice); for a merged model use switch-adapter merge."
            )

    def _add_norm(self, name: str, module: nn.Module, param: str, delta: torch.Tensor) -> None:
        if name not in self.norm_modules:
            self.norm_modules.append(name)
            for key, value in module.state_dict().items():
                self.tensors[f"{KEY_PREFIX}{name}.{key}"] = value.detach().to("cpu", torch.float32).clone()
            for key, value in self.statistics.pop(name, {}).items():  # the switch's running statistics (BatchNorm)
                self.tensors[f"{KEY_PREFIX}{name}.{key}"] = value.to(getattr(module, key).dtype)
        key = f"{KEY_PREFIX}{name}.{param}"
        self.tensors[key] = (self.tensors[key] + delta.to("cpu", torch.float32)).to(getattr(module, param).dtype)
        self.report.exact_units.append(f"{name}.{param}")
        self.report.exact_norm_sq += float(torch.linalg.vector_norm(delta)) ** 2

    def finish(self, base_ref, task_type):
        from peft import LoraConfig

        if self.lora_bias:
            embeddings = [name for name, kind in self.kinds.items() if kind == "embedding"]
            if embeddings:
                raise ValueError(
                    f"peft does not support lora_bias for embedding layers ({', '.join(embeddings)}); export without "
                    "lora_bias, or leave the embeddings out with exclude_modules."
                )
            for name in self.targets:
                out_features = self.tensors[f"{KEY_PREFIX}{name}.lora_B.weight"].shape[0]
                bias = self.bias_deltas.pop(name, None)
                bias = torch.zeros(out_features) if bias is None else bias.to("cpu", torch.float32)
                self.tensors[f"{KEY_PREFIX}{name}.lora_B.bias"] = bias.to(self.dtype).contiguous()
            for name, bias in self.bias_deltas.items():  # a bias switched without its weight: no LoRA to carry it
                self.report.exact_units.remove(f"{name}.bias")
                self.report.exact_norm_sq -= float(torch.linalg.vector_norm(bias)) ** 2
                self._drop(f"{name}.bias", "bias of a module without a weight delta", bias)
        self.tensors.update(self.switch.head_tensors())
        if self.statistics:  # norm layers whose statistics no exported module carries
            self.report.notes.append(
                f"the running statistics (BatchNorm) of {len(self.statistics)} norm layer(s) are not in the LoRA "
                f"({', '.join(sorted(self.statistics)[:4])}{', ...' if len(self.statistics) > 4 else ''}); "
                "include_norms=True (--include-norms) carries them with the norm layers the switch changes"
            )
        if not self.targets:
            raise ValueError(
                f"{self.switch.source} has no weight that a LoRA can carry (Linear, Embedding, Conv1D, Conv2d); "
                "nothing was written."
            )
        modules_to_save = list(self.switch.config.modules_to_save or []) + self.norm_modules
        self.report.modules_to_save = modules_to_save
        pattern = {name: r for name, r in self.targets.items() if r != self.rank}
        base_name = base_ref if isinstance(base_ref, (str, os.PathLike)) else getattr(base_ref, "name_or_path", None)
        config = LoraConfig(
            task_type=task_type_name(task_type),
            r=self.rank,
            lora_alpha=self.rank,
            target_modules=sorted(self.targets),
            rank_pattern=pattern,
            alpha_pattern=dict(pattern),
            lora_dropout=0.0,
            fan_in_fan_out=any(kind == "conv1d" for kind in self.kinds.values()),
            lora_bias=self.lora_bias,
            modules_to_save=modules_to_save or None,
            base_model_name_or_path=os.fspath(base_name) if base_name else None,
        )
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        return tensors, config


def _factorize(matrix: torch.Tensor, rank: int, dtype: torch.dtype, method: str):
    """``(B, A, ||matrix - B A||_F, method used)`` with B (m, r), A (r, n), r = min(rank, m, n)."""
    matrix = matrix.float()
    rows, cols = matrix.shape
    r = min(rank, rows, cols)
    if method == "exact" or (method == "auto" and min(rows, cols) <= EXACT_SVD_MAX_DIM):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        used = "exact"
    else:
        u, s, v = torch.svd_lowrank(matrix, q=min(r + 10, rows, cols), niter=4)
        vh, used = v.T, "randomized"
    root = s[:r].sqrt()
    up = (u[:, :r] * root).to(dtype)
    down = (root[:, None] * vh[:r]).to(dtype)
    error = float(torch.linalg.matrix_norm(matrix - up.float() @ down.float()))
    return up.cpu(), down.cpu(), error, used


def _tied_output_name(model: nn.Module) -> str | None:
    """Name of the output layer whose weight is the input embedding's weight, if any."""
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    if get_out is None or get_in is None:
        return None
    try:
        output, inputs = get_out(), get_in()
    except (NotImplementedError, AttributeError):
        return None
    if output is None or inputs is None or getattr(output, "weight", None) is not getattr(inputs, "weight", 0):
        return None
    return next((name for name, module in model.named_modules() if module is output), None)


def _switch_statistics(switch: SwitchFolder) -> dict[str, dict[str, torch.Tensor]]:
    """The running statistics a switch carries (format version 4), as ``{module: {running_mean, running_var}}``."""
    statistics: dict[str, dict[str, torch.Tensor]] = {}
    if not getattr(switch.config, "norm_statistics", None):
        return statistics
    with switch.open() as file:
        for module in switch.config.norm_statistics:
            statistics[module] = {
                name: file.tensor(f"{KEY_PREFIX}{module}.{statistics_attribute(name)}") for name in STATISTICS
            }
    return statistics


def _write_card(folder: str, config, switch: SwitchFolder, report: LoraExportReport) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    base = config.base_model_name_or_path
    data = ModelCardData(
        library_name="peft",
        tags=["lora", "switch-adapter"],
        base_model=base if base and not os.path.exists(base) else None,
    )
    text = (
        f"---\n{data.to_yaml()}\n---\n\n# LoRA exported from a T-Switch adapter\n\n"
        f"Rank-{report.rank} LoRA approximating the T-Switch adapter `{switch.source}` (truncated SVD of each "
        "switched weight's delta, written by [switch-adapter](https://pypi.org/project/switch-adapter/) "
        "`switch-adapter export-lora`). It loads with plain peft: `PeftModel.from_pretrained(base, <this folder>)`."
        f"\n\n| | |\n|---|---|\n| modules | {len(report.modules)} |\n"
        f"| relative error over the LoRA modules | {report.lora_relative_error:.4f} |\n"
        f"| units dropped (share of squared norm) | {len(report.dropped)} ({100 * report.dropped_share:.2f}%) |\n"
        f"| relative error of the whole switch | {report.relative_error:.4f} |\n\n"
        "Per-module errors: `lora_export_report.json`.\n"
    )
    ModelCard(text).save(os.path.join(folder, "README.md"))
