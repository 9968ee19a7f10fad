"""Read a saved T-Switch adapter straight from its files: config, switched units, deltas, full-precision heads."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open

from ..codec import sass
from ..tswitch.config import TSwitchConfig
from ._paths import resolve_folder

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md")


@dataclass(frozen=True)
class UnitKeys:
    """The safetensors keys of one switched parameter (``module.param``)."""

    module: str
    param: str
    code_key: str
    scale_key: str

    @property
    def name(self) -> str:
        return f"{self.module}.{self.param}"


@dataclass
class SwitchFolder:
    """A T-Switch adapter on disk: its folder, config and weights file."""

    source: str
    folder: str
    config: TSwitchConfig

    @property
    def weights_path(self) -> str:
        return os.path.join(self.folder, WEIGHTS_NAME)

    def units(self) -> list[UnitKeys]:
        """Switched parameters in the order of the config's ``unit_layout`` (model order), then any others."""
        with safe_open(self.weights_path, framework="pt") as handle:
            keys = set(handle.keys())
        found: dict[tuple[str, str], UnitKeys] = {}
        for key in keys:
            module_path, marker, attr = key.partition(".tswitch_")
            if not marker or not attr.endswith("_code"):
                continue
            param = attr[: -len("_code")]
            module = module_path.removeprefix(KEY_PREFIX)
            scale_key = f"{module_path}.tswitch_{param}_scale"
            if scale_key not in keys:
                raise sass.CodecError(
                    f"{self.weights_path} holds {key} but not {scale_key}; re-save or re-download the adapter."
                )
            found[(module, param)] = UnitKeys(module, param, key, scale_key)
        ordered = [
            found.pop((module, param))
            for module, params in self.config.unit_layout.items()
            for param in params
            if (module, param) in found
        ]
        return ordered + [found[key] for key in sorted(found)]

    def shape_of(self, unit: UnitKeys, numel: int) -> list[int]:
        """The unit's tensor shape from the config (the code only knows the number of entries)."""
        entry = self.config.unit_layout.get(unit.module, {}).get(unit.param)
        if entry is None:
            return [numel]
        shape = [int(size) for size in entry["shape"]]
        if _prod(shape) != numel:
            raise sass.CodecError(
                f"{unit.code_key} holds {numel} entries but the config says shape {shape}; the adapter is corrupt."
            )
        return shape

    def head_keys(self) -> list[str]:
        """Keys of the full-precision tensors (``modules_to_save``), without the ``base_model.model.`` prefix."""
        with safe_open(self.weights_path, framework="pt") as handle:
            return sorted(k.removeprefix(KEY_PREFIX) for k in handle.keys() if ".tswitch_" not in k)

    def iter_deltas(self, device: torch.device | str = "cpu") -> Iterator[tuple[UnitKeys, torch.Tensor]]:
        """``(unit, dense fp32 delta)`` for every switched parameter, one at a time."""
        with safe_open(self.weights_path, framework="pt") as handle:
            for unit in self.units():
                code = handle.get_tensor(unit.code_key)
                scale = handle.get_tensor(unit.scale_key)
                yield unit, self._dense(unit, code, scale, device)

    def _dense(self, unit: UnitKeys, code: torch.Tensor, scale: torch.Tensor, device) -> torch.Tensor:
        try:
            numel, positions, positive = sass.decode_positions(code, device=device)
        except sass.CodecError as error:
            raise sass.CodecError(f"{unit.code_key}: {error}") from None
        shape = self.shape_of(unit, numel)
        scale = scale.to(device=device, dtype=torch.float32).reshape(-1)
        values = torch.where(positive, 1.0, -1.0).to(torch.float32)
        if scale.numel() > 1:  # one scale per row (dim 0)
            if scale.numel() != shape[0]:
                raise sass.CodecError(
                    f"{unit.scale_key} holds {scale.numel()} scales for {shape[0]} rows; the adapter is corrupt."
                )
            values = values * scale[positions // (numel // shape[0])]
        else:
            values = values * scale
        delta = torch.zeros(numel, dtype=torch.float32, device=device)
        return delta.index_put_((positions,), values).view(shape)


def open_switch(path_or_repo: str | os.PathLike, *, revision: str | None = None, token=None) -> SwitchFolder:
    """Find a T-Switch adapter (a folder or a Hub id) and read its config; the weights file is checked too.

    Raises ``FileNotFoundError`` for missing files, ``ValueError`` if the folder holds another adapter type, and
    :class:`~switch_adapter.CodecError` for a corrupt weights file.
    """
    source = os.fspath(path_or_repo)
    folder = resolve_folder(
        source, what="T-Switch adapter", allow_patterns=ADAPTER_FILES, revision=revision, token=token
    )
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{source} holds no {CONFIG_NAME}: it is not a saved PEFT adapter.")
    with open(config_path, encoding="utf-8") as handle:
        try:
            raw = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path} is not valid JSON ({error}); re-save or re-download it.") from None
    peft_type = raw.get("peft_type")
    if peft_type != "TSWITCH":
        hint = " Convert a LoRA first: switch-adapter convert-lora." if peft_type == "LORA" else ""
        raise ValueError(f"{source} is a {peft_type or 'non-PEFT'} adapter, not a T-Switch adapter.{hint}")
    if not os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        raise FileNotFoundError(f"{source} holds no {WEIGHTS_NAME} (T-Switch adapters are stored as safetensors only).")
    config = TSwitchConfig.from_pretrained(folder)  # also validates the weights file against the layout
    return SwitchFolder(source=source, folder=folder, config=config)


def _prod(shape) -> int:
    result = 1
    for size in shape:
        result *= int(size)
    return result
