"""Checks of a saved T-Switch adapter file, run before anything is attached to a model."""

from __future__ import annotations

import os
from typing import Any

from safetensors import safe_open

from ..codec import sass

WEIGHTS_NAME = "adapter_model.safetensors"


def resolve_weights_file(model_id: str, subfolder: str | None, hub_kwargs: dict[str, Any]) -> str | None:
    """Local path of the adapter's safetensors file (downloading it from the Hub if needed), or None."""
    folder = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(folder):
        path = os.path.join(folder, WEIGHTS_NAME)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    allowed = {"revision", "token", "cache_dir", "local_files_only", "force_download", "proxies"}
    try:
        return hf_hub_download(
            model_id,
            WEIGHTS_NAME,
            subfolder=subfolder,
            **{k: v for k, v in hub_kwargs.items() if k in allowed},
        )
    except EntryNotFoundError:
        return None  # e.g. an adapter_model.bin: peft reports what it finds


def validate_adapter_file(path: str, unit_layout: dict[str, dict[str, dict]]) -> None:
    """Raise :class:`~switch_adapter.codec.sass.CodecError` naming the tensors if ``path`` is unreadable, truncated,
    holds a corrupt switch, or disagrees with the config's ``unit_layout``."""
    try:
        handle = safe_open(path, framework="pt")
    except Exception as error:  # safetensors raises its own error type for every header problem
        raise sass.CodecError(
            f"{path} is not a readable safetensors file ({error}). It is truncated or corrupt: re-save the adapter "
            "with save_pretrained or download it again."
        ) from None
    problems = []
    with handle:
        for key in handle.keys():
            module_path, marker, attr = key.partition(".tswitch_")
            if not marker or not attr.endswith("_code"):
                continue
            code = handle.get_tensor(key)
            entry = _layout_entry(unit_layout, module_path.removeprefix("base_model.model."), attr[: -len("_code")])
            if code.numel() == 0:  # a targeted tensor the fine-tune left unchanged: no switch
                if entry is not None:
                    problems.append(f"{key}: empty, but the config lists a switch of {entry['code_bytes']} bytes")
                continue
            try:
                header = sass.read_header(code)
            except sass.CodecError as error:
                problems.append(f"{key}: {error}")
                continue
            if entry is not None:
                numel = 1
                for size in entry["shape"]:
                    numel *= size
                if header.numel != numel:
                    problems.append(f"{key}: holds {header.numel} entries, the config says {numel}")
    if problems:
        raise sass.CodecError(
            f"The T-Switch adapter file {path} is corrupt:\n  "
            + "\n  ".join(problems[:10])
            + "\nRe-save or re-download the adapter; nothing was loaded."
        )


def _layout_entry(unit_layout: dict, module_name: str, param_name: str) -> dict | None:
    params = unit_layout.get(module_name)
    return params.get(param_name) if params else None
