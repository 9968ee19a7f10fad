"""Where tensors come from: a local folder, a Hub repository or a loaded model, read one tensor at a time.

Checkpoints are read through ``safetensors.safe_open``: the shard headers give every tensor's name, shape and dtype
without reading data, and :meth:`TensorSource.get` reads one tensor (positional reads: threads may read at once).
The memory held is the tensors being read, never a whole model. Only safetensors are read (never pickles).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from .._model_sources import from_hub, local_folder
from ..errors import AdapterNotFoundError
from .plain import plain_checkpoint_files, shard_names, weights_files

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

ModelLike = Any  # a folder (str / os.PathLike), a Hub repo id, a safetensors file, or a loaded nn.Module


@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype (safetensors' name, e.g. ``"F16"``) and shard file of one stored tensor."""

    shape: tuple[int, ...]
    dtype: str
    file: str | None = None

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def is_floating(self) -> bool:
        return self.dtype in ("F64", "F32", "F16", "BF16") or self.dtype.startswith("F8")


class TensorSource:
    """Named tensors read one at a time. ``config`` is the model's ``PretrainedConfig`` (None for adapters)."""

    description: str
    config: Any = None
    model: nn.Module | None = None

    def info(self) -> dict[str, TensorInfo]:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SafetensorsSource(TensorSource):
    """Tensors of one or more safetensors files (the shards of a checkpoint), read one at a time.

    ``safe_open`` validates every file and lists its tensors up front. Reading a tensor is one positioned read of
    its bytes into memory the returned tensor owns, instead of ``safe_open``'s memory map: pages of a mapped shard
    count towards the process's resident memory for as long as the shard is open, so a converter holding two
    shards open would hold two shards in memory. :func:`task_vector_into` does map the shards, and hands each
    chunk's pages back as soon as it has used them. Reads are positional: several threads may read at once.
    """

    def __init__(self, files: list[str], description: str, config: Any = None) -> None:
        self.description = description
        self.config = config
        self.files = list(files)
        self._info: dict[str, TensorInfo] = {}
        self._offsets: dict[str, tuple[int, int]] = {}  # key -> (absolute start, byte count)
        for path in self.files:
            if not os.path.isfile(path):
                raise AdapterNotFoundError(
                    f"{description}: the weights file {path} is missing (an incomplete download?)."
                )
            try:
                with safe_open(path, framework="pt") as handle:
                    for key in handle.keys():
                        tensor_slice = handle.get_slice(key)
                        self._info[key] = TensorInfo(tuple(tensor_slice.get_shape()), tensor_slice.get_dtype(), path)
            except Exception as error:  # safetensors raises its own error type for header problems
                raise ValueError(
                    f"{description}: {path} is not a readable safetensors file ({error}); re-save or re-download it."
                ) from None
            self._offsets.update(_data_offsets(path))
        self._descriptors: dict[str, int] = {}  # shard path -> open file descriptor
        self._maps: dict[str, mmap.mmap] = {}  # shard path -> read-only memory map (task_vector_into)
        self._lock = threading.Lock()

    def info(self) -> dict[str, TensorInfo]:
        return self._info

    def _locate(self, key: str) -> tuple[TensorInfo, torch.dtype, int, int]:
        """``(info, dtype, file descriptor, absolute offset)`` of ``key``, opening its shard on first use."""
        info = self._info[key]
        dtype = _TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise ValueError(f"{self.description}: {key} has dtype {info.dtype}, which this converter cannot read.")
        with self._lock:
            descriptor = self._descriptors.get(info.file)
            if descriptor is None:
                descriptor = self._descriptors[info.file] = os.open(info.file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return info, dtype, descriptor, self._offsets[key][0]

    def _read_into(self, buffer: torch.Tensor, key: str, descriptor: int, offset: int) -> None:
        """Fill the uint8 ``buffer`` from ``offset`` of the file (positional reads: safe from several threads)."""
        view = memoryview(buffer.numpy())
        done = 0
        while done < len(view):
            got = _pread_into(descriptor, view[done:], offset + done)
            if got <= 0:
                path = self._info[key].file
                raise ValueError(f"{self.description}: {path} is truncated ({key}); re-download or re-save it.")
            done += got

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key``, read into memory it owns. Safe to call from several threads at once."""
        info, dtype, descriptor, offset = self._locate(key)
        buffer = torch.empty(self._offsets[key][1], dtype=torch.uint8)
        self._read_into(buffer, key, descriptor, offset)
        if sys.byteorder != "little" and dtype.itemsize > 1:  # safetensors stores little-endian: reverse each value
            buffer = buffer.view(-1, dtype.itemsize).flip(1).reshape(-1)
        return buffer.view(dtype).reshape(info.shape)

    def subtract_from(self, key: str, out: torch.Tensor) -> bool:
        """``out -= tensor(key)`` for a contiguous float32 CPU ``out`` of the tensor's shape, reading the tensor in
        chunks of :data:`SUBTRACT_CHUNK_BYTES` (so it is never in memory whole); the difference of each entry is
        computed in float32, exactly as ``out -= tensor(key).to(float32)``. Returns False, having read nothing,
        where it does not apply (other sizes, dtypes or byte orders): the caller then uses :meth:`get`."""
        info = self._info[key]
        dtype = _TORCH_DTYPES.get(info.dtype)
        numel = out.numel()
        if (
            tuple(info.shape) != tuple(out.shape)
            or dtype is None
            or not dtype.is_floating_point
            or (sys.byteorder != "little" and dtype.itemsize > 1)
            or out.dtype != torch.float32
            or out.device.type != "cpu"
            or not out.is_contiguous()
        ):
            return False
        _, dtype, descriptor, offset = self._locate(key)
        flat = out.view(-1)
        per_chunk = max(SUBTRACT_CHUNK_BYTES // dtype.itemsize, 1)
        buffer = torch.empty(min(per_chunk, numel) * dtype.itemsize, dtype=torch.uint8)
        for first in range(0, numel, per_chunk):
            size = min(per_chunk, numel - first)
            chunk = buffer[: size * dtype.itemsize]
            self._read_into(chunk, key, descriptor, offset + first * dtype.itemsize)
            values = chunk.view(dtype)
            target = flat[first : first + size].numpy()
            if dtype == torch.float32:
                np.subtract(target, values.numpy(), out=target)
            else:
                target -= values.to(torch.float32).numpy()
        return True

    def mapped_float32(self, key: str) -> tuple[mmap.mmap, int, np.ndarray]:
        """``(map, offset, values)``: a read-only view of the float32 tensor ``key`` (little-endian machines) in a
        memory map of its shard. Hand the pages back with :func:`drop_pages` once read."""
        info = self._info[key]
        if info.dtype != "F32" or sys.byteorder != "little":
            raise ValueError(f"{self.description}: {key} is {info.dtype}, not a float32 tensor this machine can map.")
        with self._lock:
            mapping = self._maps.get(info.file)
            if mapping is None:
                with open(info.file, "rb") as handle:
                    mapping = self._maps[info.file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        start, count = self._offsets[key]
        if start + count > len(mapping):
            raise ValueError(f"{self.description}: {info.file} is truncated ({key}); re-download or re-save it.")
        values = np.frombuffer(mapping, dtype=np.float32, count=count // 4, offset=start)
        return mapping, start, values

    def close(self) -> None:
        with self._lock:
            for descriptor in self._descriptors.values():
                os.close(descriptor)
            self._descriptors.clear()
            for mapping in self._maps.values():
                try:
                    mapping.close()
                except BufferError:  # a view is still alive (an error elsewhere): the map goes with it
                    pass
            self._maps.clear()


def drop_pages(mapping: mmap.mmap, start: int, length: int) -> None:
    """Hand the pages of ``mapping[start:start + length]`` back (they stop counting as resident memory; reading them
    again reads the file). A no-op where ``madvise`` is missing."""
    if length <= 0 or not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    first = start - start % mmap.PAGESIZE
    mapping.madvise(mmap.MADV_DONTNEED, first, min(start + length, len(mapping)) - first)


def task_vector_into(
    tuned_src: TensorSource, tuned_key: str, base_src: TensorSource, base_key: str, out: torch.Tensor
) -> bool:
    """``out = tuned - base`` for two float32 safetensors tensors of ``out``'s shape, read through memory maps in
    chunks of :data:`SUBTRACT_CHUNK_BYTES` whose pages are dropped once used (no copy of either tensor is made).
    Returns False, having done nothing, where it does not apply (other sources, dtypes, shapes or byte orders)."""
    if not (isinstance(tuned_src, SafetensorsSource) and isinstance(base_src, SafetensorsSource)):
        return False
    if out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous() or sys.byteorder != "little":
        return False
    shape = tuple(out.shape)
    if tuple(tuned_src.info()[tuned_key].shape) != shape or tuple(base_src.info()[base_key].shape) != shape:
        return False
    if tuned_src.info()[tuned_key].dtype != "F32" or base_src.info()[base_key].dtype != "F32":
        return False
    tuned_map, tuned_start, tuned_values = tuned_src.mapped_float32(tuned_key)
    base_map, base_start, base_values = base_src.mapped_float32(base_key)
    target = out.view(-1).numpy()
    step = max(SUBTRACT_CHUNK_BYTES // 4, 1)
    for first in range(0, target.shape[0], step):
        last = min(first + step, target.shape[0])
        np.subtract(tuned_values[first:last], base_values[first:last], out=target[first:last])
        drop_pages(tuned_map, tuned_start + first * 4, (last - first) * 4)
        drop_pages(base_map, base_start + first * 4, (last - first) * 4)
    return True


_SEEK_LOCK = threading.Lock()


def _pread_into(descriptor: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` from ``offset`` without moving a file position; the bytes read (0 at the end)."""
    if hasattr(os, "preadv"):
        return os.preadv(descriptor, [view], offset)
    if hasattr(os, "pread"):  # macOS before 11
        data = os.pread(descriptor, len(view), offset)
    else:  # Windows: seek and read, one thread at a time
        with _SEEK_LOCK:
            os.lseek(descriptor, offset, os.SEEK_SET)
            data = os.read(descriptor, len(view))
    view[: len(data)] = data
    return len(data)


#: Bytes read at a time by :meth:`SafetensorsSource.subtract_from`.
SUBTRACT_CHUNK_BYTES = 1 << 23

_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


def _data_offsets(path: str) -> dict[str, tuple[int, int]]:
    """``{key: (absolute byte offset, byte count)}`` from a safetensors header (8-byte length + JSON)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    base = 8 + length
    return {
        key: (base + entry["data_offsets"][0], entry["data_offsets"][1] - entry["data_offsets"][0])
        for key, entry in header.items()
        if key != "__metadata__"
    }


class ModuleSource(TensorSource):
    """The state dict of an already loaded model (no copy is made)."""

    def __init__(self, model: nn.Module, description: str) -> None:
        self.description = description
        self.model = model
        self.config = getattr(model, "config", None)
        self._state = {key: value.detach() for key, value in model.state_dict().items()}
        self._info = {
            key: TensorInfo(tuple(value.shape), _safetensors_dtype_name(value.dtype))
            for key, value in self._state.items()
        }

    def info(self) -> dict[str, TensorInfo]:
        return self._info

    def get(self, key: str) -> torch.Tensor:
        """The tensor on the CPU (the model's own tensor when it lives there: do not modify it)."""
        return self._state[key].cpu()


def _safetensors_dtype_name(dtype: torch.dtype) -> str:
    names = {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }
    return names.get(dtype, str(dtype).removeprefix("torch.").upper())


# -- resolving a folder or a Hub id ------------------------------------------------------------------------------


def _hub_files(repo_id: str, filenames: list[str], *, revision: str | None, token: str | bool | None, role: str):
    """Download ``filenames`` (first one required, the others optional) from ``repo_id``; ``{name: path or None}``."""
    from huggingface_hub import hf_hub_download

    paths: dict[str, str | None] = {}
    for index, filename in enumerate(filenames):
        try:
            paths[filename] = from_hub(
                hf_hub_download, repo_id, role, filename=filename, revision=revision, token=token
            )
        except AdapterNotFoundError as error:
            optional_and_absent = type(error.__cause__).__name__ in ("EntryNotFoundError", "LocalEntryNotFoundError")
            if index == 0 or not optional_and_absent:
                raise
            paths[filename] = None
    return paths


def _load_config(folder: str, description: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except ValueError as error:
        raise ValueError(f"{description}: its config.json is not usable by transformers ({error}).") from None


def open_checkpoint(
    source: ModelLike,
    *,
    role: str,
    revision: str | None = None,
    token: str | bool | None = None,
    plain: bool = False,
) -> TensorSource:
    """A :class:`TensorSource` over a full checkpoint: a loaded model (a transformers model or any ``nn.Module``), a
    local folder, a Hub repo id, or a plain model's safetensors state dict (a ``.safetensors`` file, an index, or a
    folder of shards without ``config.json``; its ``config`` is None). With ``plain`` (the caller has the
    architecture from a model factory) a local folder's safetensors are read even when it has a ``config.json``.

    ``role`` ("base" / "fine-tuned") goes into messages. Raises ``FileNotFoundError`` for missing folders, repos or
    files, and ``ValueError`` for folders without safetensors weights (pickled ``pytorch_model.bin`` are not read).
    """
    if isinstance(source, nn.Module):
        from peft import PeftModel

        if isinstance(source, PeftModel):
            raise TypeError(
                f"The {role} model is a PeftModel; pass the plain model (merge_and_unload() it first), "
                "or convert a LoRA adapter with convert_lora."
            )
        source_ = ModuleSource(source, f"the loaded {role} {type(source).__name__}")
        if getattr(source_.config, "model_type", None) is None:
            source_.config = None  # a plain module: its architecture is the module itself
        return source_
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"The {role} must be a folder, a Hub repo id, a safetensors file or a loaded model, got "
            f"{type(source).__name__}."
        )
    plain_files = weights_files(source) if plain and os.path.exists(os.fspath(source)) else None
    plain_files = plain_files or plain_checkpoint_files(source)
    if plain_files is not None:
        files, description = plain_files
        return SafetensorsSource(files, f"{role} {description}")
    folder = local_folder(source, role)
    if folder is not None:
        description = f"{role} checkpoint {folder}"
        if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            hint = _what_is_there(folder)
            raise AdapterNotFoundError(f"The {description} has no config.json{hint}.")
        index = os.path.join(folder, WEIGHTS_INDEX_NAME)
        single = os.path.join(folder, WEIGHTS_NAME)
        if os.path.isfile(index):
            files = [os.path.join(folder, name) for name in _index_files(index, description)]
        elif os.path.isfile(single):
            files = [single]
        else:
            raise AdapterNotFoundError(
                f"The {description} holds no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}{_what_is_there(folder)}."
            )
        return SafetensorsSource(files, description, _load_config(folder, description))
    repo_id = os.fspath(source)
    description = f"{role} repository {repo_id}" + (f"@{revision}" if revision else "")
    paths = _hub_files(repo_id, [CONFIG_NAME, WEIGHTS_INDEX_NAME], revision=revision, token=token, role=role)
    if paths[WEIGHTS_INDEX_NAME] is not None:
        names = _index_files(paths[WEIGHTS_INDEX_NAME], description)
        files = [_hub_files(repo_id, [name], revision=revision, token=token, role=role)[name] for name in names]
    else:
        try:
            files = [_hub_files(repo_id, [WEIGHTS_NAME], revision=revision, token=token, role=role)[WEIGHTS_NAME]]
        except FileNotFoundError:
            raise ValueError(
                f"The {description} has no safetensors weights ({WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}); "
                "switch-adapter reads safetensors only. Load it with transformers and save_pretrained() it."
            ) from None
    return SafetensorsSource(files, description, _load_config(os.path.dirname(paths[CONFIG_NAME]), description))


def _index_files(index_path: str, description: str) -> list[str]:
    try:
        return shard_names(index_path)
    except ValueError as error:
        raise ValueError(f"{description}: {error}") from None


def _what_is_there(folder: str) -> str:
    names = set(os.listdir(folder))
    if ADAPTER_CONFIG_NAME in names:
        return " (it is a PEFT adapter folder: convert a LoRA with convert_lora)"
    if any(name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in names):
        return (
            " (it holds pickled weights; switch-adapter reads safetensors only: load the model with transformers "
            "and save_pretrained() it)"
        )
    return ""


@dataclass
class AdapterFiles:
    """A PEFT adapter: its parsed ``adapter_config.json`` and its tensors."""

    config: dict[str, Any]
    tensors: SafetensorsSource
    description: str


def open_adapter(
    source: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> AdapterFiles:
    """The ``adapter_config.json`` and ``adapter_model.safetensors`` of a PEFT adapter (a local folder or Hub id)."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"The LoRA adapter must be a folder or a Hub repo id, got {type(source).__name__}.")
    folder = local_folder(source, "LoRA adapter")
    if folder is not None:
        description = f"adapter {folder}"
        config_path = os.path.join(folder, ADAPTER_CONFIG_NAME)
        weights_path = os.path.join(folder, ADAPTER_WEIGHTS_NAME)
        if not os.path.isfile(config_path):
            raise AdapterNotFoundError(f"The {description} has no {ADAPTER_CONFIG_NAME}: not a PEFT adapter folder.")
        if not os.path.isfile(weights_path):
            pickled = os.path.isfile(os.path.join(folder, "adapter_model.bin"))
            raise AdapterNotFoundError(
                f"The {description} has no {ADAPTER_WEIGHTS_NAME}"
                + (
                    " (only a pickled adapter_model.bin, which switch-adapter does not read: load it with peft and "
                    "save_pretrained() it to get safetensors)"
                    if pickled
                    else ""
                )
                + "."
            )
    else:
        repo_id = os.fspath(source)
        description = f"adapter repository {repo_id}" + (f"@{revision}" if revision else "")
        config_path = _hub_files(repo_id, [ADAPTER_CONFIG_NAME], revision=revision, token=token, role="LoRA adapter")[
            ADAPTER_CONFIG_NAME
        ]
        try:
            weights_path = _hub_files(
                repo_id, [ADAPTER_WEIGHTS_NAME], revision=revision, token=token, role="LoRA adapter"
            )[ADAPTER_WEIGHTS_NAME]
        except FileNotFoundError:
            raise AdapterNotFoundError(
                f"The {description} has no {ADAPTER_WEIGHTS_NAME} (switch-adapter reads safetensors only)."
            ) from None
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"{description}: {ADAPTER_CONFIG_NAME} is not valid JSON ({error}).") from None
    return AdapterFiles(config, SafetensorsSource([weights_path], description), description)


def open_config(
    source: ModelLike, *, role: str, revision: str | None = None, token: str | bool | None = None
) -> tuple[Any, nn.Module | None, str]:
    """``(config, loaded model or None, description)`` of a model given as a loaded model, folder or Hub id.

    Only ``config.json`` is read (downloaded): enough to rebuild the architecture on the meta device.
    """
    if isinstance(source, nn.Module):
        checked = open_checkpoint(source, role=role)
        return checked.config, source, checked.description
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"The {role} must be a folder, a Hub repo id or a loaded model, got {type(source).__name__}.")
    folder = local_folder(source, role)
    if folder is not None:
        description = f"{role} model {folder}"
        if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            raise AdapterNotFoundError(f"The {description} has no config.json{_what_is_there(folder)}.")
        return _load_config(folder, description), None, description
    repo_id = os.fspath(source)
    description = f"{role} repository {repo_id}" + (f"@{revision}" if revision else "")
    path = _hub_files(repo_id, [CONFIG_NAME], revision=revision, token=token, role=role)[CONFIG_NAME]
    return _load_config(os.path.dirname(path), description), None, description
