"""Converters: full fine-tuned checkpoints and LoRA adapters (local folders or Hub ids) -> T-Switch adapter folders."""

from .finetuned import convert_finetuned
from .lora import convert_lora
from .summary import ConversionSummary, SkippedTensor

__all__ = ["ConversionSummary", "SkippedTensor", "convert_finetuned", "convert_lora"]
