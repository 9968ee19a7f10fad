"""Output heads found by structure: left out of "all", kept in full precision by from_finetuned, warned about when
targeted explicitly."""

from __future__ import annotations

import copy
import logging

import torch
from peft import get_peft_model
from peft.utils import ModulesToSaveWrapper
from tiny_models import tiny_bert, tiny_bert_classifier, tiny_llama
from torch import nn

from switch_adapter import TSwitchConfig, from_finetuned
from switch_adapter.heads import output_head_candidates
from switch_adapter.tswitch.layer import SwitchedModule


class Classifier(nn.Module):
    """A plain conv classifier whose head has a given attribute name (``fc`` as torchvision, ``_fc`` as
    EfficientNet-PyTorch)."""

    def __init__(self, head_name: str = "_fc", classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_name = head_name
        setattr(self, head_name, nn.Linear(8, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn(self.stem(x)))).flatten(1)
        return getattr(self, self.head_name)(x)


class Expander(nn.Module):
    """Its last layer maps to more outputs than inputs: not a head."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.out = nn.Linear(4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.inner(x)))


def changed(model: nn.Module, *names: str) -> nn.Module:
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            tuned.get_parameter(name).add_(0.1)
    return tuned


def switched_names(model: nn.Module) -> set[str]:
    return {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, SwitchedModule)}


def test_candidates_by_structure():
    assert output_head_candidates(Classifier("_fc")) == ["_fc"]
    assert output_head_candidates(Classifier("fc")) == ["fc"]
    assert output_head_candidates(tiny_bert_classifier()) == ["classifier"]
    assert output_head_candidates(tiny_llama()) == []  # the LM head maps to a larger vocabulary
    assert output_head_candidates(tiny_bert()) == []  # the pooler keeps its width
    assert output_head_candidates(Expander()) == []


def test_all_leaves_candidates_out():
    model = get_peft_model(Classifier("fc"), TSwitchConfig(inference_mode=True))
    assert switched_names(model) == {"stem", "bn"}
    model = get_peft_model(tiny_llama(), TSwitchConfig(inference_mode=True))
    assert "lm_head" in switched_names(model)  # not a head: switched like any layer


def test_from_finetuned_keeps_changed_heads_in_full_precision(caplog):
    base = Classifier("_fc")
    tuned = changed(base, "stem.weight", "_fc.weight")
    config = TSwitchConfig()
    with caplog.at_level(logging.INFO, logger="switch_adapter.heads"):
        model = from_finetuned(copy.deepcopy(base), tuned, config, progress=False)
    assert model.peft_config["default"].modules_to_save == ["_fc"] and config.modules_to_save is None
    assert "_fc" in caplog.text and "modules_to_save" in caplog.text
    wrapper = model.get_base_model()._fc
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert torch.equal(wrapper.modules_to_save["default"].weight, tuned._fc.weight)  # full precision

    unchanged_head = from_finetuned(copy.deepcopy(base), changed(base, "stem.weight"), progress=False)
    assert not unchanged_head.peft_config["default"].modules_to_save
    explicit = from_finetuned(copy.deepcopy(base), tuned, TSwitchConfig(modules_to_save=[]), progress=False)
    assert not isinstance(explicit.get_base_model()._fc, ModulesToSaveWrapper)  # an explicit choice is kept


def test_heads_with_another_label_count_and_transformers_classifier():
    base = tiny_bert_classifier(num_labels=2)
    tuned = tiny_bert_classifier(seed=1, num_labels=5)
    model = from_finetuned(copy.deepcopy(base), tuned, TSwitchConfig(density=0.5), progress=False)
    config = model.peft_config["default"]
    assert config.modules_to_save == ["classifier"]
    assert config.modules_to_save_shapes["classifier"]["weight"] == [5, 32]


def test_explicit_target_of_a_head_warns(caplog):
    base = Classifier("fc")
    with caplog.at_level(logging.WARNING, logger="switch_adapter.tswitch.model"):
        from_finetuned(
            copy.deepcopy(base),
            changed(base, "fc.weight"),
            TSwitchConfig(target_modules=["stem", "fc"]),
            progress=False,
        )
    assert "fc" in caplog.text and "modules_to_save=['fc']" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="switch_adapter.tswitch.model"):
        from_finetuned(copy.deepcopy(base), changed(base, "stem.weight"), TSwitchConfig(target_modules=["stem"]),
                       progress=False)  # fmt: skip
    assert "output head" not in caplog.text
