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
from switch_adapter.codec.binarize import binarize
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
    with pytest.raises(LayoutMismatchError, match=r"(?s)classifier\.weight.*num_labels=2"):
        three_labels.load_adapter(str(path))  # transformers' route checks the same, before injecting
    _assert_unchanged(three_labels, structure, state)

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


# -- add_weighted_adapter --------------------------------------------------------------------------------------


@pytest.fixture()
def two_switches():
    base = tiny_bert()
    model = from_finetuned(
        copy.deepcopy(base), finetune_copy(base, seed=1), TSwitchConfig(density=0.3), adapter_name="a", progress=False
    )
    model = from_finetuned(
        model, finetune_copy(base, seed=2), TSwitchConfig(density=0.3), adapter_name="b", progress=False
    )
    return base, model


def _switched_layers(model):
    return [(name, m) for name, m in model.base_model.model.named_modules() if isinstance(m, TSwitchLayer)]


def _reference_merge(combination_type, deltas, weights, density):
    from peft.utils import merge_utils

    if combination_type == "linear":
        return merge_utils.task_arithmetic(deltas, weights)
    return getattr(merge_utils, combination_type)(deltas, weights, density)


@pytest.mark.parametrize("combination_type", ["linear", "ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_add_weighted_adapter_equals_the_reference_combination(two_switches, combination_type):
    _, model = two_switches
    weights = [0.7, 0.5]
    torch.manual_seed(0)
    model.add_weighted_adapter(["a", "b"], weights, "ab", combination_type=combination_type, density=0.2)
    assert model.active_adapters == ["b"]  # not activated, as in peft
    torch.manual_seed(0)  # dare_* draw random masks, tensor by tensor in the same order
    checked = 0
    for _, layer in _switched_layers(model):
        for param in layer.switch_slots("ab"):
            deltas = [layer.get_delta(a, param) for a in ("a", "b")]
            reference = _reference_merge(combination_type, deltas, torch.tensor(weights), 0.2)
            expected = binarize(reference, 0.2).to_dense() if torch.count_nonzero(reference) else None
            got = layer.get_delta("ab", param)
            if expected is None:
                assert got is None
            else:
                torch.testing.assert_close(got, expected)
                checked += 1
            assert model.peft_config["ab"].density == 0.2
    assert checked > 10


def test_add_weighted_adapter_saves_and_reloads(two_switches, tmp_path):
    base, model = two_switches
    batch = token_batch()
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab")  # density defaults to the adapters' 0.3
    assert model.peft_config["ab"].density == 0.3 and model.peft_config["ab"].unit_layout
    model.set_adapter("ab")
    combined = _hidden(model, batch)
    assert not torch.allclose(combined, _hidden(base, batch))
    model.save_pretrained(tmp_path, selected_adapters=["ab"])
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "ab")
    torch.testing.assert_close(_hidden(reloaded, batch), combined, rtol=0, atol=0)


def _classifier_switches(label_counts):
    base = tiny_bert_classifier(num_labels=2)
    config = TSwitchConfig(density=0.3, task_type="SEQ_CLS", modules_to_save=["classifier"])
    model = None
    for i, labels in enumerate(label_counts):
        tuned = finetune_copy(tiny_bert_classifier(num_labels=labels), seed=i + 1)
        model = from_finetuned(
            model if model is not None else copy.deepcopy(base), tuned, copy.deepcopy(config),
            adapter_name=f"t{i}", progress=False,
        )  # fmt: skip
    return model


def test_add_weighted_adapter_averages_heads_of_one_shape(tmp_path):
    model = _classifier_switches([3, 3])
    wrapper = model.base_model.model.classifier
    heads = [wrapper.modules_to_save[name].weight.detach().clone() for name in ("t0", "t1")]
    model.add_weighted_adapter(["t0", "t1"], [0.6, 0.2], "mix")
    expected = (0.6 * heads[0] + 0.2 * heads[1]) / 0.8
    torch.testing.assert_close(wrapper.modules_to_save["mix"].weight, expected)
    assert model.peft_config["mix"].modules_to_save_shapes["classifier"]["weight"] == [3, 32]
    model.set_adapter("mix")
    with torch.no_grad():
        logits = model(**token_batch()).logits
    assert logits.shape == (3, 3)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    reloaded = PeftModel.from_pretrained(tiny_bert_classifier(num_labels=2), tmp_path / "mix")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**token_batch()).logits, logits)


def test_add_weighted_adapter_refuses_heads_of_other_shapes():
    model = _classifier_switches([2, 3])
    structure, state = _structure(model), _state(model)
    with pytest.raises(ValueError, match=r"heads 'classifier'.*different shapes.*same number of labels"):
        model.add_weighted_adapter(["t0", "t1"], [0.5, 0.5], "mix")
    _assert_unchanged(model, structure, state)
    assert set(model.peft_config) == {"t0", "t1"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(adapters=["a", "nope"], weights=[1.0, 1.0]), r"Adapter nope does not exist"),
        (dict(adapters=["a", "b"], weights=[1.0]), r"2 adapters but 1 weights"),
        (dict(adapters=["a", "b"], weights=[1.0, 1.0], adapter_name="a"), r"Adapter a already exists"),
        (dict(adapters=["a", "b"], weights=[1.0, 1.0], combination_type="svd"), r"Invalid combination_type 'svd'"),
        (dict(adapters=["a", "b"], weights=[1.0, 1.0], density=1.5), r"density must be a number in \(0, 1\]"),
    ],
)
def test_add_weighted_adapter_bad_input_leaves_the_model_unchanged(two_switches, kwargs, message):
    _, model = two_switches
    structure, state = _structure(model), _state(model)
    with pytest.raises(ValueError, match=message):
        model.add_weighted_adapter(**{"adapter_name": "ab", **kwargs})
    _assert_unchanged(model, structure, state)
    assert set(model.peft_config) == {"a", "b"}


def test_add_weighted_adapter_refuses_other_densities_without_an_explicit_one():
    base = tiny_bert()
    model = from_finetuned(
        copy.deepcopy(base), finetune_copy(base, seed=1), TSwitchConfig(density=0.3), adapter_name="a", progress=False
    )
    model = from_finetuned(
        model, finetune_copy(base, seed=2), TSwitchConfig(density=0.1), adapter_name="b", progress=False
    )
    with pytest.raises(ValueError, match=r"different densities \(a: 0.3, b: 0.1\); pass density="):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab")
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab", density=0.2)
    assert model.peft_config["ab"].density == 0.2
