"""The T-Switch tuner: injects :class:`SwitchedModule` layers into a model, PEFT style."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import math
import os
import re
from collections.abc import Iterator
from typing import Literal

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers import PreTrainedModel

from ..errors import CodecError, LayoutMismatchError
from ..format import (
    CHECKSUMS_SINCE,
    KEY_PREFIX,
    LOW_RANK_TARGET,
    LOW_RANK_UNITS,
    AdapterFile,
    Unit,
    check_unit,
    find_layout_entry,
    locate_weights_file,
    low_rank_problems,
    parse_key,
    parse_statistics_key,
    required_format_version,
    statistics_checksum,
    verify_adapter_file,
)
from ..heads import output_head_candidates
from . import combine
from .config import ALL_SUPPORTED_SHORTHAND, TSwitchConfig
from .layer import (
    SwitchedModule,
    TiedSwitchedModule,
    TSwitchLayer,
    has_running_statistics,
    is_norm_layer,
    is_supported_layer,
    switched_parameter_names,
)
from .parallel_merge import merge_in_parallel

logger = logging.getLogger(__name__)


def _output_head_names(model: nn.Module, config: TSwitchConfig) -> set[str]:
    """Modules that ``"all"`` leaves out: output heads found by structure (:func:`~switch_adapter.heads.
    output_head_candidates`), ``modules_to_save``, and an output embedding that is tied to the input embedding (it
    follows the input embedding's switch instead, see :class:`TiedSwitchedModule`).
    """
    heads = [model.get_submodule(name) for name in output_head_candidates(model)]
    tied = _tied_output_embedding(model)
    if tied is not None:
        heads.append(tied)
    names: set[str] = set()
    for name, module in model.named_modules():
        if any(module is head for head in heads):
            names.add(name)
            names.update(f"{name}.{child}" for child, _ in module.named_modules() if child)
        if config.modules_to_save and any(
            name == m or name.endswith("." + m) or f".{m}." in f".{name}." for m in config.modules_to_save
        ):
            names.add(name)
    return names


def _tied_output_embedding(model: nn.Module) -> nn.Module | None:
    """The output embedding module if its weight is the input embedding's weight, else None."""
    if not isinstance(model, PreTrainedModel):
        return None
    try:
        output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    except NotImplementedError:  # vision models and others without token embeddings
        return None
    if output is None or inputs is None:
        return None
    if isinstance(inputs, BaseTunerLayer):
        inputs = inputs.get_base_layer()
    output_base = output.get_base_layer() if isinstance(output, BaseTunerLayer) else output
    if getattr(output_base, "weight", None) is not None and output_base.weight is getattr(inputs, "weight", None):
        return output
    return None


def _warn_targeted_heads(model: nn.Module, config: TSwitchConfig) -> None:
    """Warn when explicit ``target_modules`` would binarize a module that looks like an output head."""
    if config.unit_layout:
        return  # a saved adapter being loaded: it was warned about when it was made
    saved = config.modules_to_save or ()
    for name in output_head_candidates(model):
        if _names_match(name, saved) or _is_excluded(config.exclude_modules, name):
            continue
        if check_target_module_exists(config, name):
            logger.warning(
                "target_modules selects %s, which looks like the model's output head: its switch would binarize the "
                "task's classifier, which costs most of a task's accuracy. Keep it in full precision instead: pass "
                "modules_to_save=[%r] (and leave it out of target_modules).",
                name,
                name.rpartition(".")[2],
            )


def _is_excluded(exclude_modules, name: str) -> bool:
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return re.fullmatch(exclude_modules, name) is not None
    return _names_match(name, exclude_modules)


class TSwitchModel(BaseTuner):
    """Creates T-Switch adapters on a pretrained model.

    Use it through PEFT: ``get_peft_model(model, TSwitchConfig(...))``, ``PeftModel.from_pretrained(model, path)``,
    or :func:`switch_adapter.from_finetuned` to build switches from a fine-tuned model.

    What training a switch means: the keep-masks and signs are fixed when a switch is built from a task vector
    (``from_finetuned``, ``convert_finetuned``); only the scales (one per tensor, or per row) and the
    ``modules_to_save`` (task heads) are trainable parameters. ``get_peft_model(model, TSwitchConfig())`` therefore
    creates an *empty* switch: no masks, zero scales that have no effect, so only ``modules_to_save`` can learn. It
    logs a warning saying so unless ``inference_mode=True`` (an empty placeholder to load or fill later).

    ``add_weighted_adapter`` combines switches into a new switch, with peft's argument conventions.
    """

    prefix: str = "tswitch_"
    tuner_layer_cls = TSwitchLayer
    target_module_mapping: dict = {}

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """peft's ``merge_adapter``, with the layers merged on a few threads when they all live on the CPU (see
        :mod:`switch_adapter.tswitch.parallel_merge`); the same weights as merging them one by one."""
        self._check_merge_allowed()
        if not merge_in_parallel(self.model, adapter_names, safe_merge):
            super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def __init__(self, model, peft_config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        # Module names that "all" / switch_norms resolved to, per config. They stay out of the config itself so
        # that the saved config says "all" and peft does not mistake switched embeddings for resized ones.
        self._resolved_targets: dict[int, set[str]] = {}
        self._module_names: set[str] | None = None  # see _own_entry
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def _check_target_module_exists(self, peft_config: TSwitchConfig, key: str):
        resolved = self._resolved_targets.get(id(peft_config))
        if resolved is not None:
            return key in resolved
        return check_target_module_exists(peft_config, key)

    def _check_tied_modules(self, model: nn.Module, peft_config: TSwitchConfig) -> None:
        """Tied output embeddings are handled by :class:`TiedSwitchedModule`; peft's warnings do not apply."""

    def _check_merge_allowed(self) -> None:
        """Merging is always allowed: a tied output embedding is merged through its input embedding."""

    def _prepare_adapter_config(self, peft_config: TSwitchConfig, model_config: dict) -> TSwitchConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = ALL_SUPPORTED_SHORTHAND
        return peft_config

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        config: TSwitchConfig = self.peft_config[adapter_name]
        _verify_file_transformers_is_loading(config)  # before anything is modified
        resolved = self._resolve_target_modules(model, config)
        if resolved is not None:
            self._resolved_targets[id(config)] = resolved
        else:
            _warn_targeted_heads(model, config)
        self._check_layout_fits(model, config)  # before anything is modified
        self._warn_if_empty_trainable(model, config, adapter_name)
        self._module_names = None
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        finally:
            self._module_names = None
        self._resize_modules_to_save(model, config, adapter_name)
        self._follow_tied_embedding(model)
        if isinstance(model, PreTrainedModel):
            model.add_model_tags(["t-switch", "switch-adapter"])

    @staticmethod
    def _warn_if_empty_trainable(model: nn.Module, config: TSwitchConfig, adapter_name: str) -> None:
        """Say what training an empty switch can and cannot do (see the class docstring)."""
        if config.unit_layout or config.inference_mode or _FILLING_SWITCHES.get():
            return
        if any(param.is_meta for param in model.parameters()):
            return  # a meta skeleton (converters plan the file layout with one), never trained
        heads = f" and {sorted(config.modules_to_save)}" if config.modules_to_save else ""
        logger.warning(
            "T-Switch adapter %r was created empty. A switch learns only its scales and modules_to_save in "
            "training: its keep-masks and signs are fixed when it is built from a task vector, and an empty switch "
            "has none, so its zero scales have no effect and only the modules_to_save%s can learn. Build a switch "
            "from a fine-tuned model with switch_adapter.from_finetuned(base, finetuned, config) or "
            "switch_adapter.convert_finetuned(...); pass TSwitchConfig(inference_mode=True) for an empty "
            "placeholder.",
            adapter_name,
            heads,
        )

    # -- target resolution -------------------------------------------------------------------------------

    @staticmethod
    def _resolve_target_modules(model: nn.Module, config: TSwitchConfig) -> set[str] | None:
        """The module names ``"all"`` and ``switch_norms`` stand for, or None when ``target_modules`` says it all."""
        wants_all = isinstance(config.target_modules, str) and config.target_modules == ALL_SUPPORTED_SHORTHAND
        if not wants_all and not config.switch_norms:
            return None
        heads = _output_head_names(model, config)
        adapter_internals = {
            f"{name}.{child}"
            for name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer)
            for child, _ in module.named_modules()
            if child
        }
        names: set[str] = set()
        for name, module in model.named_modules():
            if not name or name in heads or name in adapter_internals:
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if isinstance(module, ModulesToSaveWrapper) or not is_supported_layer(base):
                continue
            if _is_excluded(config.exclude_modules, name):
                continue
            if wants_all or is_norm_layer(base) or check_target_module_exists(config, name):
                names.add(name)
        if not names:
            raise ValueError(
                f"T-Switch found no supported layer (Linear, Embedding, Conv1D, Conv2d, norm incl. BatchNorm) to "
                "switch in "
                f"{type(model).__name__}; pass target_modules explicitly."
            )
        return names

    # -- layout checks -----------------------------------------------------------------------------------

    @staticmethod
    def _check_layout_fits(model: nn.Module, config: TSwitchConfig) -> None:
        """Raise :class:`LayoutMismatchError` naming the module if a saved switch does not fit ``model``."""
        modules = dict(model.named_modules())
        problems: list[str] = []
        head_fix = _check_saved_heads(model, modules, config, problems)
        for layout_key, params in (config.unit_layout or {}).items():
            matches = [
                name
                for name in modules
                if name == layout_key or name.endswith("." + layout_key) or layout_key.endswith("." + name)
            ]
            matches = [m for m in matches if "." + m.split(".")[-1] == "." + layout_key.split(".")[-1]]
            matches.sort(key=lambda name: name != layout_key)  # the exact name first (EfficientNet: _bn0 and x._bn0)
            if not matches:
                problems.append(f"{layout_key}: no module of that name in {type(model).__name__}")
                continue
            module = modules[matches[0]]
            if isinstance(module, BaseTunerLayer):
                module = module.get_base_layer()
            problems.extend(f"{layout_key}: {problem}" for problem in low_rank_problems(params))
            for param_name, entry in params.items():
                shape = entry["shape"]
                if param_name in LOW_RANK_UNITS:  # a factor: its product must make the weight
                    param_name, shape = LOW_RANK_TARGET, entry.get("target_shape")
                param = getattr(module, param_name, None)
                if not isinstance(param, torch.Tensor):
                    problems.append(f"{layout_key}.{param_name}: the base module has no such parameter")
                elif list(param.shape) != list(shape or []):
                    problems.append(
                        f"{layout_key}.{param_name}: switch made for shape {list(entry['shape'])}, "
                        f"base model has {list(param.shape)}"
                    )
        for stats_key, shapes in (config.norm_statistics or {}).items():
            found = [name for name in modules if _names_match(name, [stats_key]) or _names_match(stats_key, [name])]
            found.sort(key=lambda name: name != stats_key)  # the exact name first
            module = modules[found[0]] if found else None
            if isinstance(module, BaseTunerLayer):
                module = module.get_base_layer()
            if module is None or not has_running_statistics(module):
                problems.append(f"{stats_key}: running statistics for a module this model lacks or that has none")
                continue
            for stat_name, shape in shapes.items():
                if list(getattr(module, stat_name).shape) != list(shape):
                    problems.append(
                        f"{stats_key}.{stat_name}: statistics of shape {list(shape)}, "
                        f"base model has {list(getattr(module, stat_name).shape)}"
                    )
        if problems:
            shown = "\n  ".join(problems[:10]) + (
                f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            )
            base = config.base_model_name_or_path or "the base model it was created from"
            fix = head_fix or f"Load it onto {base} (same architecture and sizes)"
            raise LayoutMismatchError(
                f"This T-Switch adapter does not fit {type(model).__name__}:\n  {shown}\n{fix}; nothing was modified."
            )

    # -- module creation -------------------------------------------------------------------------------

    def _own_entry(self, layout: dict, module_name: str) -> dict | None:
        """``find_layout_entry``, except that a key naming another module of this model is never taken for
        ``module_name`` by suffix (a frozen ``norm`` must not get the entry of ``block.norm``)."""
        if not layout:
            return None
        if module_name in layout:
            return layout[module_name]
        if self._module_names is None:  # once per injection: module names do not change while layers are wrapped
            self._module_names = {name for name, _ in self.model.named_modules()}
        return find_layout_entry(layout, module_name, self._module_names)

    def _create_and_replace(
        self,
        peft_config: TSwitchConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not is_supported_layer(base):
            raise TypeError(
                f"Target module {current_key} ({type(base).__name__}) is not supported by T-Switch. Supported: "
                "torch.nn.Linear, torch.nn.Embedding, transformers' Conv1D, torch.nn.Conv2d and norm layers "
                "(LayerNorm, RMSNorm, GroupNorm, BatchNorm, InstanceNorm and other layers with running statistics)."
            )
        param_names = switched_parameter_names(base, peft_config.switch_bias or is_norm_layer(base))
        layout = self._own_entry(peft_config.unit_layout, current_key) or {}
        with_checksums = peft_config.format_version >= CHECKSUMS_SINCE
        with_statistics = self._own_entry(peft_config.norm_statistics or {}, current_key) is not None
        if isinstance(target, TSwitchLayer):
            target.update_layer(
                adapter_name, layout, param_names, peft_config.inference_mode, with_checksums, with_statistics
            )
            return
        new_module = SwitchedModule(
            target, adapter_name, layout, param_names, peft_config.inference_mode, with_checksums, with_statistics
        )
        new_module.tswitch_module_name = current_key
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """peft's replacement, except for a ``modules_to_save`` head being unloaded: its copy is complete as it is,
        and a container head (ResNet's ``classifier``, a ``Sequential``) has no ``weight`` for peft to carry over."""
        if isinstance(child, ModulesToSaveWrapper):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    @staticmethod
    def _follow_tied_embedding(model: nn.Module) -> None:
        """Make an output layer tied to a switched input embedding apply that embedding's switches too."""
        output = _tied_output_embedding(model)
        if output is None:
            return
        inputs = model.get_input_embeddings()
        if isinstance(output, TiedSwitchedModule) or not isinstance(inputs, SwitchedModule):
            return
        name = next(name for name, module in model.named_modules() if module is output)
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, TiedSwitchedModule(output, inputs))

    @staticmethod
    def _resize_modules_to_save(model: nn.Module, config: TSwitchConfig, adapter_name: str) -> None:
        """Give this adapter's copies of ``modules_to_save`` the parameter shapes recorded in the config."""
        if not config.modules_to_save_shapes:
            return
        for name, wrapper in model.named_modules():
            if not isinstance(wrapper, ModulesToSaveWrapper) or adapter_name not in wrapper.modules_to_save:
                continue
            shapes = next(
                (s for key, s in config.modules_to_save_shapes.items() if name == key or name.endswith("." + key)),
                None,
            )
            if shapes is None:
                continue
            resize_module_parameters(wrapper.modules_to_save[adapter_name], shapes)

    # -- combining switches ----------------------------------------------------------------------------

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: Literal["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"] = "linear",
        density: float | None = None,
        majority_sign_method: Literal["total", "frequency"] = "total",
    ) -> None:
        """Add a new T-Switch adapter ``adapter_name`` that combines the switches of ``adapters``, as peft's LoRA
        ``add_weighted_adapter`` does for LoRA. Reach it as ``peft_model.add_weighted_adapter(...)``.

        For every switched tensor, the dense deltas ``scale * mask * sign`` of the adapters are combined with peft's
        merge utilities (``linear``: ``sum_i weights[i] * delta_i``, i.e. task arithmetic; ``ties``, ``dare_linear``,
        ``dare_ties``, ``magnitude_prune``: peft's functions of those names, pruning at ``density``), and the result
        is binarized into a new switch with the first adapter's config (``density``, ``density_pattern``, scale
        settings). The new adapter is an ordinary T-Switch adapter: it can be activated, merged, saved and reloaded.
        It is not activated.

        Args:
            adapters: Names of the T-Switch adapters to combine. They must share their targets (``target_modules``,
                ``exclude_modules``, ``switch_bias``, ``switch_norms``, ``layers_to_transform``, ``modules_to_save``,
                ``task_type``).
            weights: One weight per adapter; negative weights subtract (task negation).
            adapter_name: Name of the new adapter; must not exist yet.
            combination_type: ``linear`` (default), ``ties``, ``dare_linear``, ``dare_ties`` or ``magnitude_prune``.
                LoRA's SVD and ``cat`` types do not apply to switches.
            density: Keep ratio of the new switch (and the pruning density of ``ties`` / ``dare_*`` /
                ``magnitude_prune``), in (0, 1]. Default: the adapters' density, which must then be the same for all
                (also their ``density_pattern``).
            majority_sign_method: ``total`` or ``frequency``, for ``ties`` and ``dare_ties``.

        Heads (``modules_to_save``): each adapter's head is its own copy of the module, or the base model's module
        if it has none. If at least one adapter has a copy, the new adapter gets the weighted average
        ``sum_i weights[i] * head_i / sum_i weights[i]``; the heads must then have the same shapes (same number of
        labels) and the weights must not sum to 0. Otherwise a ``ValueError`` names the module.

        Raises ``ValueError`` for unknown or non-T-Switch adapters, a wrong number of weights, an existing
        ``adapter_name``, an unknown ``combination_type``, adapters with other targets or densities, and heads that
        cannot be averaged; the model is then left unchanged.
        """
        config = combine.check_arguments(self.peft_config, adapters, weights, adapter_name, combination_type, density)
        weights = [float(weight) for weight in weights]
        heads = combine.weighted_heads(self.model, adapters, weights)  # checks the heads before anything is modified
        if majority_sign_method not in ("total", "frequency"):
            raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}.")

        self.peft_config[adapter_name] = config
        try:
            with filling_switches():
                self.inject_adapter(self.model, adapter_name)
            for module_name, layer in self.model.named_modules():
                if not isinstance(layer, TSwitchLayer):
                    continue
                for param_name in layer.switch_slots(adapter_name):
                    combined = combine.combined_delta(
                        layer, param_name, adapters, weights, combination_type, config.density_for(module_name),
                        majority_sign_method,
                    )  # fmt: skip
                    if combined is None or not torch.count_nonzero(combined):
                        continue
                    switch = config.binarize(combined, module_name, param_name)
                    entry = layer.set_switch(adapter_name, param_name, switch)
                    entry["density"] = config.density_for(module_name)
                    config.unit_layout.setdefault(module_name, {})[param_name] = entry
                statistics = combine.combined_statistics(layer, adapters, weights)
                if statistics is not None:
                    config.norm_statistics[module_name] = layer.set_statistics(adapter_name, statistics)
            if config.format_version >= CHECKSUMS_SINCE:  # 1-bit switches: readable by older versions again
                config.format_version = required_format_version(config.unit_layout, config.norm_statistics)
            for module_name, wrapper, state in heads:
                head = wrapper.modules_to_save[adapter_name]
                shapes = {name: list(value.shape) for name, value in state.items()}
                current = {name: list(value.shape) for name, value in head.state_dict().items()}
                if any(current.get(name) != shape for name, shape in shapes.items()):
                    resize_module_parameters(head, shapes)
                    config.modules_to_save_shapes[module_name] = shapes
                head.load_state_dict(state)
        except Exception:
            _discard_adapter(self.model, adapter_name)
            self.peft_config.pop(adapter_name, None)
            raise

    # -- serialization hooks ---------------------------------------------------------------------------

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Check every switch of the state dict (checksum, header, size) before peft loads it; on a problem the
        half-added adapter is removed again and :class:`~switch_adapter.CodecError` names the tensors."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        units: dict = {}
        for key, value in remapped.items():
            parsed = parse_key(key)
            if parsed is not None:
                module_path = key.partition(".tswitch_")[0]
                units.setdefault((module_path, parsed[0].param), {})[parsed[1]] = value
        problems = []
        for (module_path, param_name), parts in units.items():
            unit = Unit(module_path.removeprefix(KEY_PREFIX), param_name)
            if "code" not in parts or "scale" not in parts:
                problems.append(f"{unit.name}: the code or the scale is missing")
                continue
            try:
                if param_name in LOW_RANK_UNITS:  # a factor: its size is the layout's
                    entry = find_layout_entry(config.unit_layout, unit.module) or {}
                    numel = math.prod(entry[param_name]["shape"])
                else:
                    numel = getattr(model.get_submodule(module_path).get_base_layer(), param_name).numel()
            except (AttributeError, KeyError) as error:
                problems.append(f"{unit.name}: {error!r}")
                continue
            status = check_unit(
                unit,
                parts["code"],
                parts["scale"],
                parts.get("checksum"),
                format_version=config.format_version,
                numel=numel,
            )
            problems.extend(f"{unit.name}: {problem}" for problem in status.problems)
        problems.extend(_statistics_problems(remapped))
        if problems:
            _discard_adapter(model, adapter_name)
            raise CodecError(
                "The T-Switch adapter file does not fit or is damaged:\n  "
                + "\n  ".join(problems[:10])
                + "\nRe-save or re-download the adapter (adapter_model.safetensors); the adapter was not added."
            )
        return remapped


def _statistics_problems(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Checksum problems of the running statistics in a state dict about to be loaded."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        parsed = parse_statistics_key(key)
        if parsed is not None:
            parts.setdefault(parsed[0], {})[parsed[1]] = value
    problems = []
    for module, found in parts.items():
        if set(found) != {"running_mean", "running_var", "crc"}:
            problems.append(f"{module}: running statistics incomplete")
        elif not torch.equal(
            found["crc"].reshape(-1).cpu(), statistics_checksum(found["running_mean"], found["running_var"])
        ):
            problems.append(f"{module}: running statistics checksum mismatch (changed after they were saved)")
    return problems


def _verify_file_transformers_is_loading(config: TSwitchConfig) -> None:
    """Verify the weights file that transformers' ``PreTrainedModel.load_adapter`` is about to load.

    transformers injects the adapter (this tuner) before it reads the weights with its own loader, and tells the tuner
    nothing about the file; ``PeftModel.from_pretrained`` verifies the file in ``TSwitchConfig.from_pretrained``
    instead. So the file is found from ``load_adapter``'s arguments on the call stack and checked here, before the
    model is modified. Nothing happens outside that call.
    """
    frame = inspect.currentframe()
    while frame is not None:
        code = frame.f_code
        if code.co_name == "load_adapter" and "transformers" in code.co_filename.replace(os.sep, "/").split("/"):
            arguments = frame.f_locals
            peft_model_id = arguments.get("peft_model_id")
            if peft_model_id is None or arguments.get("adapter_state_dict") is not None:
                return
            download_kwargs = dict(getattr(arguments.get("load_config"), "download_kwargs", None) or {})
            subfolder = download_kwargs.pop("subfolder", None)
            weights = locate_weights_file(str(peft_model_id), subfolder or None, download_kwargs)
            if weights is not None:
                verify_adapter_file(weights, config.unit_layout, config.format_version, config.norm_statistics)
            config._weights_file = weights  # lets the layout check compare the saved heads' shapes
            return
        frame = frame.f_back


_FILLING_SWITCHES: contextvars.ContextVar[bool] = contextvars.ContextVar("tswitch_filling_switches", default=False)


@contextlib.contextmanager
def filling_switches() -> Iterator[None]:
    """Adapters created inside this block are filled with switches right away: no warning that they are empty."""
    token = _FILLING_SWITCHES.set(True)
    try:
        yield
    finally:
        _FILLING_SWITCHES.reset(token)


def _names_match(name: str, suffixes) -> bool:
    return any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)


def _check_saved_heads(
    model: nn.Module, modules: dict[str, nn.Module], config: TSwitchConfig, problems: list[str]
) -> str | None:
    """Append a line to ``problems`` for every ``modules_to_save`` tensor of the adapter file (known when the config
    came from ``TSwitchConfig.from_pretrained``) whose shape differs from what loading would allocate: the shape
    recorded in ``modules_to_save_shapes``, else the base model's. Returns how to fix it, or None if all fit."""
    path = getattr(config, "_weights_file", None)
    if not path or not config.modules_to_save:
        return None
    labels = None
    with AdapterFile(path) as file:  # shapes from the header only: no tensor data is read
        saved_shapes = {KEY_PREFIX + key: file.shape_and_dtype(KEY_PREFIX + key)[0] for key in file.head_keys()}
    for key, saved in saved_shapes.items():
        key = key.removeprefix(KEY_PREFIX)
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            head_name, rel = ".".join(parts[:cut]), ".".join(parts[cut:])
            if head_name in modules and _names_match(head_name, config.modules_to_save):
                break
        else:
            continue  # not a head of this model: peft reports the key as unexpected
        head = modules[head_name]
        head = head.original_module if isinstance(head, ModulesToSaveWrapper) else head
        recorded = next((s for n, s in config.modules_to_save_shapes.items() if _names_match(head_name, [n])), {})
        tensor = head.state_dict().get(rel)
        expected = recorded.get(rel, list(tensor.shape) if tensor is not None else None)
        if expected is None or list(expected) == saved:
            continue
        problems.append(
            f"{key} (modules_to_save head): the adapter's tensor has shape {saved}, this model's has {list(expected)}"
        )
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        if rel.endswith("weight") and not recorded and num_labels == expected[0] and saved[0] != expected[0]:
            labels = saved[0]
    if not problems:
        return None
    if labels is not None:
        return (
            f"The adapter's head has {labels} labels: load it onto a base model with num_labels={labels} "
            f"(e.g. AutoModelForSequenceClassification.from_pretrained(..., num_labels={labels})), or build a switch "
            "for this head with from_finetuned"
        )
    return "Load it onto a base model whose heads have the adapter's shapes, or build a switch for this model"


def resize_module_parameters(module: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Replace parameters of ``module`` with uninitialised ones of the given shapes (filled by a later load)."""
    for param_name, shape in shapes.items():
        old = getattr(module, param_name, None)
        if not isinstance(old, nn.Parameter) or list(old.shape) == list(shape):
            continue
        setattr(
            module,
            param_name,
            nn.Parameter(torch.zeros(shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad),
        )
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and weight is not None:
        module.out_features, module.in_features = weight.shape


def _discard_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove a half-loaded adapter: its layer entries, layers left without adapters, and its config."""
    for name, module in list(model.named_modules()):
        if isinstance(module, TSwitchLayer) and adapter_name in module._all_available_adapter_names():
            remaining = [a for a in module._all_available_adapter_names() if a != adapter_name]
            module.delete_adapter(adapter_name)
            if not remaining:
                parent_name, _, child_name = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child_name, module.get_base_layer())
    for owner in (model, getattr(model, "base_model", None)):
        peft_config = getattr(owner, "peft_config", None)
        if isinstance(peft_config, dict):
            peft_config.pop(adapter_name, None)
