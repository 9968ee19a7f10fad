"""Where a task's adapter comes from, and the error for an adapter that does not belong to the router's base."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import SwitchAdapterError


class AdapterMismatchError(SwitchAdapterError, ValueError):
    """An adapter does not belong to the router's base model (another base id, other shapes, another type)."""


@dataclass(frozen=True)
class AdapterSource:
    """Where a task's adapter came from: a local folder or a Hub repo (with revision and subfolder)."""

    location: str
    revision: str | None = None
    subfolder: str | None = None

    @property
    def is_local(self) -> bool:
        return os.path.isdir(self.location)

    def hub_kwargs(self) -> dict[str, Any]:
        return {key: value for key, value in (("revision", self.revision), ("subfolder", self.subfolder)) if value}
