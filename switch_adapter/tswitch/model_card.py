"""Storage figures of a T-Switch adapter and its model card section."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from huggingface_hub import ModelCard, ModelCardData

from ..codec.sass import entropy_bound_bits
from .config import TSwitchConfig

CARD_TAGS = ("t-switch", "switch-adapter")
_SECTION_START = "<!-- switch-adapter:start -->"
_SECTION_END = "<!-- switch-adapter:end -->"


class SwitchSizeFigures:
    """Figures derived from ``kept``, ``parameters`` and ``switch_bytes`` (for dataclasses that hold them)."""

    kept: int
    parameters: int
    switch_bytes: int

    @property
    def density(self) -> float:
        """Kept entries over switched parameters."""
        return self.kept / self.parameters if self.parameters else 0.0

    @property
    def bits_per_parameter(self) -> float:
        """Bits of the switches per switched parameter (codes and scales)."""
        return 8.0 * self.switch_bytes / self.parameters if self.parameters else 0.0

    @property
    def fraction_of_fp32(self) -> float:
        """Size of the switches over the size of the same task vector in fp32."""
        return self.switch_bytes / (4.0 * self.parameters) if self.parameters else 0.0

    def as_dict(self) -> dict:
        values = asdict(self)
        values.update(
            density=self.density,
            bits_per_parameter=self.bits_per_parameter,
            fraction_of_fp32=self.fraction_of_fp32,
        )
        return values


@dataclass
class StorageSummary(SwitchSizeFigures):
    """What a switch costs, from its config's ``unit_layout``."""

    units: int
    parameters: int
    kept: int
    switch_bytes: int
    bound_bytes: float


def storage_summary(config: TSwitchConfig) -> StorageSummary:
    """Units, switched parameters, kept entries and bytes (codes plus fp32 scales) of an adapter."""
    units = parameters = kept = switch_bytes = 0
    bound_bits = 0.0
    for params in config.unit_layout.values():
        for entry in params.values():
            numel = math.prod(entry["shape"])
            units += 1
            parameters += numel
            kept += entry["kept"]
            switch_bytes += entry["code_bytes"] + 4 * entry["scales"]
            bound_bits += entropy_bound_bits(numel, entry["kept"])
    return StorageSummary(units, parameters, kept, switch_bytes, bound_bits / 8.0)


def card_section(config: TSwitchConfig, repo_id: str | None = None) -> str:
    """The markdown section describing the switch, with a loading snippet."""
    summary = storage_summary(config)
    base = config.base_model_name_or_path or "<base model id or path>"
    adapter = repo_id or "<this repository id or folder>"
    auto_class = {
        "CAUSAL_LM": "AutoModelForCausalLM",
        "SEQ_CLS": "AutoModelForSequenceClassification",
        "TOKEN_CLS": "AutoModelForTokenClassification",
        "QUESTION_ANS": "AutoModelForQuestionAnswering",
        "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    }.get(str(config.task_type.value if hasattr(config.task_type, "value") else config.task_type), "AutoModel")
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
    path = os.path.join(folder, "README.md")
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
