"""Where inputs come from (a local folder or a Hub repository) and how outputs are written (atomically)."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from .._model_sources import local_folder
from .._staging import replace_dir, staging_dir

logger = logging.getLogger(__name__)


def resolve_folder(
    path_or_repo: str | os.PathLike,
    *,
    what: str,
    allow_patterns: Sequence[str],
    revision: str | None = None,
    token: str | bool | None = None,
) -> str:
    """A local folder for ``path_or_repo``: the folder itself, or a snapshot of the Hub repository's files matching
    ``allow_patterns`` (downloaded into the Hub cache). ``what`` names the input in error messages.

    Raises ``FileNotFoundError`` for a path that does not exist and for a repository that cannot be downloaded.
    """
    name = os.fspath(path_or_repo)
    folder = local_folder(name, what)
    if folder is not None:
        return folder
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, revision=revision, token=token, allow_patterns=list(allow_patterns))
    except Exception as error:  # every Hub failure (missing repo, revision, network) gets the same clear message
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(
            f"The {what} {name!r} is not a local folder, and downloading it from the Hub failed "
            f"({type(error).__name__}: {detail}). Check the path, the repository id, --revision and --token."
        ) from error


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool, inputs: Sequence[object] = ()) -> str:
    """The absolute output path; raises ``FileExistsError`` if it exists (and is not an empty folder) and
    ``overwrite`` is false, and
    ``ValueError`` if it is one of the ``inputs`` (paths)."""
    final = os.path.abspath(os.fspath(output_dir))
    for item in inputs:
        if isinstance(item, (str, os.PathLike)) and os.path.exists(os.fspath(item)):
            if os.path.realpath(os.fspath(item)) == os.path.realpath(final):
                raise ValueError(f"The output folder {final} is also an input; write the result somewhere else.")
    if os.path.lexists(final):
        if not os.path.isdir(final):
            raise FileExistsError(f"{final} exists and is not a folder; choose another output path.")
        if not overwrite and os.listdir(final):
            raise FileExistsError(
                f"The output folder {final} already exists; pass overwrite=True (--overwrite) to replace it."
            )
    return final


@contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool, inputs: Sequence[object] = ()) -> Iterator[str]:
    """Yield a temporary folder next to ``output_dir``; when the block succeeds, it becomes ``output_dir``.

    On any error the temporary folder (and any parent folder created for it) is removed, and an existing
    ``output_dir`` is left untouched. With ``overwrite`` an existing folder is replaced only at the end.
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
            raise FileExistsError(f"The output folder {final} appeared while writing; nothing was replaced.")
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
