"""Where a converted LoRA's answers move: the answer preferences of the generative suite's LoRAs and of the
T-Switch adapters converted from them.

``python -m benchmarks.llm_preferences --tasks sms_spam,trec``

For every test prompt of a task (both prompt styles; the suite's own prompts and cached LoRAs: run the suite
first, or this fine-tunes them), one forward pass gives the log-probability of each answer word's first token
after the prompt, centred over the task's answers (the model's **answer preferences** for that prompt). Compared
with the LoRA, a rendering can lose the LoRA's ranking of the prompts (a low correlation of preferences) or keep
it and shift every prompt towards one answer alike (a moved decision boundary: a high correlation and a large
mean shift towards that answer, with most prompts given that answer). The suite's exact match cannot tell these
apart.

Writes ``llm_preferences.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .environment import environment, portable_path
from .llm import LLMBenchConfig, LLMBenchmark
from .llm_model import left_padded
from .llm_tasks import DEFAULT_LLM_TASKS, STYLES

logger = logging.getLogger("benchmarks.llm_preferences")


def first_tokens(tokenizer: Any, answers: tuple[str, ...]) -> list[int]:
    """The first token id of each answer word; they must differ for the preferences to mean anything."""
    ids = [tokenizer(answer, add_special_tokens=False).input_ids[0] for answer in answers]
    if len(set(ids)) != len(ids):
        raise ValueError(f"The answers {answers} share first tokens; the preferences cannot tell them apart.")
    return ids


@torch.inference_mode()
def preferences(model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], ids: list[int]) -> torch.Tensor:
    """``[prompts, answers]``: log p(first token of each answer) after each prompt, minus its mean over answers."""
    out = []
    for first in range(0, len(prompts), 32):
        batch = left_padded(tokenizer, prompts[first : first + 32])
        chosen = model(**batch).logits[:, -1].float().log_softmax(-1)[:, ids]
        out.append(chosen - chosen.mean(dim=1, keepdim=True))
    return torch.cat(out)


def summary(values: torch.Tensor, gold: list[int], answers: tuple[str, ...], reference: torch.Tensor | None):
    picked = values.argmax(dim=1)
    counts = torch.bincount(picked, minlength=len(answers))
    result: dict[str, Any] = {
        "right": round(float((picked == torch.tensor(gold)).float().mean()), 4),
        "most_given_answer": answers[int(counts.argmax())],
        "most_given_share": round(float(counts.max()) / len(gold), 4),
    }
    if reference is not None:
        per_answer = [torch.corrcoef(torch.stack([values[:, a], reference[:, a]]))[0, 1] for a in range(len(answers))]
        result["correlation_with_lora"] = round(float(torch.stack(per_answer).mean()), 3)
        shift = (values - reference).mean(dim=0)
        towards = int(shift.argmax())
        result["shift_towards"] = answers[towards]
        result["shift"] = round(float(shift[towards]), 3)
    return result


def study(bench: LLMBenchmark, task: str, densities: list[float], work: Path) -> dict[str, Any]:
    from peft import PeftModel

    from switch_adapter import TSwitchConfig, convert_lora

    index = bench.names.index(task)
    data = bench.data[index]
    answers = data.task.answers
    ids = first_tokens(bench.tokenizer, answers)
    chosen = [i for i, example in enumerate(bench.order) if example.task == index]
    gold = [answers.index(bench.order[i].answer) for i in chosen]
    prompts = {style: [bench.prompts[style][i] for i in chosen] for style in STYLES}
    lora_folder = bench.loras[task]["folder"]

    def measure(model: torch.nn.Module, reference: dict | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        values = {style: preferences(model, bench.tokenizer, prompts[style], ids) for style in STYLES}
        return {s: summary(v, gold, answers, reference[s] if reference else None) for s, v in values.items()}, values

    rows: dict[str, Any] = {}
    lora = PeftModel.from_pretrained(bench.make_base(), lora_folder).eval()
    rows["lora"], reference = measure(lora, None)
    del lora
    rows["base"], _ = measure(bench.make_base(), reference)
    for density in densities:
        out = work / f"{task}-{density:g}"
        convert_lora(bench.folder, lora_folder, out, TSwitchConfig(density=density), overwrite=True, progress=False)
        model = PeftModel.from_pretrained(bench.make_base(), str(out)).eval()
        rows[f"tswitch_delta_{density:g}"], _ = measure(model, reference)
        del model
        gc.collect()
    return {"prompts_per_style": len(chosen), "answers": list(answers), "rows": rows}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Answer preferences of converted LoRAs",
        "",
        f"Command (from the repository root): `{report['command']}`.",
        "",
        f"Model: {report['model']}. LoRAs and prompts: the generative suite's (seed {report['settings']['seed']}, "
        f"{report['settings']['max_test']} test prompts per task and style, labels balanced). Preferences: log p(first "
        "token of each answer) after the prompt, centred over the task's answers, from one forward pass. Right: the "
        "preferred answer is the label. Correlation: of each answer's preferences over the prompts with the LoRA's, "
        "averaged over the answers. Shift: the largest mean change of one answer's preference against the LoRA.",
        "",
        "| task | rendering | style | right | most given answer (share) | correlation with the LoRA | shift towards |",
        "|---|---|---|---:|---|---:|---|",
    ]
    for task, result in report["tasks"].items():
        for name, styles in result["rows"].items():
            for style, s in styles.items():
                corr = s.get("correlation_with_lora")
                shift = f"{s['shift_towards']} {s['shift']:+.2f}" if "shift" in s else "-"
                lines.append(
                    f"| {task} | {name} | {style} | {100 * s['right']:.1f}% | {s['most_given_answer']} "
                    f"({100 * s['most_given_share']:.0f}%) | {'-' if corr is None else f'{corr:.2f}'} | {shift} |"
                )
    lines += ["", f"Run time: {report['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def run_preferences(config: LLMBenchConfig, tasks: list[str], densities: list[float], command: str) -> dict[str, Any]:
    """Answer preferences of ``tasks`` (LoRAs and prompts of the suite run with ``config``); writes the files into
    ``config.out_dir`` and returns the report."""
    start = time.perf_counter()
    bench = LLMBenchmark(config)
    bench.load_data()
    bench.train_loras()
    work = Path(tempfile.mkdtemp(prefix="llm-preferences-"))
    try:
        studied = {task: study(bench, task, densities, work) for task in tasks}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "command": command,
        "model": portable_path(config.model) if config.model else "SmolLM2-135M-Instruct",
        "settings": {
            "seed": config.seed,
            "max_test": config.max_test,
            "densities": densities,
            "lora": str(config.lora),
        },  # fmt: skip
        "tasks": studied,
        "seconds": round(time.perf_counter() - start, 1),
        "environment": environment(),
    }
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "llm_preferences.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "llm_preferences.md").write_text(markdown(report))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="sms_spam,trec", help="tasks of the suite to study (comma-separated)")
    parser.add_argument("--densities", default="0.05,0.2,0.5,1", help="T-Switch densities (delta mode)")
    parser.add_argument("--model", default=None, help="a chat causal LM folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--cache-dir", default=None, help="LoRA cache (default: the suite's)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wanted = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in wanted if t not in DEFAULT_LLM_TASKS]
    if unknown:
        parser.error(f"unknown tasks {unknown}; the suite's tasks are {list(DEFAULT_LLM_TASKS)}")
    densities = [float(d) for d in args.densities.split(",")]
    # The suite's default settings with all its tasks: the cached LoRAs' keys depend on them.
    config = LLMBenchConfig(model=args.model, cache_dir=args.cache_dir, out_dir=str(args.out), progress=False)
    command = "python -m benchmarks.llm_preferences " + " ".join(argv if argv is not None else sys.argv[1:])
    report = run_preferences(config, wanted, densities, command.strip())
    logger.info("%s", markdown(report))
    return report


if __name__ == "__main__":
    main()
