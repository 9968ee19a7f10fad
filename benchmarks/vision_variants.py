"""Switch variants on the vision suite's fine-tunes: which setting loses what, with the task id given.

``python -m benchmarks.vision_variants`` builds one T-Switch per task from the vision suite's cached EfficientNet-Lite0
fine-tunes (trained first when absent, with the suite's settings) for every variant, and scores each task's test split
with that task's switch alone. A variant is ``key=value`` pairs joined by commas:

- ``d``: density (default 0.1); ``g``: ``scale_granularity`` (``tensor`` | ``row``); ``s``: ``scale_rule``
  (``norm`` | ``rms``);
- ``r=1``: re-estimate the BatchNorm statistics with the switch active on 200 training images of the task
  (``recalibrate_norm_statistics``); otherwise the fine-tune's statistics are carried;
- ``bn=full``: keep BatchNorm layers whole (``modules_to_save``) instead of switching their affine parameters.

Results: ``benchmarks/results/vision_variants.{json,md}`` (``--out``), with the command, seed and settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .vision import VisionBenchConfig, load_vision_suite
from .vision_model import efficientnet_lite0, finetune_task
from .vision_tasks import model_inputs

DEFAULT_VARIANTS = (
    "d=1",
    "d=0.1",
    "d=0.1,bn=full",
    "d=0.05,r=1",
    "d=0.05,r=1,g=row",
    "d=0.05,r=1,s=rms",
    "d=0.3,r=1",
    "d=0.3,r=1,s=rms",
)
RECALIBRATION_IMAGES = 200


def parse_variant(text: str) -> dict[str, str]:
    """``"d=0.1,r=1"`` -> ``{"d": "0.1", "r": "1"}``; raises ``ValueError`` for unknown keys."""
    options = dict(part.split("=", 1) for part in text.split(",") if part)
    unknown = set(options) - {"d", "g", "s", "r", "bn"}
    if unknown:
        raise ValueError(f"Unknown variant keys {sorted(unknown)} in {text!r}; known: d, g, s, r, bn.")
    return options


@torch.no_grad()
def accuracy(network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = torch.cat([network(images[i : i + 250]).argmax(-1) for i in range(0, len(images), 250)])
    return (predictions == labels).float().mean().item()


def switched(base: torch.nn.Module, tuned: torch.nn.Module, options: dict[str, str], calibration: torch.Tensor):
    from switch_adapter import TSwitchConfig, from_finetuned, recalibrate_norm_statistics

    extra: dict[str, Any] = {}
    if options.get("bn") == "full":
        norms = [name for name, module in base.named_modules() if isinstance(module, torch.nn.BatchNorm2d)]
        extra = {"exclude_modules": norms, "modules_to_save": [*norms, "_fc"]}
    config = TSwitchConfig(
        density=float(options.get("d", 0.1)),
        scale_granularity=options.get("g", "tensor"),
        scale_rule=options.get("s", "norm"),
        **extra,
    )
    model = from_finetuned(base, tuned, config, progress=False).eval()
    if options.get("r") == "1":
        batches = [calibration[i : i + 64] for i in range(0, len(calibration), 64)]
        recalibrate_norm_statistics(model, batches, progress=False)
        model.eval()
    return model


def run(variants: list[str], out: Path, seed: int) -> dict[str, Any]:
    torch.set_num_threads(2)
    start = time.perf_counter()
    config = VisionBenchConfig(progress=False, seed=seed)
    suite, skipped = load_vision_suite(config.tasks, config)
    if not suite:
        raise SystemExit(f"No image task could be loaded: {skipped}")
    model = efficientnet_lite0()
    cache = Path(config.cache_dir) if config.cache_dir else None
    from .vision import default_cache_dir

    cache = cache or default_cache_dir()
    size = config.finetune.image_size
    tasks = []
    for task in suite:
        tuned = finetune_task(task.name, task.train, task.num_labels, model, config.finetune, cache, False).load(model)
        images, labels = model_inputs(task.test.images, size), torch.as_tensor(task.test.labels)
        calibration = model_inputs(task.train.images[:RECALIBRATION_IMAGES], size)
        tasks.append((task, tuned.eval(), images, labels, calibration))
    individual = {task.name: accuracy(tuned, images, labels) for task, tuned, images, labels, _ in tasks}
    rows = []
    for variant in variants:
        options = parse_variant(variant)
        scores = {}
        for task, tuned, images, labels, calibration in tasks:
            base = model.build(task.num_labels).eval()
            scores[task.name] = accuracy(switched(base, tuned, options, calibration), images, labels)
        kept = 100 * sum(scores[n] / individual[n] for n in scores) / len(scores)
        rows.append({"variant": variant, "accuracy": scores, "mean": sum(scores.values()) / len(scores), "kept": kept})
        logging.getLogger(__name__).info("%s: %.2f%% of individual", variant, kept)
    report = {
        "command": " ".join(["python -m benchmarks.vision_variants", *sys.argv[1:]]),
        "seed": seed,
        "tasks": list(individual),
        "settings": {
            "finetune": {k: getattr(config.finetune, k) for k in ("epochs", "lr", "head_lr", "image_size")},
            "images": {"train": config.max_train, "test": config.max_test},
            "recalibration_images": RECALIBRATION_IMAGES,
        },
        "individual": individual,
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "vision_variants.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# T-Switch variants on the vision suite's fine-tunes (task id given)",
        "",
        f"Command: `{report['command']}` (seed {seed}; EfficientNet-Lite0 fine-tunes of the vision suite, "
        f"{size} px; statistics re-estimated on {RECALIBRATION_IMAGES} training images where `r=1`).",
        "",
        "| variant | " + " | ".join(individual) + " | mean | % of individual |",
        "|---|" + "---:|" * (len(individual) + 2),
        "| individual fine-tunes | " + " | ".join(f"{v:.4f}" for v in individual.values()) + " | "
        f"{sum(individual.values()) / len(individual):.4f} | 100.00 |",
    ]
    for row in rows:
        cells = " | ".join(f"{row['accuracy'][n]:.4f}" for n in individual)
        lines.append(f"| `{row['variant']}` | {cells} | {row['mean']:.4f} | {row['kept']:.2f} |")
    lines += ["", "Keys: d density, g scale_granularity, s scale_rule, r=1 statistics re-estimated, bn=full "
              "BatchNorm kept whole.", f"Wall time {report['seconds']} s."]  # fmt: skip
    (out / "vision_variants.md").write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vision_variants", description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="*", default=list(DEFAULT_VARIANTS), help="variants, e.g. d=0.05,r=1")
    parser.add_argument("--out", default="benchmarks/results", help="results folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for variant in args.variants:
        parse_variant(variant)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("switch_adapter").setLevel(logging.WARNING)
    run(args.variants, Path(args.out), args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
