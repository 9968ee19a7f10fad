"""Switches travel: a fresh Python process loads them, and they round-trip through a Hub (loopback server)."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from peft import PeftModel
from tiny_models import finetune_copy, tiny_bert, tiny_llama, token_batch

import switch_adapter
from switch_adapter import TSwitchConfig, from_finetuned

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_python(code: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "tests")]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_fresh_process_loads_the_adapter(tmp_path):
    base = tiny_bert()
    batch = token_batch()
    model = from_finetuned(copy.deepcopy(base), finetune_copy(base), TSwitchConfig(density=0.1), progress=False)
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        torch.save(model(**batch).last_hidden_state, tmp_path / "expected.pt")
    result = _run_python(
        f"""
        import torch, switch_adapter
        from peft import PeftModel
        from tiny_models import tiny_bert, token_batch
        model = PeftModel.from_pretrained(tiny_bert(), {str(tmp_path / "adapter")!r})
        with torch.no_grad():
            out = model(**token_batch()).last_hidden_state
        torch.testing.assert_close(out, torch.load({str(tmp_path / "expected.pt")!r}), rtol=0, atol=0)
        print("OK")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")


def test_fresh_process_without_import_cannot_know_the_type(tmp_path):
    base = tiny_bert()
    model = from_finetuned(copy.deepcopy(base), finetune_copy(base), progress=False)
    model.save_pretrained(tmp_path / "adapter")
    result = _run_python(
        f"""
        from peft import PeftModel
        from tiny_models import tiny_bert
        PeftModel.from_pretrained(tiny_bert(), {str(tmp_path / "adapter")!r})
        """,
        tmp_path,
    )
    assert result.returncode != 0 and "TSWITCH" in result.stderr  # the README explains: import switch_adapter


def test_peft_push_to_hub_and_from_pretrained_by_repo_id(hub_repo_id):
    base = tiny_llama()
    tuned = finetune_copy(base, noise=0.05)
    model = from_finetuned(
        copy.deepcopy(base), tuned, TSwitchConfig(density=0.2, task_type="CAUSAL_LM"), progress=False
    )
    model.push_to_hub(hub_repo_id)
    loaded = PeftModel.from_pretrained(tiny_llama(), hub_repo_id)
    prompt = torch.tensor([[1, 4, 8, 15]])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(loaded.generate(input_ids=prompt, **kwargs), model.generate(input_ids=prompt, **kwargs))


def test_switch_adapter_push_to_hub_writes_the_model_card(hub_repo_id, tmp_path):
    base = tiny_bert()
    model = from_finetuned(copy.deepcopy(base), finetune_copy(base), TSwitchConfig(density=0.05), progress=False)
    switch_adapter.push_to_hub(model, hub_repo_id)
    files = set(HfApi().list_repo_files(hub_repo_id))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files

    card = ModelCard.load(hub_repo_id)
    assert card.data.library_name == "peft"
    assert {"t-switch", "switch-adapter"} <= set(card.data.tags)
    assert "bits per parameter" in card.text and "size vs fp32 task vector" in card.text
    assert "density (keep ratio per sign) | 0.05" in card.text
    assert f'PeftModel.from_pretrained(base, "{hub_repo_id}")' in card.text

    # the snippet works as written (with the tiny base standing in for the base model id)
    snippet = card.text.split("```python")[1].split("```")[0]
    namespace = {}
    exec(
        snippet.replace('AutoModel.from_pretrained("<base model id or path>")', "tiny_bert()"),
        {"tiny_bert": tiny_bert},
        namespace,
    )
    with torch.no_grad():
        torch.testing.assert_close(
            namespace["model"](**token_batch()).last_hidden_state, model(**token_batch()).last_hidden_state
        )

    config = json.loads(open(hf_hub_download(hub_repo_id, "adapter_config.json")).read())
    assert config["peft_type"] == "TSWITCH" and config["target_modules"] == "all"


def test_local_save_writes_the_card_section(tmp_path):
    base = tiny_bert()
    model = from_finetuned(copy.deepcopy(base), finetune_copy(base), TSwitchConfig(density=0.1), progress=False)
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # saving twice keeps one section
    text = (tmp_path / "README.md").read_text()
    assert text.count("## T-Switch adapter") == 1
    assert "t-switch" in text and "library_name: peft" in text
