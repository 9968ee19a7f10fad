"""Density sweep for T-Switch on a real model: accuracy kept versus storage, per scale rule.

For every task and seed the benchmark's cached fine-tune (:mod:`benchmarks.finetune`: all-MiniLM-L6-v2 fully
fine-tuned, mean pooling + one linear head) gives the task vector ``tau = finetuned - pretrained`` of every encoder
tensor (embeddings, attention, MLP, biases, LayerNorms). For every scale rule and density the encoder is rebuilt as
``pretrained + binarize(tau, density, scale_rule=rule).to_dense()`` per tensor and the task's test accuracy is
measured with its own full-precision head. Storage is the SASS size of the masks and signs (exact, the cheapest
encoding per tensor) plus one fp32 scale per tensor, in bits per encoder parameter.

Protocol for choosing a default density: the tasks are split into *choice* tasks and *held-out* tasks before
anything is measured; the chosen density is the cheapest whose mean kept accuracy (per task and seed
``100 * accuracy / individual accuracy``, averaged) on the choice tasks reaches ``--target`` percent. The held-out
tasks are reported separately, to show whether the choice carries over to tasks it was not chosen on.

Usage (from the repository root)::

    python -m benchmarks.density_sweep                               # 8 tasks x 3 seeds, both rules
    python -m benchmarks.density_sweep --tasks trec,sms_spam --seeds 0 --scale-rule norm --out my-sweep
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from switch_adapter.codec import sass
from switch_adapter.codec.binarize import BinarySwitch, binarize

from . import baselines
from .environment import command_line, environment
from .finetune import FinetuneSettings, finetune_task
from .model import MeanPoolingClassifier, load_classifier, minilm_path, model_label
from .pipeline import DEFAULT_TASKS, HEAD_PREFIX, default_cache_dir
from .tasks import load_task

logger = logging.getLogger("benchmarks.density_sweep")

DEFAULT_DENSITIES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4)
DEFAULT_SEEDS = (0, 1, 2)
RULES = ("norm", "rms")
# Fixed before any measurement: every other task of the suite, so both halves mix data sources and task kinds.
DEFAULT_CHOICE_TASKS = DEFAULT_TASKS[0::2]
SCALE_BITS = 32  # one fp32 scale per tensor
RESULTS = Path(__file__).resolve().parent / "results" / "density_sweep"


@dataclass(frozen=True)
class SweepSettings:
    """Everything a sweep measures (recorded in the result file)."""

    tasks: tuple[str, ...]
    choice_tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    densities: tuple[float, ...]
    scale_rules: tuple[str, ...]
    target_pct: float = 99.0
    max_train: int = 1000
    max_test: int = 300
    eval_batch_size: int = 100
    model: str | None = None

    @property
    def held_out_tasks(self) -> tuple[str, ...]:
        return tuple(task for task in self.tasks if task not in self.choice_tasks)


# ----------------------------------------------------------------------------------------------------
# One task and seed
# ----------------------------------------------------------------------------------------------------


def test_batches(tokenizer: Any, texts: list[str], labels: list[int], batch_size: int, max_length: int) -> list:
    """Tokenized ``(inputs, labels)`` batches, texts sorted by length (less padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = []
    for first in range(0, len(order), batch_size):
        chosen = order[first : first + batch_size]
        inputs = tokenizer(
            [texts[i] for i in chosen], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        batches.append((dict(inputs), torch.tensor([labels[i] for i in chosen])))
    return batches


@torch.no_grad()
def accuracy(model: MeanPoolingClassifier, batches: list) -> float:
    """Share of correctly classified examples."""
    correct = total = 0
    for inputs, labels in batches:
        correct += int((model(**inputs).logits.argmax(dim=-1) == labels).sum())
        total += labels.numel()
    return correct / total


@torch.no_grad()
def load_encoder(model: MeanPoolingClassifier, base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> None:
    """Set the encoder of ``model`` to ``base + delta`` (tensors absent from ``delta`` keep the base)."""
    state = model.state_dict()
    for name, value in base.items():
        state[name].copy_(value)
        if name in delta:
            state[name].add_(delta[name])


def rule_scale(tau: torch.Tensor, switch: BinarySwitch, rule: str) -> torch.Tensor:
    """The per-tensor scale ``binarize`` gives ``switch``'s mask under ``rule`` (the mask does not depend on the
    rule): ``sqrt(sum of squares / kept)``, over the kept entries (``"rms"``) or all entries (``"norm"``)."""
    flat = tau.reshape(-1).float()
    squares = flat.square().sum() if rule == "norm" else flat[switch.mask].square().sum()
    return torch.sqrt(squares / switch.kept).reshape(1)


def switched(
    tau: dict[str, torch.Tensor], density: float, rules: Sequence[str]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Per rule the reconstructed task vector ``scale * mask * sign`` of every tensor, and its storage (SASS bits,
    entropy-bound bits, kept entries; the same for every rule). Binarizes once with the first rule and rescales
    for the others (:func:`rule_scale`). All-zero tensors get no switch; 0-dim tensors keep their raw difference."""
    dense: dict[str, dict[str, torch.Tensor]] = {rule: {} for rule in rules}
    storage = {"bits": 0.0, "bound_bits": 0.0, "kept": 0}
    for name, diff in tau.items():
        if diff.dim() == 0:
            for rule in rules:
                dense[rule][name] = diff
            storage["bits"] += 32
            storage["bound_bits"] += 32
            continue
        if not torch.count_nonzero(diff):
            continue
        switch = binarize(diff, density, name=name, scale_rule=rules[0])
        dense[rules[0]][name] = switch.to_dense()
        for rule in rules[1:]:
            other = BinarySwitch(switch.mask, switch.positive, rule_scale(diff, switch, rule), switch.shape)
            dense[rule][name] = other.to_dense()
        storage["bits"] += min(sass.encoded_sizes_bits(switch.mask).values()) + SCALE_BITS
        storage["bound_bits"] += sass.entropy_bound_bits(switch.numel, switch.kept) + SCALE_BITS
        storage["kept"] += switch.kept
    return dense, storage


def run_task(task: str, seed: int, settings: SweepSettings, model_path: str, tokenizer: Any, cache: Path) -> dict:
    """Fine-tune (or load) ``task`` with ``seed`` and measure every (rule, density) on its test split."""
    splits = load_task(task, seed=seed, max_train=settings.max_train, max_test=settings.max_test)
    train, test = splits["train"], splits["test"]
    num_labels = train.features["label"].num_classes
    finetune = FinetuneSettings(seed=seed)
    finetuned = finetune_task(
        task, list(train["text"]), [int(x) for x in train["label"]], num_labels, model_path, tokenizer, finetune, cache
    )
    model = finetuned.load()
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}
    base = {
        k: v.detach().clone()
        for k, v in load_classifier(model_path, num_labels).state_dict().items()
        if not k.startswith(HEAD_PREFIX)
    }
    tau = baselines.task_vector(base, tuned)
    batches = test_batches(tokenizer, list(test["text"]), [int(x) for x in test["label"]],
                           settings.eval_batch_size, finetune.max_length)  # fmt: skip
    individual = accuracy(model, batches)
    load_encoder(model, base, {})
    run = {
        "task": task,
        "seed": seed,
        "num_labels": num_labels,
        "train": len(train),
        "test": len(test),
        "training": {k: finetuned.record[k] for k in ("steps", "first_loss", "last_loss", "cached")},
        "individual": individual,
        "pretrained": accuracy(model, batches),
        "configs": [],
    }
    for density in settings.densities:
        dense, storage = switched(tau, density, settings.scale_rules)
        for rule in settings.scale_rules:
            load_encoder(model, base, dense.pop(rule))
            value = accuracy(model, batches)
            run["configs"].append({"density": density, "scale_rule": rule, "accuracy": value,
                                   "pct_of_individual": 100 * value / individual, **storage})  # fmt: skip
    measured = ", ".join(f"{c['scale_rule']} d={c['density']:g}: {c['accuracy']:.4f}" for c in run["configs"])
    logger.info("%s seed %d: individual %.4f, %s", task, seed, individual, measured)
    return run


# ----------------------------------------------------------------------------------------------------
# Summary and choice
# ----------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarise(runs: list[dict], settings: SweepSettings, params: int) -> list[dict]:
    """One row per (rule, density): mean / worst kept accuracy on the choice, held-out and all tasks (over tasks and
    seeds), bits per parameter (mean over runs)."""
    rows = []
    for rule in settings.scale_rules:
        for density in settings.densities:
            configs = [
                (run, c) for run in runs for c in run["configs"] if c["scale_rule"] == rule and c["density"] == density
            ]
            row: dict[str, Any] = {"scale_rule": rule, "density": density}
            for part, names in (("choice", settings.choice_tasks), ("held_out", settings.held_out_tasks),
                                ("all", settings.tasks)):  # fmt: skip
                pcts = [c["pct_of_individual"] for run, c in configs if run["task"] in names]
                row[f"{part}_mean_pct"] = _mean(pcts)
                row[f"{part}_worst_pct"] = min(pcts) if pcts else float("nan")
            row["per_task_pct"] = {
                task: _mean([c["pct_of_individual"] for run, c in configs if run["task"] == task])
                for task in settings.tasks
            }
            row["bits_per_param"] = _mean([c["bits"] for _, c in configs]) / params
            row["bound_bits_per_param"] = _mean([c["bound_bits"] for _, c in configs]) / params
            row["pct_of_fp32"] = 100 * row["bits_per_param"] / 32
            rows.append(row)
    return rows


def choose(rows: list[dict], rule: str, target_pct: float) -> dict | None:
    """The cheapest (fewest bits per parameter) density of ``rule`` whose mean kept accuracy on the choice tasks
    reaches ``target_pct``; None when none does."""
    fitting = [r for r in rows if r["scale_rule"] == rule and r["choice_mean_pct"] >= target_pct]
    return min(fitting, key=lambda r: r["bits_per_param"]) if fitting else None


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# T-Switch density sweep",
        "",
        f"Command (from the repository root): `{report['command']}`",
        "",
        f"Model: {report['model']} ({report['encoder_params']:,} encoder parameters, every encoder tensor switched; "
        "task heads stay fp32 and are not counted). Fine-tunes: the benchmark's (`benchmarks/finetune.py`: "
        f"{s['finetune']['epochs']} epoch, length {s['finetune']['max_length']}, batch {s['finetune']['batch_size']}, "
        f"lr {s['finetune']['lr']:g}, head lr {s['finetune']['head_lr']:g}), {s['max_train']} train / {s['max_test']} "
        f"test examples per task. Seeds {', '.join(map(str, s['seeds']))} (each seed draws the task's split and "
        "the fine-tune).",
        "",
        f"Choice tasks: {', '.join(s['choice_tasks'])}. Held-out tasks: {', '.join(report['held_out_tasks'])}.",
        "Seeds measured per task: "
        + "; ".join(f"{task} {','.join(map(str, seeds)) or '-'}" for task, seeds in report["seeds_measured"].items())
        + ("" if report["complete"] else " (**incomplete run**)."),
        "`% kept` = per task and seed 100 x switched accuracy / individual fine-tuned accuracy, averaged; worst = "
        "the lowest single task and seed. Bits per parameter: SASS (cheapest exact encoding per tensor) + one fp32 "
        "scale per tensor; bound = n H(k/n) + k.",
        "",
        "| rule | density | choice % kept | choice worst | held-out % kept | held-out worst | all % kept "
        "| bits/param | bound bits/param | % of fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['scale_rule']} | {r['density']:g} | {r['choice_mean_pct']:.2f} | {r['choice_worst_pct']:.2f} | "
            f"{r['held_out_mean_pct']:.2f} | {r['held_out_worst_pct']:.2f} | {r['all_mean_pct']:.2f} | "
            f"{r['bits_per_param']:.3f} | {r['bound_bits_per_param']:.3f} | {r['pct_of_fp32']:.2f} |"
        )
    lines += ["", f"## Choice (target: mean >= {s['target_pct']:g}% kept on the choice tasks, fewest bits)", ""]
    for rule, chosen in report["chosen"].items():
        if chosen is None:
            lines.append(f"- {rule}: no density reaches the target.")
        else:
            lines.append(
                f"- {rule}: d={chosen['density']:g} ({chosen['choice_mean_pct']:.2f}% on the choice tasks, "
                f"{chosen['held_out_mean_pct']:.2f}% on the held-out tasks, {chosen['bits_per_param']:.3f} bits/param)"
            )
    tasks = s["tasks"]
    lines += ["", "## % kept per task (mean over seeds)", ""]
    lines += ["| rule | density | " + " | ".join(tasks) + " |", "|---|---:|" + "---:|" * len(tasks)]
    for r in report["rows"]:
        lines.append(f"| {r['scale_rule']} | {r['density']:g} | "
                     + " | ".join(f"{r['per_task_pct'][t]:.2f}" for t in tasks) + " |")  # fmt: skip
    lines += ["", "## Individual and pre-trained accuracy (mean over seeds)", ""]
    lines += ["| task | individual | pre-trained encoder + fine-tuned head |", "|---|---:|---:|"]
    for task in tasks:
        runs = [run for run in report["runs"] if run["task"] == task]
        lines.append(f"| {task} | {_mean([r['individual'] for r in runs]):.4f} | "
                     f"{_mean([r['pretrained'] for r in runs]):.4f} |")  # fmt: skip
    env = report["environment"]
    lines += ["", f"Runtime: {report['seconds']:.0f} s ({env['torch_threads']} threads); switch-adapter "
              f"{env['switch_adapter']}, commit {env['git_commit']}, torch {env['torch']}, transformers "
              f"{env['transformers']}.", ""]  # fmt: skip
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.density_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=_names, default=DEFAULT_TASKS, metavar="A,B,...", help="tasks to sweep")
    parser.add_argument("--choice-tasks", type=_names, metavar="A,B,...",
                        help="tasks the density is chosen on (default: every other task of --tasks); the rest are "
                             "held out")  # fmt: skip
    parser.add_argument("--seeds", type=lambda s: tuple(int(x) for x in s.split(",")), default=DEFAULT_SEEDS)
    parser.add_argument("--densities", type=_floats, default=DEFAULT_DENSITIES, metavar="D,...")
    parser.add_argument("--scale-rule", choices=(*RULES, "both"), default="both", help="scale rule(s) to sweep")
    parser.add_argument("--target", type=float, default=99.0, help="%% of individual accuracy the choice must keep")
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--max-test", type=int, default=300)
    parser.add_argument("--eval-batch-size", type=int, default=100)
    parser.add_argument("--model", metavar="DIR", help="a BERT-family model folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--cache-dir", metavar="DIR", help="fine-tune cache (default ~/.cache/switch_adapter/bench)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS), help="output path without suffix; .json and .md are written")
    parser.add_argument("--resume", action="store_true", help="keep the runs of an existing --out file (same settings)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    tasks = args.tasks
    choice = args.choice_tasks or tasks[0::2]
    if set(choice) - set(tasks):
        raise SystemExit(f"--choice-tasks names tasks outside --tasks: {sorted(set(choice) - set(tasks))}")
    settings = SweepSettings(tasks=tasks, choice_tasks=choice, seeds=args.seeds, densities=args.densities,
                             scale_rules=RULES if args.scale_rule == "both" else (args.scale_rule,),
                             target_pct=args.target, max_train=args.max_train, max_test=args.max_test,
                             eval_batch_size=args.eval_batch_size, model=args.model)  # fmt: skip
    start = time.perf_counter()
    software = environment()  # before the run: the commit whose code measures
    model_path = args.model or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    params = sum(v.numel() for k, v in load_classifier(model_path, 2).state_dict().items()
                 if not k.startswith(HEAD_PREFIX) and v.is_floating_point())  # fmt: skip
    out = Path(args.out)
    out = out.with_suffix("") if out.suffix in (".json", ".md") else out
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = resumed_runs(out.with_suffix(".json"), settings) if args.resume else []
    done = {(run["task"], run["seed"]) for run in runs}
    pairs = [pair for pair in run_order(settings) if pair not in done]
    report: dict = {}
    for task, seed in tqdm(pairs, desc="sweep"):
        runs.append(run_task(task, seed, settings, model_path, tokenizer, cache))
        report = build_report(runs, settings, params, argv, software, time.perf_counter() - start)
        write_report(report, out)  # after every run, so that an interrupted sweep leaves what it measured
    if not pairs:
        report = build_report(runs, settings, params, argv, software, time.perf_counter() - start)
        write_report(report, out)
    print(markdown(report))
    return report


def run_order(settings: SweepSettings) -> list[tuple[str, int]]:
    """``(task, seed)`` pairs in the order measured: the first seed of every task, then the other seeds of the
    choice tasks, then those of the held-out tasks (an interrupted sweep has measured what the choice needs)."""
    first, *others = settings.seeds
    pairs = [(task, first) for task in settings.tasks]
    pairs += [(task, seed) for seed in others for task in settings.choice_tasks]
    return pairs + [(task, seed) for seed in others for task in settings.held_out_tasks]


def build_report(
    runs: list[dict], settings: SweepSettings, params: int, argv: Sequence[str] | None, software: dict, seconds: float
) -> dict:
    """The result file's content for the ``runs`` measured so far."""
    rows = summarise(runs, settings, params)
    measured = {task: sorted(run["seed"] for run in runs if run["task"] == task) for task in settings.tasks}
    finetune = asdict(FinetuneSettings())
    finetune.pop("seed")  # the seed is each run's
    return {
        "benchmark": "T-Switch density sweep",
        "command": command_line("benchmarks.density_sweep", argv),
        "model": model_label(settings.model),
        "encoder_params": params,
        "settings": asdict(settings) | {"model": model_label(settings.model), "finetune": finetune},
        "held_out_tasks": settings.held_out_tasks,
        "complete": all(measured[task] == sorted(settings.seeds) for task in settings.tasks),
        "seeds_measured": measured,
        "choice_rule": "cheapest density (fewest bits/param) whose mean % kept on the choice tasks >= "
        f"{settings.target_pct:g}",
        "chosen": {rule: choose(rows, rule, settings.target_pct) for rule in settings.scale_rules},
        "rows": rows,
        "runs": runs,
        "seconds": round(seconds, 1),
        "environment": software,
    }


def write_report(report: dict, out: Path) -> None:
    """``<out>.json`` and ``<out>.md``."""
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))


def resumed_runs(path: Path, settings: SweepSettings) -> list[dict]:
    """The runs of an earlier result file measured with the same settings (``--resume``); none otherwise."""
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())
    keys = ("densities", "scale_rules", "max_train", "max_test", "eval_batch_size", "model")
    now = asdict(settings) | {"model": model_label(settings.model)}
    if any(json.dumps(earlier["settings"].get(k)) != json.dumps(now[k]) for k in keys):
        logger.warning("Not resuming from %s: it was measured with other settings.", path)
        return []
    return [run for run in earlier["runs"] if run["task"] in settings.tasks and run["seed"] in settings.seeds]


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
