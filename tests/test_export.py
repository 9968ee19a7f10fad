"""Exports of T-Switch adapters: merged transformers folders, PEFT LoRA adapters, and the storage inspection.

Exports are reloaded by plain transformers / peft in a subprocess that never imports switch_adapter.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import finetune_copy, tiny_bert, tiny_bert_classifier, tiny_llama, token_batch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, GPT2Model

from switch_adapter import CodecError, LayoutMismatchError, TSwitchConfig, from_finetuned, storage_summary
from switch_adapter.export import inspect_adapter, materialize, to_lora
from switch_adapter.tswitch.layer import SwitchedModule

LLAMA_BATCH = token_batch(vocab_size=128)
BERT_BATCH = token_batch(vocab_size=100)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _bert_with_new_head(seed: int):
    """A 2-label base and a switch fine-tuned to 3 labels (the head is a full-precision modules_to_save)."""
    base = tiny_bert_classifier(num_labels=2)
    tuned = tiny_bert_classifier(seed=seed, num_labels=3)
    body = {k: v for k, v in finetune_copy(base, seed=seed).state_dict().items() if "classifier" not in k}
    tuned.load_state_dict(body, strict=False)
    config = TSwitchConfig(density=0.1, task_type="SEQ_CLS", modules_to_save=["classifier"])
    return base, from_finetuned(copy.deepcopy(base), tuned, config, progress=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Saved bases and switches shared by the tests of this module, plus expected outputs."""
    root = tmp_path_factory.mktemp("export")
    bert_base, bert_switch = _bert_with_new_head(seed=1)
    bert_base.save_pretrained(root / "bert_base")
    bert_switch.save_pretrained(root / "bert_switch")
    torch.save(_logits(bert_switch, BERT_BATCH), root / "bert_switch_logits.pt")

    llama = tiny_llama(tie_word_embeddings=True)
    llama.save_pretrained(root / "llama_base")
    for name, seed in (("a", 1), ("b", 2)):
        config = TSwitchConfig(density=0.2, task_type="CAUSAL_LM", scale_granularity="row" if name == "b" else "tensor")
        model = from_finetuned(
            copy.deepcopy(llama), finetune_copy(llama, seed=seed, noise=0.05), config, progress=False
        )
        model.save_pretrained(root / f"llama_{name}")
    return root


# -- materialize ------------------------------------------------------------------------------------------


def test_materialize_one_switch_with_a_new_head(work):
    out = materialize(work / "bert_base", work / "bert_switch", work / "bert_merged", progress=False)
    assert out == str(work / "bert_merged")
    assert {"config.json", "model.safetensors", "README.md"} <= set(os.listdir(out))
    assert not [n for n in os.listdir(work) if n.startswith(".bert_merged")]  # no temporary folder left
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert merged.config.num_labels == 3  # the switch's head replaced the base's 2-label head
    torch.testing.assert_close(_logits(merged, BERT_BATCH), torch.load(work / "bert_switch_logits.pt"))


def test_materialize_weighted_combination(work):
    adapters = {"a": work / "llama_a", "b": work / "llama_b"}
    materialize(work / "llama_base", adapters, work / "llama_ab", weights={"a": 0.5, "b": 0.25}, progress=False)
    materialize(work / "llama_base", work / "llama_a", work / "llama_a_only", progress=False)

    base = tiny_llama(tie_word_embeddings=True).state_dict()
    both = AutoModelForCausalLM.from_pretrained(work / "llama_ab")
    only_a = AutoModelForCausalLM.from_pretrained(work / "llama_a_only").state_dict()
    assert both.lm_head.weight.data_ptr() == both.model.embed_tokens.weight.data_ptr()  # still tied
    peft_model = PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), work / "llama_a", adapter_name="a")
    peft_model.load_adapter(work / "llama_b", adapter_name="b")
    deltas = {}
    for name, layer in peft_model.base_model.model.named_modules():
        if isinstance(layer, SwitchedModule):
            for param in ("weight", "bias"):
                if layer._has_switch("a", param) or layer._has_switch("b", param):
                    da, db = layer.get_delta("a", param), layer.get_delta("b", param)
                    deltas[f"{name}.{param}"] = (0 if da is None else da, 0 if db is None else db)
    assert len(deltas) > 10
    for key, value in both.state_dict().items():
        da, db = deltas.get("model.embed_tokens.weight" if key == "lm_head.weight" else key, (0, 0))  # tied
        torch.testing.assert_close(value, base[key] + 0.5 * da + 0.25 * db, rtol=0, atol=1e-6, msg=key)
        if key in deltas:
            torch.testing.assert_close(only_a[key], base[key] + da, rtol=0, atol=1e-6)


def test_materialize_refuses_different_heads_and_writes_nothing(work, tmp_path):
    _, other = _bert_with_new_head(seed=7)
    other.save_pretrained(tmp_path / "other_switch")
    with pytest.raises(ValueError, match="different task heads for classifier"):
        materialize(
            work / "bert_base", [work / "bert_switch", tmp_path / "other_switch"], tmp_path / "out", progress=False
        )
    assert sorted(os.listdir(tmp_path)) == ["other_switch"]


def test_output_folder_rules(work, tmp_path):
    existing = tmp_path / "out"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        materialize(work / "llama_base", work / "llama_a", existing, progress=False)
    assert os.listdir(existing) == ["keep.txt"]

    # a failure half-way (the switch does not fit this base) leaves no output and no parent folder behind
    tiny_llama(hidden_size=48, num_attention_heads=4).save_pretrained(tmp_path / "other_base")
    with pytest.raises(LayoutMismatchError):
        materialize(tmp_path / "other_base", work / "llama_a", tmp_path / "new" / "merged", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["other_base", "out"]

    with pytest.raises(ValueError, match="also an input"):
        materialize(work / "llama_base", work / "llama_a", work / "llama_base", overwrite=True, progress=False)
    _lora_folder(tmp_path / "lora")
    with pytest.raises(ValueError, match="not a T-Switch adapter"):
        materialize(work / "llama_base", tmp_path / "lora", tmp_path / "x", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        materialize(work / "llama_base", tmp_path / "missing", tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()

    materialize(work / "llama_base", work / "llama_a", existing, overwrite=True, progress=False)
    assert "keep.txt" not in os.listdir(existing) and "model.safetensors" in os.listdir(existing)


def test_materialize_a_loaded_model_leaves_it_untouched(work, tmp_path):
    base = tiny_llama(tie_word_embeddings=True)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    (tmp_path / "out").mkdir()  # an empty folder may be written into
    materialize(base, {"a": work / "llama_a"}, tmp_path / "out", dtype="bfloat16", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert not any(n.startswith("tswitch") for n, _ in base.named_modules())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert merged.model.embed_tokens.weight.dtype == torch.bfloat16


def _lora_folder(path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=2))
    model.save_pretrained(path)


# -- to_lora ----------------------------------------------------------------------------------------------


def test_to_lora_full_rank_reproduces_the_switch(work):
    """Tied embeddings (embedding LoRA + lm_head LoRA), per-row scales, norms as modules_to_save: error ~0."""
    report = to_lora(work / "llama_b", work / "llama_base", work / "llama_b_lora", rank=64, include_norms=True)
    assert report.lora_relative_error < 1e-5 and report.relative_error < 1e-5
    assert not report.dropped and "model.norm" in report.modules_to_save
    kinds = {m.name: m.kind for m in report.modules}
    assert kinds["model.embed_tokens"] == "embedding" and kinds["lm_head"] == "linear (tied)"
    config = json.loads((work / "llama_b_lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 64
    assert config["rank_pattern"]["model.layers.0.self_attn.q_proj"] == 32  # min(rows, columns) < rank

    switch = PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), work / "llama_b")
    lora = PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), work / "llama_b_lora")
    expected = _logits(switch, LLAMA_BATCH)
    assert not torch.allclose(expected, _logits(tiny_llama(tie_word_embeddings=True), LLAMA_BATCH), atol=1e-3)
    torch.testing.assert_close(_logits(lora, LLAMA_BATCH), expected, rtol=1e-4, atol=1e-5)
    torch.save(expected, work / "llama_b_logits.pt")


def test_to_lora_biases_and_conv1d_exact():
    """lora_bias carries Linear/Conv1D bias deltas exactly; Conv1D (GPT-2) uses fan_in_fan_out."""
    torch.manual_seed(0)
    gpt2 = GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=32)).eval()
    cases = [
        (tiny_bert(), TSwitchConfig(density=0.1, target_modules=["query", "key", "value", "dense"])),
        (gpt2, TSwitchConfig(density=0.1, target_modules=["c_attn", "c_proj", "c_fc"], switch_norms=True)),
    ]
    for base, config in cases:
        switch = from_finetuned(copy.deepcopy(base), finetune_copy(base), config, progress=False)
        with _tmp() as folder:
            switch.save_pretrained(os.path.join(folder, "switch"))
            report = to_lora(
                os.path.join(folder, "switch"),
                base,
                os.path.join(folder, "lora"),
                rank=64,
                lora_bias=True,
                include_norms=True,
                progress=False,
            )
            assert report.relative_error < 1e-5 and report.exact_units and not report.dropped
            lora = PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(folder, "lora"))
            with torch.no_grad():
                expected = switch(**BERT_BATCH).last_hidden_state
                torch.testing.assert_close(lora(**BERT_BATCH).last_hidden_state, expected, rtol=1e-4, atol=1e-5)


def test_to_lora_low_rank_reports_true_errors_and_drops(work, tmp_path):
    reports = {
        r: to_lora(work / "llama_a", work / "llama_base", tmp_path / f"r{r}", rank=r, progress=False) for r in (2, 8)
    }
    assert 0.2 < reports[8].lora_relative_error < reports[2].lora_relative_error < 1.0
    low = reports[2]
    assert {d.reason for d in low.dropped} == {"norm layer (include_norms=True keeps it)"}
    assert 0 < low.dropped_share < 0.05 and low.relative_error >= low.lora_relative_error
    # the reported error of a module is the real ||delta - B A|| / ||delta|| of the saved factors
    tensors = load_file(tmp_path / "r2" / "adapter_model.safetensors")
    peft_model = PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), work / "llama_a")
    layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    delta = layer.get_delta("default", "weight")
    prefix = "base_model.model.model.layers.1.mlp.down_proj"
    product = tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]
    entry = next(m for m in low.modules if m.name == "model.layers.1.mlp.down_proj")
    assert math.isclose(entry.relative_error, float((delta - product).norm() / delta.norm()), rel_tol=1e-4)
    saved = json.loads((tmp_path / "r2" / "lora_export_report.json").read_text())
    assert saved["rank"] == 2 and len(saved["modules"]) == len(low.modules)
    assert "relative error" in str(low)


def test_to_lora_bad_input_writes_nothing(work, tmp_path):
    with pytest.raises(ValueError, match="lora_bias for embedding"):
        to_lora(work / "llama_a", work / "llama_base", tmp_path / "x", lora_bias=True, progress=False)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        to_lora(work / "llama_a", work / "llama_base", tmp_path / "x", rank=0)
    with pytest.raises(ValueError, match="does not record its base model"):
        to_lora(work / "llama_a", None, tmp_path / "x")
    assert os.listdir(tmp_path) == []


# -- loading without switch_adapter ---------------------------------------------------------------------


def test_exports_load_without_switch_adapter(work):
    """Plain transformers loads the merged folders and plain peft the exported LoRA, in a fresh process."""
    for name in ("bert_merged", "llama_b_lora"):
        if not (work / name).exists():
            pytest.skip("run with the tests that write the exports")
    code = f"""
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        from tiny_models import tiny_llama, token_batch
        root = {str(work)!r}
        with torch.no_grad():
            merged = AutoModelForSequenceClassification.from_pretrained(root + "/bert_merged")
            got = merged(**token_batch(vocab_size=100)).logits
            torch.testing.assert_close(got, torch.load(root + "/bert_switch_logits.pt"))
            base = AutoModelForCausalLM.from_pretrained(root + "/llama_base")
            lora = PeftModel.from_pretrained(base, root + "/llama_b_lora")
            got = lora(**token_batch(vocab_size=128)).logits
            torch.testing.assert_close(got, torch.load(root + "/llama_b_logits.pt"), rtol=1e-4, atol=1e-5)
        assert not any(m.startswith("switch_adapter") for m in sys.modules), "switch_adapter was imported"
        print("OK")
    """
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=tests_dir)  # tiny_models only: the repository root is not on the path
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


# -- inspect ----------------------------------------------------------------------------------------------


def test_inspect_reads_sizes_from_the_file(work):
    report = inspect_adapter(work / "bert_switch")
    config = TSwitchConfig.from_pretrained(str(work / "bert_switch"))
    summary = storage_summary(config)
    assert (len(report.units), report.numel, report.kept) == (summary.units, summary.parameters, summary.kept)
    assert report.switch_bytes == summary.switch_bytes
    assert math.isclose(report.bound_bytes, summary.bound_bytes)
    for unit in report.units:
        module, _, param = unit.name.rpartition(".")
        entry = config.unit_layout[module][param]
        assert (unit.shape, unit.kept, unit.encoding) == (entry["shape"], entry["kept"], entry["encoding"])
        assert unit.bytes == entry["code_bytes"] + 4 * entry["scales"] + 4  # code, fp32 scales, checksum
        assert unit.vs_bound >= 1.0
    assert {t.name for t in report.full_precision} == {"classifier.weight", "classifier.bias"}
    assert report.full_precision[1].shape == [3, 32]

    data = json.loads(json.dumps(report.to_dict()))
    assert data["totals"]["switch_bytes"] == report.switch_bytes and data["task_type"] == "SEQ_CLS"
    assert math.isclose(data["totals"]["fraction_of_fp32"], report.switch_bytes / (4 * report.numel))
    table = report.to_table()
    assert "bert.encoder.layer.0.attention.self.query.weight" in table and "total (39 units)" in table
    assert "classifier.weight" in table and "entropy bound" in table
    widths = {len(line) for line in table.splitlines()[3:6]}
    assert len(widths) == 1  # header, rule and first row are aligned


def test_inspect_bad_input(tmp_path, work):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inspect_adapter(tmp_path / "missing")
    _lora_folder(tmp_path / "lora")
    with pytest.raises(ValueError, match="LORA adapter, not a T-Switch adapter"):
        inspect_adapter(tmp_path / "lora")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((work / "bert_switch" / "adapter_config.json").read_text())
    tensors = load_file(work / "bert_switch" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("query.tswitch_weight_code"))
    tensors[key] = tensors[key][:-2].clone()
    save_file(tensors, broken / "adapter_model.safetensors")
    report = inspect_adapter(broken)  # the damage is reported, not raised
    assert report.damaged and report.problems == [
        "bert.encoder.layer.0.attention.self.query.weight: checksum mismatch: the code or the scale was changed "
        "after it was saved"
    ]
    assert "query.weight" not in {u.name for u in report.units} and len(report.units) == 38
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CodecError, match="not a readable safetensors file"):
        inspect_adapter(broken)


class _tmp:
    """A temporary folder as a context manager (tests that build several cases in a loop)."""

    def __enter__(self) -> str:
        import tempfile

        self.path = tempfile.mkdtemp(prefix="switch_export_")
        return self.path

    def __exit__(self, *exc) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)
