"""Build T-Switch adapters in memory from a fine-tuned model or from task vectors."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping
from typing import Any, Union

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import ModulesToSaveWrapper
from peft.utils.constants import SEQ_CLS_HEAD_NAMES
from torch import nn
from tqdm.auto import tqdm

from ..codec.binarize import BinarySwitch
from ..format import STATISTICS, required_format_version, statistics_bytes, storage_summary
from ..heads import changed_heads, head_parameter_names, log_heads, output_head_candidates, tensors_differ
from .config import ALL_SUPPORTED_SHORTHAND, TSwitchConfig
from .layer import TSwitchLayer, has_running_statistics
from .model import _discard_adapter, filling_switches, resize_module_parameters

logger = logging.getLogger(__name__)

StateLike = Union[nn.Module, Mapping[str, torch.Tensor]]  # noqa: UP007 (a runtime alias, Python 3.10)


def _state_of(source: StateLike) -> dict[str, torch.Tensor]:
    if isinstance(source, PeftModel):
        raise TypeError("Pass the fine-tuned model itself, not a PeftModel (merge_and_unload() it first).")
    if isinstance(source, nn.Module):
        return dict(source.state_dict(keep_vars=False))
    if isinstance(source, Mapping):
        return dict(source)
    raise TypeError(f"Expected an nn.Module or a mapping of tensors, got {type(source).__name__}.")


def _lookup(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor | None:
    """``state[key]``, tolerating a head-class prefix on either side (``bert.encoder...`` vs ``encoder...``)."""
    if key in state:
        return state[key]
    candidates = [k for k in state if k.endswith("." + key) or key.endswith("." + k)]
    return state[candidates[0]] if len(candidates) == 1 else None


def from_finetuned(
    base_model: nn.Module,
    finetuned: StateLike | None = None,
    config: TSwitchConfig | None = None,
    *,
    task_vectors: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    progress: bool = True,
    calibration_examples: Any = None,
) -> PeftModel:
    """Create a T-Switch adapter from a fine-tuned model (or task vectors) and attach it to ``base_model``.

    Args:
        base_model: The pre-trained model. A ``PeftModel`` gets the switch as an additional adapter.
        finetuned: The fine-tuned model, or its state dict, with the same architecture as ``base_model``.
        config: The switch configuration (targets, density, ...); default ``TSwitchConfig()``.
        task_vectors: Instead of ``finetuned``: ``{parameter name: finetuned - pretrained}``.
        adapter_name: Name of the new adapter.
        progress: Show a progress bar over the switched tensors.
        calibration_examples: Unlabeled inputs of the task (a tensor batch, a dict of tensors, an iterable of
            batches or a DataLoader): when given, the running statistics of the switched norm layers (BatchNorm) are
            re-estimated with the switch active, see :func:`switch_adapter.recalibrate_norm_statistics`.

    Returns:
        A ``PeftModel`` with the adapter active. Modules in ``config.modules_to_save`` (task heads) are copied from
        ``finetuned`` in full precision, also when their shapes differ from the base model's. With
        ``config.modules_to_save=None``, the output heads (found by structure, see :mod:`switch_adapter.heads`)
        that the fine-tune changed become ``modules_to_save``. Norm layers with running statistics (BatchNorm)
        carry the fine-tuned statistics exactly (``config.norm_statistics``).

    Raises ``ValueError`` naming the tensor for shape mismatches or NaN/Inf values; ``base_model`` is then left as
    it was.
    """
    if (finetuned is None) == (task_vectors is None):
        raise ValueError("Pass exactly one of `finetuned` (a model or state dict) or `task_vectors`.")
    config = config if config is not None else TSwitchConfig()
    if not isinstance(config, TSwitchConfig):
        raise TypeError(f"config must be a TSwitchConfig, got {type(config).__name__}.")
    finetuned_state = _state_of(finetuned) if finetuned is not None else None
    vectors = dict(task_vectors) if task_vectors is not None else None

    plain_base = base_model.get_base_model() if isinstance(base_model, PeftModel) else base_model
    if config.norm_statistics:  # a config reused from an earlier switch: those statistics are not this switch's
        config = copy.copy(config)
        config.norm_statistics = {}
    if config.modules_to_save is None and finetuned_state is not None:
        heads_found = [
            name
            for name in finetuned_heads(plain_base, finetuned_state)
            if not _targets(config, name) and name.rpartition(".")[2] not in _heads_peft_adds(config)
        ]
        if heads_found:
            config = copy.copy(config)  # the caller's config stays as it was
            config.modules_to_save = heads_found
            config.norm_statistics = {}
            log_heads(heads_found, "found by structure, changed by the fine-tune")
    original_state = plain_base.state_dict()
    with switch_adapter_for(base_model, config, adapter_name) as model:
        inner = model.get_base_model()
        switches = _compute_switches(inner, adapter_name, config, finetuned_state, vectors, progress)
        heads = head_updates(inner, adapter_name, finetuned_state)
        statistics = finetuned_statistics(inner, adapter_name, finetuned_state)
        store_switches(model, adapter_name, switches, heads)
        store_statistics(model, adapter_name, statistics)
        if calibration_examples is not None:
            from ..norm_stats import recalibrate_norm_statistics

            recalibrate_norm_statistics(model, calibration_examples, adapter_name=adapter_name, progress=progress)
    if finetuned_state is not None:
        _warn_uncovered(original_state, finetuned_state, model.peft_config[adapter_name], [h[0] for h in heads])
    _log_summary(model.peft_config[adapter_name], adapter_name)
    return model


def _heads_peft_adds(config: TSwitchConfig) -> tuple[str, ...]:
    """The head names peft adds to ``modules_to_save`` by itself for the config's task type."""
    task_type = str(getattr(config.task_type, "value", config.task_type) or "")
    if task_type in ("SEQ_CLS", "TOKEN_CLS"):
        return tuple(SEQ_CLS_HEAD_NAMES)
    if task_type == "QUESTION_ANS":
        return ("qa_outputs",)
    return ()


def _targets(config: TSwitchConfig, name: str) -> bool:
    """True when explicit ``target_modules`` select module ``name`` (the tuner then warns if it is a head)."""
    if isinstance(config.target_modules, str) and config.target_modules == ALL_SUPPORTED_SHORTHAND:
        return False
    return bool(check_target_module_exists(config, name))


def finetuned_heads(model: nn.Module, finetuned_state: Mapping[str, torch.Tensor]) -> list[str]:
    """The output head candidates of ``model`` (:func:`~switch_adapter.heads.output_head_candidates`) whose
    parameters the fine-tune changed (values or shapes)."""
    candidates = output_head_candidates(model)
    if not candidates:
        return []
    base_state = model.state_dict()

    def differs(key: str) -> bool:
        return tensors_differ(_lookup(base_state, key), _lookup(finetuned_state, key))

    return changed_heads(candidates, lambda name: head_parameter_names(model, name), differs)


def finetuned_statistics(
    inner: nn.Module, adapter_name: str, finetuned_state: Mapping[str, torch.Tensor] | None
) -> list[tuple[str, TSwitchLayer, dict[str, torch.Tensor]]]:
    """``(module name, layer, {running_mean, running_var})`` of the fine-tuned model for every norm layer with
    running statistics that ``adapter_name`` targets and whose statistics the fine-tune changed. Raises
    ``ValueError`` naming the buffers that have other shapes than the base model's."""
    found, problems = [], []
    if finetuned_state is None:
        return found
    for module_name, layer in inner.named_modules():
        if not isinstance(layer, TSwitchLayer) or not layer.is_targeted_by(adapter_name):
            continue
        base = layer.get_base_layer()
        if not has_running_statistics(base):
            continue
        tuned = {name: _lookup(finetuned_state, f"{module_name}.{name}") for name in STATISTICS}
        if any(value is None for value in tuned.values()):
            continue  # a fine-tune without these buffers (e.g. a state dict of parameters only): nothing to carry
        shapes_ok = True
        for name, value in tuned.items():
            if value.shape != getattr(base, name).shape:
                problems.append(f"{module_name}.{name}: fine-tuned shape {list(value.shape)}")
                shapes_ok = False
        if shapes_ok and any(tensors_differ(getattr(base, name), value) for name, value in tuned.items()):
            found.append((module_name, layer, tuned))
    if problems:
        raise ValueError(
            "The fine-tuned running statistics do not fit the base model:\n  " + "\n  ".join(problems[:10])
        )
    return found


def store_statistics(
    model: PeftModel, adapter_name: str, statistics: list[tuple[str, TSwitchLayer, dict[str, torch.Tensor]]]
) -> None:
    """Put running statistics (from :func:`finetuned_statistics`) into their layers and the adapter config's
    ``norm_statistics``, and raise the config's format version to what they need."""
    config = model.peft_config[adapter_name]
    for module_name, layer, values in statistics:
        config.norm_statistics[module_name] = layer.set_statistics(adapter_name, values)
    if statistics:
        config.format_version = required_format_version(config.unit_layout, config.norm_statistics)


@contextlib.contextmanager
def switch_adapter_for(base_model: nn.Module, config: TSwitchConfig, adapter_name: str) -> Iterator[PeftModel]:
    """A ``PeftModel`` with an empty switch adapter ``adapter_name`` on ``base_model`` (a new one, or ``base_model``
    itself if it is a ``PeftModel``). If the block raises, the adapter is removed again and the base model is left as
    it was."""
    is_new = not isinstance(base_model, PeftModel)
    with filling_switches():
        if is_new:
            model = get_peft_model(base_model, config, adapter_name=adapter_name)
        else:
            model = base_model
            model.add_adapter(adapter_name, config)
    try:
        yield model
    except BaseException:
        if is_new:
            _put_back_original_modules(model)
            model.unload()
        else:
            _discard_adapter(model, adapter_name)
        raise


def _put_back_original_modules(model: PeftModel) -> None:
    """Replace every ``modules_to_save`` wrapper by the module it wraps: peft's ``unload()`` would leave the adapter's
    copy (the fine-tuned head) in the base model instead."""
    inner = model.get_base_model()
    for name, module in list(inner.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, child = name.rpartition(".")
            setattr(inner.get_submodule(parent) if parent else inner, child, module.original_module)


def switch_units(inner: nn.Module, adapter_name: str) -> list[tuple[str, TSwitchLayer, str]]:
    """``(module name, layer, parameter name)`` of every parameter ``adapter_name`` may switch, in model order."""
    return [
        (module_name, layer, param_name)
        for module_name, layer in inner.named_modules()
        if isinstance(layer, TSwitchLayer)
        for param_name in layer.switch_slots(adapter_name)
    ]


def store_switches(
    model: PeftModel,
    adapter_name: str,
    switches: list[tuple[str, TSwitchLayer, str, BinarySwitch]],
    heads: list = (),
) -> None:
    """Put ``switches`` into their layers and the adapter config's ``unit_layout``, and the fine-tuned heads into the
    adapter's ``modules_to_save`` copies; then make the adapter active."""
    config = model.peft_config[adapter_name]
    config.unit_layout = {}
    for module_name, layer, param_name, switch in switches:
        entry = layer.set_switch(adapter_name, param_name, switch)
        entry["density"] = switch.kept / max(switch.numel, 1) if config.flexswitch else config.density_for(module_name)
        config.unit_layout.setdefault(module_name, {})[param_name] = entry
    config.format_version = required_format_version(config.unit_layout, config.norm_statistics)
    for module_name, wrapper_copy, state, shapes in heads:
        if shapes:
            resize_module_parameters(wrapper_copy, shapes)
            config.modules_to_save_shapes[module_name] = shapes
        wrapper_copy.load_state_dict(state)
    model.set_adapter(adapter_name)


def _compute_switches(
    inner: nn.Module,
    adapter_name: str,
    config: TSwitchConfig,
    finetuned_state: dict[str, torch.Tensor] | None,
    vectors: dict[str, torch.Tensor] | None,
    progress: bool,
) -> list[tuple[str, TSwitchLayer, str, BinarySwitch]]:
    jobs = switch_units(inner, adapter_name)
    problems, switches = [], []
    for module_name, layer, param_name in tqdm(jobs, desc="Binarizing task vectors", disable=not progress):
        key = f"{module_name}.{param_name}"
        base_param = getattr(layer.get_base_layer(), param_name)
        if vectors is not None:
            tau = _lookup(vectors, key)
            if tau is None:
                continue
        else:
            tuned = _lookup(finetuned_state, key)
            if tuned is None:
                problems.append(f"{key}: missing from the fine-tuned model")
                continue
            if tuned.shape != base_param.shape:
                problems.append(f"{key}: fine-tuned shape {list(tuned.shape)} != base {list(base_param.shape)}")
                continue
            tau = tuned.to(device=base_param.device, dtype=torch.float32) - base_param.detach().float()
        if tau.shape != base_param.shape:
            problems.append(f"{key}: task vector shape {list(tau.shape)} != base {list(base_param.shape)}")
            continue
        if not torch.count_nonzero(tau):
            continue  # an unchanged tensor gets no switch
        switches.append((module_name, layer, param_name, config.binarize(tau, module_name, param_name)))
    if problems:
        raise ValueError(
            "The fine-tuned weights do not fit the base model:\n  "
            + "\n  ".join(problems[:10])
            + ("\n  ..." if len(problems) > 10 else "")
            + "\nBoth must have the same architecture and sizes; nothing was modified."
        )
    return switches


def head_updates(inner: nn.Module, adapter_name: str, finetuned_state: Mapping[str, torch.Tensor] | None) -> list:
    """For every ``modules_to_save`` wrapper: the fine-tuned state to load into this adapter's copy."""
    updates = []
    if finetuned_state is None:
        return updates
    for module_name, wrapper in inner.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper) or adapter_name not in wrapper.modules_to_save:
            continue
        copy = wrapper.modules_to_save[adapter_name]
        state, shapes = {}, {}
        for param_name, param in copy.state_dict().items():
            tuned = _lookup(finetuned_state, f"{module_name}.{param_name}")
            if tuned is None:
                raise ValueError(
                    f"{module_name}.{param_name} is in modules_to_save but missing from the fine-tuned model."
                )
            state[param_name] = tuned.detach().to(dtype=param.dtype, device=param.device)
            if tuned.shape != param.shape:
                shapes[param_name] = list(tuned.shape)
        updates.append((module_name, copy, state, shapes))
    return updates


def _warn_uncovered(
    original_state: dict[str, torch.Tensor],
    finetuned_state: dict[str, torch.Tensor],
    config: TSwitchConfig,
    head_names: list[str],
) -> None:
    """Log the tensors the fine-tune changed that neither a switch nor ``modules_to_save`` carries."""
    covered_ptrs = set()
    covered = set()
    for module_name, params in config.unit_layout.items():
        for param_name in params:
            covered.add(f"{module_name}.{param_name}")
    for module_name, stats in config.norm_statistics.items():
        covered.update(f"{module_name}.{name}" for name in stats)
    for key, value in original_state.items():
        if key.replace(".base_layer", "") in covered:
            covered_ptrs.add(value.data_ptr())
    missed = []
    for key, value in original_state.items():
        plain = key.replace(".base_layer", "")
        if plain in covered or value.data_ptr() in covered_ptrs or ".tswitch_" in key:
            continue
        if plain.endswith("num_batches_tracked"):  # a counter, not carried (see docs/adapter.md)
            continue
        if any(plain.startswith(head + ".") or f".{head}." in f".{plain}" for head in head_names):
            continue
        tuned = _lookup(finetuned_state, plain)
        if tuned is not None and tuned.shape == value.shape and not torch.equal(tuned.to(value.dtype), value):
            missed.append(plain)
    if missed:
        logger.warning(
            "%d tensor(s) changed by the fine-tune are not in the switch (not targeted and not in modules_to_save), "
            "so their changes are dropped: %s%s. Add them to target_modules or modules_to_save to keep them.",
            len(missed),
            ", ".join(missed[:8]),
            ", ..." if len(missed) > 8 else "",
        )


def _log_summary(config: TSwitchConfig, adapter_name: str) -> None:
    if config.norm_statistics:
        logger.info(
            "T-Switch %r carries the running statistics of %d norm layer(s) in full precision (%d bytes).",
            adapter_name,
            len(config.norm_statistics),
            statistics_bytes(config.norm_statistics),
        )
    summary = storage_summary(config)
    if summary.parameters:
        logger.info(
            "T-Switch %r: %d tensors, %d parameters, %.2f%% kept, %.3f bits/parameter (%.2f%% of fp32).",
            adapter_name,
            summary.units,
            summary.parameters,
            100.0 * summary.density,
            summary.bits_per_parameter,
            100.0 * summary.fraction_of_fp32,
        )
