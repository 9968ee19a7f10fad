"""T-Switch behaves like any PEFT adapter: forward, merge, several adapters, save/load, transformers' loaders."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import finetune_copy, tiny_bert, tiny_bert_classifier, tiny_llama, token_batch

import switch_adapter
from switch_adapter import TSwitchConfig, from_finetuned
from switch_adapter.codec.binarize import binarize


def _expected_model(base: torch.nn.Module, tuned: torch.nn.Module, density: float) -> torch.nn.Module:
    """base + binarize(tuned - base) for every tensor, computed directly with the reference rules."""
    expected = copy.deepcopy(base)
    tuned_state = tuned.state_dict()
    with torch.no_grad():
        for name, param in expected.named_parameters():
            tau = tuned_state[name] - param
            if torch.count_nonzero(tau):
                param.add_(binarize(tau, density).to_dense())
    return expected


def _hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_unmerged_forward_equals_reference_reconstruction():
    base, batch = tiny_bert(), token_batch()
    tuned = finetune_copy(base)
    expected = _expected_model(base, tuned, density=0.3)
    model = from_finetuned(copy.deepcopy(base), tuned, TSwitchConfig(density=0.3), progress=False)
    torch.testing.assert_close(_hidden(model, batch), _hidden(expected, batch), rtol=1e-5, atol=1e-5)


def test_empty_switch_is_a_no_op():
    base, batch = tiny_bert(), token_batch()
    reference = _hidden(base, batch)
    model = get_peft_model(base, TSwitchConfig())
    torch.testing.assert_close(_hidden(model, batch), reference)


def test_merge_unmerge_and_merge_and_unload_match_unmerged():
    base, batch = tiny_bert(), token_batch()
    model = from_finetuned(copy.deepcopy(base), finetune_copy(base), TSwitchConfig(density=0.2), progress=False)
    unmerged = _hidden(model, batch)
    model.merge_adapter()
    torch.testing.assert_close(_hidden(model, batch), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(_hidden(model, batch), unmerged, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(_hidden(model, batch), _hidden(base, batch), rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()
    assert not any("tswitch" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_hidden(merged, batch), unmerged, rtol=1e-5, atol=1e-5)


def test_several_adapters_add_and_switch():
    base, batch = tiny_bert(), token_batch()
    tuned_a, tuned_b = finetune_copy(base, seed=1), finetune_copy(base, seed=2)
    model = from_finetuned(copy.deepcopy(base), tuned_a, TSwitchConfig(density=0.3), adapter_name="a", progress=False)
    model = from_finetuned(model, tuned_b, TSwitchConfig(density=0.3), adapter_name="b", progress=False)
    only_a = _expected_model(base, tuned_a, 0.3)
    only_b = _expected_model(base, tuned_b, 0.3)
    model.set_adapter("a")
    torch.testing.assert_close(_hidden(model, batch), _hidden(only_a, batch), rtol=1e-5, atol=1e-5)
    model.set_adapter("b")
    torch.testing.assert_close(_hidden(model, batch), _hidden(only_b, batch), rtol=1e-5, atol=1e-5)

    both = copy.deepcopy(base)
    with torch.no_grad():
        for param, pa, pb in zip(both.parameters(), only_a.parameters(), only_b.parameters()):
            param.add_(pa - param.detach() + pb - param.detach())
    model.base_model.set_adapter(["a", "b"])
    torch.testing.assert_close(_hidden(model, batch), _hidden(both, batch), rtol=1e-4, atol=1e-4)

    model.base_model.set_adapter("a")
    model.delete_adapter("b")
    assert set(model.peft_config) == {"a"}
    torch.testing.assert_close(_hidden(model, batch), _hidden(only_a, batch), rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    base, batch = tiny_bert(), token_batch()
    model = from_finetuned(copy.deepcopy(base), finetune_copy(base), TSwitchConfig(density=0.1), progress=False)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(".tswitch_" in key for key in saved)
    assert all(t.dtype == torch.uint8 for k, t in saved.items() if k.endswith("_code"))

    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    for key, value in model.state_dict().items():
        if "tswitch_" in key:
            assert torch.equal(loaded.state_dict()[key], value), key
    torch.testing.assert_close(_hidden(loaded, batch), _hidden(model, batch), rtol=0, atol=0)

    # load_adapter onto an existing PeftModel under another name
    loaded.load_adapter(tmp_path, adapter_name="again")
    loaded.set_adapter("again")
    torch.testing.assert_close(_hidden(loaded, batch), _hidden(model, batch), rtol=0, atol=0)


def test_transformers_load_adapter(tmp_path):
    base, batch = tiny_bert(), token_batch()
    model = from_finetuned(copy.deepcopy(base), finetune_copy(base), TSwitchConfig(density=0.1), progress=False)
    model.save_pretrained(tmp_path)
    plain = tiny_bert()
    plain.load_adapter(str(tmp_path), adapter_name="task")
    torch.testing.assert_close(_hidden(plain, batch), _hidden(model, batch), rtol=1e-6, atol=1e-6)


def test_sequence_classification_head_with_other_label_count(tmp_path):
    base = tiny_bert_classifier(num_labels=2)
    tuned = tiny_bert_classifier(num_labels=5)
    tuned.bert.load_state_dict(finetune_copy(base.bert).state_dict())
    batch = token_batch()
    config = TSwitchConfig(density=0.2, task_type="SEQ_CLS")
    model = from_finetuned(copy.deepcopy(base), tuned, config, progress=False)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (3, 5)
    model.save_pretrained(tmp_path)

    reloaded = PeftModel.from_pretrained(tiny_bert_classifier(num_labels=2), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, logits)


def test_causal_lm_generate_with_adapter_and_after_merge(tmp_path):
    base = tiny_llama()
    tuned = finetune_copy(base, noise=0.05)
    model = from_finetuned(
        copy.deepcopy(base), tuned, TSwitchConfig(density=0.3, task_type="CAUSAL_LM"), progress=False
    )
    expected = _expected_model(base, tuned, 0.3)
    prompt = torch.tensor([[1, 5, 9, 17, 33]])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        generated = model.generate(input_ids=prompt, **kwargs)
        assert torch.equal(generated, expected.generate(input_ids=prompt, **kwargs))
        model.save_pretrained(tmp_path)
        merged = model.merge_and_unload()
        assert torch.equal(merged.generate(input_ids=prompt, **kwargs), generated)


def test_tied_output_embedding_follows_the_input_embedding_switch():
    base = tiny_llama(tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    tuned = finetune_copy(base, noise=0.05)
    expected = _expected_model(base, tuned, 0.3)
    model = from_finetuned(copy.deepcopy(base), tuned, TSwitchConfig(density=0.3), progress=False)
    prompt = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        want = expected(input_ids=prompt).logits
        torch.testing.assert_close(model(input_ids=prompt).logits, want, rtol=1e-5, atol=1e-5)
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=prompt).logits, want, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        merged = model.merge_and_unload()
        assert merged.lm_head.weight is merged.model.embed_tokens.weight
        torch.testing.assert_close(merged(input_ids=prompt).logits, want, rtol=1e-5, atol=1e-5)


def test_switch_norms_covers_rmsnorm_and_embedding():
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), TSwitchConfig(target_modules=["q_proj"], switch_norms=True))
    switched = {name for name, m in model.named_modules() if isinstance(m, switch_adapter.tswitch.TSwitchLayer)}
    assert any(name.endswith("input_layernorm") for name in switched)
    assert any(name.endswith("q_proj") for name in switched)
    assert not any(name.endswith("k_proj") for name in switched)
    model = get_peft_model(copy.deepcopy(base), TSwitchConfig())
    switched = {name for name, m in model.named_modules() if isinstance(m, switch_adapter.tswitch.TSwitchLayer)}
    assert any(name.endswith("embed_tokens") for name in switched)
    assert any(name.endswith("lm_head") for name in switched)  # untied: switched like any linear layer


def test_auto_peft_model_for_causal_lm(tmp_path):
    base = tiny_llama()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tuned = finetune_copy(base, noise=0.05)
    model = from_finetuned(
        tiny_llama().__class__.from_pretrained(base_dir),
        tuned,
        TSwitchConfig(task_type="CAUSAL_LM"),
        progress=False,
    )
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    loaded = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    prompt = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=prompt).logits, model(input_ids=prompt).logits)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_scale_granularity(granularity):
    base = tiny_bert()
    tuned = finetune_copy(base)
    model = from_finetuned(
        copy.deepcopy(base), tuned, TSwitchConfig(density=0.3, scale_granularity=granularity), progress=False
    )
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    scales = layer.tswitch_weight_scale["default"]
    assert scales.numel() == (1 if granularity == "tensor" else 32)
    delta = layer.get_delta_weight("default")
    tau = tuned.encoder.layer[0].attention.self.query.weight - base.encoder.layer[0].attention.self.query.weight
    torch.testing.assert_close(delta, binarize(tau, 0.3, granularity).to_dense())


def test_scale_rule_from_config_reaches_the_layers():
    base = tiny_bert()
    tuned = finetune_copy(base)
    config = TSwitchConfig(density=0.1, scale_rule="norm")
    model = from_finetuned(copy.deepcopy(base), tuned, config, progress=False)
    layer = model.base_model.model.encoder.layer[1].intermediate.dense
    tau = tuned.encoder.layer[1].intermediate.dense.weight - base.encoder.layer[1].intermediate.dense.weight
    expected = binarize(tau, 0.1, scale_rule="norm").scale
    torch.testing.assert_close(layer.tswitch_weight_scale["default"].detach(), expected)
