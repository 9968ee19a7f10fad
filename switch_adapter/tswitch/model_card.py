"""The model card section of a T-Switch adapter."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData

from .._model_sources import TASK_AUTO_CLASSES
from ..format import MODEL_CARD_NAME, storage_summary

if TYPE_CHECKING:
    from .config import TSwitchConfig

CARD_TAGS = ("t-switch", "switch-adapter")
_SECTION_START = "<!-- switch-adapter:start -->"
_SECTION_END = "<!-- switch-adapter:end -->"


def card_section(config: TSwitchConfig, repo_id: str | None = None) -> str:
    """The markdown section describing the switch, with a loading snippet."""
    summary = storage_summary(config)
    base = config.base_model_name_or_path or "<base model id or path>"
    adapter = repo_id or "<this repository id or folder>"
    task_type = config.task_type.value if hasattr(config.task_type, "value") else config.task_type
    auto_class = TASK_AUTO_CLASSES.get(str(task_type), "AutoModel")
    densities = sorted({config.density, *config.density_pattern.values()})
    density_text = ", ".join(f"{d:g}" for d in densities)
    return "\n".join(
        [
            _SECTION_START,
            "## T-Switch adapter",
            "",
            "A task vector compressed with [switch-adapter](https://pypi.org/project/switch-adapter/): for every "
            "switched weight tensor a binary keep-mask, the signs of the kept entries and one scale.",
            "",
            "| | |",
            "|---|---|",
            f"| base model | `{base}` |",
            f"| density (keep ratio per sign) | {density_text} (measured: {summary.density:.4f}) |",
            f"| switched tensors / parameters | {summary.units} / {summary.parameters:,} |",
            f"| size of the switches | {summary.switch_bytes:,} bytes |",
            f"| bits per parameter | {summary.bits_per_parameter:.3f} |",
            f"| size vs fp32 task vector | {100 * summary.fraction_of_fp32:.2f}% |",
            f"| scale granularity | {config.scale_granularity} |",
            "",
            "### Load it",
            "",
            "```python",
            "import switch_adapter  # registers the T-Switch adapter type with peft",
            "from peft import PeftModel",
            f"from transformers import {auto_class}",
            "",
            f'base = {auto_class}.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{adapter}")',
            "```",
            "",
            "Without `import switch_adapter` first, peft does not know the adapter type `TSWITCH`.",
            _SECTION_END,
        ]
    )


def write_model_card(folder: str, config: TSwitchConfig, repo_id: str | None = None) -> str:
    """Create or update ``folder/README.md``: metadata (library, tags, base model) and the T-Switch section."""
    path = os.path.join(folder, MODEL_CARD_NAME)
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    tags = list(card.data.get("tags") or [])
    card.data["tags"] = tags + [tag for tag in CARD_TAGS if tag not in tags]
    if config.base_model_name_or_path:
        card.data["base_model"] = config.base_model_name_or_path
    text = card.text
    section = card_section(config, repo_id)
    if _SECTION_START in text and _SECTION_END in text:
        before, _, rest = text.partition(_SECTION_START)
        _, _, after = rest.partition(_SECTION_END)
        text = before + section + after
    else:
        text = section + "\n\n" + text
    card.text = text
    card.save(path)
    return path
