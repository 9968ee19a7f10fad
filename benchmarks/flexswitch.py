"""FlexSwitch against T-Switch on the 8-task MiniLM suite: accuracy against the bytes of the saved adapter.

For every task the main benchmark's cached fine-tune (:mod:`benchmarks.finetune`, default settings, seed 0: all of
all-MiniLM-L6-v2 fine-tuned, mean pooling + one linear head) is the individual model. From it, with the task id
given:

* FlexSwitch (``switch_adapter.flexswitch``) at each budget (% of the fp32 task vector of the switched tensors;
  ``FlexSwitchConfig`` defaults otherwise), learned from the first 100 training texts of the task;
* T-Switch (``switch_adapter.from_finetuned``, norm scale) at each density, to trace its accuracy-vs-bytes front.

Every adapter is saved with ``save_pretrained``, reloaded with ``PeftModel.from_pretrained`` on a fresh base model
and evaluated on the task's 300 test examples as the pipeline evaluates (batches of 128, :mod:`benchmarks.evaluate`).
Size: the bytes of ``adapter_model.safetensors`` (the fp32 task head included, as ``modules_to_save``); % of fp32:
those bytes over the fp32 task vector of the switched tensors (``4 x`` switched parameters). FlexSwitch's wall time
is also reported as a ratio to the task's fine-tuning time (from the cached fine-tune's ``meta.json``).

Results go to ``<out>.json`` (settings, every measurement, per-unit layouts), ``<out>.md`` and ``<out>.png``; they
are rewritten after every measurement, and ``--resume`` keeps what an earlier run with the same settings measured.

Usage (from the repository root)::

    python -m benchmarks.flexswitch                                   # 8 tasks, 3 budgets, 5 densities
    python -m benchmarks.flexswitch --tasks trec --budgets 0.5% --out my-flex
    python -m benchmarks.flexswitch --resume                          # continue an interrupted run
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import evaluate
from .environment import command_line, environment
from .finetune import FinetuneSettings, finetune_task
from .model import load_classifier, minilm_path, model_label
from .pipeline import DEFAULT_TASKS, default_cache_dir
from .tasks import load_task

logger = logging.getLogger("benchmarks.flexswitch")

DEFAULT_BUDGETS = ("0.25%", "0.5%", "1%")
DEFAULT_DENSITIES = (0.01, 0.02, 0.03, 0.05, 0.1)
ADAPTER_FILE = "adapter_model.safetensors"
TARGET_PCT = 99.5  # of the individual models' mean accuracy ...
TARGET_BUDGET_PCT = 0.5  # ... at this % of fp32 or less (issue: FlexSwitch targets)
BREAKDOWN_BUDGET = "0.5%"
RESULTS = Path(__file__).resolve().parent / "results" / "flexswitch"
# Settings an earlier result file must share for --resume to keep its measurements (budgets and densities may differ:
# each measurement is keyed by its own).
RESUME_KEYS = ("examples", "steps", "max_train", "max_test", "eval_batch_size", "seed", "model")


@dataclass(frozen=True)
class FlexSettings:
    """Everything the run measures (recorded in the result file)."""

    tasks: tuple[str, ...]
    budgets: tuple[str, ...]
    densities: tuple[float, ...]
    steps: int | None = None  # None: FlexSwitchConfig's default
    examples: int = 100
    max_train: int = 1000
    max_test: int = 300
    eval_batch_size: int = 128
    seed: int = 0
    model: str | None = None


# ----------------------------------------------------------------------------------------------------
# Measuring one adapter
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def task_accuracy(predictor: evaluate.Predictor, stream: evaluate.MixedStream, task: str) -> float:
    return evaluate.evaluate(predictor, stream, desc=f"evaluate {task}", progress=False).accuracy[task]


def reloaded_accuracy(peft_model: Any, model_path: str, num_labels: int, stream, task: str) -> tuple[float, int]:
    """Save ``peft_model``, reload it on a fresh base with ``PeftModel.from_pretrained``, evaluate it; returns the
    accuracy and the bytes of ``adapter_model.safetensors``."""
    from peft import PeftModel

    with tempfile.TemporaryDirectory(prefix="flexbench-") as tmp:
        peft_model.save_pretrained(tmp)
        size = (Path(tmp) / ADAPTER_FILE).stat().st_size
        loaded = PeftModel.from_pretrained(load_classifier(model_path, num_labels), tmp).eval()
        value = task_accuracy(evaluate.peft_oracle_predictor(loaded, ["default"]), stream, task)
    del loaded
    return value, size


def layout_units(config: Any) -> list[dict]:
    """Per switched unit: module, param, shape, parameters, kept, value bits, code bytes, encoding."""
    units = []
    for module, params in config.unit_layout.items():
        for param, entry in params.items():
            numel = math.prod(entry["shape"]) if entry["shape"] else 1
            units.append(
                {
                    "module": module,
                    "param": param,
                    "numel": numel,
                    "kept": int(entry["kept"]),
                    "bits": int(entry.get("value_bits", 1)),
                    "code_bytes": int(entry["code_bytes"]),
                    "encoding": entry.get("encoding"),
                }
            )
    return units


def units_summary(units: list[dict]) -> dict:
    """Switched parameters, kept entries, density and histograms of the value bits (units and kept entries)."""
    params = sum(u["numel"] for u in units)
    kept = sum(u["kept"] for u in units)
    by_units: dict[str, int] = {}
    by_kept: dict[str, int] = {}
    for unit in units:
        key = str(unit["bits"])
        by_units[key] = by_units.get(key, 0) + 1
        by_kept[key] = by_kept.get(key, 0) + unit["kept"]
    return {
        "switched_params": params,
        "kept": kept,
        "density": kept / params if params else float("nan"),
        "units": len(units),
        "bits_units": dict(sorted(by_units.items(), key=lambda kv: int(kv[0]))),
        "bits_kept": dict(sorted(by_kept.items(), key=lambda kv: int(kv[0]))),
    }


def measure_flexswitch(context: dict, budget: str, settings: FlexSettings) -> dict:
    """Learn a FlexSwitch at ``budget``, save / reload / evaluate it; the measurement."""
    from switch_adapter import BudgetError, FlexSwitchConfig, TrainingError, flexswitch

    kwargs = {} if settings.steps is None else {"steps": settings.steps}
    config = FlexSwitchConfig(budget=budget, modules_to_save=["classifier"], task_type="SEQ_CLS", **kwargs)
    base = load_classifier(context["model_path"], context["num_labels"])
    load_before = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        model = flexswitch(
            base,
            context["finetuned"],
            context["examples"],
            config=config,
            tokenizer=context["tokenizer"],
            progress=True,
        )
    except (BudgetError, TrainingError) as error:  # a finding, not a reason to stop the run
        seconds = time.perf_counter() - start
        logger.error("%s FlexSwitch %s failed after %.1f s: %s", context["task"], budget, seconds, error)
        return {"budget": budget, "error": f"{type(error).__name__}: {error}", "seconds": round(seconds, 2)}
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    load = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    model.eval()
    in_memory = task_accuracy(evaluate.peft_oracle_predictor(model, ["default"]), context["stream"], context["task"])
    accuracy, size = reloaded_accuracy(
        model, context["model_path"], context["num_labels"], context["stream"], context["task"]
    )
    peft_config = model.peft_config["default"]
    record = dict(peft_config.flexswitch)
    units = layout_units(peft_config)
    summary = units_summary(units)
    result = {
        "budget": budget,
        "accuracy": accuracy,
        "accuracy_in_memory": in_memory,
        "file_bytes": size,
        "pct_of_fp32": 100 * size / (4 * summary["switched_params"]),
        "seconds": round(seconds, 2),
        "finetune_ratio": seconds / context["finetune_seconds"],
        "cpu_seconds": round(cpu_seconds, 2),  # CPU time of this process (all threads)
        "load_average": load,  # 1-minute load average of the machine before and after the call (2 cores)
        "flexswitch": record,
        **summary,
        "unit_layout": [
            [u["module"], u["param"], u["numel"], u["kept"], u["bits"], u["code_bytes"], u["encoding"]] for u in units
        ],
    }
    del model, base
    gc.collect()
    logger.info(
        "%s FlexSwitch %s: acc %.4f (in memory %.4f), %d bytes (%.3f%% of fp32, budget %s bytes), density "
        "%.4f, bits %s, %s steps, %.1f s (x%.2f fine-tune)",
        context["task"],
        budget,
        accuracy,
        in_memory,
        size,
        result["pct_of_fp32"],
        record.get("budget_bytes"),
        summary["density"],
        summary["bits_units"],
        record.get("steps"),
        seconds,
        result["finetune_ratio"],
    )
    return result


def measure_tswitch(context: dict, density: float) -> dict:
    """T-Switch at ``density`` via ``from_finetuned``, saved / reloaded / evaluated; the measurement."""
    from switch_adapter import TSwitchConfig, from_finetuned

    config = TSwitchConfig(density=density, modules_to_save=["classifier"], task_type="SEQ_CLS")
    base = load_classifier(context["model_path"], context["num_labels"])
    start = time.perf_counter()
    model = from_finetuned(base, context["finetuned"], config, progress=False)
    seconds = time.perf_counter() - start
    accuracy, size = reloaded_accuracy(
        model, context["model_path"], context["num_labels"], context["stream"], context["task"]
    )
    summary = units_summary(layout_units(model.peft_config["default"]))
    del model, base
    gc.collect()
    result = {
        "density": density,
        "accuracy": accuracy,
        "file_bytes": size,
        "pct_of_fp32": 100 * size / (4 * summary["switched_params"]),
        "seconds": round(seconds, 2),
        **{k: summary[k] for k in ("switched_params", "kept", "units")},
        "learned_density": summary["density"],
    }
    logger.info(
        "%s T-Switch d=%g: acc %.4f, %d bytes (%.3f%% of fp32)",
        context["task"],
        density,
        accuracy,
        size,
        result["pct_of_fp32"],
    )
    return result


# ----------------------------------------------------------------------------------------------------
# One task
# ----------------------------------------------------------------------------------------------------


def task_context(task: str, settings: FlexSettings, model_path: str, tokenizer: Any, cache: Path) -> dict:
    """The task's data, cached fine-tune, test stream and base figures."""
    splits = load_task(task, seed=settings.seed, max_train=settings.max_train, max_test=settings.max_test)
    train, test = splits["train"], splits["test"]
    num_labels = train.features["label"].num_classes
    finetune = FinetuneSettings(seed=settings.seed)
    cached = finetune_task(
        task, list(train["text"]), [int(x) for x in train["label"]], num_labels, model_path, tokenizer, finetune, cache
    )
    if not cached.record.get("cached"):
        logger.warning("%s was fine-tuned now (not found in the cache).", task)
    stream = evaluate.mixed_stream(
        {task: test}, tokenizer, settings.eval_batch_size, finetune.max_length, settings.seed
    )
    return {
        "task": task,
        "model_path": model_path,
        "tokenizer": tokenizer,
        "num_labels": num_labels,
        "finetuned": cached.load(),
        "finetune_record": cached.record,
        "finetune_seconds": float(cached.record["seconds"]),
        "checkpoint_bytes": cached.weights_file.stat().st_size,
        "stream": stream,
        "examples": list(train["text"])[: settings.examples],
        "train": len(train),
        "test": len(test),
    }


def run_task(
    task: str,
    settings: FlexSettings,
    run: dict | None,
    model_path: str,
    tokenizer: Any,
    cache: Path,
    save: Any,
    bar: Any,
) -> dict:
    """Measure what ``run`` (an earlier partial result of ``task``, or None) lacks; ``save(run)`` after each step."""
    context = task_context(task, settings, model_path, tokenizer, cache)
    if run is None:
        individual = task_accuracy(evaluate.models_predictor([context["finetuned"]]), context["stream"], task)
        base = load_classifier(model_path, context["num_labels"])
        base.classifier.load_state_dict(context["finetuned"].classifier.state_dict())
        pretrained = task_accuracy(evaluate.models_predictor([base]), context["stream"], task)
        record = context["finetune_record"]
        run = {
            "task": task,
            "num_labels": context["num_labels"],
            "train": context["train"],
            "test": context["test"],
            "individual": individual,
            "pretrained": pretrained,
            "finetune": {k: record.get(k) for k in ("seconds", "steps", "first_loss", "last_loss", "cached")},
            "fp32_checkpoint_bytes": context["checkpoint_bytes"],
            "flexswitch": {},
            "tswitch": {},
        }
        logger.info(
            "%s: individual %.4f, pre-trained encoder + head %.4f, fine-tune %.1f s",
            task,
            individual,
            pretrained,
            run["finetune"]["seconds"],
        )
        save(run)
    for budget in settings.budgets:
        if budget not in run["flexswitch"]:
            bar.set_description(f"{task} FlexSwitch {budget}")
            run["flexswitch"][budget] = measure_flexswitch(context, budget, settings)
            save(run)
        bar.update(1)
    for density in settings.densities:
        if f"{density:g}" not in run["tswitch"]:
            bar.set_description(f"{task} T-Switch d={density:g}")
            run["tswitch"][f"{density:g}"] = measure_tswitch(context, density)
            save(run)
        bar.update(1)
    del context
    gc.collect()
    return run


# ----------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def complete_runs(runs: Sequence[dict], settings: FlexSettings) -> list[dict]:
    """The runs that hold every budget and density of ``settings`` (summaries are taken over these only, so every
    row averages the same tasks)."""
    return [
        r
        for r in runs
        if all(b in r["flexswitch"] for b in settings.budgets)
        and all(f"{d:g}" in r["tswitch"] for d in settings.densities)
    ]


def summarise(runs: list[dict], settings: FlexSettings) -> list[dict]:
    """One row per method: mean accuracy, % of the individual mean, mean bytes and % of fp32 over the tasks."""
    if not runs:
        return []
    individual = _mean([r["individual"] for r in runs])
    rows = [
        {
            "method": "individual",
            "label": "individual fine-tuned models (upper bound)",
            "mean": individual,
            "bytes": _mean([r["fp32_checkpoint_bytes"] for r in runs]),
            "pct_of_fp32": 100.0,
        },
        {
            "method": "pretrained",
            "label": "pre-trained encoder + fine-tuned head (lower bound)",
            "mean": _mean([r["pretrained"] for r in runs]),
            "bytes": None,
            "pct_of_fp32": None,
        },
    ]
    for budget in settings.budgets:
        failed = [r["task"] for r in runs if "error" in r["flexswitch"][budget]]
        ms = [r["flexswitch"][budget] for r in runs if "error" not in r["flexswitch"][budget]]
        if not ms:
            continue
        rows.append(
            {
                "method": "flexswitch",
                "label": f"FlexSwitch, task id, budget {budget}"
                + (f" (**failed on {len(failed)} task(s)**, mean over the others)" if failed else ""),
                "failed": failed,
                "budget": budget,
                "mean": _mean([m["accuracy"] for m in ms]),
                "mean_in_memory": _mean([m["accuracy_in_memory"] for m in ms]),
                "bytes": _mean([m["file_bytes"] for m in ms]),
                "pct_of_fp32": _mean([m["pct_of_fp32"] for m in ms]),
                "budget_bytes": _mean([m["flexswitch"].get("budget_bytes", float("nan")) for m in ms]),
                "density": _mean([m["density"] for m in ms]),
                "steps": _mean([m["flexswitch"]["steps"] for m in ms]),
                "seconds": _mean([m["seconds"] for m in ms]),
                "finetune_ratio": _mean([m["finetune_ratio"] for m in ms]),
                "max_seconds": max(m["seconds"] for m in ms),
                "cpu_seconds": _mean([m.get("cpu_seconds", float("nan")) for m in ms]),
                "bits_units": _sum_dicts([m["bits_units"] for m in ms]),
                "bits_kept": _sum_dicts([m["bits_kept"] for m in ms]),
            }
        )
    for density in settings.densities:
        ms = [r["tswitch"][f"{density:g}"] for r in runs]
        rows.append(
            {
                "method": "tswitch",
                "label": f"T-Switch, task id, d={density:g} (norm scale)",
                "density": density,
                "mean": _mean([m["accuracy"] for m in ms]),
                "bytes": _mean([m["file_bytes"] for m in ms]),
                "pct_of_fp32": _mean([m["pct_of_fp32"] for m in ms]),
                "seconds": _mean([m["seconds"] for m in ms]),
            }
        )
    for row in rows:
        row["pct_of_individual"] = 100 * row["mean"] / individual
        row["per_task"] = {r["task"]: _row_accuracy(r, row) for r in runs}
    return rows


def _row_accuracy(run: dict, row: dict) -> float:
    if row["method"] in ("individual", "pretrained"):
        return run[row["method"]]
    if row["method"] == "flexswitch":
        return run["flexswitch"][row["budget"]].get("accuracy", float("nan"))
    return run["tswitch"][f"{row['density']:g}"]["accuracy"]


def _sum_dicts(dicts: Sequence[dict]) -> dict:
    total: dict[str, int] = {}
    for entry in dicts:
        for key, value in entry.items():
            total[key] = total.get(key, 0) + value
    return dict(sorted(total.items(), key=lambda kv: int(kv[0])))


def front(rows: list[dict]) -> list[dict]:
    """Per FlexSwitch budget: the most accurate T-Switch row whose mean file is not larger, and whether FlexSwitch
    is at least as accurate (its front on or above T-Switch's)."""
    tswitch = [r for r in rows if r["method"] == "tswitch"]
    out = []
    for flex in (r for r in rows if r["method"] == "flexswitch"):
        smaller = [t for t in tswitch if t["bytes"] <= flex["bytes"]]
        best = max(smaller, key=lambda t: t["mean"]) if smaller else None
        larger = [t for t in tswitch if t["bytes"] > flex["bytes"]]
        next_up = min(larger, key=lambda t: t["bytes"]) if larger else None
        out.append(
            {
                "budget": flex["budget"],
                "flexswitch_mean": flex["mean"],
                "flexswitch_bytes": flex["bytes"],
                "best_tswitch_density": best["density"] if best else None,
                "best_tswitch_mean": best["mean"] if best else None,
                "best_tswitch_bytes": best["bytes"] if best else None,
                "next_larger_tswitch_density": next_up["density"] if next_up else None,
                "next_larger_tswitch_mean": next_up["mean"] if next_up else None,
                "next_larger_tswitch_bytes": next_up["bytes"] if next_up else None,
                "at_least_as_accurate": None if best is None else flex["mean"] >= best["mean"],
            }
        )
    return out


def target(rows: list[dict]) -> dict:
    """The issue's target: FlexSwitch keeps >= 99.5% of the individual mean at <= 0.5% of fp32."""
    fitting = [r for r in rows if r["method"] == "flexswitch" and r["pct_of_fp32"] <= TARGET_BUDGET_PCT]
    best = max(fitting, key=lambda r: r["pct_of_individual"]) if fitting else None
    return {
        "target_pct": TARGET_PCT,
        "max_pct_of_fp32": TARGET_BUDGET_PCT,
        "best_budget": best["budget"] if best else None,
        "best_pct_of_individual": best["pct_of_individual"] if best else None,
        "best_pct_of_fp32": best["pct_of_fp32"] if best else None,
        "met": bool(best and best["pct_of_individual"] >= TARGET_PCT),
    }


def checks(runs: list[dict], settings: FlexSettings) -> dict:
    """Sanity checks over every FlexSwitch measurement: the budget met (the file within 5% below it), failures,
    NaN losses or accuracies, saved-and-reloaded accuracy equal to the in-memory one, and per task whether FlexSwitch
    is at least as accurate as every T-Switch of that task with a file no larger."""
    measured = [(r, b, r["flexswitch"][b]) for r in runs for b in settings.budgets if b in r["flexswitch"]]
    ok = [(r, b, m) for r, b, m in measured if "error" not in m]
    missed = [
        f"{r['task']} {b}: {m['file_bytes']:,} B for a budget of {m['flexswitch']['budget_bytes']:,} B"
        for r, b, m in ok
        if not 0.95 * m["flexswitch"]["budget_bytes"] <= m["file_bytes"] <= m["flexswitch"]["budget_bytes"]
    ]
    nan = [
        f"{r['task']} {b}"
        for r, b, m in ok
        if any(v != v for v in (m["accuracy"], m["flexswitch"].get("initial_loss"), m["flexswitch"].get("final_loss")))
    ]
    reload = [f"{r['task']} {b}" for r, b, m in ok if abs(m["accuracy"] - m["accuracy_in_memory"]) > 1e-9]
    below = []
    for r, b, m in ok:
        smaller = [(d, t) for d, t in r["tswitch"].items() if t["file_bytes"] <= m["file_bytes"]]
        if smaller:
            d, t = max(smaller, key=lambda dt: dt[1]["accuracy"])
            if t["accuracy"] > m["accuracy"]:
                below.append(f"{r['task']} {b}: {m['accuracy']:.4f} < T-Switch d={d} {t['accuracy']:.4f}")
    return {
        "flexswitch_calls": len(measured),
        "failed": [f"{r['task']} {b}: {m['error']}" for r, b, m in measured if "error" in m],
        "budget_missed": missed,
        "nan": nan,
        "reload_differs": reload,
        "below_tswitch_per_task": below,
    }


# -- per-unit breakdown ------------------------------------------------------------------------------

UNIT_TYPES = (
    "query",
    "key",
    "value",
    "attention output",
    "intermediate",
    "output dense",
    "embeddings",
    "LayerNorm",
    "bias",
)
_LAYER = re.compile(r"(?:^|\.)layer\.(\d+)\.")


def unit_type(module: str, param: str) -> str:
    """The kind of a BERT unit: its module's role, or ``bias`` for any bias."""
    if "LayerNorm" in module or "layer_norm" in module:
        return "LayerNorm"
    if param == "bias":
        return "bias"
    if "embeddings" in module:
        return "embeddings"
    for part, kind in (
        (".attention.self.query", "query"),
        (".attention.self.key", "key"),
        (".attention.self.value", "value"),
        (".attention.output.dense", "attention output"),
        (".intermediate.dense", "intermediate"),
        (".output.dense", "output dense"),
    ):
        if part in module:
            return kind
    return "other"


def unit_depth(module: str) -> str:
    match = _LAYER.search(module)
    return match.group(1) if match else ("embeddings" if "embeddings" in module else "other")


def breakdown(runs: list[dict], budget: str) -> dict:
    """Mean learned density and bits per unit type and per layer depth at ``budget``, over units then tasks.

    Per group and task: ``density`` = mean of the units' kept / parameters, ``weighted_density`` = kept / parameters
    of the whole group, ``bits`` = mean of the units' value bits, ``kept_bits`` = value bits averaged over the kept
    entries, ``bits_per_param`` = 8 x code bytes / parameters (what the group costs). Averaged over the tasks.
    Per depth only weight matrices (biases and LayerNorms excluded) count."""
    runs = [r for r in runs if budget in r["flexswitch"] and "error" not in r["flexswitch"][budget]]
    groups: dict[str, dict[str, list[dict]]] = {"type": {}, "depth": {}}
    for run in runs:
        per_type: dict[str, list] = {}
        per_depth: dict[str, list] = {}
        for module, param, numel, kept, bits, code, _ in run["flexswitch"][budget]["unit_layout"]:
            unit = {"numel": numel, "kept": kept, "bits": bits, "code_bytes": code}
            kind = unit_type(module, param)
            per_type.setdefault(kind, []).append(unit)
            if kind not in ("bias", "LayerNorm"):
                per_depth.setdefault(unit_depth(module), []).append(unit)
        for name, table in (("type", per_type), ("depth", per_depth)):
            for key, units in table.items():
                groups[name].setdefault(key, []).append(_group_stats(units))
    order = {"type": list(UNIT_TYPES) + ["other"], "depth": None}
    out: dict[str, Any] = {"budget": budget, "tasks": [r["task"] for r in runs]}
    for name, table in groups.items():
        keys = order[name] or sorted(table, key=lambda k: (k != "embeddings", int(k) if k.isdigit() else 99, k))
        out[name] = [
            {
                "group": key,
                "units_per_task": table[key][0]["units"],
                **{
                    stat: _mean([s[stat] for s in table[key]])
                    for stat in ("density", "weighted_density", "bits", "kept_bits", "bits_per_param", "storage_share")
                },
            }
            for key in keys
            if key in table
        ]
    totals = [{"code": sum(u[5] for u in r["flexswitch"][budget]["unit_layout"])} for r in runs]
    for name in ("type", "depth"):
        for entry in out[name]:  # share of the switch's code bytes spent on the group (mean over tasks)
            entry["storage_share"] = _mean(
                [s["code_bytes"] / t["code"] for s, t in zip(groups[name][entry["group"]], totals)]
            )
    out["findings"] = _findings(out)
    return out


def _group_stats(units: list[dict]) -> dict:
    numel = sum(u["numel"] for u in units)
    kept = sum(u["kept"] for u in units)
    return {
        "units": len(units),
        "density": _mean([u["kept"] / u["numel"] for u in units]),
        "weighted_density": kept / numel,
        "bits": _mean([u["bits"] for u in units]),
        "kept_bits": sum(u["bits"] * u["kept"] for u in units) / kept if kept else float("nan"),
        "bits_per_param": 8 * sum(u["code_bytes"] for u in units) / numel,
        "code_bytes": sum(u["code_bytes"] for u in units),
        "storage_share": float("nan"),
    }


def _findings(table: dict) -> dict:
    """Attention projections against the MLP, deeper layers against shallower ones (the paper's claim: attention
    projections and deeper layers tolerate less compression, i.e. get more density / bits)."""
    types = {e["group"]: e for e in table["type"]}
    attention = [types[k] for k in ("query", "key", "value", "attention output") if k in types]
    mlp = [types[k] for k in ("intermediate", "output dense") if k in types]
    depth = [e for e in table["depth"] if e["group"].isdigit()]
    result: dict[str, Any] = {}
    for stat in ("weighted_density", "bits", "bits_per_param"):
        if attention and mlp:
            result[f"attention_{stat}"] = _mean([e[stat] for e in attention])
            result[f"mlp_{stat}"] = _mean([e[stat] for e in mlp])
        if len(depth) >= 2:
            half = len(depth) // 2
            result[f"shallow_{stat}"] = _mean([e[stat] for e in depth[:half]])
            result[f"deep_{stat}"] = _mean([e[stat] for e in depth[-half:]])
            result[f"depth_slope_{stat}"] = _slope([int(e["group"]) for e in depth], [e[stat] for e in depth])
    return result


def _slope(xs: list[int], ys: list[float]) -> float:
    mx, my = _mean(xs), _mean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else float("nan")


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def _size(nbytes: float | None) -> str:
    if nbytes is None or nbytes != nbytes:
        return "-"
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def _f(value: Any, fmt: str = ".4f") -> str:
    return "-" if value is None or (isinstance(value, float) and value != value) else format(value, fmt)


def build_report(
    runs: list[dict], settings: FlexSettings, argv: Sequence[str] | None, software: dict, seconds: float, defaults: dict
) -> dict:
    done = complete_runs(runs, settings)
    rows = summarise(done, settings)
    budget = BREAKDOWN_BUDGET if BREAKDOWN_BUDGET in settings.budgets else settings.budgets[0]
    return {
        "benchmark": "FlexSwitch vs T-Switch (task id given)",
        "command": command_line("benchmarks.flexswitch", argv),
        "model": model_label(settings.model),
        "settings": asdict(settings)
        | {
            "model": model_label(settings.model),
            "finetune": asdict(FinetuneSettings(seed=settings.seed)),
            "flexswitch_config": defaults,
        },
        "seeds": {
            "split_and_finetune": settings.seed,
            "flexswitch": defaults.get("seed"),
            "evaluation_order": settings.seed,
        },
        "complete": len(done) == len(settings.tasks),
        "tasks_complete": [r["task"] for r in done],
        "rows": rows,
        "front": front(rows) if rows else [],
        "target": target(rows) if rows else {},
        "breakdown": breakdown(done, budget) if done else {},
        "checks": checks(runs, settings),
        "runs": runs,
        "seconds": round(seconds, 1),
        "environment": software,
    }


def markdown(report: dict, plot_name: str | None) -> str:
    s = report["settings"]
    defaults = s["flexswitch_config"]
    steps = s["steps"] if s["steps"] is not None else defaults["steps"]
    lines = [
        "# FlexSwitch against T-Switch on the MiniLM suite (task id given)",
        "",
        f"Command (from the repository root): `{report['command']}`",
        "",
        f"Model: {report['model']}, fully fine-tuned per task by the main benchmark (`benchmarks/finetune.py`, default "
        f"settings, seed {s['seed']}; cached fine-tunes), {s['max_train']} train / {s['max_test']} test examples per "
        f"task, evaluated as the pipeline does (batches of {s['eval_batch_size']}, length "
        f"{s['finetune']['max_length']}). FlexSwitch: `FlexSwitchConfig(budget=..., modules_to_save=['classifier'], "
        f"task_type='SEQ_CLS')`, defaults otherwise ({steps} steps, batch {defaults['batch_size']}, bit-widths "
        f"{defaults['bit_widths']}, seed {defaults['seed']}), learned from the first {s['examples']} training texts. "
        "T-Switch: `from_finetuned` with `TSwitchConfig(density=d, modules_to_save=['classifier'], "
        "task_type='SEQ_CLS')` (norm scale). Every adapter is saved, reloaded with `PeftModel.from_pretrained` on a "
        "fresh base and evaluated.",
        "",
        "Size: bytes of `adapter_model.safetensors` per task (fp32 head included), mean over tasks; % of fp32: over "
        "the fp32 task vector of the switched tensors (4 bytes x switched parameters). Time: wall time of the "
        "`flexswitch` call (teacher pass, training, export), and its ratio to the task's fine-tuning time (the cached "
        "fine-tune's own wall time). The machine is shared: the per-task table also gives the call's CPU time and the "
        "1-minute load average before and after it (above 2 on 2 cores, the call was slowed down by other jobs).",
        "",
    ]
    if not report["complete"]:
        lines += [f"**Incomplete run**: tasks measured in full: {', '.join(report['tasks_complete']) or 'none'}.", ""]
    rows = report["rows"]
    if rows:
        lines += [
            "| method | mean acc. | % of individual | size / task | % of fp32 | learned density | steps "
            "| time / task | x fine-tune |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            flex = r["method"] == "flexswitch"
            lines.append(
                f"| {r['label']} | {r['mean']:.4f} | {r['pct_of_individual']:.2f} | {_size(r['bytes'])} | "
                f"{_f(r['pct_of_fp32'], '.3f')} | {_f(r.get('density'), '.4f')} | "
                f"{_f(r.get('steps'), '.0f') if flex else '-'} | {_f(r.get('seconds'), '.1f') + ' s' if flex else '-'} "
                f"| {_f(r.get('finetune_ratio'), '.2f') if flex else '-'} |"
            )
        if plot_name:
            lines += ["", f"![accuracy against bytes]({plot_name})"]
        lines += ["", "## Targets", ""]
        t = report["target"]
        if t.get("best_budget"):
            lines.append(
                f"- FlexSwitch keeps >= {t['target_pct']:g}% of the individual mean at <= "
                f"{t['max_pct_of_fp32']:g}% of fp32: **{'met' if t['met'] else 'missed'}**, "
                f"{t['best_pct_of_individual']:.2f}% at {t['best_pct_of_fp32']:.3f}% of fp32 (budget "
                f"{t['best_budget']})."
            )
        else:
            lines.append(f"- No FlexSwitch row at <= {t.get('max_pct_of_fp32', TARGET_BUDGET_PCT):g}% of fp32.")
        for f in report["front"]:
            if f["best_tswitch_mean"] is None:
                lines.append(
                    f"- Budget {f['budget']} ({_size(f['flexswitch_bytes'])}, {f['flexswitch_mean']:.4f}): no "
                    "T-Switch row is as small."
                )
                continue
            verdict = "at least as accurate" if f["at_least_as_accurate"] else "**less accurate**"
            line = (
                f"- Budget {f['budget']}: FlexSwitch {f['flexswitch_mean']:.4f} at {_size(f['flexswitch_bytes'])} "
                f"is {verdict} than the best T-Switch row of the same or smaller size, d="
                f"{f['best_tswitch_density']:g}: {f['best_tswitch_mean']:.4f} at {_size(f['best_tswitch_bytes'])}"
            )
            if f["next_larger_tswitch_mean"] is not None:
                line += (
                    f" (next larger T-Switch: d={f['next_larger_tswitch_density']:g}, "
                    f"{f['next_larger_tswitch_mean']:.4f} at {_size(f['next_larger_tswitch_bytes'])})"
                )
            lines.append(line + ".")
        flex_rows = [r for r in rows if r["method"] == "flexswitch"]
        if flex_rows:
            worst = max(flex_rows, key=lambda r: r["max_seconds"])
            lines.append(
                f"- Learning one switch within 2 minutes on the CPUs used: longest call {worst['max_seconds']:.0f} s "
                f"(budget {worst['budget']}); mean {_mean([r['seconds'] for r in flex_rows]):.0f} s, "
                f"{_mean([r['finetune_ratio'] for r in flex_rows]):.2f} x the fine-tuning time."
            )
        c = report.get("checks")
        if c:
            lines += ["", "## Checks", "", f"Over {c['flexswitch_calls']} FlexSwitch calls:", ""]
            for key, what in (
                ("failed", "calls that failed"),
                ("budget_missed", "files outside [95%, 100%] of the budget"),
                ("nan", "NaN losses or accuracies"),
                ("reload_differs", "saved-and-reloaded accuracy different from the in-memory model's"),
                ("below_tswitch_per_task", "tasks where a T-Switch with a file no larger is more accurate"),
            ):
                found = c[key]
                lines.append(f"- {what}: " + ("none" if not found else f"**{len(found)}**: " + "; ".join(found)))
        tasks = list(rows[0]["per_task"])
        lines += [
            "",
            "## Accuracy per task",
            "",
            "| method | " + " | ".join(tasks) + " |",
            "|---|" + "---:|" * len(tasks),
        ]
        for r in rows:
            lines.append(f"| {r['label']} | " + " | ".join(f"{r['per_task'][t]:.4f}" for t in tasks) + " |")
        lines += _flex_details(report, tasks)
        lines += _breakdown_lines(report["breakdown"])
    env = report["environment"]
    lines += [
        "",
        f"Runtime: {report['seconds']:.0f} s of this invocation ({env['torch_threads']} threads, "
        f"{env['cpu_count']} CPUs, shared machine); switch-adapter {env['switch_adapter']}, commit "
        f"{env['git_commit']}, torch {env['torch']}, transformers {env['transformers']}.",
        "",
    ]
    return "\n".join(lines)


def _flex_details(report: dict, tasks: list[str]) -> list[str]:
    runs = {r["task"]: r for r in report["runs"]}
    budgets = report["settings"]["budgets"]
    lines = [
        "",
        "## FlexSwitch per task",
        "",
        "Bits: units per value bit-width (`bits:units`). Budget: the size the budget allows; the file must lie "
        "within 5% below it.",
        "",
        "| task | budget | accuracy | in memory | file | budget bytes | % of fp32 | density | bits | steps "
        "| initial -> final loss | time | CPU s | load avg. | fine-tune | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|---|---:|---:|",
    ]
    for task in tasks:
        for budget in budgets:
            m = runs[task]["flexswitch"][budget]
            if "error" in m:
                lines.append(f"| {task} | {budget} | failed after {m['seconds']:.0f} s: {m['error']} |")
                continue
            fx = m["flexswitch"]
            bits = " ".join(f"{b}:{n}" for b, n in m["bits_units"].items())
            lines.append(
                f"| {task} | {budget} | {m['accuracy']:.4f} | {m['accuracy_in_memory']:.4f} | "
                f"{m['file_bytes']:,} | {fx.get('budget_bytes', 0):,} | {m['pct_of_fp32']:.3f} | "
                f"{m['density']:.4f} | {bits} | {fx.get('steps')} | {_f(fx.get('initial_loss'), '.4g')} -> "
                f"{_f(fx.get('final_loss'), '.4g')} | {m['seconds']:.0f} s | "
                f"{_f(m.get('cpu_seconds'), '.0f')} | {_load(m.get('load_average'))} | "
                f"{runs[task]['finetune']['seconds']:.0f} s | {m['finetune_ratio']:.2f} |"
            )
    flex_rows = [r for r in report["rows"] if r["method"] == "flexswitch"]
    lines += ["", "Bits histogram over all tasks (units / kept entries per value bit-width):", ""]
    for r in flex_rows:
        units = ", ".join(f"{b} bit: {n}" for b, n in r["bits_units"].items())
        total = sum(r["bits_kept"].values()) or 1
        kept = ", ".join(f"{b} bit: {100 * n / total:.1f}%" for b, n in r["bits_kept"].items())
        lines.append(f"- {r['budget']}: units {units}; kept entries {kept}.")
    return lines


def _load(load: dict | None) -> str:
    return f"{load['before']:.1f} -> {load['after']:.1f}" if load else "-"


def _breakdown_lines(table: dict) -> list[str]:
    if not table:
        return []
    lines = [
        "",
        f"## Per-unit breakdown (budget {table['budget']}, mean over {len(table['tasks'])} tasks)",
        "",
        "Density: mean over the group's units of kept / parameters; weighted: kept / parameters of the whole "
        "group. Bits: mean value bit-width of the units; kept-weighted: over the kept entries. Bits/param: "
        "8 x code bytes / parameters (what the group costs). Storage share: of the switch's code bytes.",
        "",
    ]
    header = (
        "| {} | units/task | density | weighted density | bits | kept-weighted bits | bits/param | storage share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    )
    for name, title in (("type", "unit type"), ("depth", "layer (weight matrices only)")):
        lines += ["", header[0].format(title), header[1]]
        for e in table[name]:
            lines.append(
                f"| {e['group']} | {e['units_per_task']} | {e['density']:.4f} | {e['weighted_density']:.4f} | "
                f"{e['bits']:.2f} | {_f(e['kept_bits'], '.2f')} | {e['bits_per_param']:.3f} | "
                f"{100 * e['storage_share']:.1f}% |"
            )
    f = table["findings"]
    lines += [""]
    if "attention_weighted_density" in f:
        more = lambda a, b: "more" if a > b else "less" if a < b else "the same"  # noqa: E731
        lines.append(
            f"- Attention projections (query/key/value/attention output) against the MLP (intermediate/output dense): "
            f"weighted density {f['attention_weighted_density']:.4f} vs {f['mlp_weighted_density']:.4f} "
            f"({more(f['attention_weighted_density'], f['mlp_weighted_density'])}), mean bits "
            f"{f['attention_bits']:.2f} vs {f['mlp_bits']:.2f} ({more(f['attention_bits'], f['mlp_bits'])}), "
            f"bits/param {f['attention_bits_per_param']:.3f} vs {f['mlp_bits_per_param']:.3f} "
            f"({more(f['attention_bits_per_param'], f['mlp_bits_per_param'])})."
        )
    if "deep_weighted_density" in f:
        more = lambda a, b: "more" if a > b else "less" if a < b else "the same"  # noqa: E731
        lines.append(
            f"- Deeper layers (second half) against shallower ones (first half): weighted density "
            f"{f['deep_weighted_density']:.4f} vs {f['shallow_weighted_density']:.4f} "
            f"({more(f['deep_weighted_density'], f['shallow_weighted_density'])}; slope per layer "
            f"{f['depth_slope_weighted_density']:+.4f}), mean bits {f['deep_bits']:.2f} vs {f['shallow_bits']:.2f} "
            f"({more(f['deep_bits'], f['shallow_bits'])}), bits/param {f['deep_bits_per_param']:.3f} vs "
            f"{f['shallow_bits_per_param']:.3f} ({more(f['deep_bits_per_param'], f['shallow_bits_per_param'])})."
        )
    return lines


def plot(report: dict, path: Path) -> Path | None:
    """Mean accuracy against mean adapter bytes per task (log x): FlexSwitch points against the T-Switch front."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning('matplotlib is not installed, so no plot was drawn: pip install "switch-adapter[bench]".')
        return None
    rows = report["rows"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8.5, 5.0), dpi=120)
    tswitch = sorted((r for r in rows if r["method"] == "tswitch"), key=lambda r: r["bytes"])
    ax.plot(
        [r["bytes"] for r in tswitch],
        [r["mean"] for r in tswitch],
        marker="o",
        color="#1f77b4",
        label="T-Switch (norm scale)",
    )
    for r in tswitch:
        ax.annotate(
            f"d={r['density']:g}",
            (r["bytes"], r["mean"]),
            textcoords="offset points",
            xytext=(4, -11),
            fontsize=7,
            color="#1f77b4",
        )
    flex = sorted((r for r in rows if r["method"] == "flexswitch"), key=lambda r: r["bytes"])
    ax.plot(
        [r["bytes"] for r in flex],
        [r["mean"] for r in flex],
        marker="*",
        markersize=13,
        linestyle="--",
        color="#d62728",
        label="FlexSwitch",
    )
    for r in flex:
        ax.annotate(
            r["budget"], (r["bytes"], r["mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8, color="#d62728"
        )
    individual = next(r for r in rows if r["method"] == "individual")
    ax.axhline(individual["mean"], color="#000000", linewidth=0.8, linestyle=":", label="individual fine-tunes")
    ax.axhline(
        individual["mean"] * TARGET_PCT / 100,
        color="#2ca02c",
        linewidth=0.8,
        linestyle="--",
        label=f"{TARGET_PCT:g}% of individual",
    )
    fp32 = _mean([r["bytes"] / (r["pct_of_fp32"] / 100) for r in flex + tswitch])
    ax.axvline(
        fp32 * TARGET_BUDGET_PCT / 100,
        color="#ff7f0e",
        linewidth=0.8,
        linestyle="--",
        label=f"{TARGET_BUDGET_PCT:g}% of fp32",
    )
    ax.set_xscale("log")
    ax.set_xlabel("adapter_model.safetensors per task, bytes (log scale)")
    ax.set_ylabel(f"mean test accuracy over {len(report['tasks_complete'])} tasks")
    ax.set_title("FlexSwitch vs T-Switch, task id given (all-MiniLM-L6-v2)")
    ax.grid(True, which="both", linewidth=0.3, alpha=0.6)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(report: dict, out: Path) -> None:
    """``<out>.json``, ``<out>.png`` and ``<out>.md``."""
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    drawn = plot(report, out.with_suffix(".png")) if report["rows"] else None
    out.with_suffix(".md").write_text(markdown(report, drawn.name if drawn else None))


def rewrite_report(out: Path) -> dict:
    """Rebuild the summaries, ``.md`` and ``.png`` of ``<out>.json`` from its measurements (``--report-only``); the
    command, runtime and environment of the run that measured them are kept."""
    earlier = json.loads(out.with_suffix(".json").read_text())
    known = {f.name for f in dataclasses.fields(FlexSettings)}
    values = {k: v for k, v in earlier["settings"].items() if k in known}
    values["model"] = None if values.get("model", "").startswith("all-MiniLM-L6-v2 (") else values.get("model")
    for key in ("tasks", "budgets", "densities"):
        values[key] = tuple(values[key])
    settings = FlexSettings(**values)
    report = build_report(
        earlier["runs"],
        settings,
        None,
        earlier["environment"],
        earlier["seconds"],
        earlier["settings"]["flexswitch_config"],
    )
    report["command"] = earlier["command"]
    write_report(report, out)
    return report


def resumed_runs(path: Path, settings: FlexSettings) -> list[dict]:
    """The (possibly partial) runs of an earlier result file measured with the same settings; none otherwise."""
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())
    now = asdict(settings) | {"model": model_label(settings.model)}
    if any(json.dumps(earlier["settings"].get(k)) != json.dumps(now[k]) for k in RESUME_KEYS):
        logger.warning("Not resuming from %s: it was measured with other settings.", path)
        return []
    runs = [run for run in earlier["runs"] if run["task"] in settings.tasks]
    logger.info("Resuming from %s: %d task(s) with earlier measurements.", path, len(runs))
    return runs


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in _names(text))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flexswitch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=_names, default=DEFAULT_TASKS, metavar="A,B,...")
    parser.add_argument(
        "--budgets",
        type=_names,
        default=DEFAULT_BUDGETS,
        metavar="B,...",
        help="FlexSwitch budgets (FlexSwitchConfig.budget), default 0.25%%,0.5%%,1%%",
    )
    parser.add_argument(
        "--densities",
        type=_floats,
        default=DEFAULT_DENSITIES,
        metavar="D,...",
        help="T-Switch densities (default 0.01,0.02,0.03,0.05,0.1)",
    )
    parser.add_argument("--steps", type=int, help="FlexSwitch steps (default: FlexSwitchConfig's)")
    parser.add_argument("--examples", type=int, default=100, help="training texts FlexSwitch learns from")
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--max-test", type=int, default=300)
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and fine-tunes (the main benchmark's)")
    parser.add_argument("--model", metavar="DIR", help="a BERT-family model folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--cache-dir", metavar="DIR", help="fine-tune cache (default ~/.cache/switch_adapter/bench)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS), help="output path without suffix; .json, .md, .png are written")
    parser.add_argument("--resume", action="store_true", help="keep the measurements of an existing --out file")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the .md and .png of an existing --out file, measuring nothing",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from switch_adapter import FlexSwitchConfig
    from switch_adapter.flexswitch import parse_budget

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    for budget in args.budgets:
        parse_budget(budget)
    settings = FlexSettings(
        tasks=args.tasks,
        budgets=args.budgets,
        densities=args.densities,
        steps=args.steps,
        examples=args.examples,
        max_train=args.max_train,
        max_test=args.max_test,
        eval_batch_size=args.eval_batch_size,
        seed=args.seed,
        model=args.model,
    )
    defaults = {k: v for k, v in asdict(FlexSwitchConfig()).items() if not k.startswith("_")}
    out = Path(args.out)
    out = out.with_suffix("") if out.suffix in (".json", ".md", ".png") else out
    if args.report_only:
        return rewrite_report(out)
    start = time.perf_counter()
    software = environment()  # before the run: the commit whose code measures
    model_path = args.model or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = {run["task"]: run for run in (resumed_runs(out.with_suffix(".json"), settings) if args.resume else [])}
    ordered = lambda: [runs[t] for t in settings.tasks if t in runs]  # noqa: E731

    def save(run: dict) -> None:
        runs[run["task"]] = run
        report = build_report(ordered(), settings, argv, software, time.perf_counter() - start, defaults)
        write_report(report, out)  # after every measurement: an interrupted run keeps what it measured

    per_task = len(settings.budgets) + len(settings.densities)
    with tqdm(total=per_task * len(settings.tasks), desc="flexswitch bench") as bar:
        for task in settings.tasks:
            earlier = runs.get(task)
            if earlier and earlier in complete_runs([earlier], settings):
                bar.update(per_task)
                continue
            run_task(task, settings, earlier, model_path, tokenizer, cache, save, bar)
    report = build_report(ordered(), settings, argv, software, time.perf_counter() - start, defaults)
    write_report(report, out)
    print(markdown(report, out.with_suffix(".png").name if report["rows"] else None))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
