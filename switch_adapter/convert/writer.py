"""Write a T-Switch adapter folder atomically: everything goes to a temporary folder next to the output, which is
renamed into place only when complete."""

from __future__ import annotations

import logging
import os
import shutil

import torch
from safetensors.torch import save_file

from .._staging import replace_dir, staging_dir
from ..tswitch.config import TSwitchConfig
from ..tswitch.model_card import write_model_card
from ..tswitch.validation import WEIGHTS_NAME, validate_adapter_file

logger = logging.getLogger(__name__)


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> str:
    """Refuse an existing, non-empty ``output_dir`` unless ``overwrite``; returns it as a string."""
    path = os.fspath(output_dir)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise FileExistsError(f"The output {path} exists and is a file; pick another output folder.")
        if os.listdir(path) and not overwrite:
            raise FileExistsError(
                f"The output folder {path} already exists and is not empty; pass overwrite=True (--overwrite) to "
                "replace it, or pick another folder."
            )
    return path


def write_adapter(
    output_dir: str | os.PathLike,
    config: TSwitchConfig,
    tensors: dict[str, torch.Tensor],
    *,
    model_class: type | None = None,
    overwrite: bool = False,
) -> str:
    """Write ``adapter_model.safetensors``, ``adapter_config.json`` and the model card into ``output_dir``.

    The files are written to a temporary folder in the same parent folder, checked (every switch blob is decoded
    against ``config.unit_layout``), and the folder is renamed into place. On any error nothing is left behind and an
    existing ``output_dir`` is untouched. ``model_class`` (the class the adapter is made for) goes into
    ``auto_mapping`` when the config has no ``task_type``, as ``PeftModel.save_pretrained`` does.
    """
    path = check_output_dir(output_dir, overwrite)
    parent = os.path.dirname(os.path.abspath(path))
    work = staging_dir(parent, f".{os.path.basename(os.path.abspath(path))}.tmp-")
    try:
        config.inference_mode = True  # as PeftModel.save_pretrained writes it
        save_file(
            {key: value.detach().contiguous() for key, value in tensors.items()},
            os.path.join(work, WEIGHTS_NAME),
            metadata={"format": "pt"},
        )
        auto_mapping = None
        if config.task_type is None and model_class is not None:
            auto_mapping = {"base_model_class": model_class.__name__, "parent_library": model_class.__module__}
        config.save_pretrained(work, auto_mapping_dict=auto_mapping)
        write_model_card(work, config)
        validate_adapter_file(os.path.join(work, WEIGHTS_NAME), config.unit_layout)
        check_output_dir(path, overwrite)  # again: something may have appeared while converting
        replace_dir(work, path)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return path
