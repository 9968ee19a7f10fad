"""A saved T-Switch adapter (a folder or a Hub id) opened for the exports: its config and its weights file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .._model_sources import resolve_folder
from ..errors import AdapterNotFoundError
from ..format import ADAPTER_FILES, CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, AdapterFile, Unit, iter_dense_deltas
from ..tswitch.config import TSwitchConfig


@dataclass
class SwitchFolder:
    """A T-Switch adapter on disk: where it came from, its local folder and its config."""

    source: str
    folder: str
    config: TSwitchConfig

    @property
    def weights_path(self) -> str:
        return os.path.join(self.folder, WEIGHTS_NAME)

    def open(self) -> AdapterFile:
        return AdapterFile(self.weights_path)

    def units(self) -> list[Unit]:
        """Units with a switch (a non-empty code), in model order."""
        with self.open() as file:
            units = file.units(self.config.unit_layout)
            return [unit for unit in units if file.shape_and_dtype(unit.key("code"))[0] != [0]]

    def head_tensors(self) -> dict[str, torch.Tensor]:
        """The full-precision tensors (``modules_to_save``), keyed as in the file."""
        with self.open() as file:
            return {KEY_PREFIX + key: file.tensor(KEY_PREFIX + key) for key in file.head_keys()}

    def iter_deltas(self, device: torch.device | str = "cpu") -> Iterator[tuple[Unit, torch.Tensor]]:
        """``(unit, dense fp32 delta)`` for every switched parameter, one at a time."""
        with self.open() as file:
            yield from iter_dense_deltas(file, self.config.unit_layout, device)


def open_switch(
    path_or_repo: str | os.PathLike, *, revision: str | None = None, token=None, verify: bool = True
) -> SwitchFolder:
    """Find a T-Switch adapter (a folder or a Hub id) and read its config; with ``verify`` the weights file is checked
    too (see :func:`switch_adapter.format.verify_adapter_file`).

    Raises :class:`~switch_adapter.AdapterNotFoundError` for missing files, ``ValueError`` if the folder holds another
    adapter type, and :class:`~switch_adapter.CodecError` for a damaged file.
    """
    source = os.fspath(path_or_repo)
    folder = resolve_folder(
        source, what="T-Switch adapter", allow_patterns=ADAPTER_FILES, revision=revision, token=token
    )
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise AdapterNotFoundError(f"{source} holds no {CONFIG_NAME}: it is not a saved PEFT adapter.")
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
        raise AdapterNotFoundError(
            f"{source} holds no {WEIGHTS_NAME} (T-Switch adapters are stored as safetensors only)."
        )
    if verify:
        config = TSwitchConfig.from_pretrained(folder)
    else:
        config = TSwitchConfig.from_peft_type(**raw)
    return SwitchFolder(source=source, folder=folder, config=config)
