"""Temporary files and folders next to an output, renamed into place when complete, with the permissions a
plain ``open`` / ``mkdir`` would give (``tempfile`` creates them private: 0600 / 0700), and the final rename."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:  # Linux: read without changing it
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def staging_dir(parent: str | os.PathLike, prefix: str) -> str:
    """A new empty folder in ``parent`` (created if needed), named ``prefix`` plus a random suffix."""
    os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(path, 0o777 & ~_umask())
    return path


def staging_file(parent: str | os.PathLike, prefix: str, suffix: str = "") -> Path:
    """A new empty file in ``parent`` (created if needed), named ``prefix`` + random + ``suffix``."""
    os.makedirs(parent, exist_ok=True)
    handle, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
    os.close(handle)
    os.chmod(path, 0o666 & ~_umask())
    return Path(path)


def replace_dir(work: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the folder ``work`` to ``target``. An existing ``target`` is moved aside first, put back if the rename
    fails, and deleted once ``work`` is in place."""
    target = os.fspath(target)
    if not os.path.lexists(target):
        os.replace(work, target)
        return
    backup = os.path.join(os.path.dirname(target) or ".", f".{os.path.basename(target)}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, backup)
    try:
        os.replace(work, target)
    except BaseException:
        os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
