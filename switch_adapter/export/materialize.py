"""Base model + T-Switch adapter(s) -> a plain transformers model folder that loads without this library."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .._staging import atomic_output_dir, check_output_dir
from ..convert.plain import MODEL_CLASS_NAME, ModelFactory, class_path, factory_name
from ..convert.plain import WEIGHTS_NAME as PLAIN_WEIGHTS_NAME
from ..tswitch.layer import SWITCHABLE_PARAMETERS, SwitchedModule
from ._base_model import copy_tokenizer_files, load_base_model, task_type_name
from ._switch_file import SwitchFolder, open_switch

logger = logging.getLogger(__name__)

AdapterSpec = str | os.PathLike | Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike]
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
_DTYPES.update({"bfloat16": torch.bfloat16, "bf16": torch.bfloat16})


def materialize(
    base: str | os.PathLike | nn.Module,
    adapters: AdapterSpec,
    output_dir: str | os.PathLike,
    *,
    weights: Mapping[str, float] | Sequence[float] | None = None,
    overwrite: bool = False,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
    model_factory: ModelFactory | type | None = None,
) -> str:
    """Merge T-Switch adapters into the base model's weights and save a plain transformers model folder.

    Args:
        base: The base model: a folder, a Hub id, a loaded model (a transformers model or any ``torch.nn.Module``;
            copied, never modified), or a plain model's safetensors state dict (a file, an index, or a folder of
            shards) together with ``model_factory``.
        adapters: One T-Switch adapter (a folder or a Hub id), or several as ``{name: folder or id}`` (or a list).
        output_dir: The folder to write (``save_pretrained`` files, the base's tokenizer files, a model card).
        weights: ``{name: weight}`` (or a list in the order of ``adapters``): the merged delta is
            ``sum_t weight_t * delta_t``. Default 1.0 for every adapter.
        overwrite: Replace an existing ``output_dir``; otherwise an existing folder is an error.
        revision / base_revision: Hub revisions of the adapters / of the base model.
        token: Hub token (default: ``HF_TOKEN`` or the saved login).
        dtype: Dtype of the saved weights (e.g. ``"bfloat16"``); default: the base model's. Deltas are added in
            the base's dtype, then the result is cast.
        progress: Show a progress bar over the merged layers.
        model_factory: The architecture of a plain ``torch.nn.Module`` base read from safetensors: its class, a
            zero-argument function returning it, or its import path ``"package.module:name"``.

    A model without ``save_pretrained`` (a plain ``torch.nn.Module``) is saved as its state dict,
    ``model.safetensors`` (``safetensors.torch.save_model``: load it with ``safetensors.torch.load_model(model,
    path)``), with ``model_class.json`` naming its class (``"module:qualname"``) and a model card; never a pickle.

    Full-precision task heads (``modules_to_save``) replace the base's heads; several adapters must carry identical
    heads. Returns the absolute path of ``output_dir``. Nothing is written on error: the folder is written under a
    temporary name and renamed at the end.
    """
    sources = _adapter_sources(adapters)
    scale = _adapter_weights(weights, list(sources))
    inputs = [base, *sources.values()]
    final = check_output_dir(output_dir, overwrite, inputs)
    out_dtype = _parse_dtype(dtype)
    switches = {name: open_switch(source, revision=revision, token=token) for name, source in sources.items()}
    task_type = _common_task_type(switches)
    _warn_other_base(base, switches)

    model = load_base_model(base, task_type, revision=base_revision, token=token, model_factory=model_factory)
    merged = _merge(model, switches, scale, progress)
    if out_dtype is not None:
        merged.to(out_dtype)
    with atomic_output_dir(final, overwrite, inputs) as work:
        if hasattr(merged, "save_pretrained"):
            merged.save_pretrained(work)
            copy_tokenizer_files(base, work, revision=base_revision, token=token)
            _write_card(work, base, switches, scale)
        else:
            save_plain_model(merged, work, factory=factory_name(model_factory) if model_factory else None)
            _write_card(work, base, switches, scale, plain=type(merged))
    logger.info("Materialized %s into %s", ", ".join(map(str, sources.values())), final)
    return final


def _adapter_sources(adapters: AdapterSpec) -> dict[str, str]:
    if isinstance(adapters, (str, os.PathLike)):
        return {"default": os.fspath(adapters)}
    if isinstance(adapters, Mapping):
        sources = {str(name): os.fspath(path) for name, path in adapters.items()}
    elif isinstance(adapters, Sequence):
        sources = {f"adapter_{i}": os.fspath(path) for i, path in enumerate(adapters)}
    else:
        raise TypeError(f"adapters must be a folder, a Hub id, or a mapping / list of them, got {type(adapters)}.")
    if not sources:
        raise ValueError("Pass at least one T-Switch adapter to materialize.")
    return sources


def _adapter_weights(weights, names: list[str]) -> dict[str, float]:
    if weights is None:
        values = {name: 1.0 for name in names}
    elif isinstance(weights, Mapping):
        unknown, missing = set(weights) - set(names), set(names) - set(weights)
        if unknown or missing:
            raise ValueError(
                f"weights must name exactly the adapters {sorted(names)}; unknown: {sorted(unknown)}, "
                f"missing: {sorted(missing)}."
            )
        values = {name: weights[name] for name in names}
    else:
        weights = list(weights)
        if len(weights) != len(names):
            raise ValueError(f"Got {len(weights)} weights for {len(names)} adapters; pass one weight per adapter.")
        values = dict(zip(names, weights))
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"The weight of adapter {name!r} must be a finite number, got {value!r}.")
    return {name: float(value) for name, value in values.items()}


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of float32, float16, bfloat16.")
    return _DTYPES[key]


def _common_task_type(switches: dict[str, SwitchFolder]) -> str | None:
    types = {task_type_name(s.config.task_type) for s in switches.values()} - {None}
    if len(types) > 1:
        raise ValueError(f"The adapters were made for different task types {sorted(types)}; merge one kind at a time.")
    return next(iter(types), None)


def _warn_other_base(base, switches: dict[str, SwitchFolder]) -> None:
    if not isinstance(base, (str, os.PathLike)):
        return
    for name, switch in switches.items():
        recorded = switch.config.base_model_name_or_path
        if recorded and os.fspath(recorded) != os.fspath(base):
            logger.warning(
                "Adapter %r (%s) was made on base model %s, not on %s; its shapes are checked, its values are not.",
                name,
                switch.source,
                recorded,
                os.fspath(base),
            )


def _merge(model: nn.Module, switches: dict[str, SwitchFolder], scale: dict[str, float], progress: bool) -> nn.Module:
    """Attach the switches with peft, add ``weight * delta`` of each into the base weights (and the running statistics
    the switches carry, ``base + sum weight * (stat - base)``, into norm layers' buffers), and unwrap."""
    from peft import PeftModel

    peft_names = {name: f"switch_{i}" for i, name in enumerate(switches)}
    first = next(iter(switches))
    peft_model = PeftModel.from_pretrained(model, switches[first].folder, adapter_name=peft_names[first])
    for name, switch in list(switches.items())[1:]:
        peft_model.load_adapter(switch.folder, adapter_name=peft_names[name])
    _check_heads(peft_model, {switches[name].source: peft_name for name, peft_name in peft_names.items()})
    layers = [m for m in peft_model.modules() if isinstance(m, SwitchedModule)]
    with torch.no_grad():
        for layer in tqdm(layers, desc="Merging switches", disable=not progress):
            base_layer = layer.get_base_layer()
            for param_name in SWITCHABLE_PARAMETERS:
                param = getattr(base_layer, param_name, None)
                if param is None:
                    continue
                for name, peft_name in peft_names.items():
                    layer._add_deltas(
                        param_name, param.data, {peft_name: scale[name]}, inplace=True, keep_decoded=False
                    )
            statistics = layer.composed_statistics({peft_names[name]: scale[name] for name in switches})
            for stat_name, value in (statistics or {}).items():  # BatchNorm: the adapters' running statistics
                getattr(base_layer, stat_name).copy_(value)
    peft_model.base_model.set_adapter(peft_names[first])  # every adapter's head is the same (checked above)
    merged = peft_model.unload()
    _sync_label_count(merged, switches)
    return merged


def _check_heads(peft_model, peft_names: dict[str, str]) -> None:
    """Several adapters (``{source: peft adapter name}``) may be merged only if their full-precision heads (or the
    base's, if absent) agree."""
    if len(peft_names) < 2:
        return
    from peft.utils import ModulesToSaveWrapper

    for module_name, wrapper in peft_model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        states = {}
        for name, peft_name in peft_names.items():
            module = wrapper.modules_to_save[peft_name] if peft_name in wrapper.modules_to_save else None
            states[name] = (module or wrapper.original_module).state_dict()
        reference_name, reference = next(iter(states.items()))
        for name, state in states.items():
            same = state.keys() == reference.keys() and all(
                state[k].shape == reference[k].shape and torch.equal(state[k], reference[k]) for k in state
            )
            if not same:
                short = module_name.removeprefix("base_model.model.")
                raise ValueError(
                    f"Adapters {reference_name!r} and {name!r} carry different task heads for {short}; a merged "
                    "model has one head. Materialize them separately, or give them the same head."
                )


def _sync_label_count(model: nn.Module, switches: dict[str, SwitchFolder]) -> None:
    """A head saved with another number of labels than the base's: update ``config.num_labels`` to match."""
    config = getattr(model, "config", None)
    if config is None:
        return
    for switch in switches.values():
        for head_name in switch.config.modules_to_save_shapes:
            try:
                head = model.get_submodule(head_name)
            except AttributeError:
                candidates = [m for n, m in model.named_modules() if n.endswith("." + head_name)]
                if not candidates:
                    continue
                head = candidates[0]
            linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
            if linears and getattr(config, "num_labels", None) != linears[-1].out_features:
                logger.info("The task head has %d outputs: setting config.num_labels", linears[-1].out_features)
                config.num_labels = linears[-1].out_features


def save_plain_model(model: nn.Module, folder: str, *, factory: str | None = None) -> None:
    """Save a ``torch.nn.Module`` without ``save_pretrained``: ``model.safetensors`` (its state dict; tied tensors
    once, as ``safetensors.torch.save_model`` writes them) and ``model_class.json`` naming its class."""
    from safetensors.torch import save_model

    save_model(model, os.path.join(folder, PLAIN_WEIGHTS_NAME), metadata={"format": "pt"})
    note = {
        "model_class": class_path(type(model)),
        "factory": factory,
        "weights": PLAIN_WEIGHTS_NAME,
        "load": "build the model with model_class (or factory), then safetensors.torch.load_model(model, weights)",
    }
    with open(os.path.join(folder, MODEL_CLASS_NAME), "w", encoding="utf-8") as handle:
        json.dump(note, handle, indent=2)
        handle.write("\n")


def _write_card(
    folder: str, base, switches: dict[str, SwitchFolder], scale: dict[str, float], plain: type | None = None
) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    base_name = os.fspath(base) if isinstance(base, (str, os.PathLike)) else getattr(base, "name_or_path", "")
    is_hub_id = bool(base_name) and not os.path.exists(base_name) and plain is None
    data = ModelCardData(
        library_name=None if plain is not None else "transformers",
        tags=["switch-adapter", "t-switch", "merge"],
        base_model=base_name if is_hub_id else None,
    )
    rows = "\n".join(f"| `{s.source}` | {scale[name]:g} |" for name, s in switches.items())
    if plain is None:
        loading = "A plain transformers model: load it with `from_pretrained(<this folder>)`, no switch-adapter needed."
    else:
        module, _, qualname = class_path(plain).partition(":")
        loading = (
            f"A `torch.nn.Module` state dict ({PLAIN_WEIGHTS_NAME}; the class is named in {MODEL_CLASS_NAME}): build "
            f"the model and load the weights, no switch-adapter needed:\n\n```python\n"
            f"from safetensors.torch import load_model\nfrom {module} import {qualname.split('.')[0]}\n\n"
            f"model = {qualname}()  # with the arguments the base model was built with\n"
            f'load_model(model, "{PLAIN_WEIGHTS_NAME}")\n```'
        )
    text = (
        f"---\n{data.to_yaml()}\n---\n\n# Materialized T-Switch model\n\n"
        f"Base model `{base_name or 'a loaded model'}` with these T-Switch adapters merged into its weights by "
        "[switch-adapter](https://pypi.org/project/switch-adapter/) (`switch-adapter merge`): "
        "weights = base + sum of weight x switch.\n\n| adapter | weight |\n|---|---|\n"
        f"{rows}\n\n{loading}\n"
    )
    ModelCard(text).save(os.path.join(folder, "README.md"))
