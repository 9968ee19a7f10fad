"""Naming a model: a local path or a Hub repository id, and the transformers auto class of a peft task type."""

from __future__ import annotations

import os

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
        raise FileNotFoundError(f"The {role} {name!r} is a file; pass the folder that holds it.")
    if looks_like_local_path(name):
        raise FileNotFoundError(f"The {role} folder {name!r} does not exist (and it is not a Hub repository id).")
    return None
