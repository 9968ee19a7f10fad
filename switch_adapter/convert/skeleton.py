"""The base architecture on the meta device: what a checkpoint's tensors are called in the model, and what peft
would save for a T-Switch on it.

Nothing here allocates weights. The model class is instantiated from its config under ``torch.device("meta")``;
checkpoint keys are mapped onto its parameter names with transformers' own loading rules (the key renames of
``get_model_conversion_mapping`` and the ``base_model_prefix`` added or removed, as in ``from_pretrained``); and the
T-Switch adapter is injected into a meta copy with ``get_peft_model``, so the switched modules, the ``modules_to_save``
wrappers and the saved key names are exactly those peft produces and loads.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field

import torch
import transformers
from peft import get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import ModulesToSaveWrapper
from peft.utils.constants import SEQ_CLS_HEAD_NAMES
from torch import nn
from transformers import PreTrainedModel

from .._model_sources import TASK_AUTO_CLASSES
from ..format import KEY_PREFIX, parse_key
from ..tswitch.config import TSwitchConfig
from ..tswitch.layer import (
    TSwitchLayer,
    has_running_statistics,
    is_norm_layer,
    is_supported_layer,
    switched_parameter_names,
)
from ..tswitch.model import TSwitchModel
from .sources import TensorSource

logger = logging.getLogger(__name__)


_CLASS_SUFFIX_TASKS = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForCausalLM": "CAUSAL_LM",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}


# modules_to_save that peft's PeftModelFor<Task> adds by itself.
AUTOMATIC_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def automatic_heads(task_type) -> set[str]:
    """The ``modules_to_save`` names peft adds for ``task_type`` (a string or a ``TaskType``)."""
    name = getattr(task_type, "value", task_type)
    return set(AUTOMATIC_HEADS.get(str(name), ()))


def task_type_of(model_class: type) -> str | None:
    """The peft task type a transformers head class implies (``BertForSequenceClassification`` -> ``SEQ_CLS``)."""
    for suffix, task in _CLASS_SUFFIX_TASKS.items():
        if model_class.__name__.endswith(suffix):
            return task
    return None


def class_from_architectures(config) -> type | None:
    """The transformers class named first in ``config.architectures``, or None (absent, or custom code)."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return None


def class_for_task(config, task_type: str | None) -> type | None:
    """The class transformers' auto class for ``task_type`` picks for ``config``, or None."""
    auto_name = TASK_AUTO_CLASSES.get(str(task_type)) if task_type else None
    if auto_name is None:
        return None
    auto = getattr(transformers, auto_name)
    try:
        return auto._model_mapping[type(config)]
    except KeyError:
        return None


@dataclass
class KeyMap:
    """Checkpoint keys mapped onto the model's parameter names."""

    to_source: dict[str, str] = field(default_factory=dict)  # model name -> checkpoint key
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint key, reason)
    needs_conversion: list[str] = field(default_factory=list)  # keys only a transformers WeightConverter can load


@dataclass
class SwitchPlan:
    """What peft saves for a T-Switch on this architecture with a given config."""

    config: TSwitchConfig  # as peft left it (e.g. SEQ_CLS adds classifier/score to modules_to_save)
    slots: list[tuple[str, str]]  # (module name, parameter name) that a switch may cover, in model order
    heads: dict[str, list[str]]  # modules_to_save wrapper name -> names of its saved tensors (relative)
    saved_keys: dict[str, tuple[tuple[int, ...], torch.dtype]]  # saved key -> (shape, dtype) on the meta model
    statistics: list[str] = field(default_factory=list)  # targeted norm layers with running statistics (BatchNorm)

    def split_keys(self) -> tuple[dict[tuple[str, str], tuple[str, str]], dict[str, tuple[str, str]]]:
        """``({(module, param): (code key, scale key)}, {head key: (wrapper, model name of the tensor)})``."""
        switch_keys: dict[tuple[str, str], list[str]] = {}
        head_keys: dict[str, tuple[str, str]] = {}
        for key in self.saved_keys:
            parsed = parse_key(key)
            if parsed is not None:
                unit, part = parsed
                if part != "checksum":  # checksums are computed from code and scale when the file is written
                    slot = switch_keys.setdefault((unit.module, unit.param), ["", ""])
                    slot[0 if part == "code" else 1] = key
                continue
            relative = key.removeprefix(KEY_PREFIX)
            wrapper = next((w for w in self.heads if relative.startswith(w + ".")), None)
            if wrapper is None:
                raise RuntimeError(f"Unexpected key {key} in the adapter peft would save; please report this.")
            head_keys[key] = (wrapper, relative)
        return {slot: (keys[0], keys[1]) for slot, keys in switch_keys.items()}, head_keys

    def placeholders(self) -> dict[str, torch.Tensor]:
        """The saved value of every switch slot that stays empty (no change): a 0-byte code and a zero scale."""
        return {
            key: torch.zeros(shape, dtype=dtype)
            for key, (shape, dtype) in self.saved_keys.items()
            if parse_key(key) is not None
        }


class Skeleton:
    """A model class instantiated on the meta device from a config."""

    def __init__(self, model_class: type, config) -> None:
        if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
            raise TypeError(f"Expected a transformers PreTrainedModel class, got {model_class!r}.")
        self.model_class = model_class
        self._config = copy.deepcopy(config)
        self.model = self._new_model()
        self.state = self.model.state_dict()
        self.shapes = {name: tuple(value.shape) for name, value in self.state.items()}
        self.tied: dict[str, str] = {}  # alias -> the name that is counted
        first_name: dict[int, str] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if id(param) in first_name:
                self.tied[name] = first_name[id(param)]
            else:
                first_name[id(param)] = name
        self.prefix = self.model.base_model_prefix
        body = getattr(self.model, self.prefix, None) if self.prefix else None
        self.has_body = isinstance(body, nn.Module) and body is not self.model
        self.top_level = {name for name, _ in self.model.named_children()}
        self._renamings, self._converters = _transformers_key_mapping(self.model)

    def _new_model(self) -> nn.Module:
        """A new instance of the architecture on the meta device, in eval mode."""
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = self.model_class(copy.deepcopy(self._config))
        return model.eval()

    @property
    def name(self) -> str:
        return self.model_class.__name__

    # -- checkpoint keys -> model names ---------------------------------------------------------------------

    def canonical(self, key: str) -> tuple[str | None, bool]:
        """The model's name for checkpoint ``key`` (None if the model has no such tensor), and whether only a
        transformers weight converter (fused or split tensors) could load it."""
        if self._renamings is None:
            return self._with_prefix(key), False
        from transformers.core_model_loading import rename_source_key

        renamed, pattern = rename_source_key(key, self._renamings, self._converters, self.prefix, self.state)
        if renamed not in self.state and key in self.state:
            renamed, pattern = rename_source_key(key, [], [], self.prefix, self.state)
        if renamed not in self.state:
            return None, False
        return renamed, pattern is not None

    def _with_prefix(self, key: str) -> str | None:
        if key in self.state:
            return key
        if self.prefix and f"{self.prefix}.{key}" in self.state:
            return f"{self.prefix}.{key}"
        if self.prefix and key.startswith(self.prefix + ".") and key[len(self.prefix) + 1 :] in self.state:
            return key[len(self.prefix) + 1 :]
        return None

    def map_source(self, source: TensorSource) -> KeyMap:
        """Map every tensor of ``source`` onto a model name; the rest is skipped with a reason."""
        result = KeyMap()
        for key in source.info():
            name, needs_converter = self.canonical(key)
            if name is None:
                result.skipped.append((key, f"not a tensor of {self.name} (transformers does not load it either)"))
                continue
            if needs_converter:
                result.needs_conversion.append(key)
                continue
            if name in self.tied:
                result.skipped.append((key, f"tied to {self.tied[name]}: counted once"))
                continue
            if name in result.to_source:
                result.skipped.append((key, f"duplicate of {result.to_source[name]}"))
                continue
            result.to_source[name] = key
        return result

    # -- heads ------------------------------------------------------------------------------------------------

    def head_module(self, name: str) -> str:
        """The module to store in full precision when the fine-tune brings tensor ``name`` the base lacks: the whole
        task head (a top-level module outside the base model, e.g. ``classifier``), else the owning module."""
        top = name.split(".", 1)[0]
        if self.has_body and top in self.top_level and top != self.prefix:
            return top
        return name.rsplit(".", 1)[0] if "." in name else name

    def is_head(self, name: str, modules_to_save: list[str] | set[str] | None) -> bool:
        """True for tensors of a top-level module outside the base model (``classifier``, ``lm_head``, ...) or of a
        ``modules_to_save`` module: those may differ in shape between base and fine-tune (stored in full precision)."""
        top = name.split(".", 1)[0]
        if self.has_body and top in self.top_level and top != self.prefix:
            return True
        return any(owner.endswith(target) for owner in module_owners(name) for target in modules_to_save or ())

    def classification_head(self, name: str) -> str | None:
        """The top-level classification head (``classifier`` / ``score``) holding ``name``, which ``"all"`` never
        switches, or None."""
        top = name.split(".", 1)[0]
        return top if top in SEQ_CLS_HEAD_NAMES and top in self.top_level and "." in name else None

    # -- what peft saves --------------------------------------------------------------------------------------

    def plan(self, config: TSwitchConfig) -> SwitchPlan:
        """Inject the T-Switch adapter into a new meta instance of the model and read off what peft would save."""
        model = self._new_model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, copy.deepcopy(config))
            saved = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
        inner = peft_model.get_base_model()
        slots = []
        statistics = []
        heads: dict[str, list[str]] = {}
        for module_name, module in inner.named_modules():
            if isinstance(module, TSwitchLayer):
                slots.extend((module_name, param) for param in module.switch_slots("default"))
                if module.is_targeted_by("default") and has_running_statistics(module.get_base_layer()):
                    statistics.append(module_name)
            elif isinstance(module, ModulesToSaveWrapper):
                heads[module_name] = list(module.original_module.state_dict().keys())
        saved_keys = {key: (tuple(value.shape), value.dtype) for key, value in saved.items()}
        final = peft_model.peft_config["default"]
        # get_peft_model writes the (meta) model's name_or_path; keep what the caller set.
        final.base_model_name_or_path, final.revision = config.base_model_name_or_path, config.revision
        return SwitchPlan(final, slots, heads, saved_keys, statistics)

    def predicted_slots(self, config: TSwitchConfig) -> list[tuple[str, str]]:
        """The slots :meth:`plan` is expected to return for ``config``, read off the model with the tuner's own
        target rules but without injecting the adapter (milliseconds instead of peft's pass over every module). A
        guess: the converter starts encoding these while the plan is made, and keeps only what the plan confirms."""
        targets = TSwitchModel._resolve_target_modules(self.model, config)  # None: target_modules says it all
        saved = list(config.modules_to_save or ())
        slots = []
        for name, module in self.model.named_modules():
            if not name or not is_supported_layer(module):
                continue
            if any(owner.endswith(head) for owner in (*module_owners(name), name) for head in saved):
                continue  # stored whole as modules_to_save
            chosen = name in targets if targets is not None else bool(check_target_module_exists(config, name))
            if chosen:
                switch_bias = config.switch_bias or is_norm_layer(module)
                slots.extend((name, param) for param in switched_parameter_names(module, switch_bias))
        return slots


def module_owners(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _transformers_key_mapping(model: nn.Module):
    """transformers' checkpoint key renames for ``model`` as (renamings, converters), or (None, None) when this
    transformers version does not expose them (then only ``base_model_prefix`` is handled)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # pragma: no cover - transformers < 5
        logger.info("This transformers version has no checkpoint key mapping; only base_model_prefix is handled.")
        return None, None
    mapping = get_model_conversion_mapping(model)
    renamings = [item for item in mapping if isinstance(item, WeightRenaming)]
    converters = [item for item in mapping if isinstance(item, WeightConverter)]
    return renamings, converters


def build_skeleton(model_class: type, config) -> Skeleton:
    """A :class:`Skeleton`, with a clear error when the class cannot be built from ``config``."""
    try:
        return Skeleton(model_class, config)
    except Exception as error:
        raise ValueError(
            f"Could not build {model_class.__name__} from the base model's config ({type(error).__name__}: {error})."
        ) from error


class PlainSkeleton(Skeleton):
    """A plain ``nn.Module`` on the meta device (built by a factory, or a meta copy of a loaded model): checkpoint
    keys are its ``state_dict()`` keys exactly, with no transformers renames or prefixes."""

    def __init__(self, model: nn.Module) -> None:  # noqa: D107 - no super().__init__: there is no config to build from
        self.model_class = type(model)
        self.model = model
        self.model.eval()
        self.state = self.model.state_dict()
        self.shapes = {name: tuple(value.shape) for name, value in self.state.items()}
        self.tied = {}
        first_name: dict[int, str] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if id(param) in first_name:
                self.tied[name] = first_name[id(param)]
            else:
                first_name[id(param)] = name
        self.prefix = None
        self.has_body = False
        self.top_level = {name for name, _ in self.model.named_children()}
        self._renamings, self._converters = None, None

    def _new_model(self) -> nn.Module:
        return copy.deepcopy(self.model)  # no config to build from: a copy (slower for big models, same result)

    def canonical(self, key: str) -> tuple[str | None, bool]:
        return (key if key in self.state else None), False
