"""examples/lora_router.py runs as written, end to end, on a tiny Llama with a chat template and the local Hub."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from huggingface_hub import HfApi
from tiny_models import tiny_llama

from switch_adapter import AutoSwitchModel

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lora_router.py"
CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} <end> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def example_module():
    """The example imported as a module (for its built-in tasks and prompts)."""
    spec = importlib.util.spec_from_file_location("lora_router_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chat_tokenizer(texts: list[str]):
    """A word-level tokenizer over ``texts`` with a short chat template; ids 0-2 are pad, bos, eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>", "<end>"]
    words = sorted({word for text in texts for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)})
    backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(specials + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials[4:])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def example_and_base(tmp_path):
    """The example module, and a tiny chat Llama folder whose tokenizer knows the example's words."""
    example = example_module()
    texts = [text for pairs in example.TASKS.values() for pair in pairs for text in pair]
    tokenizer = chat_tokenizer(texts + [prompt for prompt, _ in example.PROMPTS])
    base = tmp_path / "tiny-chat-llama"
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return example, tokenizer, base


def test_lora_router_example_runs_as_written(tmp_path, hub_server, hub_repo_id):
    example, tokenizer, base = example_and_base(tmp_path)

    out = tmp_path / "out"
    command = [sys.executable, str(EXAMPLE), "--base", str(base), "--output-dir", str(out), "--steps", "3"]
    command += ["--max-new-tokens", "3", "--push-to-hub", hub_repo_id]
    path = os.pathsep.join(filter(None, [str(EXAMPLE.parents[1]), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}  # one thread is fastest for a tiny model
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    expected = [task for _, task in example.PROMPTS]
    routed = re.findall(r"^\[(\w+)\] (.+) -> ", result.stdout, flags=re.MULTILINE)
    assert routed == [(task, prompt) for prompt, task in example.PROMPTS], result.stdout
    assert f"routing: {len(expected)}/{len(expected)} prompts" in result.stdout
    assert f"reloaded from {hub_repo_id}: same routing" in result.stdout
    for task in example.TASKS:
        assert (out / "loras" / task / "adapter_model.safetensors").exists()
        assert (out / "switches" / task / "adapter_config.json").exists()
    assert (out / "router" / "autoswitch_config.json").exists()

    files = set(HfApi().list_repo_files(hub_repo_id))
    assert {"autoswitch_config.json", "query_features.safetensors", "README.md"} <= files
    assert any(name.startswith("adapters/sentiment/") for name in files)
    assert any(repo_id == hub_repo_id for _, repo_id in hub_server.repos)

    # The saved router, reloaded here, routes the prompts to their tasks too.
    router = AutoSwitchModel.from_pretrained(out / "router", base_model=tiny_llama(vocab_size=len(tokenizer)))
    assert router.route([prompt for prompt, _ in example.PROMPTS]).top_task == expected


def test_lora_router_example_takes_given_loras_from_folders_and_the_hub(tmp_path, hub_repo_id, capsys):
    """The ``--lora`` / ``--examples`` path, in process, on LoRAs fine-tuned by the example (one of them on the Hub)."""
    example, tokenizer, base = example_and_base(tmp_path)
    argv = ["--base", str(base), "--max-new-tokens", "2"]
    for task, pairs in example.TASKS.items():
        example.finetune_lora(str(base), tokenizer, pairs, tmp_path / "loras" / task, steps=1)
        (tmp_path / f"{task}.txt").write_text("\n".join(prompt for prompt, _ in pairs) + "\n\n")
        argv += ["--examples", f"{task}={tmp_path / f'{task}.txt'}"]
    HfApi().create_repo(hub_repo_id)
    HfApi().upload_folder(repo_id=hub_repo_id, folder_path=tmp_path / "loras" / "sentiment")
    argv += ["--lora", f"sentiment={hub_repo_id}", "--lora", f"language={tmp_path / 'loras' / 'language'}"]
    argv += ["--lora", f"antonyms={tmp_path / 'loras' / 'antonyms'}", "--output-dir", str(tmp_path / "out")]
    prompts = [prompt for prompt, _ in example.PROMPTS[:3]]
    capsys.readouterr()
    example.main(argv + [arg for prompt in prompts for arg in ("--prompt", prompt)])
    stdout = capsys.readouterr().out
    routed = re.findall(r"^\[(\w+)\] (.+) -> ", stdout, flags=re.MULTILINE)
    assert routed == [(task, prompt) for prompt, task in example.PROMPTS[:3]], stdout
    assert "Fine-tuning" not in stdout and "same routing" in stdout
    assert sorted(path.name for path in (tmp_path / "out" / "switches").iterdir()) == sorted(example.TASKS)
