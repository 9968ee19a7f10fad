"""PEFT API details of T-Switch: heads that do not fit, transformers' adapter methods, weighted combinations of
switches, and what an empty switch can learn (issue #8)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from tiny_models import finetune_copy, tiny_bert_classifier, token_batch

from switch_adapter import LayoutMismatchError, TSwitchConfig, from_finetuned


def _structure(model: torch.nn.Module) -> list[tuple[str, str]]:
    return [(name, type(module).__name__) for name, module in model.named_modules()]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, structure, state) -> None:
    assert _structure(model) == structure
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[key], value) for key, value in state.items())


@pytest.fixture()
def two_label_switch(tmp_path):
    """A switch saved with a fine-tuned 2-label classification head in ``modules_to_save``."""
    base = tiny_bert_classifier(num_labels=2)
    config = TSwitchConfig(density=0.2, task_type="SEQ_CLS", modules_to_save=["classifier"])
    model = from_finetuned(copy.deepcopy(base), finetune_copy(base), config, progress=False)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        logits = model(**token_batch()).logits
    return tmp_path, logits


def test_head_of_other_shape_is_refused_before_anything_is_modified(two_label_switch):
    path, logits = two_label_switch
    three_labels = tiny_bert_classifier(num_labels=3)
    structure, state = _structure(three_labels), _state(three_labels)
    with pytest.raises(LayoutMismatchError) as caught:
        PeftModel.from_pretrained(three_labels, path)
    message = str(caught.value)
    assert "classifier.weight" in message and "[2, 32]" in message and "[3, 32]" in message
    assert "num_labels=2" in message and "nothing was modified" in message
    _assert_unchanged(three_labels, structure, state)
    assert not hasattr(three_labels, "peft_config")

    # the same model loads a fitting switch afterwards, and load_adapter refuses the same way
    fitting = from_finetuned(
        copy.deepcopy(three_labels),
        finetune_copy(three_labels),
        TSwitchConfig(density=0.2, task_type="SEQ_CLS", modules_to_save=["classifier"]),
        progress=False,
    )
    fitting.save_pretrained(path.parent / "fitting")
    loaded = PeftModel.from_pretrained(three_labels, path.parent / "fitting")
    structure, state = _structure(loaded), _state(loaded)
    with pytest.raises(LayoutMismatchError, match="classifier.weight"):
        loaded.load_adapter(path, adapter_name="two")
    _assert_unchanged(loaded, structure, state)
    assert set(loaded.peft_config) == {"default"}

    # and the switch itself still loads onto a base with its number of labels
    reloaded = PeftModel.from_pretrained(tiny_bert_classifier(num_labels=2), path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**token_batch()).logits, logits)
