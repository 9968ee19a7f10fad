"""The model card section of a T-Switch adapter."""

from __future__ import annotations

import functools
import json
import os
import re
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

from .._model_sources import TASK_AUTO_CLASSES
from ..format import LOW_RANK_UNITS, MODEL_CARD_NAME, storage_summary

if TYPE_CHECKING:
    from .config import TSwitchConfig

CARD_TAGS = ("t-switch", "switch-adapter")
FLEXSWITCH_TAG = "flexswitch"
_SECTION_START = "<!-- switch-adapter:start -->"
_SECTION_END = "<!-- switch-adapter:end -->"


def _flexswitch_rows(record: dict[str, Any]) -> list[str]:
    """Table rows of a FlexSwitch training record: the budget asked, the size reached, and how it was trained. Any
    key may be missing."""
    rows = []
    budget, budget_bytes = record.get("budget"), record.get("budget_bytes")
    if budget_bytes is not None:
        asked = f"{int(budget_bytes):,} bytes" if budget is None else f"{budget} ({int(budget_bytes):,} bytes)"
        rows.append(f"| budget asked | {asked} |")
    elif budget is not None:
        rows.append(f"| budget asked | {budget} |")
    reached = []
    if record.get("file_bytes") is not None:
        reached.append(f"{int(record['file_bytes']):,} bytes")
    if record.get("bits_per_parameter") is not None:
        reached.append(f"{float(record['bits_per_parameter']):.3f} bits per parameter")
    if record.get("fraction_of_fp32") is not None:
        reached.append(f"{100 * float(record['fraction_of_fp32']):.2f}% of fp32")
    if reached:
        rows.append(f"| file size reached | {', '.join(reached)} |")
    training = [f"{record['steps']} steps"] if record.get("steps") is not None else []
    if record.get("examples") is not None:
        training.append(f"{record['examples']} examples")
    if record.get("loss") is not None:
        training.append(f"loss {record['loss']}")
    if record.get("final_loss") is not None:
        training.append(f"final loss {float(record['final_loss']):.4g}")
    if record.get("seed") is not None:
        training.append(f"seed {record['seed']}")
    if training:
        rows.append(f"| training | {', '.join(training)} |")
    return rows


def _description(config: TSwitchConfig, mean_value_bits: float) -> tuple[str, str]:
    """The section title and the sentence saying what the adapter is."""
    library = "[switch-adapter](https://pypi.org/project/switch-adapter/)"
    if config.flexswitch:
        return "## FlexSwitch adapter", (
            f"A task vector compressed with {library} as a FlexSwitch, with learned per-unit sparsity and bit-width: "
            "for every switched weight tensor a keep-mask, the quantised values of the kept entries (1, 2, 4 or 8 "
            "bits per value, learned per tensor) and one scale."
        )
    values = "the values (signs, or levels of 2 to 8 bits)" if mean_value_bits > 1 else "the signs"
    if any(LOW_RANK_UNITS[0] in params for params in config.unit_layout.values()):
        return "## Low-rank switch adapter", (
            f"A LoRA compressed with {library}: every adapted weight changes by the product of two factors (a "
            f"low-rank pair in SVD form), each stored as a keep-mask, {values} of the kept entries and its scales."
        )
    return "## T-Switch adapter", (
        f"A task vector compressed with {library}: for every switched weight tensor a binary keep-mask, {values} of "
        "the kept entries and one scale."
    )


def plain_base_class(auto_mapping: dict[str, Any] | None) -> str | None:
    """``"module:Class"`` of the base model class peft records in ``auto_mapping`` when it is a plain
    ``torch.nn.Module`` (not a transformers class), else None."""
    if not auto_mapping:
        return None
    module, name = auto_mapping.get("parent_library"), auto_mapping.get("base_model_class")
    if not module or not name or module == "transformers" or str(module).startswith("transformers."):
        return None
    return f"{module}:{name}"


def _import_lines(path: str) -> tuple[list[str], str]:
    """``(import lines, name to call)`` for ``"module:qualname"``; a class of a script (``__main__``) or one defined
    inside a function cannot be imported: the snippet then says to define it as the script did."""
    module, _, qualname = path.partition(":")
    top = qualname.split(".", 1)[0]
    if module == "__main__" or "<" in qualname:
        name = qualname.split(".")[-1]
        return [f"# {name}: defined in the script that made the adapter; define it the same way"], name
    return [f"from {module} import {top}"], qualname


def _plain_loading(base_class: str, base_factory: str | None, base: str, adapter: str) -> list[str]:
    """The loading snippet of an adapter made on a plain ``torch.nn.Module``: build the base, load its weights,
    attach the adapter."""
    imports, call = _import_lines(base_factory or base_class)
    weights = base if base.endswith(".safetensors") else "<base model weights (.safetensors)>"
    return [
        "The base model is a plain `torch.nn.Module`, not a transformers model: build it with the class (or "
        "function) it was made from, load its weights, then attach the adapter.",
        "",
        "```python",
        "import switch_adapter  # registers the T-Switch adapter type with peft",
        "from peft import PeftModel",
        "from safetensors.torch import load_model",
        *imports,
        "",
        f"base = {call}()  # the same architecture (arguments included) as the model the adapter was made on",
        f'load_model(base, "{weights}")  # the base model\'s weights',
        f'model = PeftModel.from_pretrained(base, "{adapter}")',
        "```",
    ]


def card_section(
    config: TSwitchConfig,
    repo_id: str | None = None,
    *,
    auto_mapping: dict[str, Any] | None = None,
    base_factory: str | None = None,
) -> str:
    """The markdown section describing the switch, with a loading snippet; for a FlexSwitch (``config.flexswitch``)
    also the budget asked and the file size reached. ``auto_mapping`` (what peft records in ``adapter_config.json``
    for a model without a task type) names the base class: a plain ``torch.nn.Module`` base gets a snippet that builds
    it with that class, or with ``base_factory`` (``"module:function"``) when it was made by a factory."""
    summary = storage_summary(config)
    base = config.base_model_name_or_path or "<base model id or path>"
    adapter = repo_id or "<this repository id or folder>"
    task_type = config.task_type.value if hasattr(config.task_type, "value") else config.task_type
    auto_class = TASK_AUTO_CLASSES.get(str(task_type), "AutoModel")
    base_class = plain_base_class(auto_mapping)
    title, description = _description(config, summary.mean_value_bits)
    if config.flexswitch:
        density_row = f"| density (learned per tensor) | {summary.density:.4f} overall |"
    else:
        densities = sorted({config.density, *config.density_pattern.values()})
        density_text = ", ".join(f"{d:g}" for d in densities)
        density_row = f"| density (keep ratio per sign) | {density_text} (measured: {summary.density:.4f}) |"
    value_bits = [] if summary.mean_value_bits <= 1 else [
        f"| value bits (mean per kept entry) | {summary.mean_value_bits:.2f} |"
    ]  # fmt: skip
    return "\n".join(
        [
            _SECTION_START,
            title,
            "",
            description,
            "",
            "| | |",
            "|---|---|",
            f"| base model | `{base}` |",
            *([f"| base model class | `{base_class}` |"] if base_class else []),
            *([f"| base model factory | `{base_factory}` |"] if base_class and base_factory else []),
            density_row,
            *value_bits,
            f"| switched tensors / parameters | {summary.units} / {summary.parameters:,} |",
            f"| size of the switches | {summary.switch_bytes:,} bytes |",
            f"| bits per parameter | {summary.bits_per_parameter:.3f} |",
            f"| size vs fp32 task vector | {100 * summary.fraction_of_fp32:.2f}% |",
            f"| scale granularity | {config.scale_granularity} |",
            *(_flexswitch_rows(config.flexswitch) if config.flexswitch else []),
            "",
            "### Load it",
            "",
            *(
                _plain_loading(base_class, base_factory, base, adapter)
                if base_class
                else [
                    "```python",
                    "import switch_adapter  # registers the T-Switch adapter type with peft",
                    "from peft import PeftModel",
                    f"from transformers import {auto_class}",
                    "",
                    f'base = {auto_class}.from_pretrained("{base}")',
                    f'model = PeftModel.from_pretrained(base, "{adapter}")',
                    "```",
                ]
            ),
            "",
            "Without `import switch_adapter` first, peft does not know the adapter type `TSWITCH`.",
            _SECTION_END,
        ]
    )


def _saved_auto_mapping(folder: str) -> dict[str, Any] | None:
    """The ``auto_mapping`` of ``folder/adapter_config.json`` (peft writes it for models without a task type)."""
    try:
        with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as handle:
            mapping = json.load(handle).get("auto_mapping")
    except (OSError, ValueError, AttributeError):
        return None
    return mapping if isinstance(mapping, dict) else None


def _saved_factory(path: str) -> str | None:
    """The base factory a previous card of this adapter recorded (kept when the card is rewritten)."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        match = re.search(r"^\| base model factory \| `([^`]+)` \|$", handle.read(), flags=re.MULTILINE)
    return match.group(1) if match else None


@functools.lru_cache(maxsize=1)
def _default_card() -> str:
    """huggingface_hub's default model card, rendered once (its template takes jinja tens of ms to compile)."""
    return str(ModelCard.from_template(ModelCardData()))


def write_model_card(
    folder: str, config: TSwitchConfig, repo_id: str | None = None, *, base_factory: str | None = None
) -> str:
    """Create or update ``folder/README.md``: metadata (library, tags, base model) and the T-Switch section. The base
    class of an adapter made on a plain ``torch.nn.Module`` is read from the folder's ``adapter_config.json``
    (``auto_mapping``); ``base_factory`` (``"module:function"``) names the function that built it, if any."""
    path = os.path.join(folder, MODEL_CARD_NAME)
    base_factory = base_factory or _saved_factory(path)
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard(_default_card())
    card.data["library_name"] = "peft"
    tags = list(card.data.get("tags") or [])
    wanted = CARD_TAGS + (FLEXSWITCH_TAG,) if config.flexswitch else CARD_TAGS
    card.data["tags"] = tags + [tag for tag in wanted if tag not in tags]
    if config.base_model_name_or_path:
        card.data["base_model"] = config.base_model_name_or_path
    text = card.text
    auto_mapping = _saved_auto_mapping(folder) or getattr(config, "auto_mapping", None)  # a loaded config has it
    section = card_section(config, repo_id, auto_mapping=auto_mapping, base_factory=base_factory)
    if _SECTION_START in text and _SECTION_END in text:
        before, _, rest = text.partition(_SECTION_START)
        _, _, after = rest.partition(_SECTION_END)
        text = before + section + after
    else:
        text = section + "\n\n" + text
    card.text = text
    card.save(path)
    return path
