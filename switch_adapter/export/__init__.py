"""Exports of T-Switch adapters: a merged transformers model, a PEFT LoRA, and a storage inspection."""

from .inspect import InspectionReport, TensorReport, UnitReport, inspect_adapter
from .lora import DroppedUnit, LoraExportReport, LoraModuleReport, to_lora
from .materialize import materialize
from .plot import plot_units

__all__ = [
    "DroppedUnit",
    "InspectionReport",
    "LoraExportReport",
    "LoraModuleReport",
    "TensorReport",
    "UnitReport",
    "inspect_adapter",
    "materialize",
    "plot_units",
    "to_lora",
]
