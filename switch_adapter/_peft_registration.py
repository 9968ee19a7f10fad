"""Register out-of-tree PEFT methods with peft's closed ``PeftType`` enum.

peft only accepts method names that are already members of ``PeftType``. This module adds a member to the
enum at import time, in one place, so that a change in peft's enum internals breaks exactly here (and in
``tests/test_registration.py``) rather than somewhere downstream.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method


def add_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding the member to the enum first if peft does not know it yet.

    The new member behaves like the built-in ones: ``PeftType("NAME")``, ``PeftType.NAME``, ``list(PeftType)``
    and JSON round trips through its string value all work.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    # These are the enum internals peft's own lookups go through (``PeftType(value)``, ``PeftType[name]``,
    # iteration). If a future Python or peft changes them, the registration test fails loudly.
    member.__objclass__ = PeftType
    member.__init__(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def register_method(name: str, config_cls: type, model_cls: type, prefix: str) -> None:
    """Add ``name.upper()`` to ``PeftType`` and register the method's config and tuner classes with peft."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = add_peft_type(name.upper())
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls:
        return  # already registered (module re-import)
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
