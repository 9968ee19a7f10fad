"""PEFT LoRA adapter -> T-Switch adapter folder.

The task vector of a LoRA module is exact and needs no base weights: ``delta_W = scaling * B @ A`` with
``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA, per-module ``rank_pattern`` / ``alpha_pattern``
resolved with peft's own matcher), transposed for Conv1D (``fan_in_fan_out``) and embedding layers, the Conv2d
formula of peft for convolutions, and ``scaling * lora_B.bias`` for the bias with ``lora_bias=True``.

Two modes:

* ``"delta"`` (default): the switch binarizes the exact ``delta_W`` of each module, as for a full fine-tune.
* ``"factors"``: the LoRA stays low-rank, as the reference converts LoRAs (its factors switched separately): each
  module's weight gets a low-rank pair (:data:`~switch_adapter.format.LOW_RANK_UNITS`) whose product approximates
  ``delta_W``. The exact update is first put in SVD form, ``left = U`` (orthonormal columns: one scale for the
  tensor) and ``right = S V^T`` (one scale per row, i.e. per singular value), so that no rank component is drowned
  by another; then each factor is switched with the config's density and ``value_bits`` bits per kept value (1 is
  T-Switch's sign). A LoRA on a convolution whose ``lora_B`` is not 1x1 keeps the delta form for that module.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft.utils.other import get_pattern_key
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel
from transformers.pytorch_utils import Conv1D

from .._staging import check_output_dir
from ..codec.binarize import quantize
from ..codec.sass import check_value_bits
from ..format import KEY_PREFIX, LOW_RANK_TARGET, LOW_RANK_UNITS, PARTS, Unit, parse_key
from ..tswitch.config import ALL_SUPPORTED_SHORTHAND, TSwitchConfig
from ..tswitch.config_checks import is_number
from .finetuned import _copy_config, encoded_entry, make_summary, record_base
from .pipeline import cyclic_gc_paused
from .plain import ModelFactory, build_model, factory_name, is_plain_module, meta_copy
from .skeleton import (
    PlainSkeleton,
    Skeleton,
    automatic_heads,
    build_skeleton,
    class_for_task,
    class_from_architectures,
    module_owners,
)
from .sources import AdapterFiles, ModelLike, open_adapter, open_config
from .summary import SkippedTensor
from .writer import write_adapter

logger = logging.getLogger(__name__)

MODES = ("delta", "factors")
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)$"
)
# LoraConfig fields whose adapters are not ``scaling * B @ A`` on the weight (or need more than the file).
_UNSUPPORTED = {
    "use_dora": "DoRA rescales the merged weight by its column norms, so its task vector depends on the base weights",
    "use_qalora": "QALoRA pools the input before lora_A",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "alora_invocation_tokens": "aLoRA only acts after its invocation tokens, so it is not a fixed weight change",
    "arrow_config": "Arrow routes between several LoRAs per token",
    "kasa_config": "KaSA changes the LoRA update",
    "velora_config": "VeLoRA changes the LoRA update",
    "monteclora_config": "MonteCLoRA samples its update",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters) is not supported",
    "trainable_token_indices": "trainable tokens store new embedding rows, not a low-rank update",
    "layer_replication": "layer replication changes the architecture",
    "megatron_config": "Megatron parallel layers are not supported",
}


@dataclass
class LoraModule:
    """The tensors of one LoRA module in the file."""

    name: str
    keys: dict[str, str] = field(default_factory=dict)  # part ("A", "B", "bias") -> file key
    embedding: bool = False


@dataclass
class LoraSettings:
    """The fields of a LoRA ``adapter_config.json`` that determine the deltas."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def scaling(self, module_name: str) -> tuple[int, float]:
        """``(r, scaling)`` of ``module_name``, with peft's rank/alpha pattern matching."""
        r = self.rank_pattern.get(get_pattern_key(self.rank_pattern.keys(), module_name), self.r)
        alpha = self.alpha_pattern.get(get_pattern_key(self.alpha_pattern.keys(), module_name), self.lora_alpha)
        return int(r), (alpha / math.sqrt(r) if self.use_rslora else alpha / r)


def read_lora_settings(config: dict[str, Any], description: str) -> LoraSettings:
    """Parse a LoRA ``adapter_config.json``; ``ValueError`` for other PEFT types and unsupported LoRA variants."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        if peft_type == "TSWITCH":
            raise ValueError(f"The {description} is already a T-Switch adapter; there is nothing to convert.")
        raise ValueError(
            f"The {description} has peft_type {peft_type or None!r} (in adapter_config.json), not 'LORA'; "
            "convert_lora converts LoRA adapters only. Merge other adapters into the base (merge_and_unload), save "
            "the model and use convert_finetuned."
        )
    for name, why in _UNSUPPORTED.items():
        if config.get(name):
            raise ValueError(
                f"The {description} uses {name}: {why}. Convert it through the merged model instead: "
                "PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(folder), then "
                "convert_finetuned(base, folder, ...). Nothing was written."
            )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"The {description} trains the base layers' biases (bias={config['bias']!r}), stored as full values "
            "rather than a low-rank update. Convert it through the merged model: PeftModel.from_pretrained(base, "
            "adapter).merge_and_unload().save_pretrained(folder), then convert_finetuned(base, folder, ...)."
        )
    return LoraSettings(
        r=_setting(config.get("r", 8), "r", int, description),
        lora_alpha=_setting(config.get("lora_alpha", 8), "lora_alpha", float, description),
        use_rslora=bool(config.get("use_rslora", False)),
        rank_pattern=_config_pattern(config, "rank_pattern", int, description),
        alpha_pattern=_config_pattern(config, "alpha_pattern", float, description),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        lora_bias=bool(config.get("lora_bias", False)),
        modules_to_save=list(config.get("modules_to_save") or []),
        task_type=config.get("task_type"),
        base_model_name_or_path=config.get("base_model_name_or_path"),
    )


def _setting(value: Any, label: str, kind: type, description: str) -> int | float:
    """``value`` of the ``adapter_config.json`` setting ``label`` as a positive whole number (``kind`` int: a rank)
    or a finite number (float: an alpha); ``ValueError`` naming the setting otherwise."""
    number = is_number(value) and math.isfinite(value)
    if number and (kind is not int or (value > 0 and value == int(value))):
        return kind(value)
    what = "a positive whole number" if kind is int else "a number"
    raise ValueError(
        f"The {description} has {label}={value!r} in adapter_config.json; it must be {what}. Fix the file or "
        "re-save the adapter with peft."
    )


def _config_pattern(config: dict[str, Any], key: str, kind: type, description: str) -> dict[str, Any]:
    pattern = config.get(key) or {}
    if not isinstance(pattern, dict):
        raise ValueError(f"The {description} has {key}={pattern!r} in adapter_config.json; it must be an object.")
    return {name: _setting(value, f"{key}[{name!r}]", kind, description) for name, value in pattern.items()}


def group_lora_tensors(
    adapter: AdapterFiles, settings: LoraSettings
) -> tuple[dict[str, LoraModule], dict[str, str], list[tuple[str, str]]]:
    """``(LoRA modules, {model name: file key} of modules_to_save tensors, skipped (key, reason))``."""
    modules: dict[str, LoraModule] = {}
    heads: dict[str, str] = {}
    skipped: list[tuple[str, str]] = []
    for key in adapter.tensors.info():
        relative = key.removeprefix(KEY_PREFIX)
        if ".lora_magnitude_vector" in relative:
            raise ValueError(f"The {adapter.description} holds DoRA magnitudes ({key}); DoRA is not supported.")
        match = _LORA_KEY.match(relative)
        if match:
            module = modules.setdefault(match["module"], LoraModule(match["module"]))
            part = match["part"]
            module.embedding = module.embedding or part.startswith("lora_embedding")
            module.keys[{"lora_A.weight": "A", "lora_embedding_A": "A", "lora_B.bias": "bias"}.get(part, "B")] = key
            continue
        plain = relative.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
        if any(owner.endswith(target) for owner in module_owners(plain) for target in settings.modules_to_save):
            heads[plain] = key
        elif ".lora_" in relative:
            raise ValueError(f"The {adapter.description} holds {key}, which is not a LoRA tensor this converter knows.")
        else:
            skipped.append(
                (key, "a full copy of a base layer saved with the LoRA (save_embedding_layers): not a change")
            )
    for module in modules.values():
        if "A" not in module.keys or "B" not in module.keys:
            raise ValueError(f"The {adapter.description} has an incomplete LoRA module {module.name} (needs A and B).")
    return modules, heads, skipped


class LoraDeltas:
    """Exact task vectors of the LoRA modules of a file, against the architecture in ``skeleton``."""

    def __init__(
        self, adapter: AdapterFiles, settings: LoraSettings, skeleton: Skeleton, modules: dict[str, LoraModule]
    ):
        self.adapter, self.settings, self.skeleton, self.modules = adapter, settings, skeleton, modules
        problems = []
        for name, module in modules.items():
            try:
                layer = skeleton.model.get_submodule(name)
            except AttributeError:
                problems.append(f"{name}: no such module in {skeleton.name}")
                continue
            problem = self._check(module, layer)
            if problem:
                problems.append(f"{name}: {problem}")
        if problems:
            raise ValueError(
                f"The {adapter.description} does not fit {skeleton.name} built from the base config:\n  "
                + "\n  ".join(problems[:10])
                + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
                + "\nIs it a LoRA of this base model? Nothing was written."
            )

    def _check(self, module: LoraModule, layer: nn.Module) -> str | None:
        info = self.adapter.tensors.info()
        a_shape, b_shape = info[module.keys["A"]].shape, info[module.keys["B"]].shape
        r, _ = self.settings.scaling(module.name)
        if len(a_shape) < 2 or len(b_shape) < 2:
            return f"lora_A {list(a_shape)} and lora_B {list(b_shape)} must both be matrices (or 4-D for convolutions)"
        if a_shape[0] != r:
            return f"lora_A has rank {a_shape[0]}, but r / rank_pattern in adapter_config.json give {r}"
        if b_shape[1] != a_shape[0]:
            return f"lora_B {list(b_shape)} has rank {b_shape[1]}, lora_A {list(a_shape)} has {a_shape[0]}"
        if isinstance(layer, nn.Embedding) != module.embedding:
            return f"{'embedding ' if module.embedding else ''}LoRA tensors on a {type(layer).__name__}"
        if not isinstance(layer, (nn.Linear, nn.Embedding, Conv1D, nn.Conv2d)):
            return f"LoRA on {type(layer).__name__} is not supported (Linear, Conv1D, Embedding, Conv2d are)"
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            return "LoRA on grouped convolutions is not supported"
        expected = tuple(layer.weight.shape)
        if isinstance(layer, nn.Conv2d):
            got = (b_shape[0], a_shape[1], *a_shape[2:]) if len(a_shape) == 4 else None
        elif isinstance(layer, nn.Embedding):
            got = (a_shape[1], b_shape[0])
        elif isinstance(layer, Conv1D):
            got = (a_shape[1], b_shape[0])
        else:
            got = (b_shape[0], a_shape[1])
        if got != expected:
            return f"the LoRA update has shape {list(got) if got else '?'}, the base weight has {list(expected)}"
        if "bias" in module.keys and getattr(layer, "bias", None) is None:
            return (
                "lora_B.bias (lora_bias=True) on a layer without bias cannot be applied (peft cannot merge it either)"
            )
        return None

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, scaling)`` of module ``name`` in fp32."""
        module = self.modules[name]
        a = self.adapter.tensors.get(module.keys["A"]).to(torch.float32)
        b = self.adapter.tensors.get(module.keys["B"]).to(torch.float32)
        return a, b, self.settings.scaling(name)[1]

    def product(self, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        """peft's ``get_delta_weight`` for module ``name`` from factors ``a`` and ``b``."""
        layer = self.skeleton.model.get_submodule(name)
        if isinstance(layer, nn.Embedding):
            return (b @ a).T * scaling
        if isinstance(layer, Conv1D):
            return (b @ a).T * scaling
        if isinstance(layer, nn.Conv2d):
            if tuple(layer.weight.shape[2:4]) == (1, 1):
                return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scaling
            return F.conv2d(a.transpose(0, 1), b).transpose(0, 1) * scaling
        return (b @ a) * scaling

    def stored_factors(
        self, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:func:`stored_lora_factors` of module ``name``."""
        return stored_lora_factors(self.skeleton.model.get_submodule(name), a, b, scaling)

    def delta(self, name: str) -> torch.Tensor:
        """The exact weight task vector of module ``name`` (fp32)."""
        a, b, scaling = self.factors(name)
        return self.product(name, a, b, scaling)

    def bias_delta(self, name: str) -> torch.Tensor | None:
        """``scaling * lora_B.bias`` of module ``name`` (fp32), or None without ``lora_bias``."""
        key = self.modules[name].keys.get("bias")
        if key is None:
            return None
        return self.adapter.tensors.get(key).to(torch.float32) * self.settings.scaling(name)[1]


@cyclic_gc_paused()
def convert_lora(
    base: ModelLike,
    lora: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: TSwitchConfig | None = None,
    *,
    mode: Literal["delta", "factors"] = "delta",
    value_bits: int = 1,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
    force: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    model_factory: ModelFactory | type | None = None,
):
    """Convert a PEFT LoRA adapter into a T-Switch adapter folder.

    Args:
        base: The model the LoRA was trained on: a local folder, a Hub repo id, or a loaded model (a transformers
            model or any ``torch.nn.Module``). Only its architecture is read (the LoRA's task vector does not need
            the base weights); with ``model_factory`` it only names the base (e.g. its safetensors file).
        lora: The LoRA adapter: a local folder or a Hub repo id (``adapter_config.json`` +
            ``adapter_model.safetensors``).
        output_dir: The adapter folder to write. It must not exist (or be empty) unless ``overwrite``.
        config: Density and other switch settings. ``target_modules="all"`` (the default) means "the modules the
            LoRA adapts"; explicit targets select among them. ``task_type`` defaults to the LoRA's.
        mode: ``"delta"`` binarizes the exact ``scaling * B @ A`` (one switch per weight); ``"factors"`` keeps the
            update low-rank: a pair of switched factors per weight, in SVD form (see the module docstring). A
            factors-mode adapter is of format version 5.
        value_bits: Bits per kept value of the factors (and of a LoRA bias) in ``"factors"`` mode: 1 (T-Switch's
            sign, the default), 2, 4 or 8. With ``config.density=1.0``, 2 bits store a LoRA in about 1/8 of its fp16
            bytes and 4 bits in about 1/4.
        revision: Hub revision of ``lora``. base_revision: of ``base``. token: Hub token.
        force: Convert even if the LoRA's ``base_model_name_or_path`` names another model than ``base``.
        overwrite: Replace an existing ``output_dir``.
        progress: Show a progress bar over the LoRA modules.
        model_factory: The architecture of a plain ``torch.nn.Module`` base: its class, a zero-argument function
            returning it, or ``"package.module:name"`` (built on the meta device).

    The LoRA's ``modules_to_save`` (task heads) are copied in full precision. Raises ``ValueError`` for other PEFT
    types, DoRA and other LoRA variants whose update is not ``B @ A``, a LoRA made for another base (unless
    ``force``), shapes that do not fit the base, and NaN/Inf values; nothing is written then.
    """
    start = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if value_bits != 1 and mode != "factors":
        raise ValueError(f"value_bits={value_bits} needs mode='factors'; delta mode stores 1-bit switches.")
    check_value_bits(value_bits)
    config = _copy_config(config)
    output_dir = check_output_dir(output_dir, overwrite, [base, lora])
    adapter = open_adapter(lora, revision=revision, token=token)
    with adapter.tensors:
        settings = read_lora_settings(adapter.config, adapter.description)
        if model_factory is not None:
            base_model = build_model(model_factory, meta=True)
            base_config, base_description = None, f"module model_factory {factory_name(model_factory)} builds"
        elif isinstance(base, nn.Module) and is_plain_module(base):
            base_config, base_model, base_description = None, meta_copy(base), f"loaded base {type(base).__name__}"
        else:
            base_config, base_model, base_description = open_config(
                base, role="base", revision=base_revision, token=token
            )
        _check_base_name(settings, base, base_model, adapter.description, force)
        modules, head_tensors, skipped = group_lora_tensors(adapter, settings)
        if not modules:
            raise ValueError(f"The {adapter.description} holds no LoRA tensors; nothing was written.")
        skeleton = _pick_skeleton(base_config, base_model, settings, modules, head_tensors, base_description)
        deltas = LoraDeltas(adapter, settings, skeleton, modules)
        config = _prepare_config(config, settings, modules, head_tensors, base, base_revision)
        plan = skeleton.plan(config)
        switch_keys, head_keys = plan.split_keys()
        tensors = plan.placeholders()
        layout: dict[str, dict[str, dict]] = {}
        head_shapes: dict[str, dict[str, list[int]]] = {}
        state = _State()
        for key, (wrapper, name) in head_keys.items():
            file_key = head_tensors.get(name)
            if file_key is None:
                raise ValueError(
                    f"{name} is in modules_to_save but not in the {adapter.description}; nothing was written."
                )
            value = adapter.tensors.get(file_key)
            state.tensors_read += 1
            _check_finite(value, file_key, adapter.description)
            tensors[key] = value
            state.head_bytes += value.numel() * value.element_size()
            if tuple(value.shape) != skeleton.shapes.get(name):
                head_shapes.setdefault(wrapper, {})[name[len(wrapper) + 1 :]] = list(value.shape)
        slots = {slot for slot in plan.slots}
        for name in modules:
            if (name, "weight") not in slots:
                skipped.append((name, "a LoRA module that config.target_modules leaves out"))
        entries: dict[tuple[str, str], dict] = {}
        for module_name in tqdm(
            [n for n in modules if (n, "weight") in slots], desc="Converting LoRA", unit="module", disable=not progress
        ):
            switches = _module_switches(deltas, module_name, config, mode, value_bits, state, adapter.description)
            for param_name, entry in switches:
                if (module_name, param_name) not in slots and param_name not in LOW_RANK_UNITS:
                    skipped.append((f"{module_name}.{param_name}", "switch_bias=False in the config"))
                    continue
                blob, scale = entry.pop("_tensors")
                code_key, scale_key = _unit_keys(switch_keys, module_name, param_name)
                owner = LOW_RANK_TARGET if param_name in LOW_RANK_UNITS else param_name
                tensors[code_key] = blob
                tensors[scale_key] = scale.to(tensors[switch_keys[(module_name, owner)][1]].dtype)
                entries[(module_name, param_name)] = entry
        for slot in plan.slots:
            if slot in entries:
                layout.setdefault(slot[0], {})[slot[1]] = entries[slot]
            if slot[1] == LOW_RANK_TARGET and (slot[0], LOW_RANK_UNITS[0]) in entries:
                for name in LOW_RANK_UNITS:
                    layout.setdefault(slot[0], {})[name] = entries[(slot[0], name)]
                weight = parse_key(switch_keys[slot][0])[0]  # the pair replaces the weight's empty placeholder
                for part in PARTS:
                    tensors.pop(weight.key(part), None)
        config = plan.config
        config.unit_layout = layout
        config.modules_to_save_shapes = head_shapes
        write_adapter(
            output_dir,
            config,
            tensors,
            model_class=skeleton.model_class,
            overwrite=overwrite,
            base_factory=factory_name(model_factory) if model_factory is not None else None,
        )
    state.plan = plan
    summary = make_summary(
        output_dir,
        f"lora-{mode}",
        config,
        start,
        state,
        [SkippedTensor(key, reason) for key, reason in skipped],
    )
    if state.kept_delta:
        summary.notes.append(
            f"factors mode: {len(state.kept_delta)} convolution(s) whose lora_B is not 1x1 keep a delta switch, e.g. "
            f"{state.kept_delta[0]}"
        )
    logger.info("%s", summary)
    return summary


@dataclass
class _State:
    tensors_read: int = 0
    unchanged: int = 0
    head_bytes: int = 0
    kept_delta: list[str] = field(default_factory=list)  # factors mode: modules whose update is no matrix product
    plan: Any = None


def _check_finite(value: torch.Tensor, key: str, description: str) -> None:
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise ValueError(
            f"{key} in the {description} holds NaN/Inf values; check the adapter (a diverged run or a broken file). "
            "Nothing was written."
        )


def _unit_keys(switch_keys: dict, module_name: str, param_name: str) -> tuple[str, str]:
    """The (code, scale) keys of a unit in the file: the plan's, or for a low-rank factor those of its module's
    weight with the factor's name."""
    if param_name not in LOW_RANK_UNITS:
        return tuple(switch_keys[(module_name, param_name)])
    unit = Unit(parse_key(switch_keys[(module_name, LOW_RANK_TARGET)][0])[0].module, param_name)
    return unit.key("code"), unit.key("scale")


def stored_lora_factors(
    layer: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(left, right)`` with ``left @ right`` = the LoRA update ``scaling * B @ A`` of ``layer`` viewed as its weight's
    ``[shape[0], numel // shape[0]]`` (the stored layout: transposed for Conv1D and embeddings, whose ``a`` is
    ``lora_embedding_A`` ``[r, tokens]``); None for a convolution whose ``lora_B`` is not 1x1 (its update is not one
    matrix product)."""
    if isinstance(layer, (nn.Embedding, Conv1D)):  # stored [in or tokens, out]: (B @ A).T * scaling
        return a.T, b.T * scaling
    if isinstance(layer, nn.Conv2d):
        if b.dim() == 4 and tuple(b.shape[2:]) != (1, 1):
            return None
        return b.reshape(b.shape[0], -1) * scaling, a.reshape(a.shape[0], -1)
    return b * scaling, a


def low_rank_form(left: torch.Tensor, right: torch.Tensor, balanced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, S V^T)`` of the product ``left @ right`` (``[rows, r]``, ``[r, cols]``) without forming it: thin QR of
    both factors, then the SVD of the small ``r x r`` core. ``U`` has orthonormal columns and row ``k`` of ``S V^T``
    has norm ``s_k``; ``balanced=True`` gives ``(U S^1/2, S^1/2 V^T)`` instead (column and row ``k`` both of norm
    ``s_k^1/2``, for factors that get one scale each)."""
    q_left, r_left = torch.linalg.qr(left.double())
    q_right, r_right = torch.linalg.qr(right.double().T)
    u, singular, vh = torch.linalg.svd(r_left @ r_right.T)
    left_singular = singular.sqrt() if balanced else torch.ones_like(singular)
    right_singular = singular / left_singular
    return (q_left @ u * left_singular).float(), (right_singular.unsqueeze(1) * (vh @ q_right.T)).float()


def _module_switches(
    deltas: LoraDeltas, name: str, config: TSwitchConfig, mode: str, value_bits: int, state: _State, description: str
):
    """``(param name, layout entry with "_tensors")`` for the weight (or its low-rank pair) and bias of one LoRA
    module."""
    density = config.density_for(name)
    a, b, scaling = deltas.factors(name)
    state.tensors_read += 2
    for key, value in (("A", a), ("B", b)):
        _check_finite(value, deltas.modules[name].keys[key], description)
    results = []
    pair = deltas.stored_factors(name, a, b, scaling) if mode == "factors" else None
    if mode == "factors" and pair is None:
        state.kept_delta.append(name)
    if pair is not None and torch.count_nonzero(pair[0]) and torch.count_nonzero(pair[1]):
        target_shape = [int(size) for size in deltas.skeleton.model.get_submodule(name).weight.shape]
        left, right = low_rank_form(*pair)
        for unit, factor, granularity in zip(LOW_RANK_UNITS, (left, right), ("tensor", "row")):
            switch = quantize(factor, density, value_bits, granularity, f"{name}.{unit}", config.scale_rule,
                              config.keep_ties)  # fmt: skip
            results.append((unit, {**encoded_entry(switch, density), "target_shape": target_shape}))
    elif pair is None and torch.count_nonzero(delta := deltas.product(name, a, b, scaling)):
        results.append(("weight", encoded_entry(config.binarize(delta, name, "weight"), density)))
    else:
        state.unchanged += 1
    bias = deltas.bias_delta(name)
    if bias is not None:
        state.tensors_read += 1
        _check_finite(bias, deltas.modules[name].keys["bias"], description)
        if torch.count_nonzero(bias):
            switch = quantize(bias, density, value_bits, config.scale_granularity, f"{name}.bias", config.scale_rule,
                              config.keep_ties)  # fmt: skip
            results.append(("bias", encoded_entry(switch, density)))
        else:
            state.unchanged += 1
    return results


def _same_model(a: str, b: str) -> bool:
    a, b = a.rstrip("/\\"), b.rstrip("/\\")
    if a == b:
        return True
    if os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return False


def _check_base_name(
    settings: LoraSettings, base: ModelLike, base_model: nn.Module | None, description: str, force: bool
) -> None:
    given = os.fspath(base) if isinstance(base, (str, os.PathLike)) else getattr(base_model, "name_or_path", "")
    trained_on = settings.base_model_name_or_path
    if not trained_on or not given:
        logger.warning(
            "Cannot check that the %s was trained on this base model (no base_model_name_or_path); the shapes are "
            "checked.",
            description,
        )
        return
    if _same_model(str(trained_on), str(given)):
        return
    message = (
        f"The {description} was trained on {trained_on!r} (base_model_name_or_path in its adapter_config.json), "
        f"but the base model given is {given!r}."
    )
    if not force:
        raise ValueError(
            message + " If it is the same model (e.g. a local copy), pass force=True (--force). Nothing was written."
        )
    logger.warning("%s Converting anyway (force=True).", message)


def _pick_skeleton(
    base_config,
    base_model: nn.Module | None,
    settings: LoraSettings,
    modules: dict[str, LoraModule],
    head_tensors: dict[str, str],
    base_description: str,
) -> Skeleton:
    """The base architecture whose module names the LoRA uses: the loaded model's class, the class of the LoRA's
    task type, the base's ``architectures``, or the bare model; for a plain ``torch.nn.Module`` (no config) the
    module itself."""
    if base_config is None and base_model is not None:
        skeleton = PlainSkeleton(base_model)
        names = {name for name, _ in skeleton.model.named_modules()}
        missing = [m for m in modules if m not in names]
        missing += [h for h in head_tensors if h.rsplit(".", 1)[0] not in names]
        if missing:
            raise ValueError(
                f"The LoRA's modules are not in the {base_description} ({skeleton.name}), e.g. {missing[0]}. Is it a "
                "LoRA of this base model? Nothing was written."
            )
        return skeleton
    candidates = []
    if base_model is not None:
        candidates.append(type(base_model))
    candidates.append(class_for_task(base_config, settings.task_type))
    candidates.append(class_from_architectures(base_config))
    try:
        candidates.append(AutoModel._model_mapping[type(base_config)])
    except KeyError:
        pass
    tried = []
    for cls in dict.fromkeys(c for c in candidates if c is not None):
        skeleton = build_skeleton(cls, base_config)
        names = {name for name, _ in skeleton.model.named_modules()}
        missing = [m for m in modules if m not in names]
        missing += [h for h in head_tensors if h.rsplit(".", 1)[0] not in names]
        if not missing:
            return skeleton
        tried.append(f"{cls.__name__} (e.g. no {missing[0]})")
    raise ValueError(
        f"The LoRA's modules are not in the {base_description}: tried {'; '.join(tried) or 'no model class'}. "
        "Is it a LoRA of this base model? Nothing was written."
    )


def _prepare_config(
    config: TSwitchConfig,
    settings: LoraSettings,
    modules: dict[str, LoraModule],
    head_tensors: dict[str, str],
    base: ModelLike,
    base_revision: str | None,
) -> TSwitchConfig:
    if isinstance(config.target_modules, str) and config.target_modules == ALL_SUPPORTED_SHORTHAND:
        config.target_modules = sorted(modules)
    if not any("bias" in module.keys for module in modules.values()):
        config.switch_bias = False  # nothing to switch: no empty bias entries in the file
    if config.task_type is None:
        config.task_type = settings.task_type
    automatic = automatic_heads(config.task_type)
    existing = list(config.modules_to_save or [])
    for target in settings.modules_to_save:
        used = any(owner.endswith(target) for name in head_tensors for owner in module_owners(name))
        if used and target not in automatic and target not in existing:
            existing.append(target)
    config.modules_to_save = existing or None
    record_base(config, base, base_revision)
    return config
