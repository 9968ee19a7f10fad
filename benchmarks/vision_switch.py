"""The vision suite's switch rows: T-Switch with the task id at densities (BatchNorm statistics carried, and
re-estimated with the switch active), FlexSwitch at budgets, and Auto-Switch routing images per sample on mixed
batches.

Each row needs library support for image models: BatchNorm layers in switches (running statistics carried, and
``switch_adapter.recalibrate_norm_statistics``) and a router that takes plain modules and image tensors. When the
installed library lacks one, the rows that need it are listed under ``not_run`` in the report with the reason.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import switch_adapter

from . import artifacts, evaluate
from .vision import INPUT_KEY, peft_oracle_predictor
from .vision_model import statistic_names

if TYPE_CHECKING:
    from collections.abc import Callable

    from .pipeline import Row
    from .vision import VisionBenchmark


def batchnorm_support() -> str | None:
    """None when the library switches BatchNorm layers; else why the T-Switch / FlexSwitch rows cannot run."""
    if not hasattr(switch_adapter, "recalibrate_norm_statistics"):
        return ("this switch_adapter has no BatchNorm support (switch_adapter.recalibrate_norm_statistics is missing): "
                "its switches would drop every BatchNorm change, statistics included")  # fmt: skip
    return None


def router_support() -> str | None:
    """None when the router takes plain modules and image tensors; else why the Auto-Switch rows cannot run."""
    from switch_adapter import AutoSwitchConfig

    if "feature_module" not in getattr(AutoSwitchConfig, "__dataclass_fields__", {}):
        return ("this switch_adapter's router cannot take features from a plain module (AutoSwitchConfig has no "
                "feature_module)")  # fmt: skip
    return batchnorm_support()


def steps(bench: VisionBenchmark) -> list[tuple[str, Callable[[], Any]]]:
    """The switch rows ``bench`` can run with the installed library (the others go to ``bench.not_run``)."""
    cfg, out = bench.config, []
    missing = batchnorm_support()
    if missing:
        for density in cfg.densities:
            bench.not_run[f"T-Switch d={density:g}"] = missing
        for budget in cfg.flexswitch_budgets:
            bench.not_run[f"FlexSwitch {budget}"] = missing
    else:
        out += [(f"T-Switch d={d:g}", lambda d=d: run_tswitch(bench, d)) for d in cfg.densities]
        out += [(f"T-Switch d={d:g} recalibrated", lambda d=d: run_tswitch(bench, d, recalibrate=True))
                for d in cfg.recalibrated_densities]  # fmt: skip
        out += [(f"FlexSwitch {b}", lambda b=b: run_flexswitch(bench, b)) for b in cfg.flexswitch_budgets]
    missing = router_support()
    if missing:
        bench.not_run["Auto-Switch (routed per sample, mixed batches)"] = missing
    else:
        out.append(("Auto-Switch", lambda: run_autoswitch(bench)))
    return out


# ----------------------------------------------------------------------------------------------------
# T-Switch
# ----------------------------------------------------------------------------------------------------


def switch_config(bench: VisionBenchmark, density: float):
    from switch_adapter import TSwitchConfig

    return TSwitchConfig(density=density, scale_rule=bench.config.scale_rule, modules_to_save=[bench.model.head])


def without_statistics(network: nn.Module, base: nn.Module) -> dict[str, torch.Tensor]:
    """``network``'s state dict with the base's BatchNorm running statistics: a switch built from it carries none."""
    names = statistic_names(base)
    base_state = base.state_dict()
    return {name: base_state[name] if name in names else value for name, value in network.state_dict().items()}


def build_switches(bench: VisionBenchmark, density: float, carry_statistics: bool = True) -> tuple[Path, float]:
    """T-Switch adapters of every task at ``density`` (``from_finetuned``), saved with ``save_pretrained``; without
    ``carry_statistics`` they hold no BatchNorm statistics (to be re-estimated at load)."""
    from switch_adapter import from_finetuned

    folder = bench.artifacts / (f"tswitch_d{density:g}" + ("" if carry_statistics else "_no_statistics"))
    artifacts.remove(folder)
    start = time.perf_counter()
    model: Any = bench.fresh_base()
    for adapter, network in zip(bench.adapters, bench.models):
        source = network if carry_statistics else without_statistics(network, bench.base)
        model = from_finetuned(model, source, switch_config(bench, density), adapter_name=adapter, progress=False)
    for adapter in bench.adapters:
        model.save_pretrained(str(folder / adapter), selected_adapters=[adapter])
    seconds = time.perf_counter() - start
    del model
    gc.collect()
    return folder, seconds


def adapter_folder(folder: Path, adapter: str) -> Path:
    """Where ``save_pretrained`` put ``adapter`` (peft nests non-default adapters in a sub-folder)."""
    nested = folder / adapter / adapter
    return nested if (nested / "adapter_config.json").exists() else folder / adapter


def load_switches(bench: VisionBenchmark, folder: Path):
    """A ``PeftModel`` on a fresh base with every task's adapter from ``folder`` (eval mode)."""
    from peft import PeftModel

    model = None
    for adapter in bench.adapters:
        path = str(adapter_folder(folder, adapter))
        if model is None:
            model = PeftModel.from_pretrained(bench.fresh_base(), path, adapter_name=adapter)
        else:
            model.load_adapter(path, adapter_name=adapter)
    return model.eval()


def recalibrate_switches(bench: VisionBenchmark, model) -> float:
    """Re-estimate every adapter's BatchNorm statistics with its switch active, on ``recalibration_examples`` of its
    task's training images (``switch_adapter.recalibrate_norm_statistics``); returns the seconds spent."""
    start = time.perf_counter()
    for index, adapter in enumerate(bench.adapters):
        examples = bench.recalibration_batches([index])
        switch_adapter.recalibrate_norm_statistics(model, examples, adapter_name=adapter, progress=False)
    model.eval()
    return time.perf_counter() - start


def run_tswitch(bench: VisionBenchmark, density: float, recalibrate: bool = False) -> Row:
    """The T-Switch row at ``density`` with the task id: BatchNorm statistics carried by the switch (the fine-tune's),
    or (with ``recalibrate``) not stored but re-estimated at load with the switch active from
    ``recalibration_examples`` unlabelled training images per task (the load time includes it)."""
    folder = None if recalibrate else bench.switch_folders.get(density)
    build = 0.0
    if folder is None:
        folder, build = build_switches(bench, density, carry_statistics=not recalibrate)
        if not recalibrate:
            bench.switch_folders[density] = folder
    start = time.perf_counter()
    model = load_switches(bench, folder)
    params: dict[str, Any] = {"density": density, "scale_rule": bench.config.scale_rule}
    label = f"T-Switch, task id given (d={density:g}, {bench.config.scale_rule} scale"
    if recalibrate:
        params["recalibration_seconds"] = round(recalibrate_switches(bench, model), 3)
        examples = bench.config.recalibration_examples
        params["batchnorm"] = f"not stored; re-estimated at load with the switch active on {examples} images per task"
        label += (
            f", BatchNorm statistics not stored: re-estimated at load on {bench.config.recalibration_examples} images)"
        )
    else:
        params["batchnorm"] = "the fine-tune's statistics, carried by the switch"
        label += ", BatchNorm statistics carried)"
    params["load_seconds"] = round(time.perf_counter() - start, 3)
    result = bench._evaluate(peft_oracle_predictor(model, bench.adapters), f"Evaluate: {label}")
    storage = artifacts.bytes_on_disk([folder])
    method = "tswitch_recalibrated" if recalibrate else "tswitch"
    row = bench._add_row(method, label, result, storage, build, params=params, files=[bench._relative(folder)])
    del model
    gc.collect()
    return row


# ----------------------------------------------------------------------------------------------------
# FlexSwitch
# ----------------------------------------------------------------------------------------------------


def run_flexswitch(bench: VisionBenchmark, budget: str) -> Row | None:
    """FlexSwitch adapters of every task at ``budget``, learned from each task's first training images; None (and the
    reason under ``not_run``) for a budget below the smallest switch of the model."""
    from switch_adapter import BudgetError, FlexSwitchConfig, flexswitch

    from .vision_tasks import model_inputs

    folder = bench.artifacts / f"flexswitch_{budget.replace('%', 'pct')}"
    artifacts.remove(folder)
    start, records = time.perf_counter(), {}
    cfg = bench.config
    for index, (adapter, task, network) in enumerate(zip(bench.adapters, bench.suite, bench.models)):
        settings = {"steps": cfg.flexswitch_steps} if cfg.flexswitch_steps else {}
        config = FlexSwitchConfig(budget=budget, modules_to_save=[bench.model.head], seed=cfg.seed, **settings)
        examples = model_inputs(task.train.images[: cfg.flexswitch_examples], bench.size)
        task_start = time.perf_counter()
        try:
            model = flexswitch(bench.fresh_base(), network, examples, config, progress=False)
        except BudgetError as error:
            bench.not_run[f"FlexSwitch {budget}"] = str(error)
            artifacts.remove(folder)
            return None
        if cfg.flexswitch_recalibrate:
            switch_adapter.recalibrate_norm_statistics(model, bench.recalibration_batches([index]), progress=False)
        records[adapter] = dict(model.peft_config["default"].flexswitch,
                                seconds=round(time.perf_counter() - task_start, 1))  # fmt: skip
        model.save_pretrained(str(folder / adapter))
        del model
    build = time.perf_counter() - start
    model = load_switches(bench, folder)
    result = bench._evaluate(peft_oracle_predictor(model, bench.adapters), f"Evaluate: FlexSwitch {budget}")
    storage = artifacts.bytes_on_disk([folder])
    params = {"budget": budget, "steps": cfg.flexswitch_steps, "examples": cfg.flexswitch_examples, "per_task": records,
              "batchnorm": "re-estimated with the switch active, stored" if cfg.flexswitch_recalibrate
              else "the fine-tune's statistics, carried"}  # fmt: skip
    row = bench._add_row("flexswitch", f"FlexSwitch, task id given (budget {budget} of fp32 per task)", result,
                         storage, build, params=params, files=[bench._relative(folder)])  # fmt: skip
    del model
    gc.collect()
    return row


# ----------------------------------------------------------------------------------------------------
# Auto-Switch
# ----------------------------------------------------------------------------------------------------


def autoswitch_density(bench: VisionBenchmark) -> float:
    """``autoswitch_density``, else the smallest density whose task-id row keeps ``autoswitch_pct`` percent of the
    individual networks' mean accuracy (else the best task-id row's density)."""
    cfg = bench.config
    if cfg.autoswitch_density is not None:
        return cfg.autoswitch_density
    individual = next(row for row in bench.rows if row.method == "individual").mean
    rows = [row for row in bench.rows if row.method == "tswitch_recalibrated"]
    rows = rows or [row for row in bench.rows if row.method == "tswitch"]
    if not rows:
        return min(cfg.densities)
    good = [row for row in rows if row.mean >= cfg.autoswitch_pct / 100 * individual]
    if good:
        return min(row.params["density"] for row in good)
    return max(rows, key=lambda row: row.mean).params["density"]


def run_autoswitch(bench: VisionBenchmark) -> Row:
    """Auto-Switch over the T-Switch adapters at :func:`autoswitch_density`: query sets of ``query_examples``
    training images per task, features of the pre-trained network, every test sample routed to one task (top-1)."""
    from switch_adapter import AutoSwitchConfig, AutoSwitchModel

    cfg = bench.config
    density = autoswitch_density(bench)
    recalibrated = bool(cfg.recalibrated_densities) and cfg.autoswitch_density is None
    start = time.perf_counter()
    if recalibrated:  # the switches without statistics, re-estimated with each switch active, in one PeftModel
        folder, switch_build = build_switches(bench, density, carry_statistics=False)[0], 0.0  # timed below
        base: Any = load_switches(bench, folder)
        recalibrate_switches(bench, base)
        adapters = None
    else:
        folder, switch_build = bench.switch_folders.get(density), 0.0
        if folder is None:
            folder, switch_build = build_switches(bench, density)
            bench.switch_folders[density] = folder
        base, adapters = bench.fresh_base(), {a: str(adapter_folder(folder, a)) for a in bench.adapters}
    from .vision_tasks import model_inputs

    queries = {a: model_inputs(t.train.images[: cfg.query_examples], bench.size)
               for a, t in zip(bench.adapters, bench.suite)}  # fmt: skip
    config = AutoSwitchConfig(**router_settings(bench))
    router = AutoSwitchModel.from_pretrained(base, adapters=adapters, query_sets=queries, config=config,
                                             progress=bench.progress)  # fmt: skip
    bundle = bench.artifacts / f"autoswitch_d{density:g}"
    artifacts.remove(bundle)
    router.save_pretrained(str(bundle))
    seconds = time.perf_counter() - start
    result = bench._evaluate(router_predictor(router, bench.adapters), "Evaluate: Auto-Switch")
    statistics = "re-estimated with each switch active, stored in the bundle" if recalibrated else "carried"
    route, forward = router.route, bench.base
    cost = evaluate.routing_cost(lambda x: route(x[INPUT_KEY]), lambda x: forward(x[INPUT_KEY]), bench.test_stream)
    params = {
        "density": density,
        "k": cfg.knn_k,
        "query_examples": cfg.query_examples,
        "mode": config.mode,
        "metric": getattr(router, "metric", config.metric),
        "feature_layer": bench.model.feature_module,
        "batchnorm": statistics,
        "router_build_seconds": round(seconds, 3),
        "routing_cost": cost,
        "routing_cost_ratio": cost["ratio"],
    }
    label = (
        f"Auto-Switch, routed per sample, top-1 task (d={density:g}, BatchNorm statistics {statistics.split(',')[0]}"
        f"; features of {bench.model.feature_module}, {cfg.query_examples} query images per task)"
    )
    row = bench._add_row("autoswitch", label, result, artifacts.bytes_on_disk([bundle]), seconds + switch_build,
                         params=params, files=[bench._relative(bundle)])  # fmt: skip
    del router
    gc.collect()
    return row


def router_settings(bench: VisionBenchmark) -> dict[str, Any]:
    """``AutoSwitchConfig`` keyword arguments: the suite's k and seed, top-1 routing, no out-of-distribution fallback
    (the pre-trained network's head is untrained here), and the model's routing feature module."""
    return {"k": bench.config.knn_k, "seed": bench.config.seed, "ood_fallback": False, "mode": "top1",
            "examples_per_task": bench.config.query_examples, "feature_module": bench.model.feature_module}  # fmt: skip


def router_predictor(router, names: Sequence[str]) -> evaluate.Predictor:
    """An ``AutoSwitchModel`` on image batches: no task id; the routed task's head gives the label."""
    index = {name: i for i, name in enumerate(names)}

    def predict(batch: evaluate.Batch) -> evaluate.Prediction:
        outputs, routing = router(batch.inputs[INPUT_KEY], return_routing=True)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        tasks = torch.tensor([index.get(task, -1) if task is not None else -1 for task in routing.top_task])
        return evaluate.Prediction(logits.argmax(dim=-1), tasks, routed=True)

    return predict
