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


class ConfigError(SwitchAdapterError, ValueError):
    """A config holds a setting of the wrong type, or an ``adapter_config.json`` whose records (unit layout, format
    version, ...) were edited or damaged; raised when the config is created or read, before a model is touched."""


class LayoutMismatchError(SwitchAdapterError, ValueError):
    """A saved switch (or head) does not fit the model it is loaded onto; nothing was modified."""


class AdapterNotFoundError(SwitchAdapterError, FileNotFoundError):
    """An input (adapter, model, file) is neither a local path nor a reachable Hub repository."""


class OutputExistsError(SwitchAdapterError, FileExistsError):
    """An output path already exists and overwriting was not asked for."""


class UnsupportedModelError(SwitchAdapterError, TypeError):
    """A module or checkpoint layout that switch-adapter cannot handle."""


class BudgetError(SwitchAdapterError, ValueError):
    """A storage budget that no switch of this model can meet (the message says which sizes are reachable)."""


class TrainingError(SwitchAdapterError, RuntimeError):
    """Learning a switch failed (e.g. the loss became NaN); nothing was saved and the base model is unchanged."""


class HubAccessError(SwitchAdapterError, PermissionError):
    """A Hub repository exists but this token may not read it (gated or private)."""


def hub_failure(
    error: BaseException, what: str, name: str, *, filename: str | None = None, revision: str | None = None
) -> SwitchAdapterError:
    """The error to raise for a failed Hub download of ``name`` (the ``what``, e.g. "T-Switch adapter"): one mapping
    of huggingface_hub's errors for the whole library, each message naming what was asked for and what to check."""
    kind = type(error).__name__
    at_revision = f" at revision {revision!r}" if revision else ""
    if kind == "GatedRepoError":
        return HubAccessError(
            f"The {what} {name!r} is gated: accept its terms on the Hub and pass token= (or set HF_TOKEN)."
        )
    if kind == "RevisionNotFoundError":
        return AdapterNotFoundError(f"The {what} {name!r} has no revision {revision!r}.")
    if kind in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
        missing = filename or "the file asked for"
        return AdapterNotFoundError(f"The {what} {name!r} has no {missing}{at_revision}; is it the right repository?")
    if kind == "RepositoryNotFoundError":
        return AdapterNotFoundError(
            f"The {what} {name!r} is neither a local folder nor a Hub repository you can access (for a private "
            "repository pass token= or set HF_TOKEN)."
        )
    if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return AdapterNotFoundError(
            f"The {what} {name!r} is not a local folder, the Hub cannot be reached (offline or no network), and it is "
            "not in the Hub cache. Check the path or repository id, or connect and try again."
        )
    if kind == "HFValidationError":
        return AdapterNotFoundError(f"The {what} {name!r} is neither a local folder nor a valid Hub repository id.")
    text = str(error).strip()
    detail = text.splitlines()[0] if text else kind
    return AdapterNotFoundError(
        f"The {what} {name!r} is not a local folder, and it could not be fetched from the Hub ({kind}: {detail}). "
        "Check the path or repository id, the revision and the token; offline (HF_HUB_OFFLINE=1, or no network), "
        "only repositories already in the Hub cache can be used."
    )
