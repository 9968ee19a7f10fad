"""Naming a model: a local path or a Hub repository id, and the transformers auto class of a peft task type."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .errors import AdapterNotFoundError, hub_failure

T = TypeVar("T")

# transformers' auto class per peft task type.
TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}


def looks_like_local_path(name: str) -> bool:
    """True when ``name`` can only be a filesystem path, not a Hub repository id (``org/name`` or ``name``)."""
    if name.startswith((".", "/", "~")) or os.sep in name.replace("/", "") or name.endswith(("/", os.sep)):
        return True
    if os.altsep and os.altsep in name:
        return True
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def local_folder(source: str | os.PathLike, role: str) -> str | None:
    """``source`` as a folder path if it is one, None if it can be a Hub repository id; ``FileNotFoundError`` for a
    file or a path that does not exist. ``role`` names the input in the message."""
    name = os.fspath(source)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise AdapterNotFoundError(f"The {role} {name!r} is a file; pass the folder that holds it.")
    if looks_like_local_path(name):
        raise AdapterNotFoundError(f"The {role} folder {name!r} does not exist (and it is not a Hub repository id).")
    return None


_REACHABILITY_TTL_S = 30.0
_reachability: dict[str, tuple[float, bool]] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint (``HF_ENDPOINT``) accepts a connection now; False in offline mode.

    One TCP connection attempt, remembered for a few seconds, so that a missing adapter fails at once instead of
    after huggingface_hub's retries when there is no network.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = constants.ENDPOINT
    now = time.monotonic()
    cached = _reachability.get(endpoint)
    if cached is not None and now - cached[0] < _REACHABILITY_TTL_S:
        return cached[1]
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
        reachable = True
    except OSError:
        reachable = False
    _reachability[endpoint] = (now, reachable)
    return reachable


def hub_download_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` for a huggingface_hub download, with ``local_files_only=True`` when the Hub cannot be reached: then
    only the local cache answers, at once."""
    if kwargs.get("local_files_only") or hub_reachable():
        return kwargs
    return {**kwargs, "local_files_only": True}


def from_hub(download: Callable[..., T], name: str, what: str, **kwargs: Any) -> T:
    """``download(name, **kwargs)`` (``hf_hub_download``, ``snapshot_download``...), failing fast when the Hub cannot be
    reached, with every failure reported as :class:`~switch_adapter.AdapterNotFoundError` naming ``what``."""
    try:
        return download(name, **hub_download_kwargs(kwargs))
    except Exception as error:
        raise hub_failure(
            error, what, name, filename=kwargs.get("filename"), revision=kwargs.get("revision")
        ) from error


def resolve_folder(
    path_or_repo: str | os.PathLike,
    *,
    what: str,
    allow_patterns: Sequence[str] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> str:
    """A local folder for ``path_or_repo``: the folder itself, or a snapshot of the Hub repository's files matching
    ``allow_patterns`` (downloaded into the Hub cache). ``what`` names the input in error messages.

    Raises :class:`~switch_adapter.AdapterNotFoundError` for a path that does not exist and for a repository that
    cannot be downloaded (at once when the Hub cannot be reached).
    """
    from huggingface_hub import snapshot_download

    name = os.fspath(path_or_repo)
    folder = local_folder(name, what)
    if folder is not None:
        return folder
    patterns = list(allow_patterns) if allow_patterns is not None else None
    return from_hub(snapshot_download, name, what, revision=revision, token=token, allow_patterns=patterns)
