"""Full fine-tuning of the encoder + one head per task, cached on disk keyed by everything that determines it.

Settings default to the measured baseline of ``RESOURCES.md`` (1 epoch, length 64, batch 32, lr 5e-5, head lr
1e-2, AdamW without weight decay, linear decay), which leaves a real gap between individual and merged models.
A cached fine-tune is a plain ``save_pretrained`` folder (``config.json`` + ``model.safetensors``) plus
``meta.json``; its key hashes the settings, the task's training texts and labels, and the base model's files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from switch_adapter._staging import staging_dir

from .model import MeanPoolingClassifier, load_classifier, model_fingerprint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything besides the data and the base model that determines a fine-tune (part of its cache key)."""

    epochs: int = 1
    max_length: int = 64
    batch_size: int = 32
    lr: float = 5e-5
    head_lr: float = 1e-2
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"FinetuneSettings.{name} must be a positive integer, got {getattr(self, name)}.")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError("FinetuneSettings.lr and head_lr must be positive.")


@dataclass
class Finetuned:
    """A fine-tuned classifier on disk: ``folder`` holds ``config.json``, ``model.safetensors`` and ``meta.json``."""

    task: str
    folder: Path
    num_labels: int
    record: dict[str, Any]

    @property
    def weights_file(self) -> Path:
        return self.folder / "model.safetensors"

    def load(self) -> MeanPoolingClassifier:
        """The fine-tuned classifier (fp32, eval mode)."""
        return MeanPoolingClassifier.from_pretrained(str(self.folder), dtype=torch.float32).eval()


def cache_key(task: str, settings: FinetuneSettings, texts: list[str], labels: list[int], fingerprint: str) -> str:
    """``<task>-<hash>`` of the settings, the training data and the base model's fingerprint."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"task": task, "settings": asdict(settings), "model": fingerprint}).encode())
    for text, label in zip(texts, labels):
        digest.update(f"{label}\t{text}\n".encode())
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task)
    return f"{safe}-{digest.hexdigest()[:16]}"


def train_classifier(
    model: MeanPoolingClassifier,
    tokenizer: Any,
    texts: list[str],
    labels: list[int],
    settings: FinetuneSettings,
    desc: str = "fine-tune",
    progress: bool = True,
) -> dict[str, Any]:
    """Fully fine-tune ``model`` in place (encoder at ``lr``, head at ``head_lr``); returns a training record."""
    if not texts:
        raise ValueError(f"{desc}: no training examples.")
    torch.manual_seed(settings.seed)
    model.train()
    head = list(model.classifier.parameters())
    head_ids = {id(p) for p in head}
    encoder = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.AdamW(
        [{"params": encoder, "lr": settings.lr}, {"params": head, "lr": settings.head_lr}],
        weight_decay=settings.weight_decay,
    )
    generator = torch.Generator().manual_seed(settings.seed)
    total = math.ceil(len(texts) / settings.batch_size) * settings.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    losses: list[float] = []
    start = time.perf_counter()
    with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(settings.epochs):
            order = torch.randperm(len(texts), generator=generator).tolist()
            for first in range(0, len(order), settings.batch_size):
                chosen = order[first : first + settings.batch_size]
                batch = tokenizer(
                    [texts[i] for i in chosen],
                    padding=True,
                    truncation=True,
                    max_length=settings.max_length,
                    return_tensors="pt",
                )
                target = torch.tensor([labels[i] for i in chosen])
                loss = model(**batch, labels=target).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return {
        "steps": total,
        "seconds": round(time.perf_counter() - start, 2),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def finetune_task(
    task: str,
    texts: list[str],
    labels: list[int],
    num_labels: int,
    model_path: str,
    tokenizer: Any,
    settings: FinetuneSettings,
    cache_dir: str | os.PathLike,
    progress: bool = True,
) -> Finetuned:
    """The cached fine-tune of ``task`` (trained and cached first when absent).

    The folder is written under a temporary name and renamed when complete, so an interrupted run never leaves a
    half-written cache entry.
    """
    root = Path(cache_dir) / "finetuned"
    folder = root / cache_key(task, settings, texts, labels, model_fingerprint(model_path))
    meta_file = folder / "meta.json"
    if meta_file.exists() and (folder / "model.safetensors").exists():
        meta = json.loads(meta_file.read_text())
        logger.info("Using the cached fine-tune of %s: %s", task, folder)
        return Finetuned(task, folder, int(meta["num_labels"]), meta["training"] | {"cached": True})
    model = load_classifier(model_path, num_labels)
    record = train_classifier(model, tokenizer, texts, labels, settings, desc=f"fine-tune {task}", progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(staging_dir(root, f".{folder.name}-"))
    try:
        model.save_pretrained(str(staging))
        meta = {"task": task, "num_labels": num_labels, "settings": asdict(settings), "training": record}
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        if folder.exists():  # another process finished the same fine-tune meanwhile
            shutil.rmtree(staging)
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Fine-tuned %s in %.1f s (%d steps); cached in %s", task, record["seconds"], record["steps"], folder)
    return Finetuned(task, folder, num_labels, record | {"cached": False})
