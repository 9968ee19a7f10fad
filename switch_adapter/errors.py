"""The exceptions switch-adapter raises.

Every one derives from :class:`SwitchAdapterError`, so ``except SwitchAdapterError`` catches all of them, and also
from the built-in exception a caller would catch for that kind of problem (``ValueError`` for bad content,
``FileNotFoundError`` for something missing, ``FileExistsError`` for an output in the way), so code written against
the built-ins keeps working.
"""

from __future__ import annotations


class SwitchAdapterError(Exception):
    """Base class of every error raised by switch-adapter."""


class CodecError(SwitchAdapterError, ValueError):
    """A switch file or blob is corrupt, truncated, fails its checksum, or uses an unknown format version or
    encoding."""


class LayoutMismatchError(SwitchAdapterError, ValueError):
    """A saved switch (or head) does not fit the model it is loaded onto; nothing was modified."""


class AdapterNotFoundError(SwitchAdapterError, FileNotFoundError):
    """An input (adapter, model, file) is neither a local path nor a reachable Hub repository."""


class OutputExistsError(SwitchAdapterError, FileExistsError):
    """An output path already exists and overwriting was not asked for."""


class UnsupportedModelError(SwitchAdapterError, TypeError):
    """A module or checkpoint layout that switch-adapter cannot handle."""


def hub_failure(error: BaseException, what: str, name: str) -> AdapterNotFoundError:
    """One message for every way a Hub download fails (missing repository, revision or file, no network, offline
    mode): what was asked for, why it failed, and what to check."""
    text = str(error).strip()
    detail = text.splitlines()[0] if text else type(error).__name__
    return AdapterNotFoundError(
        f"The {what} {name!r} is not a local folder, and it could not be fetched from the Hub "
        f"({type(error).__name__}: {detail}). Check the path or repository id, the revision and the token; "
        "offline (HF_HUB_OFFLINE=1), only repositories already in the Hub cache can be used."
    )
