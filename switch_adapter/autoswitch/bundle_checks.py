"""Checks of a bundle's files before anything is built from them: a damaged or hand-edited bundle is refused with
one message naming every problem and the fix, instead of failing deep inside loading with a ``KeyError``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import torch

FIX = (
    "Re-save the bundle with AutoSwitchModel.save_pretrained, or restore the file from where the bundle came "
    "(download it again)."
)


def damaged(path: Any, problems: list[str] | str) -> str:
    """The message for a damaged bundle file ``path``: its problems, one per line, then the fix."""
    problems = [problems] if isinstance(problems, str) else problems
    return f"{path} is damaged:\n  " + "\n  ".join(problems) + f"\n{FIX}"


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _adapter_problems(name: str, adapter: Any) -> list[str]:
    if not isinstance(adapter, Mapping):
        return [f"task {name!r}: 'adapter' must be an object with 'path' or 'repo_id', got {adapter!r}"]
    if "path" in adapter:
        path = adapter["path"]
        if not _is_text(path):
            return [f"task {name!r}: the adapter's 'path' must be a folder inside the bundle, got {path!r}"]
        parts = PurePosixPath(path.replace("\\", "/"))
        if parts.is_absolute() or ".." in parts.parts or PureWindowsPath(path).drive:
            return [f"task {name!r}: the adapter's 'path' {path!r} leaves the bundle; it must be a folder inside it"]
        return []
    if not _is_text(adapter.get("repo_id")):
        return [f"task {name!r}: 'adapter' names neither a 'path' inside the bundle nor a Hub 'repo_id'"]
    return [
        f"task {name!r}: the adapter's {key!r} must be text or null, got {adapter[key]!r}"
        for key in ("revision", "subfolder")
        if adapter.get(key) is not None and not isinstance(adapter[key], str)
    ]


def _task_problems(tasks: Any) -> list[str]:
    if tasks is None:
        return ["'tasks' is missing"]
    if not isinstance(tasks, list) or not tasks:
        return [f"'tasks' must be a non-empty list of tasks, got {tasks!r}"[:200]]
    problems, seen = [], set()
    for index, entry in enumerate(tasks):
        if not isinstance(entry, Mapping) or not _is_text(entry.get("name")):
            problems.append(f"task {index}: must be an object with a non-empty 'name'")
            continue
        name = entry["name"]
        if name in seen:
            problems.append(f"task {name!r} is listed twice")
        seen.add(name)
        problems += _adapter_problems(name, entry.get("adapter"))
    return problems


def description_problems(description: Mapping[str, Any]) -> list[str]:
    """What is missing or malformed in a parsed ``autoswitch_config.json`` whose format is already checked."""
    problems = []
    for key in ("config", "features", "base_model"):
        if key not in description:
            problems.append(f"{key!r} is missing")
        elif not isinstance(description[key], Mapping):
            problems.append(f"{key!r} must be an object, got {description[key]!r}"[:200])
    base = description.get("base_model")
    if isinstance(base, Mapping) and not _is_text(base.get("fingerprint")):
        problems.append("'base_model' has no 'fingerprint' (the check that the bundle fits the base model)")
    routing = description.get("routing")
    if routing is not None and not isinstance(routing, Mapping):
        problems.append(f"'routing' must be an object or null, got {routing!r}"[:200])
    return problems + _task_problems(description.get("tasks"))


def features_problems(
    bank: torch.Tensor, task_ids: torch.Tensor, projection: torch.Tensor | None, tasks: list[str]
) -> list[str]:
    """What in the query features file does not fit together or with the bundle's ``tasks``."""
    problems = []
    if bank.dim() != 2 or not bank.is_floating_point():
        problems.append(f"'features' must be a 2-D float tensor, got {bank.dtype} of shape {tuple(bank.shape)}")
    if task_ids.dim() != 1 or task_ids.is_floating_point() or task_ids.dtype == torch.bool:
        problems.append(f"'task_ids' must be a 1-D integer tensor, got {task_ids.dtype} {tuple(task_ids.shape)}")
    elif bank.dim() == 2 and task_ids.numel() != bank.shape[0]:
        problems.append(f"'task_ids' has {task_ids.numel()} entries for {bank.shape[0]} rows of 'features'")
    elif task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= len(tasks)):
        problems.append(f"'task_ids' holds ids outside 0..{len(tasks) - 1} (the bundle lists {len(tasks)} tasks)")
    else:
        counts = torch.bincount(task_ids.long(), minlength=len(tasks)).tolist()
        empty = [name for name, count in zip(tasks, counts) if count == 0]
        if empty:
            problems.append(f"no query example for task(s) {', '.join(map(repr, empty))}")
    if projection is not None and (projection.dim() != 2 or not projection.is_floating_point()):
        problems.append(f"'projection' must be a 2-D float tensor, got shape {tuple(projection.shape)}")
    return problems
