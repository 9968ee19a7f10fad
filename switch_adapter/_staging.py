"""Atomic outputs: everything is written into a temporary folder or file next to the output and renamed into place
only when complete, with the permissions a plain ``open`` / ``mkdir`` would give (``tempfile`` creates them private:
0600 / 0700). On any error nothing is left behind and an existing output is untouched.

:func:`atomic_output_dir` is the one way the library writes an output folder (converters, exports, routers).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExistsError

logger = logging.getLogger(__name__)


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


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool, inputs: Sequence[object] = ()) -> str:
    """The absolute output path. Raises :class:`~switch_adapter.OutputExistsError` if it is a file, or a non-empty
    folder and ``overwrite`` is false, and ``ValueError`` if it is one of the ``inputs`` (paths)."""
    final = os.path.abspath(os.fspath(output_dir))
    for item in inputs:
        if isinstance(item, (str, os.PathLike)) and os.path.exists(os.fspath(item)):
            if os.path.realpath(os.fspath(item)) == os.path.realpath(final):
                raise ValueError(f"The output folder {final} is also an input; write the result somewhere else.")
    if os.path.lexists(final):
        if not os.path.isdir(final):
            raise OutputExistsError(f"The output {final} exists and is not a folder; choose another output path.")
        if not overwrite and os.listdir(final):
            raise OutputExistsError(
                f"The output folder {final} already exists and is not empty; pass overwrite=True (--overwrite) to "
                "replace it, or choose another folder."
            )
    return final


@contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool, inputs: Sequence[object] = ()) -> Iterator[str]:
    """Yield a temporary folder next to ``output_dir``; when the block succeeds, it becomes ``output_dir``.

    Checks the output first (:func:`check_output_dir`), and again before the final rename. On any error the
    temporary folder (and any parent folder created for it) is removed, and an existing ``output_dir`` is left
    untouched. With ``overwrite`` an existing folder is replaced only at the end.
    """
    final = check_output_dir(output_dir, overwrite, inputs)
    parent = os.path.dirname(final)
    created = _first_missing_ancestor(parent)
    work = staging_dir(parent, f".{os.path.basename(final)}.tmp-")
    try:
        yield work
        if os.path.isdir(final) and not os.path.islink(final) and not os.listdir(final):
            os.rmdir(final)  # an empty folder is not worth protecting
        if os.path.lexists(final) and not overwrite:
            raise OutputExistsError(f"The output folder {final} appeared while writing; nothing was replaced.")
        replace_dir(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    logger.info("Wrote %s", final)


def _first_missing_ancestor(path: str) -> str | None:
    missing = None
    while not os.path.exists(path):
        missing = path
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing
