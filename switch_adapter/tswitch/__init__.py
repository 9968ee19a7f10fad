"""T-Switch: a task vector as per-tensor binary keep-masks, signs of the kept entries and one scale."""

from .._peft_registration import register_method
from .config import DEFAULT_DENSITY, TSwitchConfig
from .layer import SwitchedModule, TSwitchLayer
from .model import LayoutMismatchError, TSwitchModel

register_method("tswitch", TSwitchConfig, TSwitchModel, prefix="tswitch_")

__all__ = [
    "DEFAULT_DENSITY",
    "LayoutMismatchError",
    "SwitchedModule",
    "TSwitchConfig",
    "TSwitchLayer",
    "TSwitchModel",
]
