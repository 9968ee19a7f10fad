"""Serving many switches at the cost of one model: Auto-Switch's execution paths against the plain model and peft's
LoRA mixed batch, as the number of tasks grows. All timings are ratios against the plain base model measured in the
same process, the calls interleaved (fastest of the repeats).

Sections:

1. ``forward``: all-MiniLM-L6-v2 with 8 synthetic switches (density 0.05), 64 texts of 8 text domains (8 per
   task) padded to 8, 32 and 128 tokens; the default (streamed, no dense copies), composed copies kept in a cache
   (``cache_budget_bytes=4 GiB``, opt-in), sparse deltas (``execution="delta"``); execution alone (``routing=``
   given) and routing included; a single-task batch too.
2. ``tasks``: the same model with 1, 2, 4, 8, 16, 32 switches, 64 texts of 32 tokens spread evenly over them
   (each sample assigned its task, routing not timed); default execution against peft LoRA adapters (r=8 on
   query/value, ``adapter_names=``); extra memory.
3. ``generate``: a Llama from config (30M parameters) with 1-32 synthetic switches, 64 left-padded prompts spread
   over the tasks, 32 new tokens, greedy; and SmolLM2-135M-Instruct with 8 switches, 16 prompts, 16 new tokens
   (when its folder is there: see ``benchmarks/flexswitch_llm.py``). Tokens/s against the plain model and peft's LoRA
   mixed batch (r=8 on q/v, ``adapter_names=``).

Usage::

    python -m benchmarks.execution            # writes benchmarks/results/execution.{json,md} and execution.png
    python -m benchmarks.execution --quick    # fewer tasks, lengths and repeats
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers

from switch_adapter import AutoSwitchConfig, AutoSwitchModel
from switch_adapter.autoswitch.kernels import fast_kernels_available
from switch_adapter.autoswitch.routing import RoutingResult

from .model import minilm_path
from .routing import PLAIN_FEATURES, interleaved, llama_prompts, load_domains, make_llama, synthetic_switches

logger = logging.getLogger("execution_benchmark")
MIB = 1 << 20


def forced_routing(router: AutoSwitchModel, batch, tasks_of_sample: list[int]) -> RoutingResult:
    """A routing that sends sample ``i`` to task ``tasks_of_sample[i]`` (top1), to time execution alone."""
    routed = router.route(batch)
    weights = torch.zeros(len(tasks_of_sample), len(router.tasks))
    weights[torch.arange(len(tasks_of_sample)), torch.tensor(tasks_of_sample)] = 1.0
    return RoutingResult(
        list(router.tasks), weights, [router.tasks[t] for t in tasks_of_sample], torch.zeros_like(routed.ood),
        routed.distances, routed.neighbors, routed.mode, routed.radius, routed.metric,
    )  # fmt: skip


def extra_memory(router: AutoSwitchModel) -> int:
    """Bytes a router holds beyond the base model and the packed switches."""
    footprint = router.memory_footprint()
    return footprint["decoded_switches"] + footprint["cache"] + footprint["sparse_deltas"]


def lora_model(make_base, count: int, targets: list[str]):
    from peft import LoraConfig, get_peft_model

    config = lambda: LoraConfig(r=8, target_modules=targets, init_lora_weights=False)  # noqa: E731
    model = get_peft_model(make_base(), config(), adapter_name="task0")
    for t in range(1, count):
        model.add_adapter(f"task{t}", config())
    return model.eval()


def lora_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)


# ----------------------------------------------------------------------------------------------------
# 1./2. Forward on MiniLM
# ----------------------------------------------------------------------------------------------------


def minilm_switches(folder: Path, count: int) -> dict[str, str]:
    make = lambda: transformers.AutoModel.from_pretrained(minilm_path()).eval()  # noqa: E731
    names = [f"task{t}" for t in range(count)]
    missing = [n for n in names if not (folder / n / "adapter_config.json").exists()]
    if missing:
        synthetic_switches(make, folder, count, names)
    return {n: str(folder / n) for n in names}


def minilm_router(switches: dict[str, str], domains: dict, tokenizer, **config) -> AutoSwitchModel:
    names = list(switches)
    domain_names = list(domains)
    query = {n: domains[domain_names[i % 8]][100 * (i // 8) : 100 * (i // 8) + 100] for i, n in enumerate(names)}
    return AutoSwitchModel.from_pretrained(
        transformers.AutoModel.from_pretrained(minilm_path()), adapters=switches, query_sets=query,
        config=AutoSwitchConfig(mode="top1", **PLAIN_FEATURES, **config), tokenizer=tokenizer, progress=False,
    )  # fmt: skip


def texts_batch(domains: dict, tokenizer, length: int, tasks: int = 8):
    names = list(domains)
    texts = [domains[names[i % 8]][600 + i // 8] for i in range(64)]
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return batch, [i % tasks for i in range(64)]


def forward_study(folder: Path, domains, tokenizer, lengths: list[int], repeats: int) -> list[dict]:
    switches = minilm_switches(folder, 8)
    plain = transformers.AutoModel.from_pretrained(minilm_path()).eval()
    routers = {
        "default (streamed)": minilm_router(switches, domains, tokenizer),
        "composed copies cached (4 GiB budget)": minilm_router(
            switches, domains, tokenizer, cache_budget_bytes=4 << 30
        ),  # fmt: skip
        "sparse deltas (execution='delta')": minilm_router(switches, domains, tokenizer, execution="delta"),
    }
    rows = []
    for length in lengths:
        batch, tasks = texts_batch(domains, tokenizer, length)
        single = {k: v[:8].repeat(8, 1) for k, v in batch.items()}  # one domain, 64 texts
        for label, router in routers.items():
            with torch.inference_mode():
                forced = forced_routing(router, batch, tasks)
                forced_single = forced_routing(router, single, [0] * 64)
                b, s, f, fs, r = batch, single, forced, forced_single, router
                timings = interleaved(
                    {
                        "plain": lambda b=b: plain(**b),
                        "exec": lambda b=b, f=f, r=r: r(**b, routing=f),
                        "routed": lambda b=b, r=r: r(**b),
                        "plain_single": lambda s=s: plain(**s),
                        "single": lambda s=s, fs=fs, r=r: r(**s, routing=fs),
                    },
                    repeats,
                )
            rows.append(
                {
                    "execution": label,
                    "length": length,
                    "plain_s": timings["plain"],
                    "mixed_exec_vs_plain": timings["exec"] / timings["plain"],
                    "mixed_exec_vs_plain_cpu1": timings["exec:cpu1"] / timings["plain:cpu1"],
                    "mixed_routed_vs_plain": timings["routed"] / timings["plain"],
                    "single_exec_vs_plain": timings["single"] / timings["plain_single"],
                    "single_exec_vs_plain_cpu1": timings["single:cpu1"] / timings["plain_single:cpu1"],
                    "extra_memory_mib": extra_memory(router) / MIB,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def tasks_study(folder: Path, domains, tokenizer, counts: list[int], repeats: int) -> list[dict]:
    switches = minilm_switches(folder, max(counts))
    make = lambda: transformers.AutoModel.from_pretrained(minilm_path()).eval()  # noqa: E731
    plain = make()
    rows = []
    for count in counts:
        router = minilm_router({n: p for n, p in list(switches.items())[:count]}, domains, tokenizer)
        lora = lora_model(make, count, ["query", "value"])
        batch, _ = texts_batch(domains, tokenizer, 32)
        tasks = [i % count for i in range(64)]
        names = [f"task{t}" for t in tasks]
        with torch.inference_mode():
            forced = forced_routing(router, batch, tasks)
            b, f, r, lo, n = batch, forced, router, lora, names
            timings = interleaved(
                {
                    "plain": lambda b=b: plain(**b),
                    "routed": lambda b=b, f=f, r=r: r(**b, routing=f),
                    "lora": lambda b=b, lo=lo, n=n: lo(**b, adapter_names=n),
                },
                repeats,
            )
        footprint = router.memory_footprint()
        rows.append(
            {
                "tasks": count,
                "routed_vs_plain": timings["routed"] / timings["plain"],
                "lora_vs_plain": timings["lora"] / timings["plain"],
                "routed_vs_plain_cpu1": timings["routed:cpu1"] / timings["plain:cpu1"],
                "lora_vs_plain_cpu1": timings["lora:cpu1"] / timings["plain:cpu1"],
                "packed_switches_mib": footprint["switches"] / MIB,
                "extra_memory_mib": extra_memory(router) / MIB,
                "lora_adapters_mib": lora_bytes(lora) / MIB,
                "dense_copies_mib": footprint["dense_task_copies"] / MIB,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------
# 3. Generate
# ----------------------------------------------------------------------------------------------------


def generate_rows(make_base, switches: dict[str, str], query, prompts, tasks: list[int], new_tokens: int,
                  repeats: int, lora_targets: list[str], model: str) -> dict:  # fmt: skip
    router = AutoSwitchModel.from_pretrained(
        make_base(), adapters=switches, query_sets=query, config=AutoSwitchConfig(mode="top1", **PLAIN_FEATURES),
        progress=False,
    )  # fmt: skip
    plain = make_base()
    lora = lora_model(make_base, len(switches), lora_targets)
    names = [f"task{t}" for t in tasks]
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    pad_token_id=plain.config.pad_token_id or 0)  # fmt: skip
    with torch.inference_mode():
        forced = forced_routing(router, prompts, tasks)
        timings = interleaved(
            {
                "plain": lambda: plain.generate(**prompts, **settings),
                "routed": lambda: router.generate(**prompts, routing=forced, **settings),
                "lora": lambda: lora.generate(**prompts, adapter_names=names, **settings),
            },
            repeats,
        )
    tokens = prompts["input_ids"].shape[0] * new_tokens
    row = {
        "model": model,
        "tasks": len(switches),
        "prompts": prompts["input_ids"].shape[0],
        "new_tokens": new_tokens,
        "plain_tokens_per_s": tokens / timings["plain"],
        "routed_vs_plain": timings["plain"] / timings["routed"],
        "lora_vs_plain": timings["plain"] / timings["lora"],
        "routed_vs_plain_cpu1": timings["plain:cpu1"] / timings["routed:cpu1"],
        "lora_vs_plain_cpu1": timings["plain:cpu1"] / timings["lora:cpu1"],
        "extra_memory_mib": extra_memory(router) / MIB,
        "packed_switches_mib": router.memory_footprint()["switches"] / MIB,
        "lora_adapters_mib": lora_bytes(lora) / MIB,
    }
    print(json.dumps(row), flush=True)
    return row


def llama_generate_study(folder: Path, counts: list[int], repeats: int) -> list[dict]:
    names = [f"task{t}" for t in range(max(counts))]
    if not all((folder / n / "adapter_config.json").exists() for n in names):
        synthetic_switches(make_llama, folder, len(names), names)
    rows = []
    for count in counts:
        switches = {n: str(folder / n) for n in names[:count]}
        query_prompts, _ = llama_prompts(count, 20, seed=1)
        query = {
            n: {k: v[[i for i in range(len(v)) if i % count == t]] for k, v in query_prompts.items()}
            for t, n in enumerate(switches)
        }
        prompts, labels = llama_prompts(count, max(1, 64 // count), seed=2)
        prompts = {k: v[:64] for k, v in prompts.items()}
        rows.append(generate_rows(make_llama, switches, query, prompts, labels[:64], 32, repeats,
                                  ["q_proj", "v_proj"], "Llama 30M (config)"))  # fmt: skip
    return rows


def smollm2_generate_study(folder: Path, repeats: int) -> list[dict]:
    from .flexswitch_llm import cache_dir

    base = cache_dir() / "smollm2-135m-instruct"
    if not (base / "config.json").exists():
        logger.warning("SmolLM2 folder missing (run python -m benchmarks.flexswitch_llm once): section skipped.")
        return []
    make = lambda: transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()  # noqa: E731
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "left"
    names = [f"task{t}" for t in range(8)]
    if not all((folder / n / "adapter_config.json").exists() for n in names):
        synthetic_switches(make, folder, 8, names)
    domains = load_domains()
    domain_names = list(domains)
    query = {n: domains[domain_names[t]][:40] for t, n in enumerate(names)}
    texts = [domains[domain_names[i % 8]][600 + i] for i in range(16)]
    prompts = dict(tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt"))
    query = {n: dict(tokenizer(q, padding=True, truncation=True, max_length=48, return_tensors="pt"))
             for n, q in query.items()}  # fmt: skip
    switches = {n: str(folder / n) for n in names}
    return [generate_rows(make, switches, query, prompts, [i % 8 for i in range(16)], 16, repeats,
                          ["q_proj", "v_proj"], "SmolLM2-135M-Instruct")]  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def _markdown(payload: dict) -> str:
    env = payload["environment"]
    lines = [
        "# Auto-Switch execution benchmark",
        "",
        f"Command (from the repository root): `{payload['command']}`.",
        "",
        f"torch {env['torch']}, transformers {env['transformers']}, {env['threads']} threads, {env['machine']}; "
        f"numba kernels: {env['numba_kernels']}. Load average (1 min) at start {env['load_average'][0]:.1f}.",
        "Timings: fastest of the interleaved repeats in one process, as ratios against the plain base model; in "
        "parentheses the ratio of process CPU time with one torch thread and one numba thread (the work done, less "
        "disturbed by other load on a shared machine).",
        "",
        "## Forward, MiniLM + 8 switches (density 0.05), mixed batch of 64 texts over 8 tasks",
        "",
        "| execution | tokens / text | execution / plain | routed (routing included) / plain "
        "| single-task batch / plain | extra memory (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in payload["forward"]:
        lines.append(
            f"| {row['execution']} | {row['length']} | {row['mixed_exec_vs_plain']:.2f}x "
            f"({row['mixed_exec_vs_plain_cpu1']:.2f}x) | {row['mixed_routed_vs_plain']:.2f}x | "
            f"{row['single_exec_vs_plain']:.2f}x ({row['single_exec_vs_plain_cpu1']:.2f}x) | "
            f"{row['extra_memory_mib']:.1f} |"
        )
    lines += [
        "",
        "## Number of tasks, MiniLM, 64 texts of 32 tokens spread evenly (execution only)",
        "",
        "| tasks | routed / plain | LoRA mixed batch / plain | packed switches (MiB) | extra memory (MiB) | "
        "LoRA adapters (MiB) | dense copies would take (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in payload["tasks"]:
        lines.append(
            f"| {row['tasks']} | {row['routed_vs_plain']:.2f}x ({row['routed_vs_plain_cpu1']:.2f}x) | "
            f"{row['lora_vs_plain']:.2f}x ({row['lora_vs_plain_cpu1']:.2f}x) | "
            f"{row['packed_switches_mib']:.1f} | {row['extra_memory_mib']:.1f} | {row['lora_adapters_mib']:.1f} | "
            f"{row['dense_copies_mib']:.0f} |"
        )
    lines += [
        "",
        "## Generate (greedy, KV cache), tokens/s against the plain model",
        "",
        "| model | tasks | prompts x new tokens | plain tokens/s | routed / plain | LoRA mixed batch / plain | "
        "extra memory (MiB) | packed switches (MiB) | LoRA adapters (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["generate"]:
        lines.append(
            f"| {row['model']} | {row['tasks']} | {row['prompts']} x {row['new_tokens']} | "
            f"{row['plain_tokens_per_s']:.0f} | {row['routed_vs_plain']:.2f}x ({row['routed_vs_plain_cpu1']:.2f}x) | "
            f"{row['lora_vs_plain']:.2f}x ({row['lora_vs_plain_cpu1']:.2f}x) | "
            f"{row['extra_memory_mib']:.1f} | {row['packed_switches_mib']:.1f} | {row['lora_adapters_mib']:.1f} |"
        )
    lines.append("")
    return "\n".join(lines)


def _plot(payload: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib missing: no plot (pip install matplotlib).")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    tasks = payload["tasks"]
    llama = [r for r in payload["generate"] if r["model"].startswith("Llama")]
    counts = [r["tasks"] for r in tasks]
    axes[0].plot(counts, [r["routed_vs_plain"] for r in tasks], "o-", label="Auto-Switch (streamed)")
    axes[0].plot(counts, [r["lora_vs_plain"] for r in tasks], "s-", label="peft LoRA mixed batch (r=8)")
    axes[0].axhline(1.0, color="grey", linestyle=":", label="plain model")
    axes[0].set(title="MiniLM forward, 64 x 32 tokens", xlabel="tasks in the batch", ylabel="time / plain")
    if llama:
        lc = [r["tasks"] for r in llama]
        axes[1].plot(lc, [1 / r["routed_vs_plain"] for r in llama], "o-", label="Auto-Switch (streamed)")
        axes[1].plot(lc, [1 / r["lora_vs_plain"] for r in llama], "s-", label="peft LoRA mixed batch (r=8)")
        axes[1].axhline(1.0, color="grey", linestyle=":", label="plain model")
        axes[1].set(title="Llama 30M generate, 64 prompts", xlabel="tasks in the batch", ylabel="time / plain")
    axes[2].plot(counts, [r["extra_memory_mib"] + r["packed_switches_mib"] for r in tasks], "o-",
                 label="Auto-Switch: packed + decoded")  # fmt: skip
    axes[2].plot(counts, [r["lora_adapters_mib"] for r in tasks], "s-", label="LoRA adapters (fp32)")
    axes[2].plot(counts, [r["dense_copies_mib"] for r in tasks], "^-", label="dense task copies")
    axes[2].set(title="MiniLM memory beyond the base model", xlabel="tasks", ylabel="MiB", yscale="log")
    for axis in axes:
        axis.set_xscale("log", base=2)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer lengths, task counts and repeats")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 generate row")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    transformers.logging.set_verbosity_error()
    repeats = 2 if args.quick else 5
    generate_repeats, smollm2_repeats = (2, 2) if args.quick else (5, 3)
    lengths = [32] if args.quick else [8, 32, 128]
    counts = [1, 8, 32] if args.quick else [1, 2, 4, 8, 16, 32]
    torch.manual_seed(0)
    started = time.time()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        domains = load_domains()
        tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
        forward = forward_study(scratch / "minilm", domains, tokenizer, lengths, repeats)
        tasks = tasks_study(scratch / "minilm", domains, tokenizer, counts, repeats)
        generate = llama_generate_study(scratch / "llama", counts, generate_repeats)
        if not args.no_smollm2:
            generate += smollm2_generate_study(scratch / "smollm2", smollm2_repeats)
    command = "python -m benchmarks.execution" + (" --quick" if args.quick else "")
    command += " --no-smollm2" if args.no_smollm2 else ""
    payload = {
        "command": command,
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "numba_kernels": fast_kernels_available(),
            "load_average": list(load),
            "seconds": time.time() - started,
        },
        "settings": {
            "repeats": repeats,
            "generate_repeats": generate_repeats,
            "smollm2_repeats": smollm2_repeats,
            "lengths": lengths,
            "task_counts": counts,
            "density": 0.05,
            "seed": 0,
        },
        "forward": forward,
        "tasks": tasks,
        "generate": generate,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "execution_quick" if args.quick else "execution"
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(_markdown(payload))
    _plot(payload, args.out / f"{name}.png")
    print(_markdown(payload))


if __name__ == "__main__":
    main()
