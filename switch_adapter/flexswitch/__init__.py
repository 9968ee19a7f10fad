"""FlexSwitch: learn each unit's density, bit-width and scale under a storage budget, by distillation."""

from .config import FlexSwitchConfig, parse_budget
from .examples import load_examples
from .model import flexswitch

__all__ = ["FlexSwitchConfig", "flexswitch", "load_examples", "parse_budget"]
