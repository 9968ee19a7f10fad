"""Write a T-Switch adapter folder atomically, with a checksum per switch, checked before it is renamed into place."""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from .._staging import atomic_output_dir
from ..format import WEIGHTS_NAME, add_checksums, required_format_version, verify_adapter_file
from ..tswitch.config import TSwitchConfig
from ..tswitch.model_card import write_model_card


def write_adapter(
    output_dir: str | os.PathLike,
    config: TSwitchConfig,
    tensors: dict[str, torch.Tensor],
    *,
    model_class: type | None = None,
    overwrite: bool = False,
    base_factory: str | None = None,
) -> str:
    """Write ``adapter_model.safetensors``, ``adapter_config.json`` and the model card into ``output_dir``.

    The files are written to a temporary folder next to the output, verified (checksums, every code's header
    against ``config.unit_layout``), and the folder is renamed into place; see
    :func:`~switch_adapter._staging.atomic_output_dir`. ``config.format_version`` is set to what the units need
    (:func:`~switch_adapter.format.required_format_version`). ``model_class`` (the class the adapter is made for)
    goes into ``auto_mapping`` when the config has no ``task_type``, as ``PeftModel.save_pretrained`` does;
    ``base_factory`` (``"module:function"``) is the function that built a plain base model, for the model card.
    """
    config.format_version = required_format_version(config.unit_layout, getattr(config, "norm_statistics", None))
    with atomic_output_dir(output_dir, overwrite) as work:
        config.inference_mode = True  # as PeftModel.save_pretrained writes it
        stored = add_checksums({key: value.detach().contiguous() for key, value in tensors.items()})
        save_file(stored, os.path.join(work, WEIGHTS_NAME), metadata={"format": "pt"})
        auto_mapping = None
        if config.task_type is None and model_class is not None:
            auto_mapping = {"base_model_class": model_class.__name__, "parent_library": model_class.__module__}
        config.save_pretrained(work, auto_mapping_dict=auto_mapping)
        write_model_card(work, config, base_factory=base_factory)
        verify_adapter_file(
            os.path.join(work, WEIGHTS_NAME),
            config.unit_layout,
            config.format_version,
            getattr(config, "norm_statistics", None),
        )
    return os.path.abspath(os.fspath(output_dir))
