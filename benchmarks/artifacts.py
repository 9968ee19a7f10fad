"""Saving each method's task-specific artifacts and measuring their size on disk.

Storage in the result table is the byte count of the files a method needs besides the shared pre-trained model,
as written here: fine-tuned checkpoints, merged encoders, EMR's unified vector and packed masks, T-Switch adapter
folders (``save_pretrained``), Auto-Switch bundles, and the task heads. Model cards (``README.md``) are documentation
and not counted.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from switch_adapter._staging import staging_file

NOT_COUNTED = ("README.md",)


def bytes_on_disk(paths: Iterable[str | os.PathLike]) -> int:
    """Total size of the files at ``paths`` (folders recursively), model cards excluded."""
    total = 0
    for path in map(Path, paths):
        if path.is_file():
            total += 0 if path.name in NOT_COUNTED else path.stat().st_size
        elif path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name not in NOT_COUNTED)
        else:
            raise FileNotFoundError(f"Cannot measure {path}: it does not exist.")
    return total


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write ``tensors`` as safetensors to ``path`` via a temporary file and a rename; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = str(staging_file(path.parent, f".{path.name}-"))
    try:
        save_file({name: t.detach().contiguous() for name, t in tensors.items()}, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def save_heads(heads: Mapping[str, nn.Module], path: str | os.PathLike) -> Path:
    """The task heads' parameters (fp32) in one safetensors file, keyed ``<task>.<parameter>``."""
    tensors = {f"{task}.{name}": value for task, head in heads.items() for name, value in head.state_dict().items()}
    return save_tensors(tensors, path)


def remove(path: str | os.PathLike) -> None:
    """Delete a file or folder if present."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
