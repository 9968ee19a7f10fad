"""PEFT API details of T-Switch: heads that do not fit, transformers' adapter methods, weighted combinations of
switches, and what an empty switch can learn (issue #8)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from peft import PeftModel
from tiny_models import finetune_copy, tiny_bert, tiny_bert_classifier, token_batch

from switch_adapter import LayoutMismatchError, TSwitchConfig, from_finetuned
from switch_adapter.tswitch import TSwitchLayer


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


def _hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_transformers_adapter_methods_after_load_adapter(tmp_path):
    """transformers' set_adapter / active_adapters / disable_adapters / enable_adapters / delete_adapter work on
    T-Switch adapters loaded with ``model.load_adapter`` (they refuse to run with an incompatible peft)."""
    base, batch = tiny_bert(), token_batch()
    expected = {}
    for seed, name in enumerate(["first", "second"], start=1):
        model = from_finetuned(
            copy.deepcopy(base), finetune_copy(base, seed=seed), TSwitchConfig(density=0.2), progress=False
        )
        model.save_pretrained(tmp_path / name)
        expected[name] = _hidden(model, batch)

    plain = tiny_bert()
    plain.load_adapter(str(tmp_path / "first"), adapter_name="first")
    plain.load_adapter(str(tmp_path / "second"), adapter_name="second")
    plain.set_adapter("first")
    assert plain.active_adapters() == ["first"]
    torch.testing.assert_close(_hidden(plain, batch), expected["first"], rtol=1e-6, atol=1e-6)
    plain.set_adapter("second")
    assert plain.active_adapters() == ["second"]
    torch.testing.assert_close(_hidden(plain, batch), expected["second"], rtol=1e-6, atol=1e-6)

    plain.disable_adapters()
    torch.testing.assert_close(_hidden(plain, batch), _hidden(base, batch), rtol=1e-6, atol=1e-6)
    plain.enable_adapters()
    torch.testing.assert_close(_hidden(plain, batch), expected["second"], rtol=1e-6, atol=1e-6)

    plain.delete_adapter("first")
    assert set(plain.peft_config) == {"second"}
    layers = [m for m in plain.modules() if isinstance(m, TSwitchLayer)]
    assert layers and all(m._all_available_adapter_names() == ["second"] for m in layers)
    torch.testing.assert_close(_hidden(plain, batch), expected["second"], rtol=1e-6, atol=1e-6)


TUNER_LOGGER = "switch_adapter.tswitch.model"


def test_empty_trainable_switch_says_what_training_means(caplog):
    from peft import get_peft_model

    with caplog.at_level(logging.WARNING, logger=TUNER_LOGGER):
        get_peft_model(tiny_bert(), TSwitchConfig())
    messages = [r.getMessage() for r in caplog.records if r.name == TUNER_LOGGER]
    assert len(messages) == 1
    assert "only its scales and modules_to_save" in messages[0] and "from_finetuned" in messages[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=TUNER_LOGGER):
        get_peft_model(tiny_bert(), TSwitchConfig(inference_mode=True))  # a placeholder, not for training
        base = tiny_bert()
        from_finetuned(base, finetune_copy(base), TSwitchConfig(density=0.2), progress=False)  # filled at once
    assert not [r for r in caplog.records if r.name == TUNER_LOGGER]
