"""Tiny models built from configs, and fine-tuned copies with known task vectors, for unit tests."""

from __future__ import annotations

import copy

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)


def bert_config(**overrides) -> BertConfig:
    values = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
    )
    values.update(overrides)
    return BertConfig(**values)


def llama_config(**overrides) -> LlamaConfig:
    values = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_bert(seed: int = 0, **overrides) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(bert_config(**overrides)).eval()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 2, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config(num_labels=num_labels, **overrides)).eval()


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(**overrides)).eval()


def finetune_copy(model: torch.nn.Module, seed: int = 1, noise: float = 0.02) -> torch.nn.Module:
    """A copy of ``model`` whose every floating parameter moved by Gaussian noise (a synthetic fine-tune)."""
    tuned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise)
    return tuned


def token_batch(vocab_size: int = 100, batch: int = 3, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


MULTIBIT_UNITS = {  # unit -> (value bits, density) of the multi-bit units of the `multibit_switch` fixture
    ("encoder.layer.0.attention.self.query", "weight"): (4, 0.1),
    ("encoder.layer.1.output.dense", "weight"): (8, 0.02),
    ("encoder.layer.0.attention.self.key", "bias"): (2, 0.5),
}


def multibit_switches(model, adapter_name: str = "default", seed: int = 0) -> dict:
    """Put the ``MULTIBIT_UNITS`` switches (random masks and levels, scale 0.01) into the layers of the PeftModel
    ``model`` with ``layer.set_switch``, and update its config's ``unit_layout`` and ``format_version`` as a
    trainer does. Returns ``{(module, param): BinarySwitch}``."""
    from switch_adapter import BinarySwitch
    from switch_adapter.format import required_format_version

    config = model.peft_config[adapter_name]
    generator = torch.Generator().manual_seed(seed)
    switches = {}
    for (module_name, param_name), (value_bits, density) in MULTIBIT_UNITS.items():
        layer = model.get_base_model().get_submodule(module_name)
        shape = getattr(layer.get_base_layer(), param_name).shape
        mask = torch.rand(shape.numel(), generator=generator) < density
        levels = torch.randint(0, 1 << value_bits, (int(mask.sum()),), generator=generator, dtype=torch.uint8)
        switch = BinarySwitch.from_levels(mask, levels, torch.tensor([0.01]), shape, value_bits)
        entry = layer.set_switch(adapter_name, param_name, switch)
        config.unit_layout.setdefault(module_name, {})[param_name] = {**entry, "density": density}
        switches[(module_name, param_name)] = switch
    config.format_version = required_format_version(config.unit_layout)
    return switches
