"""The generative suite's model side: chat token ids, training batches, cached LoRA fine-tunes, batched answers."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from switch_adapter._staging import atomic_output_dir

from .flexswitch_llm import chat_ids
from .llm_tasks import Example, GenerativeTask, messages, normalise

logger = logging.getLogger("benchmarks.llm")

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def prompt_ids(tokenizer: Any, task: GenerativeTask, example: Example, style: str, shots: Sequence[Example] = ()):
    """The templated prompt of ``example`` (with the generation prompt), as token ids."""
    chat = messages(task, example.text, style, shots=[(s.text, s.answer) for s in shots])
    return chat_ids(tokenizer, chat, add_generation_prompt=True)


def training_batch(tokenizer: Any, rows: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded ``(prompt ids, full ids)`` pairs; labels only on the answer (-100 on the prompt and padding)."""
    width = max(len(full) for _, full in rows)
    pad = tokenizer.pad_token_id
    input_ids, mask, labels = [], [], []
    for prompt, full in rows:
        fill = width - len(full)
        input_ids.append(full + [pad] * fill)
        mask.append([1] * len(full) + [0] * fill)
        labels.append([-100] * len(prompt) + full[len(prompt) :] + [-100] * fill)
    return {
        "input_ids": torch.tensor(input_ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
    }


Rows = list[tuple[list[int], list[int]]]
"""Training rows: ``(prompt ids, prompt + answer ids)``."""


def training_rows(tokenizer: Any, task: GenerativeTask, examples: Sequence[Example]) -> Rows:
    """Every training example in both prompt styles, alternating (even: instruction, odd: raw)."""
    rows = []
    for i, example in enumerate(examples):
        style = "instruction" if i % 2 == 0 else "raw"
        prompt = chat_ids(tokenizer, messages(task, example.text, style), add_generation_prompt=True)
        full = chat_ids(tokenizer, messages(task, example.text, style, answer=example.answer))
        if full[: len(prompt)] != prompt:
            raise ValueError("The chat template renders a prompt that is not a prefix of the answered chat.")
        rows.append((prompt, full))
    return rows


@dataclass(frozen=True)
class LoraSettings:
    """How each task's LoRA is fine-tuned (part of the cache key)."""

    rank: int = 8
    alpha: int = 16
    steps: int = 24
    batch_size: int = 16
    lr: float = 2e-3
    targets: tuple[str, ...] = LORA_TARGETS
    seed: int = 0
    batching: str = "one prompt style per batch"  # part of the cache key


def lora_cache_key(model_id: str, task: str, settings: LoraSettings, rows: Rows) -> str:
    payload = json.dumps([model_id, task, settings.__dict__, rows], sort_keys=True, default=list)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def finetune_lora(
    make_base: Callable[[], torch.nn.Module],
    tokenizer: Any,
    rows: Rows,
    settings: LoraSettings,
    out: Path,
    progress: bool = True,
    desc: str = "LoRA",
) -> dict[str, Any]:
    """Fine-tune a LoRA (``settings``) on ``rows`` (cycled) and save it to ``out`` atomically; returns its record."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(settings.seed)
    model = make_base()
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=0.0,
        target_modules=list(settings.targets),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / settings.steps)
    generator = torch.Generator().manual_seed(settings.seed)
    # Batches alternate between the two prompt styles (even rows: instruction, odd: raw): less padding per batch.
    pools = [list(range(0, len(rows), 2)), list(range(1, len(rows), 2))]
    pools = [pool for pool in pools if pool]
    orders: list[list[int]] = [[] for _ in pools]
    losses = []
    start = time.perf_counter()
    for step in tqdm(range(settings.steps), desc=desc, disable=not progress, leave=False):
        which = step % len(pools)
        pool, order = pools[which], orders[which]
        while len(order) < settings.batch_size:
            order += [pool[i] for i in torch.randperm(len(pool), generator=generator).tolist()]
        chosen, orders[which] = order[: settings.batch_size], order[settings.batch_size :]
        loss = model(**training_batch(tokenizer, [rows[i] for i in chosen])).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    record = {
        "seconds": round(seconds, 1),
        "first_loss": round(losses[0], 4),
        "last_loss": round(sum(losses[-4:]) / len(losses[-4:]), 4),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    with atomic_output_dir(out, overwrite=True) as staging:
        model.save_pretrained(staging)
        (Path(staging) / "training.json").write_text(json.dumps(record, indent=1))
    del model
    gc.collect()
    return record


def lora_fp16_bytes(record: dict[str, Any]) -> int:
    """The LoRA's weights at 2 bytes per parameter."""
    return 2 * int(record["trainable_params"])


# ----------------------------------------------------------------------------------------------------
# Answers
# ----------------------------------------------------------------------------------------------------


def left_padded(tokenizer: Any, prompts: Sequence[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([[pad] * (width - len(p)) + p for p in prompts]),
        "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
    }


@dataclass
class Answers:
    """Generated answers of one row on one list of prompts."""

    texts: list[str]
    seconds: float
    new_tokens: int
    routed: list[str | None] | None = None


Generate = Callable[[dict[str, torch.Tensor], list[int]], Any]
"""``generate(batch, tasks_of_rows)`` -> output ids, or ``(output ids, routed task names)``."""


@torch.inference_mode()
def answer(
    generate: Generate,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    tasks: Sequence[int],
    batch_size: int,
    max_new_tokens: int,
) -> Answers:
    """Greedy answers to ``prompts`` in batches of ``batch_size`` (left padded, in the given, mixed order)."""
    texts: list[str] = []
    routed: list[str | None] = []
    new_tokens = 0
    seconds = 0.0
    has_routing = False
    for first in range(0, len(prompts), batch_size):
        batch = left_padded(tokenizer, prompts[first : first + batch_size])
        start = time.perf_counter()
        output = generate(batch, list(tasks[first : first + batch_size]))
        seconds += time.perf_counter() - start
        if isinstance(output, tuple):
            output, names = output
            routed += list(names)
            has_routing = True
        width = batch["input_ids"].shape[1]
        for row in output[:, width:]:
            ids = row.tolist()
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            new_tokens += len(ids) + 1
            texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return Answers(texts, seconds, new_tokens, routed if has_routing else None)


def generation_settings(tokenizer: Any, max_new_tokens: int) -> dict[str, Any]:
    return {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def exact_match(answers: Sequence[str], examples: Sequence[Example]) -> list[bool]:
    return [normalise(text) == example.answer for text, example in zip(answers, examples)]
