"""``flexswitch()``: learn a switch whose units differ in density and bit-width, under a storage budget."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save as safetensors_bytes
from torch import nn
from tqdm.auto import tqdm

from ..codec import sass
from ..convert.lora import low_rank_form
from ..errors import BudgetError, TrainingError
from ..format import LOW_RANK_TARGET, LOW_RANK_UNITS, add_checksums, required_format_version
from ..heads import log_heads
from ..tswitch.build import (
    _lookup,
    _targets,
    finetuned_heads,
    finetuned_statistics,
    head_updates,
    store_statistics,
    store_switches,
    switch_adapter_for,
    switch_units,
)
from ..tswitch.config import TSwitchConfig
from .budget import SIZE_TOLERANCE, FileSize, check_budget, code_bytes, fit_shift, kept_count, uniform_density
from .config import FlexSwitchConfig
from .distill import Target, distillation_loss, make_target, resolve_loss
from .examples import Batch, move_batch, prepare_batches
from .sources import FineTune, load_base, open_finetune
from .unit import LearnableUnit

logger = logging.getLogger(__name__)
_CHECK_EVERY = 25


def flexswitch(
    base: nn.Module | str | os.PathLike,
    finetuned: nn.Module | str | os.PathLike,
    examples: Any,
    config: FlexSwitchConfig | None = None,
    *,
    tokenizer: Any = None,
    adapter_name: str = "default",
    progress: bool = True,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
) -> PeftModel:
    """Learn a FlexSwitch: per switched tensor a keep count, a bit-width from ``config.bit_widths`` and a scale, by
    distilling the fine-tuned model on ``examples`` under ``config.budget``.

    Args:
        base: The pre-trained model, or its folder / Hub id (loaded with the fine-tune's class).
        finetuned: The fine-tuned model, a folder or Hub id of a full fine-tune, or a LoRA adapter (folder or Hub id)
            made on ``base``.
        examples: About 100 inputs of the task: a list of strings (or chats), a ``datasets.Dataset``, a dict of
            tokenized tensors, a tensor of inputs, or a ``DataLoader`` (for image and other non-text models).
        config: Budget, bit-widths, steps, ... (default ``FlexSwitchConfig()``: 0.5% of fp32).
        tokenizer: Needed for text examples.
        adapter_name: Name of the adapter in the returned model.
        progress: Show a progress bar (loss and estimated size).
        revision / base_revision / token: Hub revision of ``finetuned`` / ``base``, Hub token.

    Returns:
        A ``PeftModel`` holding a T-Switch adapter (format version 3 when a unit has more than one bit); save it with
        ``save_pretrained`` and load it with ``PeftModel.from_pretrained`` like any adapter.

    Raises :class:`~switch_adapter.BudgetError` for a budget no switch of this model meets (with the reachable sizes),
    :class:`~switch_adapter.TrainingError` if the loss becomes NaN, ``ValueError`` / ``TypeError`` for unusable
    examples or models. On any error the base model is left as it was.
    """
    config = dataclasses.replace(config) if config is not None else FlexSwitchConfig()
    torch.manual_seed(config.seed)
    finetuned_folder = None
    if isinstance(finetuned, (str, os.PathLike)):
        from .sources import _folder

        finetuned_folder = _folder(finetuned, "fine-tuned model or LoRA adapter", revision, token)
        finetuned = finetuned_folder
    base_model = load_base(base, finetuned_folder, revision=base_revision, token=token)
    if tokenizer is None and _holds_text(examples):
        tokenizer = _try_tokenizer(base_model, base)
    batches = prepare_batches(
        examples, tokenizer, batch_size=config.batch_size, max_length=config.max_length, text_column=config.text_column
    )
    from accelerate import Accelerator

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps
    )
    with open_finetune(base_model, finetuned, revision=revision, token=token) as tune:
        loss_kind, targets = _teacher_targets(tune.teacher, batches, config, accelerator.device)
        tswitch_config = _switch_config(config, tune, base)
        if tswitch_config.modules_to_save is None and not tune.is_lora and tune.state is not None:
            found = [name for name in finetuned_heads(base_model, tune.state) if not _targets(tswitch_config, name)]
            if found:  # output heads found by structure that the fine-tune changed: kept in full precision
                tswitch_config.modules_to_save = found
                log_heads(found, "found by structure, changed by the fine-tune")
    original_device = next(base_model.parameters()).device
    with switch_adapter_for(base_model, tswitch_config, adapter_name) as model:
        inner = model.get_base_model()
        heads = head_updates(inner, adapter_name, tune.heads if tune.is_lora else tune.state)
        store_switches(model, adapter_name, [], heads)
        if not tune.is_lora:  # a full fine-tune's BatchNorm statistics are carried exactly (a LoRA has none)
            store_statistics(model, adapter_name, finetuned_statistics(inner, adapter_name, tune.state))
        vectors = _TaskVectors(inner, adapter_name, tune, config.lora_factors)
        run = _Run(model, adapter_name, vectors, config, accelerator)
        del vectors, tune  # the units hold the candidates they need; the fine-tuned model can go
        run.train(batches, targets, loss_kind, progress)
        run.finish()
        model.to(original_device)
    return model


def _holds_text(examples: Any) -> bool:
    return isinstance(examples, (list, tuple)) or (
        hasattr(examples, "column_names") and "input_ids" not in examples.column_names
    )


def _try_tokenizer(model: nn.Module, base: Any) -> Any:
    """The tokenizer saved with the base model's folder, or None (then text examples fail with a clear message)."""
    from transformers import AutoTokenizer

    path = os.fspath(base) if isinstance(base, (str, os.PathLike)) else None
    path = path or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path or not os.path.isdir(path):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:  # a folder without tokenizer files
        return None


def _switch_config(config: FlexSwitchConfig, tune: FineTune, base: Any) -> TSwitchConfig:
    targets = config.target_modules
    if tune.is_lora and targets == "all":  # only the LoRA's modules change: no empty slots for the others
        targets = sorted({key.rsplit(".", 1)[0] for key in tune.deltas})
    return TSwitchConfig(
        target_modules=targets,
        exclude_modules=config.exclude_modules,
        modules_to_save=config.modules_to_save if config.modules_to_save is not None else tune.modules_to_save,
        switch_bias=config.switch_bias,
        switch_norms=config.switch_norms,
        task_type=config.task_type or tune.task_type,
        base_model_name_or_path=os.fspath(base) if isinstance(base, (str, os.PathLike)) else None,
        flexswitch={"budget": str(config.budget)},
    )


@torch.no_grad()
def _teacher_targets(
    teacher: nn.Module, batches: list[Batch], config: FlexSwitchConfig, device: torch.device
) -> tuple[str, list[Target]]:
    """The fine-tuned model's outputs on every batch (computed once), and the loss they call for."""
    was_training = teacher.training
    original = next(teacher.parameters()).device
    teacher.eval().to(device)
    targets, loss_kind = [], config.loss
    try:
        for index, batch in enumerate(tqdm(batches, desc="Teacher outputs", disable=len(batches) < 8)):
            args, kwargs = move_batch(batch, device)
            try:
                output = teacher(*args, **kwargs)
            except Exception as error:
                if index:
                    raise
                raise ValueError(
                    f"The fine-tuned model cannot run on the examples ({type(error).__name__}: {error}). Pass "
                    "examples of the kind the model takes: text with the model's tokenizer, or tensors / a DataLoader "
                    "for other models."
                ) from error
            loss_kind = resolve_loss(loss_kind, output)
            targets.append(make_target((args, kwargs), output, loss_kind, config.distill_temperature))
    finally:
        teacher.train(was_training).to(original)
    return loss_kind, targets


class _TaskVectors:
    """The task vectors of the switchable parameters the fine-tune changed, computed on demand one at a time (so that
    only one is in memory besides the models); ``counts[key]`` is ``(positive, negative, numel)``."""

    def __init__(self, inner: nn.Module, adapter_name: str, tune: FineTune, lora_factors: bool = False) -> None:
        self.tune = tune
        self.layers: dict[tuple[str, str], nn.Module] = {}
        self.counts: dict[tuple[str, str], tuple[int, int, int]] = {}
        self.factors: dict[tuple[str, str], torch.Tensor] = {}  # the units of low-rank pairs: their factors
        problems = []
        for module_name, layer, param_name in switch_units(inner, adapter_name):
            pair = tune.factors.get(f"{module_name}.{param_name}") if lora_factors and tune.is_lora else None
            if pair is not None and param_name == LOW_RANK_TARGET:
                layer.prepare_low_rank(adapter_name)
                for name, factor in zip(LOW_RANK_UNITS, low_rank_form(*pair, balanced=True)):
                    self.layers[(module_name, name)] = layer
                    self.factors[(module_name, name)] = factor
                    signs = (int((factor > 0).sum()), int((factor < 0).sum()))
                    self.counts[(module_name, name)] = (*signs, factor.numel())
                continue
            key = (module_name, param_name)
            self.layers[key] = layer
            try:
                tau = self[key]
            except ValueError as error:
                problems.append(str(error))
                continue
            if tau is not None and torch.count_nonzero(tau):
                self.counts[key] = (int((tau > 0).sum()), int((tau < 0).sum()), tau.numel())
        if problems:
            raise ValueError(
                "The fine-tuned weights do not fit the base model:\n  "
                + "\n  ".join(problems[:10])
                + ("\n  ..." if len(problems) > 10 else "")
                + "\nBoth must have the same architecture and sizes; nothing was modified."
            )
        if not self.counts:
            raise ValueError(
                "The fine-tuned model does not differ from the base in any switched tensor: nothing to learn."
            )

    def __getitem__(self, key: tuple[str, str]) -> torch.Tensor | None:
        """``fine-tuned - base`` in float32, None if the fine-tune does not touch it (a LoRA's other modules); a factor
        of a low-rank pair for a pair's unit."""
        if key in self.factors:
            return self.factors[key]
        module_name, param_name = key
        name = f"{module_name}.{param_name}"
        base_param = getattr(self.layers[key].get_base_layer(), param_name).detach()
        if self.tune.is_lora:
            tau = _lookup(self.tune.deltas, name)
            if tau is None:
                return None
        else:
            tuned = _lookup(self.tune.state, name)
            if tuned is None:
                raise ValueError(f"{name}: missing from the fine-tuned model")
            if tuned.shape != base_param.shape:
                raise ValueError(f"{name}: fine-tuned shape {list(tuned.shape)} != base {list(base_param.shape)}")
            tau = tuned.detach().float().to(base_param.device) - base_param.float()
        if tau.shape != base_param.shape:
            raise ValueError(f"{name}: task vector shape {list(tau.shape)} != base {list(base_param.shape)}")
        if not torch.isfinite(tau).all():
            raise ValueError(f"{name}: the task vector holds NaN or Inf")
        return tau.float()


class _Student(nn.Module):
    """The base model whose switched parameters are ``base + learned delta`` (a functional call, so the base model's
    parameters are never modified). The two units of a low-rank pair (``pairs[i]``: ``"left"`` then ``"right"``,
    consecutive, both naming the weight) add the product of their dense factors."""

    def __init__(
        self,
        model: nn.Module,
        units: list[LearnableUnit],
        parameter_names: list[str],
        pairs: list[str | None] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.units = nn.ModuleList(units)
        self.parameter_names = parameter_names
        self.pairs = pairs or [None] * len(units)
        parameters = dict(model.named_parameters(remove_duplicate=False))
        self._bases = [parameters[name] for name in parameter_names]  # the same objects after .to(device)

    def forward(self, batch: Batch, temperature: float) -> tuple[Any, torch.Tensor]:
        overrides, bits, left = {}, [], None
        for unit, name, base, role in zip(self.units, self.parameter_names, self._bases, self.pairs):
            index, values, unit_bits = unit(temperature)
            bits.append(unit_bits)
            if role is None:
                weight = base.detach().float().reshape(-1).index_add(0, index, values)
                overrides[name] = weight.view(base.shape).to(base.dtype)
                continue
            factor = values.new_zeros(unit.numel).index_add(0, index, values).view(unit.shape)
            if role == "left":
                left = factor
                continue
            change = (left @ factor).view(base.shape)
            overrides[name] = (base.detach().float() + change).to(base.dtype)
        args, kwargs = batch
        output = torch.func.functional_call(self.model, overrides, args, kwargs, tie_weights=True, strict=False)
        return output, torch.stack(bits).sum()


class _Run:
    """One FlexSwitch optimisation: units, budget, training loop, export."""

    def __init__(
        self,
        model: PeftModel,
        adapter_name: str,
        vectors: _TaskVectors,
        config: FlexSwitchConfig,
        accelerator: Any,
    ) -> None:
        self.model, self.adapter_name, self.config, self.accelerator = model, adapter_name, config, accelerator
        inner = model.get_base_model()
        self.layers = {name: module for name, module in inner.named_modules()}
        self.keys = list(vectors.counts)
        self.parameters_count = sum(numel for _, _, numel in vectors.counts.values())
        self.file_size = FileSize(get_peft_model_state_dict(model, adapter_name=adapter_name))
        self.budget_bytes = config.parsed_budget.target_bytes(self.parameters_count)
        check_budget(config.parsed_budget, self.budget_bytes, self.file_size, vectors.counts)
        density = config.init_density or uniform_density(self.file_size, vectors.counts, self.budget_bytes)
        fraction = config.candidate_fraction or min(1.0, max(0.2, 4 * density))
        pair_density = config.init_density or 1.0
        pair_bits = self._pair_bits(vectors, density, pair_density)
        self.units = []
        for m, p in tqdm(self.keys, desc="Preparing units", disable=len(self.keys) < 50):
            if (m, p) in vectors.factors:  # a factor of a low-rank pair: every entry a candidate
                unit = LearnableUnit(f"{m}.{p}", vectors[(m, p)], config.bit_widths, pair_density, 1.0, config.freeze,
                                     init_bits=pair_bits)  # fmt: skip
            else:
                unit = LearnableUnit(f"{m}.{p}", vectors[(m, p)], config.bit_widths, density, fraction, config.freeze)
            self.units.append(unit)
        names = [self._parameter_name(inner, m, LOW_RANK_TARGET if p in LOW_RANK_UNITS else p) for m, p in self.keys]
        pairs = [("left" if p == LOW_RANK_UNITS[0] else "right") if p in LOW_RANK_UNITS else None for _, p in self.keys]
        self.init_density = density
        self.student = _Student(inner, self.units, names, pairs)
        self.steps_run, self.initial_loss, self.final_loss = 0, float("nan"), float("nan")
        self.loss_kind = config.loss

    def _pair_bits(self, vectors: _TaskVectors, density: float, pair_density: float) -> int:
        """The bit-width the low-rank pairs start from: the most of ``bit_widths`` whose pairs at ``pair_density``
        (the other units at ``density``, one bit) fit the budget; the fewest when none does."""
        if not vectors.factors:
            return self.config.bit_widths[0]
        counts = vectors.counts
        others = {
            key: code_bytes(c[2], kept_count(*c[:2], density))
            for key, c in counts.items()
            if key not in vectors.factors
        }
        for bits in sorted(self.config.bit_widths, reverse=True):
            pairs = {
                key: code_bytes(counts[key][2], kept_count(*counts[key][:2], pair_density), bits)
                for key in vectors.factors
            }
            if self.file_size({**others, **pairs}) <= self.budget_bytes:
                return bits
        return self.config.bit_widths[0]

    @staticmethod
    def _parameter_name(inner: nn.Module, module: str, param: str) -> str:
        layer = inner.get_submodule(module)
        target = getattr(layer.get_base_layer(), param)
        for name, value in inner.named_parameters(remove_duplicate=False):
            if value is target and name.startswith(module + "."):
                return name
        raise RuntimeError(f"internal error: no parameter of {module} is its {param}")

    # -- training ----------------------------------------------------------------------------------------------------
    def train(self, batches: list[Batch], targets: list[Target], loss_kind: str, progress: bool) -> None:
        config, accelerator = self.config, self.accelerator
        self.loss_kind = loss_kind
        trainable = [p for unit in self.units for p in unit.parameters() if p.requires_grad]
        for param in self.student.model.parameters():
            param.requires_grad_(False)
        self.student.model.eval()
        if config.steps == 0 or not trainable:
            return
        groups = [
            {"params": [u.log_kept for u in self.units if u.log_kept.requires_grad], "lr": config.lr},
            {"params": [u.bit_logits for u in self.units if u.bit_logits.requires_grad], "lr": config.lr},
            {"params": [u.log_step for u in self.units if u.log_step.requires_grad], "lr": config.scale_lr},
        ]
        optimizer = torch.optim.Adam([g for g in groups if g["params"]])
        student, optimizer = accelerator.prepare(self.student, optimizer)
        fixed_bits = 8 * (self.file_size(dict.fromkeys(self.keys, 0)) + len(self.units) * (sass.HEADER_BYTES + 1))
        budget_bits = 8 * self.budget_bytes
        generator = torch.Generator().manual_seed(config.seed)
        order: list[int] = []
        start, end = config.gate_temperature
        penalty = 1.0
        history: list[float] = []
        bar = tqdm(total=config.steps, desc="FlexSwitch", disable=not progress)
        for step in range(config.steps):
            if not order:
                order = torch.randperm(len(batches), generator=generator).tolist()
            index = (order.pop() + accelerator.process_index) % len(batches)  # several processes: other batches
            temperature = start * (end / start) ** (step / max(config.steps - 1, 1))
            with accelerator.accumulate(student):
                output, unit_bits = student(move_batch(batches[index], accelerator.device), temperature)
                distill = distillation_loss(output, targets[index], config.distill_temperature)
                over = (fixed_bits + unit_bits) / budget_bits - 1.0
                loss = distill + penalty * torch.relu(over)
                if not torch.isfinite(loss):
                    raise self._nan_error(step, distill, temperature)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            excess = float(over.detach())
            penalty = min(penalty * 1.1, 1e4) if excess > 0 else max(penalty * 0.97, 1e-3)
            value = float(distill.detach())
            if step == 0:
                self.initial_loss = value
            history.append(value)
            self.steps_run = step + 1
            size = (fixed_bits + float(unit_bits.detach())) / 8
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}", size=f"{size / 1e6:.3f}MB", budget=f"{size / self.budget_bytes:.0%}")
            if self._converged(step, history, excess):
                logger.info("FlexSwitch stopped at step %d: the size and the loss converged.", step + 1)
                break
        bar.close()
        window = history[-min(len(history), 20) :]
        self.final_loss = sum(window) / len(window)
        self.student = accelerator.unwrap_model(student)

    def _converged(self, step: int, history: list[float], excess: float) -> bool:
        if step + 1 < max(100, self.config.steps // 2) or (step + 1) % _CHECK_EVERY or not -0.03 < excess <= 0.01:
            return False
        recent, before = history[-50:], history[-100:-50]
        return sum(recent) / len(recent) > 0.99 * sum(before) / len(before)

    @torch.no_grad()
    def _nan_error(self, step: int, distill: torch.Tensor, temperature: float) -> TrainingError:
        def finite(unit: LearnableUnit) -> bool:  # its parameters, and the values and size they give
            return all(torch.isfinite(t).all() for t in (*unit.parameters(), *unit(temperature)[1:]))

        broken = [u.name for u in self.units if not finite(u)]
        where = f"; non-finite parameters or values in {', '.join(broken[:5])}" if broken else ""
        what = "distillation loss" if not torch.isfinite(distill) else "size penalty"
        return TrainingError(
            f"The {what} became NaN or Inf at step {step + 1}{where}. Lower lr / scale_lr, check that the examples "
            "and the fine-tuned model give finite outputs, or try mixed_precision='no'. Nothing was saved and the base "
            "model is unchanged."
        )

    # -- export ------------------------------------------------------------------------------------------------------
    def _file_bytes_at(self, shift: float) -> int:
        return self.file_size({key: unit.exact_bytes(shift) for key, unit in zip(self.keys, self.units)})

    def finish(self) -> None:
        """Store the learned switches in the adapter and check the file's size against the budget."""
        shift = 0.0
        if "density" not in self.config.freeze:  # a frozen density stays as it is (over the budget: BudgetError)
            shift = fit_shift(self._file_bytes_at, self.budget_bytes)
        switches, pairs = [], {}
        for (module, param), unit in zip(self.keys, self.units):
            unit.to("cpu")
            if param in LOW_RANK_UNITS:
                pairs.setdefault(module, {})[param] = unit.export(shift)
            else:
                switches.append((module, self.layers[module], param, unit.export(shift)))
        config = self.model.peft_config[self.adapter_name]
        store_switches(self.model, self.adapter_name, switches)
        for module, factors in pairs.items():
            entries = self.layers[module].set_low_rank(self.adapter_name, *(factors[name] for name in LOW_RANK_UNITS))
            for entry, factor in zip(entries.values(), (factors[name] for name in LOW_RANK_UNITS)):
                entry["density"] = factor.kept / max(factor.numel, 1)
            config.unit_layout.setdefault(module, {}).update(entries)
        config.format_version = required_format_version(config.unit_layout, config.norm_statistics)
        state = get_peft_model_state_dict(self.model, adapter_name=self.adapter_name)
        state = add_checksums({k: v.detach().cpu().contiguous() for k, v in state.items() if "_checksum" not in k})
        file_bytes = len(safetensors_bytes(state, metadata={"format": "pt"}))
        if file_bytes > self.budget_bytes:
            raise BudgetError(
                f"The learned switch takes {file_bytes:,} bytes, more than the budget of {self.budget_bytes:,} bytes; "
                "ask for a slightly larger budget."
            )
        if file_bytes < (1 - SIZE_TOLERANCE) * self.budget_bytes:
            logger.warning(
                "The learned switch takes %s bytes, less than the budget of %s: its units cannot use more (raise "
                "candidate_fraction or allow more bit-widths to spend it).",
                f"{file_bytes:,}",
                f"{self.budget_bytes:,}",
            )
        kept = sum(int(s.kept) for *_, s in switches) + sum(int(f.kept) for p in pairs.values() for f in p.values())
        config.flexswitch = {
            "budget": str(self.config.budget),
            "budget_bytes": self.budget_bytes,
            "file_bytes": file_bytes,
            "bits_per_parameter": 8 * file_bytes / self.parameters_count,
            "fraction_of_fp32": file_bytes / (4 * self.parameters_count),
            "density": kept / self.parameters_count,
            "init_density": self.init_density,
            "bit_widths": list(self.config.bit_widths),
            "steps": self.steps_run,
            "loss": self.loss_kind,
            "initial_loss": self.initial_loss,
            "final_loss": self.final_loss,
            "seed": self.config.seed,
        }
        logger.info(
            "FlexSwitch %r: %s bytes (%.3f%% of fp32, budget %s bytes), density %.4f, %d steps.",
            self.adapter_name,
            f"{file_bytes:,}",
            100 * file_bytes / (4 * self.parameters_count),
            f"{self.budget_bytes:,}",
            kept / self.parameters_count,
            self.steps_run,
        )
